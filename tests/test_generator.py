"""generator.py against the official reference (the imagebert_tiny / uvitbert_tiny fixtures and the
losses fixture, see $TITOK_SHARED/parity/README.md), the released key layouts and the loaders."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

import common
import generator as G
from common import UserError, read_safetensors

ROOT = Path(__file__).resolve().parents[1]

SHARED = os.environ.get("TITOK_SHARED")
LOCAL = Path(__file__).parent / "fixtures"
FIXTURES = ([Path(SHARED) / "parity"] if SHARED else []) + [
    LOCAL
]  # shared/ first, else tests/fixtures


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second thread only adds synchronisation (and stalls badly when the
    2-core machine is shared). Restored afterwards for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def case_files(name: str):
    """(json, weights or None, io) of a parity case from $TITOK_SHARED/parity, else the copies in
    tests/fixtures/. Skips (saying why) only when neither has it."""
    for folder in FIXTURES:
        if (folder / f"{name}.json").is_file():
            weights = folder / f"{name}.weights.safetensors"
            return (
                json.loads((folder / f"{name}.json").read_text()),
                read_safetensors(weights) if weights.is_file() else None,
                read_safetensors(folder / f"{name}.io.safetensors"),
            )
    pytest.skip(f"parity case {name} needs TITOK_SHARED=<path to shared/> (not in tests/fixtures)")


def build(meta, weights):
    model = G.build_generator(G.config_from_official(meta["config"]))
    common.load_official_weights(model, weights)
    return model.eval()


def assert_close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


CASES = ["imagebert_tiny", "uvitbert_tiny"]


@pytest.mark.parametrize("name", CASES)
def test_logits_match_reference(name):
    meta, weights, io = case_files(name)
    model = build(meta, weights)
    assert (
        type(model).__name__ == {"imagebert_tiny": "ImageBert", "uvitbert_tiny": "UViTBert"}[name]
    )
    ids, y = io["input_ids"], io["class_labels"]
    with torch.no_grad():
        assert_close(model(ids, y), io["logits_cond"])
        # the reference's cond_drop_prob=1: every label replaced by the null class
        assert_close(model(ids, torch.full_like(y, model.null_label)), io["logits_uncond"])


def sampling_runs():
    for name in CASES:
        meta_file = next((f for f in FIXTURES if (f / f"{name}.json").is_file()), None)
        runs = (
            json.loads((meta_file / f"{name}.json").read_text())["sampling_runs"]
            if meta_file
            else {}
        )
        for run in runs:
            yield pytest.param(name, run, id=f"{name}-{run}")


def generate_kwargs(run: dict) -> dict:
    kw = run["generate_kwargs"]
    return dict(
        num_steps=kw["num_sample_steps"],
        guidance_scale=kw["guidance_scale"],
        guidance_schedule=kw["guidance_decay"],
        guidance_pow=kw.get("guidance_scale_pow", 3.0),
        randomize_temperature=kw["randomize_temperature"],
        softmax_annealing=kw["softmax_temperature_annealing"],
    )


@pytest.mark.parametrize("name,run_name", list(sampling_runs()))
def test_seeded_sampling_reproduces_reference_ids(name, run_name):
    """Exact ids, step by step, with the global RNG seeded as the reference was; then the same
    with an explicit torch.Generator."""
    meta, weights, io = case_files(name)
    model = build(meta, weights)
    run, prefix = meta["sampling_runs"][run_name], f"sample_{run_name}_"
    labels, kw = io[prefix + "labels"], generate_kwargs(meta["sampling_runs"][run_name])
    B = labels.shape[0]

    calls = []  # every forward generate() makes: (input_ids, class_labels)
    forward = model.forward
    model.forward = lambda ids, y: (calls.append((ids.clone(), y.clone())), forward(ids, y))[1]
    torch.manual_seed(run["torch_manual_seed_before_generate"])
    out = G.generate(model, labels, **kw)
    del model.forward

    # Our calls are batched [cond rows; uncond rows]; the reference made them one by one.
    ref_ids, ref_drop = io[prefix + "trace_input_ids"], io[prefix + "trace_cond_drop_prob"].tolist()
    expected, i = [], 0
    while i < len(ref_drop):
        assert ref_drop[i] == 0.0
        guided = i + 1 < len(ref_drop) and ref_drop[i + 1] == 1.0
        expected.append((ref_ids[i], guided))
        i += 2 if guided else 1
    assert len(calls) == len(expected) == kw["num_steps"]
    for step, ((ids, y), (want, guided)) in enumerate(zip(calls, expected)):
        assert ids.shape[0] == (2 * B if guided else B), f"step {step}: guidance on/off differs"
        assert torch.equal(ids[:B], want), f"step {step}: input ids differ from the reference"
        assert torch.equal(y[:B], labels)
        if guided:
            assert torch.equal(ids[B:], want)
            assert (y[B:] == model.null_label).all()
    assert out.dtype == torch.int64
    assert torch.equal(out, io[prefix + "tokens"])

    rng = torch.Generator().manual_seed(run["torch_manual_seed_before_generate"])
    assert torch.equal(G.generate(model, labels, **kw, generator=rng), io[prefix + "tokens"])


class TiedLogits(torch.nn.Module):
    """Stub generator: row 0 has distinct logits per position, every other row is all ties, so
    rows re-mask different numbers of tokens. Records the masked count per row at each call."""

    seq_len, codebook_size, mask_id, num_classes, null_label = 8, 4, 4, 10, 10

    def __init__(self):
        super().__init__()
        self.counts = []

    def forward(self, ids, y):
        self.counts.append((ids == self.mask_id).sum(1).tolist())
        logits = torch.zeros(ids.shape[0], 8, 4)
        logits[0, :, 0] = torch.arange(8.0)
        return logits


def test_mask_count_follows_batch_row_0():
    """Reference quirk: each step's re-mask count is bounded by batch row 0's masked count."""
    stub = TiedLogits()
    G.generate(
        stub, torch.tensor([0, 1]), num_steps=16, guidance_scale=0.0, randomize_temperature=0.0
    )
    row0, n = [8], 8
    for step in range(15):
        n = max(1, min(n - 1, math.floor(8 * math.acos((step + 1) / 16) / (math.pi / 2))))
        row0.append(n)
    assert [c[0] for c in stub.counts] == row0
    assert all(
        c[1] == 8 for c in stub.counts
    )  # all-tied row: everything <= the cut-off is re-masked


def test_batched_guidance_equals_two_forwards_and_draws_like_the_reference():
    meta, weights, io = case_files("imagebert_tiny")
    model = build(meta, weights)
    ids, y = io["input_ids"], io["class_labels"]
    null = torch.full_like(y, model.null_label)
    with torch.no_grad():
        cond, uncond = model(ids, y), model(ids, null)
        both = model(torch.cat([ids, ids]), torch.cat([y, null]))
        assert_close(both[:4], cond)
        assert_close(both[4:], uncond)
        for schedule, scale, want in [
            ("linear", 2.5, cond + (cond - uncond) * 2.5),
            ("power-cosine", 2.5, uncond + (cond - uncond) * 2.5),
        ]:
            rng = torch.Generator().manual_seed(7)
            assert_close(G.guided_logits(model, ids, y, scale, schedule, rng), want)
            # two label-dropout draws of B values, as the reference's two forward calls
            ref = torch.Generator().manual_seed(7)
            torch.rand(4, generator=ref), torch.rand(4, generator=ref)
            assert torch.equal(torch.rand(3, generator=rng), torch.rand(3, generator=ref))
        rng = torch.Generator().manual_seed(7)
        assert_close(G.guided_logits(model, ids, y, 0.0, "linear", rng), cond)  # unguided: one draw
        ref = torch.Generator().manual_seed(7)
        torch.rand(4, generator=ref)
        assert torch.equal(torch.rand(3, generator=rng), torch.rand(3, generator=ref))


def test_guidance_schedules():
    assert G.guidance_scale_at(0, 8, 4.5, "constant") == 4.5
    assert [G.guidance_scale_at(s, 8, 4.0, "linear") for s in (0, 4, 7)] == [0.0, 2.0, 3.5]
    pc = [float(G.guidance_scale_at(s, 64, 6.9, "power-cosine")) for s in range(64)]
    closed_form = [1 + 5.9 * (1 - math.cos(math.pi * (s / 64) ** 3)) / 2 for s in range(64)]
    assert max(abs(a - b) for a, b in zip(pc, closed_form)) < 1e-5  # float32, like the reference
    assert pc[0] == 1.0 and all(a <= b for a, b in zip(pc, pc[1:]))
    with pytest.raises(ValueError):
        G.guidance_scale_at(0, 8, 3.0, "cosine")


def test_training_masking_matches_reference():
    meta, _, io = case_files("losses_schedules_metrics")
    tokens = io["train_mask_input"]
    torch.manual_seed(1002)
    masked, mask = G.mask_tokens(tokens, "arccos", mask_id=64)
    assert torch.equal(mask, io["train_mask_mask"])
    assert torch.equal(masked, io["train_mask_output"])
    masked, mask = G.mask_tokens(
        tokens, "arccos", mask_id=64, generator=torch.Generator().manual_seed(1002)
    )
    assert torch.equal(masked, io["train_mask_output"])


def test_mask_schedules():
    r = torch.tensor([0.0, 0.5, 1.0])
    for schedule in ("arccos", "cosine", "linear"):
        g = G.mask_ratio(r, schedule)
        assert g[0] == 1 and abs(g[2]) < 1e-7 and 0 < g[1] < 1  # all masked -> none masked
        assert abs(G.mask_ratio(0.5, schedule) - g[1].item()) < 1e-6  # float and tensor agree
    assert abs(G.mask_ratio(0.5, "arccos") - 2 / 3) < 1e-12  # arccos(1/2) = pi/3
    assert abs(G.mask_ratio(0.5, "cosine") - 0.5**0.5) < 1e-12
    counts = (
        G.mask_tokens(
            torch.zeros(4000, 16, dtype=torch.long),
            "linear",
            mask_id=1,
            generator=torch.Generator().manual_seed(0),
        )[1]
        .sum(1)
        .float()
    )
    assert counts.min() >= 1 and abs(counts.mean().item() - 8.0) < 0.3  # E[round(16 * U)] ~ 8


def test_masked_token_loss_matches_reference():
    _, _, io = case_files("losses_schedules_metrics")
    loss, acc = G.masked_token_loss(io["mlm_logits"], io["mlm_targets"], io["mlm_masked"])
    torch.testing.assert_close(loss, io["mlm_loss"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(acc, io["mlm_correct_tokens"], atol=1e-6, rtol=1e-6)
    # accuracy counts masked positions only
    logits = torch.zeros(1, 4, 3)
    logits[0, [0, 1, 2, 3], [0, 1, 2, 0]] = 5.0
    _, acc = G.masked_token_loss(
        logits, torch.tensor([[0, 1, 0, 1]]), torch.tensor([[True, True, True, False]])
    )
    assert abs(acc.item() - 2 / 3) < 1e-6


def test_label_dropout():
    y = torch.arange(10)
    assert torch.equal(G.drop_labels(y, 0.0, 10), y)
    assert (G.drop_labels(y, 1.0, 10) == 10).all()
    rng, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    out = G.drop_labels(y, 0.5, 10, generator=rng)
    assert torch.equal(out, torch.where(torch.rand(10, generator=ref) < 0.5, 10, y))
    big = G.drop_labels(torch.zeros(20000, dtype=torch.long), 0.1, 7, generator=rng)
    assert abs((big == 7).float().mean().item() - 0.1) < 0.01


@pytest.mark.parametrize("preset", ["titok_l32", "titok_b64", "titok_s128"])
def test_presets_match_released_key_layout(preset):
    folder = next(f / "real_keys" for f in FIXTURES if (f / "real_keys").is_dir())
    real = json.loads((folder / f"generator_{preset}.json").read_text())
    with torch.device("meta"):
        model = G.build_generator(G.PRESETS[preset])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == real["state_dict"]
    count = json.loads((folder / "index.json").read_text())[f"generator_{preset}"]["num_parameters"]
    assert sum(v.numel() for v in model.state_dict().values()) == count
    official = {
        "model": {
            "vq_model": {"codebook_size": real["codebook_size"]},
            "generator": real["generator"],
        }
    }
    assert G.config_from_official(official) == G.PRESETS[preset]
    g = real["generator"]
    assert G.DEFAULT_SAMPLING[preset]["num_steps"] == g["num_steps"]
    assert G.DEFAULT_SAMPLING[preset]["guidance_scale"] == g["guidance_scale"]
    assert G.DEFAULT_SAMPLING[preset]["guidance_schedule"] == g["guidance_decay"]
    assert G.DEFAULT_SAMPLING[preset]["randomize_temperature"] == g["randomize_temperature"]


def test_strict_load_errors_name_the_keys():
    meta, weights, _ = case_files("uvitbert_tiny")
    model = G.build_generator(G.config_from_official(meta["config"]))
    bad = dict(weights)
    del bad["mid_block.attn.qkv.weight"]
    bad["extra.weight"] = torch.zeros(1)
    bad["lm_head.bias"] = torch.zeros(65)
    with pytest.raises(UserError) as e:
        common.load_official_weights(model, bad)
    msg = str(e.value)
    assert "mid_block.attn.qkv.weight" in msg and "extra.weight" in msg and "lm_head.bias" in msg
    assert "\n" not in msg
    with pytest.raises(UserError, match="model.embeddings"):  # ImageBert weights into a U-ViT
        common.load_official_weights(model, case_files("imagebert_tiny")[1])


def test_load_generator_formats(tmp_path):
    meta, weights, io = case_files("imagebert_tiny")
    ids, y = io["input_ids"], io["class_labels"]
    # An HF snapshot folder: the official config.json + model.safetensors.
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(meta["config"]))
    src = Path(SHARED) / "parity" if SHARED and (Path(SHARED) / "parity").is_dir() else LOCAL
    (hf / "model.safetensors").write_bytes(
        (src / "imagebert_tiny.weights.safetensors").read_bytes()
    )
    model = G.load_generator(hf)
    assert not model.training and model.preset is None
    with torch.no_grad():
        assert_close(model(ids, y), io["logits_cond"])

    # Our checkpoint: config + weights + EMA; the EMA weights win.
    cfg = G.config_from_official(meta["config"])
    zeros = {k: torch.zeros_like(v) for k, v in weights.items()}
    ckpt = {
        "kind": "generator",
        "preset": None,
        "config": G.config_to_dict(cfg),
        "model": zeros,
        "ema": dict(weights),
        "step": 10,
    }
    torch.save(ckpt, tmp_path / "ours.pt")
    with torch.no_grad():
        assert_close(G.load_generator(tmp_path / "ours.pt")(ids, y), io["logits_cond"])
    torch.save(dict(ckpt, ema=None, model=dict(weights)), tmp_path / "no_ema.pt")
    with torch.no_grad():
        assert_close(G.load_generator(tmp_path / "no_ema.pt")(ids, y), io["logits_cond"])

    # A bare official state dict: the preset is recognised from the shapes (here: `tiny`).
    torch.manual_seed(0)
    tiny = G.build_generator(G.PRESETS["tiny"])
    torch.save(tiny.state_dict(), tmp_path / "generator_tiny.bin")
    loaded = G.load_generator(tmp_path / "generator_tiny.bin")
    assert loaded.preset == "tiny"
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tiny.state_dict().values())
    )

    # Bad inputs are UserErrors with one-line messages.
    torch.save({"kind": "tokenizer", "config": {}, "model": {}}, tmp_path / "tok.pt")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all")
    for path, words in [
        (tmp_path / "missing.pt", "not found"),
        (tmp_path / "tok.pt", "tokenizer"),
        (tmp_path / "junk.bin", "cannot read"),
        (src / "imagebert_tiny.weights.safetensors", "match none of the generator presets"),
    ]:
        with pytest.raises(UserError, match=words):
            G.load_generator(path)


def test_bf16_matmuls_keep_the_precise_parts_in_fp32():
    meta, weights, io = case_files("uvitbert_tiny")
    model = G.cast_matmuls(build(meta, weights), torch.bfloat16)
    assert model.in_blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.float32 and model.norm.weight.dtype == torch.float32
    with torch.no_grad():
        logits = model(io["input_ids"], io["class_labels"])
    assert logits.dtype == torch.float32
    err = (logits - io["logits_cond"]).abs().max() / io["logits_cond"].abs().max()
    assert 0 < err < 0.03  # bf16 rounding is visible but small


def test_training_mode_uses_dropout_and_eval_does_not():
    torch.manual_seed(0)
    model = G.build_generator(G.PRESETS["tiny"])
    ids, y = torch.randint(0, 1024, (2, 32)), torch.tensor([1, 2])
    model.train()
    assert not torch.equal(model(ids, y), model(ids, y))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, y), model(ids, y))

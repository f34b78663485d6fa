"""tokenizer.py against the official reference (fixtures in $TITOK_SHARED/parity, see its README),
the released key layouts, the API contract and the CLI. Bad input: test_bad_inputs.py."""

import dataclasses
import json
import lzma
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import common
import tokenizer as T

ROOT = Path(__file__).resolve().parents[1]

SHARED = os.environ.get("TITOK_SHARED")
LOCAL = Path(__file__).parent / "fixtures"


def fixture_folders(sub: str = "") -> list[Path]:
    """Where the reference fixtures live: $TITOK_SHARED/parity first, else tests/fixtures."""
    return [
        f / sub
        for f in ([Path(SHARED) / "parity"] if SHARED else []) + [LOCAL]
        if (f / sub).is_dir()
    ]


def read_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    """A .safetensors file, else its lossless xz copy (tests/fixtures keeps the large ones so), else None."""
    xz = path.with_name(path.name + ".xz")
    if path.is_file() or not xz.is_file():
        return common.read_safetensors(path) if path.is_file() else None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / path.name).write_bytes(lzma.decompress(xz.read_bytes()))
        return common.read_safetensors(Path(tmp) / path.name)


def case_files(name: str):
    """(json, weights, io) of a parity case: from $TITOK_SHARED/parity, else the copies in
    tests/fixtures/. Skips (saying why) only when neither has it."""
    for folder in fixture_folders():
        if (folder / f"{name}.json").is_file():
            return (
                json.loads((folder / f"{name}.json").read_text()),
                read_tensors(folder / f"{name}.weights.safetensors"),
                read_tensors(folder / f"{name}.io.safetensors"),
            )
    pytest.skip(
        f"parity case {name} needs TITOK_SHARED=<path to shared/> (too large for tests/fixtures)"
    )


def close(a, b, atol):
    err = (a - b).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol:.1g}"


def build(meta, weights):
    cfg = T.config_from_official(
        meta["config"],
        vit_sizes=meta.get("extra_vit_sizes"),
        pixel_decoder=meta["config"].get("_pixel_decoder_override"),
    )
    model = T.TiTok(cfg)
    common.load_official_weights(model, weights)
    return model.eval()


VQ_CASES = [
    "titok_tiny_twostage_vq",
    "titok_tiny_stage1_vq",
    "titok_s128geom_twostage_vq",
    "titok_tiny_singlestage_vq",
]


@pytest.mark.parametrize("name", VQ_CASES)
def test_vq_parity(name):
    meta, weights, io = case_files(name)
    model = build(meta, weights)
    x = io["image"]
    # fp32 noise: 1e-5 relative to the output scale; deep conv stacks (pixel decoder) 1e-4 absolute
    scale = io["decoded"].abs().max().item()
    tol = 1e-4 if model.config.pixel_decoder else 1e-5 * max(1.0, scale)
    with torch.no_grad():
        patch = model.encoder.patch_embed(x)
        close(patch, io["enc_patch_embed_out"], 1e-5)
        z = model.encoder_latents(x)
        close(z, io["encoder_latents"], 1e-5)
        zq, result = model.quantize_latents(z)
        # every margin in these fixtures is >= ~1e-3, so the ids must match exactly
        assert torch.equal(result["ids"], io["token_ids"][:, 0])
        close(zq, io["z_quantized"], 1e-6)
        if not model.config.pixel_decoder:  # two-stage models freeze the quantizer: losses are 0
            for k in ("quantizer_loss", "commitment_loss", "codebook_loss"):
                close(result[k], io[k], 1e-6)
        decoded = model.decode(zq)
        close(decoded, io["decoded"], tol)
        ids = model.encode(x)
        assert torch.equal(ids, io["token_ids"][:, 0])
        out, result = model(x)
        for k in ("quantizer_loss", "commitment_loss", "codebook_loss"):
            close(result[k], io[k], 1e-6)
        close(out, io["decoded"], tol)
        if "decoded_from_token_ids" in io:
            close(model.decode_tokens(io["token_ids"]), io["decoded_from_token_ids"], tol)
            close(model.decode_tokens(io["token_ids"][:, 0]), io["decoded_from_token_ids_2d"], tol)
        if "pixel_decoder_input" in io:
            logits = model.decoder(zq)
            close(logits, io["dec_ffn_out"], 1e-5 * max(1.0, io["dec_ffn_out"].abs().max().item()))


def test_stage1_loss_parity():
    meta, weights, io = case_files("titok_tiny_stage1_vq")
    model = build(meta, weights)
    with torch.no_grad():
        logits, result = model(io["image"])
    ce = torch.nn.functional.cross_entropy(logits.flatten(2), io["proxy_codes"])
    close(ce, io["stage1_ce_loss"], 1e-5)
    close(ce + result["quantizer_loss"], io["stage1_total_loss"], 1e-5)


def test_vae_parity():
    meta, weights, io = case_files("titok_tiny_vae")
    model = build(meta, weights)
    with torch.no_grad():
        z = model.encoder_latents(io["image"])
        close(z, io["encoder_latents"], 1e-5)
        post = T.gaussian_posterior(z)
        close(post["mean"], io["posterior_mean"], 1e-5)
        close(post["logvar"], io["posterior_logvar"], 1e-5)
        close(post["kl"], io["kl"], 1e-4 * io["kl"].abs().max().item())
        tol = 1e-5 * io["decoded_from_sample"].abs().max().item()
        close(model.decode(io["sample"]), io["decoded_from_sample"], tol)
        close(model.decode_tokens(io["posterior_mean"]), io["decoded_from_mean"], tol)
        # the reference draws the noise from the global CPU generator, seeded with 410 before encode
        torch.manual_seed(410)
        close(model.encode(io["image"]), io["sample"], 1e-5)


def test_maskgit_vqgan_parity():
    meta, weights, io = case_files("maskgit_vqgan_tiny")
    v = meta["config"]["vqgan"]
    vq = T.MaskGITVQGAN(
        T.VQGANConfig(
            hidden_channels=v["hidden_channels"],
            channel_mult=tuple(v["channel_mult"]),
            num_res_blocks=v["num_res_blocks"],
            z_channels=v["z_channels"],
            num_embeddings=meta["config"]["num_embeddings"],
        )
    )
    common.load_official_weights(vq, weights)
    vq.eval()
    with torch.no_grad():
        close(vq.encoder(io["image"]), io["encoder_out"], 1e-4)
        assert torch.equal(vq.encode(io["image"]), io["codes"])
        close(vq.decode_tokens(io["codes"]), io["decoded"], 1e-4)
        soft = torch.einsum(
            "nchw,cd->ndhw", io["soft_logits"].softmax(1), vq.quantize.embedding.weight
        )
        close(soft, io["soft_z"], 1e-5)
        close(vq.decoder(soft), io["decoded_from_soft_logits"], 1e-4)


def _real_keys():
    """The key -> shape lists of the released checkpoints (no weights; shared/ or tests/fixtures)."""
    return fixture_folders("real_keys")[0]


@pytest.mark.parametrize("preset", [p for p in T.PRESETS if p != "tiny"])
def test_preset_keys_match_release(preset):
    ref = json.loads((_real_keys() / f"tokenizer_{preset}.json").read_text())
    with torch.device("meta"):
        model = T.TiTok(T.PRESETS[preset])
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref["state_dict"]
    # and the official config maps to the same preset
    assert T.config_from_official({"model": {"vq_model": ref["vq_model"]}}) == T.PRESETS[preset]


def test_maskgit_vqgan_keys_match_release():
    ref = json.loads((_real_keys() / "maskgit_vqgan_f16_256.json").read_text())
    with torch.device("meta"):
        model = T.MaskGITVQGAN()
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref["state_dict"]


# -- contract ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return T.TiTok(T.PRESETS["tiny"]).eval()


def test_decode_of_quantized_equals_decode_tokens(tiny):
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        zq, _ = tiny.quantize_latents(tiny.encoder_latents(x))
        a = tiny.decode(zq)
        b = tiny.decode_tokens(tiny.encode(x))
    close(a, b, 1e-5)
    assert a.std() > 0


def test_a_prefix_of_the_tokens_decodes(helpers):
    """Prefix decoding: k = K is the full decode; shorter prefixes run and change the image; a prefix equals
    the full sequence with its tail masked (keep = k), which is what nested dropout trains."""
    tok = helpers.tiny_tokenizer()
    ids = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, z = tok.decode_tokens(ids), tok.quantize.lookup(ids)
        assert torch.equal(tok.decode_tokens(ids[:, :32]), full)
        for k in (1, 8, 31):
            part = tok.decode_tokens(ids[:, :k])
            assert part.shape == full.shape and (part - full).abs().max() > 1e-2
            close(part, tok.decode(z, keep=torch.tensor([k, k])), 1e-5)
        mixed = tok.decode(
            z, keep=torch.tensor([32, 8])
        )  # per sample: the first whole, the second a prefix
        close(mixed[0], full[0], 1e-5)
        close(mixed[1], tok.decode_tokens(ids[1:, :8])[0], 1e-5)


def test_gradients_reach_encoder_through_quantizer():
    torch.manual_seed(0)
    model = T.TiTok(T.PRESETS["tiny"])
    out, result = model(torch.rand(2, 3, 32, 32))
    (out.square().mean() + result["quantizer_loss"]).backward()
    for p in (
        model.encoder.patch_embed.weight,
        model.latent_tokens,
        model.quantize.embedding.weight,
    ):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_two_stage_encoder_is_frozen():
    cfg = T.dataclasses.replace(
        T.PRESETS["tiny"],
        image_size=64,
        patch_size=16,
        legacy_reshape=True,
        proxy_head=True,
        pixel_decoder=True,
        vqgan=T.VQGANConfig(
            hidden_channels=32,
            channel_mult=(1, 1, 1, 1, 1),
            num_res_blocks=1,
            z_channels=32,
            num_embeddings=64,
        ),
    )
    torch.manual_seed(0)
    model = T.TiTok(cfg)
    out, result = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 3, 64, 64)
    out.square().mean().backward()
    assert model.encoder.patch_embed.weight.grad is None and model.latent_tokens.grad is None
    assert (
        model.decoder.mask_token.grad.abs().sum() > 0
        and model.pixel_decoder.conv_in.weight.grad.abs().sum() > 0
    )


def test_own_checkpoint_roundtrip_is_bit_identical(tiny, tmp_path):
    path = tmp_path / "tok.pt"
    torch.save(
        {
            "kind": "tokenizer",
            "config": dataclasses.asdict(tiny.config),
            "model": tiny.state_dict(),
            "ema": None,
        },
        path,
    )
    again = T.load_tokenizer(path)
    assert again.config == tiny.config
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(tiny.decode_tokens(tiny.encode(x)), again.decode_tokens(again.encode(x)))


def test_a_vqgan_export_opens_as_a_2d_tokenizer(tmp_path):
    """train_tok --recipe vqgan's export behind TiTok's interface: K = the 8 x 8 code cells of a 32 px image."""
    small = T.VQGANConfig(
        hidden_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=64
    )
    torch.manual_seed(0)
    vq = T.MaskGITVQGAN(small).eval()
    cfg = dataclasses.replace(T.PRESETS["tiny"], vqgan=small)
    torch.save(
        {"kind": "vqgan", "config": dataclasses.asdict(cfg), "model": vq.state_dict(), "ema": None},
        tmp_path / "vqgan.pt",
    )
    tok = T.load_tokenizer(tmp_path / "vqgan.pt")
    assert (tok.config.num_latent_tokens, tok.config.codebook_size, tok.config.image_size) == (
        64,
        1024,
        32,
    )
    x = torch.rand(2, 3, 32, 32)
    ids = tok.encode(x)
    assert ids.shape == (2, 64) and torch.equal(ids, vq.encode(x))
    assert torch.allclose(tok.decode_tokens(ids), vq.decode_tokens(ids))


def test_safetensors_reader_roundtrip(tmp_path):
    # write a file by hand in the documented layout and read it back
    import struct

    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    b = torch.tensor([1, -2], dtype=torch.int64)
    header = {
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]},
        "__metadata__": {"x": "y"},
    }
    h = json.dumps(header).encode()
    (tmp_path / "t.safetensors").write_bytes(
        struct.pack("<Q", len(h)) + h + a.numpy().tobytes() + b.numpy().tobytes()
    )
    sd = common.read_safetensors(tmp_path / "t.safetensors")
    assert torch.equal(sd["a"], a) and torch.equal(sd["b"], b) and set(sd) == {"a", "b"}


def test_api_rejects_bad_input(tiny):
    with pytest.raises(common.UserError, match=r"\[0, 1024\)"):
        tiny.decode_tokens(torch.full((1, 32), 1024))
    with pytest.raises(common.UserError, match="shape"):
        tiny.decode_tokens(
            torch.zeros(1, 33, dtype=torch.long)
        )  # more than K (a prefix of K or fewer decodes)
    with pytest.raises(common.UserError, match="integer"):
        tiny.decode_tokens(torch.zeros(1, 32))
    with pytest.raises(common.UserError, match=r"\(B, 3, 32, 32\)"):
        tiny.encode(torch.rand(1, 3, 64, 64))


def test_wrong_preset_names_the_keys_and_the_likely_preset(tiny):
    other = T.TiTok(dataclasses.replace(T.PRESETS["tiny"], num_latent_tokens=16))
    with pytest.raises(common.UserError, match="look like preset 'tiny'"):
        common.load_official_weights(other, tiny.state_dict(), T.PRESETS)


# -- CLI ----------------------------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "tokenizer.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(
        {
            "kind": "tokenizer",
            "config": dataclasses.asdict(tiny.config),
            "model": tiny.state_dict(),
        },
        path,
    )
    return path


def test_cli_reconstructs_a_photo(tiny_ckpt, tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:90, 0:120]
    photo = np.stack([xx * 2, yy * 2, (xx + yy)], -1).astype(np.uint8) + rng.integers(
        0, 20, (90, 120, 3), dtype=np.uint8
    )
    Image.fromarray(photo).save(tmp_path / "photo.jpg")
    r = run_cli(
        "reconstruct", "--ckpt", tiny_ckpt, tmp_path / "photo.jpg", "--out", tmp_path / "out"
    )
    assert r.returncode == 0, r.stderr
    assert "PSNR" in r.stdout and "ids [" in r.stdout
    recon = np.asarray(Image.open(tmp_path / "out" / "photo_recon.png"))
    side = np.asarray(Image.open(tmp_path / "out" / "photo_side_by_side.png"))
    assert recon.shape == (32, 32, 3) and side.shape == (32, 64, 3)
    assert (side[:, 32:] == recon).all()
    # the printed ids are the ids of the preprocessed image
    tok = T.load_tokenizer(tiny_ckpt)
    ids = tok.encode(common.load_image(tmp_path / "photo.jpg", 32)[None])[0].tolist()
    assert f"ids {ids}" in r.stdout

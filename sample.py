"""Sample class-conditional images: a MaskGIT generator draws TiTok tokens (TiTok Sec. 3.4), and
the tokenizer decodes them.

The evaluation protocol (TiTok Sec. 4.3, after ADM, Dhariwal & Nichol 2021): 50,000 samples, 50 per
ImageNet class, the official settings, in one .npz (uint8 (N, H, W, 3) as `arr_0`); gFID against
the reference batch by ADM's evaluator or fid.py.

    python sample.py --ckpt GEN --tokenizer TOK --classes 207 360 387 --per-class 4 --out grid.png
    torchrun --nproc_per_node=8 sample.py --ckpt GEN --tokenizer TOK --num-samples 50000 \
        --npz samples.npz

Read first `sample_images` (one batch, tokens then pixels), then `run_npz` (resumable: rerun the
same command). Batch b draws its noise from its own RNG seeded with (--seed, b), so a resumed run,
or one split over processes, writes exactly the images of one uninterrupted process. The settings
default to the official ones of the generator's preset.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import common
import generator
import tokenizer
from common import UserError

# 1. One batch: token ids from the generator, then pixels from the tokenizer.


@torch.no_grad()
def sample_images(
    model: torch.nn.Module,
    tok: tokenizer.TiTok,
    labels: list[int],
    settings: dict,
    seed: int,
    device: torch.device,
    dtype: str,
) -> np.ndarray:
    """Class ids -> uint8 images (B, H, W, 3); bf16: generator.cast_matmuls (in main) + autocast."""
    rng = torch.Generator(device=device).manual_seed(seed)
    y = torch.tensor(labels, dtype=torch.long, device=device)  # (B,)
    ids = generator.generate(model, y, **settings, generator=rng)  # (B, K) token ids
    with common.autocast(device, dtype):
        images = tok.decode_tokens(ids).float()  # (B, 3, H, W)
    # The official sampler clamps to [0, 1], scales by 255 and TRUNCATES to uint8 (not the rounding
    # of common.to_uint8): the published gFIDs were measured on these pixels, so we do the same.
    return (images.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def sample_batch(model, tok, labels: list[int], settings: dict, args, device, b: int) -> np.ndarray:
    """Batch b of the run: its labels, and its own RNG, seeded distinctly for every (--seed, b)
    with fewer than 10**6 batches."""
    batch_labels = labels[b * args.batch_size : (b + 1) * args.batch_size]
    seed = args.seed * 1_000_003 + b
    return sample_images(model, tok, batch_labels, settings, seed, device, args.dtype)


# 2. A picture: one row per class.


def run_grid(args, sample, labels: list[int], settings: dict, d: common.Dist) -> None:
    start = time.perf_counter()
    images = np.concatenate([sample(b) for b in range(math.ceil(len(labels) / args.batch_size))])
    x = torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0  # (N, 3, H, W), exact in [0, 1]
    common.save_image(common.image_grid(x, args.per_class), args.out)
    print(f"wrote {args.out}: {len(x)} images in {time.perf_counter() - start:.1f} s")


# 3. The evaluation protocol: --num-samples images into one .npz, resumable, over torchrun ranks.


def run_npz(args, sample, labels: list[int], settings: dict, d: common.Dist) -> None:
    """Rank r samples the batches b = r, r + world, ... into `<npz>.shards/`, skipping the finished
    ones (common.run_in_chunks: a rerun resumes); rank 0 then joins them into the .npz and removes
    the shards."""
    out, shards, start = args.npz, Path(f"{args.npz}.shards"), time.perf_counter()
    # Everything the samples depend on; the models by CONTENT (retrained at the same path: another
    # model).
    fingerprint = {
        "generator_sha256": common.sha256_of(args.ckpt),
        "tokenizer_sha256": common.sha256_of(args.tokenizer),
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "classes": args.classes,
        "dtype": args.dtype,
        "settings": settings,
    }
    if finished(out, fingerprint, d):
        return
    with common.exclusive(shards, d):  # one job per file: a second is refused while one samples
        if finished(out, fingerprint, d):  # (another job finished it meanwhile)
            return
        # CPU and GPU kernels may add in another order with another thread count or another chip,
        # moving a pixel by 1: the shards record both, and a resume with others is refused.
        numerics = dict(threads_per_process=torch.get_num_threads(), chip=chip(d.device))
        num_batches = math.ceil(len(labels) / args.batch_size)
        stamp = fingerprint | numerics
        batches = functools.partial(map, sample)  # batches(bs): the images of batches bs
        files = common.run_in_chunks(shards, stamp, batches, num_batches, d, "sampling")
        if not d.is_main:
            return

        # All samples in memory once (the shards are memory-mapped): 9.8 GB for 50k at 256 px, as
        # ADM's and DiT's samplers.
        images = np.concatenate([np.load(f, mmap_mode="r") for f in files])
        key = np.array(json.dumps(fingerprint, sort_keys=True))
        arrays = dict(arr_0=images, labels=np.asarray(labels), fingerprint=key)
        common.write_atomic(out, lambda f: np.savez(f, **arrays))
        shutil.rmtree(shards)
    summary = stamp | dict(wall_s=round(time.perf_counter() - start, 1), processes=d.world)
    common.write_json(out.with_suffix(".json"), summary)
    print(f"wrote {out}: {len(images)} samples (arr_0 uint8 {images.shape}, labels) and its .json")


def finished(out: Path, fingerprint: dict, d: common.Dist) -> bool:
    """Whether `out` holds these samples already: then there is nothing to do. An .npz made by
    another generator, tokenizer or settings (or not by this script) is refused."""
    if not out.exists():
        return False
    try:
        with np.load(out) as saved:
            made = str(saved["fingerprint"])
    except Exception:  # unreadable, or not made by this script: refused like another run's file
        made = None
    if made != json.dumps(fingerprint, sort_keys=True):
        raise UserError(
            f"{out} was made by another generator/tokenizer or settings; delete it or choose "
            "another --npz"
        )
    if d.is_main:
        shutil.rmtree(f"{out}.shards", ignore_errors=True)  # (when killed right after the join)
        if not out.with_suffix(".json").exists():  # (killed between the two writes)
            common.write_json(out.with_suffix(".json"), fingerprint)
        print(f"{out} already holds these samples; nothing to do")
    return True


def chip(device: torch.device) -> str:
    """The GPU's name, or the CPU's instruction set that PyTorch's kernels use (AVX2, AVX512...)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {torch.backends.cpu.get_cpu_capability()}"


# 4. Command line.


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = common.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="generator: ours, official .bin/.safetensors, HF")
    p.add_argument("--tokenizer", required=True, help="tokenizer: likewise")
    p.add_argument("--classes", type=int, nargs="+", help="grid: the first 8; --npz: all, cycled")
    p.add_argument("--per-class", type=common.positive_int, default=4, help="grid: images per row")
    p.add_argument("--out", type=common.output_file, default="grid.png", help="grid: the .png")
    p.add_argument("--num-samples", type=common.positive_int, help="evaluation: with --npz")
    p.add_argument("--npz", type=common.output_file, help="evaluation: arr_0 (N, H, W, 3), labels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=common.positive_int, default=32, help="keep it to resume")
    p.add_argument("--device", type=common.device_arg, help="cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    s = p.add_argument_group("sampling (default: generator.DEFAULT_SAMPLING of the preset)")
    s.add_argument("--num-steps", type=common.positive_int)
    s.add_argument("--guidance-scale", type=common.float_in(0, 100))
    s.add_argument("--guidance-schedule", choices=("constant", "linear", "power-cosine"))
    s.add_argument("--guidance-pow", type=common.float_in(0, 100), help="of power-cosine")
    s.add_argument("--temperature", type=common.float_in(1e-3, 100), help="softmax (1 = off)")
    s.add_argument("--randomize-temperature", type=common.float_in(0, 100), help="Gumbel noise")
    s.add_argument("--softmax-annealing", action=argparse.BooleanOptionalAction)
    s.add_argument(
        "--mask-schedule",
        choices=("arccos", "cosine", "linear"),
        default="arccos",
        help="the share of tokens still masked after each step (MaskGIT Sec. 3.3)",
    )
    args = p.parse_args(argv)
    if (args.num_samples is None) != (args.npz is None) or (args.npz and args.npz.suffix != ".npz"):
        p.error("--num-samples and --npz (a file name ending in .npz) go together")
    return args


def main(argv: list[str] | None = None) -> None:
    with common.one_line_errors():
        args = parse_args(argv)
        # A long collective timeout: ranks may finish their shares of --npz hours apart.
        with common.distributed(args.device, timeout_hours=24) as d:
            draw_samples(args, d)


def draw_samples(args: argparse.Namespace, d: common.Dist) -> None:
    if d.world > 1 and args.npz is None:
        raise UserError("a grid is sampled by one process; use --npz with torchrun")
    model = generator.load_generator(args.ckpt)
    tok = tokenizer.load_tokenizer(args.tokenizer).to(d.device)
    # The generator's ids index the tokenizer's codebook (a VAE's codebook size is 0).
    c = tok.config
    if (c.num_latent_tokens, c.codebook_size) != (model.seq_len, model.codebook_size):
        raise UserError(
            f"tokenizer ({c.num_latent_tokens} tokens, codebook {c.codebook_size}) does not "
            f"match the generator ({model.seq_len} tokens, codebook {model.codebook_size})"
        )
    n = model.num_classes
    classes = args.classes or list(range(n if args.npz else min(n, 8)))
    bad = [k for k in classes if not 0 <= k < n]
    if bad:
        raise UserError(
            f"class ids {bad} are out of range: this generator knows classes 0..{n - 1}"
        )
    if args.npz:  # sample i has class i % C: class-balanced
        labels = [classes[i % len(classes)] for i in range(args.num_samples)]
    else:  # one row per class
        labels = [k for k in classes for _ in range(args.per_class)]

    # The preset's official settings, then the flags given.
    settings = dict(generator.DEFAULT_SAMPLING.get(model.preset, {}))
    for k in inspect.signature(generator.generate).parameters:
        if getattr(args, k, None) is not None:
            settings[k] = getattr(args, k)
    if args.dtype == "bf16":
        model = generator.cast_matmuls(model)
    model = model.to(d.device)
    batch = functools.partial(sample_batch, model, tok, labels, settings, args, d.device)
    if args.npz:
        run_npz(args, batch, labels, settings, d)
    else:
        run_grid(args, batch, labels, settings, d)


if __name__ == "__main__":
    main()

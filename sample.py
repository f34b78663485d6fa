"""Sample class-conditional images: a MaskGIT generator over TiTok tokens (TiTok Sec. 3.4) and a
TiTok tokenizer that decodes the tokens to pixels.

  # a labelled grid, one row per class
  python sample.py --ckpt GEN --tokenizer TOK --classes 207 360 387 --per-class 4 --out grid.png
  # the ImageNet protocol (ADM evaluator): 50 per class, uint8 (N, H, W, 3) under arr_0 of an .npz;
  # written in shards, so an interrupted run resumes; torchrun splits the batches over processes
  torchrun --nproc_per_node=8 sample.py --ckpt GEN --tokenizer TOK --num-samples 50000 --npz samples.npz
  # speed with random weights, fp32 and bf16
  python sample.py --benchmark --preset titok_l32

GEN is one of our generator checkpoints, an official generator_titok_*.bin / .safetensors, or an HF
snapshot folder; TOK likewise for the tokenizer. Sampling settings default to the official
evaluation settings of the generator's preset (generator.DEFAULT_SAMPLING); each has a flag.

Reproducibility: batch b draws its noise from its own RNG seeded with (--seed, b), so the images are
a function of the seed, the batch size and the settings only. A resumed run, or one split over
processes, writes exactly the images of one uninterrupted process.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zipfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import generator
import tokenizer
from tokenizer import UserError

# The official implementation on the 2-core benchmark machine, fp32, one batch of 8 with the
# default settings (issue #3): seconds of token sampling, without decoding.
OFFICIAL_SAMPLING_SECONDS = {"titok_l32": 8.0, "titok_s128": 390.0}


# ----------------------------------------------------------------------------------------------
# Settings and inputs
# ----------------------------------------------------------------------------------------------

def sampling_settings(args: argparse.Namespace, preset: str | None) -> dict:
    """DEFAULT_SAMPLING of the preset, overridden by every flag the user gave."""
    settings = dict(generator.DEFAULT_SAMPLING.get(preset, {}))
    for key in ("num_steps", "guidance_scale", "guidance_schedule", "guidance_pow", "temperature",
                "randomize_temperature", "softmax_annealing"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if settings.get("num_steps", 8) < 1:
        raise UserError("--num-steps must be at least 1")
    if settings.get("temperature", 1.0) <= 0:
        raise UserError("--temperature must be positive")
    return settings


def class_labels(classes: list[int] | None, num_classes: int, count: int, repeat: int = 1) -> list[int]:
    """`count` labels cycling through `classes` (all classes when None), each repeated `repeat`
    times in a row: sample i of the ImageNet protocol has class i % 1000."""
    classes = list(range(num_classes)) if classes is None else classes
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UserError(f"class ids {bad} are out of range: this generator knows classes 0..{num_classes - 1}")
    return [classes[(i // repeat) % len(classes)] for i in range(count)]


def check_output_path(path: Path) -> None:
    """Fail before sampling, not after an hour of it."""
    if path.is_dir():
        raise UserError(f"output path is a folder: {path}")
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"output folder does not exist: {parent}")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise UserError(f"cannot write to {parent} ({e.strerror})") from None


def check_compatible(model: torch.nn.Module, tok: tokenizer.TiTok) -> None:
    """The generator's ids index the tokenizer's codebook, one id per latent token."""
    if tok.quantize is None:
        raise UserError("the tokenizer is a VAE (continuous latents); the generator needs a VQ tokenizer")
    c = tok.config
    if (c.codebook_size, c.num_latent_tokens) != (model.codebook_size, model.seq_len):
        raise UserError(f"tokenizer ({c.num_latent_tokens} tokens, codebook {c.codebook_size}) does not "
                        f"match the generator ({model.seq_len} tokens, codebook {model.codebook_size})")


def pick_device(name: str | None, local_rank: int) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"bad --device {name!r} ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda, but no CUDA GPU is available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def batch_seed(seed: int, batch: int) -> int:
    """Seed of batch `batch`: distinct for every (seed, batch) with fewer than 10**6 batches."""
    return seed * 1_000_003 + batch


# ----------------------------------------------------------------------------------------------
# Sampling one batch: tokens with the generator, pixels with the tokenizer
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_images(model: torch.nn.Module, tok: tokenizer.TiTok, labels: list[int], settings: dict,
                  seed: int, device: torch.device, dtype: str) -> np.ndarray:
    """-> uint8 (B, H, W, 3). The generator's bf16 mode lives in its weights (cast_matmuls); the
    tokenizer runs under autocast."""
    rng = torch.Generator(device=device).manual_seed(seed)
    y = torch.tensor(labels, dtype=torch.long, device=device)
    ids = generator.generate(model, y, **settings, generator=rng)                # (B, K)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        images = tok.decode_tokens(ids)                                           # (B, 3, H, W)
    # As the official sampling script: clamp to [0, 1], scale by 255, truncate to uint8.
    return (images.float().clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, labels: list[int], columns: int, path: Path) -> None:
    """One row per class, its id written in a left margin. Small images are enlarged (nearest)."""
    from PIL import Image, ImageDraw
    n, h, w, _ = images.shape
    scale = max(1, 64 // h)
    cell_h, cell_w, margin = h * scale, w * scale, 40
    rows = math.ceil(n / columns)
    canvas = Image.new("RGB", (margin + columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, label) in enumerate(zip(images, labels)):
        r, c = divmod(i, columns)
        tile = Image.fromarray(img).resize((cell_w, cell_h), Image.NEAREST)
        canvas.paste(tile, (margin + c * cell_w, r * cell_h))
        if c == 0:
            draw.text((4, r * cell_h + 4), str(label), fill="black")
    try:
        canvas.save(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot write {path} ({e})") from None


def run_grid(args, model, tok, settings, device) -> None:
    out = Path(args.out)
    check_output_path(out)
    classes = args.classes if args.classes is not None else list(range(min(model.num_classes, 8)))
    labels = class_labels(classes, model.num_classes, len(classes) * args.per_class, repeat=args.per_class)
    batches = [labels[i:i + args.batch_size] for i in range(0, len(labels), args.batch_size)]
    from tqdm import tqdm
    start = time.perf_counter()
    images = [sample_images(model, tok, ys, settings, batch_seed(args.seed, b), device, args.dtype)
              for b, ys in enumerate(tqdm(batches, desc="sampling", disable=len(batches) == 1))]
    seconds = time.perf_counter() - start
    save_grid(np.concatenate(images), labels, args.per_class, out)
    print(f"wrote {out}: {len(labels)} images in {seconds:.1f} s ({len(labels) / seconds:.2f} images/s)")


# ----------------------------------------------------------------------------------------------
# The evaluation protocol: many samples into one .npz, in resumable shards, over ranks
# ----------------------------------------------------------------------------------------------

def write_shard(path: Path, images: np.ndarray, labels: list[int]) -> None:
    """Atomic: a shard file exists only when complete, which is what makes resuming safe."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, images=images, labels=np.asarray(labels, dtype=np.int64))
    os.replace(tmp, path)


def merge_shards(shards: list[Path], out: Path, meta: dict) -> int:
    """Stream the shards into out (arr_0: uint8 (N, H, W, 3), labels: int64 (N,), meta: the run's
    settings as a JSON string) without holding all images in memory (50k ImageNet samples are 9.8 GB)."""
    counts, labels = [], []
    for p in shards:
        with np.load(p) as s:
            counts.append(s["labels"].shape[0])
            labels.append(s["labels"])
            shape = s["images"].shape[1:]
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (sum(counts), *shape)}
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for p in shards:
                with np.load(p) as s:
                    f.write(np.ascontiguousarray(s["images"]).tobytes())
        with zf.open("labels.npy", "w") as f:
            np.lib.format.write_array(f, np.concatenate(labels))
        with zf.open("meta.npy", "w") as f:
            np.lib.format.write_array(f, np.array(json.dumps(meta, sort_keys=True)))
    os.replace(tmp, out)
    return sum(counts)


def open_shard_dir(shard_dir: Path, meta: dict, create: bool) -> None:
    """Shards may only be reused by a run with the same settings; meta.json records them."""
    meta_file = shard_dir / "meta.json"
    if meta_file.is_file():
        old = json.loads(meta_file.read_text())
        changed = sorted(k for k in meta.keys() | old.keys() if old.get(k) != meta.get(k))
        if changed:
            raise UserError(f"{shard_dir} holds shards of a run with different {', '.join(changed)}; "
                            "rerun with the same flags or delete that folder")
    elif create:
        shard_dir.mkdir(exist_ok=True)
        meta_file.write_text(json.dumps(meta, indent=1))


def finished_npz(out: Path, meta: dict) -> bool:
    """True when `out` already holds this run's samples (rerunning the main job must not resample);
    an .npz from other settings is never overwritten silently."""
    if not out.is_file():
        return False
    try:
        with np.load(out) as z:
            old = json.loads(str(z["meta"])) if "meta" in z.files else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"{out} exists but is not a readable .npz ({e}); delete it or choose another --npz")
    if old != meta:
        raise UserError(f"{out} already holds samples of other settings; delete it or choose another --npz")
    return True


def run_npz(args, model, tok, settings, device, rank: int, world: int) -> float | None:
    """Sample into args.npz; returns the sampling seconds of this process, None when it was done."""
    out = Path(args.npz)
    check_output_path(out)
    labels = class_labels(args.classes, model.num_classes, args.num_samples)
    bs = args.batch_size
    num_batches = math.ceil(len(labels) / bs)
    shard_dir = out.with_name(out.name + ".shards")
    shard = lambda b: shard_dir / f"batch_{b:06d}.npz"
    # Normalised through JSON, so it compares equal to what meta.json reads back.
    meta = json.loads(json.dumps(dict(num_samples=args.num_samples, batch_size=bs, seed=args.seed,
                                      dtype=args.dtype, classes=args.classes, settings=settings,
                                      generator=str(Path(args.ckpt).resolve()),
                                      tokenizer=str(Path(args.tokenizer).resolve()))))
    if finished_npz(out, meta):
        if rank == 0:
            print(f"{out} already holds these {args.num_samples} samples; nothing to do")
        return None
    open_shard_dir(shard_dir, meta, create=rank == 0)
    done = {b for b in range(num_batches) if shard(b).exists()}  # before the barrier: nobody samples yet
    barrier(world)

    if rank == 0 and done:
        print(f"resuming: {len(done)}/{num_batches} batches already in {shard_dir}")
    todo = [b for b in range(rank, num_batches, world) if b not in done]  # rank r: b % world == r
    if args.max_batches is not None:
        todo = todo[:args.max_batches]
    from tqdm import tqdm
    start = time.perf_counter()
    for b in tqdm(todo, desc=f"sampling ({world} process{'es' if world > 1 else ''})", disable=rank != 0):
        ys = labels[b * bs:(b + 1) * bs]
        write_shard(shard(b), sample_images(model, tok, ys, settings, batch_seed(args.seed, b), device,
                                            args.dtype), ys)
    seconds = time.perf_counter() - start
    barrier(world)
    if rank != 0:
        return seconds
    if todo:
        n = sum(len(labels[b * bs:(b + 1) * bs]) for b in todo)
        print(f"rank 0 sampled {n} images in {seconds:.1f} s ({n / seconds:.2f} images/s per process)")
    missing = [b for b in range(num_batches) if not shard(b).exists()]
    if missing:
        print(f"{num_batches - len(missing)}/{num_batches} batches done; rerun the same command to continue")
        return None
    n = merge_shards([shard(b) for b in range(num_batches)], out, meta)
    shutil.rmtree(shard_dir)
    print(f"wrote {out}: {n} samples (arr_0 uint8 (N, H, W, 3), labels)")
    return seconds


def init_distributed(device: torch.device) -> tuple[int, int]:
    """torchrun sets WORLD_SIZE/RANK; without it this is one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    # Ranks finish at different times; the default 30-minute barrier timeout is too short.
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=24))
    return dist.get_rank(), world


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# Benchmark: random weights, default settings, fp32 vs bf16
# ----------------------------------------------------------------------------------------------

def sampling_flops(cfg: generator.GeneratorConfig, batch: int, settings: dict) -> float:
    """FLOPs of one generate() call: per-forward FLOPs (counted on the meta device) times the
    rows each step runs (2B with guidance, B without)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = generator.build_generator(cfg).eval()
        ids, y = torch.zeros(1, cfg.seq_len, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(ids, y)
    kw = {name: p.default for name, p in inspect.signature(generator.generate).parameters.items()}
    kw.update(settings)
    steps = kw["num_steps"]
    guided = [float(generator.guidance_scale_at(s, steps, kw["guidance_scale"], kw["guidance_schedule"],
                                                kw["guidance_pow"])) != 0 for s in range(steps)]
    return counter.get_total_flops() * batch * sum(2 if on else 1 for on in guided)


def benchmark(args) -> None:
    preset = args.preset or "titok_l32"
    if preset not in generator.PRESETS:
        raise UserError(f"unknown preset {preset!r} (choose from {', '.join(generator.PRESETS)})")
    torch.manual_seed(0)
    cfg, batch = generator.PRESETS[preset], args.batch_size or 8
    model = generator.build_generator(cfg).eval().requires_grad_(False)
    models = {"fp32": model, "bf16": generator.cast_matmuls(copy.deepcopy(model))}
    tok = tokenizer.TiTok(tokenizer.PRESETS[preset]).eval() if preset in tokenizer.PRESETS else None
    # Greedy (randomize_temperature=0) does exactly the work of the default settings (the noise is
    # still drawn) and makes fp32 and bf16 comparable token by token.
    settings = dict(sampling_settings(args, preset), randomize_temperature=0.0)
    y = torch.arange(batch) * (cfg.num_classes // batch)
    flops = sampling_flops(cfg, batch, settings)
    peak = {name: max(tokenizer.matmul_gflops(dt) for _ in range(3))  # best of 3: the machine may be shared
            for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"{preset}: batch {batch}, {settings['num_steps']} steps, {torch.get_num_threads()} threads, "
          f"{flops / 1e9:.0f} GFLOP per batch of token sampling; matmul peak fp32 {peak['fp32']:.0f}, "
          f"bf16 {peak['bf16']:.0f} GFLOP/s")
    def timed(fn) -> tuple[float, object]:
        """Best of --repeats: the machine may be shared, and the minimum is the least disturbed."""
        best, out = math.inf, None
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - start)
        return best, out

    ids, rows = {}, []
    with torch.no_grad():
        for dtype, m in models.items():
            m(torch.full((batch, cfg.seq_len), cfg.codebook_size), y)       # warm-up
            sample_s, ids[dtype] = timed(lambda: generator.generate(m, y, **settings))
            decode_s = math.nan
            if tok is not None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    tok.decode_tokens(ids[dtype][:1])                        # warm-up
                    decode_s, _ = timed(lambda: tok.decode_tokens(ids[dtype]))
            rows.append((dtype, sample_s, decode_s))
    official = OFFICIAL_SAMPLING_SECONDS.get(preset) if batch == 8 and settings == dict(
        generator.DEFAULT_SAMPLING[preset], randomize_temperature=0.0) else None
    print("| dtype | sampling s/batch | decoding s/batch | images/s (sample+decode) | sampling GFLOP/s "
          "| % of matmul peak | vs official fp32 sampling |")
    print("|---|---|---|---|---|---|---|")
    for dtype, sample_s, decode_s in rows:
        total = sample_s + (0 if math.isnan(decode_s) else decode_s)
        vs = f"{official / sample_s:.2f}x" if official else "-"
        print(f"| {dtype} | {sample_s:.2f} | {decode_s:.2f} | {batch / total:.2f} | {flops / sample_s / 1e9:.0f} "
              f"| {100 * flops / sample_s / 1e9 / peak[dtype]:.0f}% | {vs} |")
    same = (ids["fp32"] == ids["bf16"]).float().mean().item()
    print(f"greedy token ids equal between fp32 and bf16: {100 * same:.1f}%")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("models")
    io.add_argument("--ckpt", help="generator: our checkpoint, official .bin/.safetensors, or HF folder")
    io.add_argument("--preset", choices=list(generator.PRESETS),
                    help="generator architecture for a bare official weights file (else guessed); "
                         "with --benchmark, the model to time (default titok_l32)")
    io.add_argument("--tokenizer", help="tokenizer: our checkpoint, official .bin/.safetensors, or HF folder")
    io.add_argument("--tokenizer-preset", choices=list(tokenizer.PRESETS),
                    help="tokenizer architecture for a bare official weights file")
    what = p.add_argument_group("what to sample")
    what.add_argument("--classes", type=int, nargs="+", help="class ids (grid default: the first 8; "
                      "--npz default: all classes, cycled)")
    what.add_argument("--per-class", type=int, default=4, help="grid: images per class (one row each)")
    what.add_argument("--out", default="grid.png", help="grid: output image")
    what.add_argument("--num-samples", type=int, help="evaluation mode: number of samples (use with --npz)")
    what.add_argument("--npz", help="evaluation mode: output .npz (arr_0: uint8 (N, H, W, 3))")
    what.add_argument("--max-batches", type=int,
                      help="--npz: stop after this many batches per process; rerun to continue")
    what.add_argument("--results", help="--npz: add the count, settings and wall time to this JSON file "
                      "under 'sample' (main.sh: out/results.json)")
    s = p.add_argument_group("sampling (defaults: DEFAULT_SAMPLING of the generator's preset)")
    s.add_argument("--num-steps", type=int)
    s.add_argument("--guidance-scale", type=float)
    s.add_argument("--guidance-schedule", choices=("constant", "linear", "power-cosine"))
    s.add_argument("--guidance-pow", type=float, help="exponent of the power-cosine schedule")
    s.add_argument("--randomize-temperature", type=float, help="Gumbel noise scale (0 = greedy)")
    s.add_argument("--softmax-annealing", action=argparse.BooleanOptionalAction)
    s.add_argument("--temperature", type=float, help="extra constant softmax temperature (1 = off)")
    r = p.add_argument_group("runtime")
    r.add_argument("--batch-size", type=int, help="default 32 (benchmark: 8)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", help="default: cuda if available, else cpu")
    r.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    r.add_argument("--benchmark", action="store_true", help="time sampling + decoding with random weights")
    r.add_argument("--repeats", type=int, default=1, help="benchmark: report the best of this many runs")
    args = p.parse_args(argv)
    if not args.benchmark:
        if not args.ckpt or not args.tokenizer:
            p.error("--ckpt and --tokenizer are required (or use --benchmark)")
        if (args.num_samples is None) != (args.npz is None):
            p.error("--num-samples and --npz go together")
    for name in ("per_class", "num_samples", "batch_size", "max_batches", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.benchmark:
            return benchmark(args)
        args.batch_size = args.batch_size or 32
        device = pick_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
        model = generator.load_generator(args.ckpt, args.preset)
        tok = tokenizer.load_tokenizer(args.tokenizer, args.tokenizer_preset)
        check_compatible(model, tok)
        settings = sampling_settings(args, model.preset)
        if args.dtype == "bf16":
            generator.cast_matmuls(model, torch.bfloat16)
        model, tok = model.to(device), tok.to(device).eval()
        if args.npz:
            rank, world = init_distributed(device)
            try:
                seconds = run_npz(args, model, tok, settings, device, rank, world)
                if args.results and rank == 0 and seconds is not None:
                    tokenizer.record_results(args.results, "sample", {
                        "num_samples": args.num_samples, "npz": args.npz, "processes": world,
                        "wall_s": round(seconds, 1), "settings": settings, "seed": args.seed})
            finally:
                if world > 1:
                    dist.destroy_process_group()
        else:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise UserError("a grid is sampled by one process; use --npz with torchrun")
            run_grid(args, model, tok, settings, device)
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()

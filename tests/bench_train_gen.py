"""Generator training speed, run by hand: `python tests/bench_train_gen.py [--preset tiny] [--device cuda]`.
Steps/s and tokens/s of train_gen.train_step on random tokens (random weights), fp32 and bf16 autocast,
with the achieved GFLOP/s next to this machine's measured matmul peak."""

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common
import generator
import train_gen
from tests.bench_util import bench_dtypes, bench_parser, flops, matmul_gflops, timeit


def main() -> None:
    p = bench_parser(__doc__, generator.PRESETS, repeats=3, help="default: tiny and titok_l32")
    args = p.parse_args()
    d, B = common.Dist(0, 1, args.device), args.batch_size
    sync = torch.cuda.synchronize if d.device.type == "cuda" else (lambda: None)
    dtypes = bench_dtypes(args)
    peak = {
        dt: matmul_gflops(
            getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dt]), device=str(d.device)
        )
        for dt in dtypes
    }
    print(
        f"device {d.device}, {torch.get_num_threads()} threads, batch {B}; measured matmul peak "
        + ", ".join(f"{dt} {g:.0f} GFLOP/s" for dt, g in peak.items())
    )
    print(
        "| preset | dtype | steps/s | tokens/s | GFLOP/s | % of matmul peak |\n|---|---|---|---|---|---|",
        flush=True,
    )
    for preset in [args.preset] if args.preset else ["tiny", "titok_l32"]:
        cfg = generator.PRESETS[preset]
        for dtype in dtypes:
            torch.manual_seed(0)
            R = dataclasses.replace(train_gen.GenRecipe(), batch_size=B, warmup_steps=0)
            t = train_gen.GenTrainer(R, d, generator.build_generator(cfg), dtype)
            ids = torch.randint(0, cfg.codebook_size, (B, cfg.seq_len), device=d.device)
            labels = torch.randint(0, cfg.num_classes, (B,), device=d.device)

            def step():
                train_gen.train_step(t, ids, labels, list(range(B)), 1)
                sync()

            sec, gflops = timeit(step, args.repeats), flops(step) / 1e9
            print(
                f"| {preset} | {dtype} | {1 / sec:.2f} | {B * cfg.seq_len / sec:.0f} | {gflops / sec:.0f} | "
                f"{100 * gflops / sec / peak[dtype]:.0f}% |",
                flush=True,
            )


if __name__ == "__main__":
    main()

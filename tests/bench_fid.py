"""Benchmark of fid.py (run by hand, not by pytest): Inception feature-extraction throughput and the
time of one FID on 2048-d statistics, on this machine.

    python tests/bench_fid.py [--inception PATH] [--device cuda] [--dtype fp64] [--batch-size 50 10]

Several batch sizes are timed side by side in one run: on 2 CPU cores 10 gave 1.19x the images/s of 50 (main.sh's).

Without weights (no --inception, no $TITOK_INCEPTION) the network runs with random weights: the
speed does not depend on them.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fid
from common import default_device, device_arg, positive_int
from tests.bench_util import timeit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--inception", help="weights file (default: $TITOK_INCEPTION; random weights if none)"
    )
    p.add_argument("--device", type=device_arg, default=default_device())
    p.add_argument("--dtype", choices=["fp32", "fp64"], default="fp32")
    p.add_argument("--batch-size", type=positive_int, nargs="+", default=[50, 10])
    p.add_argument("--repeats", type=positive_int, default=2)
    args = p.parse_args()
    dtype = {"fp32": torch.float32, "fp64": torch.float64}[args.dtype]
    path = fid.find_inception(args.inception)
    net = (
        fid.load_inception(path, args.device, dtype)
        if path
        else fid.FIDInceptionV3().to(args.device, dtype).eval().requires_grad_(False)
    )
    g = torch.Generator().manual_seed(0)
    n = max(args.batch_size)
    images = torch.randint(
        0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g
    )  # main.sh's image size
    sync = torch.cuda.synchronize if args.device.type == "cuda" else (lambda: None)
    rates = {
        b: n
        / timeit(lambda: (fid.inception_features(net, images, batch_size=b), sync()), args.repeats)
        for b in args.batch_size
    }
    f = torch.randn(4096, 2048, generator=g, dtype=torch.float64)
    (mu1, s1), (mu2, s2) = fid.feature_stats(f[:2048] ** 2), fid.feature_stats(f[2048:].abs())
    fid_seconds = timeit(lambda: fid.frechet_distance(mu1, s1, mu2, s2), 1)
    print(
        f"feature extraction ({args.dtype}, {torch.get_num_threads()} threads, {args.device}): "
        + ", ".join(
            f"batch {b}: {r:.2f} images/s ({r / rates[args.batch_size[0]]:.2f}x)"
            for b, r in rates.items()
        )
    )
    print(f"one FID on 2048-d statistics: {fid_seconds:.2f} s")


if __name__ == "__main__":
    main()

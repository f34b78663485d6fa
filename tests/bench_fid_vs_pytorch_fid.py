"""Benchmark, run by hand (not collected by pytest): fid.py's Inception feature extraction next to
pytorch-fid's own, same weights, same images, same machine, one run.

pytorch-fid (and the torchvision it imports) are not project dependencies; put them on a side path:
    pip download torchvision==0.28.0 pytorch-fid==0.3.0 --no-deps -d /tmp/dl
    pip install --no-deps --target /tmp/tv /tmp/dl/*.whl
    PYTHONPATH=/tmp/tv python tests/bench_fid_vs_pytorch_fid.py --inception default_1.pt
(torchvision's compiled ops need a matching CUDA torch; the CPU build only lacks them, so their
meta registrations are skipped below: the Inception network uses none of them.)

Prints images/s of both at batch 50 (fp32), the ratio, and how far apart the pool3 features are
(pytorch-fid resizes with F.interpolate, i.e. our `--resize torch` path).
"""
import argparse
import os
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fid  # noqa: E402


def pytorch_fid_net(ours: torch.nn.Module) -> torch.nn.Module:
    """pytorch-fid's InceptionV3 (pool3 block) with our weights: the keys are pt_inception's."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import pytorch_fid.inception as pfi
    sd = dict(ours.state_dict())
    sd.setdefault("fc.weight", torch.zeros(1008, 2048))  # fid-helper's weights have no classifier;
    sd.setdefault("fc.bias", torch.zeros(1008))          # pool3 does not use it
    pfi.load_state_dict_from_url = lambda *a, **k: sd    # instead of downloading the same weights
    return pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inception", default=os.environ.get("TITOK_INCEPTION"), help="weights (fid.py formats)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if not args.inception:
        sys.exit("error: give --inception (or set TITOK_INCEPTION)")
    ours = fid.load_inception(args.inception)
    theirs = pytorch_fid_net(ours)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, 256, 256), dtype=torch.uint8, generator=g)

    def run_ours():
        return fid.inception_features(ours, images, resize="torch", batch_size=args.batch_size)[0]

    def run_theirs():
        with torch.no_grad():  # pytorch-fid's get_activations: x/255 in [0, 1], the net resizes to 299
            return theirs(images.float() / 255)[0].flatten(1)

    best = {"fid.py": float("inf"), "pytorch-fid": float("inf")}
    out = {}
    for name, fn in [("fid.py", run_ours), ("pytorch-fid", run_theirs)] * args.repeats:  # interleaved
        start = time.perf_counter()
        out[name] = fn()
        best[name] = min(best[name], time.perf_counter() - start)
    n = args.batch_size
    print(f"batch {n}, fp32, {torch.get_num_threads()} threads, best of {args.repeats}")
    print("| implementation | images/s |\n|---|---|")
    for name, sec in best.items():
        print(f"| {name} | {n / sec:.2f} |")
    print(f"fid.py / pytorch-fid speed: {best['pytorch-fid'] / best['fid.py']:.2f}x")
    diff = (out["fid.py"] - out["pytorch-fid"]).abs().max().item()
    print(f"pool3 max |difference| {diff:.2e} (max |feature| {out['pytorch-fid'].abs().max().item():.2f})")


if __name__ == "__main__":
    main()

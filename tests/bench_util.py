"""The timing helper every `tests/bench_*.py` shares (benchmarks are run by hand, never by pytest):
wall time after a warm-up, FLOPs counted by torch, and this machine's dense-matmul peak, so each
table can say how close to the hardware limit a part runs."""

import time

import torch


def timeit(fn, repeats: int = 2) -> float:
    """Seconds per call of fn(), after one warm-up call (allocations, kernel selection)."""
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def flops(fn) -> float:
    """Floating-point operations of one call of fn(), as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, device: str = "cpu") -> float:
    """Measured dense matmul throughput (GFLOP/s): the roofline of the transformer parts."""
    a, b = (
        torch.randn(n, n, dtype=dtype, device=device),
        torch.randn(n, n, dtype=dtype, device=device),
    )
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    return 2 * n**3 / timeit(lambda: (a @ b, sync()), 5) / 1e9


def bench_parser(doc: str, presets, repeats: int = 2, **preset_kw):
    """The flags every benchmark shares: --preset, --batch-size, --repeats, --device (cpu by default)."""
    import argparse

    import common

    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--preset", choices=list(presets), **preset_kw)
    p.add_argument("--batch-size", type=common.positive_int, default=8)
    p.add_argument("--repeats", type=common.positive_int, default=repeats)
    p.add_argument("--device", type=common.device_arg, default=torch.device("cpu"))
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        help="also time bf16 (default: only where the hardware computes it natively)",
    )
    return p


def bench_dtypes(args) -> list[str]:
    """fp32, and bf16 where it is native: a GPU, or a CPU with AVX512-BF16 or AMX. Elsewhere (e.g. an
    AVX2-only CPU) bf16 is emulated, several times slower than fp32, and timing it says nothing."""
    if args.bf16 is None:
        try:
            flags = open("/proc/cpuinfo").read()
        except OSError:
            flags = ""
        args.bf16 = args.device.type == "cuda" or "avx512_bf16" in flags or "amx_bf16" in flags
    return ["fp32", "bf16"] if args.bf16 else ["fp32"]

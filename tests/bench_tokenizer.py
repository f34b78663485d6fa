"""Tokenizer speed, run by hand: `python tests/bench_tokenizer.py [--preset titok_s128] [--device cpu]`.
Random weights; encode, the ViT decoder, the MaskGIT-VQGAN pixel decoder and the whole decode, in
fp32 (and bf16 autocast where native), measured side by side in one run with this machine's matmul
peak: the achieved GFLOP/s say how close to the hardware limit each part runs. (Times from another
host do not compare; the reference implementation's, timed side by side, are in docs/benchmarks.md.)"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common
import tokenizer as T
from tests.bench_util import bench_dtypes, bench_parser, flops, matmul_gflops, timeit


def main() -> None:
    p = bench_parser(
        __doc__, [n for n, c in T.PRESETS.items() if c.pixel_decoder], default="titok_s128"
    )
    args = p.parse_args()
    dev = args.device
    torch.manual_seed(0)
    tok = T.TiTok(T.PRESETS[args.preset]).eval().to(dev)
    c, B = tok.config, args.batch_size
    x = torch.rand(B, 3, c.image_size, c.image_size, device=dev)
    ids = torch.randint(0, c.codebook_size, (B, c.num_latent_tokens), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.no_grad():
        z = tok.quantize.lookup(ids)
        soft = torch.einsum(
            "nchw,cd->ndhw", tok.decoder(z).softmax(1), tok.pixel_quantize.codebook()
        )
        ref = tok.decode_tokens(ids).clamp(0, 1)
    parts = {
        "encode": lambda: tok.encode(x),
        "decode (ViT)": lambda: tok.decoder(z),
        "decode (pixel)": lambda: tok.pixel_decoder(soft),
        "decode (total)": lambda: tok.decode_tokens(ids),
    }
    dtypes = bench_dtypes(args)
    peak = {
        d: matmul_gflops(
            getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[d]), device=str(dev)
        )
        for d in dtypes
    }
    print(
        f"{args.preset}, batch {B}, {dev}, {torch.get_num_threads()} threads; measured matmul peak: "
        + ", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in peak.items())
    )
    print(
        "| part | dtype | s/batch | img/s | GFLOP/s | % of matmul peak |\n|---|---|---|---|---|---|"
    )
    for dtype in dtypes:
        for name, fn in parts.items():
            with torch.no_grad(), common.autocast(dev, dtype):
                n_flops = flops(fn)
                sec = timeit(lambda: (fn(), sync()), args.repeats)
            print(
                f"| {name} | {dtype} | {sec:.3f} | {B / sec:.2f} | {n_flops / sec / 1e9:.0f} | "
                f"{100 * n_flops / sec / 1e9 / peak[dtype]:.0f}% |"
            )
    if "bf16" in dtypes:
        with torch.no_grad(), common.autocast(dev, "bf16"):
            low = tok.decode_tokens(ids).float().clamp(0, 1)
        print(f"bf16 vs fp32 decoded images: PSNR {T.psnr(low, ref):.1f} dB")


if __name__ == "__main__":
    main()

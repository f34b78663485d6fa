"""Train the MaskGIT generator on TiTok tokens, from 2 CPU cores to `torchrun` on many GPUs.

TiTok (Yu et al., 2024, arXiv 2406.07550, Sec. 3.4 and 4.1) generates images with MaskGIT (Chang
et al., 2022): a bidirectional transformer learns to fill in masked token ids. Because a TiTok image
is only K (32...128) tokens, the generator is small and fast. This file is the training stage:

  1. recipe               the official generator optimisation values, and a CPU schedule for `tiny`
  2. pre-tokenisation     encode the dataset ONCE (centre crop + a horizontally flipped copy, as the
                          official pipeline) into a compact .npy of ids; training never sees pixels
  3. one training step    mask (arccos schedule), drop labels (for classifier-free guidance), the
                          masked-token loss -- all imported from generator.py
  4. evaluation           masked-token accuracy on held-out tokens; a PNG grid of samples per class
  5. the training loop    resume, logging, checkpoints
  6. benchmark and command line

The plumbing (DDP set-up, atomic checkpoints, LR schedule, EMA, logging, NaN guard, the
deterministic sample stream) is train_tok.py's, imported rather than copied.

    python train_gen.py                      # tiny generator on the tokens of data/ (tokenised first
                                             # with out/tok/tokenizer.pt, which `python train_tok.py` leaves)
    python train_gen.py tokenize --tokenizer tokenizer_titok_l32.bin --data IMAGENET/train --out tokens/
    torchrun --nproc_per_node=8 train_gen.py --preset titok_l32 --tokens tokens/ --tokenizer ... --dtype bf16
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import generator
import tokenizer
from tokenizer import UserError
from train_tok import (EVAL_SIZE, HERE, EMA, Dist, OneLineErrorParser, RunLogger, StepBatches, TrainSet,
                       all_reduce_mean, all_reduce_sum, autocast, barrier, check_finite, distributed,
                       enable_tf32, gather_rng_states, lr_at, make_adamw, open_image_source, resume_from,
                       run_is_finished, save_checkpoint, save_step_checkpoint, seed_everything, set_lr,
                       set_rng_state, setup_distributed, split_heldout, truncate_log)

# ----------------------------------------------------------------------------------------------
# 1. Recipe: the official generator configs (configs/training/generator/maskgit.yaml): AdamW with
#    betas (0.9, 0.96), weight decay 0.03, lr 2e-4, warm-up then cosine; label smoothing 0.1, weight
#    0.1 on unmasked tokens, class-label dropout 0.1, the arccos mask schedule.
# ----------------------------------------------------------------------------------------------


@dataclass
class GenRecipe:
    lr: float = 2e-4
    end_lr: float = 1e-5
    warmup_steps: int = 10_000
    max_steps: int = 500_000
    beta1: float = 0.9
    beta2: float = 0.96
    weight_decay: float = 0.03
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    batch_size: int = 64              # sequences per process; global batch = batch_size * world
    seed: int = 42
    label_smoothing: float = 0.1
    unmasked_weight: float = 0.1      # loss weight of the visible tokens (masked ones weigh 1)
    label_dropout: float = 0.1        # P(class -> null class): trains the unconditional model for CFG
    mask_schedule: str = "arccos"
    log_every: int = 50
    eval_every: int = 5_000           # held-out accuracy + sample grid
    save_every: int = 50_000
    keep: int = 3


# The tiny generator learns Fashion-MNIST's 10 classes in a few CPU minutes with a short schedule
# and a larger learning rate (a 2M-parameter model tolerates it). Applied before command-line flags.
TINY_CPU = dict(batch_size=64, max_steps=1_000, warmup_steps=100, lr=1e-3, end_lr=5e-5,
                log_every=25, eval_every=500, save_every=500)

DEFAULT_OUT = Path("out/gen")
DEFAULT_TOKENS = Path("out/tokens")
DEFAULT_TOKENIZER = Path("out/tok/tokenizer.pt")

# ----------------------------------------------------------------------------------------------
# 2. Pre-tokenisation. Work is cut into chunks of CHUNK images; chunk k belongs to rank k % world and
#    is written atomically as parts/<split>_<k>.npz, so an interrupted run skips finished chunks.
#    Rank 0 then merges everything into tokens.npy / labels.npy (+ held-out) and meta.json.
# ----------------------------------------------------------------------------------------------

CHUNK = 512


def _id_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size <= 2 ** 16 else np.dtype(np.int32)


def _encode_chunk(tok: tokenizer.TiTok, source, indices: np.ndarray, flip: bool, d: Dist, dtype: str,
                  batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    ids, labels = [], []
    for i in range(0, len(indices), batch_size):
        pairs = [source.load(int(j), None) for j in indices[i:i + batch_size]]   # centre crop, no aug
        x = torch.stack([p[0] for p in pairs]).to(d.device).float() / 255.0      # (b, 3, S, S)
        if flip:
            x = x.flip(-1)
        with torch.no_grad(), autocast(d.device, dtype):
            ids.append(tok.encode(x).cpu().numpy())
        labels += [p[1] for p in pairs]
    return np.concatenate(ids).astype(_id_dtype(tok.config.codebook_size)), np.asarray(labels, np.int16)


def tokenize(tokenizer_path: str | os.PathLike, data: str, out: Path, d: Dist, dtype: str = "fp32",
              batch_size: int = 64, eval_size: int = EVAL_SIZE) -> dict:
    from tqdm import tqdm
    began = time.perf_counter()
    if (out / "meta.json").is_file():
        meta = json.loads((out / "meta.json").read_text())
        if d.is_main:
            print(f"{out} already holds {meta['train']} tokenised sequences; nothing to do", flush=True)
        return meta
    tok = tokenizer.load_tokenizer(tokenizer_path).to(d.device)
    if tok.quantize is None:
        raise UserError(f"{tokenizer_path} is a VAE tokenizer (continuous latents); MaskGIT needs token ids")
    source = open_image_source(data, tok.config.image_size, random_crop=False, random_flip=False)
    # The same held-out split as train_tok.py with the same --eval-size: those images were never
    # trained on by the tokenizer and are not trained on by the generator either (gFID reference).
    train_idx, held_idx = split_heldout(len(source), eval_size)
    jobs = []  # (name, chunk number, indices, flip)
    for name, indices, flip in (("orig", train_idx, False), ("flip", train_idx, True),
                                ("heldout", held_idx, False)):
        for k, start in enumerate(range(0, len(indices), CHUNK)):
            jobs.append((name, k, indices[start:start + CHUNK], flip))
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    mine = [j for n, j in enumerate(jobs) if n % d.world == d.rank]
    for name, k, indices, flip in tqdm(mine, desc=f"tokenize (rank {d.rank})", disable=not d.is_main):
        path = parts / f"{name}_{k:05d}.npz"
        if path.is_file():
            continue  # done by an earlier, interrupted run
        ids, labels = _encode_chunk(tok, source, indices, flip, d, dtype, batch_size)
        tmp = parts / f".{name}_{k:05d}.{os.getpid()}.tmp.npz"
        np.savez(tmp, ids=ids, labels=labels)
        os.replace(tmp, path)
    barrier()
    if d.is_main:
        def merged(*names):
            files = [p for n in names for p in sorted(parts.glob(f"{n}_[0-9][0-9][0-9][0-9][0-9].npz"))]
            arrays = [np.load(p) for p in files]
            return np.concatenate([a["ids"] for a in arrays]), np.concatenate([a["labels"] for a in arrays])
        ids, labels = merged("orig", "flip")
        held_ids, held_labels = merged("heldout") if len(held_idx) else (ids[:0], labels[:0])
        for name, arr in (("tokens", ids), ("labels", labels), ("heldout_tokens", held_ids),
                          ("heldout_labels", held_labels)):
            np.save(out / f"{name}.npy", arr)
        meta = {"codebook_size": tok.config.codebook_size, "num_tokens": tok.config.num_latent_tokens,
                "num_classes": int(max(labels.max(initial=0), held_labels.max(initial=0))) + 1,
                "train": int(len(ids)), "heldout": int(len(held_ids)), "eval_size": eval_size,
                "tokenizer": str(Path(tokenizer_path).resolve()), "data": source.description,
                "tokenizer_config": tokenizer.config_to_dict(tok.config),
                "wall_s": round(time.perf_counter() - began, 1)}  # of the run that finished the job
        tmp = out / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, out / "meta.json")  # written last: its presence means "complete"
        for p in parts.glob("*.npz"):
            p.unlink()
        parts.rmdir()
        print(f"tokenised {source.description}: {len(ids)} training sequences (with flipped copies), "
              f"{len(held_ids)} held out -> {out}", flush=True)
    barrier()
    return json.loads((out / "meta.json").read_text())


class TokenSet:
    """The tokenised dataset in memory. `load(i, rng)` has the shape TrainSet expects of a source."""

    def __init__(self, folder: Path):
        if not (folder / "meta.json").is_file():
            raise UserError(f"--tokens {folder}: no meta.json; tokenise first "
                            "(python train_gen.py tokenize --tokenizer CKPT --out DIR)")
        self.meta = json.loads((folder / "meta.json").read_text())
        self.ids = torch.from_numpy(np.load(folder / "tokens.npy").astype(np.int64))        # (N, K)
        self.labels = torch.from_numpy(np.load(folder / "labels.npy").astype(np.int64))     # (N,)
        self.held_ids = torch.from_numpy(np.load(folder / "heldout_tokens.npy").astype(np.int64))
        self.held_labels = torch.from_numpy(np.load(folder / "heldout_labels.npy").astype(np.int64))

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int, rng) -> tuple[torch.Tensor, int]:
        return self.ids[i], int(self.labels[i])

    def check(self, cfg: generator.GeneratorConfig, folder: Path) -> None:
        """Refuse tokens the generator cannot model, with the reason."""
        m = self.meta
        if m["codebook_size"] != cfg.codebook_size or m["num_tokens"] != cfg.seq_len:
            raise UserError(f"--tokens {folder} were made by a tokenizer with codebook {m['codebook_size']} and "
                            f"{m['num_tokens']} tokens, but the generator expects codebook {cfg.codebook_size} "
                            f"and {cfg.seq_len} tokens (pick the matching --preset or re-tokenise)")
        for name, labels in (("labels", self.labels), ("held-out labels", self.held_labels)):
            if labels.numel() and (labels.min() < 0 or labels.max() >= cfg.num_classes):
                raise UserError(f"--tokens {folder}: {name} span [{int(labels.min())}, {int(labels.max())}] "
                                f"but the generator has {cfg.num_classes} classes")
        for ids in (self.ids, self.held_ids):
            if ids.numel() and (ids.min() < 0 or ids.max() >= cfg.codebook_size):
                raise UserError(f"--tokens {folder}: token ids outside [0, {cfg.codebook_size})")

# ----------------------------------------------------------------------------------------------
# 3. One training step.
# ----------------------------------------------------------------------------------------------


def mask_batch(model: generator.MaskedTokenModel, ids: torch.Tensor, labels: torch.Tensor,
               positions: list[int], R: GenRecipe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masking and label dropout, with the randomness of each sample seeded by its position in the
    sample stream: one process, eight processes, or a resumed run mask every sample identically."""
    inputs, masks, dropped = [], [], []
    for i, pos in enumerate(positions):
        g = torch.Generator().manual_seed(R.seed * 1_000_003 + pos)
        x, m = generator.mask_tokens(ids[i:i + 1].cpu(), R.mask_schedule, mask_id=model.mask_id, generator=g)
        inputs.append(x)
        masks.append(m)
        dropped.append(generator.drop_labels(labels[i:i + 1].cpu(), R.label_dropout, model.null_label, generator=g))
    to = lambda xs: torch.cat(xs).to(ids.device)  # noqa: E731
    return to(inputs), to(masks), to(dropped)


@dataclass
class GenTrainer:
    recipe: GenRecipe
    dist: Dist
    net: generator.MaskedTokenModel   # the plain model (checkpoints, EMA, evaluation)
    model: torch.nn.Module            # what the step calls: net or DDP(net)
    opt: torch.optim.Optimizer
    ema: EMA
    dtype: str
    last_checkpoint: Path | None = None


def train_step(t: GenTrainer, ids: torch.Tensor, labels: torch.Tensor, positions: list[int],
               step: int) -> dict[str, torch.Tensor]:
    R = t.recipe
    set_lr(t.opt, lr_at(step, R.lr, R.end_lr, R.warmup_steps, R.max_steps))
    t.model.train()
    inputs, mask, cond = mask_batch(t.net, ids, labels, positions, R)
    with autocast(t.dist.device, t.dtype):
        logits = t.model(inputs, cond)                                          # (B, N, K)
    loss, accuracy = generator.masked_token_loss(logits.float(), ids, mask, R.label_smoothing, R.unmasked_weight)
    # masked_token_loss normalises by this rank's total token weight. Rescale so that DDP's gradient
    # average equals the loss of the whole global batch normalised once (as one process would).
    weight = mask.sum() + R.unmasked_weight * (~mask).sum()
    share = weight.float() * t.dist.world / all_reduce_sum(weight.float())
    check_finite(loss, "loss", step, t.last_checkpoint)
    (loss * share).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(t.net.parameters(), R.grad_clip)
    check_finite(grad_norm, "gradient norm", step, t.last_checkpoint)
    t.opt.step()
    t.opt.zero_grad(set_to_none=True)
    t.ema.update(t.net)
    return {"loss": loss.detach(), "masked_accuracy": accuracy.detach(), "grad_norm": grad_norm.detach()}

# ----------------------------------------------------------------------------------------------
# 4. Evaluation (rank 0, EMA weights): masked-token accuracy on held-out tokens with a fixed
#    masking, and a grid of class-conditional samples decoded by the tokenizer.
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def heldout_accuracy(net: generator.MaskedTokenModel, ids: torch.Tensor, labels: torch.Tensor,
                     R: GenRecipe, device: torch.device, batch: int = 256) -> float:
    net.eval()
    g = torch.Generator().manual_seed(12345)  # the same masks at every evaluation
    correct = total = 0.0
    for i in range(0, len(ids), batch):
        x, y = ids[i:i + batch], labels[i:i + batch]
        inputs, mask = generator.mask_tokens(x, R.mask_schedule, mask_id=net.mask_id, generator=g)
        pred = net(inputs.to(device), y.to(device)).argmax(-1).cpu()
        correct += float(((pred == x) & mask).sum())
        total += float(mask.sum())
    return correct / max(total, 1.0)


@torch.no_grad()
def sample_grid(net: generator.MaskedTokenModel, tok: tokenizer.TiTok, preset: str, num_classes: int,
                per_class: int, path: Path, device: torch.device, seed: int = 0) -> None:
    """One row per class (up to 10), `per_class` samples each, with the preset's sampling settings."""
    net.eval()
    classes = torch.arange(min(num_classes, 10)).repeat_interleave(per_class).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    ids = generator.generate(net, classes, generator=g, **generator.DEFAULT_SAMPLING.get(preset, {}))
    images = tok.decode_tokens(ids).float().clamp(0, 1).cpu()
    tokenizer.save_image(tokenizer.image_grid(images, per_class), path)

# ----------------------------------------------------------------------------------------------
# 5. The training loop.
# ----------------------------------------------------------------------------------------------

RUN_DEFAULTS = dict(preset="tiny", tokens=str(DEFAULT_TOKENS), tokenizer=None, data=str(HERE / "data"),
                    dtype="fp32", eval_size=EVAL_SIZE, dropout=None)


def resolve(args: argparse.Namespace, ckpt: dict | None) -> tuple[argparse.Namespace, GenRecipe]:
    """Settings: command line > resumed checkpoint > preset defaults (as train_tok.py)."""
    stored = (ckpt or {}).get("run", {})
    run = argparse.Namespace(**{k: getattr(args, k) if getattr(args, k) is not None else stored.get(k, v)
                                for k, v in RUN_DEFAULTS.items()})
    if run.preset not in generator.PRESETS:
        raise UserError(f"unknown preset {run.preset!r}; choose from {', '.join(generator.PRESETS)}")
    if ckpt is not None:
        if args.preset is not None and args.preset != ckpt["preset"]:
            raise UserError(f"--resume: {args.out} holds a {ckpt['preset']} run, not {args.preset} "
                            "(resume with the same --preset, or use another --out)")
        R = GenRecipe(**ckpt["recipe_values"])
    else:
        R = dataclasses.replace(GenRecipe(), **TINY_CPU) if run.preset == "tiny" else GenRecipe()
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(GenRecipe) if getattr(args, f.name, None) is not None}
    R = dataclasses.replace(R, **flags)
    if R.batch_size < 1 or R.max_steps < 1:
        raise UserError("--batch-size and --max-steps must be positive")
    return run, R


def train(args: argparse.Namespace, d: Dist) -> None:
    out = Path(args.out or DEFAULT_OUT)
    resumed_from, ckpt = resume_from(out, args.resume, "generator")
    run, R = resolve(args, ckpt)
    if run_is_finished(ckpt, R.max_steps, out / "generator.pt", d):
        return
    cfg = generator.PRESETS[run.preset]
    if run.dropout is not None:  # e.g. 0 for runs that must not depend on the number of processes
        cfg = dataclasses.replace(cfg, dropout=run.dropout, attn_dropout=run.dropout)
    tokens_dir = Path(run.tokens)
    if not (tokens_dir / "meta.json").is_file():
        # No tokens yet: tokenise with --tokenizer (default: what `python train_tok.py` leaves).
        tok_path = Path(run.tokenizer or DEFAULT_TOKENIZER)
        if not tok_path.exists():
            raise UserError(f"--tokens {tokens_dir} holds no tokens and there is no tokenizer at {tok_path} "
                            "to make them (run python train_tok.py first, or pass --tokenizer)")
        tokenize(tok_path, run.data, tokens_dir, d, run.dtype, eval_size=run.eval_size)
    data = TokenSet(tokens_dir)
    data.check(cfg, tokens_dir)
    tok_path = Path(run.tokenizer or data.meta["tokenizer"])
    tok = tokenizer.load_tokenizer(tok_path).to(d.device) if tok_path.exists() else None  # for sample grids
    if tok is not None and (tok.config.codebook_size, tok.config.num_latent_tokens) != (cfg.codebook_size, cfg.seq_len):
        raise UserError(f"tokenizer {tok_path} (codebook {tok.config.codebook_size}, {tok.config.num_latent_tokens} "
                        f"tokens) does not match generator preset {run.preset}")

    if d.device.type == "cuda":
        enable_tf32()
    torch.manual_seed(R.seed)  # identical initialisation on every rank
    net = generator.build_generator(cfg).to(d.device)
    model = DDP(net, device_ids=[d.device.index] if d.device.type == "cuda" else None) if d.world > 1 else net
    t = GenTrainer(R, d, net, model, make_adamw(list(net.named_parameters()), R.lr, (R.beta1, R.beta2),
                                                R.weight_decay), EMA(net, R.ema_decay), run.dtype)
    trainset = TrainSet(data, np.arange(len(data)), R.seed)
    start, position, elapsed_before = 0, 0, 0.0
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        t.ema.load_state_dict(ckpt["ema"], ckpt["ema_step"])
        t.opt.load_state_dict(ckpt["optimizer"])
        start, position, t.last_checkpoint = int(ckpt["step"]), int(ckpt["data"]["position"]), resumed_from
        elapsed_before = float(ckpt.get("elapsed_s", 0.0))  # training wall time of the earlier runs
        if len(ckpt["rng"]) == d.world:
            set_rng_state(ckpt["rng"][d.rank])
    else:
        seed_everything(R.seed + d.rank)
    del ckpt
    global_batch = R.batch_size * d.world
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in net.parameters())
        print(f"generator {run.preset}: {n_params / 1e6:.2f}M parameters, {len(data)} token sequences "
              f"({data.meta['data']}), global batch {global_batch} on {d.world} x {d.device.type}, "
              f"{run.dtype}, steps {start}->{R.max_steps}", flush=True)
        if start:
            truncate_log(out / "log.jsonl", start)
            print(f"resumed from {resumed_from}", flush=True)
        if tok is None:
            print(f"note: no tokenizer at {tok_path}; sample grids are skipped", flush=True)
    logger = RunLogger(out / "log.jsonl", R.max_steps, start, d.is_main)
    batches = iter(StepBatches(position, R.batch_size, d.world, d.rank, 1))
    window_start, window_steps, last = time.perf_counter(), 0, {}
    run_start = time.perf_counter()
    for step in range(start, R.max_steps):
        positions = next(batches)
        picked = [trainset.index_at(p) for p in positions]
        ids, labels = data.ids[picked].to(d.device), data.labels[picked].to(d.device)
        stats = train_step(t, ids, labels, positions, step)
        position += global_batch
        done, window_steps = step + 1, window_steps + 1
        logger.advance()
        if done % R.log_every == 0 or done % R.eval_every == 0 or done == R.max_steps:
            names = sorted(stats)
            values = all_reduce_mean(torch.stack([stats[k].float() for k in names])).tolist()
            speed = global_batch * window_steps / (time.perf_counter() - window_start)
            last = {"step": done, **{k: round(v, 6) for k, v in zip(names, values)},
                    "lr": lr_at(step, R.lr, R.end_lr, R.warmup_steps, R.max_steps),
                    "tokens_per_s": round(speed * cfg.seq_len, 1), "steps_per_s": round(window_steps /
                                                                                        (time.perf_counter() - window_start), 3)}
            if d.is_main and (done % R.eval_every == 0 or done == R.max_steps):
                with t.ema.applied_to(net):
                    if len(data.held_ids):
                        last["heldout_masked_accuracy"] = round(heldout_accuracy(
                            net, data.held_ids, data.held_labels, R, d.device), 4)
                    if tok is not None:
                        sample_grid(net, tok, run.preset, cfg.num_classes, 8, out / f"samples_{done:08d}.png", d.device)
            logger.log(last)
            barrier()
            window_start, window_steps = time.perf_counter(), 0
        if done % R.save_every == 0 or done == R.max_steps:
            state = {"kind": "generator", "preset": run.preset, "config": generator.config_to_dict(cfg),
                     "model": net.state_dict(), "ema": t.ema.state_dict(), "ema_step": t.ema.step, "step": done,
                     "recipe_values": dataclasses.asdict(R), "run": vars(run), "optimizer": t.opt.state_dict(),
                     "data": {"position": position}, "world": d.world, "rng": gather_rng_states(),
                     "elapsed_s": elapsed_before + time.perf_counter() - run_start}
            t.last_checkpoint = save_step_checkpoint(out, done, state, R.keep, d)
            del state
    logger.close()
    if d.is_main:
        export = {"kind": "generator", "preset": run.preset, "config": generator.config_to_dict(cfg),
                  "model": net.state_dict(), "ema": t.ema.state_dict(), "step": R.max_steps,
                  "tokenizer": str(tok_path)}
        save_checkpoint(out / "generator.pt", export)
        acc = f", held-out masked accuracy {last['heldout_masked_accuracy']:.3f}" if "heldout_masked_accuracy" in last else ""
        print(f"done: step {R.max_steps}{acc}; wrote {out}/generator.pt and {out}/log.jsonl", flush=True)
        if args.results and start < R.max_steps:  # steps were trained (not only a missing export rewritten)
            tokenizer.record_results(args.results, "train_gen", {
                "preset": run.preset, "steps": R.max_steps, "global_batch": global_batch,
                "wall_s": round(elapsed_before + time.perf_counter() - run_start, 1),
                "tokenize_wall_s": data.meta.get("wall_s"), "train_sequences": len(data),
                "heldout_masked_accuracy": last.get("heldout_masked_accuracy"), "out": str(out)})

# ----------------------------------------------------------------------------------------------
# 6. Benchmark and command line.
# ----------------------------------------------------------------------------------------------


def benchmark(args: argparse.Namespace) -> None:
    """Training tokens/s and steps/s (random tokens, batch 8 by default) with the achieved GFLOP/s
    next to the machine's measured matmul peak."""
    from torch.utils.flop_counter import FlopCounterMode
    d = setup_distributed(args.device)
    batch, steps = args.batch_size or 8, args.max_steps or 3
    peak = {dt: tokenizer.matmul_gflops(getattr(torch, n)) for dt, n in (("fp32", "float32"), ("bf16", "bfloat16"))}
    print(f"device {d.device}, {torch.get_num_threads()} threads, batch {batch}; measured matmul peak "
          f"fp32 {peak['fp32']:.0f}, bf16 {peak['bf16']:.0f} GFLOP/s")
    print("| preset | dtype | steps/s | tokens/s | GFLOP/s | % of matmul peak |\n|---|---|---|---|---|---|")
    for preset in ([args.preset] if args.preset else ["tiny", "titok_l32"]):
        cfg = generator.PRESETS[preset]
        for dtype in ("fp32", "bf16"):
            torch.manual_seed(0)
            net = generator.build_generator(cfg).to(d.device)
            R = dataclasses.replace(GenRecipe(), batch_size=batch, warmup_steps=0)
            t = GenTrainer(R, d, net, net, make_adamw(list(net.named_parameters()), R.lr, (R.beta1, R.beta2),
                                                      R.weight_decay), EMA(net), dtype)
            ids = torch.randint(0, cfg.codebook_size, (batch, cfg.seq_len), device=d.device)
            labels = torch.randint(0, cfg.num_classes, (batch,), device=d.device)
            with FlopCounterMode(display=False) as counter:
                train_step(t, ids, labels, list(range(batch)), 0)
            t0 = time.perf_counter()
            for s in range(steps):
                train_step(t, ids, labels, list(range(batch)), s + 1)
            sec = (time.perf_counter() - t0) / steps
            gflops = counter.get_total_flops() / sec / 1e9
            print(f"| {preset} | {dtype} | {1 / sec:.2f} | {batch * cfg.seq_len / sec:.0f} | {gflops:.0f} | "
                  f"{100 * gflops / peak[dtype]:.0f}% |", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        description="Train the MaskGIT generator of TiTok on pre-tokenised data (one process or torchrun). "
                    "`python train_gen.py tokenize ...` makes the tokens; without it, this trains.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="defaults: official generator recipe " + str(dataclasses.asdict(GenRecipe())) +
               f"; --preset tiny replaces the schedule with {TINY_CPU}")
    p.add_argument("--preset", choices=list(generator.PRESETS), help="generator architecture (default tiny)")
    p.add_argument("--tokens", help=f"folder made by `tokenize` (default {DEFAULT_TOKENS}; made on the fly "
                                    "from --tokenizer and --data when missing)")
    p.add_argument("--tokenizer", help=f"tokenizer checkpoint, for tokenising and sample grids "
                                       f"(default: the one the tokens were made with, else {DEFAULT_TOKENIZER})")
    p.add_argument("--data", help="images to tokenise when --tokens is missing (default data/)")
    p.add_argument("--out", help=f"checkpoints, log.jsonl, sample grids, generator.pt (default {DEFAULT_OUT})")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--results", help="add this run's summary (steps, wall time, held-out accuracy) to this "
                                     "JSON file under 'train_gen' (main.sh: out/results.json)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="autocast dtype (default fp32)")
    p.add_argument("--eval-size", type=int, help=f"held-out images when tokenising (default {EVAL_SIZE}, the split of train_tok.py)")
    p.add_argument("--dropout", type=float, help="override the preset's hidden and attention dropout (0.1)")
    p.add_argument("--benchmark", action="store_true", help="print training speed for tiny and titok_l32 and exit")
    g = p.add_argument_group("recipe values (defaults above)")
    for f in dataclasses.fields(GenRecipe):
        g.add_argument("--" + f.name.replace("_", "-"), type={"float": float, "int": int, "str": str}[f.type],
                       metavar=f.type.upper())
    return p


def build_tokenize_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="train_gen.py tokenize",
                           description="Encode a dataset once into token ids (centre crop + flipped copy).")
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint (ours, official .bin/.safetensors, HF folder)")
    p.add_argument("--data", default=str(HERE / "data"), help="image folder or idx(.gz) files (default data/)")
    p.add_argument("--out", required=True, help="output folder (tokens.npy, labels.npy, held-out copies, meta.json)")
    p.add_argument("--eval-size", type=int, default=EVAL_SIZE,
                   help=f"images held out (default {EVAL_SIZE}, the split of train_tok.py)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["tokenize"]:
            args = build_tokenize_parser().parse_args(argv[1:])
            with distributed(args.device) as d:
                tokenize(args.tokenizer, args.data, Path(args.out), d, args.dtype, args.batch_size, args.eval_size)
        else:
            args = build_parser().parse_args(argv)
            if args.benchmark:
                benchmark(args)
            else:
                with distributed(args.device) as d:
                    train(args, d)
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

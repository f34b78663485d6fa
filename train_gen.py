"""Train the MaskGIT generator on TiTok tokens, from 2 CPU cores to `torchrun` on many GPUs.

TiTok (Yu et al., 2024, arXiv 2406.07550, Sec. 3.4, 4.1) generates images with MaskGIT (Chang et al., 2022):
a bidirectional transformer learns to fill in masked token ids; a TiTok image is only K (32...128) tokens.
Read first: `train_step` (MaskGIT Sec. 3.1: mask with the arccos schedule, drop labels for classifier-free
guidance, the masked-token loss; generator.py's functions), then `main()`. Sections: 1 recipe, 2 tokenize
(the dataset encoded ONCE: centre crop + a flipped copy, as the official pipeline), 3 the step, 4 main().
The plumbing (atomic checkpoints, exact resume, LR schedule, EMA, logging, the position-seeded sample
stream) is train_tok.py's, imported.

    python train_gen.py          # tiny generator on data/, tokenised with out/tok/tokenizer.pt first
    python train_gen.py tokenize --tokenizer tokenizer_titok_l32.bin --data IMAGENET/train --out tokens/
    torchrun --nproc_per_node=8 train_gen.py --preset titok_l32 --tokens tokens/ --dtype bf16
"""
from __future__ import annotations

import argparse, dataclasses, json, os, shutil, sys, time  # noqa: E401
from dataclasses import dataclass
from pathlib import Path

import numpy as np, torch  # noqa: E401
from torch.nn.parallel import DistributedDataParallel as DDP

import generator, tokenizer  # noqa: E401
from tokenizer import Parser, UserError, autocast, nonneg_int, one_line_errors, write_atomic
from train_tok import (EMA, EVAL_SIZE, HERE, Dist, TrainSet, add_recipe_flags, barrier, check_finite, checkpoint,
                       distributed, lr_at, make_adamw, open_image_source, open_log, resolve, restore, resume_from,
                       run_is_finished, save_checkpoint, save_step_checkpoint, set_lr, sha256_of, split_heldout,
                       step_batches, world_mean, world_sum, write_log, write_summary)

# ----------------------------------------------------------------------------------------------
# 1. Recipe: configs/training/generator/maskgit.yaml (AdamW betas (0.9, 0.96), weight decay 0.03, ...).

@dataclass
class GenRecipe:
    lr: float = 2e-4                  # warm-up, then cosine
    end_lr: float = 1e-5
    warmup_steps: int = 10_000
    max_steps: int = 500_000
    beta1: float = 0.9
    beta2: float = 0.96
    weight_decay: float = 0.03
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    batch_size: int = 64              # sequences per process; global batch = batch_size * processes
    seed: int = 42
    label_smoothing: float = 0.1
    unmasked_weight: float = 0.1      # loss weight of the visible tokens (masked ones weigh 1)
    label_dropout: float = 0.1        # P(class -> null class): trains the unconditional model for CFG
    mask_schedule: str = "arccos"
    CHOICES = {"mask_schedule": ("arccos", "cosine", "linear")}  # (not a field: no annotation)
    log_every: int = 50
    eval_every: int = 5_000           # held-out accuracy + sample grid
    save_every: int = 50_000
    keep: int = 3

# The tiny generator learns Fashion-MNIST's 10 classes in a few CPU minutes: a short schedule and a larger
# learning rate (a 2M-parameter model tolerates it). Applied before the flags. 750 steps: the tokenizer, not
# the generator, bounds gFID (500 steps gave gFID 120 for a tokenizer of rFID 108), so it gets the minutes.
TINY_CPU = dict(batch_size=64, max_steps=750, warmup_steps=100, lr=1e-3, end_lr=5e-5,
                log_every=25, eval_every=250, save_every=250)

# ----------------------------------------------------------------------------------------------
# 2. Pre-tokenisation. Chunk k of CHUNK images belongs to rank k % world, written atomically as
#    parts/<split>_<k>.npz (a rerun skips finished chunks); rank 0 merges them, meta.json last.

CHUNK = 512

def tokenize(tokenizer_path: str | os.PathLike, data: str, out: Path, d: Dist, dtype: str = "fp32",
             batch_size: int = 64, eval_size: int = EVAL_SIZE) -> dict:
    began, parts, tok = time.perf_counter(), out / "parts", tokenizer.load_tokenizer(tokenizer_path).to(d.device)
    # What the tokens depend on; earlier output (a finished set, or an interrupted run's parts) made with
    # another tokenizer, data or split is refused, never returned or mixed in.
    stamp = dict(tokenizer_sha256=sha256_of(tokenizer_path), data_path=str(Path(data).resolve()), eval_size=eval_size)
    for f in (p for p in (out / "meta.json", parts / "stamp.json") if p.is_file()):
        if {k: json.loads(f.read_text()).get(k) for k in stamp} != stamp:
            raise UserError(f"{f} was made with another tokenizer, --data or --eval-size; use another --out")
    if (out / "meta.json").is_file():
        return json.loads((out / "meta.json").read_text())
    if tok.quantize is None:
        raise UserError(f"{tokenizer_path} is a VAE tokenizer (continuous latents); MaskGIT needs token ids")
    source = open_image_source(data, tok.config.image_size, random_crop=False)
    # train_tok.py's held-out split: images the tokenizer never trained on, nor will the generator
    train_idx, held_idx = split_heldout(len(source.labels), eval_size)
    jobs = [(name, k, idx[s:s + CHUNK], flip) for name, idx, flip in (("orig", train_idx, False),
            ("flip", train_idx, True), ("heldout", held_idx, False)) for k, s in enumerate(range(0, len(idx), CHUNK))]
    if d.is_main:
        write_atomic(parts / "stamp.json", lambda f: f.write(json.dumps(stamp).encode()))
    barrier()
    for name, k, indices, flip in jobs[d.rank::d.world]:
        if (parts / f"{name}_{k:05d}.npz").is_file():
            continue  # done by an earlier, interrupted run
        ids, labels = [], []
        for i in range(0, len(indices), batch_size):
            pairs = [source.load(int(j), None) for j in indices[i:i + batch_size]]   # the evaluation transform
            x = torch.stack([p[0] for p in pairs]).to(d.device).float() / 255.0      # (b, 3, S, S)
            # Under bf16 the ViT runs in bf16 but the nearest-code search does not: the quantizer
            # switches autocast off and picks every id in fp32 (bf16 rounding flips near-ties).
            with torch.no_grad(), autocast(d.device, dtype):
                ids.append(tok.encode(x.flip(-1) if flip else x).cpu().numpy())       # (b, K)
            labels += [p[1] for p in pairs]
        id_type = np.uint16 if tok.config.codebook_size <= 2 ** 16 else np.int32
        write_atomic(parts / f"{name}_{k:05d}.npz", lambda f: np.savez(
            f, ids=np.concatenate(ids).astype(id_type), labels=np.asarray(labels, np.int16)))
        if d.is_main:
            print(f"tokenize: {name} chunk {k + 1} of {sum(j[0] == name for j in jobs)}", flush=True)
    barrier()
    if d.is_main:
        def merged(*names):
            arrays = [np.load(p) for n in names for p in sorted(parts.glob(f"{n}_*.npz"))]
            return [np.concatenate([a[k] for a in arrays]) for k in ("ids", "labels")]
        ids, labels = merged("orig", "flip")
        held = merged("heldout") if len(held_idx) else (ids[:0], labels[:0])
        for name, arr in zip(("tokens", "labels", "heldout_tokens", "heldout_labels"), (ids, labels, *held)):
            np.save(out / f"{name}.npy", arr)
        meta = {"codebook_size": tok.config.codebook_size, "num_tokens": tok.config.num_latent_tokens,
                "train": len(ids), "heldout": len(held[0]), "data": source.description,
                "tokenizer": str(Path(tokenizer_path).resolve()), **stamp,
                "wall_s": round(time.perf_counter() - began, 1)}
        write_atomic(out / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))  # = complete
        shutil.rmtree(parts)
        print(f"tokenised {source.description}: {len(ids)} sequences (with flipped copies), {len(held[0])} held out")
    barrier()
    return json.loads((out / "meta.json").read_text())

def load_tokens(folder: Path, cfg: generator.GeneratorConfig) -> tuple[dict, list, generator.GeneratorConfig]:
    """meta.json, [ids (N, K), labels (N,), held-out ids, held-out labels], and `cfg` sized for these tokens: the
    sequence length and vocabulary are the tokenizer's (its --num-tokens, --codebook-size), not the preset's."""
    if not (folder / "meta.json").is_file():
        raise UserError(f"--tokens {folder}: no meta.json (python train_gen.py tokenize --tokenizer CKPT --out DIR)")
    meta = json.loads((folder / "meta.json").read_text())
    arrays = [torch.from_numpy(np.load(folder / f"{n}.npy").astype(np.int64))
              for n in ("tokens", "labels", "heldout_tokens", "heldout_labels")]
    cfg = dataclasses.replace(cfg, codebook_size=meta["codebook_size"], seq_len=meta["num_tokens"])
    for x, n in zip(arrays, (cfg.codebook_size, cfg.num_classes) * 2):
        if x.numel() and (x.min() < 0 or x.max() >= n):
            raise UserError(f"--tokens {folder}: values in [{int(x.min())}, {int(x.max())}], outside [0, {n}) "
                            f"({cfg.num_classes} classes in --preset, codebook {cfg.codebook_size} in meta.json)")
    return meta, arrays, cfg

def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 weight_decay: float = 1e-4, iters: int = 100) -> float:
    """Test accuracy of a multinomial logistic regression on frozen features (N, D), standardised with the
    training set's statistics, fit by L-BFGS: how linearly the tokens separate the classes (the paper's
    linear probing, Sec. 4.2: fewer tokens, more semantic ones)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mean) / std, (test_x - mean) / std
    W = torch.zeros(a.shape[1], int(max(train_y.max(), test_y.max())) + 1, requires_grad=True)   # (D, classes)
    bias = torch.zeros(W.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([W, bias], max_iter=iters, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = torch.nn.functional.cross_entropy(a @ W + bias, train_y) + weight_decay * W.pow(2).sum()
        value.backward()
        return value
    opt.step(loss)
    return float(((b @ W + bias).argmax(1) == test_y).float().mean())

# ----------------------------------------------------------------------------------------------
# 3. The training step (MaskGIT Sec. 3.1).

class GenTrainer:
    """What a step touches: the network `net` (called as `model`: DDP(net) when distributed), AdamW, EMA."""
    def __init__(self, R: GenRecipe, d: Dist, net: generator.MaskedTokenModel, dtype: str = "fp32"):
        self.recipe, self.dist, self.net, self.dtype, self.last_checkpoint = R, d, net.to(d.device), dtype, None
        ids = [d.device.index] if d.device.type == "cuda" else None
        self.model = net if d.world == 1 else DDP(net, device_ids=ids)
        self.opt = make_adamw(list(net.named_parameters()), R.lr, (R.beta1, R.beta2), R.weight_decay)
        self.ema = EMA(net, R.ema_decay)

def train_step(t: GenTrainer, ids: torch.Tensor, labels: torch.Tensor, positions: list[int],
               step: int) -> dict[str, torch.Tensor]:
    """ids (B, K), labels (B,) on the device, `positions` their places in the sample stream."""
    R, net = t.recipe, t.net
    set_lr(t.opt, lr_at(step, R.lr, R.end_lr, R.warmup_steps, R.max_steps))
    t.model.train()
    # Masking and label dropout, each sample's randomness seeded by its position in the sample
    # stream: one process, eight, or a resumed run mask every sample identically.
    inputs, mask, cond = [], [], []
    for i, pos in enumerate(positions):
        g = torch.Generator().manual_seed(R.seed * 1_000_003 + pos)
        x, m = generator.mask_tokens(ids[i:i + 1].cpu(), R.mask_schedule, mask_id=net.mask_id, generator=g)
        inputs.append(x)
        mask.append(m)
        cond.append(generator.drop_labels(labels[i:i + 1].cpu(), R.label_dropout, net.null_label, generator=g))
    inputs, mask, cond = (torch.cat(v).to(ids.device) for v in (inputs, mask, cond))
    with autocast(t.dist.device, t.dtype):
        logits = t.model(inputs, cond)                                          # (B, K, codebook)
    loss, accuracy = generator.masked_token_loss(logits.float(), ids, mask, R.label_smoothing, R.unmasked_weight)
    # masked_token_loss normalises by this rank's total token weight. Rescaled, DDP's gradient
    # average equals the loss of the whole global batch normalised once (as one process would).
    weight = (mask.sum() + R.unmasked_weight * (~mask).sum()).float()
    share = weight * t.dist.world / world_sum(weight)
    check_finite(loss, "loss", step, t.last_checkpoint)
    (loss * share).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), R.grad_clip)
    check_finite(grad_norm, "gradient norm", step, t.last_checkpoint)
    t.opt.step()
    t.opt.zero_grad(set_to_none=True)
    t.ema.update(net)
    return {"loss": loss.detach(), "masked_accuracy": accuracy.detach(), "grad_norm": grad_norm.detach()}

@torch.no_grad()
def heldout_accuracy(net: generator.MaskedTokenModel, ids: torch.Tensor, labels: torch.Tensor,
                     R: GenRecipe, device: torch.device, batch: int = 256) -> float:
    """Masked-token accuracy on held-out sequences, with the same masks at every evaluation."""
    g, correct, total = torch.Generator().manual_seed(12345), 0.0, 0.0
    for x, y in zip(ids.split(batch), labels.split(batch)):
        inputs, mask = generator.mask_tokens(x, R.mask_schedule, mask_id=net.mask_id, generator=g)
        pred = net.eval()(inputs.to(device), y.to(device)).argmax(-1).cpu()
        correct, total = correct + float(((pred == x) & mask).sum()), total + float(mask.sum())
    return correct / max(total, 1.0)

# ----------------------------------------------------------------------------------------------
# 4. main(): set-up, build, resume, the loop (log, evaluate, save), export.

def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tokenize"]:
        with one_line_errors(), distributed((a := build_parser(True).parse_args(argv[1:])).device) as d:
            tokenize(a.tokenizer, a.data, Path(a.out), d, a.dtype, a.batch_size, a.eval_size)
        return
    parser = build_parser()
    with one_line_errors(), distributed((args := parser.parse_args(argv)).device) as d:
        # -- set-up: settings, tokens (made here when missing), the tokenizer (sample grids)
        resumed_from, ckpt = resume_from(out := Path(args.out), args.resume, ("generator",), d)
        run, R = resolve(parser, argv, ckpt, lambda run: dataclasses.replace(
            GenRecipe(), **(TINY_CPU if run.preset == "tiny" else {})))
        if run_is_finished(ckpt, R.max_steps, out / "generator.pt", d):
            return
        cfg = generator.PRESETS[run.preset]
        if run.dropout is not None:  # e.g. 0 for runs that must not depend on the number of processes
            cfg = dataclasses.replace(cfg, dropout=run.dropout, attn_dropout=run.dropout)
        if run.width or run.depth:  # the paper's generator sizes; the MLP stays 4x the width, as in every preset
            if (width := run.width or cfg.hidden_size) % cfg.num_heads:
                raise UserError(f"--width {width} is not a multiple of {run.preset}'s {cfg.num_heads} attention heads")
            cfg = dataclasses.replace(cfg, hidden_size=width, mlp_dim=4 * width, num_layers=run.depth or cfg.num_layers)
        if not (Path(tokens := run.tokens) / "meta.json").is_file():  # tokenise with --tokenizer (or train_tok's)
            if not Path(tok_path := run.tokenizer or "out/tok/tokenizer.pt").exists():
                raise UserError(f"--tokens {tokens} holds no tokens, and no tokenizer (--tokenizer) makes them")
            tokenize(tok_path, run.data, Path(tokens), d, run.dtype, eval_size=run.eval_size)
        meta, (ids, labels, held_ids, held_labels), cfg = load_tokens(Path(tokens), cfg)
        if ckpt is not None and ckpt.get("config", generator.config_to_dict(cfg)) != generator.config_to_dict(cfg):
            raise UserError(f"{resumed_from}: another generator than the tokens in {tokens} need; use another --out")
        tok_path = Path(run.tokenizer or meta["tokenizer"])
        if run.tokenizer and tok_path.exists() and meta.get("tokenizer_sha256") not in (None, sha256_of(tok_path)):
            raise UserError(f"--tokens {tokens} were made with another tokenizer ({meta['tokenizer']}) than "
                            f"--tokenizer {tok_path} (its bytes differ); re-tokenise into a new --tokens folder")
        tok = tokenizer.load_tokenizer(tok_path).to(d.device) if tok_path.exists() else None

        # -- build (seeded alike on every rank) and resume (train_tok.py section 6)
        torch.manual_seed(R.seed)
        t = GenTrainer(R, d, generator.build_generator(cfg), run.dtype)
        restore(ckpt, parts := dict(model=t.net, opt=t.opt, ema=t.ema), d, R.seed)
        start, position, elapsed = (int(ckpt["step"]), ckpt["position"], ckpt["elapsed_s"]) if ckpt else (0, 0, 0.0)
        t.last_checkpoint, first_argv = resumed_from, (ckpt["argv"] if ckpt else []) + argv
        del ckpt
        trainset, global_batch = TrainSet(None, np.arange(len(ids)), R.seed), R.batch_size * d.world
        if d.is_main:
            print(f"generator {run.preset}: {len(ids)} sequences ({meta['data']}), {d.world} x {d.device.type}, "
                  f"steps {start}-{R.max_steps}" + ("" if tok else f"; no tokenizer at {tok_path}: no sample grids"))

        # -- the loop
        log, batches = open_log(out / "log.jsonl", start, d.is_main), step_batches(position, R.batch_size, d.world,
                                                                                   d.rank)
        began, window, last = time.perf_counter(), (time.perf_counter(), start), {}
        for step in range(start, R.max_steps):
            positions = next(batches)
            picked = [trainset.index_at(p) for p in positions]
            stats = train_step(t, ids[picked].to(d.device), labels[picked].to(d.device), positions, step)
            position, done = position + global_batch, step + 1
            if done % R.log_every == 0 or done % R.eval_every == 0 or done == R.max_steps:
                steps_per_s = (done - window[1]) / (time.perf_counter() - window[0])
                last = {"step": done, **world_mean(stats), "lr": lr_at(step, R.lr, R.end_lr, R.warmup_steps,
                        R.max_steps), "tokens_per_s": round(global_batch * steps_per_s * cfg.seq_len, 1),
                        "steps_per_s": round(steps_per_s, 3)}
                if d.is_main and (done % R.eval_every == 0 or done == R.max_steps):
                    with t.ema.applied_to(t.net):
                        if len(held_ids):
                            last["heldout_masked_accuracy"] = round(heldout_accuracy(
                                t.net, held_ids, held_labels, R, d.device), 4)
                        if tok is not None:  # a row of 8 samples per class (up to 10), the preset's sampling
                            classes = torch.arange(min(cfg.num_classes, 10), device=d.device).repeat_interleave(8)
                            g = torch.Generator(d.device).manual_seed(0)
                            sample = generator.generate(t.net.eval(), classes, generator=g,
                                                        **generator.DEFAULT_SAMPLING.get(run.preset, {}))
                            grid = tokenizer.image_grid(tok.decode_tokens(sample).float().clamp(0, 1).cpu(), 8)
                            tokenizer.save_image(grid, out / f"samples_{done:08d}.png")
                write_log(log, last)
                barrier()
                window = (time.perf_counter(), done)
            if done % R.save_every == 0 or done == R.max_steps:
                state = checkpoint(parts, d, kind="generator", preset=run.preset, config=generator.config_to_dict(cfg),
                                   step=done, argv=first_argv, position=position,
                                   elapsed_s=elapsed + time.perf_counter() - began)
                t.last_checkpoint = save_step_checkpoint(out, done, state, R.keep, d)

        # -- save: the export (generator.load_generator prefers its EMA weights) and the summary
        if d.is_main:
            save_checkpoint(out / "generator.pt", {"kind": "generator", "preset": run.preset, "step": R.max_steps,
                            "config": generator.config_to_dict(cfg), "model": t.net.state_dict(), "ema": t.ema.shadow,
                            "tokenizer": str(tok_path)})
            if start < R.max_steps:  # steps were trained (not only a missing export rewritten)
                write_summary(out, dict(preset=run.preset, steps=R.max_steps, train_sequences=len(ids), wall_s=round(
                    elapsed + time.perf_counter() - began, 1), tokenize_wall_s=meta.get("wall_s"),
                    heldout_masked_accuracy=last.get("heldout_masked_accuracy")))
            print(f"done: step {R.max_steps}; wrote {out}/generator.pt and {out}/log.jsonl")

def build_parser(tokenize: bool = False) -> argparse.ArgumentParser:
    """Training flags (every GenRecipe field too), or those of `train_gen.py tokenize`."""
    p = Parser(prog="train_gen.py" + " tokenize" * tokenize, description=(
        "Encode a dataset once into token ids (centre crop + flipped copy)." if tokenize else "Train TiTok's "
        f"MaskGIT generator (torchrun: DDP); `train_gen.py tokenize` makes the tokens. Tiny: {TINY_CPU}"))
    p.add_argument("--tokenizer", required=tokenize, help="tokenizer (ours, official, HF folder); training: to "
                   "tokenise, for sample grids (default: the tokens' own, else out/tok/tokenizer.pt)")
    p.add_argument("--data", default=str(HERE / "data"), help="images to tokenise: image folder or idx(.gz) files")
    p.add_argument("--out", required=tokenize, default="out/gen", help="output folder (training: default out/gen)")
    p.add_argument("--eval-size", type=nonneg_int, default=EVAL_SIZE, help="images held out (as train_tok)")
    p.add_argument("--device", type=tokenizer.device_arg, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="autocast dtype")
    if tokenize:
        p.add_argument("--batch-size", type=tokenizer.positive_int, default=64)
        return p
    p.add_argument("--preset", choices=list(generator.PRESETS), default="tiny", help="generator architecture")
    p.add_argument("--tokens", default="out/tokens", help="folder made by `tokenize` (made here when missing)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--dropout", type=tokenizer.float_in(0, 1), help="the preset's hidden and attention dropout (0.1)")
    p.add_argument("--width", type=tokenizer.positive_int, help="hidden size instead of the preset's (MLP: 4x)")
    p.add_argument("--depth", type=tokenizer.positive_int, help="layers instead of the preset's (token count and "
                   "codebook size come from --tokens)")
    add_recipe_flags(p, GenRecipe)
    return p

if __name__ == "__main__":
    main()

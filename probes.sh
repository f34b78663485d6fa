#!/usr/bin/env bash
# The paper's claims in miniature: five probes on the bundled Fashion-MNIST (data/), on 2 CPU cores. Each
# trains small tokenizers / generators with the stage scripts (same flags a researcher would use), then measures
# them; $OUT/results.md gathers the tables, $OUT/*.png the pictures and plots. Run it again and every step
# resumes or skips what is done. The tokenizers use the paper's two stages (Sec. 3.3): one small MaskGIT-VQGAN
# teacher, then stage 1 (predict the teacher's 64 proxy codes from K tokens) for every row.
#   (a) proxy-code accuracy, PSNR, rFID vs number of tokens (8/16/32/64), two sizes (TiTok Sec. 4.2, Fig. 4a)
#   (b) linear probe of the tokens vs their number                                 (Sec. 4.2, Fig. 4c)
#   (c) two-stage TiTok vs its 2-D MaskGIT-VQGAN teacher at an equal 64 tokens       (Sec. 4.3, Tables 1-2)
#   (d) the generator: gFID and sampling speed vs tokens; arccos vs cosine         (Sec. 4.2 Fig. 4d, Sec. 3.4)
#   (e) beyond the paper: nested dropout, so that any prefix of the tokens decodes (FlexTok, One-D-Piece)
#
#   bash probes.sh                                 # into out/probes, ~30 minutes on 2 cores
#   CURVE=1 bash probes.sh                         # also S-8, B-32, B-64 to 2,400 steps: the curve behind S1_STEPS
#   OUT=/tmp/p SMOKE=1 bash probes.sh              # a few steps per run: checks the hand-offs (CI does this)
set -euo pipefail
cd "$(dirname "$0")"
eval "$(WEIGHTS_ONLY=1 bash main.sh)"  # the Inception weights of FID (fetched once); without them: no FIDs

P=${OUT:-out/probes}
# Steps per run: the teacher, stage 1 (chosen from the CURVE=1 curve: docs/probes.md), stage 2 (L2), the
# single-stage runs of (e), the generators; images per rFID / gFID.
VQ_STEPS=600 S1_STEPS=600 S2_STEPS=200 TOK_STEPS=300 GEN_STEPS=150 N_FID=100 CURVE_STEPS=2400
DATA=()                                 # data/ and its 1,000 held-out images
mkdir -p "$P"
exec 9>>"$P/.lock"  # one probes.sh per OUT at a time (flock: released when this shell ends, however)
if command -v flock >/dev/null && ! flock -n 9; then
  echo "error: $P is in use by another probes.sh ($(cat "$P/.lock")); wait for it, or use another OUT=" >&2
  exit 1
fi
echo "process $$ on $(hostname)" > "$P/.lock"
if [ "${SMOKE:-0}" = 1 ]; then  # 2 steps per run, on the first 300 images (100 held out)
  VQ_STEPS=2 S1_STEPS=2 S2_STEPS=2 TOK_STEPS=2 GEN_STEPS=2 N_FID=10 CURVE_STEPS=4
  DATA=(--data "$P/data" --eval-size 100)
  python - "$P/data" <<'PY'
import sys
from pathlib import Path
from common import read_idx
for kind in ("images-idx3", "labels-idx1"):  # idx: 0, 0, 8 (uint8), ndim, big-endian sizes, the bytes
    a = read_idx(f"data/t10k-{kind}-ubyte.gz")[:300]
    (out := Path(sys.argv[1]) / f"smoke-{kind}-ubyte").parent.mkdir(exist_ok=True)
    out.write_bytes(bytes([0, 0, 8, a.ndim]) + b"".join(n.to_bytes(4, "big") for n in a.shape) + a.tobytes())
PY
fi
S=(--width 32 --depth 2) B=(--width 64 --depth 4)  # two sizes of the tiny preset (128 wide, 4 + 4 layers)

tok() {  # tok NAME STEPS FLAGS...: a tokenizer in $P/NAME, evaluated on the held-out images 4 times (log.jsonl)
  local name=$1 steps=$2; shift 2
  python train_tok.py --out "$P/$name" --resume --max-steps "$steps" --eval-every $(( steps >= 4 ? steps / 4 : 1 )) \
    --save-every "$steps" --log-every 100 "${DATA[@]}" "$@" | grep -v "^step" || true
  test -f "$P/$name/tokenizer.pt" || test -f "$P/$name/vqgan.pt"
}
VQ=$P/VQ64/vqgan.pt  # the teacher: the main job's out/vqgan when it exists (same data, same split), else trained here
teacher() {
  if [ ! -f "$VQ" ] && [ "${SMOKE:-0}" != 1 ] && [ -f out/vqgan/vqgan.pt ]; then
    mkdir -p "$P/VQ64" && cp out/vqgan/vqgan.pt out/vqgan/heldout.npz "$P/VQ64/"
  fi
  [ -f "$VQ" ] || tok VQ64 "$VQ_STEPS" --recipe vqgan  # TINY_VQGAN: 32 px / 4 = an 8 x 8 grid, 64 tokens
}
stage1() { tok "$1" "$2" --recipe stage1 --vqgan "$VQ" "${@:3}"; }  # stage1 NAME STEPS FLAGS...
stage2() {  # stage2 NAME FROM FLAGS...: decoder fine-tuning of stage 1's $P/FROM (L2: no --lpips; GAN after S2_STEPS)
  tok "$1" "$S2_STEPS" --recipe stage2 --init "$P/$2/tokenizer.pt" --vqgan "$VQ" "${@:3}"
}
gen() {  # gen TOKENIZER NAME FLAGS...: tokens of $P/TOKENIZER, a generator on them, N_FID samples, gFID
  local t=$1 name=$2 ckpt=$P/$1/tokenizer.pt; shift 2
  [ -f "$ckpt" ] || ckpt=$P/$t/vqgan.pt
  python train_gen.py --tokens "$P/$t/tokens" --tokenizer "$ckpt" --out "$P/$name" --resume \
    --max-steps "$GEN_STEPS" --eval-every "$GEN_STEPS" --save-every "$GEN_STEPS" --log-every 100 "${DATA[@]}" "$@" \
    | grep -v "^step\|^tokenize:" || true
  python sample.py --ckpt "$P/$name/generator.pt" --tokenizer "$ckpt" --num-samples "$N_FID" \
    --npz "$P/$name/samples.npz" "${SAMPLE_FLAGS[@]}"
  if [ -f "$P/ref_stats.npz" ] && ! [ "$P/$name/fid.json" -nt "$P/$name/samples.npz" ]; then
    python fid.py "$P/$name/samples.npz" "$P/ref_stats.npz" --json "$P/$name/fid.json" > /dev/null
  fi
}
timed() {  # timed PROBE COMMAND...: its wall time (the first run that completes it) into $P/wall.json
  local t0=$SECONDS; "${@:2}"
  python -c "import json, sys; from pathlib import Path; p = Path(sys.argv[1]); w = json.loads(p.read_text()) \
if p.is_file() else {}; w.setdefault(sys.argv[2], int(sys.argv[3])); p.write_text(json.dumps(w))" \
    "$P/wall.json" "$1" $((SECONDS - t0))
}
measure() {  # measure WHAT ...: the evaluations below, in Python; each skips when its output is newer than its inputs
  python - "$P" "$N_FID" "$@" <<'PY'
import json, sys
from pathlib import Path
import numpy as np, torch
import common, fid, tokenizer
from probes import line_plot, linear_probe

P, n_fid, (what, out, pic), names = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:6], sys.argv[6:]
out = P / out  # what WHAT writes (+ the picture PIC), from the runs NAMES in $P
ckpt = lambda name: next(p for p in (P / name / "tokenizer.pt", P / name / "vqgan.pt") if p.is_file())
if out.is_file() and all(out.stat().st_mtime > ckpt(n).stat().st_mtime for n in names) and what != "report":
    sys.exit(print(f"{out} is up to date; nothing to do"))
torch.set_grad_enabled(False)
weights = fid.find_inception()
net = fid.load_inception(weights) if weights and weights.is_file() else None

def heldout(name):  # uint8 (1000, 3, 32, 32): train_tok's held-out split, the same in every run
    return torch.from_numpy(np.load(P / name / "heldout.npz")["arr_0"]).permute(0, 3, 1, 2)

def encode(tok, x):  # uint8 images -> (N, K) ids, in batches of 100
    return torch.cat([tok.encode(b.float() / 255) for b in x.split(100)])

def open_tok(name):  # (tokenizer, stage 1?): a stage-1 tokenizer's pixels are its codes drawn by the teacher
    tok = tokenizer.load_tokenizer(ckpt(name), pixels=False)
    return tok, isinstance(tok, tokenizer.TiTok) and tok.config.proxy_head and not tok.config.pixel_decoder

def codes(tok, ids):  # stage 1: the proxy codes (N, 64) its decoder predicts from the tokens
    return torch.cat([tok.decode_tokens(i).argmax(1).flatten(1) for i in ids.split(100)])

def reconstruct(tok, ids, k=None, stage1=False):  # uint8 images from the first k tokens (all: None)
    if stage1:
        return torch.cat([common.to_uint8(teacher.decode_tokens(c)) for c in codes(tok, ids).split(100)])
    return torch.cat([common.to_uint8(tok.decode_tokens(i[:, :k])) for i in ids.split(100)])

def psnr(x, y):  # mean per-image PSNR, as fid.py rfid
    return round(float(np.mean([common.psnr(a / 255, b / 255) for a, b in zip(x.float(), y.float())])), 2)

def rfid(rec):  # the first n_fid reconstructions against the same held-out images' statistics
    if net is None or ref is None:
        return None
    fake = fid.feature_stats(fid.inception_features(net, rec[:n_fid])[0])
    return round(fid.frechet_distance(ref["mu"], ref["sigma"], *fake), 2)

def picture(rows, path):  # originals, then one row of 8 per entry
    common.save_image(common.image_grid(torch.cat([r[:8] for r in rows]).float() / 255, 8), P / path)

result, ref = {}, (np.load(P / "ref_stats.npz") if (P / "ref_stats.npz").is_file() else None)
teacher = tokenizer.load_tokenizer(P / "VQ64" / "vqgan.pt") if (P / "VQ64" / "vqgan.pt").is_file() else None
log = lambda name: [json.loads(s) for s in (P / name / "log.jsonl").read_text().splitlines()]
if what == "ref" and net is not None:  # FID statistics of the first n_fid held-out images
    mu, sigma = fid.feature_stats(fid.inception_features(net, heldout(names[0])[:n_fid])[0])
    np.savez(out, mu=mu, sigma=sigma, n=n_fid, resize="tf1")
elif what == "recon":  # (a), (c): proxy-code accuracy, PSNR on the 1,000 held-out images, rFID, usage
    x = heldout(names[0])
    rows, truth = [x], torch.cat([teacher.encode(b.float() / 255) for b in x.split(100)])  # (N, 64)
    for name in names:
        tok, stage1 = open_tok(name)
        ids = encode(tok, x)
        rows.append(rec := reconstruct(tok, ids, stage1=stage1))
        result[name] = dict(tokens=ids.shape[1], psnr=psnr(x, rec), rfid=rfid(rec),
                            usage=round(ids.unique().numel() / tok.config.codebook_size, 3))
        if stage1:  # and how its code accuracy rose: the held-out evaluations in its log
            result[name]["code_acc"] = round(float((codes(tok, ids) == truth).float().mean()), 4)
            result[name]["curve"] = [(r["step"], r["code_acc"]) for r in log(name) if "code_acc" in r]
    picture(rows, pic)
    if what == "recon" and out.name == "a.json":  # the trend at a glance: accuracy vs tokens, and vs steps
        size = lambda s: {k: result[f"{s}{k}"]["code_acc"] for k in (8, 16, 32, 64)}
        line_plot({f"{s} ({w})": list(size(s).items()) for s, w in (("S", "32 wide, 2+2"), ("B", "64 wide, 4+4"))},
                  P / "a_tokens.png", "(a) held-out proxy-code accuracy vs tokens")
        line_plot({n: result[n]["curve"] for n in ("S8", "B64")}, P / "a_steps.png",
                  "(a) held-out proxy-code accuracy vs stage-1 steps", log2_x=False)
elif what == "curve":  # CURVE=1: the extreme rows to CURVE_STEPS
    result = {n: [(r["step"], r["code_acc"]) for r in log(n) if "code_acc" in r] for n in names}
    line_plot(result, P / pic, "held-out proxy-code accuracy vs stage-1 steps (S-8, B-32, B-64)", log2_x=False)
elif what == "prefix":  # (e): PSNR of the first k tokens' decoding
    x = heldout(names[0])
    rows = [x]
    for name in names:
        tok = open_tok(name)[0]
        ids = encode(tok, x)  # (1000, K), decoded from its first k tokens for each k
        recs = {k: reconstruct(tok, ids, k) for k in (1, 2, 4, 8, 16, 24, 32) if k <= ids.shape[1]}
        result[name] = {k: psnr(x, r) for k, r in recs.items()}
        rows += [recs[k] for k in (4, 8, 16, 32) if k in recs]
    picture(rows, pic)
elif what == "linear":  # (b): logistic regression on the tokens' codebook vectors (train_gen.py tokenize's ids)
    for name in names:
        tok, d = open_tok(name)[0], P / name / "tokens"
        ids, y, held, held_y = (torch.from_numpy(np.load(d / f"{n}.npy").astype(np.int64))
                                for n in ("tokens", "labels", "heldout_tokens", "heldout_labels"))
        f, g = (tok.quantize.lookup(i).flatten(1) for i in (ids, held))  # (N, K * C) features
        result[name] = dict(tokens=ids.shape[1], features=f.shape[1], accuracy=round(linear_probe(f, y, g, held_y), 4))
elif what == "report":  # the tables of results.md, from the json files above and the generators' own
    load = lambda f: json.loads((P / f).read_text()) if (P / f).is_file() else {}
    a, b, c, e, curve, wall = (load(f"{x}.json") for x in ("a", "b", "c", "e", "curve", "wall"))
    g = {n: load(f"{n}/fid.json") | load(f"{n}/summary.json") | {"speed": load(f"{n}/samples.json")}
         for n in ("G16", "G32", "G64", "GVQ64", "G32cos")}
    v = lambda d, k: "n/a" if d.get(k) is None else round(d[k], 3 if k == "code_acc" else 2) if isinstance(d[k], float) else d[k]
    speed = lambda d: round(d["speed"]["num_samples"] / d["speed"]["wall_s"], 1) if d["speed"] else "n/a"
    md = [f"Stage 1: {v(load('B32/summary.json'), 'steps')} steps per row (teacher: the MaskGIT-VQGAN in VQ64), "
          f"stage 2: {v(load('B32s2/summary.json'), 'steps')} (L2), generators {v(g['G32'], 'steps')} steps; "
          f"rFID / gFID on {n_fid} held-out images, accuracy and PSNR on 1,000.\n",
          "### (a) Stage 1 vs number of tokens: proxy-code accuracy, and the codes drawn by the teacher\n",
          "| tokens | S (32 wide, 2+2): code acc. | S: PSNR | S: rFID | B (64 wide, 4+4): code acc. | B: PSNR | B: rFID |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {k} | " + " | ".join(f"{v(a.get(f'{s}{k}', {}), m)}" for s in "SB" for m in ("code_acc", "psnr", "rfid"))
           + " |" for k in (8, 16, 32, 64)]
    md += ["", "Held-out code accuracy at each quarter of stage 1 (the order of the rows over steps):\n",
           "| run | " + " | ".join(f"step {t}" for t, _ in a.get("S8", {}).get("curve", [])) + " |",
           "|---|" + "---|" * len(a.get("S8", {}).get("curve", []))]
    md += [f"| {n} | " + " | ".join(f"{y:.4f}" for _, y in d["curve"]) + " |" for n, d in a.items() if "curve" in d]
    if curve:
        md += ["", "CURVE=1: the curve rows to CURVE_STEPS, evaluated 16 times (held-out code accuracy):\n",
               "| step | " + " | ".join(curve) + " |", "|---|" + "---|" * len(curve)]
        md += [f"| {t} | " + " | ".join(f"{dict(c).get(t, float('nan')):.4f}" for c in curve.values()) + " |"
               for t, _ in next(iter(curve.values()))]
    md += ["", "### (b) Linear probe on the tokens (codebook vectors of B's stage-1 tokens)\n",
           "| tokens | features | held-out accuracy |", "|---|---|---|"]
    md += [f"| {d['tokens']} | {d['features']} | {d['accuracy']:.1%} |" for d in b.values()]
    md += ["", "### (c) 1-D vs 2-D at 64 tokens\n", "| tokenizer | PSNR | rFID | codebook usage | gFID |",
           "|---|---|---|---|---|"]
    md += [f"| {label} | {v(c.get(n, {}), 'psnr')} | {v(c.get(n, {}), 'rfid')} | {v(c.get(n, {}), 'usage')} | "
           f"{v(g[gn], 'fid')} |" for label, n, gn in (("TiTok (1-D, B, 64 tokens, stages 1 + 2)", "B64s2", "G64"),
                                                       ("its teacher, the MaskGIT-VQGAN (2-D, 8 x 8)", "VQ64", "GVQ64"))]
    md += ["", "### (d) The generator vs number of tokens (B, stages 1 + 2), and the masking schedule\n",
           "| tokens | schedule | gFID | held-out masked-token accuracy | sampling images/s (8 steps) |",
           "|---|---|---|---|---|"]
    md += [f"| {k} | {sched} | {v(g[n], 'fid')} | {v(g[n], 'heldout_masked_accuracy')} | {speed(g[n])} |"
           for n, k, sched in (("G16", 16, "arccos"), ("G32", 32, "arccos"), ("G64", 64, "arccos"),
                               ("G32cos", 32, "cosine"))]
    md += ["", "### (e) Variable-length tokens: PSNR of the first k of 32 tokens (single stage, L2)\n",
           "| k | B, trained as usual | B, nested dropout (p = 0.5) |", "|---|---|---|"]
    md += [f"| {k} | {v(e.get('B32single', {}), k)} | {v(e.get('B32nested', {}), k)} |" for k in e.get("B32single", {})]
    md += ["", "Wall time per probe (2 CPU cores): " + ", ".join(f"({p}) {s // 60} min {s % 60} s"
                                                                 for p, s in sorted(wall.items())) + "."]
    out.write_text("\n".join(md) + "\n")
if what not in ("ref", "report"):
    out.write_text(json.dumps(result, indent=1))
PY
}

probe_a() {  # stage 1 of every row, then its measurements and plots
  teacher
  for k in 8 16 32 64; do
    stage1 "S$k" "$S1_STEPS" --num-tokens $k "${S[@]}"; stage1 "B$k" "$S1_STEPS" --num-tokens $k "${B[@]}"
  done
  measure ref ref_stats.npz - VQ64  # FID statistics of the held-out images, once
  measure recon a.json a.png S8 S16 S32 S64 B8 B16 B32 B64
}
curve() {  # CURVE=1: the extreme rows, S-8 and B-64, to CURVE_STEPS: does their order hold beyond S1_STEPS?
  stage1 S8long "$CURVE_STEPS" --num-tokens 8 "${S[@]}" --eval-every $(( CURVE_STEPS / 16 ))
  stage1 B64long "$CURVE_STEPS" --num-tokens 64 "${B[@]}" --eval-every $(( CURVE_STEPS / 16 ))
  stage1 B32long "$CURVE_STEPS" --num-tokens 32 "${B[@]}" --eval-every $(( CURVE_STEPS / 16 ))  # does 64 pass 32?
  measure curve curve.json curve.png S8long B32long B64long
}
probe_b() {  # the training images and their flipped copies (train_gen.py's tokens) -> the 1,000 held out
  for k in 8 16 32 64; do
    python train_gen.py tokenize --tokenizer "$P/B$k/tokenizer.pt" --out "$P/B$k/tokens" "${DATA[@]}" \
      | grep -v "^tokenize:" || true
  done
  measure linear b.json - B8 B16 B32 B64
}
probe_c() {  # (after d, which trains G64 on B64's two stages)
  measure recon c.json c.png B64s2 VQ64
  SAMPLE_FLAGS=(); gen VQ64 GVQ64
}
probe_d() {  # the B rows' stage 2 (decoder fine-tuning: they draw pixels), a generator on each
  for k in 16 32 64; do stage2 "B${k}s2" "B$k" --num-tokens $k "${B[@]}"; done
  SAMPLE_FLAGS=(); gen B16s2 G16; gen B32s2 G32; gen B64s2 G64
  SAMPLE_FLAGS=(--mask-schedule cosine); gen B32s2 G32cos --mask-schedule cosine  # trained and sampled with it
}
probe_e() {  # single-stage (L2), as nested dropout needs a decoder of pixels from the first step
  tok B32single "$TOK_STEPS" --num-tokens 32 "${B[@]}" --warmup-steps 20
  tok B32nested "$TOK_STEPS" --num-tokens 32 --nested-dropout 0.5 "${B[@]}" --warmup-steps 20
  measure prefix e.json e.png B32single B32nested
}
SAMPLE_FLAGS=()
timed a probe_a; timed b probe_b; timed d probe_d; timed c probe_c; timed e probe_e
if [ "${CURVE:-0}" = 1 ]; then timed curve curve; fi
measure report results.md -
cat "$P/results.md"

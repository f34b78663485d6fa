#!/usr/bin/env bash
# What CPU runs cannot show, on a machine with CUDA (run by hand; pytest does not collect it):
# the GPU's name, the benchmarks with --device cuda, one torchrun step of each trainer with NCCL
# (device binding, the run-folder check, DDP), and 1,000 samples into an .npz, with images/s per
# stage. About 5 minutes on one H100; write the figures into docs/benchmarks.md.
#
#   bash tests/gpu_check.sh            # into /tmp/gpu_check (OUT=... to choose)
#   NPROC=2 bash tests/gpu_check.sh    # two processes per trainer (needs two GPUs)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check} NPROC=${NPROC:-1}
rm -rf "$OUT" && mkdir -p "$OUT"
python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || { echo "error: no CUDA here" >&2; exit 1; }
python -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"

echo "== benchmarks (--device cuda)"
python tests/bench_tokenizer.py --preset titok_l32 --device cuda --batch-size 32
python tests/bench_sample.py --preset titok_l32 --device cuda --batch-size 32
python tests/bench_train_tok.py --preset titok_s128 --device cuda --batch-size 32
python tests/bench_train_gen.py --preset titok_l32 --device cuda --batch-size 128
python tests/bench_fid.py --device cuda --batch-size 50 200

echo "== torchrun with NCCL: $NPROC process(es) per trainer, the tiny presets on data/"
RUN=(torchrun --standalone --nproc_per_node="$NPROC")
T0=$SECONDS
"${RUN[@]}" train_tok.py --recipe vqgan --out "$OUT/vqgan" --max-steps 20 --eval-size 100 --batch-size 64
"${RUN[@]}" train_tok.py --recipe stage1 --vqgan "$OUT/vqgan" --out "$OUT/stage1" --max-steps 20 --eval-size 100 --batch-size 64
"${RUN[@]}" train_tok.py --recipe stage2 --init "$OUT/stage1" --vqgan "$OUT/vqgan" --out "$OUT/tok" --max-steps 20 \
  --eval-size 100 --batch-size 64 --disc-start 0
"${RUN[@]}" train_gen.py --tokenizer "$OUT/tok" --tokens "$OUT/tokens" --out "$OUT/gen" --max-steps 20 --eval-size 100 \
  --batch-size 256 --dtype bf16
"${RUN[@]}" train_tok.py --recipe stage1 --vqgan "$OUT/vqgan" --out "$OUT/stage1" --resume --max-steps 30 \
  --eval-size 100 --batch-size 64   # resume: every rank reads the checkpoint (memory-mapped)
echo "trainers: $((SECONDS - T0)) s"

echo "== sampling 1,000 images"
"${RUN[@]}" sample.py --ckpt "$OUT/gen" --tokenizer "$OUT/tok" --num-samples 1000 --batch-size 250 --npz "$OUT/s.npz"
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for run in ("vqgan", "stage1", "tok", "gen"):
    last = [json.loads(s) for s in (out / run / "log.jsonl").read_text().splitlines()][-1]
    speed = {k: v for k, v in last.items() if k.endswith("_per_s")}
    print(f"{run}: step {last['step']}, loss {last['loss']:.4g}, {speed}")
s = json.loads((out / "s.json").read_text())
print(f"sampling: {1000 / s['wall_s']:.1f} images/s over {s['processes']} process(es), chip {s['chip']}")
PY

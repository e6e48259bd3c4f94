#!/usr/bin/env bash
# Training at production scale on a lent GPU (issue 36), sized for the device's 10-minute calls:
#   PARTS=scale  FREEDOM's epoch at 1m (against this project's 2-core figure of 264 s), and at 5m
#                FREEDOM's epoch and LightGCN's epoch plus the evaluation of every user, each
#                with its peak GPU memory (bench_scale.py --device cuda);
#   PARTS=tta    time to accuracy at 200k: the packaged defaults against 16 steps per epoch,
#                each run cut after TTA_RUN_S seconds (bench_large_batch.py --device cuda;
#                its JSON and table are rewritten after each run, so a timeout keeps the first).
# One part per call (PARTS=scale by default): each is sized to one. Everything is generated on the
# machine (nothing large is carried) and lands in $OUT. Run from the repository root; needs
# torch with CUDA and torch-geometric (no ONNX Runtime).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/gpu-scale-out}"
WORK="${WORK:-/tmp/scale}"
mkdir -p "$OUT" "$WORK"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, torch_geometric, platform; print(platform.platform(), \
platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0), 'torch_geometric', torch_geometric.__version__)" \
    | tee "$OUT/versions.txt"
cd benchmarks
for part in ${PARTS:-scale}; do
  start=$(date +%s)
  case "$part" in
    scale)
      timeout "${SCALE_LIMIT_S:-540}" python3 bench_scale.py --device cuda --sizes 1m 5m \
          --work "$WORK" --eval-users 10000000 \
          --skip 1m:item_graph 1m:lightgcn 1m:topk 5m:item_graph 5m:topk \
          --out "$OUT/scale_cuda" 2>&1 | tee "$OUT/scale.log" ;;
    tta)
      python3 -c "import json; from pathlib import Path; from bench_scale import SIZES, generate
d = Path('$WORK/200k/scale200k')  # as bench_scale.py lays it out, so either reuses it
if not (d / 'generated.json').exists():
    (d / 'generated.json').write_text(json.dumps(generate(d, *SIZES['200k'])))"
      timeout "${TTA_LIMIT_S:-540}" python3 bench_large_batch.py --device cuda \
          --data "$WORK/200k/scale200k" --max-wall-s "${TTA_RUN_S:-180}" \
          --variant "none16:steps_per_epoch=16,eval_users=5000" \
          --out "$OUT/large_batch_200k_cuda" 2>&1 | tee "$OUT/tta.log" ;;
    *) echo "unknown part $part (scale, tta)"; exit 2 ;;
  esac
  echo "part $part rc=${PIPESTATUS[0]} wall $(( $(date +%s) - start )) s" | tee -a "$OUT/parts.log"
done

#!/usr/bin/env bash
# One call on a lent GPU machine: FREEDOM trained on Baby on cuda end to end (accuracy beside the
# CPU figure in README), then the whole GPU suite. Run from the repository root with the shared
# data and tokenizer carried in .devshared/ (the machine has no ../shared) and onnxruntime-gpu
# installed (BENCHMARKS.md, "GPU suite"). Everything lands in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -e ../shared ] || ln -s "$PWD/.devshared" ../shared
[ -e cliper_prod/presets ] || ln -s ../models cliper_prod/presets  # what the wheel maps, for PYTHONPATH=.
# the fast-decode extra (simplejpeg) where a cp312 wheel was carried in .devshared/wheels/: the
# machine reaches no package index
ls .devshared/wheels/*.whl > /dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps \
    .devshared/wheels/*.whl
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 - > "$OUT/versions.txt" 2>&1 <<'PY'
import platform, torch, onnxruntime, transformers, onnx, torch_geometric
print(platform.platform(), platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
print("transformers", transformers.__version__, "onnx", onnx.__version__,
      "torch_geometric", torch_geometric.__version__)
PY
cat "$OUT/versions.txt"
python3 -m cliper_prod random-features --data ../shared/data/amazon/baby --out /tmp/baby-random
start=$(date +%s)
timeout "${TRAIN_LIMIT_S:-180}" python3 -m cliper_prod train --backbone freedom --data /tmp/baby-random \
    --out /tmp/freedom-cuda --device cuda --quiet > "$OUT/train_cuda.log" 2>&1
echo "train rc=$? wall $(( $(date +%s) - start )) s" | tee -a "$OUT/train_cuda.log"
tail -4 "$OUT/train_cuda.log"
cp /tmp/freedom-cuda/metrics.json "$OUT/train_cuda_metrics.json" 2>/dev/null
cd benchmarks && timeout "${SUITE_LIMIT_S:-420}" python3 gpu_suite.py --out "$OUT" 2>&1 | tee "$OUT/suite.log" | grep -v Warning

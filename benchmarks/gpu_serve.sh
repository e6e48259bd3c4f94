#!/usr/bin/env bash
# One call on a lent GPU machine: `cliper-prod serve --engine local` on ONNX Runtime's CUDA
# provider vs its CPU provider, same machine, same bundle (1M items x 64, 100k users, random
# tables), /topk load test side by side (benchmarks/load_serve.py --devices cuda cpu). Run from
# the repository root with onnxruntime-gpu installed and sourced (/tmp/ortenv.sh, BENCHMARKS.md
# "GPU suite") and the serving wheels the image lacks carried in .whl/ (README of the device
# tool: fastapi, starlette, pydantic, pydantic-core, annotated-types, typing-inspection,
# uvicorn, orjson, httptools for Python 3.12). Everything lands in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -e cliper_prod/presets ] || ln -s ../models cliper_prod/presets  # what the wheel maps
python3 - <<'PY'
import time
from pathlib import Path

import numpy as np
import torch

from cliper_prod.export.bundle_writer import EmbeddingTables, export_tables

rng = np.random.default_rng(0)
n_users, n_items, dim = 100_000, 1_000_000, 64
pairs = np.stack([np.repeat(np.arange(n_users), 10), rng.integers(0, n_items, n_users * 10)], 1)
pairs = np.unique(pairs, axis=0)
start = time.perf_counter()
export_tables(EmbeddingTables(torch.from_numpy(rng.standard_normal((n_users, dim), np.float32)),
                              torch.from_numpy(rng.standard_normal((n_items, dim), np.float32)),
                              pairs), Path("/tmp/bundle-1m"))
print(f"bundle of {n_users:,} users x {n_items:,} items exported in "
      f"{time.perf_counter() - start:.0f} s", flush=True)
PY
cd benchmarks && python3 load_serve.py --bundle /tmp/bundle-1m --engines local \
    --devices cuda cpu --batching on --requests "${REQUESTS:-2000}" \
    --max-seconds "${LEVEL_S:-8}" --out "$OUT/serve_gpu"

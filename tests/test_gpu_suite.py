"""The GPU suite runs every part at tiny sizes on the CPU, so it cannot rot between GPU runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke_runs_every_part(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "gpu_suite.py", "--smoke", "--out", str(tmp_path)],
                         cwd=REPO / "benchmarks", capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "suite.json").read_text())
    assert result["smoke"] is True and "torch" in result["machine"]
    per_device = result["training"]["per_device"]
    assert set(per_device) == {"cpu"} and len(per_device["cpu"]["train_epoch_s"]) == 1
    rows = {(row["graph"], row["inputs"]): row for row in result["towers"]}
    assert set(rows) == {(g, i) for g in ("image_encoder", "text_fusion")
                         for i in ("device", "host")}
    for row in rows.values():
        assert {"ort_fp32", "ort_fp16", "torch_eager_fp16", "torch_compile_fp16"} <= set(row)
        assert all(v > 0 for k, v in row.items() if k not in ("graph", "batch", "inputs"))
    assert {"ort_uint8.fp32", "ort_uint8.fused.fp16"} <= set(rows["image_encoder", "host"])
    assert {"ort_fused.masked.fp32", "ort_fused.masked.fp16"} <= set(rows["text_fusion", "device"])
    profile = result["profile"]["paths"]
    for label in ("image_encoder ort fused.fp16", "text_fusion ort fused.fp16",
                  "text_fusion ort fused.masked.fp16"):
        assert not [k for k in profile[label] if k.endswith("_error")]
        assert profile[label]["ort_ops_ms"]["Attention"] > 0
    assert set(result["profile"]["attention_kernels"]) == set(profile) - {
        "image_encoder torch eager fp16", "text_fusion torch eager fp16"}  # none named on a CPU
    assert len(list(tmp_path.glob("ort_profile_*.json"))) == 3
    embed = result["embed"]
    assert embed["items_per_s"] > 0 and embed["ratio_to_towers_alone"] > 0
    assert embed["startup_s"] > 0 and set(embed["stages"]) == {
        "wall_s", "read_s_one_thread", "decode_s_one_thread", "tokenise_s", "graph_s",
        "transfer_s_alone"}
    rows = result["topk"]["rows"]
    assert [(r["items"], r["batch"]) for r in rows] == [(n, b) for n in (2000, 5000)
                                                        for b in (1, 4, 32)]
    for row in rows:  # every path timed, faiss-cpu included (a test dependency)
        assert {"ort_cpu_form", "ort_gpu_form", "ort_gpu_form_2_blocks", "torch_topk_fp32",
                "torch_topk_fp16", "faiss_flat_ip"} <= set(row) and not row["skipped"]
        assert row["gpu_form_recall_vs_cpu_form"] == 1.0
    table = (tmp_path / "suite.md").read_text()
    assert "(a) FREEDOM | cpu" in table and "SMOKE run" in table

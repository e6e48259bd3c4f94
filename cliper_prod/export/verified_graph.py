"""One module -> its ONNX graph (fp32, fp16, int8, the optimizer's fused variant) and
TorchScript twin, each verified against PyTorch before the bundle lists it.

Every graph of a bundle goes through :func:`export_graph`; its manifest record holds the files,
their IO specs, the parity figures and, for a fused variant and the int8 twins, the CPU latency
that picks them.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from cliper_prod.bundle_format import FUSED, INT8, PLAIN, file_key, graph_file
from cliper_prod.export.graphs import (DEFAULT_OPSET, INT8_QUANTIZATION, GraphSpec,
                                       export_onnx, export_torchscript, feeds, optimize_clip,
                                       to_fp16, to_int8, torch_outputs, verify)
from cliper_prod.export.parity import FP16_BOUND, FP32_BOUND, INT8_BOUND, parity, within

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphOptions:
    """How the graphs are written, for every graph of a bundle.

    Attributes:
        max_k: most items per user the top-K graph returns (``topk -k`` may ask for fewer).
        chunk_items: items the top-K graph scores at a time (bounds its memory to batch x chunk).
        opset: ONNX opset of every graph.
        fp16: also write fp16 variants of the CLIP graphs.
        torchscript: also write TorchScript twins.
        fused: also write the CLIP graphs as rewritten by ONNX Runtime's transformer optimizer
            (fused attention, SkipLayerNormalization, QuickGelu), each precision, with their
            CPU latency beside the plain graphs' (the runtime's choice, see export/README.md).
        gpu_form: also write the top-K graph's GPU form (:class:`CandidateTopKScorer`), with
            its CPU latency beside the CPU form's at 1, 8 and 64 users.
        candidates: items the GPU form re-scores in fp32 (None: ``max(4 * max_k, 2048)``).
        candidate_blocks: blocks the GPU form chooses its candidates in (1: one level; more:
            two levels, more parallel work for a GPU's per-row TopK, more work on the CPU).
        uint8: also write a uint8-pixel twin of each image graph file (export/pixels.py); each
            twin holds a full copy of its graph's weights, so the image graphs take twice the
            disk.
        int8: also write dynamically quantised int8 twins of the CLIP graphs (each variant),
            kept only within :data:`~.graphs.INT8_BOUND` of PyTorch, with their CPU latency
            beside fp32's (``auto`` runs them on the CPU only where they measured faster).
    """

    max_k: int = 100
    chunk_items: int = 1 << 16
    opset: int = DEFAULT_OPSET
    fp16: bool = True
    torchscript: bool = True
    fused: bool = True
    gpu_form: bool = True
    candidates: int | None = None
    candidate_blocks: int = 1
    uint8: bool = True
    int8: bool = True


def _io_spec(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and shapes of a graph's inputs and outputs, read from the file itself."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values) -> list[dict[str, Any]]:
        return [{"name": v.name,
                 "dtype": onnx.helper.tensor_dtype_to_np_dtype(
                     v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}
                for v in values]
    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output),
            "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))}


def _ort_run(path: Path, spec: GraphSpec):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda: session.run(None, feeds(spec))


def _script_run(path: Path, spec: GraphSpec):
    module = torch.jit.load(str(path))

    def run() -> list[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in _as_tuple(module(*spec.check))]
    return run


def _as_tuple(out: Any) -> tuple:
    return out if isinstance(out, tuple) else (out,)


CPU = "CPUExecutionProvider"
LATENCY_RUNS = 5  # timed runs of the verification batch per graph (after one warm-up)


def export_graph(spec: GraphSpec, folder: Path, options: GraphOptions, *, fp16: bool,
                  extra_check=lambda outs: None, fused: nn.Module | None = None,
                  int8: bool = False) -> dict[str, Any]:
    """Export one module in every requested form and verify each against PyTorch.

    ``fused``: the same module with eager attention, exported and optimized for the fused
    variant, which is verified against the same reference and timed against the plain one.
    ``int8``: int8 twins of each variant (:func:`verified_onnx`), timed against fp32.
    """
    reference = torch_outputs(spec)
    fp32 = folder / graph_file(spec.name)
    export_onnx(spec, fp32, options.opset)
    record: dict[str, Any] = {**_io_spec(fp32), "files": {}, "parity": {}}
    if spec.external_data:  # the exporter's name for it; hashed with every other file
        record["external_data"] = f"{fp32.name}.data"
    if int8:
        record[INT8] = {**INT8_QUANTIZATION, "bound": INT8_BOUND, "written": True}
    runs = {PLAIN: verified_onnx(spec, fp32, PLAIN, reference, fp16, extra_check, record)}
    if fused is not None:
        path = folder / graph_file(spec.name, variant=FUSED)
        config = fused.config
        with tempfile.TemporaryDirectory() as tmp:
            eager = Path(tmp) / path.name
            export_onnx(replace(spec, module=fused), eager, options.opset)
            ops = optimize_clip(eager, path, config.num_hidden_layers,
                                config.num_attention_heads, config.hidden_size,
                                causal=fused.causal_attention)
        runs[FUSED] = verified_onnx(spec, path, FUSED, reference, fp16, extra_check, record)
        record[FUSED] = {"attn_implementation": "eager", "optimizer": "onnxruntime.transformers "
                         "optimize_model(model_type='clip', opt_level=0)",
                         "layers": config.num_hidden_layers, "ops": ops,
                         "causal_attention": fused.causal_attention, **preference(runs)}
        log.info("%s: fused %s; CPU prefers %s", spec.name, ops, record[FUSED]["preferred"][CPU])
    if record.get(INT8, {}).get("written"):
        record[INT8] |= preference({precision: {variant: by_precision[precision]
                                                for variant, by_precision in runs.items()}
                                    for precision in ("fp32", INT8)})
        log.info("%s: int8 worst cosine %s; CPU prefers %s", spec.name,
                 record["parity"]["onnx_int8"]["min_cosine"], record[INT8]["preferred"][CPU])
    if options.torchscript:
        script = folder / graph_file(spec.name, kind="pt")
        export_torchscript(spec, script)
        record["files"]["torchscript"] = script.name
        record["parity"]["torchscript"] = verify(script.name, reference,
                                                 _script_run(script, spec), FP32_BOUND,
                                                 extra_check)
    return record


def verified_onnx(spec: GraphSpec, fp32: Path, variant: str, reference, fp16: bool,
                   extra_check, record: dict[str, Any]) -> dict[str, Callable]:
    """Verify ``fp32`` (and its fp16 twin, written here), list both in ``record``; their runs.
    With ``record[INT8]`` written so far (:func:`export_graph`), an int8 twin too: one that
    misses :data:`INT8_BOUND` is deleted and its graph's int8 record says so (int8 is a speed
    option; the export goes on without it)."""
    runs = {"fp32": _ort_run(fp32, spec)}
    checks = [("fp32", fp32, FP32_BOUND, extra_check)]
    if fp16:
        half = fp32.with_name(graph_file(spec.name, "fp16", variant=variant))
        to_fp16(fp32, half)
        runs["fp16"] = _ort_run(half, spec)
        checks.append(("fp16", half, FP16_BOUND, lambda outs: None))
    if record.get(INT8, {}).get("written"):
        quantized = fp32.with_name(graph_file(spec.name, INT8, variant=variant))
        to_int8(fp32, quantized)
        runs[INT8] = _ort_run(quantized, spec)
        stats = parity(reference, runs[INT8]())
        if within(stats, INT8_BOUND):
            checks.append((INT8, quantized, INT8_BOUND, lambda outs: None))
        else:
            log.warning("%s: int8 %s misses its bound (%s, bound %s): no int8 twins", spec.name,
                        variant, stats, INT8_BOUND)
            record[INT8] = {**record[INT8], "written": False, "missed": {variant: stats}}
            for key in [k for k in record["files"] if k.endswith(INT8)]:
                (fp32.parent / record["files"].pop(key)).unlink()
                record["parity"].pop(f"onnx_{key.replace('.', '_')}")
            quantized.unlink()
            del runs[INT8]
    for precision, path, bound, check in checks:
        key = file_key(precision, variant)
        record["files"][key] = path.name
        record["parity"][f"onnx_{key.replace('.', '_')}"] = verify(path.name, reference,
                                                                    runs[precision], bound, check)
    return runs


def preference(runs: dict[str, dict[str, Callable]]) -> dict[str, Any]:
    """Median CPU latency of each variant per precision (or any other key: the top-K forms are
    keyed by batch size, the int8 record's precisions by variant), interleaved; the faster is
    preferred."""
    latency: dict[str, dict[str, float]] = {}
    for precision in [p for p in next(iter(runs.values()))
                      if all(p in by_key for by_key in runs.values())]:
        variants = {variant: by_precision[precision] for variant, by_precision in runs.items()}
        times: dict[str, list[float]] = {variant: [] for variant in variants}
        for run in variants.values():
            run()  # warm-up
        for _ in range(LATENCY_RUNS):
            for variant, run in variants.items():
                start = time.perf_counter()
                run()
                times[variant].append(time.perf_counter() - start)
        latency[precision] = {v: round(1e3 * statistics.median(t), 4) for v, t in times.items()}
    return {"latency_ms": {CPU: latency},
            "preferred": {CPU: {p: min(ms, key=ms.get) for p, ms in latency.items()}}}

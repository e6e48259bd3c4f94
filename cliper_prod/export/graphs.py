"""One torch module -> one ONNX file (fp32, optional fp16 twin) and its TorchScript twin.

Graphs are exported with torch's dynamo-based ONNX exporter (batch dimension dynamic), checked
with ``onnx.checker`` and then compared with the PyTorch module on a sample batch through ONNX
Runtime; export fails loudly when parity misses the bounds below. CLIP graphs can also be
rewritten by ONNX Runtime's transformer optimizer (:func:`optimize_clip`).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from cliper_prod.errors import ExportError
from cliper_prod.export.parity import parity, within
from cliper_prod.messages import first_line

#: How the int8 twins are quantised (recorded in the manifest): weights int8 per output
#: channel, activations quantised per run (no calibration data needed); MatMul/Gemm are every
#: projection and MLP. The fused graphs' Attention op is left in fp32: its quantised form
#: (QAttention) breaks the masked text attention (cosine -0.94 on the test CLIP) and was no
#: faster on the image tower (ViT-B/16, batch 8).
INT8_QUANTIZATION = {"method": "onnxruntime.quantization.quantize_dynamic",
                     "op_types": ["MatMul", "Gemm"], "per_channel": True,
                     "weight_type": "QInt8"}
DEFAULT_OPSET = 18
#: Ops counted in an optimized graph: the fusions' products and what they replace.
FUSED_OPS = ("Attention", "SkipLayerNormalization", "LayerNormalization", "QuickGelu", "Gelu",
             "FastGelu", "BiasGelu")
MASK = "attention_mask"  # the only name under which the CLIP attention fusion takes a mask


@dataclass(frozen=True)
class GraphSpec:
    name: str
    module: nn.Module
    sample: tuple[torch.Tensor, ...]  # traced with these; batch dimension made dynamic
    check: tuple[torch.Tensor, ...]  # compared on these (another batch size)
    input_names: Sequence[str]
    output_names: Sequence[str]
    #: name of each input's dynamic first dimension (default: all ``batch``)
    dims: Sequence[str] | None = None
    #: initializers in ``<file>.data`` beside the graph (no 2 GB protobuf limit)
    external_data: bool = False
    #: TorchScript by ``torch.jit.script`` (keeps loops loops) instead of tracing
    script: bool = False


def export_onnx(spec: GraphSpec, path: Path, opset: int = DEFAULT_OPSET) -> None:
    names = spec.dims or ["batch"] * len(spec.sample)
    dims = {name: torch.export.Dim(name, min=1, max=1 << 20) if name == "batch" else
            torch.export.Dim(name, min=0, max=1 << 40) for name in set(names)}
    dynamic = tuple({0: dims[name]} for name in names)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    # the Scan of the top-K graph has empty axis lists, which onnx_ir rightly types as INTS
    logging.getLogger("onnx_ir._convenience").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(spec.module, spec.sample, str(path), dynamo=True,
                              input_names=list(spec.input_names),
                              output_names=list(spec.output_names), dynamic_shapes=dynamic,
                              opset_version=opset, external_data=spec.external_data,
                              verbose=False)
        except Exception as exc:  # the exporter raises many types; the cause matters
            raise ExportError(f"{spec.name}: ONNX export failed: {exc.__class__.__name__}: "
                              f"{first_line(exc)}") from exc
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path.name}: onnx.checker rejected the graph: {exc}") from None


def to_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and compute, fp32 inputs and outputs (the runtime feeds the same arrays)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = OnnxModel(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True))
        model.topological_sort()  # the converter appends its input casts at the end
    onnx.save(model.model, str(dst))
    onnx.checker.check_model(str(dst), full_check=True)


def to_int8(src: Path, dst: Path) -> None:
    """``src`` dynamically quantised to int8 (:data:`INT8_QUANTIZATION`); inputs and outputs
    stay float32, so the runtime feeds the same arrays."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    settings = INT8_QUANTIZATION
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process calibration data does not apply
    try:
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=settings["op_types"],
                         per_channel=settings["per_channel"],
                         weight_type=getattr(QuantType, settings["weight_type"]))
    finally:
        root.setLevel(level)
    onnx.checker.check_model(str(dst), full_check=True)


def optimize_clip(src: Path, dst: Path, layers: int, heads: int, hidden: int,
                  causal: bool = False) -> dict[str, int]:
    """ONNX Runtime's CLIP fusions (``optimize_model(model_type="clip")``) on ``src`` -> ``dst``;
    returns the counts of :data:`FUSED_OPS`.

    ``causal``: ``src``'s one additive mask is CLIP's causal mask alone (a text tower exported
    without its padding mask, :class:`~cliper_prod.features.clip_towers.TextTower`); each fused
    Attention then drops it as its bias and is marked ``unidirectional``: the same
    computation, in the form for which ONNX Runtime's CUDA attention (in its source) runs
    fp16 through the memory-efficient kernel, which takes a bias only over a length that is a
    multiple of 8 (77 is not). The mask's nodes go with it. The parity check vouches for it.

    The optimizer skips what it does not recognise without a word, so this fails unless each of
    the ``layers`` encoder layers became one fused Attention node. ``src`` must come from an
    eager-attention module (SDPA exports match no attention pattern). Two adaptations to the
    dynamo export: symbolic shape inference is off (it stops at the fusion head's opset-18
    ReduceL2, and without it neither SkipLayerNormalization nor attention fuse; the parity
    check vouches for the result), and the text encoder's additive causal+padding mask is named
    ``attention_mask`` while the optimizer runs, the one name under which it takes a mask.
    """
    import onnx
    import onnxruntime
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model = onnx.load(str(src))
    inputs = [copy.deepcopy(i) for i in model.graph.input]
    mask = _additive_mask(model)
    if mask is not None:
        _rename(model, {MASK: f"{MASK}.input", mask: MASK})
    options = FusionOptions("clip")
    options.enable_shape_inference = False
    quiet = logging.getLogger().manager.disable
    logging.disable(logging.WARNING)  # the optimizer's module loggers warn about shape inference
    try:
        optimized = optimize_model(model, model_type="clip", num_heads=heads, hidden_size=hidden,
                                   opt_level=0, optimization_options=options)
    except Exception as exc:  # the optimizer raises many types; the cause matters
        raise ExportError(f"{dst.name}: ONNX Runtime's optimizer failed: "
                          f"{exc.__class__.__name__}: {first_line(exc)}") from exc
    finally:
        logging.disable(quiet)
    if mask is not None:
        _rename(optimized.model, {MASK: mask, f"{MASK}.input": MASK})
    counts = Counter(node.op_type for node in optimized.model.graph.node)
    ops = {op: counts[op] for op in FUSED_OPS}
    if ops["Attention"] != layers:
        raise ExportError(f"{dst.name}: ONNX Runtime's optimizer fused {ops['Attention']} of "
                          f"{layers} attention layers (ops: {ops}); onnxruntime "
                          f"{onnxruntime.__version__} does not match this graph's attention: "
                          f"export without the fused graphs (--no-fused)")
    if causal:
        _causal_attention(optimized, mask, dst.name)
    # the optimizer prunes an input nothing reads (the padding mask of a causal graph): the
    # runtime feeds both variants the same inputs, so a pruned one is declared again
    kept = {i.name: copy.deepcopy(i) for i in optimized.model.graph.input}
    source = {i.name for i in inputs}
    optimized.model.graph.ClearField("input")
    optimized.model.graph.input.extend([kept.get(i.name, i) for i in inputs]
                                       + [i for name, i in kept.items() if name not in source])
    optimized.save_model_to_file(str(dst))
    onnx.checker.check_model(str(dst), full_check=True)
    return ops


def _causal_attention(optimized, mask: str | None, name: str) -> None:
    """Each fused Attention without its bias (``mask``, the causal mask) and unidirectional;
    the nodes that computed the mask pruned."""
    import onnx

    attention = [n for n in optimized.model.graph.node if n.op_type == "Attention"]
    if mask is None or any(len(n.input) < 6 or n.input[5] != mask for n in attention):
        raise ExportError(f"{name}: the causal form needs every fused Attention to take the "
                          f"graph's one additive mask as its bias; it does not")
    for node in attention:
        node.input[5] = ""  # the slot stays: an input after it keeps its index
        while node.input and not node.input[-1]:  # optional inputs left empty at the end
            node.input.pop()
        others = [a for a in node.attribute if a.name != "unidirectional"]
        node.ClearField("attribute")
        node.attribute.extend([*others, onnx.helper.make_attribute("unidirectional", 1)])
    optimized.prune_graph(allow_remove_graph_inputs=False)  # same inputs as the plain graph


def _additive_mask(model) -> str | None:
    """The one tensor every attention softmax adds to its scores, if there is one."""
    producer = {out: node for node in model.graph.node for out in node.output}
    masks = {producer[n.input[0]].input[1] for n in model.graph.node
             if n.op_type == "Softmax" and n.input[0] in producer
             and producer[n.input[0]].op_type == "Add"}
    return masks.pop() if len(masks) == 1 else None


def _rename(model, names: dict[str, str]) -> None:
    """Rename tensors everywhere in the graph, all at once (so names may swap)."""
    for node in model.graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        value.name = names.get(value.name, value.name)


def export_torchscript(spec: GraphSpec, path: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        module = (torch.jit.script(spec.module) if spec.script else
                  torch.jit.trace(spec.module, spec.sample, check_trace=False))
        module.save(str(path))


def verify(name: str, reference: Sequence[np.ndarray], run: Callable[[], Sequence[np.ndarray]],
           bound: dict[str, Any], extra_check: Callable[[Sequence[np.ndarray]], str | None]
           = lambda outs: None) -> dict[str, float]:
    """Parity of one exported graph against the PyTorch outputs; raise when it misses."""
    got = run()
    stats = parity(reference, got)
    problem = extra_check(got)
    if problem or not within(stats, bound):
        raise ExportError(f"{name}: parity with PyTorch missed: {problem or stats} "
                          f"(bound {bound})")
    return stats


def torch_outputs(spec: GraphSpec) -> list[np.ndarray]:
    with torch.no_grad():
        out = spec.module(*spec.check)
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def feeds(spec: GraphSpec) -> dict[str, np.ndarray]:
    return {n: t.numpy() for n, t in zip(spec.input_names, spec.check)}

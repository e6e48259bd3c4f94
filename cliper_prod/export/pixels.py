"""uint8-input twins of the exported image graph: normalisation moved into the graph.

A batch of 256 224x224 images is 38 MB as uint8 and 154 MB as float32; with the scaling and
the mean/std inside the graph the host hands the device the smaller array. The twin is the
verified graph file with a prologue (Cast, Mul by 1/255, Sub mean, Div std, all float32, in the
order :meth:`ClipImagePreprocessor.normalise` uses on the host) feeding its old input, so it
exists for every plain/fused graph and precision, and is verified against PyTorch like them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cliper_prod.bundle_format import UINT8, UINT8_INPUT, uint8_key
from cliper_prod.export.graphs import GraphSpec, torch_outputs, verify
from cliper_prod.export.parity import BOUNDS
from cliper_prod.features.image_preprocess import ClipImagePreprocessor

PARITY_IMAGES = 5  # random uint8 images the twins are verified on


def with_uint8_input(src: Path, dst: Path, mean: Sequence[float], std: Sequence[float]) -> None:
    """Write ``src`` (one float32 pixel input [B, 3, H, W]) as a graph taking uint8 pixels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    (old,) = graph.input
    new = onnx.ValueInfoProto()
    new.CopyFrom(old)
    new.name = UINT8_INPUT
    new.type.tensor_type.elem_type = TensorProto.UINT8
    prefix = f"{UINT8}_prologue"
    constants = {"scale": np.float32(1 / 255),
                 "mean": np.asarray(mean, np.float32).reshape(1, 3, 1, 1),
                 "std": np.asarray(std, np.float32).reshape(1, 3, 1, 1)}
    graph.initializer.extend(numpy_helper.from_array(np.asarray(v), f"{prefix}.{k}")
                             for k, v in constants.items())
    steps = [("Cast", [UINT8_INPUT], {"to": TensorProto.FLOAT}), ("Mul", ["scale"], {}),
             ("Sub", ["mean"], {}), ("Div", ["std"], {})]
    nodes, last = [], None
    for i, (op, args, attrs) in enumerate(steps):
        inputs = args if last is None else [last, *(f"{prefix}.{a}" for a in args)]
        last = old.name if i == len(steps) - 1 else f"{prefix}.{op.lower()}"
        nodes.append(helper.make_node(op, inputs, [last], name=f"{prefix}.{op}", **attrs))
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + body)
    graph.input.remove(old)
    graph.input.insert(0, new)
    onnx.save(model, str(dst))
    onnx.checker.check_model(str(dst), full_check=True)


def add_uint8_twins(spec: GraphSpec, folder: Path, record: dict[str, Any],
                    preprocess: ClipImagePreprocessor) -> None:
    """A uint8 twin of each ONNX file in ``record`` (the image graph's), written to ``folder``,
    listed in ``record["files"]`` under :func:`uint8_key` and verified against the PyTorch
    tower on the same pixels normalised on the host."""
    import onnxruntime as ort

    size = preprocess.crop
    pixels = np.random.default_rng(0).integers(0, 256, (PARITY_IMAGES, 3, size, size),
                                               dtype=np.uint8)
    reference = torch_outputs(replace(spec, check=(torch.from_numpy(
        preprocess.normalise(pixels)),)))
    for key, name in list(record["files"].items()):
        if key == "torchscript":
            continue
        variant, precision = key.split(".") if "." in key else ("plain", key)
        twin = folder / f"{spec.name}.{UINT8}.{name.removeprefix(spec.name + '.')}"
        with_uint8_input(folder / name, twin, preprocess.mean, preprocess.std)
        session = ort.InferenceSession(str(twin), providers=["CPUExecutionProvider"])
        bound = BOUNDS[precision]
        twin_key = uint8_key(precision, variant)
        record["files"][twin_key] = twin.name
        record["parity"][f"onnx_{twin_key.replace('.', '_')}"] = verify(
            twin.name, reference, lambda: session.run(None, {UINT8_INPUT: pixels}), bound)
    record[UINT8] = {"input": UINT8_INPUT, "dtype": "uint8",
                     "normalisation": "(x * float32(1/255) - mean) / std, float32, in the graph",
                     "mean": list(preprocess.mean), "std": list(preprocess.std)}

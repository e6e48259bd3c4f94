"""ONNX Runtime sessions with IO-bound execution (providers: :mod:`.providers`).

Every run goes through IO binding: inputs are bound from host memory and outputs are
allocated on the session's device, so on the GPU ORT copies each input once and keeps
intermediate tensors on the device; the same code path runs (and is tested) on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cliper_prod.errors import RuntimeSetupError
from cliper_prod.messages import first_line
from cliper_prod.runtime.providers import onnxruntime


class Graph:
    """One ONNX file, run with IO binding on its device."""

    def __init__(self, path: Path, providers: list[str]) -> None:
        ort = onnxruntime()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types, one per cause
            raise RuntimeSetupError(f"{path}: onnxruntime {ort.__version__} cannot load this "
                                    f"graph ({first_line(exc)}); re-export the bundle with a "
                                    f"supported opset or upgrade onnxruntime") from None
        self.path = path
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" \
            else "cpu"
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, **inputs: np.ndarray) -> list[np.ndarray]:
        binding = self.session.io_binding()
        for name in self.input_names:
            binding.bind_cpu_input(name, np.ascontiguousarray(inputs[name]))
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

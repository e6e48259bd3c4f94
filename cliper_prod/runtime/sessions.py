"""ONNX Runtime sessions: provider choice and IO-bound execution.

``auto`` picks the CUDA execution provider when onnxruntime-gpu sees a GPU, else the CPU.
Every run goes through IO binding: inputs are bound from host memory and outputs are
allocated on the session's device, so on the GPU ORT copies each input once and keeps
intermediate tensors on the device; the same code path runs (and is tested) on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cliper_prod.errors import RuntimeSetupError

DEVICES = ("auto", "cpu", "cuda")


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeSetupError("onnxruntime is not installed: pip install 'cliper-prod[runtime]' "
                                "(CPU) or 'cliper-prod[gpu]' (CUDA)") from None
    return onnxruntime


def choose_providers(device: str = "auto") -> list[str]:
    ort = _ort()
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise RuntimeSetupError(f"--device cuda: this onnxruntime ({ort.__version__}) has no "
                                f"CUDA provider (available: {available}); install "
                                f"'cliper-prod[gpu]' instead of the CPU runtime")
    if device not in DEVICES:
        raise RuntimeSetupError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda" or (device == "auto" and has_cuda):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Graph:
    """One ONNX file, run with IO binding on its device."""

    def __init__(self, path: Path, providers: list[str]) -> None:
        ort = _ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types, one per cause
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeSetupError(f"{path}: onnxruntime {ort.__version__} cannot load this "
                                    f"graph ({first}); re-export the bundle with a supported "
                                    f"opset or upgrade onnxruntime") from None
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

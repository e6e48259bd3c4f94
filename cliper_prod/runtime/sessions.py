"""ONNX Runtime sessions: provider choice and IO-bound execution.

``auto`` picks the CUDA execution provider when onnxruntime-gpu sees a GPU, else the CPU.
Every run goes through IO binding, outputs allocated on the session's device. On the CPU inputs
are bound from host memory. On CUDA each input is copied into a device buffer kept per input
name and shape (no allocation per batch) and bound there, and ORT's CPU threads do not spin
(they would take cores from the image decoders that feed the GPU). The CUDA branch is written
for a lent GPU; the CPU tests run its buffer code on a CPU session, not on a GPU. ORT's Python API offers no pinned
host allocator, so the host-to-device copy reads pageable memory; the uint8 image graph makes
that copy a quarter of the float32 one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def session_options(providers: list[str]):
    """ORT session options: full graph optimisation; with CUDA first, no CPU thread spinning."""
    ort = _ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if providers[0] == "CUDAExecutionProvider":
        for pool in ("intra_op", "inter_op"):
            options.add_session_config_entry(f"session.{pool}.allow_spinning", "0")
    return options


class Graph:
    """One ONNX file, run with IO binding on its device."""

    def __init__(self, path: Path, providers: list[str]) -> None:
        ort = _ort()
        options = session_options(providers)
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
        # CUDA: inputs copied into buffers on the device, bound there (on the CPU the host
        # arrays are bound as they are; a test turns this on for a CPU session)
        self.device_inputs = self.device == "cuda"
        self._on_device: dict[tuple[str, tuple[int, ...], str], Any] = {}

    def __call__(self, **inputs: np.ndarray) -> list[np.ndarray]:
        binding = self.session.io_binding()
        for name in self.input_names:
            array = np.ascontiguousarray(inputs[name])
            if self.device_inputs:
                binding.bind_ortvalue_input(name, self._device_copy(name, array))
            else:
                binding.bind_cpu_input(name, array)
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _device_copy(self, name: str, array: np.ndarray):
        """``array`` copied into this input's device buffer of its shape and dtype (allocated
        on first use; a catalog's batches share one shape but the last)."""
        key = (name, array.shape, array.dtype.str)
        buffer = self._on_device.get(key)
        if buffer is None:
            buffer = _ort().OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype,
                                                                  self.device, 0)
            self._on_device[key] = buffer
        buffer.update_inplace(array)
        return buffer

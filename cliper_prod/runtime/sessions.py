"""ONNX Runtime sessions with IO-bound execution (providers: :mod:`.providers`).

Every run goes through IO binding, outputs allocated on the session's device. On the CPU inputs
are bound from host memory. On CUDA each input is copied to the device per run (an OrtValue of
its own: concurrent runs of one session, as the service makes, share no buffer) and bound there,
and ORT's CPU threads do not spin (they would take cores from the image decoders that feed the
GPU). The CUDA branch is written for a lent GPU; the CPU tests run it on a CPU session, not on
a GPU. ORT's Python API offers no pinned host allocator, so the host-to-device
copy reads pageable memory; the uint8 image graph makes that copy a quarter of the float32 one.

Each session's thread pools are sized by :class:`OrtThreads` (ORT's own default, one intra-op
thread per core, unless set): N serving workers of one machine each take a share of its cores
(:func:`cores_per_worker`) rather than all of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cliper_prod.errors import RuntimeSetupError
from cliper_prod.messages import first_line
from cliper_prod.runtime.providers import onnxruntime


@dataclass(frozen=True)
class OrtThreads:
    """Thread pools of every session a bundle opens; 0 leaves ORT's default.

    Attributes:
        intra_op: threads that run one operator (a MatMul) in parallel.
        inter_op: threads that run independent operators side by side; more than 1 turns on
            ORT's parallel execution mode, the only mode that uses them.
    """

    intra_op: int = 0
    inter_op: int = 0

    def __post_init__(self) -> None:
        if self.intra_op < 0 or self.inter_op < 0:
            raise RuntimeSetupError(f"thread counts must be 0 (ORT's default) or more, got "
                                    f"intra-op {self.intra_op}, inter-op {self.inter_op}")


def cores_per_worker(workers: int) -> int:
    """Intra-op threads for each of ``workers`` processes sharing this process's CPUs: 0 (ORT's
    default) for one, else an equal share, at least 1."""
    if workers <= 1:
        return 0
    return max(1, len(os.sched_getaffinity(0)) // workers)


def session_options(providers: list[str], threads: OrtThreads = OrtThreads()):
    """ORT session options: full graph optimisation, ``threads``; with CUDA first, no CPU
    thread spinning."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = threads.intra_op
    options.inter_op_num_threads = threads.inter_op
    if threads.inter_op > 1:
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    if providers[0] == "CUDAExecutionProvider":
        for pool in ("intra_op", "inter_op"):
            options.add_session_config_entry(f"session.{pool}.allow_spinning", "0")
    return options


class Graph:
    """One ONNX file, run with IO binding on its device."""

    def __init__(self, path: Path, providers: list[str], threads: OrtThreads = OrtThreads()
                 ) -> None:
        ort = self._ort = onnxruntime()
        options = session_options(providers, threads)
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
        # CUDA: inputs copied to the device and bound there (on the CPU the host arrays are
        # bound as they are; a test turns this on for a CPU session)
        self.device_inputs = self.device == "cuda"

    def __call__(self, **inputs: np.ndarray) -> list[np.ndarray]:
        binding = self.session.io_binding()
        for name in self.input_names:
            array = np.ascontiguousarray(inputs[name])
            if self.device_inputs:
                binding.bind_ortvalue_input(name, self._ort.OrtValue.ortvalue_from_numpy(
                    array, self.device, 0))
            else:
                binding.bind_cpu_input(name, array)
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

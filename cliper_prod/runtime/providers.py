"""Which ONNX Runtime execution providers a bundle's sessions run on: a provider choice, not a
torch device (``--provider``; ``--device`` is its old spelling on the ONNX Runtime commands).

``auto`` picks the CUDA execution provider when onnxruntime-gpu sees a GPU, else the CPU.
"""

from __future__ import annotations

from types import ModuleType

from cliper_prod.errors import RuntimeSetupError

PROVIDERS = ("auto", "cpu", "cuda")


def onnxruntime() -> ModuleType:
    """The onnxruntime module, or the error that names the extra installing it."""
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeSetupError("onnxruntime is not installed: pip install 'cliper-prod[runtime]' "
                                "(CPU) or 'cliper-prod[gpu]' (CUDA)") from None
    return onnxruntime


def choose_providers(provider: str = "auto") -> list[str]:
    """ONNX Runtime's provider list for a choice of :data:`PROVIDERS`; ``cuda`` without a CUDA
    provider is refused here, before any graph loads."""
    ort = onnxruntime()
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if provider == "cuda" and not has_cuda:
        raise RuntimeSetupError(f"--provider cuda: this onnxruntime ({ort.__version__}) has no "
                                f"CUDA provider (available: {available}); install "
                                f"'cliper-prod[gpu]' instead of the CPU runtime")
    if provider not in PROVIDERS:
        raise RuntimeSetupError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if provider == "cuda" or (provider == "auto" and has_cuda):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]

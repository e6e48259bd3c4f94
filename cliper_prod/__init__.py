"""cliper-prod: CLIPER multi-modal recommendation, from training to ONNX serving."""

__version__ = "0.1.0"

"""Runtime stage: an exported bundle on ONNX Runtime, no torch needed (``cliper-prod[runtime]``)."""

"""Runners over one interface (torch, onnxruntime, TensorRT), benchmark and the runner factory."""

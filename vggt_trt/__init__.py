"""vggt-trt: VGGT to ONNX and TensorRT, and point clouds from the engines."""

__version__ = "0.1.0"

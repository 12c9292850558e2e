"""TensorRT: the only code that imports tensorrt / tensorrt_rtx; engine build."""

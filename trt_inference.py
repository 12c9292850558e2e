#!/usr/bin/env python3
"""Run VGGT through a TensorRT engine, ONNX Runtime or PyTorch: list I/O, infer, benchmark, compare, sweep engines."""

import sys

from vggt_trt.cli.infer import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""VGGT -> ONNX -> TensorRT engine (see ``vggt_trt.cli.convert``; ``--help`` lists the flags)."""

import sys

from vggt_trt.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())

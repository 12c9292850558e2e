#!/usr/bin/env python3
"""Multi-view images, videos or webcams -> VGGT -> point cloud, cameras, COLMAP model (see ``vggt_trt.cli.pcd``)."""

import sys

from vggt_trt.cli.pcd import main

if __name__ == "__main__":
    sys.exit(main())

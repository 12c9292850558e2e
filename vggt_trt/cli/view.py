"""vggt-view: serve a pcd_inference.py output folder in the browser (points, cameras, confidence slider)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from .common import PORT, POSITIVE_INT, ArgumentParser, run_cli


def add_viewer_address(parser: Any, prefix: str = "") -> None:
    """``--[prefix]host`` and ``--[prefix]port``: where the viewer listens (localhost unless asked)."""
    from ..view.server import DEFAULT_HOST, DEFAULT_PORT

    parser.add_argument(f"--{prefix}host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 serves "
                             "every interface)")
    parser.add_argument(f"--{prefix}port", type=PORT, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT}; the next free one if taken; 0: any free port)")


def build_parser() -> argparse.ArgumentParser:
    from ..view.scene import DEFAULT_MAX_POINTS

    p = ArgumentParser(prog="vggt-view", description=__doc__)
    p.add_argument("out_dir", type=Path, help="output folder of pcd_inference.py (points.ply, cameras.json, ...)")
    p.add_argument("--max-points", type=POSITIVE_INT, default=DEFAULT_MAX_POINTS,
                   help=f"most points sent to the browser, evenly spread (default {DEFAULT_MAX_POINTS:,})")
    add_viewer_address(p)
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def job() -> int:
        from ..view.server import serve_until_interrupted

        serve_until_interrupted(args.out_dir, args.host, args.port, args.max_points)
        return 0

    return run_cli(job, None, "vggt_trt.view", args.verbose)


if __name__ == "__main__":
    sys.exit(main())

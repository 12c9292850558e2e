"""``python -m vggt_trt.cli.depth_anything``: export and build Depth Anything V2 for the live pipeline."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ..pipelines.depth_anything import DEFAULT_MODEL, DEPTH_PRECISIONS, PRESETS, DepthSpec, convert_depth_anything
from .common import IMAGE_SIDE, ArgumentParser, run_cli

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """``python -m vggt_trt.cli.depth_anything``: export + build Depth Anything into onnx_exports/depth_anything."""
    p = ArgumentParser(prog="python -m vggt_trt.cli.depth_anything", description=main.__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, local dir or preset ({', '.join(PRESETS)})")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--allow-download", action="store_true")
    p.add_argument("--height", type=IMAGE_SIDE, default=518)
    p.add_argument("--width", type=IMAGE_SIDE, default=518)
    p.add_argument("--precision", action="append", choices=DEPTH_PRECISIONS, help="repeatable (default fp16)")
    p.add_argument("--output-dir", type=Path, default=Path("onnx_exports/depth_anything"))
    p.add_argument("--backend", default="auto", choices=("auto", "tensorrt", "tensorrt-rtx"))
    p.add_argument("--skip-build", action="store_true")
    p.add_argument("--no-simplify", action="store_true")
    p.add_argument("--keep-intermediate", action="store_true",
                   help="keep the raw, .NOSEQ and .simp graphs (removed after a successful run by default)")
    p.add_argument("--log-dir", type=Path)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)

    def job() -> int:
        spec = DepthSpec(args.model, 1, args.height, args.width)
        for r in convert_depth_anything(spec, args.output_dir, args.precision or ["fp16"],
                                        random_init=args.random_init, allow_download=args.allow_download,
                                        backend=args.backend, skip_build=args.skip_build,
                                        no_simplify=args.no_simplify, keep_intermediate=args.keep_intermediate):
            logger.info("%s %s: %s", r["stem"], r["precision"], r.get("engine", {}).get("path") or r["onnx"]["path"])
        return 0

    return run_cli(job, args.log_dir, "depth_anything", args.verbose)



if __name__ == "__main__":
    sys.exit(main())

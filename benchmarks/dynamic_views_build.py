"""Build time and engine size of a dynamic-view engine against a fixed-view one from the same model (TensorRT-RTX
on CPU or TensorRT on a GPU).

Usage: PYTHONPATH=. python benchmarks/dynamic_views_build.py FIXED.onnx DYNAMIC.onnx OUT_DIR [--backend tensorrt-rtx]
The dynamic graph's recorded view range (vggt_to_trt.py --min-cams/--max-cams) is its profile. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from vggt_trt.pipelines.convert import spec_from_onnx
from vggt_trt.trt.build import build_engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fixed", type=Path)
    p.add_argument("dynamic", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--backend", default="tensorrt-rtx")
    p.add_argument("--precision", default="fp16")
    p.add_argument("--opt-level", type=int, default=5)
    args = p.parse_args()
    rows = []
    for kind, graph in (("fixed", args.fixed), ("dynamic", args.dynamic)):
        spec = spec_from_onnx(graph)
        t0 = time.perf_counter()
        res = build_engine(graph, args.out_dir / f"{graph.stem}.engine", args.precision, backend=args.backend,
                           opt_level=args.opt_level, workspace_gb=4,
                           profile=spec.profile() if spec.dynamic_views else None)
        rows.append({"kind": kind, "graph": graph.name, "views": spec.view_range.to_dict(),
                     "build_s": round(res.build_seconds, 1), "total_s": round(time.perf_counter() - t0, 1),
                     "engine_mb": round(res.engine_bytes / 1e6, 2), "layers": res.network_precision["layers"],
                     "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

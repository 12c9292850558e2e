#!/usr/bin/env python3
"""What is left to win in the compiled PyTorch engine: the GPU's kernel floor and three levers, measured.

One process on a CUDA GPU, seeded random 1B weights, pcd-only outputs, regional ``torch.compile``:

- ``bf16``: the engine as it ships (bf16 trunk, fp32 heads), with the aggregator / camera / depth split
  and a kernel profile by category (attention, GEMM, Triton, convolution);
- ``bf16-heads``: the same with the camera and depth heads in bf16 too;
- ``fp8-rowwise``: every linear layer of the aggregator (DINOv2, frame and global blocks) in fp8 e4m3,
  weights per output channel, activations per row at run time, through ``torch._scaled_mm``;
- the floor: cuDNN and flash attention and cuBLAS GEMMs alone at the trunk's shapes, summed over its calls.

Every mode's outputs are compared with an fp32 run (TF32 off) of the same weights (relative L2, max abs).

    PYTHONPATH=. python benchmarks/bench_torch_levers.py --json levers.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vggt_trt.accuracy import tensor_errors
from vggt_trt.model.compiled import compile_regions
from vggt_trt.model.precision import apply_precision
from vggt_trt.model.vggt import PCD_OUTPUTS
from vggt_trt.model.weights import build_model

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Linear(nn.Module):
    """A linear layer with an fp8 weight (scale per output channel) and fp8 activations (scale per row)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        with torch.no_grad():
            weight, scale = quantize_rows(linear.weight)
        self.out_features = linear.out_features
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x8, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
        y = torch._scaled_mm(x8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale, bias=self.bias,
                             out_dtype=torch.bfloat16)
        return y.reshape(*x.shape[:-1], self.out_features)


def linears_to_fp8(module: nn.Module) -> int:
    targets = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, Fp8Linear(linear))
    return len(targets)


def median_ms(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return round(float(np.median(times)), 3)


def kernel_category(name: str) -> str:
    n = name.lower()
    if "sdpa" in n or "fmha" in n or "flash" in n or "attention" in n:
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma_gemm", "cublas")):
        return "gemm"
    if "conv" in n or "implicit" in n:
        return "convolution"
    return "triton" if n.startswith("triton") else "other"


def profile(fn, top: int = 15) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = sorted((e for e in prof.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    categories: dict[str, float] = {}
    for e in rows:
        categories[kernel_category(e.key)] = categories.get(kernel_category(e.key), 0.0) + e.device_time_total / 1e3
    return {"categories_ms": {k: round(v, 2) for k, v in categories.items()},
            "top": [{"name": e.key[:140], "calls": e.count, "ms": round(e.device_time_total / 1e3, 3)} for e in rows[:top]]}


def kernel_floor(tokens_per_frame: int, frames: int, dim: int, heads: int, mlp: int, blocks: dict[str, int],
                 iters: int) -> dict:
    """Attention and GEMMs of the trunk, each alone at its shape, times its number of calls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    bf16, out = torch.bfloat16, {"attention_ms": {}, "gemm_ms": {}}
    shapes = {"frame": (frames, heads, tokens_per_frame, dim // heads),
              "global": (1, heads, frames * tokens_per_frame, dim // heads)}
    for kind, shape in shapes.items():
        q, k, v = (torch.randn(shape, device="cuda", dtype=bf16) for _ in range(3))
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            with sdpa_kernel([backend]):
                out["attention_ms"][f"{kind}:{backend.name.lower()}"] = median_ms(
                    lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), iters)
    rows = frames * tokens_per_frame
    for name, (k_in, n_out) in {"qkv": (dim, 3 * dim), "proj": (dim, dim), "fc1": (dim, mlp), "fc2": (mlp, dim)}.items():
        linear = nn.Linear(k_in, n_out, device="cuda", dtype=bf16)
        x = torch.randn(rows, k_in, device="cuda", dtype=bf16)
        ms = median_ms(lambda: linear(x), iters)
        out["gemm_ms"][name] = {"ms": ms, "tflops": round(2 * rows * k_in * n_out / ms / 1e9, 1)}
    best = {kind: min(v for key, v in out["attention_ms"].items() if key.startswith(kind)) for kind in shapes}
    per_block_gemm = sum(g["ms"] for g in out["gemm_ms"].values())
    n_blocks = sum(blocks.values())
    out["calls"] = blocks
    out["floor_ms"] = {"attention": round(best["global"] * blocks["global"] + best["frame"] * (n_blocks - blocks["global"]), 2),
                       "gemm": round(per_block_gemm * n_blocks, 2)}
    out["floor_ms"]["total"] = round(out["floor_ms"]["attention"] + out["floor_ms"]["gemm"], 2)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-cams", type=int, default=8)
    p.add_argument("--size", type=int, default=518)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--modes", nargs="+", default=["bf16", "bf16-heads", "fp8-rowwise"])
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    result: dict = {"machine": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "python": platform.python_version(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "shape": [args.num_cams, 3, args.size, args.size], "iters": args.iters, "modes": {}}

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))

    images = torch.rand(args.num_cams, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)).cuda()
    base = build_model("vggt-1b", random_init=True, seed=0, device="cuda")
    host = lambda out: {k: v.float().cpu().numpy() for k, v in out.items()}  # noqa: E731
    with torch.no_grad():
        apply_precision(base, "fp32")
        reference = host(base(images, outputs=PCD_OUTPUTS))
        apply_precision(base, "bf16")
        for mode in args.modes:
            model = copy.deepcopy(base)
            entry: dict = {}
            if mode == "bf16-heads":
                model.camera_head.to(torch.bfloat16)
                model.depth_head.to(torch.bfloat16)
            elif mode == "fp8-rowwise":
                entry["fp8_linears"] = linears_to_fp8(model.aggregator)
            elif mode != "bf16":
                raise SystemExit(f"unknown mode {mode}")
            compile_regions(model)
            trunk = torch.bfloat16
            head_dtype = torch.bfloat16 if mode == "bf16-heads" else torch.float32
            keep = sorted(model._layers_needed(set(PCD_OUTPUTS)))
            batch = images.unsqueeze(0).to(trunk)
            pos = [e.to(head_dtype) for e in model.depth_head.pos_embeds((args.size, args.size), "cuda")]
            last = model.cfg.depth - 1

            def forward() -> dict:
                layers = {k: v.to(head_dtype) for k, v in model.aggregator(batch, keep_layers=keep).items()}
                pose = model.camera_head(layers[last])[-1]
                depth, conf = model.depth_head(layers, (args.size, args.size), model.aggregator.patch_start_idx,
                                               model.frames_chunk_size, pos)
                return {"pose_enc": pose, "depth": depth, "depth_conf": conf}

            t0 = time.perf_counter()
            out = host(forward())
            entry["first_call_s"] = round(time.perf_counter() - t0, 1)
            entry["errors_vs_fp32"] = {k: {m: tensor_errors(reference[k], out[k])[m] for m in ("rel_l2", "max_abs")}
                                       for k in reference}
            entry["median_ms"] = median_ms(forward, args.iters)
            layers = {k: v.to(head_dtype) for k, v in model.aggregator(batch, keep_layers=keep).items()}
            entry["aggregator_ms"] = median_ms(lambda: model.aggregator(batch, keep_layers=keep), args.iters)
            entry["heads_alone_ms"] = median_ms(lambda: (model.camera_head(layers[last]), model.depth_head(
                layers, (args.size, args.size), model.aggregator.patch_start_idx, model.frames_chunk_size, pos)),
                args.iters)
            entry["profile"] = profile(forward)
            result["modes"][mode] = entry
            print(f"{mode:12s} {entry['median_ms']:7.1f} ms (aggregator {entry['aggregator_ms']:.1f}) "
                  f"{entry['profile']['categories_ms']}", flush=True)
            save()
            del model
            torch.cuda.empty_cache()
        cfg = base.cfg
        tokens = cfg.patch_start_idx + (args.size // cfg.patch_size) ** 2
        result["floor"] = kernel_floor(tokens, args.num_cams, cfg.embed_dim, cfg.num_heads,
                                       int(cfg.embed_dim * cfg.mlp_ratio),
                                       {"dino": cfg.patch_embed_depth, "frame": cfg.depth, "global": cfg.depth},
                                       max(args.iters, 50))
        print("floor", result["floor"]["floor_ms"], flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Transformer building blocks shared by the DINOv2 patch embed, the aggregator and the camera head."""

from __future__ import annotations

from typing import Any, Callable, Hashable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


_CACHE: dict[Hashable, Any] = {}
_CACHE_LIMIT = 64


def exporting() -> bool:
    """True while a graph is being exported (ONNX, torch.export, TorchScript), not while compiling."""
    compiler = torch.compiler
    return bool(
        (hasattr(compiler, "is_exporting") and compiler.is_exporting())
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
    )


@torch.compiler.disable
def _cached(key: Hashable, build: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.clear()
        _CACHE[key] = build()
    return _CACHE[key]


def shape_constant(key: Hashable, build: Callable[[], Any]) -> Any:
    """``build()`` memoised per key; rebuilt while exporting so graphs record it as constants.

    For shape-only constants (RoPE tables, pos-embeds) that would otherwise be rebuilt on the host
    and copied to the device on every forward. Under ``torch.compile`` the lookup runs eagerly (a
    graph break), so the compiled graph takes the cached device tensor as an input: host constants
    would put CPU kernels and a host-to-device copy into it and keep it out of the compile caches.
    """
    if exporting():
        return build()
    return _cached(key, build)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class RopeTables:
    """Precomputed 2D rotary tables for a fixed token layout: cos/sin of shape [N, head_dim].

    The first half of a head is rotated by the token's y position, the second half by its x
    position (the official RoPE2D layout). Tables are built in numpy float32 from the static
    positions, so exported graphs carry small constants instead of data-dependent table sizes.
    """

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos = cos
        self.sin = sin

    @classmethod
    def for_grid(
        cls, grid_h: int, grid_w: int, num_special: int, head_dim: int, freq: float, device, dtype
    ) -> "RopeTables":
        half = head_dim // 2
        ys, xs = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
        pos_y = np.concatenate([np.zeros(num_special), ys.reshape(-1) + 1]).astype(np.float32)
        pos_x = np.concatenate([np.zeros(num_special), xs.reshape(-1) + 1]).astype(np.float32)
        exponents = np.arange(0, half, 2, dtype=np.float32) / np.float32(half)
        inv_freq = (np.float32(1.0) / np.power(np.float32(freq), exponents)).astype(np.float32)

        def one_axis(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            angles = np.outer(pos, inv_freq).astype(np.float32)
            angles = np.concatenate([angles, angles], axis=-1)
            return np.cos(angles), np.sin(angles)

        cy, sy = one_axis(pos_y)
        cx, sx = one_axis(pos_x)
        cos = torch.from_numpy(np.concatenate([cy, cx], axis=-1)).to(device=device, dtype=dtype)
        sin = torch.from_numpy(np.concatenate([sy, sx], axis=-1)).to(device=device, dtype=dtype)
        return cls(cos, sin)

    def repeat(self, times: int) -> "RopeTables":
        """Tables for ``times`` frames laid out one after another (global attention)."""
        return RopeTables(self.cos.repeat(times, 1), self.sin.repeat(times, 1))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` [B, heads, N, head_dim]: x*cos + rotate_half(x)*sin within each half."""
        q = x.shape[-1] // 4
        y1, y2, x1, x2 = x.split(q, dim=-1)
        rotated = torch.cat((-y2, y1, -x2, x1), dim=-1)
        return x * self.cos.to(x.dtype) + rotated * self.sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, rope: RopeTables | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope.apply(q), rope.apply(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale (DINOv2 / VGGT ``Block``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        init_values: float | None = None,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, qk_norm=qk_norm)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor, rope: RopeTables | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope=rope))
        return x + self.ls2(self.mlp(self.norm2(x)))

"""DINOv2 ViT patch embed with register tokens, as used inside the VGGT aggregator."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn

from .layers import Block


def _aa_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=32)
def aa_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] weights of torch's antialiased bicubic resize along one axis.

    ``F.interpolate(mode="bicubic", antialias=True, align_corners=False)`` is separable, so the
    2D resize of a pos-embed grid is ``A_h @ grid @ A_w.T``. Building the weights here (float64
    numpy, stored as float32) keeps the resize out of exported graphs.
    """
    scale = in_size / out_size
    support = 2.0 * max(scale, 1.0)
    inv = 1.0 / max(scale, 1.0)
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        w = _aa_cubic((taps - center + 0.5) * inv)
        total = w.sum()
        weights[i, lo:hi] = w / total if total != 0 else w
    return weights


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT returning normalised patch tokens [B, P, C] (cls and register tokens dropped)."""

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        num_register_tokens: int,
        init_values: float,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim), requires_grad=False)
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, init_values=init_values, norm_eps=1e-6) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Pos-embed [1, 1+P, C] for an image of height x width pixels."""
        height, width = int(height), int(width)
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        n = self.pos_embed.shape[1] - 1
        if grid_h * grid_w == n and height == width:
            return self.pos_embed
        m = int(math.sqrt(n))
        if m * m != n:
            raise ValueError(f"pos_embed holds {n} patch positions, not a square grid")
        pos = self.pos_embed.float()
        patch = pos[0, 1:].reshape(m, m, -1)
        a_h = torch.from_numpy(aa_bicubic_matrix(m, grid_h).astype(np.float32)).to(pos.device)
        a_w = torch.from_numpy(aa_bicubic_matrix(m, grid_w).astype(np.float32)).to(pos.device)
        dim = patch.shape[-1]
        rows = (a_h @ patch.reshape(m, m * dim)).reshape(grid_h, m, dim).transpose(0, 1)
        patch = (a_w @ rows.reshape(m, grid_h * dim)).reshape(grid_w, grid_h, dim).transpose(0, 1)
        patch = patch.reshape(1, grid_h * grid_w, dim)
        return torch.cat((pos[:, :1], patch), dim=1).to(self.pos_embed.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, _, height, width = images.shape
        x = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        x = x + self.interpolate_pos_encoding(height, width).to(x.dtype)
        x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1).to(x.dtype), x[:, 1:]), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, self.num_register_tokens + 1 :]

"""Voxel-hashed global point map with bounded size, fused batch by batch by the live loop.

Kept in torch so the same code runs on the host and on a GPU: each insert merges the batch into
the map with one ``torch.unique`` over old and new voxel keys and ``index_add_`` of the sums.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError

_BITS, _OFF = 21, 1 << 20


class VoxelMap:
    """Voxel-hashed point map: per voxel the sum of positions and colours, a hit count and the last batch seen.

    Keys are the voxel coordinates packed in 63 bits (|coordinate| < 2^20 voxels; points beyond are dropped).
    When more than ``max_voxels`` are occupied, the least recently seen (then least observed) are evicted.
    """

    def __init__(self, voxel_size: float, max_voxels: int = 2_000_000, device: Any = "cpu") -> None:
        import torch

        if not voxel_size > 0 or max_voxels < 1:
            raise InputError(f"voxel_size must be > 0 and max_voxels >= 1 (got {voxel_size}, {max_voxels})")
        self.voxel_size, self.max_voxels = float(voxel_size), int(max_voxels)
        self.device = torch.device(device)
        self.keys = torch.empty(0, dtype=torch.int64, device=self.device)
        self.xyz = torch.empty((0, 3), dtype=torch.float64, device=self.device)
        self.rgb = torch.empty((0, 3), dtype=torch.float64, device=self.device)
        self.count = torch.empty(0, dtype=torch.int64, device=self.device)
        self.last = torch.empty(0, dtype=torch.int64, device=self.device)
        self.evicted = self.out_of_range = 0

    def __len__(self) -> int:
        return int(self.keys.numel())

    def insert(self, xyz: Any, rgb: Any, batch: int) -> int:
        """Add points ``[N, 3]`` (numpy or torch) with uint8 colours; returns the number of newly occupied voxels."""
        import torch

        xyz = torch.as_tensor(xyz, device=self.device).to(torch.float64)
        rgb = torch.as_tensor(rgb, device=self.device).to(torch.float64)
        v = torch.floor(xyz / self.voxel_size)
        ok = (v.abs() < _OFF - 1).all(dim=1)
        self.out_of_range += int((~ok).sum())
        v, xyz, rgb = v[ok].to(torch.int64) + _OFF, xyz[ok], rgb[ok]
        if not len(v):
            return 0
        keys = (v[:, 0] << (2 * _BITS)) | (v[:, 1] << _BITS) | v[:, 2]
        before = len(self)
        uk, inv = torch.unique(torch.cat([self.keys, keys]), return_inverse=True)
        n = uk.numel()
        zeros3 = torch.zeros((n, 3), dtype=torch.float64, device=self.device)
        self.xyz = zeros3.index_add(0, inv, torch.cat([self.xyz, xyz]))
        self.rgb = zeros3.index_add(0, inv, torch.cat([self.rgb, rgb]))
        ones = torch.ones(len(keys), dtype=torch.int64, device=self.device)
        self.count = torch.zeros(n, dtype=torch.int64, device=self.device).index_add(0, inv, torch.cat([self.count, ones]))
        stamps = torch.cat([self.last, torch.full((len(keys),), batch, dtype=torch.int64, device=self.device)])
        self.last = torch.full((n,), batch, dtype=torch.int64, device=self.device).scatter_reduce(
            0, inv, stamps, reduce="amax", include_self=False)
        self.keys = uk
        added = n - before
        if n > self.max_voxels:
            # oldest first, then fewest hits (np.lexsort((count, last)) order, stable)
            by_count = torch.argsort(self.count, stable=True)
            order = by_count[torch.argsort(self.last[by_count], stable=True)]
            keep = torch.ones(n, dtype=torch.bool, device=self.device)
            keep[order[: n - self.max_voxels]] = False
            self.evicted += n - self.max_voxels
            self.keys, self.xyz, self.rgb = self.keys[keep], self.xyz[keep], self.rgb[keep]
            self.count, self.last = self.count[keep], self.last[keep]
        return int(added)

    def means(self) -> tuple[Any, Any]:
        """(xyz float32, rgb uint8) per occupied voxel, as tensors on the map's device."""
        import torch

        n = self.count.clamp(min=1)[:, None].to(self.xyz.dtype)
        return (self.xyz / n).float(), (self.rgb / n).round().to(torch.uint8)

    def points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(xyz float32, rgb uint8, hit count float32) per occupied voxel, as numpy."""
        xyz, rgb = self.means()
        return xyz.cpu().numpy(), rgb.cpu().numpy(), self.count.float().cpu().numpy()

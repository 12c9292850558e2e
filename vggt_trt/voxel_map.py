"""Voxel-hashed global point map with bounded size, fused batch by batch by the live loop."""

from __future__ import annotations

import numpy as np

from .errors import InputError

_BITS, _OFF = 21, 1 << 20


class VoxelMap:
    """Voxel-hashed point map: per voxel the sum of positions and colours, a hit count and the last batch seen.

    Keys are the voxel coordinates packed in 63 bits (|coordinate| < 2^20 voxels; points beyond are dropped).
    When more than ``max_voxels`` are occupied, the least recently seen (then least observed) are evicted.
    """

    def __init__(self, voxel_size: float, max_voxels: int = 2_000_000) -> None:
        if not voxel_size > 0 or max_voxels < 1:
            raise InputError(f"voxel_size must be > 0 and max_voxels >= 1 (got {voxel_size}, {max_voxels})")
        self.voxel_size, self.max_voxels = float(voxel_size), int(max_voxels)
        self.keys = np.empty(0, np.int64)
        self.xyz = np.empty((0, 3), np.float64)
        self.rgb = np.empty((0, 3), np.float64)
        self.count = np.empty(0, np.int64)
        self.last = np.empty(0, np.int64)
        self.evicted = self.out_of_range = 0

    def __len__(self) -> int:
        return int(self.keys.size)

    def insert(self, xyz: np.ndarray, rgb: np.ndarray, batch: int) -> int:
        """Add points ``[N, 3]`` with uint8 colours; returns the number of newly occupied voxels."""
        v = np.floor(np.asarray(xyz, np.float64) / self.voxel_size)
        ok = np.all(np.abs(v) < _OFF - 1, axis=1)
        self.out_of_range += int((~ok).sum())
        v, xyz, rgb = v[ok].astype(np.int64) + _OFF, np.asarray(xyz, np.float64)[ok], np.asarray(rgb, np.float64)[ok]
        if not len(v):
            return 0
        keys = (v[:, 0] << (2 * _BITS)) | (v[:, 1] << _BITS) | v[:, 2]
        uk, inv, cnt = np.unique(keys, return_inverse=True, return_counts=True)
        sums = [np.stack([np.bincount(inv, a[:, c], uk.size) for c in range(3)], 1) for a in (xyz, rgb)]
        pos = np.searchsorted(self.keys, uk)
        hit = pos < self.keys.size
        hit[hit] = self.keys[pos[hit]] == uk[hit]
        p = pos[hit]
        self.xyz[p] += sums[0][hit]
        self.rgb[p] += sums[1][hit]
        self.count[p] += cnt[hit]
        self.last[p] = batch
        new = ~hit
        at = pos[new]
        self.keys = np.insert(self.keys, at, uk[new])
        self.xyz = np.insert(self.xyz, at, sums[0][new], axis=0)
        self.rgb = np.insert(self.rgb, at, sums[1][new], axis=0)
        self.count = np.insert(self.count, at, cnt[new])
        self.last = np.insert(self.last, at, batch)
        if self.keys.size > self.max_voxels:
            order = np.lexsort((self.count, self.last))  # oldest, then fewest hits, first
            drop = np.sort(order[: self.keys.size - self.max_voxels])
            keep = np.ones(self.keys.size, bool)
            keep[drop] = False
            self.evicted += int(drop.size)
            self.keys, self.xyz, self.rgb = self.keys[keep], self.xyz[keep], self.rgb[keep]
            self.count, self.last = self.count[keep], self.last[keep]
        return int(new.sum())

    def points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = np.maximum(self.count, 1)[:, None]
        return ((self.xyz / n).astype(np.float32), np.round(self.rgb / n).astype(np.uint8),
                self.count.astype(np.float32))

"""The VGGT model: aggregator plus camera, depth and point heads, with fixed-name tensor outputs."""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn

from ..errors import InputError
from .aggregator import Aggregator
from .config import VGGTConfig
from .heads import CameraHead, DPTHead
from .layers import exporting

PCD_OUTPUTS = ("pose_enc", "depth", "depth_conf")
FULL_OUTPUTS = PCD_OUTPUTS + ("world_points", "world_points_conf")


def check_image_shape(shape: Iterable[int], patch_size: int = 14) -> None:
    """Raise InputError unless ``shape`` is [S,3,H,W] or [B,S,3,H,W] with H, W multiples of the patch size."""
    shape = tuple(shape)
    if len(shape) not in (4, 5) or shape[-3] != 3:
        raise InputError(f"images must be [S,3,H,W] or [B,S,3,H,W]; found shape {list(shape)}")
    h, w = shape[-2:]
    if h % patch_size or w % patch_size or h == 0 or w == 0:
        raise InputError(
            f"image height and width must be positive multiples of {patch_size}; found {h}x{w}"
        )


class VGGT(nn.Module):
    """VGGT; ``frames_chunk_size`` (default 8, the official value, None for all at once) bounds how
    many frames the dense heads process at a time in eager and compiled runs; exported graphs take
    every frame at once so their view axis can stay symbolic."""

    def __init__(self, cfg: VGGTConfig, frames_chunk_size: int | None = 8):
        super().__init__()
        self.cfg = cfg
        self.frames_chunk_size = frames_chunk_size
        self.aggregator = Aggregator(cfg)
        self.camera_head = CameraHead(cfg) if cfg.enable_camera else None
        self.point_head = DPTHead(cfg, output_dim=4, activation="inv_log") if cfg.enable_point else None
        self.depth_head = DPTHead(cfg, output_dim=2, activation="exp") if cfg.enable_depth else None

    def _layers_needed(self, outputs: set[str]) -> set[int]:
        layers: set[int] = set()
        if "pose_enc" in outputs or "pose_enc_list" in outputs:
            layers.add(self.cfg.depth - 1)
        if outputs & {"depth", "depth_conf"}:
            layers.update(self.depth_head.intermediate_layer_idx)
        if outputs & {"world_points", "world_points_conf"}:
            layers.update(self.point_head.intermediate_layer_idx)
        return layers

    def forward(self, images: torch.Tensor, outputs: Iterable[str] = FULL_OUTPUTS) -> dict[str, torch.Tensor]:
        """images [S,3,H,W] or [B,S,3,H,W] in [0,1] -> dict of the requested outputs.

        Known outputs: pose_enc [B,S,9], pose_enc_list [iters,B,S,9], depth [B,S,H,W,1],
        depth_conf [B,S,H,W], world_points [B,S,H,W,3], world_points_conf [B,S,H,W].
        Only what the requested outputs need is computed. Heads run in the dtype of their weights (float32
        unless the whole model was cast).
        """
        check_image_shape(images.shape, self.cfg.patch_size)
        if images.dim() == 4:
            images = images.unsqueeze(0)
        wanted = set(outputs)
        unknown = wanted - set(FULL_OUTPUTS) - {"pose_enc_list"}
        if unknown:
            raise InputError(f"unknown outputs {sorted(unknown)}; known: {list(FULL_OUTPUTS) + ['pose_enc_list']}")
        missing = [
            head
            for head, names in (
                ("camera_head", {"pose_enc", "pose_enc_list"}),
                ("depth_head", {"depth", "depth_conf"}),
                ("point_head", {"world_points", "world_points_conf"}),
            )
            if wanted & names and getattr(self, head) is None
        ]
        if missing:
            raise InputError(f"this model was built without {missing}")
        trunk_dtype = self.aggregator.camera_token.dtype
        layers = self.aggregator(images.to(trunk_dtype), keep_layers=sorted(self._layers_needed(wanted)))
        image_hw = (images.shape[-2], images.shape[-1])
        start = self.aggregator.patch_start_idx
        result: dict[str, torch.Tensor] = {}
        device_type = images.device.type
        autocast_off = (
            torch.autocast(device_type=device_type, enabled=False)
            if torch.is_autocast_enabled(device_type)
            else contextlib.nullcontext()
        )
        heads = (h for h in (self.camera_head, self.depth_head, self.point_head) if h is not None)
        head_dtype = next((p.dtype for h in heads for p in h.parameters()), torch.float32)
        with autocast_off:
            layers = {k: v.to(head_dtype) for k, v in layers.items()}
            if wanted & {"pose_enc", "pose_enc_list"}:
                encodings = self.camera_head(layers[self.cfg.depth - 1])
                result["pose_enc"] = encodings[-1]
                if "pose_enc_list" in wanted:
                    result["pose_enc_list"] = torch.stack(encodings)
            chunk = None if exporting() else self.frames_chunk_size
            if wanted & {"depth", "depth_conf"}:
                result["depth"], result["depth_conf"] = self.depth_head(
                    layers, image_hw, start, chunk, self.depth_head.pos_embeds(image_hw, images.device))
            if wanted & {"world_points", "world_points_conf"}:
                result["world_points"], result["world_points_conf"] = self.point_head(
                    layers, image_hw, start, chunk, self.point_head.pos_embeds(image_hw, images.device))
        return {k: result[k] for k in list(FULL_OUTPUTS) + ["pose_enc_list"] if k in wanted}

"""Camera head (iterative pose refinement) and DPT dense heads (depth, world points)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import VGGTConfig
from .layers import Block, Mlp, shape_constant


def activate_pose(pose_enc: torch.Tensor) -> torch.Tensor:
    """absT_quaR_FoV activations: translation and quaternion linear, field of view ReLU."""
    return torch.cat([pose_enc[..., :7], F.relu(pose_enc[..., 7:])], dim=-1)


class CameraHead(nn.Module):
    def __init__(self, cfg: VGGTConfig):
        super().__init__()
        dim = 2 * cfg.embed_dim
        self.target_dim = 9
        self.num_iterations = cfg.camera_iterations
        self.trunk = nn.Sequential(
            *(Block(dim, cfg.camera_num_heads, cfg.camera_mlp_ratio, init_values=cfg.camera_init_values)
              for _ in range(cfg.camera_trunk_depth))
        )
        self.token_norm = nn.LayerNorm(dim)
        self.trunk_norm = nn.LayerNorm(dim)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, self.target_dim))
        self.embed_pose = nn.Linear(self.target_dim, dim)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        self.adaln_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim, dim // 2, self.target_dim)

    def forward(self, last_tokens: torch.Tensor) -> list[torch.Tensor]:
        """last_tokens [B, S, P, 2C] (last aggregator layer) -> activated pose encodings per iteration."""
        pose_tokens = self.token_norm(last_tokens[:, :, 0])
        B, S, _ = pose_tokens.shape
        raw: torch.Tensor | None = None
        encodings = []
        for _ in range(self.num_iterations):
            source = self.empty_pose_tokens.expand(B, S, -1) if raw is None else raw
            shift, scale, gate = self.poseLN_modulation(self.embed_pose(source)).chunk(3, dim=-1)
            x = gate * (self.adaln_norm(pose_tokens) * (1 + scale) + shift) + pose_tokens
            delta = self.pose_branch(self.trunk_norm(self.trunk(x)))
            raw = delta if raw is None else raw + delta
            encodings.append(activate_pose(raw))
        return encodings


class ResidualConvUnit(nn.Module):
    """relu(x) + conv2(relu(conv1(relu(x)))): the official unit's in-place ReLU also feeds the skip."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class FeatureFusionBlock(nn.Module):
    def __init__(self, features: int, has_residual: bool = True):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.has_residual = has_residual
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, size: tuple[int, int] | None = None):
        if self.has_residual:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        size = size or (x.shape[-2] * 2, x.shape[-1] * 2)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


def _sincos(pos: np.ndarray, dim: int, omega_0: float = 100.0) -> np.ndarray:
    omega = 1.0 / omega_0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(pos.astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def uv_pos_embed_tables(grid_h: int, grid_w: int, channels: int, aspect_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """The DPT's sin/cos embedding of a normalised uv grid as two factors, float32.

    Returns (ex [channels/2, 1, W], ey [channels/2, H, 1]); the embedding at (h, w) is
    concat(ex[:, 0, w], ey[:, h, 0]). Same values as the official ``create_uv_grid`` +
    ``position_grid_to_embed`` (float32 grid, float64 trigonometry, float32 result), computed
    in numpy: graphs get two small constants, never float64 ops.
    """
    diag = (aspect_ratio**2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diag, 1.0 / diag
    xs = np.linspace(-span_x * (grid_w - 1) / grid_w, span_x * (grid_w - 1) / grid_w, grid_w).astype(np.float32)
    ys = np.linspace(-span_y * (grid_h - 1) / grid_h, span_y * (grid_h - 1) / grid_h, grid_h).astype(np.float32)
    half = channels // 2
    ex = _sincos(xs, half).astype(np.float32).T[:, None, :]
    ey = _sincos(ys, half).astype(np.float32).T[:, :, None]
    return np.ascontiguousarray(ex), np.ascontiguousarray(ey)


def uv_pos_embed(grid_h: int, grid_w: int, channels: int, aspect_ratio: float, device=None, dtype=None,
                 ratio: float = 1.0) -> torch.Tensor:
    """[channels, grid_h, grid_w] embedding (times ``ratio``) built on ``device`` from the two factors."""
    ex, ey = uv_pos_embed_tables(grid_h, grid_w, channels, aspect_ratio)
    ex_t = torch.from_numpy(ex * np.float32(ratio)).to(device=device, dtype=dtype)
    ey_t = torch.from_numpy(ey * np.float32(ratio)).to(device=device, dtype=dtype)
    half = channels // 2
    return torch.cat([ex_t.expand(half, grid_h, grid_w), ey_t.expand(half, grid_h, grid_w)], dim=0)


class DPTHead(nn.Module):
    def __init__(self, cfg: VGGTConfig, output_dim: int, activation: str):
        super().__init__()
        dim_in = 2 * cfg.embed_dim
        oc = cfg.dpt_out_channels
        features = cfg.dpt_features
        self.patch_size = cfg.patch_size
        self.activation = activation
        self.intermediate_layer_idx = tuple(cfg.dpt_intermediate_layer_idx)
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, c, 1) for c in oc)
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(oc[0], oc[0], kernel_size=4, stride=4),
                nn.ConvTranspose2d(oc[1], oc[1], kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(oc[3], oc[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.scratch = nn.Module()
        for i, c in enumerate(oc, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(c, features, 3, padding=1, bias=False))
        self.scratch.refinenet1 = FeatureFusionBlock(features)
        self.scratch.refinenet2 = FeatureFusionBlock(features)
        self.scratch.refinenet3 = FeatureFusionBlock(features)
        self.scratch.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        self.scratch.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        self.scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, output_dim, 1)
        )

    def pos_embeds(self, image_hw: tuple[int, int], device: torch.device | str | None = None) -> list[torch.Tensor]:
        """The uv embeddings ``features`` adds (one per pyramid level, then the full-resolution one), float32.

        Built once per image size (:func:`shape_constant`) outside the compiled head, which takes them as
        inputs: a lookup inside it would break its graph at every level, and numpy traced by
        ``torch.compile`` keeps the head out of the AOTAutograd cache (a full recompile in every process).
        """
        H, W = int(image_hw[0]), int(image_hw[1])
        ph, pw = H // self.patch_size, W // self.patch_size
        sizes = [(ph, pw, conv.out_channels) for conv in self.projects]
        sizes.append((ph * self.patch_size, pw * self.patch_size, self.scratch.output_conv1.out_channels))
        embeds = []
        for gh, gw, channels in sizes:
            args = (gh, gw, channels, W / H, device, torch.float32, 0.1)
            embeds.append(shape_constant(("uv",) + args, lambda args=args: uv_pos_embed(*args)))
        return embeds

    def features(self, layers: Mapping[int, torch.Tensor], image_hw: tuple[int, int], patch_start_idx: int,
                 pos_embeds: Sequence[torch.Tensor]):
        """Fused DPT feature before ``output_conv2`` [B*S, features//2, H, W]."""
        H, W = int(image_hw[0]), int(image_hw[1])
        ph, pw = H // self.patch_size, W // self.patch_size
        pyramid = []
        for i, layer_idx in enumerate(self.intermediate_layer_idx):
            x = layers[layer_idx][:, :, patch_start_idx:]
            x = self.norm(x.reshape(-1, x.shape[-2], x.shape[-1]))
            x = x.permute(0, 2, 1).reshape(x.shape[0], x.shape[-1], ph, pw)
            x = self.projects[i](x)
            x = x + pos_embeds[i].to(x.dtype)[None]
            pyramid.append(self.resize_layers[i](x))
        s = self.scratch
        l1, l2, l3, l4 = (getattr(s, f"layer{i}_rn")(x) for i, x in enumerate(pyramid, start=1))
        out = s.refinenet4(l4, size=tuple(l3.shape[2:]))
        out = s.refinenet3(out, l3, size=tuple(l2.shape[2:]))
        out = s.refinenet2(out, l2, size=tuple(l1.shape[2:]))
        out = s.refinenet1(out, l1)
        out = s.output_conv1(out)
        out = F.interpolate(out, size=(ph * self.patch_size, pw * self.patch_size), mode="bilinear", align_corners=True)
        return out + pos_embeds[-1].to(out.dtype)[None]

    def forward(self, layers: Mapping[int, torch.Tensor], image_hw: tuple[int, int], patch_start_idx: int,
                frames_chunk_size: int | None = None, pos_embeds: Sequence[torch.Tensor] | None = None):
        """-> (prediction [B, S, H, W, D-1], confidence [B, S, H, W]).

        With ``frames_chunk_size`` the B*S frames go through the head in near-equal chunks of about
        that many (the official head's ``frames_chunk_size``; never a chunk of one frame): the full-resolution activations of 64 frames
        exceed a CUDA upsampling kernel's INT_MAX-element limit and most of the memory.
        """
        B, S = layers[self.intermediate_layer_idx[0]].shape[:2]
        if pos_embeds is None:
            pos_embeds = self.pos_embeds(image_hw, layers[self.intermediate_layer_idx[0]].device)
        n_chunks = min(-(-B * S // frames_chunk_size), B * S // 2) if frames_chunk_size else 1
        if n_chunks > 1:
            # near-equal chunks of at least two frames: a one-frame batch takes other convolution
            # kernels (not bit-identical), so a remainder frame joins a chunk instead
            frames = {i: layers[i].reshape(1, B * S, *layers[i].shape[2:]).tensor_split(n_chunks, dim=1)
                      for i in self.intermediate_layer_idx}
            out = torch.cat([
                self.scratch.output_conv2(self.features({i: t[c] for i, t in frames.items()}, image_hw, patch_start_idx,
                                                        pos_embeds))
                for c in range(n_chunks)
            ], dim=0)
        else:
            out = self.scratch.output_conv2(self.features(layers, image_hw, patch_start_idx, pos_embeds))
        fmap = out.permute(0, 2, 3, 1)
        pred, conf = fmap[..., :-1], fmap[..., -1]
        if self.activation == "exp":
            pred = torch.exp(pred)
        elif self.activation == "inv_log":
            pred = torch.sign(pred) * torch.expm1(torch.abs(pred))
        else:
            raise ValueError(f"unsupported DPT activation {self.activation!r}")
        conf = 1 + torch.exp(conf)
        return pred.reshape(B, S, *pred.shape[1:]), conf.reshape(B, S, *conf.shape[1:])

"""VGGT aggregator: DINOv2 patch tokens, then alternating frame and global attention."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .config import VGGTConfig
from .dino import DinoVisionTransformer, PatchEmbed
from .layers import Block, RopeTables, shape_constant

_RESNET_MEAN = (0.485, 0.456, 0.406)
_RESNET_STD = (0.229, 0.224, 0.225)


def _first_and_rest(token: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """[1, 2, n, C] -> [B*S, n, C]: index 0 for the first frame of each batch, index 1 for the rest."""
    # a gather, not expand(frames - 1): the view axis stays symbolic in exports over a range of view counts
    index = (torch.arange(frames, device=token.device) > 0).long()
    return token.index_select(1, index).expand(batch, frames, *token.shape[2:]).reshape(batch * frames, *token.shape[2:])


class Aggregator(nn.Module):
    def __init__(self, cfg: VGGTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, dim))
        self.register_token = nn.Parameter(torch.zeros(1, 2, cfg.num_register_tokens, dim))
        if cfg.patch_embed == "conv":
            self.patch_embed = PatchEmbed(cfg.patch_size, 3, dim)
        else:
            self.patch_embed = DinoVisionTransformer(
                img_size=cfg.patch_embed_img_size or cfg.img_size,
                patch_size=cfg.patch_size,
                embed_dim=dim,
                depth=cfg.patch_embed_depth,
                num_heads=cfg.patch_embed_num_heads,
                mlp_ratio=cfg.patch_embed_mlp_ratio,
                num_register_tokens=cfg.num_register_tokens,
                init_values=cfg.patch_embed_init_values,
            )

        def make_block() -> Block:
            return Block(dim, cfg.num_heads, cfg.mlp_ratio, init_values=cfg.init_values, qk_norm=cfg.qk_norm)

        self.frame_blocks = nn.ModuleList(make_block() for _ in range(cfg.depth))
        self.global_blocks = nn.ModuleList(make_block() for _ in range(cfg.depth))
        self.register_buffer("_resnet_mean", torch.empty(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("_resnet_std", torch.empty(1, 1, 3, 1, 1), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)write the ImageNet normalisation buffers (needed after ``to_empty``)."""
        with torch.no_grad():
            self._resnet_mean.copy_(torch.tensor(_RESNET_MEAN).view(1, 1, 3, 1, 1))
            self._resnet_std.copy_(torch.tensor(_RESNET_STD).view(1, 1, 3, 1, 1))

    @property
    def patch_start_idx(self) -> int:
        return self.cfg.patch_start_idx

    def forward(self, images: torch.Tensor, keep_layers: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
        """images [B, S, 3, H, W] in [0, 1] -> {layer index: tokens [B, S, P, 2C]} for ``keep_layers``.

        Each entry is concat(frame-block output, global-block output) after alternating pair i.
        ``keep_layers=None`` keeps every layer; keeping only what the heads use saves memory.
        """
        cfg = self.cfg
        B, S, C_in, H, W = images.shape
        keep = set(range(cfg.depth)) if keep_layers is None else set(keep_layers)
        images = (images - self._resnet_mean.to(images.dtype)) / self._resnet_std.to(images.dtype)
        patch_tokens = self.patch_embed(images.reshape(B * S, C_in, H, W))
        dtype = patch_tokens.dtype
        tokens = torch.cat(
            [
                _first_and_rest(self.camera_token, B, S).to(dtype),
                _first_and_rest(self.register_token, B, S).to(dtype),
                patch_tokens,
            ],
            dim=1,
        )
        P, C = tokens.shape[1], tokens.shape[2]
        rope = rope_global = None
        if cfg.rope_freq > 0:
            grid = (int(H) // cfg.patch_size, int(W) // cfg.patch_size)
            key = ("rope", grid, cfg.patch_start_idx, cfg.head_dim, cfg.rope_freq, tokens.device, dtype)
            rope = shape_constant(key, lambda: RopeTables.for_grid(
                *grid, cfg.patch_start_idx, cfg.head_dim, cfg.rope_freq, tokens.device, dtype))
            if isinstance(S, torch.SymInt):  # a dynamic view axis (export with --min-cams/--max-cams)
                rope_global = rope.repeat(S)
            else:
                rope_global = shape_constant(key + (int(S),), lambda: rope.repeat(int(S)))

        outputs: dict[int, torch.Tensor] = {}
        frame_idx = global_idx = layer = 0
        for _ in range(cfg.depth // cfg.aa_block_size):
            frame_out: list[torch.Tensor] = []
            global_out: list[torch.Tensor] = []
            for attn_type in cfg.aa_order:
                if attn_type == "frame":
                    tokens = tokens.reshape(B * S, P, C)
                    for _ in range(cfg.aa_block_size):
                        tokens = self.frame_blocks[frame_idx](tokens, rope=rope)
                        frame_idx += 1
                        frame_out.append(tokens.reshape(B, S, P, C))
                elif attn_type == "global":
                    tokens = tokens.reshape(B, S * P, C)
                    for _ in range(cfg.aa_block_size):
                        tokens = self.global_blocks[global_idx](tokens, rope=rope_global)
                        global_idx += 1
                        global_out.append(tokens.reshape(B, S, P, C))
                else:
                    raise ValueError(f"unknown attention type {attn_type!r}")
            for f, g in zip(frame_out, global_out):
                if layer in keep:
                    outputs[layer] = torch.cat([f, g], dim=-1)
                layer += 1
        return outputs

"""VGGT architecture configuration and the built-in presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError


@dataclass(frozen=True)
class VGGTConfig:
    """Every size of the VGGT architecture; defaults are the official ``facebook/VGGT-1B`` sizes."""

    name: str = "vggt-1b"
    img_size: int = 518
    patch_size: int = 14
    # Aggregator (alternating frame/global attention)
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    qk_norm: bool = True
    rope_freq: float = 100.0
    init_values: float = 0.01
    aa_order: tuple[str, ...] = ("frame", "global")
    aa_block_size: int = 1
    # DINOv2 patch embed
    patch_embed: str = "dinov2"  # "dinov2" or "conv"
    patch_embed_depth: int = 24
    patch_embed_num_heads: int = 16
    patch_embed_mlp_ratio: float = 4.0
    patch_embed_init_values: float = 1.0
    patch_embed_img_size: int | None = None  # pretraining grid of the DINO pos-embed; None: img_size
    # Camera head
    camera_trunk_depth: int = 4
    camera_num_heads: int = 16
    camera_mlp_ratio: float = 4.0
    camera_init_values: float = 0.01
    camera_iterations: int = 4
    # DPT heads
    dpt_features: int = 256
    dpt_out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    dpt_intermediate_layer_idx: tuple[int, int, int, int] = (4, 11, 17, 23)
    enable_camera: bool = True
    enable_depth: bool = True
    enable_point: bool = True
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise InputError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        head_dim = self.embed_dim // self.num_heads
        if self.rope_freq > 0 and head_dim % 4:
            raise InputError(f"2D RoPE needs a head dim divisible by 4, found {head_dim}")
        if self.depth % self.aa_block_size:
            raise InputError(f"depth {self.depth} is not divisible by aa_block_size {self.aa_block_size}")
        bad = [i for i in self.dpt_intermediate_layer_idx if not 0 <= i < self.depth]
        if bad:
            raise InputError(f"DPT intermediate layer indices {bad} are outside 0..{self.depth - 1}")
        if self.patch_embed not in ("dinov2", "conv"):
            raise InputError(f"patch_embed must be 'dinov2' or 'conv', found {self.patch_embed!r}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def pos_embed_grid(self) -> int:
        return (self.patch_embed_img_size or self.img_size) // self.patch_size

    @property
    def patch_start_idx(self) -> int:
        return 1 + self.num_register_tokens

    def replace(self, **changes: Any) -> "VGGTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d


PRESETS: dict[str, VGGTConfig] = {
    "vggt-1b": VGGTConfig(),
    # Same sizes as the shared fixture vggt-tiny-a: the whole pipeline runs on CPU in seconds.
    "tiny": VGGTConfig(
        name="tiny",
        img_size=56,
        embed_dim=64,
        depth=4,
        num_heads=4,
        patch_embed_depth=2,
        patch_embed_num_heads=2,
        camera_trunk_depth=1,
        camera_num_heads=4,
        dpt_features=32,
        dpt_out_channels=(16, 32, 64, 64),
        dpt_intermediate_layer_idx=(0, 1, 2, 3),
    ),
}

HUB_ALIASES = {"facebook/VGGT-1B": "vggt-1b"}


def get_preset(name: str) -> VGGTConfig:
    key = HUB_ALIASES.get(name, name)
    if key not in PRESETS:
        raise InputError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[key]


def config_from_fixture(cfg: dict[str, Any]) -> VGGTConfig:
    """Build a config from the ``config`` block of a fixture JSON (the vggt-tiny-a format)."""
    try:
        agg, pe, cam = cfg["aggregator"], cfg["patch_embed"], cfg.get("camera_head")
        depth, point = cfg.get("depth_head"), cfg.get("point_head")
        dpt = depth or point
        if pe["embed_dim"] != agg["embed_dim"]:
            raise InputError(
                f"patch embed dim {pe['embed_dim']} differs from aggregator dim {agg['embed_dim']}"
            )
        kwargs: dict[str, Any] = dict(
            name=cfg.get("name", "fixture"),
            img_size=agg["img_size"],
            patch_size=agg["patch_size"],
            embed_dim=agg["embed_dim"],
            depth=agg["depth"],
            num_heads=agg["num_heads"],
            mlp_ratio=float(agg["mlp_ratio"]),
            num_register_tokens=agg["num_register_tokens"],
            qk_norm=bool(agg["qk_norm"]),
            rope_freq=float(agg["rope_freq"]),
            init_values=float(agg["init_values"]),
            aa_order=tuple(agg["aa_order"]),
            aa_block_size=agg["aa_block_size"],
            patch_embed="dinov2" if "Dino" in pe.get("class", "Dino") else "conv",
            patch_embed_depth=pe["depth"],
            patch_embed_num_heads=pe["num_heads"],
            patch_embed_mlp_ratio=float(pe["mlp_ratio"]),
            patch_embed_init_values=float(pe["init_values"]),
            patch_embed_img_size=pe["img_size"],
            enable_camera=cam is not None,
            enable_depth=depth is not None,
            enable_point=point is not None,
        )
        if cam is not None:
            kwargs.update(
                camera_trunk_depth=cam["trunk_depth"],
                camera_num_heads=cam["num_heads"],
                camera_mlp_ratio=float(cam["mlp_ratio"]),
                camera_init_values=float(cam["init_values"]),
                camera_iterations=cam.get("num_iterations", 4),
            )
        if dpt is not None:
            kwargs.update(
                dpt_features=dpt["features"],
                dpt_out_channels=tuple(dpt["out_channels"]),
                dpt_intermediate_layer_idx=tuple(dpt["intermediate_layer_idx"]),
            )
    except KeyError as e:
        raise InputError(f"fixture config is missing the field {e}") from e
    return VGGTConfig(**kwargs)

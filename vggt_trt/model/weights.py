"""Weight loading (official checkpoint files, Hugging Face snapshots or hub ids) and seeded random init."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import InputError, WeightsError
from .config import VGGTConfig, get_preset
from .vggt import VGGT

logger = logging.getLogger(__name__)

IGNORED_PREFIXES = ("track_head.",)
CHECKPOINT_NAMES = ("model.safetensors", "model.pt", "pytorch_model.bin", "model.pth")


def load_state_dict_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strictly load ``state`` (official key names) into ``model``; ``track_head.*`` is skipped."""
    state = dict(state)
    ignored = [k for k in state if k.startswith(IGNORED_PREFIXES)]
    if ignored:
        logger.info("%s: skipping %d track_head tensors (the track head is not part of this model)", source, len(ignored))
        for k in ignored:
            del state[k]
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if items:
                shown = ", ".join(items[:5]) + (f" ... (+{len(items) - 5} more)" if len(items) > 5 else "")
                parts.append(f"{len(items)} {label} keys: {shown}")
        raise WeightsError(f"{source} does not match the VGGT {getattr(model, 'cfg', None) and model.cfg.name} "
                           f"architecture: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or torch ``.pt/.pth/.bin`` state dict from disk."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the readers raise many unrelated types for a bad file
        raise WeightsError(f"cannot read weights file {path}: {e}") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return state


def resolve_checkpoint(source: str | Path) -> Path:
    """A file, a snapshot directory holding one of CHECKPOINT_NAMES, or a hub id downloaded via huggingface_hub."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise InputError(f"no checkpoint in {path}: expected one of {', '.join(CHECKPOINT_NAMES)}")
    if str(source).count("/") != 1 or path.suffix:
        raise InputError(f"weights not found: {source} is neither a file, a directory nor a hub id like facebook/VGGT-1B")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError as e:
        raise WeightsError("downloading from the hub needs huggingface_hub: pip install huggingface_hub") from e
    last_error: Exception | None = None
    for name in CHECKPOINT_NAMES[:2]:
        try:
            return Path(hf_hub_download(repo_id=str(source), filename=name))
        except EntryNotFoundError as e:
            if not isinstance(e, LocalEntryNotFoundError):
                last_error = e
                continue
            raise WeightsError(_offline_message(source, e)) from e
        except Exception as e:  # noqa: BLE001 - offline / auth / network errors all end the same way
            raise WeightsError(_offline_message(source, e)) from e
    raise WeightsError(f"{source} on the hub has none of {CHECKPOINT_NAMES[:2]}: {last_error}")


def _offline_message(source: str | Path, e: Exception) -> str:
    return (
        f"cannot download {source} from the Hugging Face hub ({type(e).__name__}: {e}). "
        f"When offline, pass a local file with --weights PATH/model.safetensors (or model.pt), "
        f"or a downloaded snapshot directory, or use --random-init."
    )


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded weights whose outputs depend on every layer (fan-in scaled, as the fixtures were made).

    Drawn on the parameters' device: the same seed gives the same weights on every CPU and on every
    CUDA GPU, but CPU and CUDA weights differ (different generators). A 1B model seeds in
    milliseconds on a GPU instead of about 20 s on the host.
    """
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=g, device=device)

    for name, p in model.named_parameters():
        if "gamma" in name:
            p.copy_(0.1 * (1 + 0.2 * randn(p.shape)))
        elif p.dim() >= 2 and not name.endswith(("_token", "_tokens", "pos_embed", "token")):
            fan_in = p.shape[0] if "resize_layers.0" in name or "resize_layers.1" in name else math.prod(p.shape[1:])
            p.copy_(randn(p.shape) / math.sqrt(fan_in))
        elif name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "_norm.weight")):
            p.fill_(1.0).add_(0.02 * randn(p.shape))
        else:
            p.copy_(0.02 * randn(p.shape))
    head = getattr(model, "camera_head", None)
    if head is not None:
        # keep the ReLU-activated field-of-view outputs positive (~1 rad) instead of clamped to 0
        head.pose_branch.fc2.weight[7:9] *= 0.1
        head.pose_branch.fc2.bias[7:9] += 1.0
    return model


def config_for_model_name(model_name: str) -> VGGTConfig:
    """Preset name (``tiny``, ``vggt-1b``) or hub id / snapshot directory (official VGGT-1B sizes)."""
    try:
        return get_preset(model_name)
    except InputError:
        if Path(model_name).is_dir() or model_name.count("/") == 1:
            return get_preset("vggt-1b")
        raise


def build_model(
    model_name: str = "facebook/VGGT-1B",
    weights: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    config: VGGTConfig | None = None,
    device: str | torch.device = "cpu",
) -> VGGT:
    """Our VGGT for a preset, hub id or local snapshot, with weights loaded (or seeded random) on ``device``.

    The modules are built without their default initialisation (on the meta device, then
    allocated on ``device``): every parameter is written by the seeded init or the checkpoint.
    """
    if config is None:
        config = config_for_model_name(model_name)
    with torch.device("meta"):
        model = VGGT(config)
    model.to_empty(device=device)
    model.aggregator.reset_buffers()
    if random_init or (weights is None and config.name == "tiny"):
        logger.info("model %s: seeded random weights (seed %d); outputs are not meaningful geometry", config.name, seed)
        init_random_weights(model, seed)
    else:
        source = weights if weights is not None else model_name
        path = resolve_checkpoint(source)
        logger.info("model %s: loading weights from %s", config.name, path)
        load_state_dict_into(model, read_checkpoint(path), source=str(path))
    return model.eval()

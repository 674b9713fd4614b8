"""Sana DiT hyper-parameters: the config dataclass, the released configurations, and shape inference.

A checkpoint's tensor shapes give depth, width, FFN width, caption width and qk-norm. Two things
they do not give: the cross-attention head count (16 for width 1152, 20 for width 2240 in every
release) and whether the 2K/4K sincos position embedding is used (the original ``pos_embed``
buffer holds it; diffusers files need their ``config.json`` or the file name).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError
from ..dcae.config import DCAEConfig
from ..guards import validate_config
from ..metadata import config_from_json, config_to_json

# Cross-attention heads of the released widths (SANA registry: SanaMS_600M_* 16 heads, 1600M/4800M 20 heads).
CROSS_HEADS_BY_WIDTH = {1152: 16, 2240: 20}

# Flow shift of the scheduler each release was trained/evaluated with (docs/SOURCES.md, Sana §3.2).
DEFAULT_SHIFT = 3.0
SHIFT_4K = 6.0

# Sana-Sprint's embedded guidance: the value its releases are run with (diffusers SanaSprintPipeline's
# guidance_scale default) and the factor the guidance embedder receives it multiplied by (cfg_embed_scale).
SPRINT_GUIDANCE = 4.5
SPRINT_GUIDANCE_SCALE = 0.1


# The latent Sana's DiT works in is the DC-AE f32c32's (its 32 channels at 1/32 of the image size, scaled by
# its scaling factor before the DiT sees it); the DiT's patch size 1 keeps that grid as its tokens.
_AUTOENCODER = DCAEConfig.sana_f32c32()
LATENT_CHANNELS = _AUTOENCODER.latent_channels
LATENT_DOWNSCALE = _AUTOENCODER.spatial_ratio
LATENT_SCALE = _AUTOENCODER.scaling_factor
# Width of the text conditioning: the hidden size of Gemma-2-2B, Sana's text encoder.
CAPTION_CHANNELS = 2304

# Sana's aspect-ratio bins as (width, height): ASPECT_RATIO_1024_BIN and _2048_BIN of PixArt/Sana, ordered
# from wide to tall; the 4096 bin is the 2048 bin doubled.
RATIO_BINS_1024 = ((2048, 512), (1856, 512), (1792, 576), (1728, 576), (1664, 576), (1600, 640), (1536, 640),
                   (1472, 704), (1408, 704), (1344, 704), (1344, 768), (1280, 768), (1216, 832), (1152, 832),
                   (1152, 896), (1088, 896), (1088, 960), (1024, 960), (1024, 1024), (960, 1024), (960, 1088),
                   (896, 1088), (896, 1152), (832, 1152), (832, 1216), (768, 1280), (768, 1344), (704, 1408),
                   (704, 1472), (640, 1536), (640, 1600), (576, 1728), (512, 2048))
RATIO_BINS_2048 = ((4096, 1024), (3968, 1024), (3840, 1024), (3712, 1024), (3584, 1152), (3456, 1152),
                   (3328, 1152), (3200, 1280), (3072, 1280), (2944, 1408), (2816, 1408), (2688, 1408), (2688, 1536),
                   (2560, 1536), (2432, 1664), (2304, 1664), (2304, 1792), (2176, 1792), (2176, 1920), (2048, 1920),
                   (2048, 2048), (1920, 2048), (1920, 2176), (1792, 2176), (1792, 2304), (1664, 2304), (1664, 2432),
                   (1536, 2560), (1536, 2688), (1408, 2816), (1408, 2944), (1280, 3072), (1280, 3200), (1152, 3328),
                   (1152, 3456), (1152, 3584), (1024, 3712), (1024, 3840), (1024, 3968), (1024, 4096))
RATIO_BINS_4096 = tuple((2 * w, 2 * h) for w, h in RATIO_BINS_2048)


def resolution_presets() -> dict[str, tuple[int, int]]:
    """``{"WxH": (W, H)}`` of every ratio bin, the squares of each bin first, in bin order."""
    presets: dict[str, tuple[int, int]] = {}
    for bins in (RATIO_BINS_1024, RATIO_BINS_2048, RATIO_BINS_4096):
        square = [size for size in bins if size[0] == size[1]]
        for w, h in square + [size for size in bins if size[0] != size[1]]:
            presets.setdefault(f"{w}x{h}", (w, h))
    return presets


def latent_shape(width: int, height: int, batch_size: int = 1) -> tuple[int, int, int, int]:
    """The latent of a ``width`` x ``height`` image (at least one latent pixel per side)."""
    return (batch_size, LATENT_CHANNELS, max(1, height // LATENT_DOWNSCALE), max(1, width // LATENT_DOWNSCALE))


@dataclass(frozen=True)
class SanaConfig:
    """Everything needed to build a :class:`~uniba.sana.model.SanaDiT`.

    ``pe_base_size``/``pe_interpolation`` only matter with ``use_pe``: positions span
    ``[0, pe_base_size / pe_interpolation)`` whatever the latent size (PixArt-style interpolation).
    """

    hidden_size: int = 2240
    depth: int = 20
    linear_head_dim: int = 32
    cross_heads: int = 20
    mlp_ratio: float = 2.5
    in_channels: int = LATENT_CHANNELS
    out_channels: int = LATENT_CHANNELS
    patch_size: int = 1
    caption_channels: int = CAPTION_CHANNELS
    qk_norm: bool = False
    cross_norm: bool = False
    use_pe: bool = False
    pe_base_size: int = 32
    pe_interpolation: float = 1.0
    # eps values of the original SANA code; diffusers uses 1e-5 for the cross-attention q/k norm
    cross_norm_eps: float = 1e-6
    qk_norm_eps: float = 1e-5
    linear_attention_eps: float = 1e-8
    flow_shift: float = DEFAULT_SHIFT
    # Sana-Sprint (TrigFlow/sCM distilled): a guidance embedder beside the timestep embedder, and the
    # timestep is the flow time in [0, 1] itself (timestep_norm_scale_factor 1000), never truncated
    guidance_embeds: bool = False
    guidance_embeds_scale: float = SPRINT_GUIDANCE_SCALE

    @property
    def is_sprint(self) -> bool:
        return self.guidance_embeds

    @property
    def linear_heads(self) -> int:
        return self.hidden_size // self.linear_head_dim

    @property
    def cross_head_dim(self) -> int:
        return self.hidden_size // self.cross_heads

    @property
    def ffn_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_json(self) -> str:
        return config_to_json(self)

    @classmethod
    def from_json(cls, text: str) -> SanaConfig:
        return config_from_json(cls, text)

    def replace(self, **changes: Any) -> SanaConfig:
        return replace(self, **changes)


def _release(**kw: Any) -> SanaConfig:
    return SanaConfig(**kw)


# The released checkpoints (docs/SOURCES.md, Sana §1.6/§1.7). Keys are the release names used on Hugging Face.
RELEASES: dict[str, SanaConfig] = {
    "Sana_600M_512px": _release(hidden_size=1152, depth=28, cross_heads=16, pe_base_size=16),
    "Sana_600M_1024px": _release(hidden_size=1152, depth=28, cross_heads=16),
    "Sana_1600M_512px": _release(hidden_size=2240, depth=20, cross_heads=20, pe_base_size=16),
    "Sana_1600M_1024px": _release(hidden_size=2240, depth=20, cross_heads=20),
    "Sana_1600M_2Kpx": _release(hidden_size=2240, depth=20, cross_heads=20, use_pe=True, pe_base_size=64,
                                pe_interpolation=1.0),
    "Sana_1600M_4Kpx": _release(hidden_size=2240, depth=20, cross_heads=20, use_pe=True, pe_base_size=128,
                                pe_interpolation=2.0, flow_shift=SHIFT_4K),
    "SANA1.5_1.6B_1024px": _release(hidden_size=2240, depth=20, cross_heads=20, qk_norm=True, cross_norm=True),
    "SANA1.5_4.8B_1024px": _release(hidden_size=2240, depth=60, cross_heads=20, qk_norm=True, cross_norm=True),
    "Sana_Sprint_0.6B_1024px": _release(hidden_size=1152, depth=28, cross_heads=16, qk_norm=True, cross_norm=True,
                                        guidance_embeds=True),
    "Sana_Sprint_1.6B_1024px": _release(hidden_size=2240, depth=20, cross_heads=20, qk_norm=True, cross_norm=True,
                                        guidance_embeds=True),
}


def diffusers_config_dict(config: SanaConfig, sample_size: int | None = None) -> dict[str, Any]:
    """The ``SanaTransformer2DModel`` constructor arguments of a config (tests build the oracle from it)."""
    return {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_attention_heads": config.linear_heads,
        "attention_head_dim": config.linear_head_dim,
        "num_layers": config.depth,
        "num_cross_attention_heads": config.cross_heads,
        "cross_attention_head_dim": config.cross_head_dim,
        "cross_attention_dim": config.hidden_size,
        "caption_channels": config.caption_channels,
        "mlp_ratio": config.mlp_ratio,
        "sample_size": sample_size or config.pe_base_size * config.patch_size,
        "patch_size": config.patch_size,
        "interpolation_scale": config.pe_interpolation if config.use_pe else None,
        "qk_norm": "rms_norm_across_heads" if config.qk_norm else None,
        "guidance_embeds": config.guidance_embeds,
        "guidance_embeds_scale": config.guidance_embeds_scale,
    }


def config_from_diffusers(data: dict[str, Any]) -> dict[str, Any]:
    """Config fields stated by a diffusers ``transformer/config.json`` (only what it really says)."""
    out: dict[str, Any] = {}
    if "num_attention_heads" in data and "attention_head_dim" in data:
        out["hidden_size"] = int(data["num_attention_heads"]) * int(data["attention_head_dim"])
        out["linear_head_dim"] = int(data["attention_head_dim"])
    if data.get("num_cross_attention_heads"):
        out["cross_heads"] = int(data["num_cross_attention_heads"])
    if "num_layers" in data:
        out["depth"] = int(data["num_layers"])
    if "qk_norm" in data:
        out["qk_norm"] = out["cross_norm"] = bool(data["qk_norm"])
    if data.get("guidance_embeds"):
        out["guidance_embeds"] = True
        if data.get("guidance_embeds_scale") is not None:
            out["guidance_embeds_scale"] = float(data["guidance_embeds_scale"])
    if "interpolation_scale" in data:
        scale = data["interpolation_scale"]
        out["use_pe"] = scale is not None
        if scale is not None:
            out["pe_interpolation"] = float(scale)
    if "sample_size" in data:
        out["pe_base_size"] = int(data["sample_size"]) // int(data.get("patch_size", 1) or 1)
        if out.get("use_pe") and out["pe_base_size"] >= 128:
            out["flow_shift"] = SHIFT_4K
    return out


def hints_from_name(name: str) -> dict[str, Any]:
    """2K/4K releases have the same tensors as 1024 ones in diffusers format: the file name tells them apart."""
    lowered = name.lower()
    if "4kpx" in lowered or "4096" in lowered or "_4k" in lowered:
        return {"use_pe": True, "pe_base_size": 128, "pe_interpolation": 2.0, "flow_shift": SHIFT_4K}
    if "2kpx" in lowered or "2048" in lowered or "_2k" in lowered:
        return {"use_pe": True, "pe_base_size": 64, "pe_interpolation": 1.0}
    return {}


# Present exactly in Sana-Sprint transformers (our keys): the guidance embedder's first layer.
SPRINT_GUIDANCE_KEY = "time_embed.guidance_embedder.linear_1.weight"

_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.scale_shift_table\Z")


def infer_config(state_dict: Mapping[str, torch.Tensor], hints: Mapping[str, Any] | None = None,
                 path: str | os.PathLike | None = None) -> SanaConfig:
    """Hyper-parameters from tensor shapes (our keys), completed by ``hints`` (config.json, file name...).

    The shapes give depth, widths, channels and the norms; the hints what they cannot tell.
    """
    hints = dict(hints or {})
    try:
        patch = state_dict["patch_embed.proj.weight"]
        hidden, in_channels, p = int(patch.shape[0]), int(patch.shape[1]), int(patch.shape[2])
        depth = 1 + max(int(m[1]) for k in state_dict if (m := _BLOCK.match(k)))
        ffn_hidden = int(state_dict["transformer_blocks.0.ff.conv_point.weight"].shape[1])
        caption_channels = int(state_dict["caption_projection.linear_1.weight"].shape[1])
        out_channels = int(state_dict["proj_out.weight"].shape[0]) // (p * p)
    except (KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(path, f"is missing a tensor needed to read the Sana DiT configuration ({exc}).",
                              "The file is incomplete or not a supported Sana release.") from None
    mlp_ratio = ffn_hidden / hidden
    if int(hidden * mlp_ratio) != ffn_hidden:
        mlp_ratio = round(mlp_ratio, 6)
    cross_heads = hints.pop("cross_heads", None)  # 0 from damaged metadata is refused below, not replaced
    if cross_heads is None:
        cross_heads = CROSS_HEADS_BY_WIDTH.get(hidden)
    if cross_heads is None:
        raise CheckpointError(path, f"has hidden size {hidden}, which no Sana release uses, so its cross-attention "
                                    "head count is unknown.", _sidecar_fix(path))
    fields_known = {f.name for f in fields(SanaConfig)}
    derived = {
        "hidden_size": hidden, "depth": depth, "cross_heads": cross_heads, "mlp_ratio": mlp_ratio,
        "in_channels": in_channels, "out_channels": out_channels, "patch_size": p,
        "caption_channels": caption_channels,
        "qk_norm": "transformer_blocks.0.attn1.norm_q.weight" in state_dict,
        "cross_norm": "transformer_blocks.0.attn2.norm_q.weight" in state_dict,
        "guidance_embeds": SPRINT_GUIDANCE_KEY in state_dict,
    }
    for shape_fact in ("hidden_size", "depth", "qk_norm", "cross_norm", "guidance_embeds"):
        hints.pop(shape_fact, None)  # the tensors are the truth
    derived.update({k: v for k, v in hints.items() if k in fields_known})
    return validate_config(SanaConfig(**derived), path, "its configuration (from the weights, metadata and config "
                                                        "files)")


def _sidecar_fix(path: str | os.PathLike | None) -> str:
    """Which file states the missing config: ``<name>.json`` beside the model (a folder's own config.json)."""
    if path is None:
        return "Pass cross_heads= (num_cross_attention_heads of the model's diffusers config)."
    path = Path(path)
    if path.is_dir():
        return (f"Put the model's diffusers config.json (with num_cross_attention_heads) into {path}.")
    return (f"Save the model's diffusers transformer config (with num_cross_attention_heads) as "
            f"'{path.with_suffix('.json').name}' beside it, in {path.parent}. A config.json in that folder "
            "would also be read, but for every model file there.")

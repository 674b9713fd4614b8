"""Sana ControlNet (the HED ControlNets of the Sana 600M/1600M releases) as diffusers' ``SanaControlNetModel``.

A copy of the DiT's first ``depth`` blocks (7 in the releases) with its own embedders. The control image enters
as a DC-AE latent (scaled like any Sana latent), goes through the same patch embedding and a zero-initialised
``input_block``, and is added to the embedded noisy latent; every block's output goes through its own
zero-initialised ``controlnet_blocks[i]`` and is added to the DiT after its block ``i + 1``
(:class:`uniba.sana.model.SanaDiT`, the ``control`` input). Parameter names are diffusers'; original ``.pth``
files (``controlnet.N.copied_block.*``, ``before_proj``/``after_proj``, the embedders of the base model they were
saved with) are converted as diffusers' ``convert_sana_controlnet_to_diffusers.py`` does.

Two wirings (``WIRINGS``; docs/sana-adapters.md):

* ``"diffusers"`` (default, parity-tested against ``SanaControlNetPipeline``): the branch starts from the embedded
  noisy latent; residual ``i`` is added after DiT block ``i + 1``.
* ``"nvlabs"``, as NVlabs' ``SanaMSControlNet`` that trained the released weights: the branch starts from the
  output of the DiT's first block (the original ``.pth`` carries that block, ``blocks.0.*``); residual ``i`` is
  added after DiT block ``i``.

The output is aligned with the DiT's blocks: item ``j`` is added after block ``j`` (None: nothing).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import CheckpointError, load_model, read_state_dict, stored_dtype, wrong_family_error
from . import keys as sana_keys
from .config import SanaConfig, config_from_diffusers, infer_config
from .loader import find_sidecar
from .model import (
    AdaLNSingle,
    DefaultOps,
    Mlp2,
    PatchEmbed,
    RMSNorm,
    SanaBlock,
    caption_condition,
    sincos_position_embedding,
)

FAMILY = "Sana ControlNet"
# the original file holds the whole base DiT it was trained with; these parts are the ControlNet's
_ORIGINAL_EMBEDDERS = ("x_embedder.", "t_embedder.", "t_block.", "y_embedder.y_proj.", "attention_y_norm.")
_COPIED = re.compile(r"controlnet\.(\d+)\.copied_block\.(.+)\Z")
_BEFORE = re.compile(r"controlnet\.0\.before_proj\.(weight|bias)\Z")
_AFTER = re.compile(r"controlnet\.(\d+)\.after_proj\.(weight|bias)\Z")
DIFFUSERS_MARKERS = ("input_block.weight", "controlnet_blocks.0.weight")
WIRINGS = ("diffusers", "nvlabs")
_BASE_BLOCK = "base_block."  # the DiT's first block, kept for the NVlabs wiring
ORIGINAL_MARKERS = ("controlnet.0.before_proj.weight", "controlnet.0.after_proj.weight")


class SanaControlNet(nn.Module):
    """``forward(x, hint, timestep, context, context_mask) -> [residual (B, N, C) or None per DiT block]``
    (unscaled)."""

    def __init__(self, config: SanaConfig, operations: Any = None, device: Any = None,
                 dtype: torch.dtype | None = None, wiring: str = "diffusers") -> None:
        super().__init__()
        if wiring not in WIRINGS:
            raise ValueError(f"wiring must be one of {', '.join(WIRINGS)}, got {wiring!r}.")
        ops = operations or DefaultOps
        self.wiring = wiring
        factory = {"device": device, "dtype": dtype}
        c = config.hidden_size
        self.config = config
        self.compute_dtype: torch.dtype | None = None
        self.patch_embed = PatchEmbed(ops, config, **factory)
        self.time_embed = AdaLNSingle(ops, c, **factory)
        self.caption_projection = Mlp2(ops, config.caption_channels, c, nn.GELU(approximate="tanh"), **factory)
        self.caption_norm = RMSNorm(c, 1e-5, **factory)
        self.transformer_blocks = nn.ModuleList([SanaBlock(ops, config, **factory) for _ in range(config.depth)])
        self.input_block = ops.Linear(c, c, **factory)
        self.controlnet_blocks = nn.ModuleList([ops.Linear(c, c, **factory) for _ in range(config.depth)])
        self.base_block = SanaBlock(ops, config, **factory) if wiring == "nvlabs" else None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _embed(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        tokens = self.patch_embed(x)
        if self.config.use_pe:
            cfg = self.config
            tokens = tokens + sincos_position_embedding(cfg.hidden_size, h, w, cfg.pe_base_size,
                                                        cfg.pe_interpolation, tokens.device, tokens.dtype)[None]
        return tokens

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timestep: torch.Tensor | float, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        b, _, height, width = x.shape
        if tuple(hint.shape[-2:]) != (height, width):
            raise ValueError(f"the control latent is {tuple(hint.shape[-2:])} cells, the latent being sampled "
                             f"{(height, width)}: encode the control image at the output size.")
        p = self.config.patch_size
        h, w = height // p, width // p
        dtype = self.compute_dtype or self.dtype
        if hint.shape[0] != b:
            hint = hint.repeat(b // hint.shape[0], 1, 1, 1) if b % hint.shape[0] == 0 else hint[:1].expand(b, -1, -1,
                                                                                                              -1)
        tokens = self._embed(x.to(dtype), h, w)
        control = self.input_block(self._embed(hint.to(x.device, dtype), h, w))
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1)
        if timestep.numel() == 1:
            timestep = timestep.expand(b)
        t0, _ = self.time_embed(timestep.long().float(), dtype)  # integer timesteps, as the DiT
        context, bias = caption_condition(self.caption_projection, self.caption_norm, context, context_mask, b,
                                          x.device, dtype)
        if self.base_block is not None:
            tokens = self.base_block(tokens, context, bias, t0, h, w)
        tokens = tokens + control
        residuals: list[torch.Tensor | None] = [] if self.base_block is not None else [None]
        for block, out in zip(self.transformer_blocks, self.controlnet_blocks):
            tokens = block(tokens, context, bias, t0, h, w)
            residuals.append(out(tokens))
        return residuals


def detect_controlnet_format(keys: Mapping[str, Any] | list[str]) -> str | None:
    """``"original"``, ``"diffusers"`` or None (not a Sana ControlNet)."""
    keys = set(keys)
    if all(m in keys for m in ORIGINAL_MARKERS):
        return "original"
    if all(m in keys for m in DIFFUSERS_MARKERS) and "transformer_blocks.0.attn1.to_q.weight" in keys:
        return "diffusers"
    return None


def original_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original ControlNet ``.pth`` (whole SanaMSControlNet) -> the ControlNet's tensors in our names."""
    picked: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("blocks.0."):
            picked["blocks.999." + key[len("blocks.0."):]] = value  # the DiT's first block, renamed below
        elif m := _COPIED.match(key):
            picked[f"blocks.{m[1]}.{m[2]}"] = value
        elif m := _BEFORE.match(key):
            extra[f"input_block.{m[1]}"] = value
        elif m := _AFTER.match(key):
            extra[f"controlnet_blocks.{m[1]}.{m[2]}"] = value
        elif key.startswith(_ORIGINAL_EMBEDDERS):
            picked[key] = value
        # anything else is the base DiT's own weights (blocks.*, final_layer.*, pos_embed): not the ControlNet's
    out = {}
    for key, value in sana_keys.original_to_ours(picked).items():
        out[_BASE_BLOCK + key[len("transformer_blocks.999."):] if key.startswith("transformer_blocks.999.")
            else key] = value
    out.update(extra)
    return out


def _sidecar(path: Path) -> dict[str, Any]:
    found = find_sidecar(path, lambda data: data.get("_class_name") == "SanaControlNetModel")
    return {} if found is None else config_from_diffusers(found[1])


def read_controlnet(source: str | os.PathLike | Mapping[str, torch.Tensor],
                    overrides: Mapping[str, Any] | None = None,
                    wiring: str = "diffusers") -> tuple[dict[str, torch.Tensor], SanaConfig]:
    """Read a Sana ControlNet (original ``.pth``/safetensors or diffusers) -> (state dict in our names, config).

    The DiT's first block that an original file carries is kept for the ``"nvlabs"`` wiring, dropped otherwise.
    """
    path = None if isinstance(source, Mapping) else Path(source)
    raw = dict(source) if path is None else read_state_dict(path)
    raw = sana_keys.strip_prefix(raw) if not any(k.startswith("controlnet.") for k in raw) else raw
    fmt = detect_controlnet_format(raw.keys())
    if fmt is None:
        if sana_keys.detect_format(raw.keys()) is not None:
            raise CheckpointError(path, "is a Sana DiT, not a Sana ControlNet.",
                                  "Load it with 'Sana DiT Loader'; choose a ControlNet file (e.g. "
                                  "Sana_1600M_1024px_BF16_ControlNet_HED.pth) here.")
        raise wrong_family_error(path, FAMILY, raw.keys(), "Choose a Sana ControlNet (e.g. "
                                 "Sana_1600M_1024px_BF16_ControlNet_HED.pth or a diffusers SanaControlNetModel).")
    hints: dict[str, Any] = {}
    if path is not None:
        hints.update(_sidecar(path))
    hints.update(overrides or {})
    converted = original_to_ours(raw) if fmt == "original" else raw
    has_base = any(k.startswith(_BASE_BLOCK) for k in converted)
    if wiring == "nvlabs" and not has_base:
        raise CheckpointError(path, "has no copy of the DiT's first block, which the NVlabs wiring starts from (only "
                                    "the original .pth of the release carries it, as blocks.0.*).",
                              "Choose wiring 'diffusers' for this file, or load the original .pth.")
    if wiring != "nvlabs":
        converted = {k: v for k, v in converted.items() if not k.startswith(_BASE_BLOCK)}
    # a ControlNet has no output layer; infer_config reads the latent channels from it, so show it one on meta
    shapes = {k: v for k, v in converted.items() if not k.startswith(_BASE_BLOCK)}
    patch = converted.get("patch_embed.proj.weight")
    if patch is not None:
        shapes["proj_out.weight"] = torch.empty(int(patch.shape[1]) * int(patch.shape[2]) ** 2, 0, device="meta")
    config = infer_config(shapes, hints, path)
    return converted, config


def load_controlnet(source: str | os.PathLike | Mapping[str, torch.Tensor], dtype: torch.dtype | None = None, *,
                    device: str | torch.device = "cpu", operations: Any = None,
                    overrides: Mapping[str, Any] | None = None, wiring: str = "diffusers",
                    model_class: type[SanaControlNet] = SanaControlNet) -> SanaControlNet:
    """A :class:`SanaControlNet` from a file, a diffusers folder or a state dict; keys checked strictly.

    ``model_class`` lets a host call the same module under its own calling convention (ComfyUI's ControlNet).
    """
    state, config = read_controlnet(source, overrides, wiring)
    path = None if isinstance(source, Mapping) else source
    return load_model(lambda: model_class(config, operations=operations, wiring=wiring), state, path=path,
                      family=FAMILY, dtype=dtype or stored_dtype(state) or torch.float32, device=device)


def control_residuals(controlnet: SanaControlNet, x: torch.Tensor, hint: torch.Tensor, timestep: torch.Tensor,
                      context: torch.Tensor, context_mask: torch.Tensor | None, strength: float = 1.0
                      ) -> dict[str, list[torch.Tensor]]:
    """The DiT's ``control`` input: the residuals times ``strength`` (diffusers' ``conditioning_scale``)."""
    residuals = controlnet(x, hint, timestep, context, context_mask)
    return {"output": [None if r is None else r * strength for r in residuals]}


__all__ = ["SanaControlNet", "control_residuals", "detect_controlnet_format", "load_controlnet", "read_controlnet"]

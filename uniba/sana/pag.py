"""Perturbed-attention guidance (PAG, arXiv 2403.17377) for Sana, as diffusers' ``SanaPAGPipeline`` computes it.

A third model evaluation runs with the self-attention of the chosen blocks replaced by identity attention
(each token sees only itself: ``to_out(to_v(x))``); the guided velocity is
``v_uncond + cfg * (v_cond - v_uncond) + scale * (v_cond - v_perturbed)``, where ``scale`` may shrink over the
sampling (``adaptive_scale``: ``max(scale - adaptive_scale * (1000 - t), 0)``, t = sigma * 1000). The same holds
for the denoised x0 of flow models, because x0 = x - sigma * v is affine in v. The model takes the perturbed
blocks through its per-call options (:data:`uniba.sana.model.PERTURBED_BLOCKS_OPTION`).
"""

from __future__ import annotations

import re

import torch

from .model import PERTURBED_BLOCKS_OPTION

__all__ = ["PERTURBED_BLOCKS_OPTION", "guided", "parse_layers", "scale_at"]

DEFAULT_LAYERS = "8"  # the Sana 1600M release configs' pag_applied_layers
_LAYER = re.compile(r"(?:transformer_blocks\.|blocks\.)?(\d+)\Z")


def parse_layers(text: str, depth: int) -> tuple[int, ...]:
    """``"8"``, ``"7, 8"`` or ``"transformer_blocks.8"`` -> block indices, checked against the model's depth."""
    out: list[int] = []
    for part in (p.strip() for p in text.replace(";", ",").split(",")):
        if not part:
            continue
        m = _LAYER.match(part)
        if m is None:
            raise ValueError(f"applied_layers: '{part}' is not a block index; write block numbers separated by "
                             f"commas, e.g. '8' or '7, 8' (0 to {depth - 1}).")
        index = int(m[1])
        if index >= depth:
            raise ValueError(f"applied_layers: block {index} does not exist, this Sana model has {depth} blocks "
                             f"(0 to {depth - 1}).")
        if index not in out:
            out.append(index)
    if not out:
        raise ValueError(f"applied_layers is empty: name at least one block (0 to {depth - 1}), e.g. '8'.")
    return tuple(out)


def scale_at(scale: float, adaptive_scale: float, timestep: float) -> float:
    """PAG scale at model timestep ``t`` (sigma * 1000), diffusers' ``_get_pag_scale``."""
    if adaptive_scale <= 0:
        return scale
    return max(scale - adaptive_scale * (1000.0 - float(timestep)), 0.0)


def guided(uncond: torch.Tensor | None, cond: torch.Tensor, perturbed: torch.Tensor, cfg: float,
           scale: float) -> torch.Tensor:
    """CFG plus PAG on velocities or denoised x0 (``uncond`` None: PAG alone, no CFG)."""
    base = cond if uncond is None else uncond + cfg * (cond - uncond)
    return base + scale * (cond - perturbed)

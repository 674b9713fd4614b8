"""Tiny random Sana DiT checkpoints with the real key layout, for tests (no download)."""

from __future__ import annotations

from pathlib import Path

import torch

from uniba.checkpoint import save_safetensors
from uniba.sana.config import SanaConfig
from uniba.sana.keys import ours_to_original
from uniba.sana.loader import METADATA_KEY
from uniba.sana.model import SanaDiT

TINY = SanaConfig(hidden_size=64, depth=2, cross_heads=4, caption_channels=2304)


def tiny_sana_state_dict(config: SanaConfig = TINY, seed: int = 0, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Random weights of a :class:`SanaDiT` in our (diffusers) key names."""
    generator = torch.Generator().manual_seed(seed)
    model = SanaDiT(config)
    return {k: torch.randn(v.shape, generator=generator) * scale for k, v in model.state_dict().items()}


def to_original_format(state_dict: dict[str, torch.Tensor], config: SanaConfig) -> dict[str, torch.Tensor]:
    """The same weights as an original SANA checkpoint, including the buffers the loader must ignore."""
    original = ours_to_original(state_dict)
    original["pos_embed"] = torch.zeros(1, config.pe_base_size**2, config.hidden_size)
    original["y_embedder.y_embedding"] = torch.randn(300, config.caption_channels)
    return original


def write_tiny_sana_dit(folder: Path, name: str = "sana_tiny.safetensors", fmt: str = "original", *,
                        config: SanaConfig = TINY, seed: int = 0) -> Path:
    """Write a tiny random Sana DiT (``fmt`` "original" or "diffusers" keys) and return its path.

    The config the shapes cannot tell (cross-attention heads, PE) is stored in the safetensors
    metadata, which :func:`uniba.sana.load_sana` reads.
    """
    if fmt not in ("original", "diffusers"):
        raise ValueError(f"fmt must be 'original' or 'diffusers', got {fmt!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = tiny_sana_state_dict(config, seed)
    if fmt == "original":
        state = to_original_format(state, config)
    path = folder / name
    save_safetensors(state, path, metadata={METADATA_KEY: config.to_json()})
    return path


# Sana-Sprint: qk/cross norms and the guidance embedder, caption width kept small for speed.
TINY_SPRINT = SanaConfig(hidden_size=64, depth=2, cross_heads=4, caption_channels=48, qk_norm=True, cross_norm=True,
                         guidance_embeds=True)


def tiny_sprint_oracle(seed: int = 0, scale: float = 0.2):
    """diffusers' SanaTransformer2DModel of :data:`TINY_SPRINT` with random weights (test-only oracle)."""
    from diffusers import SanaTransformer2DModel

    from uniba.sana.config import diffusers_config_dict

    generator = torch.Generator().manual_seed(seed)
    model = SanaTransformer2DModel(**diffusers_config_dict(TINY_SPRINT)).eval()
    with torch.no_grad():
        for value in model.state_dict().values():
            value.copy_(torch.randn(value.shape, generator=generator) * scale)
    return model


def write_tiny_sprint_pth(state_dict: dict[str, torch.Tensor], folder: Path,
                          name: str = "Sana_Sprint_tiny.pth") -> Path:
    """Diffusers-key Sprint weights as SANA's original Sprint checkpoint: ``{"state_dict": ...}`` with
    ``cfg_embedder``, ``logvar_linear`` and the buffers the loader must ignore."""
    original = to_original_format(dict(state_dict), TINY_SPRINT)
    original["logvar_linear.weight"] = torch.randn(1, TINY_SPRINT.hidden_size)
    original["logvar_linear.bias"] = torch.zeros(1)
    path = Path(folder) / name
    torch.save({"state_dict": original}, path)
    return path

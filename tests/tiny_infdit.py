"""Tiny random Inf-DiT checkpoints with the released SAT key layout, for tests (no download)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from uniba.checkpoint import save_safetensors
from uniba.infdit.config import ClipVisionConfig, InfDiTConfig
from uniba.infdit.keys import ours_to_sat
from uniba.infdit.model import InfDiT, rope_frequencies

TINY_CLIP = ClipVisionConfig(width=64, layers=1, heads=1, patch_size=8, image_size=32, mlp_hidden=128, output_dim=16)
TINY = InfDiTConfig(hidden_size=32, num_layers=2, num_heads=2, mlp_hidden=64, block_tokens=8, lr_block_tokens=4,
                    vector_dim=16, time_channels=32, rope_grid=128, clip=TINY_CLIP)


def random_state_dict(config: InfDiTConfig = TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in our key names: fan-in scaled matrices, LayerNorm weights near 1, unit-scale embeddings."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = InfDiT(config)
    state = {}
    for key, value in model.state_dict().items():
        draw = torch.randn(value.shape, generator=generator)
        if value.ndim >= 2 and not key.endswith(("_pos", "block_pos", "positional_embedding")):
            fan_in = value[0].numel() if key != "clip.proj" else value.shape[0]
            gain = 0.5 if "adaln" in key else (5.0 if key == "clip_embed.0.weight" else 1.0)
            state[key] = draw * gain / fan_in**0.5
        elif "norm" in key or re.search(r"(^|\.)ln_\w+\.", key):
            state[key] = 1 + 0.2 * draw if key.endswith("weight") else 0.2 * draw
        elif key.endswith("bias"):
            state[key] = 0.1 * draw
        else:
            state[key] = 0.5 * draw
    return state


def rope_buffers(config: InfDiTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's (grid, grid, head_dim) RoPE tables, as stored in the released state dict."""
    freqs = rope_frequencies(config.head_dim, config.rope_theta, torch.device("cpu")).repeat_interleave(2)
    pos = torch.arange(config.rope_grid).float()[:, None] * freqs
    g = config.rope_grid
    angles = torch.cat([pos[:, None].expand(g, g, -1), pos[None].expand(g, g, -1)], dim=-1)
    return angles.cos(), angles.sin()


def sat_state_dict(config: InfDiTConfig = TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict exactly like the release's ``module``: SAT names plus the tensors the loader ignores."""
    ours = random_state_dict(config, seed)
    sat = {ours_to_sat(k): v for k, v in ours.items()}
    cos, sin = rope_buffers(config)
    sat["mixins.adaln_layer.rope.freqs_cos"] = cos
    sat["mixins.adaln_layer.rope.freqs_sin"] = sin
    for n in range(config.num_layers):
        sat[f"mixins.adaln_layer.k_layer_norm.{n}.weight"] = torch.ones(config.head_dim)
        sat[f"mixins.adaln_layer.k_layer_norm.{n}.bias"] = torch.zeros(config.head_dim)
    sat["transformer.position_embeddings.weight"] = torch.zeros(256, config.hidden_size)
    if config.clip is not None:
        width = config.clip.output_dim
        sat["image_encoder.model.token_embedding.weight"] = torch.zeros(16, width)
        sat["image_encoder.model.positional_embedding"] = torch.zeros(8, width)
        sat["image_encoder.model.text_projection"] = torch.zeros(width, width)
        sat["image_encoder.model.logit_scale"] = torch.tensor(4.6)
    return sat


def write_tiny_infdit(folder: Path, name: str = "infdit_tiny.safetensors", *, config: InfDiTConfig = TINY,
                      seed: int = 0) -> Path:
    """Write a tiny random Inf-DiT (SAT key layout, tiny CLIP tower included) and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    state = sat_state_dict(config, seed)
    if name.endswith((".pt", ".pth")):
        torch.save({"module": state, "global_steps": 1}, path)
    else:
        save_safetensors(state, path)
    return path


def load_tiny_infdit(config: InfDiTConfig = TINY, seed: int = 0):
    """A random tiny Inf-DiT loaded through the real loader (state dict under the reference's key names)."""
    from uniba.infdit import load_infdit
    from uniba.infdit.keys import ours_to_sat

    return load_infdit({ours_to_sat(k): v for k, v in random_state_dict(config, seed=seed).items()})

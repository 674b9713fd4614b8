"""Tiny random Inf-DiT checkpoints with the released SAT key layout, for tests (no download)."""

from __future__ import annotations

import argparse
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


def deepspeed_model_states(sd: dict[str, torch.Tensor]) -> dict[str, object]:
    """Every entry SAT 0.4.12's ``save_checkpoint`` and DeepSpeed's ``_save_checkpoint`` put in
    ``mp_rank_00_model_states.pt`` (RNG states saved, as without ``--no-save-rng``)."""
    import collections
    import random

    import numpy as np

    shapes = collections.OrderedDict((k, v.shape) for k, v in sd.items())
    return {
        "module": sd,
        "buffer_names": [],
        "optimizer": None,
        "param_shapes": [shapes],
        "frozen_param_shapes": None,
        "shared_params": {},
        "frozen_param_fragments": None,
        "lr_scheduler": {"start_lr": 1e-4, "warmup_iter": 100, "num_iters": 5000, "decay_style": "cosine"},
        "data_sampler": None,
        "random_ltd": None,
        "sparse_tensor_module_names": set(),
        "skipped_steps": 0,
        "global_steps": 5000,
        "global_samples": 640000,
        "dp_world_size": 64,
        "mp_world_size": 1,
        "ds_config": {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}, "zero_optimization":
                      {"stage": 1}},
        "ds_version": "0.12.4",
        "iteration": 5000,
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.RandomState(7).get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
        "rng_tracker_states": {"model-parallel-rng": torch.zeros(16, dtype=torch.uint8)},
        "args": argparse.Namespace(hidden_size=1280, num_layers=28, bf16=True, lr=1e-4, deepspeed_config=None),
    }


def write_tiny_infdit(folder: Path, name: str = "infdit_tiny.safetensors", *, config: InfDiTConfig = TINY,
                      seed: int = 0) -> Path:
    """Write a tiny random Inf-DiT (SAT key layout, tiny CLIP tower included) and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    state = sat_state_dict(config, seed)
    if name.endswith((".pt", ".pth")):
        torch.save(deepspeed_model_states(state), path)
    else:
        save_safetensors(state, path)
    return path


def load_tiny_infdit(config: InfDiTConfig = TINY, seed: int = 0):
    """A random tiny Inf-DiT loaded through the real loader (state dict under the reference's key names)."""
    from uniba.infdit import load_infdit
    from uniba.infdit.keys import ours_to_sat

    return load_infdit({ours_to_sat(k): v for k, v in random_state_dict(config, seed=seed).items()})


GOLDEN_A = Path(__file__).resolve().parent / "data" / "infdit_tiny_a.safetensors"


def load_golden(path: Path = GOLDEN_A, dtype: torch.dtype | None = None) -> tuple[InfDiT, dict[str, torch.Tensor]]:
    """The golden fixture: the tiny reference model (SAT keys) and its ``golden.*`` reference tensors, split
    here so the engine's loader never sees fixture keys."""
    from safetensors.torch import load_file

    from uniba.infdit import load_infdit

    tensors = load_file(str(path))
    golden = {k[len("golden."):]: v for k, v in tensors.items() if k.startswith("golden.")}
    return load_infdit({k: v for k, v in tensors.items() if not k.startswith("golden.")}, dtype), golden


def plan_and_upscale(model: InfDiT, lr: torch.Tensor, *, scale: int = 4, steps: int = 20, sampler=None,
                     sigmas: torch.Tensor | None = None, block_batch="auto", offload_cache="auto",
                     free_bytes: int | None = None, **run) -> torch.Tensor:
    """Plan with :func:`uniba.infdit.plan_upscale` (block batch auto: from the free memory, as a caller without a
    budget would) and run that plan: the shortest way for tests to upscale with a few settings."""
    from uniba.infdit import plan_upscale, resolve_sampling, upscale
    from uniba.memory import device_free_bytes

    lr4 = lr if lr.ndim == 4 else lr[None]
    if free_bytes is None and block_batch in (None, "auto", ""):
        free_bytes = device_free_bytes(model.device)
    plan = plan_upscale(model.config, lr4.shape[-2], lr4.shape[-1], scale, free_bytes=free_bytes,
                        sampling=resolve_sampling(sampler, sigmas, steps), block_batch=block_batch,
                        offload_cache="on" if offload_cache is True else "off" if offload_cache is False
                        else offload_cache, dtype=model.dtype, weights_resident=True)
    return upscale(model, lr, plan, **run)

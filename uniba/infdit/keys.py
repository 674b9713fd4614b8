"""Key names: the released SAT/DeepSpeed checkpoint <-> this package's modules (docs/SOURCES.md, Inf-DiT §4.1, §7.1).

Kept apart from the model so the model's attribute names stay readable. ``IGNORED`` lists, with
the reason, every tensor of a release file that is deliberately not loaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .config import OPEN_CLIP_PREFIX, SAT_CLIP_PREFIX

# Tensors of the released file that the model does not load, and why.
IGNORED: tuple[str, ...] = (
    # RoPE tables (2 x 1024x1024x80): recomputed analytically from positions (identical values).
    "mixins.adaln_layer.rope.freqs_cos",
    "mixins.adaln_layer.rope.freqs_sin",
    # The reference normalises keys with q_layer_norm; k_layer_norm is never read.
    "mixins.adaln_layer.k_layer_norm.*",
    # SAT's absolute position table: Inf-DiT uses RoPE + block slot embeddings instead.
    "transformer.position_embeddings.weight",
    # Text side of the open_clip model kept in the checkpoint; only the visual tower is used.
    "image_encoder.model.token_embedding.weight",
    "image_encoder.model.positional_embedding",
    "image_encoder.model.text_projection",
    "image_encoder.model.logit_scale",
    "image_encoder.model.ln_final.*",
    "image_encoder.model.transformer.*",
    "image_encoder.model.attn_mask",
)

_GLOBAL = {
    "mixins.patch_embed.proj.": "patch_embed.",
    "time_embed.mlp.0.": "t_embed.0.",
    "time_embed.mlp.2.": "t_embed.2.",
    "cond_embed.map_vector.0.": "clip_embed.0.",
    "cond_embed.map_vector.2.": "clip_embed.2.",
    "mixins.adaln_layer.re_pos_embed": "block_pos",
    "mixins.adaln_layer.proj_lr.": "lr_xattn.proj_lr.",
    "mixins.adaln_layer.cross_attention.query.": "lr_xattn.query.",
    "mixins.adaln_layer.cross_attention.key_value.": "lr_xattn.key_value.",
    "mixins.adaln_layer.cross_attention.dense.": "lr_xattn.proj.",
    "mixins.adaln_layer.post_cross_attention_layernorm.": "lr_xattn.post_norm.",
    "mixins.adaln_layer.cross_q_ln.": "lr_xattn.q_norm.",
    "mixins.adaln_layer.cross_k_ln.": "lr_xattn.k_norm.",
    "mixins.adaln_layer.lr_query_position_embedding": "lr_xattn.query_pos",
    "mixins.adaln_layer.lr_key_position_embedding": "lr_xattn.key_pos",
    "mixins.final_layer.adaLN_modulation.1.": "final.adaln.",
    "mixins.final_layer.linear.": "final.linear.",
    SAT_CLIP_PREFIX: "clip.",
}

_LAYER = (
    (re.compile(r"^transformer\.layers\.(\d+)\.attention\.query_key_value\.(\w+)$"), "blocks.{}.attn.qkv.{}"),
    (re.compile(r"^transformer\.layers\.(\d+)\.attention\.dense\.(\w+)$"), "blocks.{}.attn.proj.{}"),
    (re.compile(r"^transformer\.layers\.(\d+)\.mlp\.dense_h_to_4h\.(\w+)$"), "blocks.{}.mlp.fc1.{}"),
    (re.compile(r"^transformer\.layers\.(\d+)\.mlp\.dense_4h_to_h\.(\w+)$"), "blocks.{}.mlp.fc2.{}"),
    (re.compile(r"^mixins\.adaln_layer\.adaLN_modulations\.(\d+)\.1\.(\w+)$"), "blocks.{}.adaln.{}"),
    (re.compile(r"^mixins\.adaln_layer\.q_layer_norm\.(\d+)\.(\w+)$"), "blocks.{}.qk_norm.{}"),
)


def sat_to_ours(key: str) -> str | None:
    """Our name for a SAT checkpoint key, or None when the key is not part of the model."""
    for pattern, template in _LAYER:
        match = pattern.match(key)
        if match:
            return template.format(*match.groups())
    for old, new in _GLOBAL.items():
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old):]
    return None


def ours_to_sat(key: str) -> str:
    """The SAT checkpoint key of one of our keys (inverse of :func:`sat_to_ours`)."""
    match = re.match(r"^blocks\.(\d+)\.(.+)$", key)
    if match:
        index, rest = match.groups()
        inverse = {
            "attn.qkv.": f"transformer.layers.{index}.attention.query_key_value.",
            "attn.proj.": f"transformer.layers.{index}.attention.dense.",
            "mlp.fc1.": f"transformer.layers.{index}.mlp.dense_h_to_4h.",
            "mlp.fc2.": f"transformer.layers.{index}.mlp.dense_4h_to_h.",
            "adaln.": f"mixins.adaln_layer.adaLN_modulations.{index}.1.",
            "qk_norm.": f"mixins.adaln_layer.q_layer_norm.{index}.",
        }
        for ours, sat in inverse.items():
            if rest.startswith(ours):
                return sat + rest[len(ours):]
    for old, new in _GLOBAL.items():
        if key == new or (new.endswith(".") and key.startswith(new)):
            return old + key[len(new):]
    raise KeyError(f"{key} has no Inf-DiT checkpoint name")


def is_sat_layout(keys: Mapping[str, torch.Tensor] | list[str]) -> bool:
    return any(k.startswith("mixins.adaln_layer.") for k in keys)


def is_our_layout(keys: Mapping[str, torch.Tensor] | list[str]) -> bool:
    return any(k.startswith("blocks.0.attn.qkv.") for k in keys) and any(k == "block_pos" for k in keys)


def map_sat_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the model tensors of a SAT state dict; ignored and unknown keys keep their SAT name.

    Unknown keys are kept (not dropped) so that the strict check reports them.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        ours = sat_to_ours(key)
        out[ours if ours is not None else key] = value
    return out


def map_open_clip_visual(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The visual tower of a separately downloaded open_clip ViT-L-14 file, in our ``clip.`` names."""
    return {"clip." + k[len(OPEN_CLIP_PREFIX):]: v for k, v in state.items() if k.startswith(OPEN_CLIP_PREFIX)}

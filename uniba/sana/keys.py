"""Key names of Sana DiT checkpoints: original SANA <-> diffusers (= ours).

The model uses diffusers' parameter names as its one layout. Original ``.pth`` releases are
converted on load (docs/SOURCES.md, Sana §5.2): plain renames plus two splits, the self-attention ``qkv``
(rows are [q; k; v]) and the cross-attention ``kv_linear`` (rows are [k; v], weight and bias).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from .. import checkpoint
from ..checkpoint import matches_any

# Present in original releases, not weights of the inference model: the training-size sincos
# table (recomputed for the actual latent), the train-time null caption, Sprint's log-variance head.
ORIGINAL_IGNORE = ("pos_embed", "y_embedder.y_embedding", "logvar_linear.*")

# Prefixes that wrappers put in front of the DiT keys (ComfyUI checkpoints, EMA trainers, "net." of packs
# that save the wrapped network).
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "module.", "transformer.", "net.")
BLOCK_PREFIXES = ("blocks.", "transformer_blocks.")  # a prefix applies when the DiT blocks are under it

ORIGINAL_MARKERS = ("blocks.0.cross_attn.q_linear.weight", "t_block.1.weight")
DIFFUSERS_MARKERS = ("transformer_blocks.0.attn2.to_q.weight", "caption_projection.linear_1.weight")
# Sana-Sprint's guidance embedder in each format (its presence is what makes a file Sprint)
SPRINT_MARKERS = ("cfg_embedder.", "time_embed.guidance_embedder.")

# (original regex, ours template) for one-to-one renames.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"x_embedder\.proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"t_embedder\.mlp\.0\.(weight|bias)", r"time_embed.emb.timestep_embedder.linear_1.\1"),
    (r"t_embedder\.mlp\.2\.(weight|bias)", r"time_embed.emb.timestep_embedder.linear_2.\1"),
    (r"t_block\.1\.(weight|bias)", r"time_embed.linear.\1"),
    (r"y_embedder\.y_proj\.fc1\.(weight|bias)", r"caption_projection.linear_1.\1"),
    (r"y_embedder\.y_proj\.fc2\.(weight|bias)", r"caption_projection.linear_2.\1"),
    (r"attention_y_norm\.weight", r"caption_norm.weight"),
    (r"final_layer\.linear\.(weight|bias)", r"proj_out.\1"),
    (r"final_layer\.scale_shift_table", r"scale_shift_table"),
    (r"blocks\.(\d+)\.scale_shift_table", r"transformer_blocks.\1.scale_shift_table"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"transformer_blocks.\1.attn1.to_out.0.\2"),
    (r"blocks\.(\d+)\.attn\.q_norm\.weight", r"transformer_blocks.\1.attn1.norm_q.weight"),
    (r"blocks\.(\d+)\.attn\.k_norm\.weight", r"transformer_blocks.\1.attn1.norm_k.weight"),
    (r"blocks\.(\d+)\.cross_attn\.q_linear\.(weight|bias)", r"transformer_blocks.\1.attn2.to_q.\2"),
    (r"blocks\.(\d+)\.cross_attn\.proj\.(weight|bias)", r"transformer_blocks.\1.attn2.to_out.0.\2"),
    (r"blocks\.(\d+)\.cross_attn\.q_norm\.weight", r"transformer_blocks.\1.attn2.norm_q.weight"),
    (r"blocks\.(\d+)\.cross_attn\.k_norm\.weight", r"transformer_blocks.\1.attn2.norm_k.weight"),
    (r"blocks\.(\d+)\.mlp\.inverted_conv\.conv\.(weight|bias)", r"transformer_blocks.\1.ff.conv_inverted.\2"),
    (r"blocks\.(\d+)\.mlp\.depth_conv\.conv\.(weight|bias)", r"transformer_blocks.\1.ff.conv_depth.\2"),
    (r"blocks\.(\d+)\.mlp\.point_conv\.conv\.weight", r"transformer_blocks.\1.ff.conv_point.weight"),
)
# Sana-Sprint's time embedding: diffusers puts the timestep MLP beside the guidance one, without ``emb.``
_SPRINT_RENAMES: tuple[tuple[str, str], ...] = (
    (r"t_embedder\.mlp\.0\.(weight|bias)", r"time_embed.timestep_embedder.linear_1.\1"),
    (r"t_embedder\.mlp\.2\.(weight|bias)", r"time_embed.timestep_embedder.linear_2.\1"),
    (r"cfg_embedder\.mlp\.0\.(weight|bias)", r"time_embed.guidance_embedder.linear_1.\1"),
    (r"cfg_embedder\.mlp\.2\.(weight|bias)", r"time_embed.guidance_embedder.linear_2.\1"),
)
_COMPILED = tuple((re.compile(src + r"\Z"), dst) for src, dst in _RENAMES)
_SPRINT_COMPILED = tuple((re.compile(src + r"\Z"), dst) for src, dst in _SPRINT_RENAMES) + _COMPILED
_QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.weight\Z")
_KV = re.compile(r"blocks\.(\d+)\.cross_attn\.kv_linear\.(weight|bias)\Z")


def _inverse_renames(renames: tuple[tuple[str, str], ...]) -> tuple[tuple[re.Pattern[str], str], ...]:
    out = []
    for src, dst in renames:
        # groups in both are: optional block index, then optional weight|bias, in the same order
        groups = re.findall(r"\(([^)]*)\)", src)
        pattern = re.escape(dst)
        template = src.replace("\\.", ".")
        for n, group in enumerate(groups, start=1):
            pattern = pattern.replace(re.escape(f"\\{n}"), f"({group})", 1)
            template = template.replace(f"({group})", f"\\{n}", 1)
        out.append((re.compile(pattern + r"\Z"), template))
    return tuple(out)


_INVERSE = _inverse_renames(_RENAMES + _SPRINT_RENAMES)
_OURS_QKV = re.compile(r"transformer_blocks\.(\d+)\.attn1\.to_([qkv])\.weight\Z")
_OURS_KV = re.compile(r"transformer_blocks\.(\d+)\.attn2\.to_([kv])\.(weight|bias)\Z")


def strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix that the DiT keys carry (``model.diffusion_model.`` etc.), and what lies outside it."""
    return checkpoint.strip_prefix(state_dict, PREFIXES, marker=lambda key: key.startswith(BLOCK_PREFIXES))


def is_sprint(keys: Iterable[str]) -> bool:
    """Whether a (prefix-stripped) state dict is a Sana-Sprint transformer, in either key format."""
    return any(k.startswith(SPRINT_MARKERS) for k in keys)


def detect_format(keys: Iterable[str]) -> str | None:
    """``"original"``, ``"diffusers"`` or ``None`` for a non-Sana file (Sprint or not: :func:`is_sprint`)."""
    keys = set(keys)
    if all(m in keys for m in ORIGINAL_MARKERS):
        return "original"
    if all(m in keys for m in DIFFUSERS_MARKERS):
        return "diffusers"
    return None


def original_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert original SANA keys to ours. Ignored keys are dropped; unknown keys pass through unchanged."""
    out: dict[str, torch.Tensor] = {}
    renames = _SPRINT_COMPILED if is_sprint(state_dict) else _COMPILED
    for key, value in state_dict.items():
        if matches_any(key, ORIGINAL_IGNORE):
            continue
        if m := _QKV.match(key):
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"transformer_blocks.{m[1]}.attn1.to_{name}.weight"] = part
            continue
        if m := _KV.match(key):
            for name, part in zip("kv", value.chunk(2, dim=0)):
                out[f"transformer_blocks.{m[1]}.attn2.to_{name}.{m[2]}"] = part
            continue
        for pattern, template in renames:
            if pattern.match(key):
                out[pattern.sub(template, key)] = value
                break
        else:
            out[key] = value
    return out


def ours_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse map: our (diffusers) keys back to an original SANA state dict (without ignored buffers)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    kv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if m := _OURS_QKV.match(key):
            qkv.setdefault(m[1], {})[m[2]] = value
            continue
        if m := _OURS_KV.match(key):
            kv.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        for pattern, template in _INVERSE:
            if pattern.match(key):
                out[pattern.sub(template, key)] = value
                break
        else:
            out[key] = value
    for block, parts in qkv.items():
        out[f"blocks.{block}.attn.qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    for (block, kind), parts in kv.items():
        out[f"blocks.{block}.cross_attn.kv_linear.{kind}"] = torch.cat([parts["k"], parts["v"]], dim=0)
    return out

"""DC-AE key names: the original efficientvit layout <-> diffusers' ``AutoencoderDC`` layout.

The model uses diffusers names. The efficientvit release (``mit-han-lab/dc-ae-f32c32-sana-1.x``,
``model.safetensors``) nests every op in ``OpSequential.op_list`` / ``ResidualBlock.main`` and
stores attention as one ``qkv`` 1x1 conv whose rows diffusers splits into ``to_q/to_k/to_v``
(row chunks, not semantic q/k/v: keep the row order) and ``proj`` as a 1x1 conv (``to_out``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from uniba import checkpoint

from .config import FAMILY

_PREFIXES = ("first_stage_model.", "vae.", "model.", "module.")

_STAGE = re.compile(r"^(encoder|decoder)\.stages\.(\d+)\.op_list\.(\d+)\.(.+)$")
_DIFF_STAGE = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(\d+)\.(.+)$")

# inside one stage entry: original suffix -> diffusers suffix (``{m}`` = multiscale index)
_BLOCK_RULES: tuple[tuple[str, str], ...] = (
    (r"main\.conv1\.conv\.(weight|bias)", r"conv1.\1"),
    (r"main\.conv2\.conv\.weight", "conv2.weight"),
    (r"main\.conv2\.norm\.(weight|bias)", r"norm.\1"),
    (r"main\.conv\.(?:conv\.)?(weight|bias)", r"conv.\1"),
    (r"context_module\.main\.aggreg\.(\d+)\.0\.weight", r"attn.to_qkv_multiscale.\1.proj_in.weight"),
    (r"context_module\.main\.aggreg\.(\d+)\.1\.weight", r"attn.to_qkv_multiscale.\1.proj_out.weight"),
    (r"context_module\.main\.proj\.norm\.(weight|bias)", r"attn.norm_out.\1"),
    (r"local_module\.main\.inverted_conv\.conv\.(weight|bias)", r"conv_out.conv_inverted.\1"),
    (r"local_module\.main\.depth_conv\.conv\.(weight|bias)", r"conv_out.conv_depth.\1"),
    (r"local_module\.main\.point_conv\.conv\.weight", "conv_out.conv_point.weight"),
    (r"local_module\.main\.point_conv\.norm\.(weight|bias)", r"conv_out.norm.\1"),
)

_OUTER_RULES: tuple[tuple[str, str], ...] = (
    (r"encoder\.project_in\.conv\.(weight|bias)", r"encoder.conv_in.\1"),
    (r"encoder\.project_out\.(?:main\.)?(?:op_list\.)?0\.conv\.(weight|bias)", r"encoder.conv_out.\1"),
    (r"decoder\.project_in\.(?:main\.)?conv\.(weight|bias)", r"decoder.conv_in.\1"),
    (r"decoder\.project_out\.(?:op_list\.)?0\.(weight|bias)", r"decoder.norm_out.\1"),
    (r"decoder\.project_out\.(?:op_list\.)?2\.conv\.(weight|bias)", r"decoder.conv_out.\1"),
)


def strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix (``first_stage_model.``, ``vae.``...) shared by every key."""
    return checkpoint.strip_prefix(state_dict, _PREFIXES)


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """``"original"`` (efficientvit), ``"diffusers"`` or ``None`` when it is no DC-AE at all."""
    keys = list(state_dict)
    if any(k.startswith("decoder.stages.") for k in keys) and any(k.startswith("encoder.project_in.") for k in keys):
        return "original"
    if any(_DIFF_STAGE.match(k) for k in keys) and "decoder.conv_in.weight" in state_dict \
            and "encoder.conv_out.weight" in state_dict:
        return "diffusers"
    return None


def to_diffusers_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike | None = None
                            ) -> dict[str, torch.Tensor]:
    """Accept either layout (efficientvit or diffusers, optionally prefixed) and return diffusers keys."""
    stripped = strip_prefix(state_dict)
    layout = detect_layout(stripped)
    if layout == "original":
        return original_to_diffusers(stripped)
    if layout == "diffusers":
        return stripped
    raise checkpoint.wrong_family_error(path, FAMILY, state_dict.keys(),
                             "Choose the Sana DC-AE file (mit-han-lab/dc-ae-f32c32-sana-1.x, "
                             "model.safetensors or the -diffusers diffusion_pytorch_model.safetensors) in models/vae/.")


def original_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename efficientvit keys to diffusers keys; unknown keys are kept so a strict check reports them."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        stage = _STAGE.match(key)
        if stage:
            part, i, j, rest = stage.groups()
            base = f"{part}.{'down_blocks' if part == 'encoder' else 'up_blocks'}.{i}.{j}."
            if rest == "context_module.main.qkv.conv.weight":
                for name, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                    out[f"{base}attn.{name}.weight"] = chunk.flatten(1)
                continue
            if rest == "context_module.main.proj.conv.weight":
                out[f"{base}attn.to_out.weight"] = value.flatten(1)
                continue
            for pattern, repl in _BLOCK_RULES:
                if re.fullmatch(pattern, rest):
                    out[base + re.sub(pattern, repl, rest)] = value
                    break
            else:
                out[key] = value
            continue
        for pattern, repl in _OUTER_RULES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            out[key] = value
    return out


def diffusers_to_original(state_dict: Mapping[str, torch.Tensor], downsample: str = "conv"
                          ) -> dict[str, torch.Tensor]:
    """The inverse of :func:`original_to_diffusers` (used to write original-layout test files).

    ``downsample`` says how efficientvit nested the encoder's down conv: a plain ``ConvLayer``
    (Sana's "conv" downsampling: ``main.conv.weight``) or inside a pixel-unshuffle layer
    (``main.conv.conv.weight``).
    """
    inverse_block = (
        (r"conv1\.(weight|bias)", r"main.conv1.conv.\1"),
        (r"conv2\.weight", "main.conv2.conv.weight"),
        (r"norm\.(weight|bias)", r"main.conv2.norm.\1"),
        (r"attn\.to_qkv_multiscale\.(\d+)\.proj_in\.weight", r"context_module.main.aggreg.\1.0.weight"),
        (r"attn\.to_qkv_multiscale\.(\d+)\.proj_out\.weight", r"context_module.main.aggreg.\1.1.weight"),
        (r"attn\.norm_out\.(weight|bias)", r"context_module.main.proj.norm.\1"),
        (r"conv_out\.conv_inverted\.(weight|bias)", r"local_module.main.inverted_conv.conv.\1"),
        (r"conv_out\.conv_depth\.(weight|bias)", r"local_module.main.depth_conv.conv.\1"),
        (r"conv_out\.conv_point\.weight", "local_module.main.point_conv.conv.weight"),
        (r"conv_out\.norm\.(weight|bias)", r"local_module.main.point_conv.norm.\1"),
    )
    inverse_outer = {
        "encoder.conv_in.": "encoder.project_in.conv.",
        "encoder.conv_out.": "encoder.project_out.main.op_list.0.conv.",
        "decoder.conv_in.": "decoder.project_in.main.conv.",
        "decoder.norm_out.": "decoder.project_out.op_list.0.",
        "decoder.conv_out.": "decoder.project_out.op_list.2.conv.",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        stage = _DIFF_STAGE.match(key)
        if stage:
            part, _blocks, i, j, rest = stage.groups()
            base = f"{part}.stages.{i}.op_list.{j}."
            if rest in ("attn.to_k.weight", "attn.to_v.weight"):
                continue
            if rest == "attn.to_q.weight":
                prefix = key[: -len("to_q.weight")]
                qkv = torch.cat([state_dict[prefix + n + ".weight"] for n in ("to_q", "to_k", "to_v")])
                out[base + "context_module.main.qkv.conv.weight"] = qkv[:, :, None, None]
                continue
            if rest == "attn.to_out.weight":
                out[base + "context_module.main.proj.conv.weight"] = value[:, :, None, None]
                continue
            if rest.startswith("conv."):
                nested = part == "decoder" or downsample != "conv"
                out[base + ("main.conv.conv." if nested else "main.conv.") + rest[len("conv."):]] = value
                continue
            for pattern, repl in inverse_block:
                if re.fullmatch(pattern, rest):
                    out[base + re.sub(pattern, repl, rest)] = value
                    break
            else:
                out[key] = value
            continue
        for prefix, repl in inverse_outer.items():
            if key.startswith(prefix):
                out[repl + key[len(prefix):]] = value
                break
        else:
            out[key] = value
    return out

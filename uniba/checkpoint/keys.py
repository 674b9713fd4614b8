"""Comparing a state dict with a model's keys, finding the model inside wrappers, naming a wrong file's family."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Iterable, Mapping

import torch

from .errors import CheckpointError, short_list, with_article


def matches_any(key: str, patterns: Iterable[str]) -> bool:
    """Shell-style matching (``*`` and ``?``) of a key against ignore patterns."""
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def check_keys(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...] | torch.Size],
    *,
    path: str | os.PathLike | None,
    family: str,
    ignore: Iterable[str] = (),
) -> None:
    """Strict comparison of a state dict with the expected keys and shapes.

    Keys matching ``ignore`` (documented per family) are allowed to be present and are dropped by
    the caller. Anything else missing, unexpected or of the wrong shape is reported at once.
    """
    ignore = tuple(ignore)
    found = {k for k in state_dict if not matches_any(k, ignore)}
    missing = sorted(set(expected) - found)
    unexpected = sorted(found - set(expected))
    wrong = sorted(
        f"{k} (expected {tuple(expected[k])}, found {tuple(state_dict[k].shape)})"
        for k in found & set(expected)
        if tuple(state_dict[k].shape) != tuple(expected[k])
    )
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {short_list(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {short_list(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} key(s) with the wrong shape: {short_list(wrong, 3)}")
    raise CheckpointError(
        path,
        f"does not match the {family} layout: " + "; ".join(parts) + ".",
        f"Make sure this is {with_article(family)} checkpoint of a supported release, complete and unmodified.",
    )


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefixes: Iterable[str], *,
                 marker: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The tensors under the wrapper prefix a checkpoint puts its model in, with the prefix removed.

    The first of ``prefixes`` that applies wins: without ``marker`` a prefix applies when every key
    carries it; with ``marker`` when some key carrying it passes ``marker`` once stripped, and then keys
    outside the prefix are dropped (a whole pipeline file ``model.diffusion_model.* + first_stage_model.*``
    gives the DiT alone). When no prefix applies, the state dict is returned unchanged.
    """
    keys = list(state_dict)
    for prefix in prefixes:
        carrying = [k for k in keys if k.startswith(prefix)]
        if not carrying:
            continue
        applies = (len(carrying) == len(keys) if marker is None
                   else any(marker(k[len(prefix):]) for k in carrying))
        if applies:
            return {k[len(prefix):]: state_dict[k] for k in carrying}
    return dict(state_dict)


# Key fingerprints of common model files, for error messages that say what a wrong file is.
_FAMILY_FINGERPRINTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Inf-DiT", ("mixins.adaln_layer.", "transformer.layers.0.attention.query_key_value.weight")),
    ("Sana DiT (original format)", ("t_block.1.weight", "blocks.0.attn.qkv.weight")),
    ("Sana DiT (diffusers format)", ("caption_projection.linear_1.weight", "transformer_blocks.0.attn1.to_q.weight")),
    ("DC-AE autoencoder", ("encoder.project_in.", "decoder.project_out.")),
    ("Gemma-2 text encoder", ("model.layers.0.pre_feedforward_layernorm.weight",)),
    ("SDXL checkpoint", ("conditioner.embedders.1.model.",)),
    ("SD1.x/SD2.x checkpoint", ("model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.")),
    ("UNet (diffusion model only)", ("input_blocks.0.0.weight",)),
    ("diffusers UNet", ("conv_in.weight", "down_blocks.0.")),
    ("Flux model", ("double_blocks.0.", "single_blocks.0.")),
    ("SD3 model", ("joint_blocks.0.",)),
    ("VAE", ("encoder.down.0.", "decoder.up.0.")),
    ("CLIP vision model", ("vision_model.encoder.layers.0.",)),
    ("CLIP text model", ("text_model.encoder.layers.0.",)),
    ("T5 text encoder", ("encoder.block.0.layer.0.",)),
)


def guess_family(keys: Iterable[str]) -> str:
    """A best guess at what kind of model a set of keys belongs to ("unknown model" if none fits)."""
    keys = list(keys)
    for name, fingerprints in _FAMILY_FINGERPRINTS:
        if all(any(k.startswith(fp) for k in keys) for fp in fingerprints):
            return name
    return f"unknown model ({len(keys)} tensors, e.g. {short_list(sorted(keys), 3)})"


def wrong_family_error(
    path: str | os.PathLike | None, expected: str, keys: Iterable[str], fix: str = ""
) -> CheckpointError:
    """The error for a file of another model family: names what was expected and what it looks like."""
    return CheckpointError(
        path,
        f"is not {with_article(expected)} checkpoint; it looks like {with_article(guess_family(keys))}.",
        fix or f"Choose {with_article(expected)} file.",
    )

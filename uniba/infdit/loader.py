"""Reading Inf-DiT checkpoints: the released SAT/DeepSpeed ``.pt``, or a converted ``.safetensors``.

The released ``mp_rank_00_model_states.pt`` holds the state dict under ``module`` (unwrapped by
:func:`uniba.checkpoint.read_state_dict`, which never runs pickled code). Keys are renamed by
:mod:`uniba.infdit.keys`, checked strictly against the model built from the inferred config, with
the documented ignore list; a file of another family gets an error saying what it looks like.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..checkpoint import (
    CheckpointError,
    StateDict,
    load_model,
    read_safetensors_metadata,
    read_state_dict,
    save_safetensors,
    wrong_family_error,
)
from ..guards import validate_config
from ..metadata import config_from_metadata
from ..progress import ProgressFn
from .config import METADATA_KEY, OPEN_CLIP_PREFIX, SAT_CLIP_PREFIX, InfDiTConfig, infer_clip_config, infer_config
from .keys import IGNORED, is_our_layout, is_sat_layout, map_open_clip_visual, map_sat_state_dict
from .model import InfDiT

log = logging.getLogger(__name__)

FAMILY = "Inf-DiT"
FIX = ("Choose the Inf-DiT release (mp_rank_00_model_states.pt from the Inf-DiT README) or a file "
       "converted from it with python -m uniba convert-infdit, and put it into models/infdit/.")


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _clip_state(clip: str | os.PathLike | Mapping[str, torch.Tensor]) -> tuple[StateDict, str | None]:
    path = None if isinstance(clip, Mapping) else os.fspath(clip)
    state = dict(clip) if isinstance(clip, Mapping) else read_state_dict(path)
    if any(k.startswith(SAT_CLIP_PREFIX) for k in state):
        state = {k[len("image_encoder.model."):]: v for k, v in state.items() if k.startswith(SAT_CLIP_PREFIX)}
    mapped = map_open_clip_visual(state)
    if not mapped:
        raise wrong_family_error(path, "open_clip ViT-L-14 (visual tower)", state.keys(),
                                 "Use open_clip_pytorch_model.bin/.safetensors of "
                                 "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K.")
    return mapped, path


@dataclass(frozen=True)
class InfDiTCheckpoint:
    """A checkpoint converted to our keys, with its config (from the tensor shapes or the file's metadata)."""

    state_dict: StateDict
    config: InfDiTConfig
    path: str | None = None


def _config_and_state(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                      path: str | None) -> tuple[InfDiTConfig, StateDict]:
    """(config, state dict in our key names) from a SAT-layout or converted state dict."""
    if is_sat_layout(state):
        try:
            config = infer_config(_shapes(state))
        except (KeyError, ValueError):
            raise wrong_family_error(path, FAMILY, state.keys(), FIX) from None
        return validate_config(config, path, "the configuration read from its tensor shapes"), \
            map_sat_state_dict(state)
    if is_our_layout(state):
        if METADATA_KEY not in metadata:
            raise CheckpointError(path, "is a converted Inf-DiT file without its config metadata.",
                                  "Convert the release again with "
                                  "python -m uniba convert-infdit IN.pt OUT.safetensors.")
        return config_from_metadata(InfDiTConfig.from_json, metadata[METADATA_KEY], path, METADATA_KEY), dict(state)
    raise wrong_family_error(path, FAMILY, state.keys(), FIX)


def read_infdit_checkpoint(source: str | os.PathLike | Mapping[str, torch.Tensor], *,
                           clip: str | os.PathLike | Mapping[str, torch.Tensor] | None = None) -> InfDiTCheckpoint:
    """Read and convert the released ``.pt``, a converted ``.safetensors`` or a state dict, without building
    the model. ``clip`` supplies the CLIP ViT-L/14 visual tower separately (an open_clip file) when the
    checkpoint does not contain it."""
    metadata: dict[str, str] = {}
    if isinstance(source, Mapping):
        path, state = None, dict(source)
    else:
        path = os.fspath(source)
        state = read_state_dict(path)
        if path.lower().endswith((".safetensors", ".sft")):
            metadata = read_safetensors_metadata(path)
    config, mapped = _config_and_state(state, metadata, path)
    if clip is not None:
        clip_state, _ = _clip_state(clip)
        mapped = {k: v for k, v in mapped.items() if not k.startswith("clip.")}
        mapped.update(clip_state)
        config = config.replace(clip=infer_clip_config({"visual." + k[5:]: tuple(v.shape)
                                                        for k, v in clip_state.items()}, OPEN_CLIP_PREFIX))
    return InfDiTCheckpoint(mapped, config, path)


def build_infdit(checkpoint: InfDiTCheckpoint, dtype: torch.dtype | None = None,
                 progress: ProgressFn | None = None) -> InfDiT:
    """The model of a read checkpoint: built without initialisation, keys checked strictly, weights assigned
    (``dtype`` None keeps the stored dtype; ``progress`` is told of every tensor, raising from it cancels)."""
    model = load_model(lambda: InfDiT(checkpoint.config), checkpoint.state_dict, path=checkpoint.path,
                       family=FAMILY, ignore=IGNORED, dtype=dtype, progress=progress)
    if model.clip is None:
        log.info("%s has no CLIP image tower: pass clip= or clip_embedding= to upscale",
                 checkpoint.path or "state dict")
    return model


def load_infdit(path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                *, clip: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
                progress: ProgressFn | None = None) -> InfDiT:
    """Load Inf-DiT: :func:`read_infdit_checkpoint` then :func:`build_infdit`."""
    return build_infdit(read_infdit_checkpoint(path_or_state_dict, clip=clip), dtype, progress)


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype | None = None,
                       clip: str | os.PathLike | None = None, *, overwrite: bool = True) -> InfDiT:
    """Write the model of ``src`` to a safetensors file that loads without unpickling (config in metadata).

    ``overwrite=False`` never replaces an existing ``dst``, even one that appeared during the conversion.
    """
    model = load_infdit(src, dtype, clip=clip)
    save_safetensors(model.state_dict(), dst, metadata={METADATA_KEY: model.config.to_json(), "format": "pt"},
                     overwrite=overwrite)
    return model

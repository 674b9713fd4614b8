"""Load a DC-AE from a file, a diffusers (pipeline) folder or a state dict, strictly, in either key layout."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from uniba.checkpoint import StateDict, load_model, read_state_dict
from uniba.progress import ProgressFn

from .config import FAMILY, DCAEConfig
from .keys import to_diffusers_state_dict
from .model import DCAE


@dataclass(frozen=True)
class DCAECheckpoint:
    """A checkpoint converted to diffusers' key names, with the config read from its tensor shapes."""

    state_dict: StateDict
    config: DCAEConfig
    path: str | None = None


def read_dcae_checkpoint(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> DCAECheckpoint:
    """Read and convert a DC-AE without building it (a pipeline folder's ``vae/`` is found by itself)."""
    path = None
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = os.fspath(source)
        if os.path.isdir(path) and os.path.isdir(os.path.join(path, "vae")):
            path = os.path.join(path, "vae")
        raw = read_state_dict(path)
    state = to_diffusers_state_dict(raw, path)
    return DCAECheckpoint(state, DCAEConfig.from_shapes(state, path), path)


def build_dcae(checkpoint: DCAECheckpoint, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu", progress: ProgressFn | None = None) -> DCAE:
    """:func:`uniba.checkpoint.load_model` (meta build, strict keys, assign); ``dtype`` ``None`` keeps the stored
    floating dtype; ``progress`` is told of every tensor (raising from it cancels)."""
    return load_model(lambda: DCAE(checkpoint.config), checkpoint.state_dict, path=checkpoint.path, family=FAMILY,
                      dtype=dtype, device=device, progress=progress)


def load_dcae(path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
              device: torch.device | str = "cpu", progress: ProgressFn | None = None) -> DCAE:
    """Load a DC-AE: :func:`read_dcae_checkpoint` then :func:`build_dcae`."""
    return build_dcae(read_dcae_checkpoint(path_or_state_dict), dtype, device, progress)

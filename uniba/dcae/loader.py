"""Load a DC-AE from a file, a diffusers folder or a state dict, strictly, in either key layout."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from uniba.checkpoint import load_model, read_state_dict
from uniba.progress import ProgressFn

from .config import FAMILY, DCAEConfig
from .keys import to_diffusers_state_dict
from .model import DCAE


def load_dcae(path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
              device: torch.device | str = "cpu", progress: ProgressFn | None = None) -> DCAE:
    """The config from the tensor shapes, then :func:`uniba.checkpoint.load_model` (meta build, strict keys,
    assign); ``dtype`` ``None`` keeps the stored floating dtype."""
    path = None
    if isinstance(path_or_state_dict, Mapping):
        raw = dict(path_or_state_dict)
    else:
        path = os.fspath(path_or_state_dict)
        if os.path.isdir(path) and os.path.isdir(os.path.join(path, "vae")):
            path = os.path.join(path, "vae")
        raw = read_state_dict(path)
    state = to_diffusers_state_dict(raw, path)
    config = DCAEConfig.from_shapes(state, path)
    return load_model(lambda: DCAE(config), state, path=path, family=FAMILY, dtype=dtype, device=device,
                      progress=progress)

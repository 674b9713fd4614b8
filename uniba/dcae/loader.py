"""Load a DC-AE from a file, a diffusers folder or a state dict, strictly, in either key layout."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from uniba.checkpoint import check_keys, read_state_dict

from .config import FAMILY, DCAEConfig
from .keys import to_diffusers_state_dict
from .model import DCAE


def load_dcae(path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
              device: torch.device | str = "cpu") -> DCAE:
    """Build on the meta device from the shapes, check every key, then assign the tensors (no copy of random init).

    ``dtype`` ``None`` keeps the stored floating dtype.
    """
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
    with torch.device("meta"):
        model = DCAE(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(state, expected, path=path, family=FAMILY)
    if dtype is None:
        floats = [v.dtype for v in state.values() if v.is_floating_point()]
        dtype = floats[0] if floats else torch.float32
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)

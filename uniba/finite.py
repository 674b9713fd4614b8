"""Where a tensor holds NaN or inf, found chunk by chunk: the one scan behind every non-finite check.

Checkpoint loading (weights) and :mod:`uniba.guards` (images, latents, sampler steps) both report through
these two functions, so a NaN is described the same way wherever it is found.
"""

from __future__ import annotations

import math

import torch

# Elements checked per isfinite() call: bounds the temporary bool tensor (16 MB) for huge weights.
_CHUNK = 1 << 24


def first_non_finite(tensor: torch.Tensor) -> tuple[int, float] | None:
    """(flat index, value) of the first NaN/inf element, or None. Works chunk by chunk on a flat view."""
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return None
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start:start + _CHUNK]
        if not chunk.is_complex():
            # min/max propagate NaN and show +-inf: ~40x faster than isfinite, which runs only when this fails
            try:
                low, high = torch.aminmax(chunk)
                if math.isfinite(float(low)) and math.isfinite(float(high)):
                    continue
            except (RuntimeError, NotImplementedError):
                pass
        try:
            finite = torch.isfinite(chunk)
        except (RuntimeError, NotImplementedError):  # e.g. float8 types without isfinite on this device
            finite = torch.isfinite(chunk.float())
        if not bool(finite.all()):
            index = int((~finite).nonzero()[0, 0])
            return start + index, float(chunk[index].float() if not chunk.is_complex() else chunk[index].abs())
    return None


def describe_non_finite(tensor: torch.Tensor, found: tuple[int, float]) -> str:
    """How many values are bad, the first one's kind and position, the shape and dtype: for a message."""
    flat = tensor.detach().reshape(-1)
    bad = int((~torch.isfinite(flat.float() if not flat.is_complex() else flat)).sum()) if flat.numel() <= 1 << 26 \
        else None
    kind = "NaN" if math.isnan(found[1]) else "infinite"
    count = f"{bad} of {flat.numel()} values are NaN or infinite" if bad is not None \
        else "it holds NaN or infinite values"
    position = tuple(int(i) for i in torch.unravel_index(torch.tensor(found[0]), tensor.shape)) \
        if tensor.ndim else ()
    return f"{count} (first: {kind} at index {position}, shape {tuple(tensor.shape)}, {tensor.dtype})"

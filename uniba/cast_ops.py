"""Layers whose weights are stored in one dtype and computed in another (fp8 storage, bf16/fp32 compute).

A weight stored as ``float8_e4m3fn`` halves a bf16 model's memory (SANA-1.5 4.8B: 9.4 GB -> 4.7 GB), but no
CPU kernel and few GPU kernels multiply in fp8. So each layer casts its weight to the input's dtype when it
runs and drops the copy after: one layer's weight at a time exists in the compute dtype. ComfyUI's
``comfy.ops.manual_cast`` layers do the same inside the host (and also stream weights from RAM under
``--lowvram``); these are the headless twins, with the same parameters and state-dict keys as ``torch.nn``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import conv

FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def _cast(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    if t is None:
        return None
    return t.to(device=like.device, dtype=like.dtype, non_blocking=True)


class Linear(nn.Linear):
    """``nn.Linear`` computing in its input's dtype whatever dtype its weight is stored in."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, _cast(self.weight, input), _cast(self.bias, input))


class Conv2d(conv.Conv2d):
    """:class:`uniba.conv.Conv2d` computing in its input's dtype whatever dtype its weight is stored in."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, _cast(self.weight, input), _cast(self.bias, input))


class CastOnUseOps:
    """The ``operations`` namespace a model is built with when its weights are stored in another dtype."""

    Linear = Linear
    Conv2d = Conv2d


CHUNK_ELEMENTS = 1 << 20


def to_storage(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in the storage ``dtype``; fp8 values are clamped to its range first, so an out-of-range weight
    saturates whatever the device's cast rule (e4m3fn has no infinity; torch's scalar cast gives NaN).

    A tensor within range (every trained weight) is cast in one go; otherwise the clamp runs on chunks of
    ``CHUNK_ELEMENTS``: a whole-tensor temporary per layer fragments the heap, which kept 1.4 GB of a 4.4 GB fp8
    load of SANA-1.5 4.8B resident for nothing.
    """
    if dtype != torch.float8_e4m3fn or t.dtype == dtype:
        return t.to(dtype)
    if t.numel() == 0:
        return t.to(dtype)
    low, high = torch.aminmax(t)
    if -FP8_MAX <= float(low) and float(high) <= FP8_MAX:
        return t.to(dtype)
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    source, target = t.reshape(-1), out.view(-1)
    for start in range(0, source.numel(), CHUNK_ELEMENTS):
        end = start + CHUNK_ELEMENTS
        target[start:end] = source[start:end].clamp(-FP8_MAX, FP8_MAX)
    return out

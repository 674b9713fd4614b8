"""RAU-Net operators (HiDiffusion, arXiv 2311.17528, §3.2), exactly as the reference computes them.

* RAD: the UNet's own strided 3x3 downsampling conv run with stride 4, padding 2, dilation 2
  (same weights): the map shrinks to ``ceil(s / 4)`` instead of ``ceil(s / 2)``.
* RAU: nothing to do in ComfyUI. Its ``Upsample`` nearest-interpolates to the skip's size, which
  is what the reference gets from diffusers' ``Upsample2D`` once it forces ``upsample_size``.
* CA pair: ``avg_pool2d(2, ceil_mode=True)`` after a cross-attention block and a bicubic resize
  back to the saved size two blocks later on the way up.

Nothing here mutates a module: the RAD runs a shallow copy of the conv, so a failure mid-call
cannot leave the shared model with stride 4 (a bug of the reference and of one ComfyUI port).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

RAD_STRIDE = (4, 4)
RAD_PADDING = (2, 2)
RAD_DILATION = (2, 2)


def dilated_downsample(conv: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a ``Conv2d`` (or a ComfyUI ops subclass) as the RAD: stride 4, padding 2, dilation 2.

    A shallow copy shares the weights and any weight functions (LoRA, casting), so every way the
    host computes the conv keeps working; only the copy's geometry differs.
    """
    rad = copy.copy(conv)
    rad.stride, rad.padding, rad.dilation = RAD_STRIDE, RAD_PADDING, RAD_DILATION
    return rad(x)


def rad_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The reference's functional form of the RAD, for tests and documentation."""
    return F.conv2d(x, weight, bias, RAD_STRIDE, RAD_PADDING, RAD_DILATION)


def pool(h: torch.Tensor) -> torch.Tensor:
    """The reference's CA downsampler: 2x2 average pooling, ceil mode (odd sizes round up)."""
    return F.avg_pool2d(h, kernel_size=(2, 2), ceil_mode=True)


def restore(h: torch.Tensor, size: Sequence[int], mode: str = "bicubic") -> torch.Tensor:
    """Resize ``h`` to ``size`` (H, W); the reference uses bicubic with ``align_corners`` unset."""
    size = (int(size[0]), int(size[1]))
    if tuple(h.shape[-2:]) == size:
        return h
    return F.interpolate(h, size=size, mode=mode)


def downsampled(size: int) -> int:
    """Output side of the stock stride-2 conv (kernel 3, padding 1)."""
    return (size - 1) // 2 + 1


def rad_downsampled(size: int) -> int:
    """Output side of the RAD: ``floor((s + 4 - 4 - 1) / 4) + 1 = ceil(s / 4)``."""
    return (size + 2 * RAD_PADDING[0] - RAD_DILATION[0] * 2 - 1) // RAD_STRIDE[0] + 1


def pooled(size: int) -> int:
    return math.ceil(size / 2)


def input_feature_sizes(
    latent_hw: tuple[int, int],
    n_input_blocks: int,
    downsample_blocks: Sequence[int],
    *,
    rad_block: int | None = None,
    ca_block: int | None = None,
    ca_after_skip: bool = False,
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], tuple[int, int]]:
    """Per input block: the size ``h`` has when ControlNet is added and the size of the stored skip;
    plus the size entering the middle block.

    ``rad_block``/``ca_block`` are the operators active at this step (``None`` = off). ControlNet's
    residual is added before the input-block patch, i.e. before the CA pool; the skip is pooled
    unless the pool runs after the skip push.
    """
    h, w = latent_hw
    at_block, skips = [], []
    for i in range(n_input_blocks):
        if i in downsample_blocks:
            if i == rad_block:
                h, w = rad_downsampled(h), rad_downsampled(w)
            else:
                h, w = downsampled(h), downsampled(w)
        at_block.append((h, w))
        if i == ca_block:
            pooled_hw = (pooled(h), pooled(w))
            skips.append((h, w) if ca_after_skip else pooled_hw)
            h, w = pooled_hw
        else:
            skips.append((h, w))
    return at_block, skips, (h, w)


def resize_control(control: dict, latent_hw: tuple[int, int], n_input_blocks: int,
                   downsample_blocks: Sequence[int], *, rad_block: int | None, ca_block: int | None,
                   ca_after_skip: bool = False, mode: str = "bicubic") -> dict:
    """A copy of ComfyUI's ControlNet residual dict resized to the feature sizes the patched UNet has.

    ComfyUI pops ``control["input"]`` from the end (last entry = input block 0), ``control["output"]``
    from the end too (output block ``j`` adds to the skip of input ``n - 1 - j``), and adds
    ``control["middle"][-1]`` after the middle block. A residual whose size already matches, or a
    ``None`` entry, is passed through unchanged.
    """
    at_block, skips, middle = input_feature_sizes(latent_hw, n_input_blocks, downsample_blocks, rad_block=rad_block,
                                          ca_block=ca_block, ca_after_skip=ca_after_skip)
    out = dict(control)

    def fit(tensors: list, sizes: list[tuple[int, int]]) -> list:
        fitted = list(tensors)
        for k in range(len(fitted)):
            block = len(fitted) - 1 - k
            if fitted[k] is None or block >= len(sizes):
                continue
            fitted[k] = restore(fitted[k], sizes[block], mode)
        return fitted

    if control.get("input"):
        out["input"] = fit(control["input"], at_block)
    if control.get("output"):
        # the j-th output pop (from the end) meets the skip of input n-1-j: sizes in pop order
        out["output"] = fit(control["output"], list(reversed(skips)))
    if control.get("middle"):
        out["middle"] = [None if t is None else restore(t, middle, mode) for t in control["middle"]]
    return out

"""Convolutions that stay fast in bf16/fp16 on a CPU.

PyTorch's CPU convolution has no half-precision kernel on CPUs without AVX-512 BF16/FP16 (oneDNN reports
``_is_mkldnn_bf16_supported() == False``): it falls back to ``_slow_conv2d_forward``, an im2col loop per
group. Measured here (2 cores, torch 2.13): a 3x3 256->256 conv on 64x64 takes 16.4 s in bf16 against
0.05 s in fp32, a 1x1 2240->11200 conv on 16x16 16.2 s against 0.13 s. A DC-AE decode of a 64 px image
took 56 s in bf16, 98% of it in that loop.

So on a CPU a half-precision convolution is computed in fp32 and its result rounded back to the input's
dtype. GPUs do the same internally (cuDNN accumulates bf16/fp16 convolutions in fp32 and rounds the output),
so the CPU result is the GPU's up to summation order, and it is the same on every CPU. The fp32 copy lives
for one layer: the weight is small, the activation is one layer's input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_HALF = (torch.bfloat16, torch.float16)


def upcasts_on_cpu(x: torch.Tensor) -> bool:
    """True when a convolution over ``x`` runs through fp32 (a half-precision tensor on the CPU)."""
    return x.device.type == "cpu" and x.dtype in _HALF


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int | tuple = 1,
           padding: int | tuple | str = 0, dilation: int | tuple = 1, groups: int = 1) -> torch.Tensor:
    """``F.conv2d``, computed in fp32 and rounded back for half-precision tensors on the CPU."""
    if not upcasts_on_cpu(x):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    out = F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(), stride, padding, dilation,
                   groups)
    return out.to(x.dtype)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state-dict keys) whose CPU half-precision forward uses :func:`conv2d`."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros" or not upcasts_on_cpu(input):
            return super()._conv_forward(input, weight, bias)
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

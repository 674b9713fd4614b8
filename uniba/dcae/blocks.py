"""The layers of the DC-AE f32c32 (arXiv 2410.10733), torch only; :mod:`uniba.dcae.model` assembles them.

Numerics follow efficientvit (the reference the Sana checkpoints were trained with):

* RMSNorm over channels with weight and bias, eps 1e-5, normalised in fp32 then cast back.
* ReLU linear attention with the ones-padding trick (eps 1e-15); fp16 inputs are upcast to fp32,
  bf16 runs the two matmuls in bf16 and upcasts before the division; when ``H*W <= head_dim``
  the block falls back to ReLU *quadratic* attention.

The exact tiler (:mod:`uniba.dcae.tiling`) runs these blocks one by one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from uniba.conv import Conv2d, conv2d
from uniba.progress import ProgressFn, report

from .config import RES_BLOCK, VIT_BLOCK, DCAEConfig

# --------------------------------------------------------------------------- layers

class RMSNorm2d(nn.Module):
    """RMSNorm over the channel axis of NCHW tensors, with weight and bias (efficientvit ``trms2d``)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x = (x32 * torch.rsqrt(x32.square().mean(dim=1, keepdim=True) + self.eps)).to(x.dtype)
        return x * self.weight.view(1, -1, 1, 1).to(x.dtype) + self.bias.view(1, -1, 1, 1).to(x.dtype)


class ResBlock(nn.Module):
    """conv3x3 (bias) -> SiLU -> conv3x3 (no bias) -> RMSNorm, plus the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm = RMSNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.conv2(F.silu(self.conv1(x))))


class MultiscaleProjection(nn.Module):
    """The multi-scale aggregation of q/k/v: a depthwise k x k conv, then a grouped 1x1 conv per head."""

    def __init__(self, channels: int, heads: int, kernel_size: int) -> None:
        super().__init__()
        self.proj_in = Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels,
                                 bias=False)
        self.proj_out = Conv2d(channels, channels, 1, groups=3 * heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(x))


def relu_linear_attention(qkv: torch.Tensor, head_dim: int, eps: float = 1e-15) -> torch.Tensor:
    """ReLU linear attention over ``qkv`` of shape (B, groups, 3*head_dim, N), efficientvit's dtype rules."""
    dtype = qkv.dtype
    if dtype == torch.float16:
        qkv = qkv.float()
    q, k, v = qkv.split(head_dim, dim=2)
    q, k = F.relu(q), F.relu(k)
    v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)  # the extra row of ones yields the normaliser
    out = torch.matmul(torch.matmul(v, k.transpose(-1, -2)), q)
    if out.dtype == torch.bfloat16:
        out = out.float()
    out = out[:, :, :-1] / (out[:, :, -1:] + eps)
    return out.to(dtype)


def linear_attention_sums(qkv: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The global part of ReLU linear attention: ``[V; 1] @ phi(K)^T`` per head, in fp32.

    ``qkv`` is (B, groups, 3*head_dim, N) for any subset of the N pixels; the result (B, groups,
    head_dim + 1, head_dim) holds the sums of ``phi(k) v^T`` and (last row) of ``phi(k)`` over those
    pixels, so the sums of disjoint pixel sets add up to the sums over their union: this is what lets
    a tiled pass attend over the whole image exactly.
    """
    _, k, v = qkv.float().split(head_dim, dim=2)
    v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)
    return torch.matmul(v, F.relu(k).transpose(-1, -2))


def apply_linear_attention(qkv: torch.Tensor, sums: torch.Tensor, head_dim: int, eps: float = 1e-15) -> torch.Tensor:
    """ReLU linear attention of the queries in ``qkv`` against precomputed :func:`linear_attention_sums`.

    The dtype rules of :func:`relu_linear_attention`: fp16 runs in fp32; bf16 rounds the sums to
    bf16 (as its first bf16 matmul would), multiplies in bf16 and divides in fp32.
    """
    dtype = qkv.dtype
    if dtype == torch.float16:
        qkv = qkv.float()
    q = F.relu(qkv[:, :, :head_dim])
    out = torch.matmul(sums.to(q.dtype), q)
    if out.dtype == torch.bfloat16:
        out = out.float()
    out = out[:, :, :-1] / (out[:, :, -1:] + eps)
    return out.to(dtype)


def relu_quadratic_attention(qkv: torch.Tensor, head_dim: int, eps: float = 1e-15) -> torch.Tensor:
    """ReLU attention with an explicit N x N map; efficientvit uses it when N <= head_dim."""
    q, k, v = qkv.split(head_dim, dim=2)
    q, k = F.relu(q), F.relu(k)
    scores = torch.matmul(k.transpose(-1, -2), q)
    dtype = scores.dtype
    scores = scores.float()
    scores = (scores / (scores.sum(dim=2, keepdim=True) + eps)).to(dtype)
    return torch.matmul(v, scores)


class LiteMLA(nn.Module):
    """Multi-scale ReLU linear attention (efficientvit ``LiteMLA``) with diffusers' parameter names."""

    def __init__(self, channels: int, head_dim: int, scales: tuple[int, ...]) -> None:
        super().__init__()
        self.head_dim = head_dim
        heads = channels // head_dim
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.to_qkv_multiscale = nn.ModuleList(MultiscaleProjection(3 * channels, heads, k) for k in scales)
        self.to_out = nn.Linear(channels * (1 + len(scales)), channels, bias=False)
        self.norm_out = RMSNorm2d(channels)

    @property
    def context_radius(self) -> int:
        """How far (pixels) the q/k/v of one pixel reach: the largest multiscale kernel's half-width."""
        return max((proj.proj_in.kernel_size[0] // 2 for proj in self.to_qkv_multiscale), default=0)

    def multiscale_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, groups, 3*head_dim, H, W): q/k/v of every head, the multi-scale ones included."""
        b, _, h, w = x.shape
        # q/k/v rows concatenated back into the original per-head-interleaved qkv conv
        weight = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
        qkv = conv2d(x, weight[:, :, None, None])
        qkv = torch.cat([qkv] + [proj(qkv) for proj in self.to_qkv_multiscale], dim=1)
        return qkv.reshape(b, -1, 3 * self.head_dim, h, w)

    def forward(self, x: torch.Tensor, sums: torch.Tensor | None = None) -> torch.Tensor:
        """``sums``: the :func:`linear_attention_sums` of the whole image when ``x`` is one tile of it."""
        b, _, h, w = x.shape
        qkv = self.multiscale_qkv(x).flatten(3)
        if sums is not None:
            out = apply_linear_attention(qkv, sums, self.head_dim)
        elif h * w > self.head_dim:
            out = relu_linear_attention(qkv, self.head_dim)
        else:
            out = relu_quadratic_attention(qkv, self.head_dim)
        out = conv2d(out.reshape(b, -1, h, w), self.to_out.weight[:, :, None, None])
        return x + self.norm_out(out)


class GLUMBConv(nn.Module):
    """1x1 expand (x8, SiLU) -> depthwise 3x3 -> gated SiLU -> 1x1 project -> RMSNorm, plus the input."""

    def __init__(self, channels: int, expand: int = 4) -> None:
        super().__init__()
        hidden = channels * expand
        self.conv_inverted = Conv2d(channels, 2 * hidden, 1)
        self.conv_depth = Conv2d(2 * hidden, 2 * hidden, 3, 1, 1, groups=2 * hidden)
        self.conv_point = Conv2d(hidden, channels, 1, bias=False)
        self.norm = RMSNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_depth(F.silu(self.conv_inverted(x)))
        y, gate = y.chunk(2, dim=1)
        return x + self.norm(self.conv_point(y * F.silu(gate)))


class EfficientViTBlock(nn.Module):
    """Global context (:class:`LiteMLA`) then local mixing (:class:`GLUMBConv`)."""

    def __init__(self, channels: int, head_dim: int, scales: tuple[int, ...]) -> None:
        super().__init__()
        self.attn = LiteMLA(channels, head_dim, scales)
        self.conv_out = GLUMBConv(channels)

    def forward(self, x: torch.Tensor, sums: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv_out(self.attn(x, sums))


class DownBlock(nn.Module):
    """Halve the resolution; the shortcut is pixel-unshuffle then the mean of channel groups."""

    def __init__(self, in_channels: int, out_channels: int, kind: str) -> None:
        super().__init__()
        self.unshuffle = kind == "pixel_unshuffle"
        self.group = in_channels * 4 // out_channels
        conv_out = out_channels // 4 if self.unshuffle else out_channels
        self.conv = Conv2d(in_channels, conv_out, 3, 1 if self.unshuffle else 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.unshuffle:
            y = F.pixel_unshuffle(y, 2)
        shortcut = F.pixel_unshuffle(x, 2).unflatten(1, (-1, self.group)).mean(dim=2)
        return y + shortcut


class UpBlock(nn.Module):
    """Double the resolution; the shortcut repeats channels then pixel-shuffles."""

    def __init__(self, in_channels: int, out_channels: int, kind: str) -> None:
        super().__init__()
        self.interpolate = kind == "interpolate"
        self.repeats = out_channels * 4 // in_channels
        self.conv = Conv2d(in_channels, out_channels if self.interpolate else out_channels * 4, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interpolate:
            y = self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        else:
            y = F.pixel_shuffle(self.conv(x), 2)
        shortcut = F.pixel_shuffle(x.repeat_interleave(self.repeats, dim=1), 2)
        return y + shortcut


def _block(kind: str, channels: int, head_dim: int, scales: tuple[int, ...]) -> nn.Module:
    if kind == RES_BLOCK:
        return ResBlock(channels)
    if kind == VIT_BLOCK:
        return EfficientViTBlock(channels, head_dim, scales)
    raise ValueError(f"unknown DC-AE block type {kind!r}")


class Encoder(nn.Module):
    def __init__(self, config: DCAEConfig) -> None:
        super().__init__()
        widths = config.encoder_widths
        self.conv_in = Conv2d(config.in_channels, widths[0], 3, 1, 1)
        stages = []
        for i, (width, depth) in enumerate(zip(widths, config.encoder_depths)):
            layers = [_block(config.encoder_blocks[i], width, config.head_dim, config.encoder_scales[i])
                      for _ in range(depth)]
            if i < len(widths) - 1:
                layers.append(DownBlock(width, widths[i + 1], config.downsample))
            stages.append(nn.Sequential(*layers))
        self.down_blocks = nn.ModuleList(stages)
        self.conv_out = Conv2d(widths[-1], config.latent_channels, 3, 1, 1)
        self.out_group = widths[-1] // config.latent_channels

    def units(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """The forward pass as the blocks it runs in order, so a one-pass encode has a Cancel point after each."""
        return [self.conv_in, *(block for stage in self.down_blocks for block in stage), self._out]

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(x) + x.unflatten(1, (-1, self.out_group)).mean(dim=2)

    def forward(self, x: torch.Tensor, progress: ProgressFn | None = None) -> torch.Tensor:
        return run_units(self.units(), x, progress)


class Decoder(nn.Module):
    def __init__(self, config: DCAEConfig) -> None:
        super().__init__()
        widths = config.decoder_widths
        self.conv_in = Conv2d(config.latent_channels, widths[-1], 3, 1, 1)
        self.in_repeats = widths[-1] // config.latent_channels
        stages = []
        for i, (width, depth) in enumerate(zip(widths, config.decoder_depths)):
            layers = [UpBlock(widths[i + 1], width, config.upsample)] if i < len(widths) - 1 else []
            layers += [_block(config.decoder_blocks[i], width, config.head_dim, config.decoder_scales[i])
                       for _ in range(depth)]
            stages.append(nn.Sequential(*layers))
        self.up_blocks = nn.ModuleList(stages)
        self.norm_out = RMSNorm2d(widths[0])
        self.conv_out = Conv2d(widths[0], config.in_channels, 3, 1, 1)

    def units(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """The forward pass as the blocks it runs in order, so a one-pass decode has a Cancel point after each
        (a 4096 px decode that fits in one pass would otherwise only stop at its end)."""
        return [self._in, *(block for stage in reversed(self.up_blocks) for block in stage), self._out]

    def _in(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_in(z) + z.repeat_interleave(self.in_repeats, dim=1)

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.relu(self.norm_out(x)))

    def forward(self, z: torch.Tensor, progress: ProgressFn | None = None) -> torch.Tensor:
        return run_units(self.units(), z, progress)


def run_units(units: list[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor,
              progress: ProgressFn | None) -> torch.Tensor:
    """Run ``units`` in order, reporting ``progress(done, len(units))`` after each (it raises on Cancel)."""
    for done, unit in enumerate(units, 1):
        x = unit(x)
        report(progress, done, len(units))
    return x

"""DC-AE f32c32: the deep-compression autoencoder of Sana (arXiv 2410.10733), torch only.

One canonical layout: the parameter names of diffusers' ``AutoencoderDC``; checkpoints in the
original efficientvit layout are converted on load (:mod:`uniba.sana.dcae_keys`). Every
hyper-parameter is read from tensor shapes, so sana-1.0 and sana-1.1 (same shapes, better
decoder) and reduced test configs load through the same code.

Numerics follow efficientvit (the reference the Sana checkpoints were trained with):

* RMSNorm over channels with weight and bias, eps 1e-5, normalised in fp32 then cast back.
* ReLU linear attention with the ones-padding trick (eps 1e-15); fp16 inputs are upcast to fp32,
  bf16 runs the two matmuls in bf16 and upcasts before the division; when ``H*W <= head_dim``
  the block falls back to ReLU *quadratic* attention.
* Images are in [-1, 1]; latents are unscaled (``scaling_factor`` 0.41407 is applied by the
  sampler's latent format, not here), as diffusers' ``AutoencoderDC`` returns them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from uniba.checkpoint import CheckpointError, load_model, read_state_dict, wrong_family_error
from uniba.memory import is_out_of_memory
from uniba.progress import ProgressFn

from . import dcae_keys

SCALING_FACTOR = 0.41407
RES_BLOCK = "ResBlock"
VIT_BLOCK = "EfficientViTBlock"
FAMILY = "Sana DC-AE (f32c32)"


@dataclass(frozen=True)
class DCAEConfig:
    """Shape of a DC-AE; :meth:`sana_f32c32` is the released Sana autoencoder."""

    in_channels: int = 3
    latent_channels: int = 32
    head_dim: int = 32
    encoder_widths: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_depths: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    encoder_blocks: tuple[str, ...] = (RES_BLOCK,) * 3 + (VIT_BLOCK,) * 3
    encoder_scales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    decoder_widths: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_depths: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    decoder_blocks: tuple[str, ...] = (RES_BLOCK,) * 3 + (VIT_BLOCK,) * 3
    decoder_scales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    downsample: str = "conv"  # "conv" (3x3 stride 2) or "pixel_unshuffle"
    upsample: str = "interpolate"  # "interpolate" (nearest x2 + 3x3) or "pixel_shuffle"
    scaling_factor: float = field(default=SCALING_FACTOR, compare=False)

    @classmethod
    def sana_f32c32(cls) -> DCAEConfig:
        return cls()

    @property
    def spatial_ratio(self) -> int:
        return 2 ** (len(self.decoder_widths) - 1)

    def diffusers_kwargs(self) -> dict:
        """The same shape as keyword arguments of diffusers' ``AutoencoderDC`` (tests use it as the oracle)."""
        return dict(
            in_channels=self.in_channels, latent_channels=self.latent_channels, attention_head_dim=self.head_dim,
            encoder_block_types=self.encoder_blocks, decoder_block_types=self.decoder_blocks,
            encoder_block_out_channels=self.encoder_widths, decoder_block_out_channels=self.decoder_widths,
            encoder_layers_per_block=self.encoder_depths, decoder_layers_per_block=self.decoder_depths,
            encoder_qkv_multiscales=self.encoder_scales, decoder_qkv_multiscales=self.decoder_scales,
            upsample_block_type=self.upsample, downsample_block_type=self.downsample,
            decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=self.scaling_factor,
        )

    def to_dict(self) -> dict:
        return asdict(self)


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
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm = RMSNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.conv2(F.silu(self.conv1(x))))


class MultiscaleProjection(nn.Module):
    """The multi-scale aggregation of q/k/v: a depthwise k x k conv, then a grouped 1x1 conv per head."""

    def __init__(self, channels: int, heads: int, kernel_size: int) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels,
                                 bias=False)
        self.proj_out = nn.Conv2d(channels, channels, 1, groups=3 * heads, bias=False)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        # q/k/v rows concatenated back into the original per-head-interleaved qkv conv
        weight = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
        qkv = F.conv2d(x, weight[:, :, None, None])
        qkv = torch.cat([qkv] + [proj(qkv) for proj in self.to_qkv_multiscale], dim=1)
        qkv = qkv.reshape(b, -1, 3 * self.head_dim, h * w)
        if h * w > self.head_dim:
            out = relu_linear_attention(qkv, self.head_dim)
        else:
            out = relu_quadratic_attention(qkv, self.head_dim)
        out = F.conv2d(out.reshape(b, -1, h, w), self.to_out.weight[:, :, None, None])
        return x + self.norm_out(out)


class GLUMBConv(nn.Module):
    """1x1 expand (x8, SiLU) -> depthwise 3x3 -> gated SiLU -> 1x1 project -> RMSNorm, plus the input."""

    def __init__(self, channels: int, expand: int = 4) -> None:
        super().__init__()
        hidden = channels * expand
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, 1, 1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = RMSNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_depth(F.silu(self.conv_inverted(x)))
        y, gate = y.chunk(2, dim=1)
        return x + self.norm(self.conv_point(y * F.silu(gate)))


class EfficientViTBlock(nn.Module):
    def __init__(self, channels: int, head_dim: int, scales: tuple[int, ...]) -> None:
        super().__init__()
        self.attn = LiteMLA(channels, head_dim, scales)
        self.conv_out = GLUMBConv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.attn(x))


class DownBlock(nn.Module):
    """Halve the resolution; the shortcut is pixel-unshuffle then the mean of channel groups."""

    def __init__(self, in_channels: int, out_channels: int, kind: str) -> None:
        super().__init__()
        self.unshuffle = kind == "pixel_unshuffle"
        self.group = in_channels * 4 // out_channels
        conv_out = out_channels // 4 if self.unshuffle else out_channels
        self.conv = nn.Conv2d(in_channels, conv_out, 3, 1 if self.unshuffle else 2, 1)

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
        self.conv = nn.Conv2d(in_channels, out_channels if self.interpolate else out_channels * 4, 3, 1, 1)

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
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, 1, 1)
        stages = []
        for i, (width, depth) in enumerate(zip(widths, config.encoder_depths)):
            layers = [_block(config.encoder_blocks[i], width, config.head_dim, config.encoder_scales[i])
                      for _ in range(depth)]
            if i < len(widths) - 1:
                layers.append(DownBlock(width, widths[i + 1], config.downsample))
            stages.append(nn.Sequential(*layers))
        self.down_blocks = nn.ModuleList(stages)
        self.conv_out = nn.Conv2d(widths[-1], config.latent_channels, 3, 1, 1)
        self.out_group = widths[-1] // config.latent_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for stage in self.down_blocks:
            x = stage(x)
        return self.conv_out(x) + x.unflatten(1, (-1, self.out_group)).mean(dim=2)


class Decoder(nn.Module):
    def __init__(self, config: DCAEConfig) -> None:
        super().__init__()
        widths = config.decoder_widths
        self.conv_in = nn.Conv2d(config.latent_channels, widths[-1], 3, 1, 1)
        self.in_repeats = widths[-1] // config.latent_channels
        stages = []
        for i, (width, depth) in enumerate(zip(widths, config.decoder_depths)):
            layers = [UpBlock(widths[i + 1], width, config.upsample)] if i < len(widths) - 1 else []
            layers += [_block(config.decoder_blocks[i], width, config.head_dim, config.decoder_scales[i])
                       for _ in range(depth)]
            stages.append(nn.Sequential(*layers))
        self.up_blocks = nn.ModuleList(stages)
        self.norm_out = RMSNorm2d(widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.in_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z) + z.repeat_interleave(self.in_repeats, dim=1)
        for stage in reversed(self.up_blocks):
            x = stage(x)
        return self.conv_out(F.relu(self.norm_out(x)))


# --------------------------------------------------------------------------- the autoencoder

class DCAE(nn.Module):
    """Sana's DC-AE: ``encode`` images in [-1, 1] (NCHW) to unscaled latents, ``decode`` them back.

    ``decode`` tiles large outputs (from 2048 px up, 1024-px tiles with blended overlaps; see
    :mod:`uniba.sana.tiling`) and retries with smaller tiles when the device runs out of memory.
    """

    def __init__(self, config: DCAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or DCAEConfig.sana_f32c32()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def spatial_ratio(self) -> int:
        return self.config.spatial_ratio

    # not ``dtype``/``device``: ComfyUI's ModelPatcher assigns ``model.device`` on the modules it manages
    @property
    def weight_dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def weight_device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.weight_device, dtype=self.weight_dtype)

    @torch.no_grad()
    def encode_full(self, image: torch.Tensor) -> torch.Tensor:
        """Encode in one pass (no tiling). ``image``: (B, 3, H, W), H and W multiples of 32."""
        self._check_image(image)
        return self.encoder(self._prepare(image))

    @torch.no_grad()
    def decode_full(self, latent: torch.Tensor) -> torch.Tensor:
        """Decode in one pass (no tiling)."""
        return self.decoder(self._prepare(latent))

    def encode(self, image: torch.Tensor, tile_size: int | None = None, *, budget_bytes: int | None = None,
               progress: ProgressFn | None = None, output_device: torch.device | str | None = None,
               is_oom: Callable[[BaseException], bool] = is_out_of_memory) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> unscaled latents (B, C, H/32, W/32); tiled like :meth:`decode`."""
        from .tiling import run_tiled

        self._check_image(image)
        return run_tiled(self, image, "encode", tile_size=tile_size, budget_bytes=budget_bytes,
                         progress=progress, output_device=output_device, is_oom=is_oom)

    def decode(self, latent: torch.Tensor, tile_size: int | None = None, *, budget_bytes: int | None = None,
               progress: ProgressFn | None = None, output_device: torch.device | str | None = None,
               is_oom: Callable[[BaseException], bool] = is_out_of_memory) -> torch.Tensor:
        """Unscaled latents (B, C, h, w) -> images in about [-1, 1] (B, 3, 32h, 32w).

        ``tile_size`` (output pixels): ``None`` = automatic (untiled below 2048 px if it fits
        ``budget_bytes``, else the largest tile up to 1024 px that fits); a number forces tiles
        of that size (a tile as large as the image means one pass).
        """
        from .tiling import run_tiled

        if latent.ndim != 4 or latent.shape[1] != self.config.latent_channels:
            raise ValueError(f"DC-AE decode expects latents (B, {self.config.latent_channels}, h, w), "
                             f"got {tuple(latent.shape)}")
        return run_tiled(self, latent, "decode", tile_size=tile_size, budget_bytes=budget_bytes,
                         progress=progress, output_device=output_device, is_oom=is_oom)

    def _check_image(self, image: torch.Tensor) -> None:
        r = self.spatial_ratio
        if image.ndim != 4 or image.shape[1] != self.config.in_channels or image.shape[2] % r or image.shape[3] % r:
            raise ValueError(f"DC-AE encode expects images (B, {self.config.in_channels}, H, W) with H and W "
                             f"multiples of {r}, got {tuple(image.shape)}")


# --------------------------------------------------------------------------- loading

def config_from_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike | None = None
                           ) -> DCAEConfig:
    """Read every hyper-parameter of a diffusers-layout DC-AE state dict from its shapes."""

    def stage_layout(prefix: str) -> tuple[list[int], list[int], list[str], list[tuple[int, ...]]]:
        widths, depths, kinds, scales = [], [], [], []
        stage = 0
        while any(k.startswith(f"{prefix}.{stage}.") for k in state_dict):
            j, depth, kind, width, stage_scales = 0, 0, RES_BLOCK, 0, ()
            while any(k.startswith(f"{prefix}.{stage}.{j}.") for k in state_dict):
                base = f"{prefix}.{stage}.{j}"
                if f"{base}.conv1.weight" in state_dict:
                    kind, width, depth = RES_BLOCK, state_dict[f"{base}.conv1.weight"].shape[0], depth + 1
                elif f"{base}.attn.to_q.weight" in state_dict:
                    kind, width, depth = VIT_BLOCK, state_dict[f"{base}.attn.to_q.weight"].shape[0], depth + 1
                    m, found = 0, []
                    while f"{base}.attn.to_qkv_multiscale.{m}.proj_in.weight" in state_dict:
                        found.append(int(state_dict[f"{base}.attn.to_qkv_multiscale.{m}.proj_in.weight"].shape[-1]))
                        m += 1
                    stage_scales = tuple(found)
                j += 1
            if depth == 0:
                raise CheckpointError(path, f"has no blocks in {prefix}.{stage}: only DC-AE layouts whose every "
                                            "stage has blocks (the Sana f32c32 autoencoder) are supported.",
                                      "Use the Sana DC-AE (dc-ae-f32c32-sana-1.0 or 1.1).")
            widths.append(int(width))
            depths.append(depth)
            kinds.append(kind)
            scales.append(stage_scales)
            stage += 1
        return widths, depths, kinds, scales

    try:
        enc = stage_layout("encoder.down_blocks")
        dec = stage_layout("decoder.up_blocks")
        latent_channels = int(state_dict["encoder.conv_out.weight"].shape[0])
        in_channels = int(state_dict["encoder.conv_in.weight"].shape[1])
        head_dim = 32
        for k, v in state_dict.items():
            if k.endswith("to_qkv_multiscale.0.proj_out.weight"):
                head_dim = int(v.shape[1])  # grouped 1x1 conv: in-channels per group = head dim
                break
        down = state_dict.get(f"encoder.down_blocks.0.{enc[1][0]}.conv.weight")
        up = state_dict.get("decoder.up_blocks.0.0.conv.weight")
    except KeyError as exc:
        raise CheckpointError(path, f"lacks the DC-AE tensor {exc}.", "The file is incomplete: download it again.") \
            from None
    if not enc[0] or not dec[0] or down is None or up is None:
        raise CheckpointError(path, "does not have the DC-AE encoder/decoder stages.",
                              "Use the Sana DC-AE (dc-ae-f32c32-sana-1.x).")
    return DCAEConfig(
        in_channels=in_channels, latent_channels=latent_channels, head_dim=head_dim,
        encoder_widths=tuple(enc[0]), encoder_depths=tuple(enc[1]), encoder_blocks=tuple(enc[2]),
        encoder_scales=tuple(enc[3]),
        decoder_widths=tuple(dec[0]), decoder_depths=tuple(dec[1]), decoder_blocks=tuple(dec[2]),
        decoder_scales=tuple(dec[3]),
        downsample="conv" if down.shape[0] == enc[0][1] else "pixel_unshuffle",
        upsample="interpolate" if up.shape[0] == dec[0][0] else "pixel_shuffle",
    )


def to_diffusers_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike | None = None
                            ) -> dict[str, torch.Tensor]:
    """Accept either layout (efficientvit or diffusers, optionally prefixed) and return diffusers keys."""
    stripped = dcae_keys.strip_prefix(state_dict)
    layout = dcae_keys.detect_layout(stripped)
    if layout == "original":
        return dcae_keys.original_to_diffusers(stripped)
    if layout == "diffusers":
        return stripped
    raise wrong_family_error(path, FAMILY, state_dict.keys(),
                             "Choose the Sana DC-AE file (mit-han-lab/dc-ae-f32c32-sana-1.x, "
                             "model.safetensors or the -diffusers diffusion_pytorch_model.safetensors) in models/vae/.")


def load_dcae(path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
              device: torch.device | str = "cpu") -> DCAE:
    """Load a DC-AE from a file, a diffusers folder or a state dict, strictly, in either key layout."""
    path = None
    if isinstance(path_or_state_dict, Mapping):
        raw = dict(path_or_state_dict)
    else:
        path = os.fspath(path_or_state_dict)
        if os.path.isdir(path) and os.path.isdir(os.path.join(path, "vae")):
            path = os.path.join(path, "vae")
        raw = read_state_dict(path)
    state = to_diffusers_state_dict(raw, path)
    config = config_from_state_dict(state, path)
    return load_model(lambda: DCAE(config), state, path=path, family=FAMILY, dtype=dtype, device=device)

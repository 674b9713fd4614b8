"""DC-AE f32c32: the deep-compression autoencoder of Sana (arXiv 2410.10733), torch only.

One canonical layout: the parameter names of diffusers' ``AutoencoderDC``; checkpoints in the
original efficientvit layout are converted on load (:mod:`uniba.dcae.keys`). Every
hyper-parameter is read from tensor shapes, so sana-1.0 and sana-1.1 (same shapes, better
decoder) and reduced test configs load through the same code. The layers and their numerics are
in :mod:`uniba.dcae.blocks`.

Images are in [-1, 1]; latents are unscaled (``config.SCALING_FACTOR`` is applied by the
sampler's latent format, not here), as diffusers' ``AutoencoderDC`` returns them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from uniba.guards import check_image
from uniba.memory import is_out_of_memory
from uniba.progress import ProgressFn

from .blocks import Decoder, Encoder
from .config import DCAEConfig
from .tiling import decode_exact, encode_exact

# --------------------------------------------------------------------------- the autoencoder

class DCAE(nn.Module):
    """Sana's DC-AE: ``encode`` images in [-1, 1] (NCHW) to unscaled latents, ``decode`` them back.

    ``decode`` and ``encode`` run tile by tile when the image does not fit in one pass, with a
    result equal to the one-pass ``decode_full`` / ``encode_full`` (see :mod:`uniba.dcae.tiling`).
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
    def encode_full(self, image: torch.Tensor, progress: ProgressFn | None = None) -> torch.Tensor:
        """Encode in one pass (no tiling). ``image``: (B, 3, H, W), H and W multiples of 32.
        ``progress(done, total)`` after each block (:meth:`Encoder.units`); raising from it cancels."""
        self._check_image(image)
        return self.encoder(self._prepare(image), progress)

    @torch.no_grad()
    def decode_full(self, latent: torch.Tensor, progress: ProgressFn | None = None) -> torch.Tensor:
        """Decode in one pass (no tiling); ``progress`` as in :meth:`encode_full`."""
        return self.decoder(self._prepare(latent), progress)

    def encode(self, image: torch.Tensor, tile_size: int | None = None, *, budget_bytes: int | None = None,
               progress: ProgressFn | None = None, output_device: torch.device | str | None = None,
               is_oom: Callable[[BaseException], bool] = is_out_of_memory) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> unscaled latents (B, C, H/32, W/32), fp32.

        Exact at any tile size (see :meth:`decode`).
        """
        self._check_image(image)
        return encode_exact(self, image, tile_size=tile_size, budget_bytes=budget_bytes, progress=progress,
                            output_device=output_device, is_oom=is_oom)

    def decode(self, latent: torch.Tensor, tile_size: int | None = None, *, budget_bytes: int | None = None,
               progress: ProgressFn | None = None, output_device: torch.device | str | None = None,
               is_oom: Callable[[BaseException], bool] = is_out_of_memory) -> torch.Tensor:
        """Unscaled latents (B, C, h, w) -> images in about [-1, 1] (B, 3, 32h, 32w), fp32.

        The result equals :meth:`decode_full` (to fp32 rounding) whatever ``tile_size`` (the largest
        tile edge in output pixels; ``None`` = as large as ``budget_bytes`` allows, 768 px without a
        budget) and whatever memory is free: both only change the speed and the peak memory.
        """
        if latent.ndim != 4 or latent.shape[1] != self.config.latent_channels or not min(latent.shape, default=0):
            raise ValueError(f"latent (DC-AE decode input): expected (batch >= 1, {self.config.latent_channels}, "
                             f"h, w), got {tuple(latent.shape)}")
        return decode_exact(self, latent, tile_size=tile_size, budget_bytes=budget_bytes, progress=progress,
                            output_device=output_device, is_oom=is_oom)

    def _check_image(self, image: torch.Tensor) -> None:
        r = self.spatial_ratio
        check_image(image, "image (DC-AE encode input)", channels_last=False, value_range=(-1.0, 1.0),
                    channels=(self.config.in_channels,), fix_range="Pass pixels * 2 - 1 for 0..1 pixels.")
        if image.ndim != 4 or image.shape[1] != self.config.in_channels or image.shape[2] % r or image.shape[3] % r:
            raise ValueError(f"DC-AE encode expects images (B, {self.config.in_channels}, H, W) with H and W "
                             f"multiples of {r}, got {tuple(image.shape)}")

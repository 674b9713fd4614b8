"""The shape of a DC-AE: :class:`DCAEConfig`, read from a state dict's tensor shapes by ``from_shapes``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch

from uniba.checkpoint import CheckpointError

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

    @classmethod
    def from_shapes(cls, state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike | None = None
                    ) -> DCAEConfig:
        """Read every hyper-parameter of a diffusers-layout DC-AE state dict from its shapes."""
        try:
            enc = _stage_layout(state_dict, "encoder.down_blocks", path)
            dec = _stage_layout(state_dict, "decoder.up_blocks", path)
            latent_channels = int(state_dict["encoder.conv_out.weight"].shape[0])
            in_channels = int(state_dict["encoder.conv_in.weight"].shape[1])
            head_dim = 32
            for k, v in state_dict.items():
                if k.endswith("to_qkv_multiscale.0.proj_out.weight"):
                    head_dim = int(v.shape[1])  # grouped 1x1 conv: in-channels per group = head dim
                    break
            down = state_dict.get(f"encoder.down_blocks.0.{enc[1][0]}.conv.weight") if enc[1] else None
            up = state_dict.get("decoder.up_blocks.0.0.conv.weight")
        except KeyError as exc:
            raise CheckpointError(path, f"lacks the DC-AE tensor {exc}.",
                                  "The file is incomplete: download it again.") from None
        if not enc[0] or not dec[0] or down is None or up is None:
            raise CheckpointError(path, "does not have the DC-AE encoder/decoder stages.",
                                  "Use the Sana DC-AE (dc-ae-f32c32-sana-1.x).")
        return cls(
            in_channels=in_channels, latent_channels=latent_channels, head_dim=head_dim,
            encoder_widths=tuple(enc[0]), encoder_depths=tuple(enc[1]), encoder_blocks=tuple(enc[2]),
            encoder_scales=tuple(enc[3]),
            decoder_widths=tuple(dec[0]), decoder_depths=tuple(dec[1]), decoder_blocks=tuple(dec[2]),
            decoder_scales=tuple(dec[3]),
            downsample="conv" if down.shape[0] == enc[0][1] else "pixel_unshuffle",
            upsample="interpolate" if up.shape[0] == dec[0][0] else "pixel_shuffle",
        )


def _stage_layout(state_dict: Mapping[str, torch.Tensor], prefix: str, path: str | os.PathLike | None
                  ) -> tuple[list[int], list[int], list[str], list[tuple[int, ...]]]:
    """Widths, depths, block kinds and multiscale kernels of the stages under ``prefix``."""
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

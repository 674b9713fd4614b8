"""Inf-DiT hyper-parameters: the config dataclass, the released configuration, shape inference.

Every size of the network can be read from a checkpoint's tensor shapes (docs/SOURCES.md, Inf-DiT §4.1):
width and depth from the qkv weights, heads and head size from ``re_pos_embed``, the block size
from ``lr_query_position_embedding``, the LR window from ``lr_key_position_embedding`` (which also
fixes the native scale), the RoPE table size from the ``rope.freqs_cos`` buffer. A converted file
carries the config in its safetensors metadata instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..metadata import config_from_json, config_to_json

METADATA_KEY = "uniba_infdit_config"


@dataclass(frozen=True)
class ClipVisionConfig:
    """An open_clip ``VisionTransformer`` (class-token pooling, exact GELU, LN eps 1e-5)."""

    width: int = 1024
    layers: int = 24
    heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    mlp_hidden: int = 4096
    output_dim: int = 768

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class InfDiTConfig:
    """Everything needed to build :class:`~uniba.infdit.model.InfDiT` (defaults: the release)."""

    hidden_size: int = 1280
    num_layers: int = 28
    num_heads: int = 16
    mlp_hidden: int = 5120
    patch_size: int = 4
    block_tokens: int = 32  # tokens per block side: a block is block_tokens * patch_size pixels
    in_channels: int = 6
    out_channels: int = 3
    lr_patch_size: int = 2
    lr_block_tokens: int = 16  # LR tokens per HR block side; the cross-attention window is 3x that
    vector_dim: int = 768
    time_channels: int = 192
    rope_grid: int = 1024  # positions per axis in the RoPE table; positions are taken modulo this
    rope_theta: float = 10000.0
    sigma_data: float = 0.5
    eps: float = 1e-6
    clip: ClipVisionConfig | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def block_px(self) -> int:
        return self.block_tokens * self.patch_size

    @property
    def tokens_per_block(self) -> int:
        return self.block_tokens * self.block_tokens

    @property
    def native_scale(self) -> int:
        """The upscaling factor the model was trained for (4 for the release)."""
        return self.block_px // (self.lr_block_tokens * self.lr_patch_size)

    @property
    def lr_window(self) -> int:
        return 3 * self.lr_block_tokens

    @property
    def max_side_px(self) -> int:
        """Largest HR side whose RoPE positions do not wrap (4096 px for the release)."""
        return self.rope_grid * self.patch_size

    def to_json(self) -> str:
        return config_to_json(self)

    @classmethod
    def from_json(cls, text: str) -> InfDiTConfig:
        return config_from_json(cls, text, nested={"clip": ClipVisionConfig})

    def replace(self, **changes: Any) -> InfDiTConfig:
        return replace(self, **changes)


RELEASE_CLIP = ClipVisionConfig()


def release_config(with_clip: bool = True) -> InfDiTConfig:
    """The released Inf-DiT (generate_sr_big_cli.sh): 1280 wide, 28 layers, 16 heads, 128-px blocks."""
    return InfDiTConfig(clip=RELEASE_CLIP if with_clip else None)


ShapeMap = Mapping[str, tuple[int, ...]]

SAT_CLIP_PREFIX = "image_encoder.model.visual."
OPEN_CLIP_PREFIX = "visual."


def infer_clip_config(shapes: ShapeMap, prefix: str) -> ClipVisionConfig | None:
    """The CLIP visual tower's config from open_clip key shapes under ``prefix`` (None if absent)."""
    conv = shapes.get(prefix + "conv1.weight")
    if conv is None:
        return None
    width, _, patch, _ = conv
    layers = 1 + max(int(k[len(prefix):].split(".")[2]) for k in shapes
                     if k.startswith(prefix + "transformer.resblocks."))
    tokens = shapes[prefix + "positional_embedding"][0]
    grid = math.isqrt(tokens - 1)
    proj = shapes.get(prefix + "proj")
    return ClipVisionConfig(
        width=width, layers=layers, heads=max(1, width // 64), patch_size=patch, image_size=grid * patch,
        mlp_hidden=shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0],
        output_dim=proj[1] if proj is not None else width,
    )


def infer_config(shapes: ShapeMap) -> InfDiTConfig:
    """Config from the SAT key names and shapes of an Inf-DiT state dict (see module docstring).

    Raises ``KeyError`` when a key the inference needs is missing: the caller turns that into a
    wrong-family error.
    """
    qkv = shapes["transformer.layers.0.attention.query_key_value.weight"]
    hidden = qkv[1]
    layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("transformer.layers."))
    _, _, heads, head_dim = shapes["mixins.adaln_layer.re_pos_embed"]
    block_tokens = math.isqrt(shapes["mixins.adaln_layer.lr_query_position_embedding"][1])
    lr_window = math.isqrt(shapes["mixins.adaln_layer.lr_key_position_embedding"][1])
    patch = shapes["mixins.patch_embed.proj.weight"]
    lr_patch = shapes["mixins.adaln_layer.proj_lr.weight"][-1]
    rope = shapes.get("mixins.adaln_layer.rope.freqs_cos")
    return InfDiTConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        mlp_hidden=shapes["transformer.layers.0.mlp.dense_h_to_4h.weight"][0],
        patch_size=patch[-1],
        block_tokens=block_tokens,
        in_channels=patch[1],
        out_channels=shapes["mixins.final_layer.linear.weight"][0] // (patch[-1] ** 2),
        lr_patch_size=lr_patch,
        lr_block_tokens=lr_window // 3,
        vector_dim=shapes["cond_embed.map_vector.0.weight"][1],
        time_channels=shapes["time_embed.mlp.0.weight"][1],
        # Without the buffer, use the release's ratio (table = 32 blocks per axis, 1024 for 32-token blocks).
        rope_grid=rope[0] if rope is not None else 32 * block_tokens,
        clip=infer_clip_config(shapes, SAT_CLIP_PREFIX),
    )

"""The CLIP ViT-L/14 visual tower that gives Inf-DiT its global semantic vector (docs/SOURCES.md, Inf-DiT §1.5).

Module names follow open_clip's ``VisionTransformer`` (``conv1``, ``transformer.resblocks.N``...), so
the checkpoint's ``image_encoder.model.visual.*`` tensors load by a prefix change. ViT-L-14 in
open_clip uses exact GELU, class-token pooling, LayerNorm eps 1e-5 and a bias-free patch conv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uniba.conv import Conv2d

from .config import ClipVisionConfig

# OpenAI CLIP normalisation used by the reference's preprocessing.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class _Attention(nn.Module):
    """``nn.MultiheadAttention`` parameter layout (in_proj_weight/bias, out_proj) computed with SDPA."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, -1).permute(
            2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class _ResBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = _Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = _Mlp(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            _ResBlock(config.width, config.heads, config.mlp_hidden) for _ in range(config.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class ClipVisionTower(nn.Module):
    """open_clip ``VisionTransformer``: image (normalised, ``image_size`` square) -> projected embedding."""

    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.conv1 = Conv2d(3, w, config.patch_size, config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.positional_embedding = nn.Parameter(torch.zeros(config.grid**2 + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = _Transformer(config)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.zeros(w, config.output_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """The reference's transform: [-1,1] -> [0,1], bicubic resize of the shorter side, centre crop, normalise.

        torchvision >= 0.17 resizes tensors with antialias, i.e. ``F.interpolate(bicubic, antialias=True)``.
        """
        size = self.config.image_size
        x = (image.float() + 1) / 2
        h, w = x.shape[-2:]
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(size * long / short)
        new_h, new_w = (size, new_long) if h <= w else (new_long, size)
        if (new_h, new_w) != (h, w):
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        x = x[..., top:top + size, left:left + size]
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """L2-normalised embedding of an image in [-1, 1] (encode_image(normalize=True), normalised again)."""
        param = self.proj
        pixels = self.preprocess(image).to(device=param.device, dtype=param.dtype)
        emb = F.normalize(self(pixels).float(), dim=-1)
        return F.normalize(emb, dim=-1)

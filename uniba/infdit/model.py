"""The Inf-DiT network (docs/SOURCES.md, Inf-DiT §1), computed on block batches.

A forward pass works on an ``n_h x n_w`` rectangle of 128-px blocks (the whole canvas is just the
largest rectangle). Per layer, the rectangle's queries attend to the keys of each block itself and
of its top-left, left and top neighbours (slot order [self, top-left, left, top], replicate-clamped
at the image border). Neighbours outside the rectangle come from a :class:`NeighbourKV` provider
(the block-wise KV cache of :mod:`uniba.infdit.blockwise`).

Reference quirks reproduced here, each of which changes the output measurably: both input halves
scaled by c_in; SiLU applied twice to the conditioning; keys normalised with the *q* LayerNorm;
``re_pos`` slot embeddings added to keys after RoPE; 2-D interleaved RoPE with row in the first half
of each head and positions modulo the table size; layer-0 LR cross-attention with an affine
``post_cross_attention_layernorm`` replacing the plain pre-MLP norm; LR tokens zero-padded after
``proj_lr``; two affine-free LayerNorms before the final modulation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from uniba.conv import Conv2d

from .clip import ClipVisionTower
from .config import InfDiTConfig


class NeighbourKV(Protocol):
    """Gives a block batch the keys/values of finished neighbour blocks, and keeps what later batches need."""

    def neighbours(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Extended grids ``(B, n_h+1, n_w+1, T, H, D)`` whose row 0 / column 0 hold the top / left neighbours."""
        ...

    def keep(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None: ...


LRWindows = Callable[["BlockRect"], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LRCondition:
    """Sigma-independent conditioning of one image (:meth:`InfDiT.condition`), reused by every evaluation."""

    # rect -> K/V of the rect's LR windows (B*n_h*n_w, window^2, heads, head_dim), before the key offset;
    # the provider decides what of the LR maps it keeps (the block-wise line cache keeps a strip)
    windows: LRWindows
    clip_vector: torch.Tensor  # clip_embed(CLIP embedding), (B, hidden)


@dataclass
class StepEmbedding:
    """What one evaluation needs that depends on sigma only (:meth:`InfDiT.step_embedding`)."""

    layers: list[tuple[torch.Tensor, ...]]  # per layer: shift/scale of attention input and MLP input
    final: tuple[torch.Tensor, ...]  # shift/scale of the final layer
    block_pos: torch.Tensor  # re_pos slot embeddings in the compute dtype


@dataclass(frozen=True)
class BlockRect:
    """Blocks ``[row0, row1) x [col0, col1)`` of a ``grid_h x grid_w`` block grid."""

    row0: int
    row1: int
    col0: int
    col1: int

    @property
    def n_h(self) -> int:
        return self.row1 - self.row0

    @property
    def n_w(self) -> int:
        return self.col1 - self.col0

    def blocks(self) -> list[tuple[int, int]]:
        return [(i, j) for i in range(self.row0, self.row1) for j in range(self.col0, self.col1)]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of the EDM noise level, no endpoint (dit/embeddings.py)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_frequencies(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """Frequencies of one axis: a quarter of the head's channels, each used by an interleaved pair."""
    axis_dim = head_dim // 2
    return 1.0 / (theta ** (torch.arange(0, axis_dim, 2, device=device)[: axis_dim // 2].float() / axis_dim))


def rope_tables(config: InfDiTConfig, rect: BlockRect, device: torch.device, dtype: torch.dtype,
                offset: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``(n_h, n_w, T, head_dim)`` for the rectangle's tokens, from absolute canvas positions.

    Equal bit for bit to the reference's 1024x1024 table lookup, without the table. ``offset``
    shifts the token positions (a tile placed elsewhere on a larger canvas).
    """
    bt = config.block_tokens
    freqs = rope_frequencies(config.head_dim, config.rope_theta, device).repeat_interleave(2)
    rows = (torch.arange(rect.row0 * bt, rect.row1 * bt, device=device) + offset[0]) % config.rope_grid
    cols = (torch.arange(rect.col0 * bt, rect.col1 * bt, device=device) + offset[1]) % config.rope_grid
    rows, cols = rows.float(), cols.float()
    ang_r = (rows[:, None] * freqs).view(rect.n_h, 1, bt, 1, -1).expand(-1, rect.n_w, -1, bt, -1)
    ang_c = (cols[:, None] * freqs).view(1, rect.n_w, 1, bt, -1).expand(rect.n_h, -1, bt, -1, -1)
    angles = torch.cat([ang_r, ang_c], dim=-1).reshape(rect.n_h, rect.n_w, bt * bt, -1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (GPT-J style). ``x``: (..., T, H, D); cos/sin: (..., T, 1, D)."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


def _norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, c: InfDiTConfig) -> None:
        super().__init__()
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size)


class Mlp(nn.Module):
    def __init__(self, c: InfDiTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.mlp_hidden)
        self.fc2 = nn.Linear(c.mlp_hidden, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, c: InfDiTConfig) -> None:
        super().__init__()
        self.attn = Attention(c)
        self.mlp = Mlp(c)
        self.adaln = nn.Linear(c.hidden_size, 4 * c.hidden_size)
        self.qk_norm = nn.LayerNorm(c.head_dim, eps=1e-6)


class LRCrossAttention(nn.Module):
    """Layer-0 attention of each HR block to the 3x3 neighbourhood of LR blocks around it.

    See docs/SOURCES.md, Inf-DiT §1.4.
    """

    def __init__(self, c: InfDiTConfig) -> None:
        super().__init__()
        self.proj_lr = Conv2d(3, c.hidden_size, c.lr_patch_size, c.lr_patch_size)
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key_value = nn.Linear(c.hidden_size, 2 * c.hidden_size)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.post_norm = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.q_norm = nn.LayerNorm(c.head_dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(c.head_dim, eps=1e-6)
        self.query_pos = nn.Parameter(torch.zeros(1, c.tokens_per_block, c.num_heads, c.head_dim))
        self.key_pos = nn.Parameter(torch.zeros(1, c.lr_window**2, c.num_heads, c.head_dim))


class FinalLayer(nn.Module):
    def __init__(self, c: InfDiTConfig) -> None:
        super().__init__()
        self.adaln = nn.Linear(c.hidden_size, 2 * c.hidden_size)
        self.linear = nn.Linear(c.hidden_size, c.patch_size**2 * c.out_channels)


class InfDiT(nn.Module):
    """Inf-DiT built from an :class:`InfDiTConfig`; ``clip`` is the optional CLIP visual tower."""

    def __init__(self, config: InfDiTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = Conv2d(c.in_channels, c.hidden_size, c.patch_size, c.patch_size)
        self.t_embed = nn.Sequential(nn.Linear(c.time_channels, c.hidden_size), nn.SiLU(),
                                     nn.Linear(c.hidden_size, c.hidden_size))
        self.clip_embed = nn.Sequential(nn.Linear(c.vector_dim, c.hidden_size), nn.SiLU(),
                                        nn.Linear(c.hidden_size, c.hidden_size))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.block_pos = nn.Parameter(torch.zeros(c.num_layers, 4, c.num_heads, c.head_dim))
        self.lr_xattn = LRCrossAttention(c)
        self.final = FinalLayer(c)
        self.clip = ClipVisionTower(c.clip) if c.clip is not None else None

    # ------------------------------------------------------------------ conditioning

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.weight.device

    def precondition(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """EDM c_skip, c_out, c_in, c_noise (float32) for sigma of shape (B,)."""
        sd = self.config.sigma_data
        sigma = sigma.float()
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2) ** 0.5
        c_in = 1 / (sigma**2 + sd**2) ** 0.5
        c_noise = 0.25 * sigma.log()
        return c_skip, c_out, c_in, c_noise

    def clip_vector(self, clip_embedding: torch.Tensor) -> torch.Tensor:
        """``clip_embed`` of the CLIP image embedding: sigma-independent, computed once per image."""
        return self.clip_embed(clip_embedding.to(device=self.device, dtype=self.dtype))

    def embedding(self, c_noise: torch.Tensor, clip_vector: torch.Tensor) -> torch.Tensor:
        """``SiLU(t_embed + clip_embed)``; each adaLN head applies another SiLU (the double SiLU).

        ``clip_vector`` is :meth:`clip_vector` of the CLIP embedding (the part that does not depend on sigma).
        """
        t = timestep_embedding(c_noise, self.config.time_channels).to(self.dtype)
        return F.silu(self.t_embed(t) + clip_vector)

    def condition(self, lr: torch.Tensor, clip_embedding: torch.Tensor) -> LRCondition:
        """The sigma-independent conditioning of one image with LR windows projected per call, nothing kept.

        ``lr`` (B, 3, h, w) is the LR image the cross-attention sees. The block-wise denoiser gives
        its own window provider instead (a line cache, :class:`uniba.infdit.blockwise.LRLineCache`).
        """
        lr = lr.to(device=self.device, dtype=self.dtype)

        def windows(rect: BlockRect) -> tuple[torch.Tensor, torch.Tensor]:
            k, v = self.lr_kv(lr, (rect.row0, rect.row1 + 2), (rect.col0, rect.col1 + 2))
            return self.lr_unfold(k), self.lr_unfold(v)

        return LRCondition(windows=windows, clip_vector=self.clip_vector(clip_embedding))

    def lr_kv(self, lr: torch.Tensor, rows: tuple[int, int],
              cols: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention K (normalised) and V of the LR tokens of padded LR blocks ``rows x cols``.

        The LR map is zero-padded by one LR block on every side *after* ``proj_lr``, as the reference's
        Unfold padding does (padded block r is LR block r - 1), and the padding tokens then go through
        ``key_value`` and the key norm like every other token. ``proj_lr`` is a stride-equals-kernel
        convolution, so any region is computed from its own pixels alone, equal to the whole map's part.
        Returns (B, rows*lrb, cols*lrb, heads, head_dim) each.
        """
        c = self.config
        x = self.lr_xattn
        lrb, px = c.lr_block_tokens, c.lr_block_tokens * c.lr_patch_size
        grid = (lr.shape[-2] // px, lr.shape[-1] // px)
        # padded block p is real block p - 1; only the real ones are projected, the rest is zero tokens
        (r0, r1), (c0, c1) = [(max(lo - 1, 0), max(min(hi - 1, n), lo - 1, 0))
                              for (lo, hi), n in zip((rows, cols), grid, strict=True)]
        pixels = lr[..., r0 * px:r1 * px, c0 * px:c1 * px]
        if pixels.numel():
            tokens = x.proj_lr(pixels.to(device=self.device, dtype=self.dtype))
        else:
            tokens = lr.new_zeros(lr.shape[0], c.hidden_size, (r1 - r0) * lrb, (c1 - c0) * lrb,
                                  device=self.device, dtype=self.dtype)
        top, left = (r0 + 1 - rows[0]) * lrb, (c0 + 1 - cols[0]) * lrb
        bottom = (rows[1] - rows[0]) * lrb - top - tokens.shape[-2]
        right = (cols[1] - cols[0]) * lrb - left - tokens.shape[-1]
        tokens = F.pad(tokens, (left, right, top, bottom)).permute(0, 2, 3, 1)  # (B, rows, cols, C)
        # K and V from the two halves of ``key_value`` one after the other: chunking one (..., 2C) output
        # would keep all of it alive for as long as the V view lives
        weight, bias = x.key_value.weight, x.key_value.bias

        def half(part: slice) -> torch.Tensor:
            return F.linear(tokens, weight[part], None if bias is None else bias[part]).unflatten(
                -1, (c.num_heads, c.head_dim))

        return x.k_norm(half(slice(0, c.hidden_size))), half(slice(c.hidden_size, 2 * c.hidden_size))

    def lr_unfold(self, t: torch.Tensor) -> torch.Tensor:
        """The 3x3-LR-block windows of every HR block of a map region: (B, (n_h+2) lrb, (n_w+2) lrb, H, D) ->
        (B*n_h*n_w, window^2, H, D); the window of HR block (i, j) starts at the region's LR block (i, j)."""
        c = self.config
        lrb, win = c.lr_block_tokens, c.lr_window
        t = t.flatten(-2).unfold(1, win, lrb).unfold(2, win, lrb)  # (B, n_h, n_w, C, win, win)
        return t.permute(0, 1, 2, 4, 5, 3).reshape(-1, win * win, c.num_heads, c.head_dim)

    def step_embedding(self, sigma: torch.Tensor, cond: LRCondition) -> StepEmbedding:
        """Everything of one evaluation that depends on sigma only: adaLN shifts/scales of every layer."""
        b = cond.clip_vector.shape[0]
        c_noise = self.precondition(sigma.to(self.device))[3]
        emb_act = F.silu(self.embedding(c_noise, cond.clip_vector))
        layers = [tuple(block.adaln(emb_act).view(b, 1, 1, 1, 4, -1).unbind(-2)) for block in self.blocks]
        final = tuple(self.final.adaln(emb_act).view(b, 1, 1, 1, 2, -1).unbind(-2))
        return StepEmbedding(layers=layers, final=final, block_pos=self.block_pos.to(self.dtype))

    # ------------------------------------------------------------------ one block batch

    def lr_windows(self, cond: LRCondition, rect: BlockRect) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention K/V of the rectangle's LR windows: ``(B*n_h*n_w, window^2, H, D)`` each.

        Each HR block reads the 3x3 LR blocks around it; the maps are padded by one LR block, so the
        window of block (i, j) starts at padded LR block (i, j).
        """
        k, v = cond.windows(rect)
        return k.to(self.device, non_blocking=True) + self.lr_xattn.key_pos, v.to(self.device, non_blocking=True)

    def forward_blocks(self, x_in: torch.Tensor, cond: LRCondition, step: StepEmbedding, rect: BlockRect,
                       kv: NeighbourKV, position_offset: tuple[int, int] = (0, 0),
                       between_layers: Callable[[], None] | None = None) -> torch.Tensor:
        """Network output F for one rectangle of blocks.

        ``x_in``: (B, in_channels, n_h*block_px, n_w*block_px), already multiplied by c_in;
        ``cond``: :meth:`condition` of the image; ``step``: :meth:`step_embedding` of this evaluation.
        RoPE tables are computed once per call and shared by every layer. ``between_layers()`` runs after
        each layer but the last (a Cancel point: it may raise; the batch is then dropped whole).
        Returns (B, out_channels, n_h*block_px, n_w*block_px).
        """
        c = self.config
        b = x_in.shape[0]
        bt, nh, nw, heads, hd = c.block_tokens, rect.n_h, rect.n_w, c.num_heads, c.head_dim
        n_tok = c.tokens_per_block
        dtype = self.dtype

        h = self.patch_embed(x_in.to(dtype))  # (B, C, nh*bt, nw*bt)
        h = h.view(b, c.hidden_size, nh, bt, nw, bt).permute(0, 2, 4, 3, 5, 1).reshape(b, nh, nw, n_tok, -1)
        cos, sin = rope_tables(c, rect, h.device, dtype, position_offset)
        cos, sin = cos[None, :, :, :, None], sin[None, :, :, :, None]

        for index, block in enumerate(self.blocks):
            shift_a, scale_a, shift_m, scale_m = step.layers[index]
            a = _modulate(_norm(h, c.eps), shift_a, scale_a)
            q, k, v = block.attn.qkv(a).view(b, nh, nw, n_tok, 3, heads, hd).unbind(-3)
            q = apply_rope(block.qk_norm(q), cos, sin)
            k = apply_rope(block.qk_norm(k), cos, sin)  # the q-norm, as the reference does
            kv.keep(index, k, v)
            k_ext, v_ext = kv.neighbours(index, k, v)
            pos = step.block_pos[index]
            # slots [self, top-left, left, top]; each slot's keys get their own learned offset
            keys = torch.cat([k_ext[:, 1:, 1:] + pos[0], k_ext[:, :-1, :-1] + pos[1],
                              k_ext[:, 1:, :-1] + pos[2], k_ext[:, :-1, 1:] + pos[3]], dim=3)
            values = torch.cat([v_ext[:, 1:, 1:], v_ext[:, :-1, :-1], v_ext[:, 1:, :-1], v_ext[:, :-1, 1:]], dim=3)
            del k_ext, v_ext, k, v
            # (batch*blocks, heads, tokens, head_dim) with a unit last stride: what the flash and
            # memory-efficient SDPA kernels accept in fp16/bf16 on CUDA
            out = F.scaled_dot_product_attention(
                q.reshape(-1, n_tok, heads, hd).transpose(1, 2),
                keys.reshape(-1, 4 * n_tok, heads, hd).transpose(1, 2),
                values.reshape(-1, 4 * n_tok, heads, hd).transpose(1, 2))
            del keys, values, q
            h = h + block.attn.proj(out.transpose(1, 2).reshape(b, nh, nw, n_tok, -1))
            del out
            if index == 0:
                h = h + self._lr_cross_attention(h, cond, rect)
                m = self.lr_xattn.post_norm(h)
            else:
                m = _norm(h, c.eps)
            h = h + block.mlp(_modulate(m, shift_m, scale_m))
            del m, a
            if between_layers is not None and index < len(self.blocks) - 1:
                between_layers()

        shift_f, scale_f = step.final
        # SAT's final_layernorm, then the final layer's own affine-free LN (LN twice)
        out = self.final.linear(_modulate(_norm(_norm(h, c.eps), c.eps), shift_f, scale_f))
        p = c.patch_size
        out = out.view(b, nh, nw, bt, bt, p, p, c.out_channels)
        return out.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(b, c.out_channels, nh * bt * p, nw * bt * p)

    def _lr_cross_attention(self, h: torch.Tensor, cond: LRCondition, rect: BlockRect) -> torch.Tensor:
        c = self.config
        x = self.lr_xattn
        b, nh, nw, n_tok, _ = h.shape
        q = x.query(_norm(h, c.eps)).view(-1, n_tok, c.num_heads, c.head_dim)
        q = x.q_norm(q) + x.query_pos
        k, v = self.lr_windows(cond, rect)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x.proj(out.transpose(1, 2).reshape(b, nh, nw, n_tok, -1))


def upsample_lr(lr: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The concatenated LR channels: torchvision-style bicubic resize (antialias, a=-0.5), clipped to [-1, 1]."""
    up = F.interpolate(lr.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return up.clamp(-1, 1)

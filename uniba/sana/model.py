"""The Sana linear DiT (arXiv 2410.10629), exactly as the released SanaMS checkpoints compute it.

Per block (docs/SOURCES.md, Sana §1.1), with the adaLN-single vector ``t0`` shared by all blocks::

    x = x + gate_msa * LinearAttention(LN(x) * (1 + scale_msa) + shift_msa)
    x = x + CrossAttention(x, caption, mask)              # no pre-norm, no gate
    x = x + gate_mlp * GLUMBConv(LN(x) * (1 + scale_mlp) + shift_mlp)

Parameter names follow diffusers' ``SanaTransformer2DModel`` (one canonical layout); original
checkpoints are converted by :mod:`uniba.sana.keys`. ``operations`` lets a host supply its own
``Linear``/``Conv2d`` classes (ComfyUI's weight-casting ops); the default is ``torch.nn``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from uniba import conv

from .checks import check_dit_inputs
from .config import SPRINT_GUIDANCE, SanaConfig


class DefaultOps:
    """Layer classes when no host supplies its own: torch's, with convolutions kept fast on CPUs in bf16."""

    Linear = nn.Linear
    Conv2d = conv.Conv2d

__all__ = ["SanaConfig", "SanaDiT", "caption_condition", "sincos_position_embedding", "timestep_embedding"]

FP16_MAX = 65504.0
# key of the per-call options dict (ComfyUI's transformer_options) listing the blocks to run with identity attention
PERTURBED_BLOCKS_OPTION = "uniba_sana_perturbed_blocks"


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cosine half first (GLIDE/DiT layout, = diffusers ``flip_sin_to_cos=True``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = torch.outer(positions.reshape(-1).double(), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_position_embedding(dim: int, height: int, width: int, base_size: int, interpolation: float,
                              device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The 2-D sincos table of the 2K/4K releases for an ``height x width`` token grid: ``(H*W, dim)``.

    Positions are ``arange(n) / (n / base_size) / interpolation`` on each axis, so they always span
    ``[0, base_size / interpolation)`` (PixArt-style); the first half of the channels encodes the
    column (width) coordinate, the second half the row. Positions are float32 and the products
    float64, as in the original numpy code.
    """
    grid_h = torch.arange(height, dtype=torch.float32, device=device) / (height / base_size) / interpolation
    grid_w = torch.arange(width, dtype=torch.float32, device=device) / (width / base_size) / interpolation
    cols, rows = torch.meshgrid(grid_w, grid_h, indexing="xy")  # both (height, width)
    emb = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)
    return emb.to(dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32 (``weight * x * rsqrt(mean(x^2) + eps)``)."""

    def __init__(self, dim: int, eps: float, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.to(normed.device, torch.float32) * normed).to(x.dtype)


class Mlp2(nn.Module):
    """``linear_2(act(linear_1(x)))`` with diffusers' names (timestep embedder, caption projection)."""

    def __init__(self, ops: Any, dim_in: int, dim: int, act: nn.Module, **factory: Any) -> None:
        super().__init__()
        self.linear_1 = ops.Linear(dim_in, dim, **factory)
        self.act = act
        self.linear_2 = ops.Linear(dim, dim, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class _TimestepEmbedding(nn.Module):
    def __init__(self, ops: Any, dim: int, **factory: Any) -> None:
        super().__init__()
        self.timestep_embedder = Mlp2(ops, 256, dim, nn.SiLU(), **factory)


class AdaLNSingle(nn.Module):
    """``t = MLP(sinusoid(timestep))``; ``t0 = Linear(SiLU(t))`` (B, 6C), shared by every block."""

    def __init__(self, ops: Any, dim: int, **factory: Any) -> None:
        super().__init__()
        self.emb = _TimestepEmbedding(ops, dim, **factory)
        self.linear = ops.Linear(dim, 6 * dim, **factory)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.emb.timestep_embedder(timestep_embedding(timestep).to(dtype))
        return self.linear(F.silu(t)), t


class _TimestepGuidanceEmbedding(nn.Module):
    """Sana-Sprint's adaLN-single: ``t = MLP_t(sinusoid(timestep)) + MLP_g(sinusoid(guidance))``, then as above.

    The guidance embedding is added to ``t`` itself, so it reaches the final layer too (SanaMS
    ``cfg_embedder``; diffusers ``SanaCombinedTimestepGuidanceEmbeddings``).
    """

    def __init__(self, ops: Any, dim: int, **factory: Any) -> None:
        super().__init__()
        self.timestep_embedder = Mlp2(ops, 256, dim, nn.SiLU(), **factory)
        self.guidance_embedder = Mlp2(ops, 256, dim, nn.SiLU(), **factory)
        self.linear = ops.Linear(dim, 6 * dim, **factory)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype,
                guidance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.timestep_embedder(timestep_embedding(timestep).to(dtype))
        t = t + self.guidance_embedder(timestep_embedding(guidance).to(dtype))
        return self.linear(F.silu(t)), t


class PatchEmbed(nn.Module):
    """The latent's patches as tokens: one strided convolution, ``(B, C, H, W) -> (B, H*W/p^2, hidden)``."""

    def __init__(self, ops: Any, config: SanaConfig, **factory: Any) -> None:
        super().__init__()
        p = config.patch_size
        self.proj = ops.Conv2d(config.in_channels, config.hidden_size, kernel_size=p, stride=p, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class LinearAttention(nn.Module):
    """ReLU linear self-attention (``LiteLA``), O(N) in tokens.

    Per head ``O_i = sum_j (relu(q_i).relu(k_j)) v_j / (sum_j relu(q_i).relu(k_j) + eps)``, computed
    right to left. ``v`` gets an extra row of ones, so one matmul yields numerator and denominator;
    q, k, v are upcast to fp32 for the matmuls (the releases' ``fp32_attention``).
    """

    def __init__(self, ops: Any, config: SanaConfig, **factory: Any) -> None:
        super().__init__()
        c = config.hidden_size
        self.heads = config.linear_heads
        self.eps = config.linear_attention_eps
        self.to_q = ops.Linear(c, c, bias=False, **factory)
        self.to_k = ops.Linear(c, c, bias=False, **factory)
        self.to_v = ops.Linear(c, c, bias=False, **factory)
        self.to_out = nn.ModuleList([ops.Linear(c, c, **factory)])
        if config.qk_norm:
            self.norm_q = RMSNorm(c, config.qk_norm_eps, **factory)
            self.norm_k = RMSNorm(c, config.qk_norm_eps, **factory)
        else:
            self.norm_q = self.norm_k = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)`` projections -> ``(B, N, C)`` attention output in fp32.

        Token-major form of LiteLA's ``(v_pad @ k^T) @ q``: ``q @ (k^T @ v_pad)``, the same sums,
        without transposing the (large) token axis in memory.
        """
        b, n, c = q.shape
        q, k, v = (t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        q, k = F.relu(q).float(), F.relu(k).float()
        v = F.pad(v.float(), (0, 1), mode="constant", value=1.0)  # (B, h, N, d+1)
        out = torch.matmul(q, torch.matmul(k.transpose(-1, -2), v))  # (B, h, N, d+1)
        out = out[..., :-1] / (out[..., -1:] + self.eps)
        return out.transpose(1, 2).reshape(b, n, c)

    def forward(self, x: torch.Tensor, identity: bool = False) -> torch.Tensor:
        if identity:  # perturbed-attention guidance: each token attends only to itself (diffusers' PAG processor)
            return self.to_out[0](self.to_v(x))
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        out = self.to_out[0](self.attend(q, k, v).to(x.dtype))
        if out.dtype == torch.float16:
            out = out.clip(-FP16_MAX, FP16_MAX)
        return out


class CrossAttention(nn.Module):
    """Softmax cross-attention to the caption tokens with an additive ``(1 - mask) * -10000`` bias."""

    def __init__(self, ops: Any, config: SanaConfig, **factory: Any) -> None:
        super().__init__()
        c = config.hidden_size
        self.heads = config.cross_heads
        self.to_q = ops.Linear(c, c, **factory)
        self.to_k = ops.Linear(c, c, **factory)
        self.to_v = ops.Linear(c, c, **factory)
        self.to_out = nn.ModuleList([ops.Linear(c, c, **factory)])
        if config.cross_norm:
            self.norm_q = RMSNorm(c, config.cross_norm_eps, **factory)
            self.norm_k = RMSNorm(c, config.cross_norm_eps, **factory)
        else:
            self.norm_q = self.norm_k = None

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        d = c // self.heads
        q, k, v = (t.reshape(b, t.shape[1], self.heads, d).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, c))


class GLUMBConv(nn.Module):
    """Mix-FFN: 1x1 conv + SiLU -> 3x3 depthwise conv -> GLU (x * SiLU(gate)) -> 1x1 conv without bias."""

    def __init__(self, ops: Any, config: SanaConfig, **factory: Any) -> None:
        super().__init__()
        c, hid = config.hidden_size, config.ffn_hidden
        self.conv_inverted = ops.Conv2d(c, 2 * hid, 1, **factory)
        self.conv_depth = ops.Conv2d(2 * hid, 2 * hid, 3, padding=1, groups=2 * hid, **factory)
        self.conv_point = ops.Conv2d(hid, c, 1, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_depth(F.silu(self.conv_inverted(x)))
        x, gate = x.chunk(2, dim=1)
        return self.conv_point(x * F.silu(gate))


class SanaBlock(nn.Module):
    def __init__(self, ops: Any, config: SanaConfig, **factory: Any) -> None:
        super().__init__()
        c = config.hidden_size
        self.attn1 = LinearAttention(ops, config, **factory)
        self.attn2 = CrossAttention(ops, config, **factory)
        self.ff = GLUMBConv(ops, config, **factory)
        self.scale_shift_table = nn.Parameter(torch.randn(6, c, **factory) / c**0.5)

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None, t0: torch.Tensor,
                height: int, width: int, identity_attention: bool = False) -> torch.Tensor:
        b, n, c = x.shape
        table = self.scale_shift_table.to(x.device, x.dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (table[None] + t0.reshape(b, 6, c)).chunk(6, 1)
        h = F.layer_norm(x, (c,), eps=1e-6) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.attn1(h, identity_attention)
        x = x + self.attn2(x, context, bias)
        h = F.layer_norm(x, (c,), eps=1e-6) * (1 + scale_mlp) + shift_mlp
        # tokens (B, N, C) are the channels-last layout of (B, C, H, W): no copies around the convs
        h = self.ff(h.reshape(b, height, width, c).permute(0, 3, 1, 2))
        return x + gate_mlp * h.permute(0, 2, 3, 1).reshape(b, n, c)


def caption_condition(projection: nn.Module, norm: nn.Module, context: torch.Tensor,
                      context_mask: torch.Tensor | None, batch: int, device: torch.device,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The projected, normed caption for ``batch`` samples and its cross-attention bias (-10000 where masked).

    Shared by the DiT and its ControlNet, which hold their own projection and norm.
    """
    context = context.to(device, dtype)
    if context.shape[0] != batch:
        context = (context.expand(batch, -1, -1) if context.shape[0] == 1
                   else context.repeat(batch // context.shape[0], 1, 1))
    context = norm(projection(context))
    bias = None
    if context_mask is not None:
        mask = context_mask.to(device).reshape(context_mask.shape[0], -1)
        if mask.shape[0] != batch:
            mask = mask.repeat(batch // mask.shape[0], 1)
        bias = ((1 - mask.to(dtype)) * -10000.0)[:, None, None, :]
    return context, bias


class SanaDiT(nn.Module):
    """The Sana linear DiT; ``forward(x, timestep, context, context_mask) -> velocity`` (diffusers conventions).

    * ``x``: latent ``(B, 32, H, W)``; ``timestep``: ``sigma * 1000`` (``(B,)`` or scalar), truncated
      to an integer as the original ``SanaMS.forward`` does (``truncate_timestep``);
    * ``context``: Gemma-2 embeddings ``(B, L, 2304)``; ``context_mask``: ``(B, L)``, 1 = keep;
    * Sana-Sprint (``config.guidance_embeds``): ``timestep`` is the flow time in [0, 1] (not truncated) and
      ``guidance`` the embedded guidance scale (``SPRINT_GUIDANCE`` when None), scaled by ``guidance_embeds_scale``;
    * optional ``control``: ``{"output": [residual or None per block]}`` from
      :class:`uniba.sana.controlnet.SanaControlNet`, item ``i`` added after block ``i``
      (ComfyUI's ControlNet hands it over under this name); ``transformer_options[PERTURBED_BLOCKS_OPTION]``:
      the block indices whose self-attention is replaced by identity (PAG's perturbed pass).
    Returns the predicted velocity ``v = noise - x0`` with the shape of ``x``.
    """

    def __init__(self, config: SanaConfig, operations: Any = None, device: Any = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        ops = operations or DefaultOps
        factory = {"device": device, "dtype": dtype}
        c = config.hidden_size
        self.config = config
        self.truncate_timestep = not config.guidance_embeds
        self.compute_dtype: torch.dtype | None = None  # set by hosts that keep weights in another dtype
        # a host's Cancel check, run between transformer blocks (may raise): a 4K step is long on small cards
        self.between_blocks: Callable[[], None] | None = None
        self.patch_embed = PatchEmbed(ops, config, **factory)
        self.time_embed = (_TimestepGuidanceEmbedding if config.guidance_embeds else AdaLNSingle)(ops, c, **factory)
        self.caption_projection = Mlp2(ops, config.caption_channels, c, nn.GELU(approximate="tanh"), **factory)
        self.caption_norm = RMSNorm(c, 1e-5, **factory)
        self.transformer_blocks = nn.ModuleList([SanaBlock(ops, config, **factory) for _ in range(config.depth)])
        self.scale_shift_table = nn.Parameter(torch.randn(2, c, **factory) / c**0.5)
        p = config.patch_size
        self.proj_out = ops.Linear(c, p * p * config.out_channels, **factory)
        self._pe_cache: dict[tuple, torch.Tensor] = {}

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def position_embedding(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (height, width, device, dtype)
        if key not in self._pe_cache:
            self._pe_cache.clear()
            cfg = self.config
            self._pe_cache[key] = sincos_position_embedding(cfg.hidden_size, height, width, cfg.pe_base_size,
                                                            cfg.pe_interpolation, device, dtype)[None]
        return self._pe_cache[key]

    def forward(self, x: torch.Tensor, timestep: torch.Tensor | float, context: torch.Tensor,
                context_mask: torch.Tensor | None = None, guidance: torch.Tensor | float | None = None,
                **kwargs: Any) -> torch.Tensor:
        check_dit_inputs(self.config, x, timestep, context, context_mask)
        cfg = self.config
        b, _, height, width = x.shape
        p = cfg.patch_size
        h, w = height // p, width // p
        dtype = self.compute_dtype or self.dtype
        x = x.to(dtype)

        tokens = self.patch_embed(x)
        if cfg.use_pe:
            tokens = tokens + self.position_embedding(h, w, tokens.device, dtype)

        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1)
        if timestep.numel() == 1:
            timestep = timestep.expand(b)
        if self.truncate_timestep:
            timestep = timestep.long()
        if cfg.guidance_embeds:
            guidance = torch.as_tensor(SPRINT_GUIDANCE if guidance is None else guidance, device=x.device,
                                       dtype=torch.float32).reshape(-1)
            if guidance.numel() != b:  # one value for the batch, or one per prompt of a cond/uncond batch
                guidance = guidance.repeat(b // guidance.numel())
            t0, t = self.time_embed(timestep.float(), dtype, guidance * cfg.guidance_embeds_scale)
        else:
            t0, t = self.time_embed(timestep.float(), dtype)

        context, bias = caption_condition(self.caption_projection, self.caption_norm, context, context_mask, b,
                                          x.device, dtype)

        options = kwargs.get("transformer_options") or {}
        perturbed = options.get(PERTURBED_BLOCKS_OPTION, ())
        residuals = (kwargs.get("control") or {}).get("output") or ()
        for index, block in enumerate(self.transformer_blocks):
            if index and self.between_blocks is not None:
                self.between_blocks()
            tokens = block(tokens, context, bias, t0, h, w, index in perturbed)
            if index < len(residuals) and residuals[index] is not None:
                tokens = tokens + residuals[index].to(tokens.dtype)

        table = self.scale_shift_table.to(tokens.device, dtype)
        shift, scale = (table[None] + t[:, None]).chunk(2, dim=1)
        tokens = F.layer_norm(tokens, (cfg.hidden_size,), eps=1e-6) * (1 + scale) + shift
        out = self.proj_out(tokens)
        out = out.reshape(b, h, w, p, p, cfg.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, cfg.out_channels, h * p, w * p)

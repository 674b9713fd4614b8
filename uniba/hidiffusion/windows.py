"""MSW-MSA: multi-scale shifted window self-attention, as in the HiDiffusion reference (arXiv 2311.17528).

The feature map is cut into a 2x2 grid of windows (each a quarter of the map), cyclically shifted
by one of four offsets first, without Swin's attention mask (wrapped content shares a window, as
in the reference). The reference draws the offset from the global torch RNG; here it is a pure
function of (seed, step, block), so cond and uncond see the same windows, results do not depend on
other RNG users, and a rerun is bit-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_MASK64 = (1 << 64) - 1
_KIND_CODES = {"input": 1, "middle": 2, "output": 3}


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def shift_choice(seed: int, step: int, block: tuple[str, int], block_index: int) -> int:
    """Which of the 4 shifts (0..3) a transformer block uses at a step: uniform, independent per block.

    A hash chain (splitmix64) over the seed, the step index and the block's position; no RNG state.
    """
    h = _splitmix64(int(seed) & _MASK64)
    for part in (int(step), _KIND_CODES.get(block[0], 0), int(block[1]), int(block_index)):
        h = _splitmix64(h ^ (part & _MASK64))
    return h >> 62


def window_size(height: int, width: int) -> tuple[int, int]:
    """Reference window: half the map, rounded up, so there are always 2x2 windows."""
    return math.ceil(height / 2), math.ceil(width / 2)


def shift_size(window: tuple[int, int], choice: int) -> tuple[int, int]:
    """Shift for choice k: ``k * (wh // 4, ww // 4)`` (reference: rand in quarters of [0, 1])."""
    return (window[0] // 4 * choice, window[1] // 4 * choice)


def feature_size_from_tokens(latent_h: int, latent_w: int, tokens: int) -> tuple[int, int]:
    """The reference's way to recover (H, W) from a token count: ``ratio = round(sqrt(H0*W0/N))``."""
    ratio = round(((latent_h * latent_w) / tokens) ** 0.5)
    return math.ceil(latent_h / ratio), math.ceil(latent_w / ratio)


@dataclass(frozen=True)
class WindowState:
    """What ``reverse`` needs to undo ``partition``."""

    batch: int
    height: int
    width: int
    window: tuple[int, int]
    shift: tuple[int, int]


def partition(x: torch.Tensor, height: int, width: int, shift_choice_k: int) -> tuple[torch.Tensor, WindowState]:
    """(B, H*W, C) tokens -> (4B, wh*ww, C) windows, shifted by the chosen offset.

    Odd sizes are bicubic-resized to ``2 * window`` first, as the reference does.
    """
    b, n, c = x.shape
    if n != height * width:
        raise ValueError(f"{n} tokens do not form a {height}x{width} feature map")
    window = window_size(height, width)
    shift = shift_size(window, shift_choice_k)
    grid = x.reshape(b, height, width, c)
    if height % 2 or width % 2:
        grid = F.interpolate(grid.permute(0, 3, 1, 2).contiguous(), size=(window[0] * 2, window[1] * 2),
                             mode="bicubic").permute(0, 2, 3, 1).contiguous()
    if shift[0] > 0:  # the reference tests only the first component
        grid = torch.roll(grid, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    grid = grid.reshape(b, 2, window[0], 2, window[1], c).permute(0, 1, 3, 2, 4, 5)
    windows = grid.reshape(b * 4, window[0] * window[1], c)
    return windows, WindowState(b, height, width, window, shift)


def reverse(windows: torch.Tensor, state: WindowState) -> torch.Tensor:
    """(4B, wh*ww, C) windows -> (B, H*W, C) tokens: inverse of :func:`partition` (exact for even sizes)."""
    wh, ww = state.window
    c = windows.shape[-1]
    b = windows.shape[0] // 4
    grid = windows.reshape(b, 2, 2, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, wh * 2, ww * 2, c)
    if state.shift[0] > 0:
        grid = torch.roll(grid, shifts=state.shift, dims=(1, 2))
    if state.height % 2 or state.width % 2:
        grid = F.interpolate(grid.permute(0, 3, 1, 2).contiguous(), size=(state.height, state.width),
                             mode="bicubic").permute(0, 2, 3, 1).contiguous()
    return grid.reshape(b, state.height * state.width, c)


def windowed_attention_cost(height: int, width: int) -> float:
    """Relative attention FLOPs of 2x2 windows against global attention (the score matrix shrinks 4x)."""
    wh, ww = window_size(height, width)
    return 4 * (wh * ww) ** 2 / float((height * width) ** 2)

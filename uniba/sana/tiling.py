"""Tiled DC-AE decode/encode with linearly blended overlaps, sized from a memory budget.

Policy (sana.md §2.3): an untiled 4096 px decode needs ~26 GB of activations, so from 2048 px
up decoding is tiled by default. Tiles are 1024 px (512-px tiles leave seams in flat areas,
because every EfficientViT block attends globally over its tile), shrunk when the budget is
smaller, overlapping by 1/8 of the tile (128 px at 1024) and blended with linear ramps. An
out-of-memory error reruns the whole pass with half the tile, down to 128 px.

Tile sizes are counted in latent cells (1 cell = 32 px) so one number drives both directions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from uniba.memory import is_out_of_memory, largest_unit, retry_on_oom
from uniba.progress import ProgressFn, report

AUTO_TILE_FROM_PX = 2048
DEFAULT_TILE_PX = 1024
MIN_TILE_CELLS = 4  # 128 px: the smallest tile an out-of-memory retry goes down to
OVERLAP_DIVISOR = 8  # overlap = tile / 8


def overlap_for(tile_cells: int) -> int:
    return max(1, tile_cells // OVERLAP_DIVISOR) if tile_cells > 1 else 0


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap``; the last tile
    is aligned to the end so every tile has the full size (the attention then sees as much context)."""
    if tile >= length:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _ramp(size: int, ramp: int, rise: bool, fall: bool) -> torch.Tensor:
    weight = torch.ones(size)
    if ramp > 0:
        edge = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp
        if rise:
            weight[:ramp] = torch.minimum(weight[:ramp], edge)
        if fall:
            weight[-ramp:] = torch.minimum(weight[-ramp:], edge.flip(0))
    return weight


def activation_bytes_per_pixel(widths: tuple[int, ...], dtype: torch.dtype) -> float:
    """Peak activation bytes per full-resolution pixel of a DC-AE pass (decode or encode).

    The full-resolution stage dominates: the upsampled input of the next-wider stage, the conv
    output, the shortcut and the ResBlock temporaries, ~ ``5*w0 + w1`` values; the fp32 RMSNorm
    statistics add ``w0`` fp32 values for half-precision weights. Calibrated against the
    measured peaks of ``python -m uniba bench dcae`` (this estimate is the conservative side).
    """
    size = torch.empty((), dtype=dtype).element_size()
    w0, w1 = widths[0], widths[1] if len(widths) > 1 else widths[0]
    extra = 4 * w0 if size < 4 else 0
    return (5 * w0 + w1) * size + extra


def plan_tile(grid_h: int, grid_w: int, *, cell_px: int, bytes_per_pixel: float, batch: int,
              tile_size: int | None = None, budget_bytes: int | None = None) -> int:
    """Tile edge in latent cells (>= the grid means one pass) for the policy in the module docstring."""
    full = max(grid_h, grid_w)
    if tile_size:
        return max(1, min(full, round(tile_size / cell_px)))

    def cost(t: int) -> float:
        return bytes_per_pixel * batch * (min(t, grid_h) * cell_px) * (min(t, grid_w) * cell_px)

    if full * cell_px < AUTO_TILE_FROM_PX and (budget_bytes is None or cost(full) <= budget_bytes):
        return full
    max_tile = min(full, DEFAULT_TILE_PX // cell_px)
    if budget_bytes is None:
        return max_tile
    return largest_unit(cost, budget_bytes, max_unit=max_tile, min_unit=min(max_tile, MIN_TILE_CELLS))


def tiled_apply(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], *, tile: int, scale_in: int,
                scale_out: int, progress: ProgressFn | None = None, output_device: torch.device | str | None = None,
                preview: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Run ``fn`` on overlapping tiles of ``x`` and blend the results with linear ramps.

    ``x`` is (B, C, H, W) with H, W multiples of ``scale_in``; the grid of latent cells is
    H/scale_in x W/scale_in; ``fn`` maps a tile of ``n`` cells to ``n*scale_out`` output values per axis.
    """
    output_device = torch.device(output_device) if output_device is not None else x.device
    grid_h, grid_w = x.shape[-2] // scale_in, x.shape[-1] // scale_in
    overlap = overlap_for(tile)
    ys, xs = tile_starts(grid_h, tile, overlap), tile_starts(grid_w, tile, overlap)
    th, tw = min(tile, grid_h), min(tile, grid_w)
    ramps_y = [_ramp(th * scale_out, overlap * scale_out, y0 > 0, y0 + th < grid_h) for y0 in ys]
    ramps_x = [_ramp(tw * scale_out, overlap * scale_out, x0 > 0, x0 + tw < grid_w) for x0 in xs]
    # tiles form a grid, so the sum of the separable weights is separable too: two 1-D normalisers
    # instead of a full-size weight canvas keep the memory above the output image flat
    norm_y = torch.zeros(grid_h * scale_out)
    norm_x = torch.zeros(grid_w * scale_out)
    for y0, wy in zip(ys, ramps_y):
        norm_y[y0 * scale_out:(y0 + th) * scale_out] += wy
    for x0, wx in zip(xs, ramps_x):
        norm_x[x0 * scale_out:(x0 + tw) * scale_out] += wx
    total = len(ys) * len(xs)
    out = None
    done = 0
    report(progress, 0, total)
    for y0, wy in zip(ys, ramps_y):
        for x0, wx in zip(xs, ramps_x):
            piece = x[..., y0 * scale_in:(y0 + th) * scale_in, x0 * scale_in:(x0 + tw) * scale_in]
            result = fn(piece).float().to(output_device)
            if out is None:
                out = torch.zeros(result.shape[0], result.shape[1], grid_h * scale_out, grid_w * scale_out,
                                  device=output_device)
            region = (..., slice(y0 * scale_out, (y0 + th) * scale_out), slice(x0 * scale_out, (x0 + tw) * scale_out))
            out[region].addcmul_(result, (wy[:, None] * wx[None, :]).to(output_device))
            done += 1
            report(progress, done, total, preview(result) if preview else None)
            del result
    out.div_(norm_y.to(output_device)[:, None]).div_(norm_x.to(output_device)[None, :])
    return out


def run_tiled(model, x: torch.Tensor, direction: str, *, tile_size: int | None = None,
              budget_bytes: int | None = None, progress: ProgressFn | None = None,
              output_device: torch.device | str | None = None,
              is_oom: Callable[[BaseException], bool] = is_out_of_memory) -> torch.Tensor:
    """Decode (``direction="decode"``) or encode ``x`` with a :class:`~uniba.sana.dcae.DCAE` under the policy."""
    ratio = model.spatial_ratio
    config = model.config
    if direction == "decode":
        fn, scale_in, scale_out, widths = model.decode_full, 1, ratio, config.decoder_widths

        def preview(img: torch.Tensor) -> torch.Tensor:
            return (img[:1] * 0.5 + 0.5).clamp(0, 1)
    elif direction == "encode":
        fn, scale_in, scale_out, widths = model.encode_full, ratio, 1, config.encoder_widths
        preview = None
    else:
        raise ValueError(f"direction must be 'decode' or 'encode', got {direction!r}")
    output_device = torch.device(output_device) if output_device is not None else x.device
    grid_h, grid_w = x.shape[-2] // scale_in, x.shape[-1] // scale_in
    full = max(grid_h, grid_w)
    per_pixel = activation_bytes_per_pixel(widths, model.weight_dtype)
    unit = plan_tile(grid_h, grid_w, cell_px=ratio, bytes_per_pixel=per_pixel, batch=x.shape[0],
                     tile_size=tile_size, budget_bytes=budget_bytes)

    def work(tile: int) -> torch.Tensor:
        if tile >= full:
            report(progress, 0, 1)
            out = fn(x).float().to(output_device)
            report(progress, 1, 1, preview(out) if preview else None)
            return out
        return tiled_apply(x, fn, tile=tile, scale_in=scale_in, scale_out=scale_out, progress=progress,
                           output_device=output_device, preview=preview)

    return retry_on_oom(work, unit, min_unit=min(unit, MIN_TILE_CELLS), what=f"DC-AE {direction}", is_oom=is_oom)

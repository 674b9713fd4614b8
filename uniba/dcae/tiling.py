"""Exact tiled DC-AE decode and encode: the same result as one pass, at any tile size and any free memory.

Which operations of our DC-AE (:mod:`uniba.dcae.model`) are global and which are local:

* global: only the ReLU linear attention inside :class:`~uniba.dcae.blocks.LiteMLA` (every
  EfficientViT block): each output pixel sees ``sum_n phi(k_n) v_n^T`` and ``sum_n phi(k_n)`` over
  the whole image. There is no GroupNorm, BatchNorm statistic or global pooling anywhere.
* local: every convolution (3x3, the depthwise 5x5 multi-scale aggregation, 1x1), RMSNorm over the
  channels of one pixel, SiLU/ReLU, nearest x2 upsampling, pixel (un)shuffle and the channel
  repeat/mean shortcuts. A local op's output pixel depends on a fixed neighbourhood (its radius).

A pass is therefore cut into *steps* that each read one whole stored tensor and write the next:

* the low-resolution stages (from the first stage with an EfficientViT block on) run block by block
  on whole stored activations (at 4096 px, real f32c32: the largest is 512 x 512 x 512 values at
  1/8 resolution, 512 MiB fp32 / 256 MiB bf16). An attention block is two tiled sweeps: the first
  adds up the attention sums of every tile's own pixels (the sums are additive), the second runs the
  block tile by tile with those image-wide sums. Other blocks are local steps.
* the high-resolution convolutional stages run as one fused local step (the decoder's tail from 1/8
  resolution to pixels; the encoder's head from pixels to 1/8), tile by tile.

A local step reads each tile with a halo as wide as the receptive radius of its ops (computed from
the modules: 7 cells of the 1/8 grid for the f32c32 decoder tail = 56 px, 5 cells for the encoder
head, 3 for an EfficientViT block, 2 for a ResBlock, 1 for an up/down block) and writes only the
tile's exact interior. Convolutions zero-pad at a crop edge, which is exact where the crop edge is the
image edge and harmless elsewhere because the halo is cut off. Tile sizes come from the free memory
(:func:`plan_pass`); an out-of-memory error reruns the failing step with half the tile. Neither
changes the result.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from uniba.memory import free_device_cache, is_out_of_memory, largest_unit, retry_on_oom
from uniba.progress import ProgressFn, check_cancel, report

from .blocks import Decoder, DownBlock, EfficientViTBlock, Encoder, ResBlock, UpBlock, linear_attention_sums
from .config import VIT_BLOCK, DCAEConfig

DEFAULT_TILE_PX = 768  # the tile cap when no memory budget is known (4096 px fp32 planned at ~4.5 GB)


# --------------------------------------------------------------------------- steps

class AutoEncoder(Protocol):
    """What the tiler uses of a :class:`~uniba.dcae.model.DCAE` (which calls the tiler from ``decode``/``encode``)."""

    config: DCAEConfig
    encoder: Encoder
    decoder: Decoder

    @property
    def spatial_ratio(self) -> int: ...

    @property
    def weight_dtype(self) -> torch.dtype: ...

    @property
    def weight_device(self) -> torch.device: ...

    def encode_full(self, image: torch.Tensor, progress: ProgressFn | None = None) -> torch.Tensor: ...

    def decode_full(self, latent: torch.Tensor, progress: ProgressFn | None = None) -> torch.Tensor: ...


def activation_bytes_per_pixel(widths: tuple[int, ...], dtype: torch.dtype) -> float:
    """Working bytes per full-resolution pixel of the full-resolution stage (the decoder tail's tiles).

    The upsampled input of the next-wider stage, the conv output, the shortcut and the ResBlock
    temporaries, ~ ``5*w0 + w1`` values; the fp32 RMSNorm statistics add ``w0`` fp32 values for
    half-precision weights (calibrated against ``python -m uniba bench dcae``, conservative side).
    """
    size = torch.empty((), dtype=dtype).element_size()
    w0, w1 = widths[0], widths[1] if len(widths) > 1 else widths[0]
    return (5 * w0 + w1) * size + (4 * w0 if size < 4 else 0)


@dataclass
class Step:
    """One tiled sweep from a whole stored tensor to the next.

    The step works on a *coarse* grid: its input grid when it upsamples by ``up``, its output grid
    when it downsamples by ``down`` (one of the two is 1). A tile of ``t`` coarse cells reads
    ``t + 2 * halo`` coarse cells of input (clipped at the image edges).
    """

    name: str
    run: Callable[..., torch.Tensor]
    out_channels: int
    halo: int
    cell_px: int  # image pixels per coarse cell (how a pixel tile size maps to this step)
    up: int = 1
    down: int = 1
    attention: EfficientViTBlock | None = None
    bytes_per_cell: Callable[[int], float] = field(default=lambda size: 0.0)  # working bytes per coarse cell

    def coarse_shape(self, h: int, w: int) -> tuple[int, int]:
        return h // self.down, w // self.down

    def out_shape(self, h: int, w: int) -> tuple[int, int]:
        return h * self.up // self.down, w * self.up // self.down

    def tile_cost(self, tile: int, coarse: tuple[int, int], batch: int, element_size: int) -> float:
        """Working bytes of one tile of ``tile`` coarse cells with its halo (never more than the image)."""
        th, tw = (min(tile + 2 * self.halo, n) for n in coarse)
        return batch * th * tw * self.bytes_per_cell(element_size)


def _flatten(modules: list[nn.Module]) -> list[nn.Module]:
    out: list[nn.Module] = []
    for m in modules:
        out.extend(_flatten(list(m)) if isinstance(m, nn.Sequential) else [m])
    return out


def _head_halo(modules: list[nn.Module], down: int) -> int:
    """Halo in output cells of a downsampling chain: its radius at the input resolution, rounded up."""
    radius = 0  # in pixels of the current (walking backwards: ever finer) grid
    for module in reversed(_flatten(modules)):
        if isinstance(module, nn.Conv2d):
            radius += module.kernel_size[0] // 2
        elif isinstance(module, ResBlock):
            radius += 2
        elif isinstance(module, DownBlock):
            radius = 2 * radius + 1
        else:
            raise TypeError(f"no receptive radius known for {type(module).__name__}")
    return math.ceil(radius / down)


def _tail_halo(modules: list[nn.Module]) -> int:
    """Halo in input cells of an upsampling chain (radius at the output, halved per x2 going back)."""
    radius = 0
    for module in reversed(_flatten(modules)):
        if isinstance(module, nn.Conv2d):
            radius += module.kernel_size[0] // 2
        elif isinstance(module, ResBlock):
            radius += 2
        elif isinstance(module, UpBlock):
            radius = math.ceil((radius + 1) / 2) if module.interpolate else math.ceil(radius / 2) + 1
        else:
            raise TypeError(f"no receptive radius known for {type(module).__name__}")
    return radius


def _block_step(name: str, module: nn.Module, channels_in: int, channels_out: int, cell_px: int) -> Step:
    """A step for one block of the low-resolution stages."""
    if isinstance(module, EfficientViTBlock):
        # qkv 3C + multi-scale 3C + concat 6C during attention; 8C + 8C + 4C + 4C inside GLUMBConv
        return Step(name, module, channels_out, module.attn.context_radius + 1, cell_px, attention=module,
                    bytes_per_cell=lambda size, c=channels_in: (26 * c) * size + (8 * c * 4 if size < 4 else 0))
    if isinstance(module, ResBlock):
        return Step(name, module, channels_out, 2, cell_px,
                    bytes_per_cell=lambda size, c=channels_in: 6 * c * size + (3 * c * 4 if size < 4 else 0))
    if isinstance(module, UpBlock):
        # the coarse grid is the input: interpolated input, conv out, repeated shortcut, shuffle, sum
        return Step(name, module, channels_out, _tail_halo([module]), cell_px, up=2,
                    bytes_per_cell=lambda size, a=channels_in, b=channels_out: (a + 4 * a + 16 * b) * size)
    if isinstance(module, DownBlock):
        return Step(name, module, channels_out, _head_halo([module], 2), cell_px, down=2,
                    bytes_per_cell=lambda size, a=channels_in, b=channels_out: (9 * a + 3 * b) * size)
    raise TypeError(f"no tiling rule for {type(module).__name__}")


def decoder_steps(model: AutoEncoder) -> list[Step]:
    """The decode pass as steps: conv_in, the attention stages block by block, the fused conv tail."""
    config, decoder = model.config, model.decoder
    widths, ratio = config.decoder_widths, model.spatial_ratio
    kinds = config.decoder_blocks
    first_global = min((i for i, k in enumerate(kinds) if k == VIT_BLOCK), default=len(widths))
    latent_c, top = config.latent_channels, widths[-1]

    def conv_in(z: torch.Tensor) -> torch.Tensor:
        return decoder.conv_in(z) + z.repeat_interleave(decoder.in_repeats, dim=1)

    steps = [Step("conv_in", conv_in, top, 1, ratio, bytes_per_cell=lambda size: (latent_c * 2 + 3 * top) * size)]
    channels = top
    for i in reversed(range(first_global, len(widths))):
        cell_px = ratio >> (len(widths) - 1 - i)  # pixels per cell at stage i's resolution
        for j, module in enumerate(decoder.up_blocks[i]):
            coarse_px = cell_px * 2 if isinstance(module, UpBlock) else cell_px
            steps.append(_block_step(f"stage{i}.{j}", module, channels, widths[i], coarse_px))
            channels = widths[i]
    tail_modules = [decoder.up_blocks[i] for i in reversed(range(first_global))]

    def tail(x: torch.Tensor) -> torch.Tensor:
        for stage in tail_modules:
            x = stage(x)
        return decoder.conv_out(F.relu(decoder.norm_out(x)))

    up = 2 ** first_global
    halo = _tail_halo(tail_modules + [decoder.conv_out])
    per_px = {size: activation_bytes_per_pixel(widths, dtype) for size, dtype in
              ((2, torch.bfloat16), (4, torch.float32), (8, torch.float64))}
    steps.append(Step("tail", tail, config.in_channels, halo, up, up=up,
                      bytes_per_cell=lambda size: up * up * per_px[size]))
    return steps


def encoder_steps(model: AutoEncoder) -> list[Step]:
    """The encode pass as steps: the fused conv head down to the first attention stage, then block by block."""
    config, encoder = model.config, model.encoder
    widths, ratio = config.encoder_widths, model.spatial_ratio
    kinds = config.encoder_blocks
    first_global = min((i for i, k in enumerate(kinds) if k == VIT_BLOCK), default=len(widths) - 1)
    head_modules = [encoder.conv_in] + [encoder.down_blocks[i] for i in range(first_global)]

    def head(x: torch.Tensor) -> torch.Tensor:
        for module in head_modules:
            x = module(x)
        return x

    down = 2 ** first_global
    w0, w1 = widths[0], widths[1] if len(widths) > 1 else widths[0]
    steps = [Step("head", head, widths[first_global], _head_halo(head_modules, down), down, down=down,
                  bytes_per_cell=lambda size: down * down * ((6 * w0 + w1) * size + (4 * w0 if size < 4 else 0)))]
    channels = widths[first_global]
    for i in range(first_global, len(widths)):
        cell_px = 2 ** i
        for j, module in enumerate(encoder.down_blocks[i]):
            coarse_px = cell_px * 2 if isinstance(module, DownBlock) else cell_px
            out_c = widths[i + 1] if isinstance(module, DownBlock) else widths[i]
            steps.append(_block_step(f"stage{i}.{j}", module, channels, out_c, coarse_px))
            channels = out_c

    def conv_out(x: torch.Tensor) -> torch.Tensor:
        return encoder.conv_out(x) + x.unflatten(1, (-1, encoder.out_group)).mean(dim=2)

    latent_c = config.latent_channels
    steps.append(Step("conv_out", conv_out, latent_c, 1, ratio,
                      bytes_per_cell=lambda size: (channels + 3 * latent_c) * size))
    return steps


# --------------------------------------------------------------------------- planning

@dataclass(frozen=True)
class PassPlan:
    """Tile edge per step (coarse cells), where the whole activations live, and the memory estimate."""

    tiles: tuple[int, ...]
    tile_cap_px: int
    store_on_compute: bool
    stored_bytes: int  # the largest input + output pair of whole activations
    output_bytes: int
    working_bytes: int  # the largest tile's working memory
    single_pass: bool  # every step is one tile: the plain forward is used

    @property
    def estimated_peak_bytes(self) -> int:
        """Activations on the compute device (weights not included)."""
        return self.working_bytes + (self.stored_bytes if self.store_on_compute else 0)

    def to_dict(self) -> dict:
        return {"tiles": list(self.tiles), "tile_cap_px": self.tile_cap_px, "stored_bytes": self.stored_bytes,
                "output_bytes": self.output_bytes, "working_bytes": self.working_bytes,
                "store_on_compute": self.store_on_compute, "single_pass": self.single_pass,
                "estimated_peak_bytes": self.estimated_peak_bytes}


def _shapes(steps: list[Step], h: int, w: int, channels: int) -> list[tuple[int, int, int, int, int]]:
    """(in_c, in_h, in_w, out_h, out_w) per step."""
    out = []
    for step in steps:
        oh, ow = step.out_shape(h, w)
        out.append((channels, h, w, oh, ow))
        h, w, channels = oh, ow, step.out_channels
    return out


def plan_pass(steps: list[Step], in_shape: tuple[int, ...], dtype: torch.dtype, *, tile_size: int | None = None,
              budget_bytes: int | None = None, cap_px: int | None = None) -> PassPlan:
    """Choose each step's tile from the budget: as large as fits, at most ``tile_size`` (or ``cap_px``) pixels.

    Without a budget the cap is :data:`DEFAULT_TILE_PX`. The whole stored activations stay on the
    compute device when they take at most half the budget, else they live with the output.
    """
    size = torch.empty((), dtype=dtype).element_size()
    batch, channels, h, w = in_shape
    shapes = _shapes(steps, h, w, channels)
    if cap_px is None:
        cap_px = tile_size if tile_size else (DEFAULT_TILE_PX if budget_bytes is None else 1 << 30)
    stored = 0
    for step, (c, ih, iw, oh, ow) in zip(steps[:-1], shapes[:-1]):
        stored = max(stored, batch * (c * ih * iw + step.out_channels * oh * ow) * size)
    last = shapes[-1]
    output_bytes = batch * steps[-1].out_channels * last[3] * last[4] * 4
    store_on_compute = budget_bytes is None or stored <= budget_bytes // 2
    free = None if budget_bytes is None else budget_bytes - (stored if store_on_compute else 0)
    tiles, working = [], 0
    single = True
    for step, (_, ih, iw, _, _) in zip(steps, shapes):
        coarse = step.coarse_shape(ih, iw)
        full = max(coarse)
        limit = max(1, min(full, cap_px // step.cell_px))
        if free is None:
            tile = limit
        else:
            tile = largest_unit(lambda t, s=step, c=coarse: s.tile_cost(t, c, batch, size), max(0, free),
                                max_unit=limit)
        tiles.append(tile)
        single = single and tile >= full
        working = max(working, int(step.tile_cost(tile, coarse, batch, size)))
    return PassPlan(tuple(tiles), cap_px, store_on_compute, stored, output_bytes, working, single)


# --------------------------------------------------------------------------- running

def _tile_ranges(length: int, tile: int) -> list[tuple[int, int]]:
    return [(a, min(a + tile, length)) for a in range(0, length, tile)]


def _tiles(coarse: tuple[int, int], tile: int) -> Iterator[tuple[tuple[int, int], tuple[int, int]]]:
    for ys in _tile_ranges(coarse[0], tile):
        for xs in _tile_ranges(coarse[1], tile):
            yield ys, xs


def _n_tiles(step: Step, coarse: tuple[int, int], tile: int) -> int:
    n = math.ceil(coarse[0] / tile) * math.ceil(coarse[1] / tile)
    return 2 * n if step.attention is not None else n


def _crop(x: torch.Tensor, step: Step, ys: tuple[int, int], xs: tuple[int, int], coarse: tuple[int, int]
          ) -> tuple[torch.Tensor, int, int]:
    """The input crop of a tile with its halo (clipped at the image) and its start on the coarse grid."""
    y0, x0 = max(0, ys[0] - step.halo), max(0, xs[0] - step.halo)
    y1, x1 = min(coarse[0], ys[1] + step.halo), min(coarse[1], xs[1] + step.halo)
    d = step.down
    return x[..., y0 * d:y1 * d, x0 * d:x1 * d], y0, x0


class _Runner:
    """Runs the sweeps of a pass on the model's device and counts their tiles for the progress bar."""

    def __init__(self, model: AutoEncoder, progress: ProgressFn | None,
                 preview: Callable[[torch.Tensor], torch.Tensor] | None, preview_step: Step) -> None:
        self.device, self.dtype = model.weight_device, model.weight_dtype
        self.progress, self.preview, self.preview_step = progress, preview, preview_step
        self.done, self.total = 0, 1

    def tick(self, preview: torch.Tensor | None = None) -> None:
        self.done += 1
        report(self.progress, self.done, max(self.total, self.done), preview)

    def sweep(self, step: Step, x: torch.Tensor, out: torch.Tensor, tile: int) -> None:
        (self.attention if step.attention is not None else self.local)(step, x, out, tile)

    def local(self, step: Step, x: torch.Tensor, out: torch.Tensor, tile: int) -> None:
        coarse = step.coarse_shape(*x.shape[-2:])
        u = step.up
        for ys, xs in _tiles(coarse, tile):
            crop, cy, cx = _crop(x, step, ys, xs, coarse)
            result = step.run(crop.to(self.device, self.dtype))
            part = result[..., (ys[0] - cy) * u:(ys[1] - cy) * u, (xs[0] - cx) * u:(xs[1] - cx) * u]
            out[..., ys[0] * u:ys[1] * u, xs[0] * u:xs[1] * u] = part.to(out.device, out.dtype)
            shown = self.preview(part) if self.preview is not None and step is self.preview_step else None
            del result, part
            self.tick(shown)

    def attention(self, step: Step, x: torch.Tensor, out: torch.Tensor, tile: int) -> None:
        block = step.attention
        attn = block.attn
        coarse = (x.shape[-2], x.shape[-1])
        if coarse[0] * coarse[1] <= attn.head_dim:  # efficientvit's quadratic branch: a tiny stage, one pass
            out.copy_(block(x.to(self.device, self.dtype)).to(out.device, out.dtype))
            self.done += _n_tiles(step, coarse, tile) - 1
            self.tick()
            return
        reach = attn.context_radius
        sums = None
        for ys, xs in _tiles(coarse, tile):  # sweep 1: the attention sums of each tile's own pixels, added up
            y0, x0 = max(0, ys[0] - reach), max(0, xs[0] - reach)
            y1, x1 = min(coarse[0], ys[1] + reach), min(coarse[1], xs[1] + reach)
            qkv = attn.multiscale_qkv(x[..., y0:y1, x0:x1].to(self.device, self.dtype))
            own = qkv[..., ys[0] - y0:ys[1] - y0, xs[0] - x0:xs[1] - x0].flatten(3)
            part = linear_attention_sums(own, attn.head_dim)
            sums = part if sums is None else sums.add_(part)
            del qkv, own
            self.tick()
        for ys, xs in _tiles(coarse, tile):  # sweep 2: the block on each tile, attending with the image-wide sums
            crop, cy, cx = _crop(x, step, ys, xs, coarse)
            result = block(crop.to(self.device, self.dtype), sums)
            out[..., ys[0]:ys[1], xs[0]:xs[1]] = result[..., ys[0] - cy:ys[1] - cy, xs[0] - cx:xs[1] - cx].to(
                out.device, out.dtype)
            del result
            self.tick()


class _LastReport:
    """Passes progress on and remembers the last figures, so the final report (with the preview) repeats them."""

    def __init__(self, progress: ProgressFn | None) -> None:
        self.progress, self.done, self.total = progress, 1, 1

    def __call__(self, done: int, total: int | None = None, preview: torch.Tensor | None = None) -> None:
        self.done, self.total = done, total if total is not None else self.total
        report(self.progress, self.done, self.total, preview)


def _remaining_tiles(steps: list[Step], shapes: list[tuple[int, int, int, int, int]], plan: PassPlan,
                     start: int) -> int:
    return sum(_n_tiles(steps[i], steps[i].coarse_shape(shapes[i][1], shapes[i][2]), plan.tiles[i])
               for i in range(start, len(steps)))


def run_pass(model: AutoEncoder, x: torch.Tensor, steps: list[Step], *,
             full: Callable[[torch.Tensor, ProgressFn | None], torch.Tensor],
             tile_size: int | None, budget_bytes: int | None, progress: ProgressFn | None,
             output_device: torch.device | str | None, is_oom: Callable[[BaseException], bool],
             preview: Callable[[torch.Tensor], torch.Tensor] | None, what: str) -> torch.Tensor:
    """Run ``steps`` over ``x``: in one plain pass (``full(x, progress)``, reporting after each block) when
    everything fits, else sweep by sweep.

    The steps come from :func:`decoder_steps` / :func:`encoder_steps` (tests pass altered ones).
    """
    output_device = torch.device(output_device) if output_device is not None else x.device
    dtype = model.weight_dtype
    plan = plan_pass(steps, tuple(x.shape), dtype, tile_size=tile_size, budget_bytes=budget_bytes)
    if plan.single_pass:
        try:
            counted = _LastReport(progress)
            report(progress, 0, 1)
            out = full(x, counted).float().to(output_device)  # reports (and may cancel) after every block
            report(progress, counted.done, counted.total, preview(out) if preview is not None else None)
            return out
        except BaseException as exc:  # noqa: BLE001 - only out-of-memory falls through to the tiled pass
            if not is_oom(exc):
                raise
            free_device_cache()
            edge_px = max(x.shape[-2:]) * steps[0].cell_px // steps[0].down
            plan = plan_pass(steps, tuple(x.shape), dtype, budget_bytes=budget_bytes, cap_px=max(1, edge_px // 2))
    store = model.weight_device if plan.store_on_compute else output_device
    shapes = _shapes(steps, x.shape[-2], x.shape[-1], x.shape[1])
    runner = _Runner(model, progress, preview, steps[-1])
    runner.total = _remaining_tiles(steps, shapes, plan, 0)
    report(progress, 0, runner.total)
    current = x
    for index, (step, (_, ih, iw, oh, ow)) in enumerate(zip(steps, shapes)):
        last = index == len(steps) - 1
        out = torch.empty(x.shape[0], step.out_channels, oh, ow, device=output_device if last else store,
                          dtype=torch.float32 if last else dtype)
        coarse = step.coarse_shape(ih, iw)
        planned = plan.tiles[index]
        start_done = runner.done

        def work(tile: int, step: Step = step, out: torch.Tensor = out, src: torch.Tensor = current,
                 coarse: tuple[int, int] = coarse, start_done: int = start_done, index: int = index,
                 plan: PassPlan = plan) -> int:
            # a rerun after out-of-memory restarts this sweep: its tiles are counted again from the start
            runner.done = start_done
            runner.total = start_done + _n_tiles(step, coarse, tile) + _remaining_tiles(steps, shapes, plan, index + 1)
            runner.sweep(step, src, out, tile)
            return tile

        used = retry_on_oom(work, planned, min_unit=1, what=f"DC-AE {what} ({step.name})", is_oom=is_oom)
        if used != planned:  # the later sweeps keep under the tile edge that finally fitted
            plan = plan_pass(steps, tuple(x.shape), dtype, budget_bytes=budget_bytes,
                             cap_px=min(plan.tile_cap_px, used * step.cell_px))
        current = out
    return current


@contextlib.contextmanager
def cancel_inside_blocks(network: nn.Module, progress: ProgressFn | None) -> Iterator[None]:
    """A Cancel point after every layer of ``network`` while it runs (:func:`uniba.progress.check_cancel`): on a
    CPU one full-resolution block of a 4K decode takes seconds, and the blocks only report when they end."""
    if getattr(progress, "check_cancel", None) is None:
        yield
        return
    hooks = [m.register_forward_hook(lambda *_: check_cancel(progress)) for m in network.modules()
             if next(m.children(), None) is None]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def decode_exact(model: AutoEncoder, latent: torch.Tensor, *, tile_size: int | None = None,
                 budget_bytes: int | None = None,
                 progress: ProgressFn | None = None, output_device: torch.device | str | None = None,
                 is_oom: Callable[[BaseException], bool] = is_out_of_memory) -> torch.Tensor:
    """Latents (B, C, h, w) -> images (B, 3, 32h, 32w) in fp32, equal to ``model.decode_full`` at any tile size."""

    def preview(img: torch.Tensor) -> torch.Tensor:
        return (img[:1].float() * 0.5 + 0.5).clamp(0, 1)

    with cancel_inside_blocks(model.decoder, progress):
        return run_pass(model, latent, decoder_steps(model), full=model.decode_full, tile_size=tile_size,
                        budget_bytes=budget_bytes, progress=progress, output_device=output_device, is_oom=is_oom,
                        preview=preview, what="decode")


def encode_exact(model: AutoEncoder, image: torch.Tensor, *, tile_size: int | None = None,
                 budget_bytes: int | None = None,
                 progress: ProgressFn | None = None, output_device: torch.device | str | None = None,
                 is_oom: Callable[[BaseException], bool] = is_out_of_memory) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> latents in fp32, equal to ``model.encode_full`` at any tile size."""
    with cancel_inside_blocks(model.encoder, progress):
        return run_pass(model, image, encoder_steps(model), full=model.encode_full, tile_size=tile_size,
                        budget_bytes=budget_bytes, progress=progress, output_device=output_device, is_oom=is_oom,
                        preview=None, what="encode")

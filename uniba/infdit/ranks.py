"""One image across ranks: the block-by-evaluation wavefront over ``torch.distributed`` (issue 21 item 2).

Within one evaluation a block reads only the K/V of its top, left and top-left neighbours, and across
evaluations a pixel reads only its own history (every sampler we ship updates ``x`` pixel by pixel
with scalar coefficients). So the block grid splits into bands, one per rank, each rank running the
whole sampler on its own band: before a batch that touches the band's upstream edge it receives
the K/V of the neighbour band's boundary blocks for that evaluation (point-to-point ``recv``), and
after a batch it sends its own boundary blocks downstream (``isend``). Data only flows from rank
r to rank r + 1, so nothing can deadlock, and a rank starts as soon as the blocks it reads arrived.

Bands are cut across the traversal by default (block columns under row-major traversal): rank
r + 1 then trails rank r by one batch row, and every rank is busy after that short fill. Cut along
the traversal (block rows under row-major), a rank needs its neighbour's last row, which comes
at the end of that rank's evaluation: a one-band fill, N E / (E + N - 1) for E evaluations, but
fewer bytes when the grid is much longer than wide. Either way the result equals the one-process
result: the same blocks see the same K/V, the LR maps are projected from the same pixels, x_T is
the same slice of the same draw, and ancestral noise is seeded per block position.

Each rank keeps only its band: its part of the sampler's canvases, a KV strip as wide as its band,
LR map lines as wide as its band. Out-of-memory backoff works per rank (batches shrink, the
boundary blocks still leave in boundary order). ``torch.distributed`` does the transport (NCCL on
GPUs, gloo on CPUs); ``torchrun`` starts the ranks.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..guards import finite_denoiser
from ..memory import format_bytes, largest_unit
from .blockwise import ROW_MAJOR, BatchCallback, BlockKVCache, BlockwiseDenoiser, batch_order
from .config import InfDiTConfig
from .model import BlockRect, InfDiT
from .plan import (
    PassPlan,
    UpscalePlan,
    block_cache_bytes,
    dtype_bytes,
    weights_bytes,
    work_bytes,
)
from .sampling import Sampler, run_sampler

ACROSS = "across"  # bands cut across the traversal: block columns under row-major traversal
ALONG = "along"  # bands cut along it: block rows under row-major traversal


def band_axis(traversal: str, split: str) -> str:
    """``"columns"`` or ``"rows"``: what the bands are made of."""
    if split not in (ACROSS, ALONG):
        raise ValueError(f"split must be {ACROSS} or {ALONG}, got {split!r}")
    across_is_columns = traversal == ROW_MAJOR
    return "columns" if (split == ACROSS) == across_is_columns else "rows"


def split_bands(grid: tuple[int, int], traversal: str, ranks: int, split: str = ACROSS,
                sizes: list[int] | None = None) -> list[BlockRect]:
    """The bands of a ``grid`` (block rows, block columns), one per rank in order; ``sizes`` (block lines per
    band) defaults to an even split. With fewer block lines than ranks the last ranks get no band."""
    axis = band_axis(traversal, split)
    lines = grid[1] if axis == "columns" else grid[0]
    if ranks < 1:
        raise ValueError(f"ranks must be at least 1, got {ranks}")
    if sizes is None:
        active = min(ranks, lines)
        sizes = [lines // active + (1 if r < lines % active else 0) for r in range(active)]
    if len(sizes) > ranks or any(s < 1 for s in sizes) or sum(sizes) != lines:
        raise ValueError(f"band sizes {sizes} must be at least 1 block each, at most one band per rank ({ranks}), "
                         f"and add up to the {lines} block {axis} of the image")
    bands, start = [], 0
    for size in sizes:
        bands.append(BlockRect(0, grid[0], start, start + size) if axis == "columns"
                     else BlockRect(start, start + size, 0, grid[1]))
        start += size
    return bands


def _boundary_position(axis: str, i: int, j: int) -> int:
    return i if axis == "columns" else j


class BandExchange:
    """:class:`~uniba.infdit.blockwise.BlockExchange` of one rank's band over point-to-point send/recv.

    A message is one block's K/V of every layer, as raw bytes (so any dtype travels, gloo included),
    sent in boundary order (top to bottom along a column, left to right along a row), which is the
    order blocks finish in whatever the batch size, so sender and receiver always agree on it.
    ``max_pending`` bounds the blocks whose send has not completed (their buffers stay alive).
    """

    def __init__(self, bands: list[BlockRect], rank: int, axis: str, entry_shape: tuple[int, ...],
                 dtype: torch.dtype, group: Any = None, device: torch.device | str = "cpu",
                 max_pending: int = 8) -> None:
        self.bands, self.rank, self.axis, self.group = bands, rank, axis, group
        self.own = bands[rank]
        self.upstream = self._global(rank - 1) if rank > 0 else None
        self.downstream = self._global(rank + 1) if rank + 1 < len(bands) else None
        self.entry_shape, self.dtype, self.device = entry_shape, dtype, torch.device(device)
        self.max_pending = max(1, max_pending)
        self.pending: deque[tuple[Any, torch.Tensor]] = deque()
        self.received = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        o = self.own
        # the upstream band's blocks next to this band, in boundary order
        if axis == "columns":
            self.incoming = [(i, o.col0 - 1) for i in range(o.row0, o.row1)] if rank > 0 else []
        else:
            self.incoming = [(o.row0 - 1, j) for j in range(o.col0, o.col1)] if rank > 0 else []

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def sends(self, i: int, j: int) -> bool:
        if self.downstream is None:
            return False
        return j == self.own.col1 - 1 if self.axis == "columns" else i == self.own.row1 - 1

    def _nbytes(self) -> int:
        return math.prod(self.entry_shape) * dtype_bytes(self.dtype)

    def receive(self, cache: BlockKVCache, rect: BlockRect) -> None:
        o = self.own
        if self.axis == "columns":
            wanted = ([(i, o.col0 - 1) for i in range(max(rect.row0 - 1, 0), rect.row1)]
                      if self.incoming and rect.col0 == o.col0 else [])
        else:
            wanted = ([(o.row0 - 1, j) for j in range(max(rect.col0 - 1, 0), rect.col1)]
                      if self.incoming and rect.row0 == o.row0 else [])
        for key in wanted:
            while key not in cache.blocks:
                if self.received >= len(self.incoming):
                    raise RuntimeError(f"rank {self.rank}: block {key} was needed but its band sent no more blocks "
                                       "(the ranks disagree about the split)")
                buffer = torch.empty(self._nbytes(), dtype=torch.uint8, device=self.device)
                dist.recv(buffer, src=self.upstream, group=self.group)
                self.bytes_received += buffer.numel()
                packed = buffer.view(self.dtype).view(self.entry_shape)
                cache.blocks[self.incoming[self.received]] = [
                    (cache.store(packed[layer, 0]), cache.store(packed[layer, 1])) for layer in range(packed.shape[0])]
                self.received += 1

    def send(self, blocks: dict[tuple[int, int], list]) -> None:
        for key in sorted(blocks, key=lambda k: _boundary_position(self.axis, *k)):
            packed = torch.stack([torch.stack(kv) for kv in blocks[key]]).to(self.device).contiguous()
            raw = packed.flatten().view(torch.uint8)
            while len(self.pending) >= self.max_pending:
                self.pending.popleft()[0].wait()
            self.pending.append((dist.isend(raw, dst=self.downstream, group=self.group), raw))
            self.bytes_sent += raw.numel()

    def end_call(self) -> None:
        if self.received != len(self.incoming):
            raise RuntimeError(f"rank {self.rank}: received {self.received} of {len(self.incoming)} boundary blocks "
                               "in one evaluation (the ranks disagree about the split)")
        self.received = 0

    def finish(self) -> None:
        """Wait until every send has been taken (before the buffers may go)."""
        while self.pending:
            self.pending.popleft()[0].wait()


def _comm_device(group: Any, model_device: torch.device) -> torch.device:
    return model_device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def entry_shape(config: InfDiTConfig, batch: int) -> tuple[int, ...]:
    """One block's K/V of every layer as one message: (layers, K/V, batch, tokens, heads, head_dim)."""
    return (config.num_layers, 2, batch, config.tokens_per_block, config.num_heads, config.head_dim)


def sample_band(model: InfDiT, lr: torch.Tensor, *, concat_lr: torch.Tensor, clip_embedding: torch.Tensor,
                noise: torch.Tensor, sampler: Sampler, sigmas: torch.Tensor, seed: int, bands: list[BlockRect],
                axis: str, group: Any = None, block_batch: tuple[int, int] | int | None = None,
                offload_cache: bool = False, keep_lr_maps: bool = True, on_batch: BatchCallback | None = None,
                is_oom: Any = None, between_layers: Any = None, stats: dict | None = None,
                state_device: torch.device | None = None) -> torch.Tensor | None:
    """This rank's band of :func:`uniba.infdit.upscale.sample_canvas`: the sampler over its own blocks.

    ``concat_lr`` and ``noise`` are the whole canvas (every rank draws the same x_T), best kept on the host;
    ``lr`` the whole LR image the cross-attention sees. Only the band's slices are copied to
    ``state_device`` (default: where ``noise`` is), where the sampler's canvases live. Returns the band
    (B, 3, band height, band width) in float32, or None on a rank without a band.
    """
    rank = dist.get_rank(group)
    if rank >= len(bands):
        return None
    own = bands[rank]
    bp = model.config.block_px
    where = (slice(None), slice(None), slice(own.row0 * bp, own.row1 * bp), slice(own.col0 * bp, own.col1 * bp))
    device = noise.device if state_device is None else torch.device(state_device)
    band_lr = concat_lr[where].to(device=device, dtype=torch.float32, copy=True)
    sigmas = sigmas.to(device=device, dtype=torch.float32)
    exchange = BandExchange(bands, rank, axis, entry_shape(model.config, noise.shape[0]), model.dtype, group,
                            _comm_device(group, model.device),
                            max_pending=_along(block_batch, axis) + 1)
    kwargs = {} if is_oom is None else {"is_oom": is_oom}
    denoiser = BlockwiseDenoiser(model, lr, clip_embedding, canvas=tuple(noise.shape[-2:]),
                                 concat_lr=band_lr, block_batch=block_batch, offload_cache=offload_cache,
                                 on_batch=on_batch, keep_lr_maps=keep_lr_maps, own=own, exchange=exchange,
                                 state_device=device, stats=stats, between_layers=between_layers, **kwargs)
    x = band_lr + sigmas[0] * noise[where].to(device=device, dtype=torch.float32)
    try:
        out = run_sampler(sampler, finite_denoiser(denoiser, sigmas, "the Inf-DiT sampler"), x, sigmas, seed=seed,
                          block_px=bp, origin=(own.row0, own.col0))
    finally:
        exchange.finish()
    if stats is not None:
        stats.update(bytes_sent=exchange.bytes_sent, bytes_received=exchange.bytes_received)
    return out


def _along(block_batch: tuple[int, int] | int | None, axis: str) -> int:
    """The batch's extent along the band boundary (rows for column bands)."""
    if block_batch is None:
        return 1
    n_h, n_w = (block_batch, block_batch) if isinstance(block_batch, int) else block_batch
    return n_h if axis == "columns" else n_w


def gather_bands(band: torch.Tensor | None, bands: list[BlockRect], block_px: int, canvas: tuple[int, int],
                 batch: int, group: Any = None, device: torch.device | None = None) -> torch.Tensor:
    """The whole canvas on every rank from each rank's band (all_gather of bands padded to the largest)."""
    world = dist.get_world_size(group)
    device = torch.device("cpu") if device is None else device
    comm = _comm_device(group, device)
    tallest = max(b.n_h for b in bands) * block_px
    widest = max(b.n_w for b in bands) * block_px
    padded = torch.zeros(batch, 3, tallest, widest, dtype=torch.float32, device=comm)
    if band is not None:
        padded[..., :band.shape[-2], :band.shape[-1]] = band.to(comm)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    out = torch.empty(batch, 3, *canvas, dtype=torch.float32, device=device)
    for b, part in zip(bands, parts, strict=False):
        h, w = b.n_h * block_px, b.n_w * block_px
        out[..., b.row0 * block_px:b.row1 * block_px, b.col0 * block_px:b.col1 * block_px] = part[..., :h, :w]
    return out


# ------------------------------------------------------------------ the plan across ranks


@dataclass(frozen=True)
class RankPass:
    """One pass split across ranks: bands, per-rank memory and blocks, bytes and expected speed-up."""

    axis: str
    bands: tuple[BlockRect, ...]
    block_batch: tuple[int, int]  # the pass's, or smaller when a band's messages would not fit beside it
    peak_bytes: tuple[int, ...]  # per rank with a band, weights included
    blocks: tuple[int, ...]  # per rank, per evaluation
    boundary_bytes: tuple[int, ...]  # per boundary (rank r -> r + 1), per evaluation
    speedup: float


@dataclass(frozen=True)
class RankPlan:
    """How one image is split across ``ranks`` processes, per pass, from the one-process plan."""

    ranks: int
    split: str
    passes: tuple[RankPass, ...]
    evaluations: int

    @property
    def speedup(self) -> float:
        """Expected speed-up of the whole image (passes weighted by their blocks), communication not counted."""
        serial = sum(sum(p.blocks) for p in self.passes)
        return serial / sum(sum(p.blocks) / p.speedup for p in self.passes)

    def batches(self, rank: int, plan: UpscalePlan) -> int:
        """Block batches ``rank`` runs for one image, every pass and evaluation (its progress total)."""
        total = 0
        for split, p in zip(self.passes, plan.passes, strict=True):
            if rank < len(split.bands):
                band = split.bands[rank]
                total += len(batch_order(band.n_h, band.n_w, split.block_batch, p.traversal))
        return total * self.evaluations

    def describe(self) -> str:
        lines = [f"one image across {self.ranks} ranks (bands {self.split} the traversal), {self.evaluations} "
                 f"evaluations per pass: expected speed-up x{self.speedup:.2f} before communication"]
        for index, p in enumerate(self.passes):
            lines.append(f"pass {index + 1}: {len(p.bands)} bands of block {p.axis}, block batch "
                         f"{p.block_batch[0]}x{p.block_batch[1]}, speed-up x{p.speedup:.2f}, "
                         f"sent per evaluation {format_bytes(sum(p.boundary_bytes))} "
                         f"({format_bytes(p.boundary_bytes[0]) if p.boundary_bytes else '0 B'} per boundary)")
            for r, (band, peak, blocks) in enumerate(zip(p.bands, p.peak_bytes, p.blocks, strict=True)):
                lines.append(f"  rank {r}: blocks {band.row0}-{band.row1 - 1} x {band.col0}-{band.col1 - 1} "
                             f"({blocks} per evaluation), estimated peak {format_bytes(peak)}")
            for r in range(len(p.bands), self.ranks):
                lines.append(f"  rank {r}: no band (the image has fewer block {p.axis} than ranks)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"ranks": self.ranks, "split": self.split, "evaluations": self.evaluations, "speedup": self.speedup,
                "passes": [{"axis": p.axis, "bands": [[b.row0, b.row1, b.col0, b.col1] for b in p.bands],
                            "block_batch": list(p.block_batch),
                            "peak_bytes": list(p.peak_bytes), "blocks": list(p.blocks),
                            "boundary_bytes": list(p.boundary_bytes), "speedup": p.speedup} for p in self.passes]}


def _band_peak(config: InfDiTConfig, band: BlockRect, p: PassPlan, n: tuple[int, int], axis: str,
               dtype: torch.dtype) -> int:
    """Peak bytes of one rank: a pass over its band (canvases, a KV strip as wide as the band, LR maps, one
    batch, the blocks received from upstream among the cache's neighbours) plus the sends in flight."""
    n = (min(n[0], band.n_h), min(n[1], band.n_w))
    messages = (_along(n, axis) + 1) * block_cache_bytes(config, dtype)
    return weights_bytes(config, dtype) + messages + work_bytes(
        config, (band.n_h, band.n_w), n, p.traversal, p.offload_cache, dtype, p.keep_lr_maps, p.state_on_host)


def _speedup(bands: list[BlockRect], n: tuple[int, int], axis: str, evaluations: int, traversal: str) -> float:
    """Serial blocks over the wavefront's span: the largest band's work for every evaluation plus, per
    boundary, the blocks the upstream rank finishes before its first boundary block (the fill)."""
    total = sum(b.n_h * b.n_w for b in bands)
    if len(bands) == 1:
        return 1.0
    fill = 0
    for band in bands[:-1]:
        done = 0
        for rect in batch_order(band.n_h, band.n_w, n, traversal):
            done += rect.n_h * rect.n_w
            if (rect.col1 == band.n_w) if axis == "columns" else (rect.row1 == band.n_h):
                break
        fill += done
    span = evaluations * max(b.n_h * b.n_w for b in bands) + fill
    return evaluations * total / span


def plan_ranks(plan: UpscalePlan, config: InfDiTConfig, ranks: int, *, split: str = ACROSS,
               sizes: list[int] | None = None, dtype: torch.dtype = torch.bfloat16) -> RankPlan:
    """The one-process ``plan`` split across ``ranks``: per rank memory, bytes sent per evaluation and the
    expected speed-up, before the run. ``sizes``: block lines per band (last pass), default even. Each pass
    keeps the plan's block batch, or the largest square one whose widest band fits the plan's budget."""
    passes = []
    per_block = block_cache_bytes(config, dtype)
    weights = weights_bytes(config, dtype)
    for index, p in enumerate(plan.passes):
        grid, traversal = (p.grid_rows, p.grid_cols), p.traversal
        axis = band_axis(traversal, split)
        bands = split_bands(grid, traversal, ranks, split, sizes if index == len(plan.passes) - 1 else None)

        def work(n: tuple[int, int], p: PassPlan = p, axis: str = axis, bands: list[BlockRect] = bands) -> int:
            return max(_band_peak(config, b, p, n, axis, dtype) for b in bands) - weights

        n = p.block_batch
        if plan.usable_bytes is not None and work(n) > plan.usable_bytes:
            side = largest_unit(lambda u: work((u, u)), plan.usable_bytes, max_unit=max(n))
            n = (min(side, n[0]), min(side, n[1]))
        boundary = [(b.n_h if axis == "columns" else b.n_w) * per_block for b in bands[:-1]]
        passes.append(RankPass(axis=axis, bands=tuple(bands), block_batch=n,
                               peak_bytes=tuple(_band_peak(config, b, p, n, axis, dtype) for b in bands),
                               blocks=tuple(b.n_h * b.n_w for b in bands), boundary_bytes=tuple(boundary),
                               speedup=_speedup(bands, n, axis, plan.evaluations, traversal)))
    return RankPlan(ranks=ranks, split=split, passes=tuple(passes), evaluations=plan.evaluations)


__all__ = ["ACROSS", "ALONG", "BandExchange", "RankPlan", "gather_bands", "plan_ranks", "sample_band", "split_bands"]

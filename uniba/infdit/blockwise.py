"""UniBA block-wise inference: block batches in dependency order with a KV cache (docs/SOURCES.md, Inf-DiT §2.4).

Each denoiser call walks the block grid in batches of ``n_h x n_w`` blocks, top-left to
bottom-right, along the shorter side (row-major when the image is at most as wide as it is tall,
so the cache holds one block row; column-major otherwise). Per layer the cache keeps only the
K/V of finished blocks that an unfinished block still reads (its right, lower or lower-right
neighbour is not done yet): for row-major with n_h-high batches that is one block row across the
image, the n_h blocks left of the batch and one corner block. The result depends only on the
dependency DAG, so it is the same for every batch size, traversal and offload setting, and equal to
the whole-canvas computation.

Batches are restartable: a batch writes its new cache entries to a pending set committed only after
it succeeded, so on an out-of-memory error the batch is recomputed at half the size
(:func:`uniba.memory.retry_on_oom`) with an unchanged result. The cache lives only within one
denoiser call and is freed in ``finally`` (also on Cancel).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ..memory import is_out_of_memory, retry_on_oom
from .model import BlockRect, InfDiT, LRCondition, upsample_lr

BatchCallback = Callable[[BlockRect, torch.Tensor], None]

ROW_MAJOR = "row-major"
COLUMN_MAJOR = "column-major"


def choose_traversal(grid_h: int, grid_w: int) -> str:
    """Traverse along the shorter side, so the cached strip spans the shorter side."""
    return ROW_MAJOR if grid_w <= grid_h else COLUMN_MAJOR


def next_rect(done: list[list[bool]], n_h: int, n_w: int, traversal: str, start: int = 0) -> BlockRect:
    """The next batch: starts at the first unfinished block in traversal order, at most n_h x n_w blocks,
    shrunk so that every block's top, left and top-left neighbours are finished or inside it.

    ``start``: a line (row for row-major, column for column-major) before which every block is
    finished, so a call costs one line of the grid, not the whole grid.
    """
    rows = traversal == ROW_MAJOR
    lines, across = (len(done), len(done[0])) if rows else (len(done[0]), len(done))
    n_line, n_across = (n_h, n_w) if rows else (n_w, n_h)

    def finished(line: int, pos: int) -> bool:
        return done[line][pos] if rows else done[pos][line]

    l0, p0 = next((a, b) for a in range(start, lines) for b in range(across) if not finished(a, b))
    p1 = p0
    while p1 < min(p0 + n_across, across) and not finished(l0, p1):
        p1 += 1
    l1 = l0 + 1
    while (l1 < min(l0 + n_line, lines) and not any(finished(l1, b) for b in range(p0, p1))
           and (p0 == 0 or finished(l1, p0 - 1))):
        l1 += 1
    return BlockRect(l0, l1, p0, p1) if rows else BlockRect(p0, p1, l0, l1)


def first_unfinished_line(done: list[list[bool]], traversal: str, start: int = 0) -> int:
    """The first line (row for row-major, column for column-major) from ``start`` with an unfinished block."""
    if traversal == ROW_MAJOR:
        return next((i for i in range(start, len(done)) if not all(done[i])), len(done))
    return next((j for j in range(start, len(done[0])) if not all(row[j] for row in done)), len(done[0]))


class BlockKVCache:
    """Per-block, per-layer K/V of finished blocks that unfinished blocks still read."""

    def __init__(self, grid_h: int, grid_w: int, storage: torch.device | None) -> None:
        self.grid_h, self.grid_w = grid_h, grid_w
        self.storage = storage  # None: keep on the compute device
        self.blocks: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor] | None]] = {}
        self.peak_blocks = 0

    def needed(self, i: int, j: int, done: list[list[bool]], finishing: BlockRect | None = None) -> bool:
        """Whether an unfinished block reads block (i, j): its right, lower or lower-right neighbour
        (the blocks of ``finishing`` count as finished)."""
        for di, dj in ((0, 1), (1, 0), (1, 1)):
            a, b = i + di, j + dj
            if a < self.grid_h and b < self.grid_w and not done[a][b] and not (
                    finishing is not None and finishing.row0 <= a < finishing.row1
                    and finishing.col0 <= b < finishing.col1):
                return True
        return False

    def store(self, t: torch.Tensor) -> torch.Tensor:
        if self.storage is None:
            return t.clone()
        pin = self.storage.type == "cpu" and t.device.type == "cuda"
        out = torch.empty(t.shape, dtype=t.dtype, device=self.storage, pin_memory=pin)
        out.copy_(t, non_blocking=pin)
        return out

    def evict(self, done: list[list[bool]]) -> None:
        for key in [k for k in self.blocks if not self.needed(*k, done)]:
            del self.blocks[key]

    def clear(self) -> None:
        self.blocks.clear()


class LRLineCache:
    """The LR cross-attention K/V maps of a pass, as the block batches read them.

    ``keep=True`` projects them one padded LR block line at a time (a row across the blocks computed
    here for row-major traversal, a column for column-major) as batches first read them and keeps
    every line for the whole sampling: each line is projected once per image, always in one shape, so
    every batch size and setting reads the same numbers. ``keep=False`` keeps nothing: each batch
    projects its own (n_h + 2) x (n_w + 2) LR blocks from their pixels, (n + 2)^2 / n^2 times the map
    per evaluation, each pass of it 1/512 of a release block's compute, instead of maps that grow with
    the area (22 GiB in bf16 at 16384 px) or a strip that grows with the side.
    """

    def __init__(self, model: InfDiT, lr: torch.Tensor, own: BlockRect, traversal: str, keep: bool) -> None:
        self.model, self.lr, self.keep = model, lr, keep
        self.rows = traversal == ROW_MAJOR
        # the lines span the blocks computed here (a rank's band) and one padding block on each side
        self.across = (own.col0, own.col1 + 2) if self.rows else (own.row0, own.row1 + 2)
        self.lines: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.projected = 0
        self.peak_lines = 0

    def _line(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index not in self.lines:
            span = (index, index + 1)
            self.lines[index] = self.model.lr_kv(self.lr, *((span, self.across) if self.rows else (self.across, span)))
            self.projected += 1
            self.peak_lines = max(self.peak_lines, len(self.lines))
        return self.lines[index]

    def windows(self, rect: BlockRect) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.keep:
            self.projected += 1
            k, v = self.model.lr_kv(self.lr, (rect.row0, rect.row1 + 2), (rect.col0, rect.col1 + 2))
            return self.model.lr_unfold(k), self.model.lr_unfold(v)
        lrb = self.model.config.lr_block_tokens
        lo, hi = (rect.row0, rect.row1) if self.rows else (rect.col0, rect.col1)
        a, b = (rect.col0, rect.col1) if self.rows else (rect.row0, rect.row1)
        lines = [self._line(i) for i in range(lo, hi + 2)]
        axis, other = (1, 2) if self.rows else (2, 1)
        start, size = (a - self.across[0]) * lrb, (b - a + 2) * lrb
        # each line narrowed to the batch before the concatenation: a batch-sized copy, not a strip-wide one
        k, v = (torch.cat([line[which].narrow(other, start, size) for line in lines], dim=axis) for which in (0, 1))
        return self.model.lr_unfold(k), self.model.lr_unfold(v)

    def clear(self) -> None:
        self.lines.clear()


class BlockExchange(Protocol):
    """K/V of blocks computed elsewhere (another rank's band) in, boundary blocks out, per denoiser call.

    :class:`uniba.infdit.ranks.BandExchange` implements it with point-to-point send/recv.
    """

    def sends(self, i: int, j: int) -> bool:
        """Whether block (i, j) of this band is read by another band (its K/V is sent once finished)."""
        ...

    def receive(self, cache: BlockKVCache, rect: BlockRect) -> None:
        """Put into ``cache.blocks`` every neighbour of ``rect`` outside this band that is not there yet."""
        ...

    def send(self, blocks: dict[tuple[int, int], list]) -> None:
        """Send the finished boundary blocks (per layer (k, v)) to the band that reads them."""
        ...

    def end_call(self) -> None:
        """One denoiser call is over (received blocks of this call are used up)."""
        ...


class _BatchKV:
    """The :class:`~uniba.infdit.model.NeighbourKV` view of the cache for one batch."""

    def __init__(self, cache: BlockKVCache, rect: BlockRect, keep: list[tuple[int, int]], layers: int) -> None:
        self.cache, self.rect = cache, rect
        self.keep_blocks = keep
        self.pending: dict[tuple[int, int], list] = {key: [None] * layers for key in keep}

    def _cached(self, layer: int, i: int, j: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.cache.blocks.get((i, j))
        if entry is None or entry[layer] is None:
            raise RuntimeError(f"Inf-DiT block ({i}, {j}) was needed before it was computed (traversal bug)")
        k, v = entry[layer]
        return k.to(device, non_blocking=True), v.to(device, non_blocking=True)

    def keep(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        r = self.rect
        for i, j in self.keep_blocks:
            self.pending[(i, j)][layer] = (self.cache.store(k[:, i - r.row0, j - r.col0]),
                                           self.cache.store(v[:, i - r.row0, j - r.col0]))

    def _extend(self, layer: int, t: torch.Tensor, which: int) -> torch.Tensor:
        r = self.rect
        dev = t.device

        def cached(i: int, j: int) -> torch.Tensor:
            return self._cached(layer, i, j, dev)[which]

        # replicate-clamped neighbours: block row 0 is its own top, column 0 its own left
        top = t[:, 0] if r.row0 == 0 else torch.stack([cached(r.row0 - 1, j) for j in range(r.col0, r.col1)], 1)
        left = t[:, :, 0] if r.col0 == 0 else torch.stack([cached(i, r.col0 - 1) for i in range(r.row0, r.row1)], 1)
        if r.row0 == 0 and r.col0 == 0:
            corner = t[:, 0, 0]
        elif r.row0 == 0:
            corner = left[:, 0]
        elif r.col0 == 0:
            corner = top[:, 0]
        else:
            corner = cached(r.row0 - 1, r.col0 - 1)
        first_row = torch.cat([corner[:, None], top], dim=1)[:, None]
        rows = torch.cat([left[:, :, None], t], dim=2)
        return torch.cat([first_row, rows], dim=1)

    def neighbours(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._extend(layer, k, 0), self._extend(layer, v, 1)


def resolve_block_batch(block_batch: int | tuple[int, int] | None, grid_h: int, grid_w: int) -> tuple[int, int]:
    """``(n_h, n_w)`` clipped to the grid; None = the whole grid in one batch."""
    if block_batch is None:
        return grid_h, grid_w
    n_h, n_w = (block_batch, block_batch) if isinstance(block_batch, int) else block_batch
    if n_h < 1 or n_w < 1:
        raise ValueError(f"block_batch must be at least 1, got {block_batch}")
    return min(n_h, grid_h), min(n_w, grid_w)


def batch_order(grid_h: int, grid_w: int, block_batch: int | tuple[int, int] | None,
                traversal: str = "auto") -> list[BlockRect]:
    """The block batches of one evaluation in run order: what :func:`next_rect` yields when no batch
    shrinks (a regular tiling, ragged at the bottom/right edge), without simulating it."""
    if traversal == "auto":
        traversal = choose_traversal(grid_h, grid_w)
    n_h, n_w = resolve_block_batch(block_batch, grid_h, grid_w)
    rows = [(r, min(r + n_h, grid_h)) for r in range(0, grid_h, n_h)]
    cols = [(c, min(c + n_w, grid_w)) for c in range(0, grid_w, n_w)]
    if traversal == ROW_MAJOR:
        return [BlockRect(r0, r1, c0, c1) for r0, r1 in rows for c0, c1 in cols]
    return [BlockRect(r0, r1, c0, c1) for c0, c1 in cols for r0, r1 in rows]


class BlockwiseDenoiser:
    """D(x; sigma) = c_skip x + c_out F(c_in [x, up(lr)]) of one image, computed block batch by block batch.

    The one orchestration of the network: the sampler in :func:`uniba.infdit.upscale`, the
    whole-canvas :meth:`InfDiT.denoise`, the tests and the benchmarks all call it. Built once per
    image (pass): what does not depend on sigma (the concatenated LR channels, the CLIP vector) is
    computed here, once; the LR cross-attention K/V maps are projected line by line as batches read
    them and kept for every evaluation (``keep_lr_maps``) or per batch and dropped (:class:`LRLineCache`).
    Per evaluation only the adaLN modulations are computed (once, not per batch); per batch the
    RoPE tables (once, shared by every layer).

    ``lr``: the LR image the cross-attention and CLIP see (B, 3, H/scale, W/scale); ``canvas``: the
    output (H, W), a whole number of blocks (default: ``lr`` times the native scale).
    ``block_batch``: n, (n_h, n_w) or None (the whole canvas in one batch). ``on_batch(rect,
    denoised_rect)`` runs after every finished batch (progress, preview, Cancel), ``between_layers()``
    between the transformer layers inside a batch (Cancel; its pending cache entries are dropped). ``stats``, when
    given, receives the traversal, the batch rectangles and the peak number of cached blocks.
    ``state_device``: where ``x``, the result and the concatenated LR live (default: the model's
    device; the host when the sampler's canvases do not fit the device): each batch's pixels visit
    the model's device and its result comes back.
    Extra keyword arguments of a call (``seed``, ``model_options``: what ComfyUI's samplers pass
    in ``extra_args``) are accepted and ignored.
    """

    def __init__(self, model: InfDiT, lr: torch.Tensor, clip_embedding: torch.Tensor, *,
                 canvas: tuple[int, int] | None = None, concat_lr: torch.Tensor | None = None,
                 block_batch: int | tuple[int, int] | None = None, traversal: str = "auto",
                 offload_cache: bool = False, on_batch: BatchCallback | None = None,
                 is_oom: Callable[[BaseException], bool] = is_out_of_memory,
                 on_oom: Callable[[], None] | None = None, position_offset: tuple[int, int] = (0, 0),
                 stats: dict | None = None, between_layers: Callable[[], None] | None = None,
                 keep_lr_maps: bool = True, state_device: torch.device | None = None, own: BlockRect | None = None,
                 exchange: BlockExchange | None = None) -> None:
        c = model.config
        if canvas is None:
            canvas = (lr.shape[-2] * c.native_scale, lr.shape[-1] * c.native_scale)
        height, width = canvas
        if height % c.block_px or width % c.block_px:
            raise ValueError(f"the HR canvas {height}x{width} must be a multiple of the {c.block_px}-px block")
        lr_h, lr_w = height // c.native_scale, width // c.native_scale
        if tuple(lr.shape[-2:]) != (lr_h, lr_w):
            raise ValueError(f"lr must be {lr_h}x{lr_w} (1/{c.native_scale} of the canvas), "
                             f"got {tuple(lr.shape[-2:])}")
        self.grid = (height // c.block_px, width // c.block_px)
        if traversal == "auto":
            traversal = choose_traversal(*self.grid)
        if traversal not in (ROW_MAJOR, COLUMN_MAJOR):
            raise ValueError(f"traversal must be auto, {ROW_MAJOR} or {COLUMN_MAJOR}, got {traversal!r}")
        self.model, self.canvas, self.traversal = model, (height, width), traversal
        self.own = BlockRect(0, self.grid[0], 0, self.grid[1]) if own is None else own
        o = self.own
        if not (0 <= o.row0 < o.row1 <= self.grid[0] and 0 <= o.col0 < o.col1 <= self.grid[1]):
            raise ValueError(f"own blocks {self.own} are not inside the {self.grid[0]}x{self.grid[1]} block grid")
        self.exchange = exchange
        self.region_px = (self.own.n_h * c.block_px, self.own.n_w * c.block_px)
        self.block_batch = resolve_block_batch(block_batch, self.own.n_h, self.own.n_w)
        self.offload_cache, self.on_batch, self.is_oom, self.on_oom = offload_cache, on_batch, is_oom, on_oom
        self.position_offset, self.stats, self.between_layers = position_offset, stats, between_layers
        self.state_device = model.device if state_device is None else torch.device(state_device)
        if concat_lr is None:
            concat_lr = upsample_lr(lr, height, width)[self._pixels(self.own)]
        if tuple(concat_lr.shape[-2:]) != self.region_px:
            raise ValueError(f"concat_lr must be {self.region_px[0]}x{self.region_px[1]} (the blocks computed here), "
                             f"got {tuple(concat_lr.shape[-2:])}")
        self.concat_lr = concat_lr.to(self.state_device)
        self.lr_lines = LRLineCache(model, lr.to(device=model.device, dtype=model.dtype), self.own, traversal,
                                    keep_lr_maps)
        with torch.no_grad():
            self.cond = LRCondition(windows=self.lr_lines.windows, clip_vector=model.clip_vector(clip_embedding))

    def _pixels(self, rect: BlockRect) -> tuple[slice, ...]:
        """The pixels of ``rect`` in a tensor of the blocks computed here (``own``)."""
        bp, o = self.model.config.block_px, self.own
        return (slice(None), slice(None), slice((rect.row0 - o.row0) * bp, (rect.row1 - o.row0) * bp),
                slice((rect.col0 - o.col0) * bp, (rect.col1 - o.col0) * bp))

    def batches_per_evaluation(self) -> int:
        return len(batch_order(self.own.n_h, self.own.n_w, self.block_batch, self.traversal))

    def precondition(self, x: torch.Tensor, sigma: torch.Tensor | float) -> tuple[torch.Tensor, ...]:
        """(sigma, c_skip, c_out, c_in) of shape (B,) for a call, with the canvas checked."""
        c = self.model.config
        if x.shape[1] != c.out_channels:
            raise ValueError(f"x must have {c.out_channels} channels, got {x.shape[1]}")
        if tuple(x.shape[-2:]) != self.region_px:
            raise ValueError(f"x must be a {self.region_px[0]}x{self.region_px[1]} canvas, got {tuple(x.shape[-2:])}")
        sigma_t = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        if sigma_t.numel() == 1:
            sigma_t = sigma_t.expand(x.shape[0])
        c_skip, c_out, c_in, _ = self.model.precondition(sigma_t)
        return sigma_t, c_skip, c_out, c_in

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **_extra_args) -> torch.Tensor:
        sigma_t, c_skip, c_out, c_in = self.precondition(x, sigma)
        return self._run(x, sigma_t, c_in, (c_skip, c_out))

    @torch.no_grad()
    def network_output(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """The network's raw output F (float32), before the EDM output scaling."""
        sigma_t, _, _, c_in = self.precondition(x, sigma)
        return self._run(x, sigma_t, c_in, None)

    def _run(self, x: torch.Tensor, sigma: torch.Tensor, c_in: torch.Tensor,
             skip_out: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The canvas, batch by batch; the network input c_in [x, up(lr)] is built per batch, never whole."""
        model = self.model
        c = model.config
        grid_h, grid_w = self.grid
        own, exchange, traversal = self.own, self.exchange, self.traversal
        n_h, n_w = self.block_batch
        step = model.step_embedding(sigma, self.cond)
        cache = BlockKVCache(grid_h, grid_w, torch.device("cpu") if self.offload_cache else None)
        # blocks outside this band count as finished: their K/V come from the exchange
        done = [[not (own.row0 <= i < own.row1 and own.col0 <= j < own.col1) for j in range(grid_w)]
                for i in range(grid_h)]
        out = torch.empty(x.shape[0], c.out_channels, *self.region_px, dtype=torch.float32, device=x.device)
        c_in = c_in.view(-1, 1, 1, 1).float()
        current = [max(n_h, n_w)]
        first = [own.row0 if traversal == ROW_MAJOR else own.col0]
        region = self._pixels

        def work(unit: int) -> tuple[BlockRect, torch.Tensor, _BatchKV]:
            rect = next_rect(done, min(n_h, unit), min(n_w, unit), traversal, first[0])
            if exchange is not None:
                exchange.receive(cache, rect)
            keep = [(i, j) for i, j in rect.blocks()
                    if cache.needed(i, j, done, rect) or (exchange is not None and exchange.sends(i, j))]
            view = _BatchKV(cache, rect, keep, c.num_layers)
            where = region(rect)
            pixels = torch.cat([x[where].float(), self.concat_lr[where].float()], dim=1) * c_in
            result = model.forward_blocks(pixels.to(model.device), self.cond, step, rect, view, self.position_offset,
                                          **layer_hook)
            result = result.to(out.device)
            current[0] = unit
            return rect, result, view

        kwargs = {"on_oom": self.on_oom} if self.on_oom is not None else {}
        layer_hook = {"between_layers": self.between_layers} if self.between_layers is not None else {}
        try:
            remaining = own.n_h * own.n_w
            while remaining:
                rect, result, view = retry_on_oom(work, current[0], what="Inf-DiT block batch", is_oom=self.is_oom,
                                                  **kwargs)
                where = region(rect)
                if skip_out is not None:
                    c_skip, c_out = skip_out
                    out[where] = c_skip.view(-1, 1, 1, 1) * x[where].float() + c_out.view(-1, 1, 1, 1) * result.float()
                else:
                    out[where] = result.float()
                del result
                for i, j in rect.blocks():
                    done[i][j] = True
                cache.blocks.update(view.pending)
                cache.peak_blocks = max(cache.peak_blocks, len(cache.blocks))
                if exchange is not None:
                    exchange.send({key: entry for key, entry in view.pending.items() if exchange.sends(*key)})
                cache.evict(done)
                first[0] = first_unfinished_line(done, traversal, first[0])
                remaining -= rect.n_h * rect.n_w
                if self.stats is not None:
                    self.stats.setdefault("rects", []).append(rect)
                    self.stats["traversal"] = self.traversal
                    self.stats["peak_cached_blocks"] = cache.peak_blocks
                    self.stats["peak_lr_lines"] = self.lr_lines.peak_lines
                if self.on_batch is not None:
                    self.on_batch(rect, out[where])
            if exchange is not None:
                exchange.end_call()
        finally:
            cache.clear()
        return out


def denoise(model: InfDiT, x: torch.Tensor, sigma: torch.Tensor | float, lr: torch.Tensor,
            clip_embedding: torch.Tensor, block_batch: int | tuple[int, int] | None = None, *,
            concat_lr: torch.Tensor | None = None, traversal: str = "auto",
            offload_cache: bool = False, position_offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """One EDM denoiser call D(x; sigma) on a whole HR canvas (images in [-1, 1], NCHW).

    ``block_batch=None`` computes the whole canvas in one batch (the reference's ``full`` mode);
    an int ``n`` or ``(n_h, n_w)`` runs UniBA block batches with a KV cache. ``concat_lr``
    defaults to the bicubic upsampling of ``lr`` (the 2x mode passes its own). ``position_offset``
    shifts the RoPE positions, in patches. A convenience over :class:`BlockwiseDenoiser`, the one
    orchestration a sampler uses. One call reads the LR maps once, so it keeps only a strip of them.
    """
    denoiser = BlockwiseDenoiser(model, lr, clip_embedding, canvas=tuple(x.shape[-2:]), concat_lr=concat_lr,
                                 block_batch=block_batch, traversal=traversal, offload_cache=offload_cache,
                                 position_offset=position_offset, keep_lr_maps=False)
    return denoiser(x, sigma)

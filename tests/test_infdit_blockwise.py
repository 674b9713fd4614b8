"""UniBA block-wise inference equals the whole-canvas computation (docs/SOURCES.md, Inf-DiT §2.4, issue item 4, 7)."""

from __future__ import annotations

import pytest
import torch
from tiny_infdit import TINY, load_tiny_infdit

from uniba.infdit.blockwise import COLUMN_MAJOR, ROW_MAJOR, BlockwiseDenoiser, batch_order, denoise, next_rect
from uniba.infdit.plan import cached_blocks
from uniba.memory import OutOfMemoryAtMinimum

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return load_tiny_infdit(TINY, seed=3)


def _inputs(model, grid_h, grid_w, seed=0):
    g = torch.Generator().manual_seed(seed)
    bp, s = model.config.block_px, model.config.native_scale
    lr = torch.rand(1, 3, grid_h * bp // s, grid_w * bp // s, generator=g) * 2 - 1
    x = torch.randn(1, 3, grid_h * bp, grid_w * bp, generator=g) * 2
    vec = torch.nn.functional.normalize(torch.randn(1, model.config.vector_dim, generator=g), dim=-1)
    return x, 2.5, lr, vec


@pytest.mark.parametrize("grid", [(5, 3), (3, 5)])
def test_every_batch_size_traversal_and_offload_matches_whole_canvas(model, grid):
    x, sigma, lr, vec = _inputs(model, *grid)
    whole = denoise(model, x, sigma, lr, vec)
    assert whole.abs().mean() > 0.1
    for block_batch in (1, 2, 3, (2, 3), (1, 4), 16):  # 2, 3, (2, 3) leave ragged last batches
        for traversal in (ROW_MAJOR, COLUMN_MAJOR):
            for offload in (False, True):
                out = denoise(model, x, sigma, lr, vec, block_batch=block_batch, traversal=traversal,
                                    offload_cache=offload)
                diff = (out - whole).abs().max().item()
                assert diff <= 1e-5, (block_batch, traversal, offload, diff)


def test_cache_holds_only_the_frontier(model):
    grid_h, grid_w = 6, 4
    x, sigma, lr, vec = _inputs(model, grid_h, grid_w)
    for n in (1, 2):
        stats = {}
        BlockwiseDenoiser(model, lr, vec, block_batch=n, stats=stats)(x, sigma)
        assert stats["traversal"] == ROW_MAJOR  # narrower than tall: the cached strip spans the width
        assert stats["peak_cached_blocks"] <= cached_blocks(grid_w, n, n)
        assert stats["peak_cached_blocks"] < grid_h * grid_w
        assert len(stats["rects"]) == -(-grid_h // n) * -(-grid_w // n)
        assert stats["rects"] == batch_order(grid_h, grid_w, n)  # what the plan shows is what runs
    stats = {}
    x_t, _, lr_t, _ = _inputs(model, grid_w, grid_h)
    BlockwiseDenoiser(model, lr_t, vec, block_batch=1, stats=stats)(x_t, sigma)
    assert stats["traversal"] == COLUMN_MAJOR


@pytest.mark.parametrize("grid,n", [((5, 3), 2), ((3, 7), (2, 3)), ((4, 4), 1), ((6, 5), (4, 2)), ((2, 9), 16)])
def test_batch_order_is_what_next_rect_runs(grid, n):
    for traversal in (ROW_MAJOR, COLUMN_MAJOR):
        done = [[False] * grid[1] for _ in range(grid[0])]
        n_hw = (n, n) if isinstance(n, int) else n
        simulated = []
        while not all(all(row) for row in done):
            rect = next_rect(done, min(n_hw[0], grid[0]), min(n_hw[1], grid[1]), traversal)
            for i, j in rect.blocks():
                done[i][j] = True
            simulated.append(rect)
        assert batch_order(*grid, n, traversal) == simulated


def test_next_rect_respects_dependencies_after_shrinking():
    done = [[False] * 5 for _ in range(4)]
    first = next_rect(done, 2, 2, ROW_MAJOR)
    assert (first.row0, first.row1, first.col0, first.col1) == (0, 2, 0, 2)
    for i, j in first.blocks():
        done[i][j] = True
    smaller = next_rect(done, 1, 1, ROW_MAJOR)
    assert (smaller.row0, smaller.col0, smaller.n_h, smaller.n_w) == (0, 2, 1, 1)
    column = next_rect([[False] * 3 for _ in range(2)], 2, 2, COLUMN_MAJOR)
    assert (column.n_h, column.n_w) == (2, 2)


def test_out_of_memory_halves_the_batch_with_identical_output(model):
    x, sigma, lr, vec = _inputs(model, 4, 4)
    reference = denoise(model, x, sigma, lr, vec, block_batch=4)
    real_forward = model.forward_blocks
    sizes = []

    def flaky(pixels, cond, step, rect, kv, offset=(0, 0)):
        sizes.append((rect.n_h, rect.n_w))
        if rect.n_h * rect.n_w > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(pixels, cond, step, rect, kv, offset)

    model.forward_blocks = flaky
    try:
        stats = {}
        out = BlockwiseDenoiser(model, lr, vec, block_batch=4, stats=stats)(x, sigma)
    finally:
        del model.forward_blocks
    assert sizes[0] == (4, 4) and sizes[1] == (2, 2)
    assert all(r.n_h * r.n_w <= 4 for r in stats["rects"])
    assert (out - reference).abs().max().item() == 0.0


def test_out_of_memory_at_one_block_says_what_to_do(model):
    x, sigma, lr, vec = _inputs(model, 2, 2)

    def always(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory")

    model.forward_blocks = always
    try:
        with pytest.raises(OutOfMemoryAtMinimum, match="smallest size"):
            denoise(model, x, sigma, lr, vec, block_batch=2)
    finally:
        del model.forward_blocks


def test_cancel_stops_within_one_batch_and_frees_the_cache(model):
    x, sigma, lr, vec = _inputs(model, 3, 3)
    seen = []

    class Cancelled(Exception):
        pass

    def on_batch(rect, denoised):
        seen.append(rect)
        if len(seen) == 2:
            raise Cancelled

    denoiser = BlockwiseDenoiser(model, lr, vec, block_batch=1, on_batch=on_batch)
    with pytest.raises(Cancelled):
        denoiser(x, sigma)
    assert len(seen) == 2
    # the model is still usable and gives the same result as before
    before = denoise(model, x, sigma, lr, vec, block_batch=1)
    assert torch.equal(denoise(model, x, sigma, lr, vec, block_batch=1), before)

"""Tiled DC-AE decode/encode: the policy, exact blending, OOM retry, progress and Cancel between tiles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_sana_te_vae import tiny_dcae_state_dict

from uniba.memory import GIB
from uniba.sana import tiling
from uniba.sana.dcae import RES_BLOCK, VIT_BLOCK, DCAEConfig, load_dcae

# A 4x DC-AE (3 stages) so tiles are cheap on a busy 2-core machine; the tiler is the same code for 32x.
_BLOCKS = (RES_BLOCK, VIT_BLOCK, VIT_BLOCK)
SMALL = DCAEConfig(latent_channels=8, head_dim=8,
                   encoder_widths=(8, 16, 32), encoder_depths=(1, 1, 1), encoder_blocks=_BLOCKS,
                   encoder_scales=((), (5,), (5,)),
                   decoder_widths=(8, 16, 32), decoder_depths=(1, 1, 1), decoder_blocks=_BLOCKS,
                   decoder_scales=((), (5,), (5,)))


@pytest.fixture(scope="module")
def dcae():
    return load_dcae(tiny_dcae_state_dict(SMALL))


@pytest.fixture(scope="module")
def dcae32():
    return load_dcae(tiny_dcae_state_dict())


def test_tile_starts_cover_and_align_to_the_end() -> None:
    assert tiling.tile_starts(10, 32, 4) == [0]
    assert tiling.tile_starts(128, 32, 4) == [0, 28, 56, 84, 96]
    for length, tile, overlap in ((64, 32, 4), (100, 32, 4), (33, 32, 4), (37, 8, 1)):
        starts = tiling.tile_starts(length, tile, overlap)
        assert starts[-1] + tile == length
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_policy_untiled_below_2048_tiled_1024_above() -> None:
    plan = dict(cell_px=32, bytes_per_pixel=1000.0, batch=1)
    assert tiling.plan_tile(32, 32, **plan) == 32  # 1024 px: one pass
    assert tiling.plan_tile(48, 40, **plan) == 48  # 1536 px: one pass
    assert tiling.plan_tile(64, 64, **plan) == 32  # 2048 px: 1024-px tiles
    assert tiling.plan_tile(128, 96, **plan, budget_bytes=100 * GIB) == 32  # lots of memory: still 1024
    # a small budget shrinks the tile to what fits: 512 px = 262144 px * 1000 B
    assert tiling.plan_tile(128, 128, **plan, budget_bytes=262144 * 1000) == 16
    # below 2048 px but not enough memory for one pass: tiled too
    assert tiling.plan_tile(48, 48, **plan, budget_bytes=262144 * 1000) == 16
    # never below the minimum tile, even when nothing fits (the OOM retry has the last word)
    assert tiling.plan_tile(128, 128, **plan, budget_bytes=1) == tiling.MIN_TILE_CELLS
    assert tiling.plan_tile(128, 128, **plan, tile_size=512) == 16  # the node's override
    assert tiling.plan_tile(8, 8, **plan, tile_size=4096) == 8


def test_blending_is_a_partition_of_unity() -> None:
    """With a tile-independent function the blended result equals the direct one exactly."""
    x = torch.randn(2, 4, 13, 21)

    def up(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t, scale_factor=4, mode="nearest") * 3.0

    for tile in (4, 5, 8, 13):
        out = tiling.tiled_apply(x, up, tile=tile, scale_in=1, scale_out=4)
        assert torch.allclose(out, up(x), atol=1e-6)
    image = torch.randn(1, 3, 64, 96)

    def down(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, 8)

    out = tiling.tiled_apply(image, down, tile=4, scale_in=8, scale_out=1)
    assert torch.allclose(out, down(image), atol=1e-6)


def test_tiled_decode_matches_untiled_when_one_tile_covers_it(dcae32) -> None:
    latent = torch.randn(1, 32, 2, 3)
    full = dcae32.decode_full(latent)
    assert torch.equal(dcae32.decode(latent), full)
    assert torch.equal(dcae32.decode(latent, tile_size=3 * 32), full)


def test_tiled_vs_untiled_difference_is_measured_and_shrinks_with_tile_size(dcae) -> None:
    """Global attention makes tiling approximate (random weights exaggerate it): bigger tiles, closer result."""
    latent = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    full = dcae.decode_full(latent)
    diffs = {}
    for cells in (5, 6):
        tiled = dcae.decode(latent, tile_size=cells * 4)
        assert tiled.shape == full.shape
        diffs[cells] = (tiled - full).abs().mean().item()
        cosine = F.cosine_similarity(tiled.flatten(), full.flatten(), dim=0).item()
        print(f"tiny 4x DC-AE 32 px, {cells * 4}-px tiles: mean |tiled - untiled| {diffs[cells]:.4f}, "
              f"max {(tiled - full).abs().max():.4f}, cosine {cosine:.3f}")
        assert cosine > 0.7
    assert 0 < diffs[6] < diffs[5]


def test_tiled_encode_shape_and_closeness(dcae) -> None:
    image = torch.rand(1, 3, 32, 24) * 2 - 1
    full = dcae.encode_full(image)
    tiled = dcae.encode(image, tile_size=16)
    assert tiled.shape == full.shape == (1, 8, 8, 6)
    cosine = F.cosine_similarity(tiled.flatten(), full.flatten(), dim=0).item()
    print(f"tiny 4x DC-AE encode 32x24 px, 16-px tiles: cosine to untiled {cosine:.3f}")
    assert cosine > 0.5


def test_progress_per_tile_and_cancel_between_tiles(dcae) -> None:
    calls = []

    def progress(done, total=None, preview=None):
        calls.append((done, total))
        if preview is not None:
            assert preview.min() >= 0 and preview.max() <= 1

    latent = torch.randn(1, 8, 6, 6)
    dcae.decode(latent, tile_size=16, progress=progress)
    assert calls[0] == (0, 4) and calls[-1] == (4, 4) and len(calls) == 5

    class Cancelled(Exception):
        pass

    seen = []

    def cancel_after_two(done, total=None, preview=None):
        seen.append(done)
        if done == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        dcae.decode(latent, tile_size=16, progress=cancel_after_two)
    assert seen == [0, 1, 2]


def test_out_of_memory_retries_with_smaller_tiles(dcae, monkeypatch, caplog) -> None:
    latent = torch.randn(1, 8, 8, 8)
    sizes = []
    real = dcae.decode_full

    def fragile(z):
        sizes.append(z.shape[-1])
        if z.shape[-1] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 36.00 GiB")
        return real(z)

    monkeypatch.setattr(dcae, "decode_full", fragile)
    want = tiling.tiled_apply(latent, real, tile=4, scale_in=1, scale_out=4)
    got = dcae.decode(latent)  # tries one pass, then the minimum tile of 4 cells
    assert sizes[0] == 8 and sizes[-1] == 4
    assert torch.equal(got, want)
    assert "DC-AE decode ran out of memory at 8; retrying at 4" in caplog.text

    def always(z):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(dcae, "decode_full", always)
    with pytest.raises(RuntimeError, match="even at the smallest size"):
        dcae.decode(latent)


def test_memory_estimate_grows_with_width_and_halves_for_bf16() -> None:
    fp32 = tiling.activation_bytes_per_pixel((128, 256, 512), torch.float32)
    bf16 = tiling.activation_bytes_per_pixel((128, 256, 512), torch.bfloat16)
    assert fp32 == (5 * 128 + 256) * 4
    assert bf16 < fp32
    # the real config at 4096 px untiled in fp32: tens of GB, as measured (sana.md §2.3)
    assert fp32 * 4096**2 > 20 * GIB

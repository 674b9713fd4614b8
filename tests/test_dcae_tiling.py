"""Exact tiled DC-AE decode/encode: equal to one pass at every tile size, budget and out-of-memory retry."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from tiny_sana_te_vae import tiny_dcae_state_dict

from uniba.dcae import tiling
from uniba.dcae.blocks import EfficientViTBlock, ResBlock, UpBlock
from uniba.dcae.config import RES_BLOCK, VIT_BLOCK, DCAEConfig
from uniba.dcae.loader import load_dcae
from uniba.dcae.model import DCAE
from uniba.memory import GIB, MIB, OutOfMemoryAtMinimum

EXACT = 1e-5  # fp32: max |tiled - one pass| allowed, relative to the output's range (images: [-1, 1])

# A 4x DC-AE (3 stages: ResBlock, EfficientViT, EfficientViT) so tiles are cheap; same tiler code as for 32x.
_BLOCKS = (RES_BLOCK, VIT_BLOCK, VIT_BLOCK)
SMALL = DCAEConfig(latent_channels=8, head_dim=8,
                   encoder_widths=(8, 16, 32), encoder_depths=(1, 1, 1), encoder_blocks=_BLOCKS,
                   encoder_scales=((), (5,), (5,)),
                   decoder_widths=(8, 16, 32), decoder_depths=(1, 1, 1), decoder_blocks=_BLOCKS,
                   decoder_scales=((), (5,), (5,)))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Hundreds of tiny tiles: a second torch thread only adds contention on a busy machine."""


@pytest.fixture(scope="module")
def dcae32():
    """The f32c32 structure (6 stages, 32x, 32 latent channels) with tiny widths and random weights."""
    return load_dcae(tiny_dcae_state_dict())


@pytest.fixture(scope="module")
def dcae4():
    return load_dcae(tiny_dcae_state_dict(SMALL))


def _latent(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference in units of the reference's range (random-weight latents reach |z| ~ 10)."""
    assert a.shape == b.shape
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def _real_on_meta() -> DCAE:
    with torch.device("meta"):
        return DCAE(DCAEConfig.sana_f32c32())


def test_global_and_local_steps_of_the_real_config() -> None:
    """Attention blocks run as two sweeps at 1/32..1/8; everything from 1/8 to pixels is one fused local step."""
    model = _real_on_meta()
    steps = tiling.decoder_steps(model)
    assert [s.name for s in steps][:2] == ["conv_in", "stage5.0"] and steps[-1].name == "tail"
    attention = [s for s in steps if s.attention is not None]
    assert len(attention) == 9 and {s.halo for s in attention} == {3}  # 5x5 multi-scale (2) + GLUMB 3x3 (1)
    assert {s.cell_px for s in attention} == {32, 16, 8}  # the lowest resolution with attention is 1/8
    tail = steps[-1]
    assert (tail.up, tail.halo, tail.cell_px) == (8, 7, 8)  # 7 cells of the 1/8 grid = 56 px
    assert all(s.halo == 1 for s in steps if isinstance(s.run, UpBlock))
    encoder = tiling.encoder_steps(model)
    assert (encoder[0].name, encoder[0].down, encoder[0].halo) == ("head", 8, 5)  # 36 px receptive radius
    assert sum(s.attention is not None for s in encoder) == 9
    # the widest whole activation: the 512-channel 1/8-resolution stage, at 4096 px 512 x 512 x 512 values
    plan = tiling.plan_pass(steps, (1, 32, 128, 128), torch.float32)
    assert plan.stored_bytes == 2 * 512 * 512 * 512 * 4


def test_halos_are_the_receptive_radius() -> None:
    assert tiling._tail_halo([UpBlock(16, 8, "interpolate")]) == 1
    assert tiling._tail_halo([UpBlock(16, 8, "pixel_shuffle")]) == 1
    assert tiling._tail_halo([ResBlock(4), ResBlock(4)]) == 4
    assert tiling._tail_halo([UpBlock(8, 4, "interpolate"), ResBlock(4)]) == 2  # ceil((2 + 1) / 2)
    assert EfficientViTBlock(8, 8, (5,)).attn.context_radius == 2


@pytest.mark.parametrize(("shape", "tiles"), [((1, 32, 5, 7), (8, 40, 64, 128, 10_000)), ((2, 32, 3, 2), (16, 48)),
                                             ((1, 32, 1, 4), (32, 72))])
def test_decode_equals_one_pass_at_any_tile_size(dcae32, shape, tiles) -> None:
    """Odd, non-square sizes that no tile size divides; tiles from 8 px (one cell of the 1/8 grid) up."""
    latent = _latent(shape)
    full = dcae32.decode_full(latent)
    for tile in tiles:
        assert _diff(dcae32.decode(latent, tile_size=tile), full) <= EXACT, f"tile {tile}px"


@pytest.mark.parametrize(("size", "tiles"), [((160, 224), (8, 40, 96)), ((96, 288), (32, 10_000))])
def test_encode_equals_one_pass_at_any_tile_size(dcae32, size, tiles) -> None:
    image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    full = dcae32.encode_full(image)
    for tile in tiles:
        assert _diff(dcae32.encode(image, tile_size=tile), full) <= EXACT, f"tile {tile}px"


def test_small_4x_model_odd_sizes(dcae4) -> None:
    latent = _latent((2, 8, 13, 9), seed=3)
    full = dcae4.decode_full(latent)
    for tile in (4, 12, 28):
        assert _diff(dcae4.decode(latent, tile_size=tile), full) <= EXACT, f"tile {tile}px"
    image = torch.rand(1, 3, 36, 52, generator=torch.Generator().manual_seed(2)) * 2 - 1
    full = dcae4.encode_full(image)
    for tile in (8, 20):
        assert _diff(dcae4.encode(image, tile_size=tile), full) <= EXACT, f"tile {tile}px"


def test_every_halo_is_needed(dcae32) -> None:
    """One cell less halo on any step that has one breaks exactness: the halos are the receptive radius."""
    latent = _latent((1, 32, 3, 4), seed=4)  # 12 cells at 1/32: above head_dim, so attention is linear there too
    full = dcae32.decode_full(latent)
    steps = tiling.decoder_steps(dcae32)
    for i, step in enumerate(steps):
        if step.halo == 0:
            continue
        short = list(steps)
        short[i] = dataclasses.replace(step, halo=step.halo - 1)
        got = tiling.run_pass(dcae32, latent, short, full=dcae32.decode_full, tile_size=16, budget_bytes=None,
                              progress=None, output_device=None, is_oom=lambda e: False, preview=None, what="test")
        assert _diff(got, full) > 1e-3, step.name
    image = torch.rand(1, 3, 96, 128) * 2 - 1
    full = dcae32.encode_full(image)
    steps = tiling.encoder_steps(dcae32)
    for i, step in enumerate(steps):
        short = list(steps)
        short[i] = dataclasses.replace(step, halo=step.halo - 1)
        got = tiling.run_pass(dcae32, image, short, full=dcae32.encode_full, tile_size=16, budget_bytes=None,
                              progress=None, output_device=None, is_oom=lambda e: False, preview=None, what="test")
        assert _diff(got, full) > 1e-4, step.name


def test_any_budget_gives_the_same_image(dcae32) -> None:
    latent = _latent((1, 32, 4, 3), seed=5)
    full = dcae32.decode_full(latent)
    steps = tiling.decoder_steps(dcae32)
    previous = None
    for budget in (1, 64 * 1024, 512 * 1024, 4 * MIB, 64 * MIB, GIB):
        plan = tiling.plan_pass(steps, tuple(latent.shape), torch.float32, budget_bytes=budget)
        if previous is not None:
            assert all(a >= b for a, b in zip(plan.tiles, previous.tiles)), "more memory never means smaller tiles"
        previous = plan
        assert _diff(dcae32.decode(latent, budget_bytes=budget), full) <= EXACT, f"budget {budget}"
    assert tiling.plan_pass(steps, tuple(latent.shape), torch.float32, budget_bytes=1).tiles[-1] == 1
    assert tiling.plan_pass(steps, tuple(latent.shape), torch.float32, budget_bytes=GIB).single_pass


class _FakeOOM:
    """Forward pre-hooks that fail like a full device when a block's input has more than ``limit`` values
    (persistently, or only the first ``times`` times)."""

    def __init__(self, model: DCAE, limit: int, times: int | None = None) -> None:
        self.limit, self.times, self.raised = limit, times, 0
        self.handles = [m.register_forward_pre_hook(self.check) for m in model.modules()
                        if isinstance(m, (ResBlock, UpBlock, EfficientViTBlock))]

    def check(self, module, args) -> None:
        if args[0].numel() > self.limit and (self.times is None or self.raised < self.times):
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 36.00 GiB")

    def __enter__(self) -> _FakeOOM:
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def test_out_of_memory_retries_give_the_same_image(dcae32, caplog) -> None:
    latent = _latent((1, 32, 3, 4), seed=6)
    full = dcae32.decode_full(latent)
    for limit, times in ((60_000, None), (30_000, None), (0, 1), (0, 2)):
        with _FakeOOM(dcae32, limit, times) as fake:
            got = dcae32.decode(latent)
        assert fake.raised > 0
        assert _diff(got, full) <= EXACT, (limit, times)
    assert "ran out of memory" in caplog.text
    with _FakeOOM(dcae32, 0), pytest.raises(OutOfMemoryAtMinimum, match="even at the smallest size"):
        dcae32.decode(latent)
    image = torch.rand(1, 3, 96, 160) * 2 - 1
    with _FakeOOM(dcae32, 100_000) as fake:
        got = dcae32.encode(image)
    assert fake.raised > 0 and _diff(got, dcae32.encode_full(image)) <= EXACT


def test_progress_per_tile_and_cancel_between_tiles(dcae32) -> None:
    calls = []

    def progress(done, total=None, preview=None):
        calls.append((done, total))
        if preview is not None:
            assert preview.min() >= 0 and preview.max() <= 1

    latent = _latent((1, 32, 4, 4))
    dcae32.decode(latent, tile_size=64, progress=progress)
    dones = [d for d, _ in calls]
    assert dones == list(range(len(calls))) and calls[-1][0] == calls[-1][1] > 10
    assert all(t == calls[-1][1] for _, t in calls)

    class Cancelled(Exception):
        pass

    seen = []

    def cancel_after_two(done, total=None, preview=None):
        seen.append(done)
        if done == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        dcae32.decode(latent, tile_size=64, progress=cancel_after_two)
    assert seen == [0, 1, 2]


def test_single_pass_when_it_fits(dcae32) -> None:
    latent = _latent((1, 32, 2, 3))
    full = dcae32.decode_full(latent)
    assert torch.equal(dcae32.decode(latent), full)
    assert torch.equal(dcae32.decode(latent, tile_size=96), full)


def test_plan_for_4096_and_8192_px_of_the_real_config() -> None:
    """Planned memory of a 4096 px decode (no budget given: 768 px tiles) and under budgets."""
    steps = tiling.decoder_steps(_real_on_meta())
    weights_fp32 = 159.2e6 * 4  # the decoder's parameters
    for dtype, limit in ((torch.bfloat16, 4e9), (torch.float32, 6e9)):
        size = torch.empty((), dtype=dtype).element_size()
        plan = tiling.plan_pass(steps, (1, 32, 128, 128), dtype)
        assert plan.estimated_peak_bytes + weights_fp32 * size / 4 < limit, plan.to_dict()
        budgeted = tiling.plan_pass(steps, (1, 32, 128, 128), dtype, budget_bytes=int(2 * GIB))
        assert budgeted.estimated_peak_bytes <= 2 * GIB
    # 8192 px in bf16 on a 3 GiB budget: the whole 1/8 activations (2 x 1 GiB) go to the output device
    huge = tiling.plan_pass(steps, (1, 32, 256, 256), torch.bfloat16, budget_bytes=int(3 * GIB))
    assert huge.estimated_peak_bytes <= 3 * GIB and not huge.store_on_compute


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("UNIBA_SLOW"), reason="real f32c32 at 1024 px takes minutes: UNIBA_SLOW=1")
def test_real_f32c32_decode_1024px_exact() -> None:
    """The released decoder's shapes with random weights, fp32 on the CPU: tiled == one pass at 1024 px."""
    from uniba.dcae.bench import random_real_decoder

    model = random_real_decoder(seed=0)
    latent = _latent((1, 32, 32, 32), seed=7)
    full = model.decode_full(latent)
    for tile in (256, 512):
        got = model.decode(latent, tile_size=tile)
        print(f"real f32c32 1024 px, {tile}-px tiles: max |tiled - one pass| {_diff(got, full):.2e}")
        assert _diff(got, full) <= EXACT


@pytest.mark.parametrize("sizes", ["abc", "100", "1024,x", ""])
def test_bench_sizes_are_named_when_wrong(sizes: str, capsys) -> None:
    from uniba.dcae.bench import run

    with pytest.raises(SystemExit):
        run(["--sizes", sizes])
    assert "argument --sizes: expected comma-separated edges in px, multiples of 32" in capsys.readouterr().err

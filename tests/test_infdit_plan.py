"""The planner and ``python -m uniba plan infdit`` (issue item 7)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_infdit import TINY

from uniba.cli import main
from uniba.infdit import PassPlan, PlanDoesNotFit, parse_block_batch, plan_upscale, release_config, resolve_sampling
from uniba.infdit.blockwise import COLUMN_MAJOR, ROW_MAJOR
from uniba.infdit.plan import block_cache_bytes, passes_for_scale, weights_bytes
from uniba.infdit.sampling import sample_euler
from uniba.memory import GIB

pytestmark = pytest.mark.usefixtures("one_thread")

# one field per fact: what holds for the whole run at the top, everything per pass in its pass
KEYS = {"scale", "passes", "block_px", "evaluations", "sigmas", "peak_bytes", "minimum_bytes", "weights_bytes",
        "free_bytes", "usable_bytes", "fits", "weights_resident", "rope_wraps", "rope_max_side_px", "description"}
PASS_KEYS = {"scale", "in_height", "in_width", "padded_height", "padded_width", "out_height", "out_width",
             "canvas_height", "canvas_width", "grid_rows", "grid_cols", "traversal", "block_batch", "offload_cache",
             "keep_lr_maps", "state_on_host",
             "batches_per_step", "cache_bytes", "peak_bytes", "minimum_bytes", "block_order"}


def test_release_figures_from_the_research_notes():
    config = release_config()
    assert block_cache_bytes(config, torch.bfloat16) == 28 * 2 * 1024 * 1280 * 2  # 146.8 MB per block
    dit = weights_bytes(config.replace(clip=None), torch.bfloat16)
    assert dit == (753_762_928 - 327_680 - 4_480) * 2


def test_4096_fits_a_12gb_card_growing_with_the_side():
    config = release_config()
    plan = plan_upscale(config, 1024, 1024, 4, 12 * GIB)
    data = plan.to_dict()
    assert set(data) == KEYS and set(data["passes"][0]) == PASS_KEYS and json.loads(json.dumps(data)) == data
    assert plan.fits and not plan.last.offload_cache and plan.last.block_batch[0] >= 1
    assert (plan.last.grid_rows, plan.last.grid_cols, plan.block_px, plan.evaluations) == (32, 32, 128, 39)
    assert plan.peak_bytes <= 12 * GIB
    # the cache grows with the side, not the area: 4x the side is well under 16x the cache
    small = plan_upscale(config, 256, 256, 4, 12 * GIB, block_batch=1)
    big = plan_upscale(config, 1024, 1024, 4, 12 * GIB, block_batch=1)
    assert big.last.cache_bytes < 5 * small.last.cache_bytes


def test_wide_images_traverse_column_major_and_small_budgets_offload():
    config = release_config()
    wide = plan_upscale(config, 256, 1024, 4, 24 * GIB)
    assert wide.last.traversal == COLUMN_MAJOR and wide.out_width == 4096 and wide.out_height == 1024
    tight = plan_upscale(config, 1024, 1024, 4, 6 * GIB)
    assert tight.last.offload_cache and tight.fits
    assert plan_upscale(config, 1024, 1024, 4, 6 * GIB, offload_cache="off", block_batch=1).fits is False
    forced = plan_upscale(config, 256, 256, 4, None, block_batch=5, offload_cache="on")
    assert forced.last.block_batch == (5, 5) and forced.last.offload_cache and forced.fits


def test_passes_and_padding():
    assert passes_for_scale(4) == [4] and passes_for_scale(2) == [2]
    assert passes_for_scale(8) == [4, 2] and passes_for_scale(16) == [4, 4]
    plan = plan_upscale(TINY, 35, 41, 8, None)
    assert [p.scale for p in plan.passes] == [4, 2]
    assert (plan.passes[0].padded_height, plan.passes[0].padded_width) == (40, 48)
    assert (plan.out_height, plan.out_width) == (280, 328)
    small = plan_upscale(TINY, 3, 64, 4, None)  # smaller than one block: padded, not refused
    assert (small.passes[0].padded_height, small.out_height) == (8, 12)
    with pytest.raises(ValueError, match="scale"):
        plan_upscale(TINY, 64, 64, 3, None)


def test_cli_plan_prints_the_release_plan(capsys):
    assert main(["plan", "infdit", "--size", "4096x4096", "--vram", "12GB"]) == 0
    text = capsys.readouterr().out
    assert ROW_MAJOR in text and "KV cache" in text and "fits" in text and "1 pass" in text
    assert main(["plan", "infdit", "--size", "4096x4096", "--vram", "12GB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passes"][-1]["out_width"] == 4096 and data["fits"]


def test_cli_upscale_writes_the_image_atomically(tmp_path):
    import numpy as np
    from PIL import Image
    from tiny_infdit import write_tiny_infdit

    model = write_tiny_infdit(tmp_path)
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray((np.random.default_rng(0).random((33, 40, 3)) * 255).astype("uint8")).save(src)
    assert main(["upscale", str(src), str(dst), "--model", str(model), "--steps", "1", "--block-batch", "2"]) == 0
    assert Image.open(dst).size == (160, 132)
    assert main(["upscale", str(src), str(tmp_path / "bad.png"), "--model", str(src)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "infdit_tiny.safetensors", "out.png"]


@pytest.mark.parametrize("value,parsed", [
    ("auto", None), ("", None), (None, None), (" AUTO ", None), ("4", 4), (4, 4), ("2x3", (2, 3)), ("2 X 3", (2, 3)),
    ((2, 3), (2, 3)), ([1, 4], (1, 4)),
])
def test_parse_block_batch(value, parsed):
    assert parse_block_batch(value) == parsed


@pytest.mark.parametrize("value", ["x", "0", "2x0", "-1", "1.5", "2x3x4", True, (0, 2), 0])
def test_parse_block_batch_refuses_with_the_accepted_forms(value):
    with pytest.raises(ValueError, match="block_batch must be auto"):
        parse_block_batch(value)


def test_plan_carries_the_block_order_and_the_evaluations():
    euler = resolve_sampling(sample_euler, steps=8)  # one evaluation per step
    plan = plan_upscale(TINY, 40, 24, 4, None, sampling=euler, block_batch="2x2")  # 5x3 grid, row-major
    data = plan.to_dict()
    assert data["evaluations"] == 8 and len(data["sigmas"]) == 9
    assert data["passes"][0]["block_order"] == [[0, 0, 2, 2], [0, 2, 2, 1], [2, 0, 2, 2], [2, 2, 2, 1], [4, 0, 1, 2],
                                                [4, 2, 1, 1]]
    assert plan.total_batches == 8 * 6
    wide = plan_upscale(TINY, 8, 24, 4, None, block_batch=1)  # 1x3 grid: column-major
    assert wide.to_dict()["passes"][0]["block_order"] == [[0, 0, 1, 1], [0, 1, 1, 1], [0, 2, 1, 1]]
    assert wide.evaluations == 39  # default: the reference's 20 Heun steps
    heun3 = plan_upscale(TINY, 8, 24, 4, None, sampling=resolve_sampling(steps=3))
    assert heun3.evaluations == 5  # counted from the sampler, not assumed


def test_a_plan_is_frozen_and_typed():
    import dataclasses

    plan = plan_upscale(TINY, 40, 24, 8, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.fits = False
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.passes[0].block_batch = (1, 1)
    assert isinstance(plan.passes, tuple) and all(isinstance(p, PassPlan) for p in plan.passes)


def test_a_plan_that_cannot_fit_even_offloaded_is_refused_with_its_figures():
    config = release_config()
    # with the LR maps per batch and the cache and canvases in host RAM, even 32768 px needs only ~80 MiB
    # above the weights: 2 GiB leaves less than the weights after the margin
    plan = plan_upscale(config, 8192, 8192, 4, 2 * GIB)
    assert not plan.fits
    with pytest.raises(PlanDoesNotFit, match=r"32768x32768 px within 2.00 GiB free.*needs about .* MiB.*"
                                             r"smaller scale.*offload_cache on"):
        plan.check_fits()
    plan_upscale(config, 1024, 1024, 4, 12 * GIB).check_fits()  # fits: no error
    tight = plan_upscale(config, 1024, 1024, 4, 6 * GIB, block_batch=8, offload_cache="off")
    assert not tight.fits
    tight.check_fits()  # the chosen batch does not fit, but one offloaded block does: OOM retries shrink it


def test_cli_refuses_a_plan_that_cannot_fit_before_loading(tmp_path, capsys):
    import numpy as np
    from PIL import Image
    from tiny_infdit import write_tiny_infdit

    model = write_tiny_infdit(tmp_path)
    src = tmp_path / "in.png"
    Image.fromarray(np.zeros((256, 256, 3), dtype="uint8")).save(src)
    code = main(["upscale", str(src), str(tmp_path / "out.png"), "--model", str(model), "--vram", "500KB"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Inf-DiT cannot upscale to 1024x1024 px within 500.00 KiB free") and "offload" in err
    assert not (tmp_path / "out.png").exists()


def test_cli_upscale_takes_a_sampler_steps_or_preset(tmp_path):
    import numpy as np
    from PIL import Image
    from tiny_infdit import write_tiny_infdit

    model = write_tiny_infdit(tmp_path)
    src = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(1).random((16, 16, 3)) * 255).astype("uint8")).save(src)
    outputs = {}
    for name, extra in (("a", ["--sampler", "dpmpp_2m", "--steps", "3"]), ("c", ["--preset", "fast"]),
                        ("d", ["--sampler", "dpmpp_2m", "--steps", "3", "--block-batch", "1x2"])):
        dst = tmp_path / f"{name}.png"
        assert main(["upscale", str(src), str(dst), "--model", str(model), *extra]) == 0
        outputs[name] = np.asarray(Image.open(dst))
    assert outputs["a"].shape == (64, 64, 3) and not np.array_equal(outputs["a"], outputs["c"])
    assert np.abs(outputs["a"].astype(int) - outputs["d"]).max() <= 1  # any block batch: the same image


def test_traversal_names_have_one_home():
    """"row-major" / "column-major" are defined once (uniba/infdit/blockwise.py); the planner, the engine and the
    benchmarks import them, so a renamed traversal cannot leave a stale copy behind."""
    from pathlib import Path

    import uniba

    root = Path(uniba.__file__).parent
    homes = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                   if any(name in p.read_text(encoding="utf-8") for name in ('"row-major"', '"column-major"')))
    assert homes == ["infdit/blockwise.py"]

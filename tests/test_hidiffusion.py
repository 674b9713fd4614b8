"""HiDiffusion engine, host-free: windows, shift schedule, RAU-Net operators, step index, plan tables, detection."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from uniba.hidiffusion import patch as hooks
from uniba.hidiffusion import raunet, windows
from uniba.hidiffusion.detect import UNetFacts, UnsupportedModelError, detect
from uniba.hidiffusion.plan import (
    AGGRESSIVE_STEP,
    REFERENCE_RATIOS,
    SD_LAYOUT,
    SDXL_LAYOUT,
    describe,
    make_config,
    resolution_band,
    resolve_plan,
)
from uniba.hidiffusion.schedule import step_from_percent, step_index

# --------------------------------------------------------------------------- windows


def _naive_windows(x: torch.Tensor, h: int, w: int, shift: tuple[int, int]) -> list[torch.Tensor]:
    """Independent definition: roll the grid by -shift, cut it into 4 quadrants, row-major."""
    b, _, c = x.shape
    grid = x.reshape(b, h, w, c)
    if shift[0] > 0:
        grid = torch.roll(grid, (-shift[0], -shift[1]), (1, 2))
    wh, ww = h // 2, w // 2
    return [grid[:, i * wh:(i + 1) * wh, j * ww:(j + 1) * ww].reshape(b, wh * ww, c) for i in (0, 1) for j in (0, 1)]


@pytest.mark.parametrize("hw", [(8, 8), (12, 20), (16, 6)])
@pytest.mark.parametrize("choice", [0, 1, 2, 3])
def test_partition_matches_naive_and_reverses_exactly(hw, choice) -> None:
    h, w = hw
    x = torch.randn(2, h * w, 5)
    win, state = windows.partition(x, h, w, choice)
    assert win.shape == (8, (h // 2) * (w // 2), 5)
    naive = _naive_windows(x, h, w, windows.shift_size((h // 2, w // 2), choice))
    for batch in range(2):
        for q in range(4):
            assert torch.equal(win[batch * 4 + q], naive[q][batch])
    assert torch.equal(windows.reverse(win, state), x)


def test_windowed_attention_is_attention_within_each_window() -> None:
    h, w, c = 8, 12, 4
    x = torch.randn(1, h * w, c)
    win, state = windows.partition(x, h, w, 2)
    out = windows.reverse(F.scaled_dot_product_attention(win, win, win), state)
    for q, part in enumerate(_naive_windows(x, h, w, state.shift)):
        expected = F.scaled_dot_product_attention(part, part, part)
        i, j = divmod(q, 2)
        grid = torch.roll(out.reshape(1, h, w, c), (-state.shift[0], -state.shift[1]), (1, 2))
        got = grid[:, i * 4:(i + 1) * 4, j * 6:(j + 1) * 6].reshape(1, -1, c)
        torch.testing.assert_close(got, expected)


def test_odd_sizes_resize_like_the_reference() -> None:
    h, w = 9, 13
    x = torch.randn(1, h * w, 3)
    win, state = windows.partition(x, h, w, 1)
    assert state.window == (5, 7) and state.shift == (1, 1)
    assert win.shape == (4, 35, 3)
    back = windows.reverse(win, state)
    assert back.shape == x.shape
    grid = F.interpolate(x.reshape(1, h, w, 3).permute(0, 3, 1, 2), size=(10, 14), mode="bicubic")
    expected = F.interpolate(grid, size=(h, w), mode="bicubic").permute(0, 2, 3, 1).reshape(1, h * w, 3)
    torch.testing.assert_close(back, expected)


def test_reference_quirk_no_roll_when_vertical_shift_is_zero() -> None:
    x = torch.randn(1, 4 * 16, 2)  # window (2, 8): shift (0, 2k), the reference skips the roll
    win, state = windows.partition(x, 4, 16, 3)
    assert state.shift == (0, 6)
    assert torch.equal(win, windows.partition(x, 4, 16, 0)[0])


def test_feature_size_from_tokens_matches_ceil_downsampling() -> None:
    for h0, w0 in [(64, 64), (66, 90), (65, 81), (128, 96)]:
        for ratio in (1, 2, 4):
            h, w = math.ceil(h0 / ratio), math.ceil(w0 / ratio)
            assert windows.feature_size_from_tokens(h0, w0, h * w) == (h, w)


# --------------------------------------------------------------------------- shift schedule


def test_shift_choice_is_a_pure_function_of_seed_step_and_block() -> None:
    a = [windows.shift_choice(7, s, ("input", 1), 0) for s in range(50)]
    assert a == [windows.shift_choice(7, s, ("input", 1), 0) for s in range(50)]
    assert all(k in (0, 1, 2, 3) for k in a)
    assert a != [windows.shift_choice(8, s, ("input", 1), 0) for s in range(50)]
    assert a != [windows.shift_choice(7, s, ("output", 9), 0) for s in range(50)]
    assert a != [windows.shift_choice(7, s, ("input", 1), 1) for s in range(50)]


def test_shift_choice_is_uniform_over_four() -> None:
    counts = [0, 0, 0, 0]
    for seed in range(20):
        for step in range(50):
            for block in SDXL_LAYOUT.msw_blocks:
                for index in (0, 1):
                    counts[windows.shift_choice(seed, step, block, index)] += 1
    total = sum(counts)
    assert all(abs(c - total / 4) < 0.06 * total / 4 for c in counts), counts


def test_cond_and_uncond_calls_get_the_same_windows() -> None:
    config = make_config("sd1", seed=5)
    part = hooks.WindowPartitionPatch(config)
    sigmas = torch.linspace(10, 0, 11)
    x = torch.randn(1, 64, 8)
    outs = []
    for _ in range(2):  # ComfyUI may run cond and uncond as two separate calls
        extra = {"block": ("input", 1), "block_index": 0, "activations_shape": [1, 8, 8, 8],
                 "sigmas": torch.tensor([sigmas[3]]), "sample_sigmas": sigmas, "original_shape": [1, 4, 8, 8]}
        outs.append(part(x, x, x, extra)[0])
    assert torch.equal(outs[0], outs[1])


# --------------------------------------------------------------------------- RAU-Net operators


@pytest.mark.parametrize("size", [(16, 16), (17, 23), (33, 41), (8, 5)])
def test_dilated_downsample_equals_reference_conv(size) -> None:
    conv = torch.nn.Conv2d(6, 6, 3, stride=2, padding=1)
    x = torch.randn(1, 6, *size)
    out = raunet.dilated_downsample(conv, x)
    torch.testing.assert_close(out, raunet.rad_reference(x, conv.weight, conv.bias), rtol=0, atol=0)
    assert out.shape[-2:] == (math.ceil(size[0] / 4), math.ceil(size[1] / 4))
    assert (raunet.rad_downsampled(size[0]), raunet.rad_downsampled(size[1])) == tuple(out.shape[-2:])
    assert conv.stride == (2, 2) and conv.padding == (1, 1) and conv.dilation == (1, 1)


def test_dilated_downsample_never_mutates_the_shared_conv_even_on_error() -> None:
    conv = torch.nn.Conv2d(6, 6, 3, stride=2, padding=1)
    with pytest.raises(RuntimeError):
        raunet.dilated_downsample(conv, torch.randn(1, 5, 8, 8))  # wrong channels
    assert conv.stride == (2, 2) and conv.padding == (1, 1) and conv.dilation == (1, 1)
    x = torch.randn(1, 6, 8, 8)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, 2, 1))


def test_pool_and_restore_round_trip_odd_sizes() -> None:
    h = torch.randn(1, 3, 17, 23)
    pooled = raunet.pool(h)
    assert pooled.shape[-2:] == (9, 12)
    restored = raunet.restore(pooled, (17, 23))
    torch.testing.assert_close(restored, F.interpolate(pooled, size=(17, 23), mode="bicubic"))


def test_feature_sizes_follow_the_patched_unet() -> None:
    at, skips, middle = raunet.input_feature_sizes((33, 41), 12, (3, 6, 9), rad_block=3, ca_block=4)
    assert at[0] == (33, 41) and at[3] == (9, 11) and at[4] == (9, 11)
    assert skips[4] == (5, 6) and at[5] == (5, 6) and at[6] == (3, 3) and middle == (2, 2)
    _at, skips_after, _ = raunet.input_feature_sizes((32, 32), 9, (3, 6), ca_block=4, ca_after_skip=True)
    assert skips_after[4] == (16, 16) and _at[5] == (8, 8)


def test_controlnet_residuals_resized_to_patched_sizes() -> None:
    n, down = 12, (3, 6, 9)
    plain, plain_skips, plain_mid = raunet.input_feature_sizes((32, 32), n, down)
    control = {"input": [torch.randn(1, 2, *plain[i]) for i in reversed(range(n))],
               "middle": [torch.randn(1, 2, *plain_mid)],
               "output": [torch.randn(1, 2, *plain_skips[n - 1 - j]) for j in reversed(range(n))]}
    out = raunet.resize_control(control, (32, 32), n, down, rad_block=3, ca_block=4)
    at, skips, middle = raunet.input_feature_sizes((32, 32), n, down, rad_block=3, ca_block=4)
    for i in range(n):
        assert tuple(out["input"][n - 1 - i].shape[-2:]) == at[i]
        assert tuple(out["output"][n - 1 - i].shape[-2:]) == skips[n - 1 - i]
    assert tuple(out["middle"][0].shape[-2:]) == middle
    assert out["input"][-1] is control["input"][-1]  # block 0 keeps its size: passed through
    assert len(control["input"]) == n  # the caller's lists are not consumed


# --------------------------------------------------------------------------- step index from sigmas


def test_step_index_from_sigmas() -> None:
    sigmas = torch.tensor([14.6, 8.0, 4.0, 2.0, 1.0, 0.0])
    assert [step_index(s, sigmas) for s in sigmas[:-1]] == [(i, 5) for i in range(5)]
    assert step_index(torch.tensor([4.0, 4.0]), sigmas) == (2, 5)          # batched cond+uncond
    assert step_index(math.sqrt(8.0 * 4.0), sigmas) == (1, 5)              # DPM2 midpoint belongs to its step
    assert step_index(0.0, sigmas) == (4, 5)                               # end of the run
    assert step_index(20.0, sigmas) == (0, 5)


def test_step_index_heun_repeated_calls() -> None:
    sigmas = [10.0, 5.0, 2.5, 0.0]
    calls = [10.0, 5.0, 5.0, 2.5, 2.5]  # Heun: predictor, corrector at the next sigma, ...
    assert [step_index(s, sigmas)[0] for s in calls] == [0, 1, 1, 2, 2]


def test_step_index_denoise_below_one_counts_steps_run() -> None:
    full = torch.linspace(14.0, 0.0, 21)
    partial = full[10:]  # denoise 0.5: ComfyUI passes only the tail
    assert step_index(partial[0], partial) == (0, 10)
    assert step_index(partial[4], partial) == (4, 10)


def test_step_from_percent_fallback() -> None:
    percent_sigmas = [10.0 * (1 - k / 10) for k in range(11)]
    assert step_from_percent(10.0, percent_sigmas, 10) == 0
    assert step_from_percent(6.5, percent_sigmas, 10) == 3
    assert step_from_percent(0.0, percent_sigmas, 10) == 9


# --------------------------------------------------------------------------- plan tables


def test_reference_tables_are_the_published_ones() -> None:
    assert REFERENCE_RATIOS == {"sd15_1024": (0.4, 0.0), "sd15_2048": (0.7, 0.3), "sdxl_2048": (0.4, 0.0),
                                "sdxl_4096": (0.7, 0.3), "sdxl_turbo_1024": (0.5, 0.0)}
    assert AGGRESSIVE_STEP == 8


def _ranges(family, h, w, n, **kw):
    plan = resolve_plan(make_config(family, **kw), h, w, n)
    return plan.rad_steps, plan.ca_steps


@pytest.mark.parametrize(("family", "hw", "kw", "rad", "ca"), [
    ("sd1", (128, 128), {}, range(20), range(0)),                     # SD1.5 1024 px
    ("sd1", (64, 64), {}, range(20), range(0)),                       # 512 px: the reference still patches
    ("sd2", (256, 256), {}, range(35), range(15)),                    # 2048 px
    ("sd1", (256, 200), {}, range(20), range(0)),                     # the smaller side decides
    ("sdxl", (256, 256), {}, range(8), range(8, 20)),                 # aggressive
    ("sdxl", (256, 256), {"non_aggressive_model": True}, range(0), range(20)),   # inpainting / playground
    ("sdxl", (512, 512), {}, range(15), range(35)),                   # 4096 px
    ("sdxl", (512, 384), {}, range(8), range(8, 20)),
    ("sdxl_turbo", (128, 128), {}, range(0), range(25)),
])
def test_plan_rows_for_50_steps(family, hw, kw, rad, ca) -> None:
    assert _ranges(family, *hw, 50, **kw) == (rad, ca)


@pytest.mark.parametrize("n", [1, 4, 7, 10, 20, 25, 30, 49, 50, 64])
def test_plan_rounding_matches_reference_expressions(n) -> None:
    assert _ranges("sdxl", 128, 128, n) == (range(int(8 / 50 * n)), range(int(8 / 50 * n), int(n * 0.4)))
    assert _ranges("sd1", 128, 128, n) == (range(int(n * 0.4)), range(0))
    assert _ranges("sdxl_turbo", 64, 64, n)[1] == range(int(n * 0.5))


def test_turbo_single_step_never_runs_raunet() -> None:
    assert _ranges("sdxl_turbo", 64, 64, 1) == (range(0), range(0))
    assert _ranges("sdxl_turbo", 64, 64, 4) == (range(0), range(2))


def test_overrides_and_switches() -> None:
    assert _ranges("sd1", 64, 64, 10, t1_ratio=0.2, t2_ratio=0.5) == (range(2), range(5))
    assert _ranges("sdxl", 64, 64, 10, aggressive=False) == (range(0), range(4))
    assert _ranges("sdxl", 600, 600, 50, aggressive=True) == (range(8), range(8, 35))
    assert _ranges("sd1", 64, 64, 10, raunet=False) == (range(0), range(0))
    assert resolution_band("sdxl", 511, 900) == "sdxl_2048"


def test_describe_names_blocks_and_steps() -> None:
    config = make_config("sdxl")
    text = describe(config, resolve_plan(config, 256, 256, 50))
    assert "RAD input 6 steps 0-7" in text and "output 5 steps 8-19" in text and "(aggressive)" in text


@pytest.mark.parametrize(("kw", "message"), [
    ({"rad_block": 4}, "rad_block 4"),
    ({"ca_block": 3}, "ca_block 3"),
    ({"ca_block": 12}, "ca_block 12"),
    ({"t1_ratio": 1.5}, "t1_ratio"),
    ({"upscale_mode": "lanczos"}, "upscale_mode"),
])
def test_invalid_combinations_refused_before_sampling(kw, message) -> None:
    with pytest.raises(ValueError, match=message):
        make_config("sd1", **kw)


def test_turbo_has_no_t2_stage() -> None:
    with pytest.raises(ValueError, match="sdxl_turbo"):
        make_config("sdxl_turbo", t2_ratio=0.3)


def test_custom_blocks_pair_outputs() -> None:
    assert make_config("sd1").ca_output == 8 and make_config("sdxl").ca_output == 5
    assert make_config("sd1", ca_block=7).ca_output == 5
    assert make_config("sd1", ca_after_skip=True).ca_output == 7


# --------------------------------------------------------------------------- detection

SD_FACTS = dict(is_unet=True, model_class="UNetModel", n_input_blocks=12, n_output_blocks=12,
                downsample_blocks=(3, 6, 9), attention_input_blocks=(1, 2, 4, 5, 7, 8), latent_format="SD15")
XL_FACTS = dict(is_unet=True, model_class="UNetModel", n_input_blocks=9, n_output_blocks=9,
                downsample_blocks=(3, 6), attention_input_blocks=(4, 5, 7, 8), context_dim=2048,
                adm_in_channels=2816, in_channels=4, latent_format="SDXL")


def test_detects_families() -> None:
    assert detect(UNetFacts(**SD_FACTS, context_dim=768)).family == "sd1"
    assert detect(UNetFacts(**SD_FACTS, context_dim=1024)).family == "sd2"
    xl = detect(UNetFacts(**XL_FACTS))
    assert xl.family == "sdxl" and xl.layout is SDXL_LAYOUT and not xl.non_aggressive_model
    assert detect(UNetFacts(**{**XL_FACTS, "config_class": "SSD1B"})).family == "sdxl"
    assert detect(UNetFacts(**{**XL_FACTS, "latent_format": "SDXL_Playground_2_5"})).non_aggressive_model
    assert detect(UNetFacts(**{**XL_FACTS, "in_channels": 9})).non_aggressive_model
    assert detect(UNetFacts(**XL_FACTS), "sdxl_turbo").family == "sdxl_turbo"
    assert detect(UNetFacts(**SD_FACTS, context_dim=768), "sd2").layout is SD_LAYOUT


@pytest.mark.parametrize(("facts", "variant", "message"), [
    (dict(is_unet=False, model_class="Flux"), "auto", "Flux is not a UNet"),
    (dict(is_unet=False, model_class="SanaMS"), "auto", "SDXL"),
    ({**XL_FACTS, "config_class": "SDXLRefiner", "n_input_blocks": 12, "context_dim": 1280,
      "adm_in_channels": 2560}, "auto", "refiner"),
    ({**XL_FACTS, "n_input_blocks": 6, "downsample_blocks": (2, 4)}, "auto", "KOALA"),
    (dict(SD_FACTS, context_dim=768), "sdxl", "model_variant=sdxl"),
])
def test_refuses_unsupported_models_with_a_clear_error(facts, variant, message) -> None:
    with pytest.raises(UnsupportedModelError, match=message) as info:
        detect(UNetFacts(**facts), variant)
    assert "Supported" in str(info.value) or "model_variant" in str(info.value)


# --------------------------------------------------------------------------- hooks (fake transformer_options)


def _options(block, step=0, n=10, shape=(1, 4, 32, 32)):
    sigmas = torch.linspace(10.0, 0.0, n + 1)
    return {"block": block, "sigmas": torch.tensor([float(sigmas[step])]), "sample_sigmas": sigmas,
            "original_shape": list(shape)}


def test_pool_and_restore_hooks_follow_the_plan() -> None:
    config = make_config("sd1", t2_ratio=0.3)
    pool, restore = hooks.PoolPatch(config), hooks.RestorePatch(config)
    h = torch.randn(1, 4, 16, 16)
    assert pool(h, _options(("input", 4), step=2)).shape[-2:] == (8, 8)
    assert pool(h, _options(("input", 4), step=3)) is h
    assert pool(h, _options(("input", 5), step=0)) is h
    small, skip = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 16, 16)
    out, hsp = restore(small, skip, _options(("output", 8)))
    assert out.shape[-2:] == (16, 16) and hsp is skip
    assert restore(small, skip, _options(("output", 7)))[0] is small


class _FakeDownsample(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.op = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


def test_downsample_handler_runs_rad_only_on_its_block_and_steps() -> None:
    handler = hooks.DownsampleHandler(make_config("sd1"))
    layer, x = _FakeDownsample(), torch.randn(1, 4, 16, 16)
    options = _options(("input", 3), step=3)  # T1 = int(0.4 * 10) = 4
    options["patches"] = {"forward_timestep_embed_patch": [(_FakeDownsample, handler)]}
    assert handler(layer, x, None, None, options).shape[-2:] == (4, 4)
    late = dict(options, **{k: v for k, v in _options(("input", 3), step=4).items() if k != "block"})
    assert handler(layer, x, None, None, late).shape[-2:] == (8, 8)
    other = dict(options, block=("input", 6))
    assert handler(layer, x, None, None, other).shape[-2:] == (8, 8)


def test_downsample_handler_hands_other_calls_to_the_next_handler() -> None:
    handler = hooks.DownsampleHandler(make_config("sd1"))
    seen = []

    def other(layer, x, *args):
        seen.append(x.shape)
        return x

    options = _options(("input", 6))
    options["patches"] = {"forward_timestep_embed_patch": [(_FakeDownsample, handler), (_FakeDownsample, other)]}
    x = torch.randn(1, 4, 8, 8)
    assert handler(_FakeDownsample(), x, None, None, options) is x and seen


def test_window_hooks_round_trip_and_leave_other_blocks_alone() -> None:
    config = make_config("sd1", seed=1)
    part, merge = hooks.WindowPartitionPatch(config), hooks.WindowMergePatch(config)
    x = torch.randn(2, 16 * 12, 8)
    extra = dict(_options(("output", 10), step=1, shape=(2, 4, 16, 12)), block_index=0,
                 activations_shape=[2, 8, 16, 12])
    q, k, v = part(x, x, x, extra)
    assert q.shape == (8, 48, 8) and k is q and v is q
    torch.testing.assert_close(merge(q, extra), x)
    assert hooks.WINDOW_STATE_KEY not in extra
    extra_mid = dict(extra, block=("middle", 0))
    assert part(x, x, x, extra_mid)[0] is x and merge(x, extra_mid) is x


def test_window_hooks_skip_odd_sizes_when_asked() -> None:
    config = make_config("sd1", odd_window_mode="skip")
    x = torch.randn(1, 9 * 8, 4)
    extra = dict(_options(("input", 1), shape=(1, 4, 9, 8)), activations_shape=[1, 4, 9, 8])
    assert hooks.WindowPartitionPatch(config)(x, x, x, extra)[0] is x


def test_hooks_survive_deepcopy_and_are_recognised() -> None:
    handler = hooks.DownsampleHandler(make_config("sdxl"), [1.0, 0.5, 0.0])
    clone = copy.deepcopy((_FakeDownsample, handler))
    assert hooks.is_ours(clone) and hooks.is_ours(hooks.PoolPatch(make_config("sd1")))
    assert not hooks.is_ours(lambda h, o: h)


# --------------------------------------------------------------------------- node contract


def test_node_inputs_contract() -> None:
    from uniba_pack.nodes import hidiffusion_nodes as nodes

    simple = nodes.HiDiffusionPatch.INPUT_TYPES()["required"]
    assert list(simple) == ["model", "raunet", "msw_msa", "model_variant", "seed"]
    assert simple["model_variant"][0] == ["auto", "sd1", "sd2", "sdxl", "sdxl_turbo"]
    assert simple["raunet"][1]["default"] is True and simple["seed"][1]["default"] == 0
    advanced = nodes.HiDiffusionPatchAdvanced.INPUT_TYPES()["required"]
    assert list(advanced)[:5] == list(simple)
    for cls in (nodes.HiDiffusionPatch, nodes.HiDiffusionPatchAdvanced):
        assert cls.CATEGORY == "UniBA/HiDiffusion" and cls.RETURN_TYPES == ("MODEL",)
    assert set(nodes.NODE_CLASS_MAPPINGS) == {"HiDiffusionPatch", "HiDiffusionPatchAdvanced"}


# --------------------------------------------------------------------------- CLI and benchmark


def test_plan_cli_prints_the_resolved_plan(capsys) -> None:
    from uniba import cli

    assert cli.main(["hidiffusion-plan", "--model", "sdxl", "--size", "2048x2048", "--steps", "50"]) == 0
    assert "RAD input 6 steps 0-7" in capsys.readouterr().out
    assert cli.main(["hidiffusion-plan", "--size", "1000x1001"]) == 2


def test_benchmark_host_free_part_runs(capsys, monkeypatch) -> None:
    from uniba.hidiffusion import bench

    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    assert bench.run(["--sizes", "256", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "256px" in out and "Table 4" in out and "nodes/comfy/unet_benchmark.py --comfyui" in out
    result = bench.attention_times(256, query_slice=256, repeats=1)
    assert result["tokens"] == 1024 and result["flop_ratio"] == 0.25 and result["sliced"]

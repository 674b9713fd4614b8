"""HiDiffusion parity: our patched ComfyUI UNet against the reference ``hidiffusion==0.1.10`` on diffusers.

Tiny SD1.5- and SDXL-shaped UNets share one random weight set (``tests/tiny_unets.py``). The
reference is driven as in its README, one UNet call per step (``_num_timesteps = N``); ours gets the
same inputs plus the sigmas a ComfyUI sampler would pass. The reference's window shifts come from
``torch.rand``; a proxy feeds it the shifts our seed/step/block hash chooses, in block execution
order, so both sides use the same windows. Non-default tables are set by editing the reference's
module-level dicts (the only way the reference offers).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOL = 1e-4
WEIGHT_STD = 0.1


@pytest.fixture(scope="module")
def env(comfy_host):
    pytest.importorskip("diffusers")
    reference = pytest.importorskip("hidiffusion.hidiffusion")
    import tiny_unets

    nodes = __import__(comfy_host.pack_module.__name__ + ".nodes.comfy.hidiffusion", fromlist=["x"])
    models = {}

    def model(kind: str):
        if kind not in models:
            unet = tiny_unets.diffusers_unet(kind, std=WEIGHT_STD)
            models[kind] = (unet, tiny_unets.comfy_patcher(kind, unet))
        return models[kind]

    return types.SimpleNamespace(ref=reference, tu=tiny_unets, nodes=nodes, model=model)


class _RandProxy(types.ModuleType):
    """Stands in for ``torch`` inside the reference module: ``rand`` pops prepared values."""

    def __init__(self, values: list[float]) -> None:
        super().__init__("torch")
        self.values = values

    def __getattr__(self, name: str):
        return getattr(torch, name)

    def rand(self, *args, **kwargs) -> torch.Tensor:
        return torch.tensor([self.values.pop(0)])


def _draw_order(kind: str, layout) -> list[tuple[str, int, int]]:
    order = []
    for block_kind, index in layout.msw_blocks:
        depth = 1 if kind == "sd15" else 2  # SDXL's top attention level has two transformer blocks
        order += [(block_kind, index, b) for b in range(depth)]
    return order


_REFERENCE_STATE = ("timestep", "max_timestep", "T1_ratio", "T1", "T1_start", "T1_end", "aggressive_raunet",
                    "ori_stride", "ori_padding", "ori_dilation", "info", "model", "switching_threshold_ratio")


def run_pair(env, kind: str, hw: tuple[int, int], steps: int, *, raunet=True, msw=True, ref_tables=None,
             ref_aggressive=None, ours=None, seed=3, batch=1, only_steps=None):
    """Max |ours - reference| per step over a run of ``steps`` UNet calls (the first ``only_steps`` of them)."""
    ref, tu = env.ref, env.tu
    unet, patcher = env.model("sd15" if kind == "sd15" else "sdxl")
    variant = "sdxl_turbo" if kind == "sdxl_turbo" else "auto"
    clone, detection, _config = env.nodes.patch_model(patcher, model_variant=variant, raunet=raunet, msw_msa=msw,
                                                      seed=seed, **(ours or {}))
    from uniba.hidiffusion import windows

    saved = ({k: dict(v) for k, v in ref.switching_threshold_ratio_dict.items()}, ref.is_aggressive_raunet, ref.torch,
             unet.num_upsamplers)
    draws = [(windows.shift_choice(seed, s, (b, i), bi) + 0.5) / 4
             for s in range(steps) for b, i, bi in _draw_order(kind, detection.layout)] if msw else []
    diffs = []
    try:
        for key, value in (ref_tables or {}).items():
            ref.switching_threshold_ratio_dict[key] = value
        if ref_aggressive is not None:
            ref.is_aggressive_raunet = ref_aggressive
        unet.name_or_path = tu.NAME_OR_PATH[kind]
        unet._num_timesteps = steps
        ref.apply_hidiffusion(unet, apply_raunet=raunet, apply_window_attn=msw)
        proxy = _RandProxy(draws)
        ref.torch = proxy
        g = torch.Generator().manual_seed(11)
        x = torch.randn(batch, 4, *hw, generator=g)
        context = torch.randn(batch, 7, tu.CONTEXT_DIM, generator=g)
        added, y = tu.sdxl_inputs(unet, batch, g) if kind != "sd15" else (None, None)
        sample_sigmas = torch.linspace(14.6, 0.0, steps + 1)
        diffusion_model = clone.model.diffusion_model
        for s in range(steps if only_steps is None else only_steps):
            t = torch.full((batch,), 999.0 - 90 * s)
            options = dict(clone.model_options["transformer_options"])
            options.update(sigmas=torch.full((batch,), float(sample_sigmas[s])), sample_sigmas=sample_sigmas)
            with torch.no_grad():
                extra = {"added_cond_kwargs": added} if added is not None else {}
                expected = unet(x, t, encoder_hidden_states=context, **extra).sample
                got = diffusion_model(x, timesteps=t, context=context, y=y, transformer_options=options)
            diffs.append((got - expected).abs().max().item())
        if only_steps is None:
            assert not proxy.values, "the reference drew a different number of window shifts"
    finally:
        ref.switching_threshold_ratio_dict.clear()
        ref.switching_threshold_ratio_dict.update(saved[0])
        ref.is_aggressive_raunet, ref.torch = saved[1], saved[2]
        ref.remove_hidiffusion(unet)
        unet.num_upsamplers = saved[3]  # apply_hidiffusion adds 12 and remove_hidiffusion keeps them
        for module in unet.modules():  # the reference's per-module counters outlive remove_hidiffusion
            for name in _REFERENCE_STATE:
                module.__dict__.pop(name, None)
    return diffs


CASES = {
    # SD1.5, reference row sd15_1024 (RAD steps 0-1 of 5), MSW-MSA every step, CFG-style batch of 2
    "sd15_1024_row": dict(kind="sd15", hw=(32, 32), steps=5, batch=2, only_steps=3),
    # pool/bicubic path (the sd15_2048 row's T2 stage) on a non-square latent
    "sd15_t2_non_square": dict(kind="sd15", hw=(24, 40), steps=4, ours={"t1_ratio": 0.5, "t2_ratio": 0.5},
                               ref_tables={"sd15_1024": {"T1_ratio": 0.5, "T2_ratio": 0.5}}),
    # odd latent: odd top-level windows (bicubic fallback), ceil-mode RAD and pooling
    "sd15_odd": dict(kind="sd15", hw=(33, 41), steps=3, ours={"t2_ratio": 0.4},
                     ref_tables={"sd15_1024": {"T1_ratio": 0.4, "T2_ratio": 0.4}}),
    "sd15_raunet_only": dict(kind="sd15", hw=(32, 32), steps=3, msw=False),
    "sd15_msw_only": dict(kind="sd15", hw=(32, 32), steps=2, raunet=False),
    # SDXL row sdxl_2048, aggressive: RAD on step 0 (int(8/50*7) = 1), pool/bicubic on step 1 (int(0.4*7) = 2)
    "sdxl_2048_aggressive": dict(kind="sdxl", hw=(32, 32), steps=7, only_steps=3),
    # SDXL rows sdxl_4096 (T1 0.7, T2 0.3, non-aggressive) emulated at a small size
    "sdxl_4096_row": dict(kind="sdxl", hw=(32, 32), steps=4,
                          ours={"t1_ratio": 0.7, "t2_ratio": 0.3, "aggressive": False},
                          ref_tables={"sdxl_2048": {"T1_ratio": 0.7, "T2_ratio": 0.3}}, ref_aggressive=False,
                          only_steps=3),
    # odd level-1 size (17x23) on a non-square latent
    "sdxl_odd_non_square": dict(kind="sdxl", hw=(34, 46), steps=3, ours={"aggressive": False, "t2_ratio": 0.4},
                                ref_tables={"sdxl_2048": {"T1_ratio": 0.4, "T2_ratio": 0.4}}, ref_aggressive=False),
    # SDXL-Turbo table: pool/bicubic on steps < int(0.5 * 4) = 2, no RAD
    "sdxl_turbo": dict(kind="sdxl_turbo", hw=(32, 32), steps=4, only_steps=3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(env, case) -> None:
    spec = dict(CASES[case])
    diffs = run_pair(env, spec.pop("kind"), spec.pop("hw"), spec.pop("steps"), **spec)
    print(f"hidiffusion parity {case}: max abs diff per step {[f'{d:.1e}' for d in diffs]}")
    assert max(diffs) <= TOL, f"{case}: per-step max abs diff {diffs}"


def test_negative_control_detects_wrong_schedule(env) -> None:
    """A port with the wrong table (here: no pool stage where the reference pools) is caught by the test."""
    diffs = run_pair(env, "sd15", (32, 32), 5, ours={"t2_ratio": 0.0},
                     ref_tables={"sd15_1024": {"T1_ratio": 0.4, "T2_ratio": 0.4}}, only_steps=1)
    assert diffs[0] > 1e-2, diffs
    diffs = run_pair(env, "sdxl", (32, 32), 7, ours={"aggressive": False}, only_steps=1)
    assert diffs[0] > 1e-2, diffs


def test_tables_agree_with_installed_reference(env) -> None:
    from uniba.hidiffusion.plan import AGGRESSIVE_STEP, REFERENCE_RATIOS

    ref = env.ref
    table = {k: (v["T1_ratio"], v["T2_ratio"]) for k, v in ref.switching_threshold_ratio_dict.items()}
    assert table == REFERENCE_RATIOS
    assert ref.aggressive_step == AGGRESSIVE_STEP and ref.is_aggressive_raunet is True
    assert ref.playground_is_aggressive_raunet is False and ref.inpainting_is_aggressive_raunet is False

"""HiDiffusion inside a real ComfyUI: KSampler runs, clone isolation, detection on real model objects, ControlNet."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LATENT = 16  # 128 px for the tiny model: RAD gives 4x4, MSW-MSA 8x8 windows


@pytest.fixture(scope="module")
def env(comfy_host):
    import tiny_unets

    nodes = __import__(comfy_host.pack_module.__name__ + ".nodes.hidiffusion_nodes", fromlist=["x"])
    adapter = __import__(comfy_host.pack_module.__name__ + ".nodes.comfy.hidiffusion", fromlist=["x"])
    torch.manual_seed(0)
    sd = tiny_unets.comfy_patcher("sd15", tiny_unets.diffusers_unet("sd15", std=0.1))
    return types.SimpleNamespace(host=comfy_host, tu=tiny_unets, nodes=nodes, adapter=adapter, sd=sd)


def _cond(seed: int = 1) -> tuple[list, list]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 7, 32, generator=g), {}]], [[torch.randn(1, 7, 32, generator=g), {}]]


def _ksampler(env, model, positive=None, negative=None, sampler="euler_ancestral", steps=3, seed=5):
    if positive is None:
        positive, negative = _cond()
    latent = {"samples": torch.zeros(1, 4, LATENT, LATENT)}
    node = env.host.nodes["KSampler"]()
    (out,) = node.sample(model, seed, steps, 3.0, sampler, "normal", positive, negative, latent, denoise=1.0)
    return out["samples"]


def _patched(env, model=None, **kw):
    node = env.nodes.HiDiffusionPatchAdvanced() if kw else env.nodes.HiDiffusionPatch()
    return node.patch(model or env.sd, **kw)[0]


def test_ksampler_runs_patched_model_deterministically(env) -> None:
    patched = _patched(env)
    first = _ksampler(env, patched)
    assert torch.isfinite(first).all()
    assert torch.equal(first, _ksampler(env, patched))                     # window shifts are not random
    assert not torch.equal(first, _ksampler(env, env.sd))                  # the patch does something
    other_seed = _patched(env, seed=9, model_variant="auto", raunet=False)
    assert not torch.equal(_ksampler(env, other_seed, steps=1), _ksampler(env, _patched(env, raunet=False, seed=0),
                                                                          steps=1))


def test_second_order_sampler_runs(env) -> None:
    out = _ksampler(env, _patched(env), sampler="heun", steps=2)
    assert torch.isfinite(out).all() and out.shape == (1, 4, LATENT, LATENT)


def test_original_model_untouched_after_clone_runs_and_after_an_exception(env) -> None:
    before = _ksampler(env, env.sd)
    options_before = repr(env.sd.model_options)
    patched = _patched(env)
    _ksampler(env, patched)
    assert torch.equal(_ksampler(env, env.sd), before)

    comfy_sample = __import__("comfy.sample", fromlist=["x"])
    positive, negative = _cond()
    noise = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(3))

    def interrupt(step, *_args):
        if step == 1:
            raise KeyboardInterrupt("cancel mid-sampling")

    with pytest.raises(KeyboardInterrupt):
        comfy_sample.sample(patched, noise, 4, 3.0, "euler", "normal", positive, negative,
                            torch.zeros_like(noise), callback=interrupt, disable_pbar=True, seed=0)
    assert torch.equal(_ksampler(env, env.sd), before)
    assert repr(env.sd.model_options) == options_before
    downsample = env.sd.model.diffusion_model.input_blocks[3][0].op
    assert downsample.stride == (2, 2) and downsample.dilation == (1, 1)


def test_detection_on_real_models_and_refusals(env) -> None:
    _clone, detection, config = env.adapter.patch_model(env.sd)
    assert detection.family == "sd1" and config.rad == 3
    xl = env.tu.comfy_patcher("sdxl", env.tu.diffusers_unet("sdxl"), latent_format="SDXL_Playground_2_5")
    _clone, detection, config = env.adapter.patch_model(xl)
    assert detection.family == "sdxl" and detection.non_aggressive_model
    with pytest.raises(ValueError, match="model_variant=sdxl expects"):
        env.nodes.HiDiffusionPatch().patch(env.sd, model_variant="sdxl")
    with pytest.raises(ValueError, match="rad_block 4"):
        env.nodes.HiDiffusionPatchAdvanced().patch(env.sd, rad_block=4)

    class NotUNet(torch.nn.Module):
        pass

    fake = types.SimpleNamespace(get_model_object=lambda name: NotUNet() if name == "diffusion_model" else None,
                                 model=None)
    with pytest.raises(env.nodes.UnsupportedModelError, match="not a UNet"):
        env.adapter.patch_model(fake)


def test_patching_twice_replaces_instead_of_stacking(env) -> None:
    once = _patched(env)
    twice = _patched(env, model=once, raunet=True, msw_msa=True, seed=0, t1_ratio=0.5)
    patches = twice.model_options["transformer_options"]["patches"]
    for name in ("forward_timestep_embed_patch", "input_block_patch", "output_block_patch", "attn1_patch",
                 "attn1_output_patch"):
        assert len(patches[name]) == 1, name
    assert env.sd.model_options.get("transformer_options", {}).get("patches") is None


def _tiny_controlnet(env):
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    config = env.tu.comfy_unet_config("sd15")
    config.pop("out_channels")
    control_model = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init,
                                               device=torch.device("cpu"), dtype=torch.float32, **config)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in control_model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return comfy.controlnet.ControlNet(control_model, load_device=torch.device("cpu"))


def test_controlnet_hint_is_resized_not_dropped(env, caplog) -> None:
    control = _tiny_controlnet(env)
    positive, negative = _cond()
    hint = torch.rand(1, LATENT * 8, LATENT * 8, 3, generator=torch.Generator().manual_seed(2))
    apply = env.host.nodes["ControlNetApplyAdvanced"]()
    positive, negative = apply.apply_controlnet(positive, negative, control, hint, 1.0, 0.0, 1.0)[:2]

    # RAD and the pool on every step, so every step needs resized residuals
    always = dict(raunet=True, msw_msa=True, seed=0, t1_ratio=1.0, t2_ratio=1.0)
    with caplog.at_level(logging.WARNING):
        plain = _ksampler(env, _patched(env, **always), *_cond(), steps=2)
        caplog.clear()
        with_control = _ksampler(env, _patched(env, **always), positive, negative, steps=2)
        assert not [r for r in caplog.records if "control could not be applied" in r.getMessage()]
        assert not torch.equal(plain, with_control)

        caplog.clear()  # negative control: without the resize, ComfyUI drops the hint with a warning
        _ksampler(env, _patched(env, **always, controlnet_resize=False), positive, negative, steps=1)
        assert any("control could not be applied" in r.getMessage() for r in caplog.records)

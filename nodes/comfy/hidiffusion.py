"""HiDiffusion on ComfyUI's UNet: facts about the model, the engine's hooks on a clone, the host-side benchmark.

The engine (:mod:`uniba.hidiffusion`: plan tables, window schedule, operators, hook callables) knows
nothing of ComfyUI; this module reads what detection needs from a ComfyUI MODEL and registers the
hooks with ComfyUI's patch and wrapper API on ``model.clone()``. Nothing global is patched and the
input model is never modified.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from uniba.hidiffusion import patch as hooks
from uniba.hidiffusion.detect import Detection, UNetFacts, detect
from uniba.hidiffusion.plan import HiDiffusionConfig, make_config, resolve_plan

from . import host

try:  # pragma: no cover - exercised in the integration tier
    import comfy.ldm.modules.attention as comfy_attention
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.patcher_extension as patcher_extension
    import comfy.supported_models
except Exception:  # noqa: BLE001 - not inside a usable ComfyUI
    pass

log = logging.getLogger("uniba.hidiffusion")

PATCH_LISTS = ("forward_timestep_embed_patch", "input_block_patch", "input_block_patch_after_skip",
               "output_block_patch", "attn1_patch", "attn1_output_patch")


def unet_facts(model: Any) -> UNetFacts:
    """Plain facts about a ComfyUI MODEL (``ModelPatcher``) for :func:`uniba.hidiffusion.detect.detect`."""
    host.require_comfyui("HiDiffusion")
    diffusion_model = model.get_model_object("diffusion_model")
    base = getattr(model, "model", None)
    model_config = getattr(base, "model_config", None)
    unet_config = dict(getattr(model_config, "unet_config", {}) or {})
    latent_format = model.get_model_object("latent_format") if base is not None else None
    common = {"model_class": type(diffusion_model).__name__,
              "config_class": type(model_config).__name__ if model_config is not None else "",
              "latent_format": type(latent_format).__name__ if latent_format is not None else ""}
    if not isinstance(diffusion_model, openaimodel.UNetModel):
        return UNetFacts(is_unet=False, **common)
    downsample, attn = [], []
    for i, block in enumerate(diffusion_model.input_blocks):
        if any(isinstance(layer, openaimodel.Downsample) and isinstance(getattr(layer, "op", None), torch.nn.Conv2d)
               for layer in block):
            downsample.append(i)
        if any(isinstance(layer, comfy_attention.SpatialTransformer) for layer in block):
            attn.append(i)
    return UNetFacts(
        is_unet=True, n_input_blocks=len(diffusion_model.input_blocks),
        n_output_blocks=len(diffusion_model.output_blocks), downsample_blocks=tuple(downsample),
        attention_input_blocks=tuple(attn), context_dim=unet_config.get("context_dim"),
        adm_in_channels=unet_config.get("adm_in_channels"),
        in_channels=unet_config.get("in_channels", getattr(diffusion_model, "in_channels", None)), **common)


def _percent_sigmas(model: Any) -> list[float] | None:
    try:
        sampling = model.get_model_object("model_sampling")
        return [float(sampling.percent_to_sigma(k / hooks.FALLBACK_STEPS)) for k in range(hooks.FALLBACK_STEPS + 1)]
    except Exception:  # noqa: BLE001 - the fallback is optional; sample_sigmas is the normal path
        return None


def _remove_previous(clone: Any) -> None:
    """A second HiDiffusion patch replaces the first instead of stacking (pooling twice would break the UNet)."""
    patches = clone.model_options.get("transformer_options", {}).get("patches", {})
    for name in PATCH_LISTS:
        if name in patches:
            patches[name] = [p for p in patches[name] if not hooks.is_ours(p)]
    for wrapper_type in (patcher_extension.WrappersMP.DIFFUSION_MODEL, patcher_extension.WrappersMP.OUTER_SAMPLE):
        clone.remove_wrappers_with_key(wrapper_type, hooks.WRAPPER_KEY)


def patch_model(model: Any, *, model_variant: str = "auto", **options: Any) -> tuple[Any, Detection, HiDiffusionConfig]:
    """Detect the model, validate the options and return a patched clone (the input is left untouched)."""
    detection = detect(unet_facts(model), model_variant)
    config = make_config(detection.family, non_aggressive_model=detection.non_aggressive_model, **options)
    percent = _percent_sigmas(model)

    clone = model.clone()
    _remove_previous(clone)
    existing = clone.model_options.get("transformer_options", {}).get("patches", {})
    if config.raunet:
        for class_type, _handler in existing.get("forward_timestep_embed_patch", []):
            if issubclass(openaimodel.Downsample, class_type):
                log.warning("HiDiffusion: another node already patches Downsample layers; it runs first and "
                            "the RAU-Net downsampler may not apply. Put HiDiffusionPatch before it.")
        clone.set_model_forward_timestep_embed_patch((openaimodel.Downsample, hooks.DownsampleHandler(config, percent)))
        pool = hooks.PoolPatch(config, percent)
        if config.ca_after_skip:
            clone.set_model_input_block_patch_after_skip(pool)
        else:
            clone.set_model_input_block_patch(pool)
        clone.set_model_output_block_patch(hooks.RestorePatch(config))
        if config.controlnet_resize:
            clone.add_wrapper_with_key(
                patcher_extension.WrappersMP.DIFFUSION_MODEL, hooks.WRAPPER_KEY,
                hooks.ControlNetWrapper(config, percent, detection.layout.n_input_blocks,
                                        detection.layout.downsample_blocks))
    if config.msw_msa:
        clone.set_model_attn1_patch(hooks.WindowPartitionPatch(config, percent))
        clone.set_model_attn1_output_patch(hooks.WindowMergePatch(config))
    clone.add_wrapper_with_key(patcher_extension.WrappersMP.OUTER_SAMPLE, hooks.WRAPPER_KEY, hooks.PlanLogger(config))
    log.info("HiDiffusion: %s detected (%s)", detection.family, detection.reason)
    return clone, detection, config


SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None, "use_linear_in_transformer": False,
    "context_dim": 768, "use_temporal_resblock": False, "use_temporal_attention": False,
}


def benchmark_unet_forward(px: int = 1024, repeats: int = 1, steps: int = 50) -> dict:
    """Seconds for one forward of ComfyUI's SD1.5 UNet (random weights): vanilla, patched early and late step.

    Run by ``nodes/comfy/unet_benchmark.py``, which boots ComfyUI's modules first.
    """
    host.require_comfyui("The HiDiffusion UNet benchmark")
    device = host.torch_device()
    config = comfy.supported_models.SD15(SD15_UNET_CONFIG)
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in base.diffusion_model.modules():
            for name, p in module.named_parameters(recurse=False):
                norm = isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and name == "weight"
                p.copy_((1.0 if norm else 0.0) + 0.02 * torch.randn(p.shape, generator=g))
    base.diffusion_model.to(device)
    patcher = host.wrap_model(base, device, device)
    clone, _detection, hd_config = patch_model(patcher)
    side = px // 8
    x = torch.randn(1, 4, side, side, generator=g).to(device)
    context = torch.randn(1, 77, 768, generator=g).to(device)
    sample_sigmas = torch.linspace(14.6, 0.0, steps + 1)
    plan = resolve_plan(hd_config, side, side, steps)
    late = plan.rad_steps.stop + 1 if plan.rad_steps.stop < steps else steps - 1

    def forward(options: dict) -> None:
        with torch.no_grad():
            base.diffusion_model(x, timesteps=torch.tensor([500.0], device=device), context=context,
                                 transformer_options=options)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def patched(step: int) -> dict:
        options = dict(clone.model_options["transformer_options"])
        options.update(sigmas=sample_sigmas[step:step + 1], sample_sigmas=sample_sigmas)
        return options

    cases = {"vanilla_s": lambda: forward({}), "early_s": lambda: forward(patched(0)),
             "late_s": lambda: forward(patched(late))}
    with torch.no_grad():  # warm-up on a small latent (allocator, thread pool), not timed
        base.diffusion_model(x[..., :16, :16], timesteps=torch.tensor([500.0], device=device), context=context)
    best = {k: float("inf") for k in cases}
    for _ in range(max(1, repeats)):
        for key, fn in cases.items():  # interleaved, so load changes hit all three alike
            start = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - start)
    best["late_step"] = late
    return best

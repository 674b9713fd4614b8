"""HiDiffusion nodes: RAU-Net + MSW-MSA for SD1.x/SD2.x/SDXL UNets, on a clone, through ComfyUI's hooks.

The engine (plan tables, window schedule, operators, hooks) is in :mod:`uniba.hidiffusion`; this
module only reads facts about the model, builds the config and registers the hooks on
``model.clone()``. Nothing global is patched and the input model is never modified.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from uniba.hidiffusion import patch as hooks
from uniba.hidiffusion.detect import Detection, UNetFacts, UnsupportedModelError, detect
from uniba.hidiffusion.plan import (
    ODD_WINDOW_MODES,
    UPSCALE_MODES,
    VARIANTS,
    HiDiffusionConfig,
    make_config,
    resolve_plan,
)

from . import host

log = logging.getLogger("uniba.hidiffusion")

CATEGORY = "UniBA/HiDiffusion"
OPENAIMODEL = "comfy.ldm.modules.diffusionmodules.openaimodel"
PATCH_LISTS = ("forward_timestep_embed_patch", "input_block_patch", "input_block_patch_after_skip",
               "output_block_patch", "attn1_patch", "attn1_output_patch")


def unet_facts(model: Any) -> UNetFacts:
    """Plain facts about a ComfyUI MODEL (``ModelPatcher``) for :func:`uniba.hidiffusion.detect.detect`."""
    openaimodel = host.comfy_module(OPENAIMODEL)
    attention = host.comfy_module("comfy.ldm.modules.attention")
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
        if any(isinstance(layer, attention.SpatialTransformer) for layer in block):
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
    extension = host.comfy_module("comfy.patcher_extension")
    for wrapper_type in (extension.WrappersMP.DIFFUSION_MODEL, extension.WrappersMP.OUTER_SAMPLE):
        clone.remove_wrappers_with_key(wrapper_type, hooks.WRAPPER_KEY)


def patch_model(model: Any, *, model_variant: str = "auto", **options: Any) -> tuple[Any, Detection, HiDiffusionConfig]:
    """Detect the model, validate the options and return a patched clone (the input is left untouched)."""
    detection = detect(unet_facts(model), model_variant)
    config = make_config(detection.family, non_aggressive_model=detection.non_aggressive_model, **options)
    openaimodel = host.comfy_module(OPENAIMODEL)
    extension = host.comfy_module("comfy.patcher_extension")
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
                extension.WrappersMP.DIFFUSION_MODEL, hooks.WRAPPER_KEY,
                hooks.ControlNetWrapper(config, percent, detection.layout.n_input_blocks,
                                        detection.layout.downsample_blocks))
    if config.msw_msa:
        clone.set_model_attn1_patch(hooks.WindowPartitionPatch(config, percent))
        clone.set_model_attn1_output_patch(hooks.WindowMergePatch(config))
    clone.add_wrapper_with_key(extension.WrappersMP.OUTER_SAMPLE, hooks.WRAPPER_KEY, hooks.PlanLogger(config))
    log.info("HiDiffusion: %s detected (%s)", detection.family, detection.reason)
    return clone, detection, config


def _run(model: Any, model_variant: str, **options: Any) -> tuple[Any]:
    try:
        clone, _detection, _config = patch_model(model, model_variant=model_variant, **options)
    except UnsupportedModelError:
        raise
    except ValueError as exc:
        raise ValueError(f"HiDiffusion: {exc}") from exc
    return (clone,)


_COMMON_INPUTS = {
    "model": ("MODEL", {"tooltip": "An SD1.x, SD2.x or SDXL model (SDXL-Turbo: choose model_variant)."}),
    "raunet": ("BOOLEAN", {"default": True, "tooltip": "RAU-Net: shrink deep features on early steps "
                                                      "(prevents duplicated objects at high resolution)."}),
    "msw_msa": ("BOOLEAN", {"default": True, "tooltip": "MSW-MSA: 2x2 shifted-window self-attention in the "
                                                       "top level (faster; every step)."}),
    "model_variant": (list(VARIANTS), {"default": "auto", "tooltip": "auto detects SD1/SD2/SDXL from the UNet; "
                                        "sdxl_turbo selects the Turbo table (cannot be detected)."}),
    "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                     "tooltip": "Seed of the window shifts (they depend only on seed, step and block)."}),
}


class HiDiffusionPatch:
    """HiDiffusion (RAU-Net + MSW-MSA) with the reference's tables for the model and resolution."""

    DESCRIPTION = ("HiDiffusion (arXiv 2311.17528): generate SD1.5 at 1024-2048 px and SDXL at 2048 px without "
                   "duplicated objects, faster. Patches a copy of the model; exact to the reference tables. "
                   "Works best with stochastic samplers (euler_ancestral, dpmpp_sde, ddim with eta).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802 - ComfyUI API
        return {"required": dict(_COMMON_INPUTS)}

    def patch(self, model, raunet=True, msw_msa=True, model_variant="auto", seed=0):
        return _run(model, model_variant, raunet=raunet, msw_msa=msw_msa, seed=int(seed))


class HiDiffusionPatchAdvanced:
    """HiDiffusion with its tunables: thresholds, blocks, upscale mode, after-skip, odd sizes, ControlNet."""

    DESCRIPTION = ("HiDiffusion with tunables. -1 means the reference value for the detected model and "
                   "resolution. Blocks are ComfyUI input-block indices (SD: RAD 3, pool 4; SDXL: RAD 6, pool 4).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802 - ComfyUI API
        required = dict(_COMMON_INPUTS)
        required.update({
            "t1_ratio": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.01,
                                   "tooltip": "Share of steps for the main RAU-Net stage (-1: reference table; "
                                              "SD: RAD, SDXL: pool/bicubic)."}),
            "t2_ratio": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.01,
                                   "tooltip": "Share of steps for the extra stage (-1: reference table; "
                                              "SD: pool/bicubic, SDXL: RAD)."}),
            "sdxl_aggressive": (["auto", "on", "off"], {"default": "auto",
                                "tooltip": "SDXL: RAD for the first 8/50 of steps, then pool/bicubic (reference "
                                           "default below 4096 px except inpainting/Playground)."}),
            "rad_block": ("INT", {"default": -1, "min": -1, "max": 11,
                                  "tooltip": "Input block whose Downsample becomes the dilated stride-4 conv."}),
            "ca_block": ("INT", {"default": -1, "min": -1, "max": 11,
                                 "tooltip": "Input block after which features are pooled (restored on the way up)."}),
            "ca_after_skip": ("BOOLEAN", {"default": False,
                                          "tooltip": "Pool after the skip connection is stored (Deep Shrink style; "
                                                     "the reference pools before)."}),
            "upscale_mode": (list(UPSCALE_MODES), {"default": "bicubic"}),
            "odd_window_mode": (list(ODD_WINDOW_MODES), {"default": "bicubic",
                                "tooltip": "Odd feature sizes: resize for the windows (reference) or skip MSW-MSA."}),
            "controlnet_resize": ("BOOLEAN", {"default": True,
                                              "tooltip": "Resize ControlNet residuals to the RAU-Net feature sizes."}),
        })
        return {"required": required}

    def patch(self, model, raunet=True, msw_msa=True, model_variant="auto", seed=0, t1_ratio=-1.0, t2_ratio=-1.0,
              sdxl_aggressive="auto", rad_block=-1, ca_block=-1, ca_after_skip=False, upscale_mode="bicubic",
              odd_window_mode="bicubic", controlnet_resize=True):
        return _run(
            model, model_variant, raunet=raunet, msw_msa=msw_msa, seed=int(seed),
            t1_ratio=None if t1_ratio < 0 else float(t1_ratio), t2_ratio=None if t2_ratio < 0 else float(t2_ratio),
            aggressive={"auto": None, "on": True, "off": False}[sdxl_aggressive],
            rad_block=None if rad_block < 0 else int(rad_block), ca_block=None if ca_block < 0 else int(ca_block),
            ca_after_skip=bool(ca_after_skip), upscale_mode=upscale_mode, odd_window_mode=odd_window_mode,
            controlnet_resize=bool(controlnet_resize))


SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None, "use_linear_in_transformer": False,
    "context_dim": 768, "use_temporal_resblock": False, "use_temporal_attention": False,
}


def benchmark_unet_forward(px: int = 1024, repeats: int = 1, steps: int = 50) -> dict:
    """Seconds for one forward of ComfyUI's SD1.5 UNet (random weights): vanilla, patched early and late step.

    Used by ``python -m uniba bench hidiffusion`` (in a child process that has ComfyUI on its path).
    """
    supported_models = host.comfy_module("comfy.supported_models")
    model_patcher = host.comfy_module("comfy.model_patcher")
    device = host.torch_device()
    config = supported_models.SD15(SD15_UNET_CONFIG)
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in base.diffusion_model.modules():
            for name, p in module.named_parameters(recurse=False):
                norm = isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and name == "weight"
                p.copy_((1.0 if norm else 0.0) + 0.02 * torch.randn(p.shape, generator=g))
    base.diffusion_model.to(device)
    patcher = model_patcher.ModelPatcher(base, load_device=device, offload_device=device)
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


NODE_CLASS_MAPPINGS: dict[str, type] = {
    "HiDiffusionPatch": HiDiffusionPatch,
    "HiDiffusionPatchAdvanced": HiDiffusionPatchAdvanced,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "HiDiffusionPatch": "HiDiffusion Patch (RAU-Net + MSW-MSA)",
    "HiDiffusionPatchAdvanced": "HiDiffusion Patch (Advanced)",
}

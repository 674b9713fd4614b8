"""HiDiffusion nodes: RAU-Net + MSW-MSA for SD1.x/SD2.x/SDXL UNets, on a clone, through ComfyUI's hooks.

Declarations and calls: the engine (plan tables, window schedule, operators, hooks) is
:mod:`uniba.hidiffusion`; :mod:`.comfy.hidiffusion` reads the model and registers the hooks on a clone.
"""

from __future__ import annotations

from typing import Any

from uniba.hidiffusion.detect import UnsupportedModelError
from uniba.hidiffusion.plan import ODD_WINDOW_MODES, UPSCALE_MODES, VARIANTS

from .comfy import hidiffusion

CATEGORY = "UniBA/HiDiffusion"


def _run(model: Any, model_variant: str, **options: Any) -> tuple[Any]:
    try:
        clone, _detection, _config = hidiffusion.patch_model(model, model_variant=model_variant, **options)
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
    SEARCH_ALIASES = ["UniBA", "HiDiffusion", "RAU-Net", "MSW-MSA", "high resolution", "SDXL 2048", "hires fix"]
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
    SEARCH_ALIASES = ["UniBA", "HiDiffusion", "RAU-Net", "MSW-MSA", "high resolution", "advanced"]
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
            "upscale_mode": (list(UPSCALE_MODES), {"default": "bicubic",
                             "tooltip": "How pooled features are resized back up (the reference uses bicubic)."}),
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


NODE_CLASS_MAPPINGS: dict[str, type] = {
    "HiDiffusionPatch": HiDiffusionPatch,
    "HiDiffusionPatchAdvanced": HiDiffusionPatchAdvanced,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "HiDiffusionPatch": "HiDiffusion (UniBA)",
    "HiDiffusionPatchAdvanced": "HiDiffusion Advanced (UniBA)",
}

"""Sana DiT nodes: the model loader (a native ComfyUI MODEL), Flow-DPM-Solver, sigmas, latent, one-node sampler.

Declarations and calls: the engine (:mod:`uniba.sana`) loads and samples, :mod:`.comfy.sana` turns
the DiT into a ComfyUI MODEL and runs ComfyUI's sampling with the engine's samplers.
"""

from __future__ import annotations

from typing import Any

import torch

from uniba.devices import WEIGHT_DTYPE_CHOICES, choose_weight_dtypes
from uniba.sana import checks
from uniba.sana.config import DEFAULT_SHIFT, LATENT_DOWNSCALE, SHIFT_4K, SanaConfig, resolution_presets
from uniba.sana.loader import read_sana_checkpoint
from uniba.sana.sampling import check_shift, flow_sigmas, sample_flow_dpm_solver, sample_flow_euler

from .comfy import host
from .comfy import sana as comfy_sana

CATEGORY = "UniBA/Sana"
RESOLUTION_PRESETS = {"custom": (0, 0), **resolution_presets()}
SAMPLER_FUNCTIONS = {"flow_dpm_solver": sample_flow_dpm_solver, "flow_euler": sample_flow_euler}
SIGMA_KIND = {"flow_dpm_solver": "dpm_solver", "flow_euler": "euler"}


def _diffusion_model_choices() -> list[str]:
    folders = host.list_model_dirs("diffusion_models") + host.list_model_dirs("diffusion_models", "model_index.json")
    return host.list_models("diffusion_models") + [d + "/" for d in sorted(set(folders))]


class SanaDiTLoader:
    """Load a Sana DiT (original .pth/.safetensors or diffusers format) from models/diffusion_models/."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "unet_name": (_diffusion_model_choices(), {"tooltip": "Sana transformer in models/diffusion_models/"}),
            "weight_dtype": (list(WEIGHT_DTYPE_CHOICES), {
                "default": "auto", "tooltip": "auto: fp32 on CPU, bf16 where supported; fp16 is not safe for "
                                             "the bf16 releases; fp8_e4m3fn stores the weights in half of bf16's "
                                             "memory and computes as auto does (SANA-1.5 4.8B on 12 GB; "
                                             "docs/dtypes.md)"}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Sana linear DiT (0.6B/1.6B, 2K/4K, Sana 1.5, Sana-Sprint) as a native MODEL for KSampler and "
                   "SamplerCustom; a file, a diffusers transformer/ or a whole <name>_diffusers folder.")
    SEARCH_ALIASES = ["UniBA", "Sana", "load diffusion model", "DiT", "Sana 1.5", "4K", "Sprint"]

    def load(self, unet_name: str, weight_dtype: str) -> tuple[Any]:
        checkpoint = read_sana_checkpoint(host.model_path("diffusion_models", unet_name.rstrip("/")))
        device = host.torch_device()
        dtype, storage = choose_weight_dtypes(weight_dtype, device, host.dtype_support(device),
                                              stored=checkpoint.stored_dtype)
        return (comfy_sana.load_dit(checkpoint, dtype, storage),)


class FlowDPMSolverSampler:
    """Flow-DPM-Solver (Sana's DPM-Solver++ 2M in lambda = log((1-sigma)/sigma)) for SamplerCustom(Advanced)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {}}

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Sana's Flow-DPM-Solver (DPM-Solver++ 2M on flow sigmas) as a SAMPLER for SamplerCustom(Advanced); "
                   "pair it with Sana Flow Sigmas.")
    SEARCH_ALIASES = ["UniBA", "Sana", "Flow-DPM-Solver", "dpm solver", "sampler"]

    def get_sampler(self) -> tuple[Any]:
        return (comfy_sana.ksampler(sample_flow_dpm_solver),)


class SanaFlowSigmas:
    """Sana's shifted flow sigma grid (diffusers' use_flow_sigmas), descending to 0."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "number of sampling steps"}),
            "shift": ("FLOAT", {"default": DEFAULT_SHIFT, "min": 0.01, "max": 100.0, "step": 0.01,
                                "tooltip": f"{DEFAULT_SHIFT} for 512/1024/2K and Sana 1.5, {SHIFT_4K} for 4K"}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "1 = text to image; below 1 keeps only the last part of the schedule "
                                             "(image to image)"}),
        }}

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = CATEGORY
    DESCRIPTION = "Sana's shifted flow-matching noise schedule for SamplerCustom(Advanced), descending to 0."
    SEARCH_ALIASES = ["UniBA", "Sana", "sigmas", "scheduler", "flow shift"]

    def get_sigmas(self, steps: int, shift: float, denoise: float) -> tuple[torch.Tensor]:
        if denoise <= 0.0:
            return (torch.FloatTensor([]),)
        return (flow_sigmas(steps, shift, denoise=denoise),)


class SanaEmptyLatent:
    """An empty 32-channel latent at 1/32 of the image size, custom or one of Sana's aspect-ratio presets."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "width": ("INT", {"default": 1024, "min": LATENT_DOWNSCALE, "max": 16384, "step": LATENT_DOWNSCALE,
                              "tooltip": "image width in pixels (a multiple of 32); used when preset is 'custom'"}),
            "height": ("INT", {"default": 1024, "min": LATENT_DOWNSCALE, "max": 16384, "step": LATENT_DOWNSCALE,
                               "tooltip": "image height in pixels (a multiple of 32); used when preset is 'custom'"}),
            "preset": (list(RESOLUTION_PRESETS), {"default": "custom",
                                                  "tooltip": "Sana's 1024/2048/4096 px aspect-ratio bins; "
                                                             "'custom' uses width and height"}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096, "tooltip": "images per run"}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Empty Sana latent: 32 channels at 1/32 of the image size (stock Empty Latent Image makes "
                   "SD's 4-channel 1/8 latent, which Sana cannot use).")
    SEARCH_ALIASES = ["UniBA", "Sana", "empty latent", "resolution", "aspect ratio"]

    def generate(self, width: int, height: int, preset: str, batch_size: int,
                 unique_id: str | None = None) -> tuple[dict[str, torch.Tensor]]:
        if preset != "custom":
            if preset not in RESOLUTION_PRESETS:
                raise ValueError(f"unknown Sana resolution preset {preset!r}; choose one of the listed ones or "
                                 "'custom'")
            width, height = RESOLUTION_PRESETS[preset]
        device = host.intermediate_device()
        # refused with the figures before torch.zeros tries (16384 px x 4096 would ask for 137 GB)
        shape = checks.check_sana_empty_latent(batch_size, width, height, host.free_memory(device))
        if note := checks.latent_size_note(width, height, shape):  # said, not silently floored
            host.warn(f"SanaEmptyLatent: {note}", unique_id)
        return ({"samples": torch.zeros(shape, device=device)},)


class SanaSampler:
    """Sana with its defaults in one node: Flow-DPM-Solver 20 steps (or Flow-Euler), CFG 4.5, release shift."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "from Sana DiT Loader"}),
            "positive": ("CONDITIONING", {"tooltip": "Sana Text Encode with use_chi on"}),
            "negative": ("CONDITIONING", {"tooltip": "Sana Text Encode with use_chi off (an empty prompt is fine)"}),
            "latent_image": ("LATENT", {"tooltip": "Sana Empty Latent, or a Sana VAE Encode for image to image"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "start noise"}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 1000,
                              "tooltip": "20 for Flow-DPM-Solver, 28 for Flow-Euler (Sana's defaults)"}),
            "cfg": ("FLOAT", {"default": 4.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "classifier-free guidance (Sana's default 4.5; 1 skips the negative)"}),
            "solver": (list(SAMPLER_FUNCTIONS), {"default": "flow_dpm_solver",
                                                 "tooltip": "flow_dpm_solver (20 steps) or flow_euler (28 steps)"}),
            "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                "tooltip": f"0 = the model's shift ({DEFAULT_SHIFT}, {SHIFT_4K} for 4K, or "
                                           "ModelSamplingSD3's)"}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "1 = text to image; below 1 = image to image from latent_image"}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Sana with its defaults in one node: Flow-DPM-Solver 20 steps (or Flow-Euler 28), CFG 4.5, the "
                   "release's shift, Sana's start noise. KSampler and SamplerCustom also work on the same MODEL.")
    SEARCH_ALIASES = ["UniBA", "Sana", "ksampler", "sampler", "text to image"]

    def sample(self, model: Any, positive: Any, negative: Any, latent_image: dict[str, Any], seed: int, steps: int,
               cfg: float, solver: str, shift: float, denoise: float) -> tuple[dict[str, Any]]:
        comfy_sana.check_model_kind(model, sprint=False, node="Sana Sampler")
        config = comfy_sana.dit_config(model)
        widths = config or SanaConfig()  # what the loaded DiT takes (the release's if the MODEL hides it)
        samples = checks.check_sana_latent(latent_image.get("samples") if isinstance(latent_image, dict) else None,
                                           "latent_image", widths.in_channels)
        for name, conditioning in (("positive", positive), ("negative", negative)):
            checks.check_sana_conditioning_input(conditioning, name, samples.shape[0], channels=widths.caption_channels)
        if config is not None:  # a lower bound against all the device's memory: refused work could never run
            checks.check_sana_sampling(samples, host.total_memory(getattr(model, "load_device", None)),
                                hidden_size=config.hidden_size, mlp_ratio=config.mlp_ratio, cfg=cfg != 1.0)
        if solver not in SAMPLER_FUNCTIONS:
            raise ValueError(f"solver must be one of {', '.join(SAMPLER_FUNCTIONS)}, got {solver!r}")
        out = dict(latent_image)
        if denoise <= 0.0:
            return (out,)
        if shift <= 0.0:
            shift = check_shift(comfy_sana.model_shift(model), "shift (0 = the MODEL's, e.g. ModelSamplingSD3's)")
        sigmas = flow_sigmas(steps, shift, kind=SIGMA_KIND[solver], denoise=denoise)
        out["samples"] = comfy_sana.sample(model, latent_image, sample_fn=SAMPLER_FUNCTIONS[solver], sigmas=sigmas,
                                           positive=positive, negative=negative, cfg=cfg, seed=seed,
                                           text_to_image=denoise >= 1.0 and not samples.any())
        out.pop("downscale_ratio_spacial", None)
        return (out,)


NODE_CLASS_MAPPINGS: dict[str, type] = {
    "SanaDiTLoader": SanaDiTLoader,
    "FlowDPMSolverSampler": FlowDPMSolverSampler,
    "SanaFlowSigmas": SanaFlowSigmas,
    "SanaSampler": SanaSampler,
    "SanaEmptyLatent": SanaEmptyLatent,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "SanaDiTLoader": "Sana DiT Loader (UniBA)",
    "FlowDPMSolverSampler": "Sana Flow-DPM-Solver (UniBA)",
    "SanaFlowSigmas": "Sana Flow Sigmas (UniBA)",
    "SanaSampler": "Sana Sampler (UniBA)",
    "SanaEmptyLatent": "Sana Empty Latent (UniBA)",
}

"""Inf-DiT nodes: load a checkpoint from ``models/infdit/``; upscale an IMAGE block-wise (UniBA).

Thin: the engine (:mod:`uniba.infdit`) does the work; ComfyUI is reached only through :mod:`.comfy.host`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from uniba.checkpoint import stored_dtype
from uniba.devices import DTYPE_CHOICES, choose_dtype
from uniba.guards import check_image
from uniba.infdit import InfDiTConfig, Sampling, load_infdit, plan_upscale, resolve_sampling, upscale
from uniba.infdit.sampling import DEFAULT_STEPS, SIGMA_MAX, SIGMA_MIN
from uniba.infdit.upscale import check_upscale_arguments

from .comfy import host

CATEGORY = "UniBA/Inf-DiT"
SCALES = ["4", "2", "8", "16"]
BLOCK_BATCHES = ["auto"] + [str(n) for n in range(1, 17)]
OFFLOAD = ["auto", "on", "off"]
DTYPES = list(DTYPE_CHOICES)
COLOR_MATCH = ["none", "wavelet"]


def sampling_for(config: InfDiTConfig, sampler: Any, sigmas: torch.Tensor | None, steps: int) -> Sampling:
    """The sampling a run of the node makes, for the node and for the plan route alike: a wired ComfyUI
    SAMPLER (unwrapped by the adapter into a k-diffusion function for this model's EDM denoiser) or the
    reference's Heun, on the wired schedule or the reference's Karras schedule of ``steps`` steps."""
    if sampler is not None:
        sampler = host.k_diffusion_sampler(sampler, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                                           sigma_data=config.sigma_data)
    return resolve_sampling(sampler, sigmas, int(steps))


class InfDiTLoader:
    """Loads an Inf-DiT checkpoint (the release ``.pt`` or a converted ``.safetensors``) from models/infdit."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (host.list_models(host.INFDIT_FOLDER), {
                "tooltip": "Inf-DiT checkpoint in models/infdit (mp_rank_00_model_states.pt or a converted file)"}),
            "dtype": (DTYPES, {"default": "auto", "tooltip": "weight dtype; auto picks bf16 where supported"}),
        }}

    RETURN_TYPES = ("INFDIT_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Load Inf-DiT (4x pixel-space upscaler with Unidirectional Block Attention)."
    SEARCH_ALIASES = ["UniBA", "Inf-DiT", "infdit", "upscale model", "load upscaler"]

    def load(self, model_name: str, dtype: str = "auto"):
        path = host.model_path(host.INFDIT_FOLDER, model_name)
        device = host.torch_device()
        chosen = choose_dtype(dtype, device, host.dtype_support(device), stored=stored_dtype(path))
        with host.loading("Inf-DiT weights") as progress:
            model = load_infdit(path, dtype=chosen, progress=progress)
        model.source_file = os.path.realpath(path)  # lets the plan route tell whether this file is loaded
        return (host.wrap_model(model, device, host.offload_device()),)


class InfDiTUpscale:
    """Upscales an image 2x/4x/8x/16x with Inf-DiT, block batch by block batch within the free memory."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("INFDIT_MODEL", {"tooltip": "from Load Inf-DiT"}),
            "image": ("IMAGE", {"tooltip": "the image to upscale (any size; a batch is upscaled image by image)"}),
            "scale": (SCALES, {"default": "4", "tooltip": "4x is native; 2x uses the reference's trick; "
                                                       "8x and 16x chain passes"}),
            "steps": ("INT", {"default": DEFAULT_STEPS, "min": 1, "max": 200,
                              "tooltip": "EDM Heun steps (20 = the reference, 39 model calls); ignored when sigmas "
                                         "is connected"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "start noise (drawn on the CPU: the same image on every card)"}),
            "block_batch": (BLOCK_BATCHES, {"default": "auto", "tooltip": "n x n blocks of 128 px per forward; "
                                                                           "auto = largest that fits free memory"}),
            "offload_cache": (OFFLOAD, {"default": "auto", "tooltip": "keep the KV cache in host RAM"}),
            "color_match": (COLOR_MATCH, {"default": "none", "tooltip": "none = reference; wavelet keeps the "
                                                                         "input's low frequencies (colours)"}),
        }, "optional": {
            "sampler": ("SAMPLER", {"tooltip": "any ComfyUI sampler (KSamplerSelect); default: the reference's EDM "
                                               "Heun. Fast preset, as close to a 200-step solution as Heun 20 (39 "
                                               "evaluations) in 16: SamplerDPMPP_3M_SDE with eta 0 + KarrasScheduler "
                                               "steps 16, sigma_max 40, sigma_min 0.002, rho 7. Ancestral/SDE "
                                               "samplers draw their noise from the seed on the CPU, so the result is "
                                               "the same on every card and block batch"}),
            "sigmas": ("SIGMAS", {"tooltip": "noise schedule, replaces steps: KarrasScheduler with sigma_max 40, "
                                             "sigma_min 0.002, rho 7 is the reference's. Default: that schedule with "
                                             "`steps` steps"}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = CATEGORY
    DESCRIPTION = "Inf-DiT upscaling with UniBA block-wise inference; memory grows with the image side."
    SEARCH_ALIASES = ["UniBA", "Inf-DiT", "upscale", "upscaler", "4x", "super resolution", "4K", "8K"]

    def upscale(self, model, image: torch.Tensor, scale: str = "4", steps: int = DEFAULT_STEPS, seed: int = 0,
                block_batch: str = "auto", offload_cache: str = "auto", color_match: str = "none",
                sampler=None, sigmas: torch.Tensor | None = None, unique_id: str | None = None):
        image = check_image(image, "image", channels_last=True, value_range=(0.0, 1.0), channels=(3, 4))
        scale, seed, steps = check_upscale_arguments(scale, seed, steps)
        with host.engine_warnings(unique_id):  # e.g. a schedule that stops above 0: in the log and the browser
            return self._upscale(model, image, scale, steps, seed, block_batch, offload_cache, color_match, sampler,
                                 sigmas, unique_id)

    def _upscale(self, model, image: torch.Tensor, scale: int, steps: int, seed: int, block_batch: str,
                 offload_cache: str, color_match: str, sampler, sigmas: torch.Tensor | None, unique_id: str | None):
        module = model.model
        device = host.torch_device()
        lr_h, lr_w = int(image.shape[1]), int(image.shape[2])
        # the one plan of this run: the progress total, the memory request, the batches and the sampling
        plan = plan_upscale(module.config, lr_h, lr_w, int(scale), free_bytes=host.free_memory(device, patcher=model),
                            sampling=sampling_for(module.config, sampler, sigmas, steps), block_batch=block_batch,
                            offload_cache=offload_cache, dtype=module.dtype, weights_resident=host.is_loaded(model))
        plan.check_fits()
        module = host.load_to_device(model, memory_required=max(0, plan.peak_bytes - plan.weights_bytes))
        progress = host.Progress(image.shape[0] * plan.total_batches, node_id=unique_id, desc="Inf-DiT")
        lr = image[..., :4].movedim(-1, 1).to(torch.float32) * 2 - 1
        try:
            out = upscale(module, lr, plan, seed=int(seed), progress=progress, color_match=color_match,
                          is_oom=host.is_oom)
        finally:
            progress.close()
            host.soft_empty_cache()
        result = ((out + 1) / 2).clamp(0, 1).movedim(1, -1)
        return (result.to(host.intermediate_device(), torch.float32),)


NODE_CLASS_MAPPINGS = {"InfDiTLoader": InfDiTLoader, "InfDiTUpscale": InfDiTUpscale}
NODE_DISPLAY_NAME_MAPPINGS = {"InfDiTLoader": "Load Inf-DiT (UniBA)", "InfDiTUpscale": "Inf-DiT Upscale (UniBA)"}

"""Sana-Sprint nodes (sCM sampler, its schedule, the embedded guidance) and the whole-pipeline-folder loader.

Declarations and calls: the schedule and the sampler are the engine's (:mod:`uniba.sana.sprint`); the
MODEL of a Sprint file is the ordinary Sana MODEL (:mod:`.comfy.sana`), which samples in flow time and
reads the guidance from the conditioning.
"""

from __future__ import annotations

from typing import Any

import torch

from uniba.devices import DTYPE_CHOICES, WEIGHT_DTYPE_CHOICES
from uniba.sana.config import SPRINT_GUIDANCE
from uniba.sana.loader import pipeline_parts
from uniba.sana.sprint import DEFAULT_STEPS, INTERMEDIATE_TIMESTEPS, MAX_TIMESTEPS, sample_scm, sprint_sigmas

from .comfy import host
from .comfy import sana as comfy_sana
from .sana_nodes import SanaDiTLoader
from .sana_text_vae_nodes import TEXT_ENCODER_TYPE, load_text_encoder_handle, load_vae

CATEGORY = "UniBA/Sana"
MAX_STEPS = 4  # the released models are distilled for 1-4 steps
NO_FP16 = "auto: bf16 where supported, else fp32 (never fp16, which overflows), as in its own loader"


class SanaSprintSampler:
    """The sCM sampler of Sana-Sprint as a SAMPLER for SamplerCustom / SamplerCustomAdvanced."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {}}

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Sana-Sprint's sCM sampler (diffusers SCMScheduler): predicts the image, then re-noises it to the "
                   "next time with fresh noise from the seed. Use with Sana Sprint Sigmas and CFG 1.")
    SEARCH_ALIASES = ["UniBA", "Sana", "Sprint", "sCM", "consistency", "sampler", "few steps"]

    def get_sampler(self) -> tuple[Any]:
        return (comfy_sana.ksampler(sample_scm),)


class SanaSprintSigmas:
    """The release's 1-4 step TrigFlow schedule (SCMScheduler) as flow-time SIGMAS for a Sprint MODEL."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "a Sana-Sprint MODEL (Sana DiT Loader or Sana Pipeline Loader)"}),
            "steps": ("INT", {"default": DEFAULT_STEPS, "min": 1, "max": MAX_STEPS,
                              "tooltip": "1-4; the release's default is 2"}),
            "max_timesteps": ("FLOAT", {"default": MAX_TIMESTEPS, "min": 0.01, "max": MAX_TIMESTEPS, "step": 0.0001,
                                        "tooltip": f"first TrigFlow time ({MAX_TIMESTEPS} = pure noise, as "
                                                   "diffusers' SCMScheduler)"}),
            "intermediate_timesteps": ("FLOAT", {
                "default": INTERMEDIATE_TIMESTEPS, "min": 0.01, "max": MAX_TIMESTEPS, "step": 0.01,
                "tooltip": f"the middle TrigFlow time of a 2-step run (the release's {INTERMEDIATE_TIMESTEPS}); "
                           "other step counts are evenly spaced and ignore it"}),
        }}

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Sana-Sprint's schedule: TrigFlow times from max_timesteps to 0 (through 1.3 for 2 steps), as the "
                   "flow-time sigmas the Sprint MODEL samples in. Pair with Sana Sprint Sampler.")
    SEARCH_ALIASES = ["UniBA", "Sana", "Sprint", "sigmas", "scheduler", "TrigFlow"]

    def get_sigmas(self, model: Any, steps: int, max_timesteps: float,
                   intermediate_timesteps: float) -> tuple[torch.Tensor]:
        comfy_sana.check_model_kind(model, sprint=True, node="Sana Sprint Sigmas")
        return (sprint_sigmas(steps, max_timesteps, intermediate_timesteps),)


class SanaSprintGuidance:
    """Sets Sana-Sprint's embedded guidance on a conditioning (Sprint has no CFG: SamplerCustom's cfg stays 1)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "conditioning": ("CONDITIONING", {"tooltip": "the positive prompt from Sana Text Encode"}),
            "guidance": ("FLOAT", {"default": SPRINT_GUIDANCE, "min": 0.0, "max": 30.0, "step": 0.1,
                                   "tooltip": f"embedded guidance scale (the release's {SPRINT_GUIDANCE}); used "
                                              f"as {SPRINT_GUIDANCE} when this node is left out"}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Sana-Sprint's embedded guidance (the model was distilled with it; there is no negative prompt "
                   "and no CFG). Default: the release's 4.5.")
    SEARCH_ALIASES = ["UniBA", "Sana", "Sprint", "guidance", "flux guidance"]

    def apply(self, conditioning: list, guidance: float) -> tuple[list]:
        return ([[tensor, {**options, "guidance": float(guidance)}] for tensor, options in conditioning],)


def _pipeline_choices() -> list[str]:
    return [d + "/" for d in host.list_model_dirs("diffusion_models", "model_index.json")]


class SanaPipelineLoader:
    """A whole diffusers Sana or Sana-Sprint pipeline folder: MODEL, text encoder and VAE in one node."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "pipeline_name": (_pipeline_choices(), {
                "tooltip": "a <name>_diffusers folder in models/diffusion_models/ (model_index.json, transformer/, "
                           "text_encoder/, tokenizer/, vae/), regular Sana or Sana-Sprint"}),
            "weight_dtype": (list(WEIGHT_DTYPE_CHOICES), {"default": "auto", "tooltip": "the DiT's dtype, as in "
                                                                                        "Sana DiT Loader"}),
            "text_encoder_dtype": (list(DTYPE_CHOICES), {"default": "auto", "tooltip": "Gemma-2's dtype; "
                                                                                      + NO_FP16}),
            "vae_dtype": (list(DTYPE_CHOICES), {"default": "auto", "tooltip": "the DC-AE's dtype; " + NO_FP16}),
        }}

    RETURN_TYPES = ("MODEL", TEXT_ENCODER_TYPE, "VAE")
    RETURN_NAMES = ("model", "text_encoder", "vae")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a whole <name>_diffusers folder (Sana, Sana 1.5 or Sana-Sprint) in one node: the same MODEL, "
                   "text encoder and VAE as the three separate Sana loaders, with their dtype choices and checks.")
    SEARCH_ALIASES = ["UniBA", "Sana", "Sprint", "pipeline", "diffusers folder", "checkpoint loader"]

    def load(self, pipeline_name: str, weight_dtype: str, text_encoder_dtype: str,
             vae_dtype: str) -> tuple[Any, Any, Any]:
        name = pipeline_name.rstrip("/\\")
        parts = pipeline_parts(host.model_path("diffusion_models", name))  # every part checked before reading
        (model,) = SanaDiTLoader().load(name, weight_dtype)
        return (model, load_text_encoder_handle(str(parts.root), text_encoder_dtype),
                load_vae(str(parts.vae), vae_dtype))


NODE_CLASS_MAPPINGS: dict[str, type] = {
    "SanaSprintSampler": SanaSprintSampler,
    "SanaSprintSigmas": SanaSprintSigmas,
    "SanaSprintGuidance": SanaSprintGuidance,
    "SanaPipelineLoader": SanaPipelineLoader,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "SanaSprintSampler": "Sana Sprint Sampler (UniBA)",
    "SanaSprintSigmas": "Sana Sprint Sigmas (UniBA)",
    "SanaSprintGuidance": "Sana Sprint Guidance (UniBA)",
    "SanaPipelineLoader": "Sana Pipeline Loader (UniBA)",
}

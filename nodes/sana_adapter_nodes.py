"""Sana adapter nodes: a checked LoRA loader, the ControlNet loader (applied with the stock Apply ControlNet node)
and perturbed-attention guidance. Stock LoraLoader / LoraLoaderModelOnly also work on a Sana MODEL.

Declarations and calls: the engine (:mod:`uniba.sana.lora`, ``controlnet``, ``pag``) reads and checks,
:mod:`.comfy.sana_adapters` applies through ComfyUI's patch, ControlNet and sampler-function mechanisms.
"""

from __future__ import annotations

from typing import Any

from uniba.checkpoint import stored_dtype
from uniba.devices import DTYPE_CHOICES, choose_dtype
from uniba.sana.controlnet import WIRINGS
from uniba.sana.pag import DEFAULT_LAYERS

from .comfy import host, sana_adapters

CATEGORY = "UniBA/Sana/adapters"


class SanaLoraLoader:
    """Apply a Sana LoRA to a Sana MODEL after checking it fits (family, hidden size, depth)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "a Sana MODEL (Sana DiT Loader, or a LoRA loader after it)"}),
            "lora_name": (host.list_models("loras"), {
                "tooltip": "a Sana LoRA in models/loras/: diffusers/PEFT, kohya (lora_unet_), OneTrainer "
                           "(lora_transformer_) or LyCORIS-named LoRA layers"}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                         "tooltip": "multiplies the LoRA (1 = as trained; negative removes it)"}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Applies a Sana LoRA through ComfyUI's patches after checking it was made for this model "
                   "(other families and Sana sizes are refused; keys that fit no layer are named). Alphas from "
                   "the file (.alpha keys or diffusers metadata) are honoured.")
    SEARCH_ALIASES = ["UniBA", "Sana", "LoRA", "lora loader", "adapter"]

    def load(self, model: Any, lora_name: str, strength_model: float, unique_id: str | None = None) -> tuple[Any]:
        lora = sana_adapters.read_checked_lora(model, host.model_path("loras", lora_name))
        if strength_model == 0:
            return (model,)
        return (sana_adapters.apply_lora(model, lora, strength_model, unique_id),)


class SanaControlNetLoader:
    """Load a Sana ControlNet (original .pth or diffusers) as a CONTROL_NET for the stock Apply ControlNet node."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "control_net_name": (host.list_models("controlnet"), {
                "tooltip": "a Sana ControlNet in models/controlnet/ (e.g. Sana_1600M_1024px_BF16_ControlNet_HED.pth "
                           "or a diffusers SanaControlNetModel .safetensors)"}),
            "weight_dtype": (list(DTYPE_CHOICES), {
                "default": "auto", "tooltip": "auto: fp32 on CPU, bf16 where supported (as the DiT loader)"}),
            "wiring": (list(WIRINGS), {
                "default": "diffusers", "tooltip": "diffusers: as diffusers' SanaControlNetPipeline (tested equal); "
                                                   "nvlabs: as the NVlabs code the weights were trained with "
                                                   "(original .pth only; docs/sana-adapters.md)"}),
        }}

    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Sana ControlNet (HED) as a CONTROL_NET: connect it to the stock 'Apply ControlNet' node with "
                   "the Sana VAE, a control image, strength and start/end percent.")
    SEARCH_ALIASES = ["UniBA", "Sana", "ControlNet", "controlnet loader", "HED"]

    def load(self, control_net_name: str, weight_dtype: str, wiring: str = "diffusers") -> tuple[Any]:
        path = host.model_path("controlnet", control_net_name)
        device = host.torch_device()
        dtype = choose_dtype(weight_dtype, device, host.dtype_support(device), stored=stored_dtype(path))
        return (sana_adapters.load_control_net(path, dtype, wiring),)


class SanaPAG:
    """Perturbed-attention guidance for a Sana MODEL."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL", {"tooltip": "a Sana MODEL"}),
            "scale": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                "tooltip": "PAG strength (diffusers' pag_scale; 0 turns it off)"}),
            "applied_layers": ("STRING", {"default": DEFAULT_LAYERS,
                                          "tooltip": "block numbers whose self-attention is perturbed, comma "
                                                     "separated (the 1600M release uses 8)"}),
            "adaptive_scale": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.0001,
                                         "tooltip": "lowers the scale as sampling goes on: scale - adaptive_scale "
                                                    "x (1000 - t); 0 keeps it constant"}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Perturbed-attention guidance on a Sana MODEL: one more model evaluation per step with identity "
                   "self-attention in the chosen blocks, pushed away from (as diffusers' SanaPAGPipeline).")
    SEARCH_ALIASES = ["UniBA", "Sana", "PAG", "perturbed attention guidance", "guidance"]

    def patch(self, model: Any, scale: float, applied_layers: str, adaptive_scale: float) -> tuple[Any]:
        return (sana_adapters.pag_model(model, scale, applied_layers, adaptive_scale),)


NODE_CLASS_MAPPINGS: dict[str, type] = {
    "SanaLoraLoader": SanaLoraLoader,
    "SanaControlNetLoader": SanaControlNetLoader,
    "SanaPAG": SanaPAG,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "SanaLoraLoader": "Sana LoRA Loader (UniBA)",
    "SanaControlNetLoader": "Sana ControlNet Loader (UniBA)",
    "SanaPAG": "Sana PAG (UniBA)",
}

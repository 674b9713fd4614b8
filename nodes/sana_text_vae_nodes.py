"""Sana text encoder (Gemma-2 + complex human instruction) and DC-AE nodes.

* ``SanaTextEncoderLoader`` / ``SanaTextEncode``: CONDITIONING ``[[emb (B, 300, 2304), {"attention_mask": (B, 300)}]]``;
  the encoder is wrapped in ComfyUI's model manager, which loads it for encoding and offloads it after.
* ``SanaVAELoader`` returns a VAE (ComfyUI's type inside ComfyUI, see :mod:`.comfy.sana`);
  ``SanaVAEDecode`` / ``SanaVAEEncode`` accept any DC-AE VAE and run the exact tiler
  (:mod:`uniba.dcae.tiling`): the one-pass result at any tile size, tiles as large as the free memory
  allows, out-of-memory retries with smaller tiles, progress per tile, Cancel between tiles.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from uniba.dcae.loader import load_dcae
from uniba.devices import DTYPE_CHOICES, choose_dtype
from uniba.guards import check_text
from uniba.sana.checks import SOURCE_KEY
from uniba.sana.text_encoder import ENCODE_WORK_BYTES, SanaTextEncoder, encode_prompt, load_text_encoder

from .comfy import host
from .comfy import sana as comfy_sana

CATEGORY = "UniBA/Sana"
DTYPES = list(DTYPE_CHOICES)
# "auto" never picks fp16 for these two: Gemma-2's activations and the DC-AE's overflow it (black/NaN images)
NO_FP16 = (torch.bfloat16, torch.float32)
TEXT_ENCODER_TYPE = "SANA_TEXT_ENCODER"


class SanaTextEncoderHandle:
    """What flows through a SANA_TEXT_ENCODER socket: the managed Gemma-2 model and its tokenizer."""

    def __init__(self, patcher: Any, tokenizer: Any, source: str) -> None:
        self.patcher = patcher
        self.tokenizer = tokenizer
        self.source = source

    def model_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.patcher.model.state_dict().values())


def _text_encoder_choices() -> list[str]:
    folders = host.list_model_dirs("text_encoders")
    inside = tuple(d + sep for d in folders for sep in ("/", "\\"))
    files = [f for f in host.list_models("text_encoders")
             if f.lower().endswith((".safetensors", ".sft")) and not f.startswith(inside)]
    return folders + files


class SanaTextEncoderLoader:
    """Gemma-2-2B for Sana: a Hugging Face folder or ComfyUI's single-file gemma_2_2b (Lumina 2)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model_name": (_text_encoder_choices(), {
                "tooltip": "models/text_encoders/: a gemma-2-2b-it folder, or the single-file gemma_2_2b "
                           "(with embedded tokenizer) that ComfyUI uses for Lumina 2"}),
            "dtype": (DTYPES, {"default": "auto", "tooltip": "auto: bf16 where supported, else fp32 (never fp16: "
                                                             "Gemma-2 overflows it and gives black images)"}),
        }}

    RETURN_TYPES = (TEXT_ENCODER_TYPE,)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads Gemma-2-2B for Sana prompts (transformers, eager attention with logit soft-capping)."
    SEARCH_ALIASES = ["UniBA", "Sana", "Gemma", "Gemma-2", "text encoder", "clip loader"]

    def load(self, model_name: str, dtype: str) -> tuple[SanaTextEncoderHandle]:
        return (load_text_encoder_handle(host.model_path("text_encoders", model_name.rstrip("/\\")), dtype),)


def load_text_encoder_handle(path: str, dtype: str) -> SanaTextEncoderHandle:
    """Gemma-2 from a folder, a single file or a whole Sana pipeline folder, managed by the host (every loader)."""
    device = host.text_encoder_device()
    weight_dtype = choose_dtype(dtype, device, host.dtype_support(device), supported=NO_FP16)
    with host.loading("Gemma-2 weights") as progress:
        encoder = load_text_encoder(path, dtype=weight_dtype, device="cpu", progress=progress)
    patcher = host.wrap_model(encoder.model, load_device=device, offload=host.offload_device())
    return SanaTextEncoderHandle(patcher, encoder.tokenizer, path)


class SanaTextEncode:
    """Prompt -> Sana CONDITIONING with the 300-token attention mask."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "text_encoder": (TEXT_ENCODER_TYPE, {"tooltip": "from Sana Gemma-2 Loader"}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "the prompt"}),
            "use_chi": ("BOOLEAN", {"default": True, "tooltip": "Prefix the complex human instruction (on for the "
                                                                "positive prompt, off for the negative)"}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Encodes a prompt with Gemma-2 as Sana does: the complex human instruction + 300 selected tokens "
                   "for the positive prompt; plain 300 tokens (use_chi off) for the negative.")
    SEARCH_ALIASES = ["UniBA", "Sana", "prompt", "text encode", "Gemma"]

    def encode(self, text_encoder: SanaTextEncoderHandle, text: str, use_chi: bool) -> tuple[list]:
        check_text(text, "text")  # before the encoder is moved to the device
        host.check_interrupt()
        gemma = host.load_to_device(text_encoder.patcher, memory_required=ENCODE_WORK_BYTES)
        try:
            encoder = SanaTextEncoder(model=gemma, tokenizer=text_encoder.tokenizer,
                                      source=text_encoder.source)
            embeddings, mask = encode_prompt(encoder, [text], use_chi=bool(use_chi))
        finally:
            host.offload(text_encoder.patcher)
        out = host.intermediate_device()
        # the encoder's name travels with the embeddings, so a width the DiT cannot take is blamed on it
        options = {"attention_mask": mask.to(out), SOURCE_KEY: os.path.basename(str(text_encoder.source))}
        return ([[embeddings.float().to(out), options]],)


# --------------------------------------------------------------------------- VAE

class SanaVAELoader:
    """The Sana DC-AE f32c32 (sana-1.0 / 1.1) from models/vae/, efficientvit or diffusers layout."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "vae_name": (host.list_models("vae"), {"tooltip": "models/vae/: dc-ae-f32c32-sana-1.x (model.safetensors "
                                                             "or the -diffusers diffusion_pytorch_model.safetensors)"}),
            "dtype": (DTYPES, {"default": "auto", "tooltip": "auto: bf16 where supported, else fp32 (auto never "
                                                             "picks fp16 for the DC-AE)"}),
        }}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads the Sana DC-AE (32x, 32 channels) as a ComfyUI VAE. VAE Decode, VAE Decode (Tiled) and "
                   "'Sana VAE Decode' all give the same exact image within your memory, 4K included.")
    SEARCH_ALIASES = ["UniBA", "Sana", "DC-AE", "vae loader", "autoencoder"]

    def load(self, vae_name: str, dtype: str) -> tuple[Any]:
        return (load_vae(host.model_path("vae", vae_name), dtype),)


def load_vae(path: str, dtype: str) -> Any:
    """The DC-AE of a file or a diffusers (pipeline) folder as a VAE, with the VAE loader's dtype rule."""
    device = host.vae_device()
    weight_dtype = choose_dtype(dtype, device, host.dtype_support(device), supported=NO_FP16)
    with host.loading("DC-AE weights") as progress:
        return comfy_sana.make_vae(load_dcae(path, dtype=weight_dtype, progress=progress))


class SanaVAEDecode:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "vae": ("VAE", {"tooltip": "a DC-AE from Sana DC-AE Loader"}),
            "samples": ("LATENT", {"tooltip": "a Sana latent (32 channels)"}),
            "tile_size": ("INT", {"default": 0, "min": 0, "max": 16384, "step": 32,
                                  "tooltip": "Largest tile edge in pixels; 0 = as large as the free memory allows. "
                                             "Speed and memory only: the image is the same at every tile size"}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Exact tiled DC-AE decode: the same image as a one-pass decode at any tile size and free memory "
                   "(attention sums over the whole image, convolutions with exact halos); retries smaller tiles "
                   "when out of memory.")
    SEARCH_ALIASES = ["UniBA", "Sana", "DC-AE", "vae decode", "tiled decode"]

    def decode(self, vae: Any, samples: dict, tile_size: int, unique_id: str | None = None) -> tuple[torch.Tensor]:
        return (comfy_sana.decode_images(vae, samples["samples"], tile_size, node_id=unique_id),)


class SanaVAEEncode:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"vae": ("VAE", {"tooltip": "a DC-AE from Sana DC-AE Loader"}),
                             "image": ("IMAGE", {"tooltip": "the image to encode"})},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = "DC-AE encode (unscaled latent), exact-tiled like the decoder for large images."
    SEARCH_ALIASES = ["UniBA", "Sana", "DC-AE", "vae encode", "image to image"]

    def encode(self, vae: Any, image: torch.Tensor, unique_id: str | None = None) -> tuple[dict]:
        return ({"samples": comfy_sana.encode_images(vae, image, node_id=unique_id)},)


NODE_CLASS_MAPPINGS: dict[str, type] = {
    "SanaTextEncoderLoader": SanaTextEncoderLoader,
    "SanaTextEncode": SanaTextEncode,
    "SanaVAELoader": SanaVAELoader,
    "SanaVAEDecode": SanaVAEDecode,
    "SanaVAEEncode": SanaVAEEncode,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "SanaTextEncoderLoader": "Sana Gemma-2 Loader (UniBA)",
    "SanaTextEncode": "Sana Text Encode (UniBA)",
    "SanaVAELoader": "Sana DC-AE Loader (UniBA)",
    "SanaVAEDecode": "Sana VAE Decode (UniBA)",
    "SanaVAEEncode": "Sana VAE Encode (UniBA)",
}

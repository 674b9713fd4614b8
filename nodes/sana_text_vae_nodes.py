"""Sana text encoder (Gemma-2 + complex human instruction) and DC-AE nodes.

* ``SanaTextEncoderLoader`` / ``SanaTextEncode``: CONDITIONING ``[[emb (B, 300, 2304), {"attention_mask": (B, 300)}]]``;
  the encoder is wrapped in ComfyUI's model manager, which loads it for encoding and offloads it after.
* ``SanaVAELoader`` returns a standard ComfyUI ``VAE``: ``comfy.sd.VAE`` cannot *detect* a DC-AE
  from its keys (the diffusers layout is taken for the Hunyuan refiner VAE, the efficientvit
  layout is not recognised), but the class represents one once its model and ratios are set, so
  a subclass is built here. Stock VAEDecode/VAEEncode then run our tiling policy,
  VAEDecodeTiled/VAEEncodeTiled run ComfyUI's. Headless, the loader returns :class:`SanaVAE`.
* ``SanaVAEDecode`` / ``SanaVAEEncode`` accept either and hold the tiling policy: tiled from
  2048 px up, 1024 px tiles with blended overlaps, tile size from free memory, out-of-memory
  retries with smaller tiles, progress per tile, Cancel between tiles.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from uniba.dcae.tiling import DEFAULT_TILE_PX, activation_bytes_per_pixel

from . import host

CATEGORY = "UniBA/Sana"
DTYPES = ["auto", "bf16", "fp16", "fp32"]
TEXT_ENCODER_TYPE = "SANA_TEXT_ENCODER"


# --------------------------------------------------------------------------- text encoder

class GemmaContainer(torch.nn.Module):
    """Plain module around transformers' Gemma2Model for ComfyUI's ModelPatcher, which assigns
    ``model.device`` (a read-only property on transformers models)."""

    def __init__(self, gemma: torch.nn.Module) -> None:
        super().__init__()
        self.gemma = gemma


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
            "dtype": (DTYPES, {"default": "auto"}),
        }}

    RETURN_TYPES = (TEXT_ENCODER_TYPE,)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads Gemma-2-2B for Sana prompts (transformers, eager attention with logit soft-capping)."

    def load(self, model_name: str, dtype: str) -> tuple[SanaTextEncoderHandle]:
        from uniba.sana.text_encoder import load_text_encoder

        path = host.model_path("text_encoders", model_name.rstrip("/\\"))
        device = host.text_encoder_device()
        # "auto" never picks fp16: Gemma-2's activations overflow it (black/NaN images in the forks)
        weight_dtype = host.choose_dtype(dtype, device, supported=(torch.bfloat16, torch.float32))
        encoder = load_text_encoder(path, dtype=weight_dtype, device="cpu")
        patcher = host.wrap_model(GemmaContainer(encoder.model), load_device=device, offload=host.offload_device())
        return (SanaTextEncoderHandle(patcher, encoder.tokenizer, path),)


class SanaTextEncode:
    """Prompt -> Sana CONDITIONING with the 300-token attention mask."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "text_encoder": (TEXT_ENCODER_TYPE,),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True}),
            "use_chi": ("BOOLEAN", {"default": True, "tooltip": "Prefix the complex human instruction (on for the "
                                                                "positive prompt, off for the negative)"}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Encodes a prompt with Gemma-2 as Sana does: the complex human instruction + 300 selected tokens "
                   "for the positive prompt; plain 300 tokens (use_chi off) for the negative.")

    def encode(self, text_encoder: SanaTextEncoderHandle, text: str, use_chi: bool) -> tuple[list]:
        from uniba.sana.text_encoder import SanaTextEncoder, encode_prompt

        host.check_interrupt()
        container = host.load_to_device(text_encoder.patcher, memory_required=256 * 1024**2)
        try:
            encoder = SanaTextEncoder(model=container.gemma, tokenizer=text_encoder.tokenizer,
                                      source=text_encoder.source)
            embeddings, mask = encode_prompt(encoder, [text], use_chi=bool(use_chi))
        finally:
            host.offload(text_encoder.patcher)
        out = host.intermediate_device()
        return ([[embeddings.float().to(out), {"attention_mask": mask.to(out)}]],)


# --------------------------------------------------------------------------- VAE

class SanaVAE:
    """Headless stand-in for the ComfyUI VAE: the DC-AE and its (headless) patcher."""

    def __init__(self, dcae: Any, patcher: Any) -> None:
        self.dcae = dcae
        self.patcher = patcher

    def decode(self, samples: torch.Tensor, vae_options: dict | None = None) -> torch.Tensor:
        return decode_images(self, samples)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_images(self, pixels)


def _dcae_of(vae: Any) -> Any:
    dcae = getattr(vae, "dcae", None)
    if dcae is None:
        raise ValueError("This VAE is not a Sana DC-AE: load the DC-AE with 'Sana VAE Loader' "
                         "(dc-ae-f32c32-sana-1.x in models/vae/).")
    return dcae


def _prepare_model(vae: Any, out_pixels: int, batch: int) -> tuple[Any, int]:
    """Load the DC-AE on its device through the model manager; return it and the activation budget."""
    dcae = _dcae_of(vae)
    need = int(activation_bytes_per_pixel(dcae.config.decoder_widths, dcae.weight_dtype) * batch
               * min(out_pixels, DEFAULT_TILE_PX**2))
    model = host.load_to_device(vae.patcher, memory_required=need)
    return model, host.free_memory(vae.patcher.load_device)


def decode_images(vae: Any, samples: torch.Tensor, tile_size: int = 0, node_id: str | None = None) -> torch.Tensor:
    """LATENT samples (unscaled) -> IMAGE (B, H, W, 3) in [0, 1] under the tiling policy."""
    dcae = _dcae_of(vae)
    ratio = dcae.spatial_ratio
    model, budget = _prepare_model(vae, samples.shape[-2] * samples.shape[-1] * ratio * ratio, samples.shape[0])
    progress = host.Progress(1, node_id=node_id, desc="DC-AE decode")
    try:
        images = model.decode(samples, tile_size=tile_size or None, budget_bytes=budget, progress=progress,
                              output_device=host.intermediate_device(), is_oom=host.is_oom)
    finally:
        progress.close()
    return (images * 0.5 + 0.5).clamp(0.0, 1.0).movedim(1, -1)


def _crop_to_multiple(pixels: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = pixels.shape[1], pixels.shape[2]
    nh, nw = h // multiple * multiple, w // multiple * multiple
    if nh == 0 or nw == 0:
        raise ValueError(f"the image is {w}x{h} px; the DC-AE needs at least {multiple}x{multiple}.")
    top, left = (h - nh) // 2, (w - nw) // 2
    return pixels[:, top:top + nh, left:left + nw, :]


def encode_images(vae: Any, pixels: torch.Tensor, tile_size: int = 0, node_id: str | None = None) -> torch.Tensor:
    """IMAGE (B, H, W, C) in [0, 1] -> unscaled latents, center-cropped to multiples of 32 like ComfyUI's VAEs."""
    dcae = _dcae_of(vae)
    pixels = _crop_to_multiple(pixels[..., :3], dcae.spatial_ratio)
    model, budget = _prepare_model(vae, pixels.shape[1] * pixels.shape[2], pixels.shape[0])
    progress = host.Progress(1, node_id=node_id, desc="DC-AE encode")
    try:
        image = pixels.movedim(-1, 1) * 2.0 - 1.0
        return model.encode(image, tile_size=tile_size or None, budget_bytes=budget, progress=progress,
                            output_device=host.intermediate_device(), is_oom=host.is_oom)
    finally:
        progress.close()


@functools.cache
def comfy_vae_class() -> type:
    """A ``comfy.sd.VAE`` subclass holding a DC-AE (built lazily: this module imports without ComfyUI)."""
    sd_module = host.comfy_module("comfy.sd")
    mm = host.comfy_module("comfy.model_management")
    model_patcher = host.comfy_module("comfy.model_patcher")

    class SanaDCAEVAE(sd_module.VAE):
        """ComfyUI VAE around our DC-AE: stock VAE nodes work; VAEDecode/VAEEncode use our tiling policy."""

        def __init__(self, dcae: Any) -> None:
            try:
                # ComfyUI's own defaults for every attribute this version uses: the cheapest branch
                # of its constructor (a pixel-space "VAE"), then everything DC-AE specific is overridden.
                super().__init__(sd={"pixel_space_vae": torch.tensor(1.0)})
            except Exception:  # noqa: BLE001 - a newer ComfyUI without that branch: set the essentials below
                pass
            ratio = dcae.spatial_ratio
            self.dcae = dcae
            self.first_stage_model = dcae
            self.latent_channels = dcae.config.latent_channels
            self.latent_dim = 2
            self.output_channels = 3
            self.downscale_ratio = ratio
            self.upscale_ratio = ratio
            self.process_input = lambda image: image * 2.0 - 1.0
            self.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)
            self.working_dtypes = [torch.bfloat16, torch.float32]
            per_pixel = activation_bytes_per_pixel(dcae.config.decoder_widths, dcae.weight_dtype)
            self.memory_used_decode = lambda shape, dtype: per_pixel * shape[0] * shape[2] * shape[3] * ratio * ratio
            self.memory_used_encode = lambda shape, dtype: per_pixel * shape[0] * shape[2] * shape[3]
            for name, value in (("disable_offload", False), ("not_video", False), ("crop_input", True),
                                ("extra_1d_channel", None), ("downscale_index_formula", None),
                                ("upscale_index_formula", None)):
                if not hasattr(self, name):
                    setattr(self, name, value)
            self.device = dcae.weight_device if getattr(self, "device", None) is None else self.device
            self.vae_dtype = dcae.weight_dtype
            self.output_device = mm.intermediate_device()
            self.patcher = model_patcher.ModelPatcher(dcae, load_device=mm.vae_device(),
                                                      offload_device=mm.vae_offload_device())
            self.device = self.patcher.load_device

        def decode(self, samples_in: torch.Tensor, vae_options: dict | None = None) -> torch.Tensor:
            return decode_images(self, samples_in)

        def encode(self, pixel_samples: torch.Tensor) -> torch.Tensor:
            return encode_images(self, pixel_samples)

        def get_sd(self) -> dict:
            return self.dcae.state_dict()

    return SanaDCAEVAE


class SanaVAELoader:
    """The Sana DC-AE f32c32 (sana-1.0 / 1.1) from models/vae/, efficientvit or diffusers layout."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "vae_name": (host.list_models("vae"), {"tooltip": "models/vae/: dc-ae-f32c32-sana-1.x (model.safetensors "
                                                             "or the -diffusers diffusion_pytorch_model.safetensors)"}),
            "dtype": (DTYPES, {"default": "auto"}),
        }}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads the Sana DC-AE (32x, 32 channels) as a ComfyUI VAE. Use 'Sana VAE Decode' for tiled "
                   "4K decoding within your memory.")

    def load(self, vae_name: str, dtype: str) -> tuple[Any]:
        from uniba.dcae.loader import load_dcae

        path = host.model_path("vae", vae_name)
        device = host.vae_device()
        weight_dtype = host.choose_dtype(dtype, device, supported=(torch.bfloat16, torch.float32))
        dcae = load_dcae(path, dtype=weight_dtype)
        if host.IN_COMFYUI:
            return (comfy_vae_class()(dcae),)
        return (SanaVAE(dcae, host.wrap_model(dcae, load_device=device)),)


class SanaVAEDecode:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "vae": ("VAE",),
            "samples": ("LATENT",),
            "tile_size": ("INT", {"default": 0, "min": 0, "max": 16384, "step": 32,
                                  "tooltip": "Tile edge in pixels; 0 = automatic (tiled from 2048 px up, 1024 px "
                                             "tiles, smaller when memory is short)"}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY
    DESCRIPTION = "DC-AE decode with blended 1024 px tiles from 2048 px up; retries smaller tiles when out of memory."

    def decode(self, vae: Any, samples: dict, tile_size: int, unique_id: str | None = None) -> tuple[torch.Tensor]:
        return (decode_images(vae, samples["samples"], tile_size, node_id=unique_id),)


class SanaVAEEncode:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"vae": ("VAE",), "image": ("IMAGE",)}, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = "DC-AE encode (unscaled latent), tiled like the decoder for large images."

    def encode(self, vae: Any, image: torch.Tensor, unique_id: str | None = None) -> tuple[dict]:
        return ({"samples": encode_images(vae, image, node_id=unique_id)},)


NODE_CLASS_MAPPINGS: dict[str, type] = {
    "SanaTextEncoderLoader": SanaTextEncoderLoader,
    "SanaTextEncode": SanaTextEncode,
    "SanaVAELoader": SanaVAELoader,
    "SanaVAEDecode": SanaVAEDecode,
    "SanaVAEEncode": SanaVAEEncode,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "SanaTextEncoderLoader": "Sana Text Encoder Loader (Gemma-2)",
    "SanaTextEncode": "Sana Text Encode",
    "SanaVAELoader": "Sana VAE Loader (DC-AE)",
    "SanaVAEDecode": "Sana VAE Decode (tiled)",
    "SanaVAEEncode": "Sana VAE Encode (tiled)",
}

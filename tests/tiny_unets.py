"""Tiny SD1.5- and SDXL-shaped UNets for the HiDiffusion tests: one random weight set, two implementations.

``diffusers_unet(kind)`` builds a ``UNet2DConditionModel`` whose module names match the real models
(what the reference ``hidiffusion`` keys on) with random weights; ``comfy_patcher(kind, unet)`` builds
the ComfyUI twin (``supported_models.SD15``/``SDXL`` -> ``BaseModel`` -> ``ModelPatcher``) and copies the
same weights through ComfyUI's own ``unet_to_diffusers`` key map. Needs a booted ComfyUI for the
second part (import only inside integration tests).

Widths are multiples of 32 (ComfyUI hard-codes ``GroupNorm(32, ...)``). The SDXL twin keeps depth 2
at the MSW-MSA level (as real SDXL) and uses depth 1 at the bottom to stay fast; the reference then
needs ``name_or_path`` set to an official id to skip its module-name check.
"""

from __future__ import annotations

import torch

CONTEXT_DIM = 32
TIME_EMBED_DIM = 8       # SDXL add_time_proj width (real: 256)
TEXT_EMBED_DIM = 32      # SDXL pooled text embedding width (real: 1280)
ADM_CHANNELS = TEXT_EMBED_DIM + 6 * TIME_EMBED_DIM

NAME_OR_PATH = {
    "sd15": "runwayml/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sdxl_turbo": "stabilityai/sdxl-turbo",
}


def diffusers_config(kind: str) -> dict:
    if kind == "sd15":
        return dict(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 64, 128, 128),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=CONTEXT_DIM, attention_head_dim=8, norm_num_groups=32)
    return dict(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 1), cross_attention_dim=CONTEXT_DIM, attention_head_dim=8,
        norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM, projection_class_embeddings_input_dim=ADM_CHANNELS)


def comfy_unet_config(kind: str) -> dict:
    common = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, context_dim=CONTEXT_DIM,
                  use_spatial_transformer=True, legacy=False, use_temporal_attention=False,
                  use_temporal_resblock=False, num_heads=8, num_head_channels=-1)
    if kind == "sd15":
        return dict(common, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1] * 9 + [0] * 3,
                    transformer_depth_middle=1, use_linear_in_transformer=False, adm_in_channels=None)
    return dict(common, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 1, 1],
                transformer_depth_output=[0, 0, 0, 2, 2, 2, 1, 1, 1], transformer_depth_middle=1,
                use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=ADM_CHANNELS)


def diffusers_unet(kind: str, seed: int = 0, std: float = 0.2):
    """A diffusers UNet with every weight drawn from N(0, std) (zero-init layers would hide errors)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**diffusers_config("sd15" if kind == "sd15" else "sdxl"))
    generator = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for module in unet.modules():
            for name, p in module.named_parameters(recurse=False):
                offset = 1.0 if isinstance(module, norms) and name == "weight" else 0.0
                p.copy_(offset + std * torch.randn(p.shape, generator=generator))
    unet.eval()
    return unet


def comfy_patcher(kind: str, unet, *, latent_format: str | None = None):
    """The ComfyUI twin of ``unet`` as a MODEL (``ModelPatcher``), float32 on the CPU."""
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    config_class = comfy.supported_models.SD15 if kind == "sd15" else comfy.supported_models.SDXL
    unet_config = comfy_unet_config("sd15" if kind == "sd15" else "sdxl")
    model_config = config_class(unet_config)
    model_config.unet_config.update(num_heads=8, num_head_channels=-1)
    model_config.set_inference_dtype(torch.float32, None)
    if latent_format is not None:
        import comfy.latent_formats

        model_config.latent_format = getattr(comfy.latent_formats, latent_format)()
    base = model_config.get_model({})
    key_map = comfy.utils.unet_to_diffusers(model_config.unet_config)
    source = unet.state_dict()
    target = {}
    for diffusers_key, comfy_key in key_map.items():
        if diffusers_key in source:
            target[comfy_key] = source[diffusers_key]
    missing, unexpected = base.diffusion_model.load_state_dict(target, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise AssertionError(f"weight map incomplete: missing {missing[:5]} unexpected {unexpected[:5]}")
    base.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def sdxl_inputs(unet, batch: int, generator: torch.Generator) -> tuple[dict, torch.Tensor]:
    """SDXL extra conditioning for diffusers (``added_cond_kwargs``) and the equivalent ComfyUI ``y``."""
    text_embeds = torch.randn(batch, TEXT_EMBED_DIM, generator=generator)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)
    with torch.no_grad():
        time_embeds = unet.add_time_proj(time_ids.flatten()).reshape(batch, -1)
    return {"text_embeds": text_embeds, "time_ids": time_ids}, torch.cat([text_embeds, time_embeds], dim=1)

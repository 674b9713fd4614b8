"""Sana DiT nodes: the model loader (a native ComfyUI MODEL), Flow-DPM-Solver, sigmas, latent, one-node sampler.

The MODEL is a standard ComfyUI model (flow-matching ``CONST`` sampling with the release's shift,
a 32-channel latent format), so stock KSampler, SamplerCustom(Advanced), previews and
model-patch nodes such as ModelSamplingSD3 work on it. ComfyUI classes are built lazily in
:func:`comfy_classes`, so this module imports without ComfyUI.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from uniba.sana.config import SanaConfig
from uniba.sana.sampling import flow_sigmas, sample_flow_dpm_solver, sample_flow_euler

from . import host

CATEGORY = "UniBA/Sana"
LATENT_CHANNELS = 32
LATENT_SCALE = 0.41407  # DC-AE f32c32 scaling factor
DOWNSCALE = 32

# Live-preview projection of the 32 latent channels to RGB. Colour-accurate factors must be fitted
# on the real DC-AE decoder, which this project has not done yet; until then the preview is a
# grey-scale view of the latent's mean over channels, which shows composition, not colour.
PREVIEW_CHANNEL_WEIGHT = 0.15
LATENT_RGB_FACTORS = [[PREVIEW_CHANNEL_WEIGHT] * 3 for _ in range(LATENT_CHANNELS)]
LATENT_RGB_BIAS = [0.0, 0.0, 0.0]

# Sana's aspect-ratio bins as (width, height): ASPECT_RATIO_1024_BIN and _2048_BIN of PixArt/Sana, ordered
# from wide to tall; the 4096 bin is the 2048 bin doubled.
RATIO_BINS_1024 = [(2048, 512), (1856, 512), (1792, 576), (1728, 576), (1664, 576), (1600, 640), (1536, 640),
                   (1472, 704), (1408, 704), (1344, 704), (1344, 768), (1280, 768), (1216, 832), (1152, 832),
                   (1152, 896), (1088, 896), (1088, 960), (1024, 960), (1024, 1024), (960, 1024), (960, 1088),
                   (896, 1088), (896, 1152), (832, 1152), (832, 1216), (768, 1280), (768, 1344), (704, 1408),
                   (704, 1472), (640, 1536), (640, 1600), (576, 1728), (512, 2048)]
RATIO_BINS_2048 = [(4096, 1024), (3968, 1024), (3840, 1024), (3712, 1024), (3584, 1152), (3456, 1152),
                   (3328, 1152), (3200, 1280), (3072, 1280), (2944, 1408), (2816, 1408), (2688, 1408), (2688, 1536),
                   (2560, 1536), (2432, 1664), (2304, 1664), (2304, 1792), (2176, 1792), (2176, 1920), (2048, 1920),
                   (2048, 2048), (1920, 2048), (1920, 2176), (1792, 2176), (1792, 2304), (1664, 2304), (1664, 2432),
                   (1536, 2560), (1536, 2688), (1408, 2816), (1408, 2944), (1280, 3072), (1280, 3200), (1152, 3328),
                   (1152, 3456), (1152, 3584), (1024, 3712), (1024, 3840), (1024, 3968), (1024, 4096)]
RATIO_BINS_4096 = [(2 * w, 2 * h) for w, h in RATIO_BINS_2048]


def _presets() -> dict[str, tuple[int, int]]:
    presets = {"custom": (0, 0)}
    for bins in (RATIO_BINS_1024, RATIO_BINS_2048, RATIO_BINS_4096):
        square = [size for size in bins if size[0] == size[1]]
        for w, h in square + [size for size in bins if size[0] != size[1]]:
            presets.setdefault(f"{w}x{h}", (w, h))
    return presets


RESOLUTION_PRESETS = _presets()

SAMPLER_FUNCTIONS = {"flow_dpm_solver": sample_flow_dpm_solver, "flow_euler": sample_flow_euler}
SIGMA_KIND = {"flow_dpm_solver": "dpm_solver", "flow_euler": "euler"}

SD_LATENT_HINT = ("Sana works on the 32-channel DC-AE latent at 1/32 of the image size; this latent has {c} "
                  "channels (an SD/SDXL latent?). Start from 'SanaEmptyLatent' or encode the image with the Sana "
                  "DC-AE encoder node.")


# --------------------------------------------------------------------------- ComfyUI classes

@functools.lru_cache(maxsize=1)
def comfy_classes() -> tuple[type, type, type]:
    """``(SanaLatentFormat, SanaModelConfig, SanaModel)``, subclasses of ComfyUI's own classes."""
    latent_formats = host.comfy_module("comfy.latent_formats")
    supported_models_base = host.comfy_module("comfy.supported_models_base")
    model_base = host.comfy_module("comfy.model_base")
    conds = host.comfy_module("comfy.conds")

    class SanaLatentFormat(latent_formats.LatentFormat):
        latent_channels = LATENT_CHANNELS
        scale_factor = LATENT_SCALE

        def __init__(self) -> None:
            self.latent_rgb_factors = [list(row) for row in LATENT_RGB_FACTORS]
            self.latent_rgb_factors_bias = list(LATENT_RGB_BIAS)

    def build_sana_dit(sana_config: SanaConfig, device: Any = None, dtype: torch.dtype | None = None,
                       operations: Any = None, **_: Any) -> torch.nn.Module:
        from uniba.sana.model import SanaDiT

        return SanaDiT(sana_config, operations=operations, device=device, dtype=dtype)

    class SanaModel(model_base.BaseModel):
        def __init__(self, model_config: Any, model_type: Any = model_base.ModelType.FLOW, device: Any = None) -> None:
            super().__init__(model_config, model_type, device=device, unet_model=build_sana_dit)
            self.diffusion_model.compute_dtype = model_config.manual_cast_dtype

        def extra_conds(self, **kwargs: Any) -> dict[str, Any]:
            out = super().extra_conds(**kwargs)
            cross_attn = kwargs.get("cross_attn", None)
            if cross_attn is not None:
                # regular (not cross-attn) cond: never padded to a common length, so the mask stays aligned
                out["c_crossattn"] = conds.CONDRegular(cross_attn)
            mask = kwargs.get("attention_mask", None)
            if mask is not None:
                out["context_mask"] = conds.CONDRegular(mask)
            return out

    class SanaModelConfig(supported_models_base.BASE):
        unet_config: dict[str, Any] = {}
        unet_extra_config: dict[str, Any] = {}
        latent_format = SanaLatentFormat
        sampling_settings = {"shift": 3.0, "multiplier": 1000}
        supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
        memory_usage_factor = 4.0

        def __init__(self, sana_config: SanaConfig) -> None:
            super().__init__({"sana_config": sana_config})
            self.sampling_settings = {"shift": float(sana_config.flow_shift), "multiplier": 1000}

        def model_type(self, state_dict: Any, prefix: str = "") -> Any:
            return model_base.ModelType.FLOW

        def get_model(self, state_dict: Any, prefix: str = "", device: Any = None) -> Any:
            return SanaModel(self, model_base.ModelType.FLOW, device=device)

    return SanaLatentFormat, SanaModelConfig, SanaModel


def build_comfy_model(checkpoint: Any, weight_dtype: str = "auto") -> Any:
    """A ComfyUI ``ModelPatcher`` around a Sana checkpoint read by :func:`uniba.sana.loader.read_sana_checkpoint`."""
    mm = host.comfy_module("comfy.model_management")
    model_patcher = host.comfy_module("comfy.model_patcher")
    _, model_config_cls, _ = comfy_classes()
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    supported = [torch.bfloat16, torch.float16, torch.float32]
    if checkpoint.stored_dtype == torch.bfloat16:
        supported.remove(torch.float16)  # bf16 releases overflow in fp16 (sana.md §8.5)
    if weight_dtype == "auto":
        n_params = sum(v.numel() for v in checkpoint.state_dict.values())
        dtype = mm.unet_dtype(model_params=n_params, supported_dtypes=supported, weight_dtype=checkpoint.stored_dtype)
    else:
        dtype = host.choose_dtype(weight_dtype)
    manual_cast = mm.unet_manual_cast(dtype, load_device, supported)
    model_config = model_config_cls(checkpoint.config)
    model_config.set_inference_dtype(dtype, manual_cast)
    model = model_config.get_model({}, "")
    model = model.to(offload_device)
    model.diffusion_model.load_state_dict(checkpoint.state_dict, strict=True)
    return model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


# --------------------------------------------------------------------------- nodes

def _diffusion_model_choices() -> list[str]:
    return host.list_models("diffusion_models") + [d + "/" for d in host.list_model_dirs("diffusion_models")]


class SanaDiTLoader:
    """Load a Sana DiT (original .pth/.safetensors or diffusers format) from models/diffusion_models/."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "unet_name": (_diffusion_model_choices(), {"tooltip": "Sana transformer in models/diffusion_models/"}),
            "weight_dtype": (["auto", "bf16", "fp16", "fp32"], {"default": "auto"}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Sana linear DiT (0.6B/1.6B, 2K/4K, Sana 1.5) as a native MODEL for KSampler and SamplerCustom."

    def load(self, unet_name: str, weight_dtype: str) -> tuple[Any]:
        from uniba.checkpoint import check_keys
        from uniba.sana.loader import FAMILY, expected_shapes, load_sana, read_sana_checkpoint

        path = host.model_path("diffusion_models", unet_name.rstrip("/"))
        if not host.IN_COMFYUI:
            dtype = host.choose_dtype(weight_dtype)
            return (host.wrap_model(load_sana(path, dtype)),)
        checkpoint = read_sana_checkpoint(path)
        check_keys(checkpoint.state_dict, expected_shapes(checkpoint.config), path=path, family=FAMILY)
        return (build_comfy_model(checkpoint, weight_dtype),)


class FlowDPMSolverSampler:
    """Flow-DPM-Solver (Sana's DPM-Solver++ 2M in lambda = log((1-sigma)/sigma)) for SamplerCustom(Advanced)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {}}

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    CATEGORY = CATEGORY

    def get_sampler(self) -> tuple[Any]:
        samplers = host.comfy_module("comfy.samplers")
        return (samplers.KSAMPLER(sample_flow_dpm_solver),)


class SanaFlowSigmas:
    """Sana's shifted flow sigma grid (diffusers' use_flow_sigmas), descending to 0."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "steps": ("INT", {"default": 20, "min": 1, "max": 1000}),
            "shift": ("FLOAT", {"default": 3.0, "min": 0.01, "max": 100.0, "step": 0.01,
                                "tooltip": "3.0 for 512/1024/2K and Sana 1.5, 6.0 for 4K"}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = CATEGORY

    def get_sigmas(self, steps: int, shift: float, denoise: float) -> tuple[torch.Tensor]:
        if denoise <= 0.0:
            return (torch.FloatTensor([]),)
        return (flow_sigmas(steps, shift, denoise=denoise),)


class SanaEmptyLatent:
    """An empty 32-channel latent at 1/32 of the image size, custom or one of Sana's aspect-ratio presets."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "width": ("INT", {"default": 1024, "min": DOWNSCALE, "max": 16384, "step": DOWNSCALE}),
            "height": ("INT", {"default": 1024, "min": DOWNSCALE, "max": 16384, "step": DOWNSCALE}),
            "preset": (list(RESOLUTION_PRESETS), {"default": "custom",
                                                  "tooltip": "Sana's 1024/2048/4096 px aspect-ratio bins; "
                                                             "'custom' uses width and height"}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    CATEGORY = CATEGORY

    def generate(self, width: int, height: int, preset: str, batch_size: int) -> tuple[dict[str, torch.Tensor]]:
        if preset != "custom":
            if preset not in RESOLUTION_PRESETS:
                raise ValueError(f"unknown Sana resolution preset {preset!r}; choose one of the listed ones or "
                                 "'custom'")
            width, height = RESOLUTION_PRESETS[preset]
        shape = (batch_size, LATENT_CHANNELS, max(1, height // DOWNSCALE), max(1, width // DOWNSCALE))
        return ({"samples": torch.zeros(shape, device=host.intermediate_device())},)


class SanaSampler:
    """Sana with its defaults in one node: Flow-DPM-Solver 20 steps (or Flow-Euler), CFG 4.5, release shift."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "model": ("MODEL",),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 1000,
                              "tooltip": "20 for Flow-DPM-Solver, 28 for Flow-Euler (Sana's defaults)"}),
            "cfg": ("FLOAT", {"default": 4.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "solver": (list(SAMPLER_FUNCTIONS), {"default": "flow_dpm_solver"}),
            "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                "tooltip": "0 = the model's shift (3.0, 6.0 for 4K, or ModelSamplingSD3's)"}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    def sample(self, model: Any, positive: Any, negative: Any, latent_image: dict[str, Any], seed: int, steps: int,
               cfg: float, solver: str, shift: float, denoise: float) -> tuple[dict[str, Any]]:
        samples = latent_image["samples"]
        if samples.ndim != 4 or samples.shape[1] != LATENT_CHANNELS:
            raise ValueError(SD_LATENT_HINT.format(c=samples.shape[1] if samples.ndim > 1 else "?"))
        if solver not in SAMPLER_FUNCTIONS:
            raise ValueError(f"solver must be one of {', '.join(SAMPLER_FUNCTIONS)}, got {solver!r}")
        out = dict(latent_image)
        if denoise <= 0.0:
            return (out,)
        comfy_sample = host.comfy_module("comfy.sample")
        samplers = host.comfy_module("comfy.samplers")
        latent_preview = host.comfy_module("latent_preview")
        comfy_utils = host.comfy_module("comfy.utils")

        if shift <= 0.0:
            shift = float(getattr(model.get_model_object("model_sampling"), "shift", 3.0))
        sigmas = flow_sigmas(steps, shift, kind=SIGMA_KIND[solver], denoise=denoise)
        noise = comfy_sample.prepare_noise(samples, seed, latent_image.get("batch_index"))
        if denoise >= 1.0 and torch.count_nonzero(samples) == 0:
            # Sana starts from unscaled noise at sigma_0 = shift(0.999); ComfyUI multiplies it by sigma_0
            noise = noise / sigmas[0]
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
        out["samples"] = comfy_sample.sample_custom(
            model, noise, cfg, samplers.KSAMPLER(SAMPLER_FUNCTIONS[solver]), sigmas, positive, negative, samples,
            noise_mask=latent_image.get("noise_mask"), callback=callback,
            disable_pbar=not comfy_utils.PROGRESS_BAR_ENABLED, seed=seed)
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
    "SanaDiTLoader": "Sana DiT Loader",
    "FlowDPMSolverSampler": "Flow-DPM-Solver (Sana)",
    "SanaFlowSigmas": "Sana Flow Sigmas",
    "SanaSampler": "Sana Sampler",
    "SanaEmptyLatent": "Sana Empty Latent",
}

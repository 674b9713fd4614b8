"""Sana as native ComfyUI types: the MODEL around the engine's DiT, the DC-AE as a VAE, the flow samplers.

* MODEL: ComfyUI's ``BaseModel`` with flow-matching ``CONST`` sampling at the release's shift and a
  32-channel latent format, whose ``diffusion_model`` is the :class:`uniba.sana.model.SanaDiT` that
  :func:`uniba.sana.loader.build_sana` loaded (the same load path as headless; ComfyUI only adds its
  layer classes and wraps the result). Stock KSampler, SamplerCustom, previews and ModelSamplingSD3
  work on it.
* VAE: ``comfy.sd.VAE`` cannot detect a DC-AE from its keys, but represents one once its model and
  ratios are set, so a subclass holds our DC-AE. Its ``decode``/``decode_tiled``/``encode``/``encode_tiled``
  all run the engine's exact tiler (:func:`decode_images`, :func:`encode_images`; ComfyUI's own blended
  tiling never runs on it), so VAE Decode, VAE Decode (Tiled) and Sana VAE Decode give the same image.
* SAMPLER and the one-node sampler: the engine's k-diffusion-shaped samplers through ``KSAMPLER`` and
  ``sample_custom``.

Headless, the loaders return the engine model in a :class:`host.HeadlessPatcher` and a
:class:`SanaVAE`; sampling needs ComfyUI.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from uniba.dcae.tiling import DEFAULT_TILE_PX, activation_bytes_per_pixel
from uniba.devices import COMPUTE_DTYPES, allowed_dtypes
from uniba.guards import check_denoised_finite, check_finite, check_image, check_seed
from uniba.sana.checks import SOURCE_KEY, check_context_mask, check_sana_conditioning, check_sana_latent
from uniba.sana.config import (
    DEFAULT_SHIFT,
    LATENT_CHANNELS,
    LATENT_DOWNSCALE,
    LATENT_SCALE,
    SPRINT_GUIDANCE,
    SanaConfig,
)
from uniba.sana.loader import SanaCheckpoint, build_sana
from uniba.sana.sampling import start_noise

from . import host

try:  # pragma: no cover - exercised in the integration tier
    import comfy.conds
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management
    import comfy.ops
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.supported_models_base
    import comfy.utils
    import latent_preview
except Exception:  # noqa: BLE001 - not inside a usable ComfyUI: the headless fallbacks below apply
    pass

# Live-preview projection of the 32 latent channels to RGB. Colour-accurate factors must be fitted
# on the real DC-AE decoder, which this project has not done yet; until then the preview is a
# grey-scale view of the latent's mean over channels, which shows composition, not colour.
PREVIEW_CHANNEL_WEIGHT = 0.15
LATENT_RGB_FACTORS = [[PREVIEW_CHANNEL_WEIGHT] * 3 for _ in range(LATENT_CHANNELS)]
LATENT_RGB_BIAS = [0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- MODEL

if host.IN_COMFYUI:  # pragma: no cover - exercised in the integration tier

    # Hosts before 0.28 ignore spacial_downscale_ratio: their fix_empty_latent_channels would repeat a stock
    # EmptyLatentImage's 4 channels to 32 and keep its 1/8 size, a silently 4x too large image. There the format's
    # channel count compares equal to any (that function is its only reader), so such a latent reaches
    # SanaModel.extra_conds as it is and is refused there with the fix.
    HOST_SIZES_EMPTY_LATENTS = "downscale_ratio_spacial" in inspect.signature(
        comfy.sample.fix_empty_latent_channels).parameters

    class _MatchesAnyChannels(int):
        def __ne__(self, other: object) -> bool:
            return False

    class SanaLatentFormat(comfy.latent_formats.LatentFormat):
        latent_channels = LATENT_CHANNELS if HOST_SIZES_EMPTY_LATENTS else _MatchesAnyChannels(LATENT_CHANNELS)
        scale_factor = LATENT_SCALE
        # DC-AE f32c32: 32 px per latent cell. Hosts that honour it (0.28+) resize a stock EmptyLatentImage
        # (made for 8) before sampling, so KSampler gets the right latent size; older ones ignore it.
        spacial_downscale_ratio = LATENT_DOWNSCALE

        def __init__(self) -> None:
            self.latent_rgb_factors = [list(row) for row in LATENT_RGB_FACTORS]
            self.latent_rgb_factors_bias = list(LATENT_RGB_BIAS)

    class SanaModelConfig(comfy.supported_models_base.BASE):
        unet_config: dict[str, Any] = {}
        unet_extra_config: dict[str, Any] = {}
        latent_format = SanaLatentFormat
        sampling_settings = {"shift": DEFAULT_SHIFT, "multiplier": 1000}
        supported_inference_dtypes = list(COMPUTE_DTYPES)
        # ComfyUI reserves dtype_size x 0.01 x this MiB per latent token (flash-attention hosts): 168 KB in fp32,
        # 84 KB in bf16. A forward holds uniba.sana.checks.FORWARD_VALUES_PER_TOKEN hidden-sized fp32 values per token
        # (125 KB at the 1600M's width, 65 KB at the 600M's), so this is a safe over-estimate; bf16 keeps the linear
        # attention in fp32 and lands in between.
        memory_usage_factor = 4.0

        def __init__(self, sana_config: SanaConfig) -> None:
            super().__init__({"sana_config": sana_config})
            # Sprint samples in flow time and its transformer takes that time itself (uniba/sana/sprint.py)
            self.sampling_settings = ({"shift": 1.0, "multiplier": 1.0} if sana_config.is_sprint else
                                      {"shift": float(sana_config.flow_shift), "multiplier": 1000})

        def model_type(self, state_dict: Any, prefix: str = "") -> Any:
            return comfy.model_base.ModelType.FLOW

    class SanaModel(comfy.model_base.BaseModel):
        """ComfyUI's model base around an already loaded engine DiT."""

        def __init__(self, model_config: Any, dit: torch.nn.Module) -> None:
            super().__init__(model_config, comfy.model_base.ModelType.FLOW, unet_model=lambda **_: dit)
            self.diffusion_model.compute_dtype = model_config.manual_cast_dtype

        def apply_model(self, x: torch.Tensor, t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if self.diffusion_model.config.is_sprint:
                check_sprint_sampling(self.model_sampling)
            # every sampler ComfyUI runs on this MODEL (stock KSampler too) stops at the first NaN/inf prediction
            return check_denoised_finite(super().apply_model(x, t, *args, **kwargs), t, "the Sana DiT")

        def extra_conds(self, **kwargs: Any) -> dict[str, Any]:
            out = super().extra_conds(**kwargs)
            config = self.diffusion_model.config  # the loaded DiT's widths, not the release's
            noise = kwargs.get("noise", None)
            if noise is not None:  # an SD latent (stock Empty Latent Image): the fix, not a convolution error
                check_sana_latent(noise, "latent_image (the sampler's latent)", config.in_channels)
            cross_attn = kwargs.get("cross_attn", None)
            if cross_attn is not None:
                # e.g. SD/SDXL CLIP conditioning from the stock CLIPTextEncode: named, not a matmul failure
                check_sana_conditioning(cross_attn, "conditioning (positive/negative)", config.caption_channels,
                                        kwargs.get(SOURCE_KEY, None))
                check_context_mask(cross_attn, kwargs.get("attention_mask", None), "conditioning (positive/negative)")
                # regular (not cross-attn) cond: never padded to a common length, so the mask stays aligned
                out["c_crossattn"] = comfy.conds.CONDRegular(cross_attn)
            mask = kwargs.get("attention_mask", None)
            if mask is not None:
                out["context_mask"] = comfy.conds.CONDRegular(mask)
            if self.diffusion_model.config.is_sprint:
                # embedded guidance travels in the conditioning, as for Flux (Sana Sprint Guidance, FluxGuidance)
                guidance = kwargs.get("guidance", None)
                guidance = SPRINT_GUIDANCE if guidance is None else float(guidance)
                out["guidance"] = comfy.conds.CONDRegular(torch.FloatTensor([guidance]))
            return out


def load_dit(checkpoint: SanaCheckpoint, dtype: torch.dtype, storage: torch.dtype | None = None) -> Any:
    """A MODEL of a read Sana checkpoint computing in ``dtype`` (:func:`uniba.devices.choose_weight_dtypes`'s choice),
    its layers' weights stored in ``storage`` (fp8) when given.

    Inside ComfyUI the DiT is built with ComfyUI's layer classes, which compute in the dtype the
    device supports when the weights' one is not (``unet_manual_cast``), and wrapped in ``SanaModel``. With fp8
    storage those layers cast each weight when it runs, and ``--lowvram``/Dynamic VRAM stream them from RAM.
    """
    if not host.IN_COMFYUI:
        with host.loading("Sana weights") as progress:
            return host.wrap_model(build_sana(checkpoint, dtype, storage_dtype=storage, progress=progress))
    supported = allowed_dtypes(checkpoint.stored_dtype)
    weight_dtype = storage or dtype
    manual_cast = comfy.model_management.unet_manual_cast(weight_dtype, host.torch_device(), supported)
    model_config = SanaModelConfig(checkpoint.config)
    model_config.set_inference_dtype(weight_dtype, manual_cast)
    with host.loading("Sana weights") as progress:
        dit = build_sana(checkpoint, manual_cast or dtype, storage_dtype=storage,
                         operations=comfy.ops.pick_operations(weight_dtype, manual_cast), progress=progress)
    dit.between_blocks = host.check_interrupt  # hosts before 0.28 check Cancel only between sampler steps
    return host.wrap_model(SanaModel(model_config, dit))


# --------------------------------------------------------------------------- SAMPLER and sampling

def ksampler(sample_fn: Callable[..., torch.Tensor]) -> Any:
    """A SAMPLER (for SamplerCustom) running one of the engine's k-diffusion-shaped samplers."""
    host.require_comfyui("A Sana SAMPLER")
    return comfy.samplers.KSAMPLER(sample_fn)


def dit_config(model: Any) -> SanaConfig | None:
    """The engine config of the DiT inside a MODEL (ComfyUI's patcher or the headless one), or None."""
    inner = getattr(model, "model", None)
    for candidate in (getattr(inner, "diffusion_model", None), inner):
        config = getattr(candidate, "config", None)
        if isinstance(config, SanaConfig):
            return config
    return None


def check_sprint_sampling(model_sampling: Any) -> None:
    """Sprint's transformer takes flow time itself (multiplier 1): a ModelSamplingSD3/AuraFlow patch multiplies it
    by 1000 and every prediction would be silently wrong, so the run stops with the fix."""
    multiplier = float(getattr(model_sampling, "multiplier", 1.0))
    if multiplier != 1.0:
        raise ValueError(f"model: this Sana-Sprint MODEL was given a model-sampling patch (e.g. ModelSamplingSD3) "
                         f"that scales its time by {multiplier:g}; Sprint's transformer takes flow time unscaled. "
                         "Remove that node: Sana Sprint Sigmas sets Sprint's schedule.")


def check_model_kind(model: Any, *, sprint: bool, node: str) -> None:
    """One sentence when a Sana-Sprint MODEL reaches a regular Sana sampling node, or the reverse."""
    config = dit_config(model)
    if sprint and (config is None or not config.is_sprint):
        what = "a regular Sana DiT" if config is not None else "not a Sana DiT"
        raise ValueError(f"{node} needs a Sana-Sprint MODEL, but this one is {what}: load Sana_Sprint_* with "
                         "'Sana DiT Loader (UniBA)' or 'Sana Pipeline Loader (UniBA)'; a regular Sana model samples "
                         "with 'Sana Sampler (UniBA)'.")
    if not sprint and config is not None and config.is_sprint:
        raise ValueError(f"{node} samples regular Sana models, but this MODEL is Sana-Sprint (1-4 steps): use "
                         "'Sana Sprint Sigmas (UniBA)' with 'Sana Sprint Sampler (UniBA)' in SamplerCustom, as the "
                         "'Sprint text-to-image in 2 steps' template does.")


def model_shift(model: Any) -> float:
    """The flow shift the MODEL samples with (the release's, or ModelSamplingSD3's)."""
    return float(getattr(model.get_model_object("model_sampling"), "shift", DEFAULT_SHIFT))


def sample(model: Any, latent: dict[str, Any], *, sample_fn: Callable[..., torch.Tensor], sigmas: torch.Tensor,
           positive: Any, negative: Any, cfg: float, seed: int, text_to_image: bool) -> torch.Tensor:
    """Run ComfyUI's ``sample_custom`` with an engine sampler: previews, progress and Cancel are ComfyUI's.

    ``text_to_image`` (full denoise of an empty latent) starts from Sana's unit noise.
    """
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg):
        raise ValueError(f"cfg: must be a finite number (Sana's default is 4.5), got {cfg!r}.")  # NaN passes the UI
    seed = check_seed(seed)
    host.require_comfyui("SanaSampler")
    samples = latent["samples"]
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    if text_to_image:
        noise = start_noise(noise, sigmas)
    callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
    return comfy.sample.sample_custom(
        model, noise, cfg, comfy.samplers.KSAMPLER(sample_fn), sigmas, positive, negative, samples,
        noise_mask=latent.get("noise_mask"), callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)


# --------------------------------------------------------------------------- VAE

class ExactTilingEntryPoints:
    """The four VAE entry points every stock node calls, all routed to the exact DC-AE tiler. Shared by the
    headless stand-in and the ComfyUI ``VAE`` subclass (listed first there, so these override ComfyUI's)."""

    dcae: Any

    def decode(self, samples_in: torch.Tensor, vae_options: dict | None = None) -> torch.Tensor:
        return decode_images(self, samples_in)

    def decode_tiled(self, samples: torch.Tensor, tile_x: int | None = None, tile_y: int | None = None,
                     overlap: int | None = None, tile_t: int | None = None, overlap_t: int | None = None
                     ) -> torch.Tensor:
        return decode_images(self, samples, stock_tile_px(tile_x, tile_y, self.dcae.spatial_ratio))

    def encode(self, pixel_samples: torch.Tensor) -> torch.Tensor:
        return encode_images(self, pixel_samples)

    def encode_tiled(self, pixel_samples: torch.Tensor, tile_x: int | None = None, tile_y: int | None = None,
                     overlap: int | None = None, tile_t: int | None = None, overlap_t: int | None = None
                     ) -> torch.Tensor:
        return encode_images(self, pixel_samples, stock_tile_px(tile_x, tile_y, 1))


class SanaVAE(ExactTilingEntryPoints):
    """Headless stand-in for the ComfyUI VAE: the DC-AE and its (headless) patcher, the same four entry points."""

    def __init__(self, dcae: Any, patcher: Any) -> None:
        self.dcae = dcae
        self.patcher = patcher


def stock_tile_px(tile_x: int | None, tile_y: int | None, cell_px: int) -> int:
    """The tile edge in pixels asked for by ComfyUI's VAE Decode/Encode (Tiled) (``tile_x`` in latent cells for
    decoding, pixels for encoding); 0 = automatic. Our tiling is exact, so it only caps the tile (speed/memory)
    and the stock node's overlap is not needed."""
    return max(tile_x or 0, tile_y or 0) * cell_px


def _dcae_of(vae: Any) -> Any:
    dcae = getattr(vae, "dcae", None)
    if dcae is None:
        raise ValueError("This VAE is not a Sana DC-AE: load the DC-AE with 'Sana DC-AE Loader' "
                         "(dc-ae-f32c32-sana-1.x in models/vae/).")
    return dcae


def _prepare_model(vae: Any, out_pixels: int, batch: int) -> tuple[Any, int]:
    """Load the DC-AE on its device through the model manager; return it and the activation budget."""
    dcae = _dcae_of(vae)
    need = int(activation_bytes_per_pixel(dcae.config.decoder_widths, dcae.weight_dtype) * batch
               * min(out_pixels, DEFAULT_TILE_PX**2))
    model = host.load_to_device(vae.patcher, memory_required=need)
    return model, host.free_memory(vae.patcher.load_device, patcher=vae.patcher)


def decode_images(vae: Any, samples: torch.Tensor, tile_size: int = 0, node_id: str | None = None) -> torch.Tensor:
    """LATENT samples (unscaled) -> IMAGE (B, H, W, 3) in [0, 1], the exact tiled decode.

    ``tile_size`` (px, 0 = as large as the free memory allows) only changes speed and memory; progress
    per tile, Cancel between tiles (the progress callback raises).
    """
    dcae = _dcae_of(vae)
    check_sana_latent(samples, "samples",
                      channels=getattr(getattr(dcae, "config", None), "latent_channels", LATENT_CHANNELS))
    ratio = dcae.spatial_ratio
    model, budget = _prepare_model(vae, samples.shape[-2] * samples.shape[-1] * ratio * ratio, samples.shape[0])
    progress = host.Progress(1, node_id=node_id, desc="DC-AE decode")
    try:
        images = model.decode(samples, tile_size=tile_size or None, budget_bytes=budget, progress=progress,
                              output_device=host.intermediate_device(), is_oom=host.is_oom)
    finally:
        progress.close()
    # clamp() keeps NaN and SaveImage writes it as black: refuse it here, named
    check_finite(images, "Sana VAE decode output", "Decode in float32 or bfloat16 (fp16 overflows in the DC-AE).")
    return (images * 0.5 + 0.5).clamp(0.0, 1.0).movedim(1, -1)


def _crop_to_multiple(pixels: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = pixels.shape[1], pixels.shape[2]
    nh, nw = h // multiple * multiple, w // multiple * multiple
    if nh == 0 or nw == 0:
        raise ValueError(f"the image is {w}x{h} px; the DC-AE needs at least {multiple}x{multiple}.")
    top, left = (h - nh) // 2, (w - nw) // 2
    return pixels[:, top:top + nh, left:left + nw, :]


def encode_images(vae: Any, pixels: torch.Tensor, tile_size: int = 0, node_id: str | None = None) -> torch.Tensor:
    """IMAGE (B, H, W, C) in [0, 1] -> unscaled latents, center-cropped to multiples of 32 like ComfyUI's VAEs;
    exact at any ``tile_size`` like :func:`decode_images`."""
    dcae = _dcae_of(vae)
    pixels = check_image(pixels, "image (VAE encode input)", channels_last=True, value_range=(0.0, 1.0))
    cropped = _crop_to_multiple(pixels[..., :3], dcae.spatial_ratio)
    if cropped.shape != pixels[..., :3].shape:  # as ComfyUI's VAEs do, but said
        host.warn(f"VAE encode: the image is {pixels.shape[2]}x{pixels.shape[1]} px, not a multiple of "
                  f"{dcae.spatial_ratio} on each side; the DC-AE encodes its centre {cropped.shape[2]}x"
                  f"{cropped.shape[1]} px. Pad or resize it to multiples of {dcae.spatial_ratio} to keep every pixel.",
                  node_id)
    pixels = cropped
    model, budget = _prepare_model(vae, pixels.shape[1] * pixels.shape[2], pixels.shape[0])
    progress = host.Progress(1, node_id=node_id, desc="DC-AE encode")
    try:
        image = pixels.movedim(-1, 1) * 2.0 - 1.0
        return model.encode(image, tile_size=tile_size or None, budget_bytes=budget, progress=progress,
                            output_device=host.intermediate_device(), is_oom=host.is_oom)
    finally:
        progress.close()


if host.IN_COMFYUI:  # pragma: no cover - exercised in the integration tier

    class SanaDCAEVAE(ExactTilingEntryPoints, comfy.sd.VAE):
        """ComfyUI VAE around our DC-AE: every stock VAE node runs our exact tiler, never ComfyUI's blended one."""

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
            # the pixel-space branch above turned offloading off and (newer hosts) cached the placeholder's
            # size (4 bytes) in self.size: the DC-AE is offloadable and its size is measured when asked
            self.disable_offload = False
            self.size = None
            for name, value in (("not_video", False), ("crop_input", True),
                                ("extra_1d_channel", None), ("downscale_index_formula", None),
                                ("upscale_index_formula", None)):
                if not hasattr(self, name):
                    setattr(self, name, value)
            self.vae_dtype = dcae.weight_dtype
            self.output_device = host.intermediate_device()
            self.patcher = host.wrap_model(dcae, host.vae_device(), host.vae_offload_device())
            self.device = self.patcher.load_device

        def get_sd(self) -> dict:
            return self.dcae.state_dict()


def make_vae(dcae: Any) -> Any:
    """A VAE of a loaded DC-AE: ComfyUI's VAE type inside ComfyUI, :class:`SanaVAE` headless."""
    if host.IN_COMFYUI:
        return SanaDCAEVAE(dcae)
    return SanaVAE(dcae, host.wrap_model(dcae, host.vae_device(), host.vae_offload_device()))

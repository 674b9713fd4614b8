"""Which HiDiffusion table a model gets, decided from plain facts about its UNet (no host imports).

The node collects :class:`UNetFacts` from ComfyUI's model (class names, block structure,
``unet_config``, latent format) and this module decides. Structure first: the reference patches
fixed module positions, so a model whose blocks sit elsewhere (SDXL refiner, KOALA, DiT/Flux/Sana)
is refused with a message naming the models that work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .plan import FAMILIES, LAYOUTS, SD_LAYOUT, SDXL_LAYOUT, Layout

SUPPORTED = ("SD1.x (1.4/1.5 and fine-tunes), SD2.x (2.0/2.1, base and 768-v), SDXL base and fine-tunes "
             "(incl. SSD-1B, Segmind Vega, Playground 2.5, SDXL inpainting) and SDXL-Turbo "
             "(choose model_variant=sdxl_turbo)")


class UnsupportedModelError(ValueError):
    """The model cannot take the HiDiffusion patch."""


@dataclass(frozen=True)
class UNetFacts:
    """What the detector needs to know about a diffusion model."""

    is_unet: bool                                # a ComfyUI ``UNetModel`` (openaimodel)
    model_class: str = ""                        # e.g. "UNetModel", "Flux", "SanaMS"
    config_class: str = ""                       # e.g. "SD15", "SDXL", "SDXLRefiner", "SSD1B"
    n_input_blocks: int = 0
    downsample_blocks: tuple[int, ...] = ()      # input blocks that hold a conv Downsample
    attention_input_blocks: tuple[int, ...] = ()  # input blocks that hold a SpatialTransformer
    n_output_blocks: int = 0
    context_dim: int | None = None
    adm_in_channels: int | None = None
    in_channels: int | None = None
    latent_format: str = ""                      # e.g. "SD15", "SDXL", "SDXL_Playground_2_5"
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Detection:
    family: str
    layout: Layout
    non_aggressive_model: bool  # SDXL inpainting / Playground: the reference's non-aggressive table
    reason: str


def _structure(facts: UNetFacts) -> Layout | None:
    for layout in (SD_LAYOUT, SDXL_LAYOUT):
        if (facts.n_input_blocks == layout.n_input_blocks
                and facts.n_output_blocks in (0, layout.n_input_blocks)
                and tuple(facts.downsample_blocks) == layout.downsample_blocks
                and set(layout.attention_input_blocks) <= set(facts.attention_input_blocks)):
            return layout
    return None


def detect(facts: UNetFacts, variant: str = "auto") -> Detection:
    """The family (sd1, sd2, sdxl, sdxl_turbo) and layout for a model; ``UnsupportedModelError`` otherwise."""
    if variant not in ("auto", *FAMILIES):
        raise ValueError(f"model_variant must be auto or one of {', '.join(FAMILIES)}, got {variant!r}")
    if not facts.is_unet:
        what = facts.model_class or "this model"
        raise UnsupportedModelError(
            f"HiDiffusion patches Stable Diffusion UNets only; {what} is not a UNet (DiT, Flux, Sana, SD3 "
            f"and similar transformer models have no RAU-Net blocks). Supported: {SUPPORTED}.")
    if facts.config_class == "SDXLRefiner" or (facts.context_dim == 1280 and facts.adm_in_channels == 2560):
        raise UnsupportedModelError(
            "The SDXL refiner cannot take the HiDiffusion patch (the reference has no table for it, and its "
            f"blocks differ from SDXL base). Patch the base model instead. Supported: {SUPPORTED}.")
    layout = _structure(facts)
    if layout is None:
        raise UnsupportedModelError(
            f"This UNet's layout ({facts.n_input_blocks} input blocks, downsampling at "
            f"{list(facts.downsample_blocks)}, attention at {list(facts.attention_input_blocks)}) is neither "
            f"SD1/SD2 (12 blocks, downsampling at 3, 6, 9) nor SDXL (9 blocks, downsampling at 3, 6); "
            f"distilled layouts such as KOALA are not supported. Supported: {SUPPORTED}.")

    playground = "playground" in facts.latent_format.lower()
    inpainting = layout is SDXL_LAYOUT and facts.in_channels == 9
    non_aggressive = playground or inpainting
    if variant != "auto":
        if LAYOUTS[variant] is not layout:
            raise UnsupportedModelError(
                f"model_variant={variant} expects the {LAYOUTS[variant].name.upper()} UNet layout, but this "
                f"model has the {layout.name.upper()} layout; use model_variant=auto.")
        return Detection(variant, layout, non_aggressive, f"model_variant={variant} (set by the user)")

    if layout is SDXL_LAYOUT:
        note = "Playground 2.5 latent format: non-aggressive table" if playground else (
            "inpainting UNet: non-aggressive table" if inpainting else "SDXL layout")
        return Detection("sdxl", layout, non_aggressive, note)
    if facts.context_dim == 1024:
        return Detection("sd2", layout, False, "SD layout, context_dim 1024")
    if facts.context_dim == 768:
        return Detection("sd1", layout, False, "SD layout, context_dim 768")
    return Detection("sd1", layout, False,
                     f"SD layout, context_dim {facts.context_dim}: handled like SD1.5 (the reference detects by "
                     "module names, which SD1 and SD2 share)")

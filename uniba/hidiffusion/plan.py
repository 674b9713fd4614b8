"""HiDiffusion plan tables: which ComfyUI UNet blocks RAU-Net and MSW-MSA touch, and on which steps.

HiDiffusion (Zhang et al., "HiDiffusion: Unlocking Higher-Resolution Creativity and Efficiency in
Pretrained Diffusion Models", arXiv 2311.17528). The tables reproduce the reference implementation
``hidiffusion==0.1.10`` (``switching_threshold_ratio_dict``, ``aggressive_step``, the module keys of
``sd15_hidiffusion_key``/``sdxl_hidiffusion_key``/``sdxl_turbo_hidiffusion_key``), translated to
ComfyUI ``UNetModel`` block indices.

All thresholds count *denoising steps actually run* (``N``); an operator is on at step ``i`` when
``i < int(N * ratio)`` with the reference's float expression, so rounding matches exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

Block = tuple[str, int]  # ("input", 4), ("output", 8)

# Reference: hidiffusion.py switching_threshold_ratio_dict (T1_ratio, T2_ratio).
REFERENCE_RATIOS: dict[str, tuple[float, float]] = {
    "sd15_1024": (0.4, 0.0),
    "sd15_2048": (0.7, 0.3),
    "sdxl_2048": (0.4, 0.0),
    "sdxl_4096": (0.7, 0.3),
    "sdxl_turbo_1024": (0.5, 0.0),
}
# Reference: aggressive_step = 8 (out of 50): SDXL's RAD runs on steps < int(8/50*N), then CA.
AGGRESSIVE_STEP = 8
# Latent side below which the smaller band applies (256 latent = 2048 px for SD, 512 = 4096 px for SDXL).
SD_BAND_LATENT = 256
SDXL_BAND_LATENT = 512

FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_turbo")
VARIANTS = ("auto", *FAMILIES)


@dataclass(frozen=True)
class Layout:
    """Where the HiDiffusion operators sit in a ComfyUI ``UNetModel`` of one architecture."""

    name: str
    n_input_blocks: int
    downsample_blocks: tuple[int, ...]
    attention_input_blocks: tuple[int, ...]
    rad_block: int            # input block holding the Downsample that becomes the dilated stride-4 conv
    ca_block: int             # input block after which features are avg-pooled
    msw_blocks: tuple[Block, ...]
    rad_ratio: str            # which threshold ("T1"/"T2") governs RAD in this family
    ca_ratio: str             # which threshold governs the pool/bicubic pair


SD_LAYOUT = Layout(
    name="sd", n_input_blocks=12, downsample_blocks=(3, 6, 9), attention_input_blocks=(1, 2, 4, 5, 7, 8),
    rad_block=3, ca_block=4,
    msw_blocks=(("input", 1), ("input", 2), ("output", 9), ("output", 10), ("output", 11)),
    rad_ratio="T1", ca_ratio="T2",
)
SDXL_LAYOUT = Layout(
    name="sdxl", n_input_blocks=9, downsample_blocks=(3, 6), attention_input_blocks=(4, 5, 7, 8),
    rad_block=6, ca_block=4,
    msw_blocks=(("input", 4), ("input", 5), ("output", 3), ("output", 4), ("output", 5)),
    rad_ratio="T2", ca_ratio="T1",
)
LAYOUTS = {"sd1": SD_LAYOUT, "sd2": SD_LAYOUT, "sdxl": SDXL_LAYOUT, "sdxl_turbo": SDXL_LAYOUT}

UPSCALE_MODES = ("bicubic", "bilinear", "nearest-exact", "area")
ODD_WINDOW_MODES = ("bicubic", "skip")


def ca_output_block(n_input_blocks: int, ca_block: int, after_skip: bool) -> int:
    """Output block whose ``h`` is restored to the skip size: ``n - i`` (reference) or ``n - 1 - i`` (after skip).

    Pooling before the skip push (reference) stores pooled skips, so ``h`` is restored just before it
    meets the first un-pooled skip (that of input ``i - 1``), at output ``n - i``. Pooling after the
    push keeps the skip of input ``i`` un-pooled, which output ``n - 1 - i`` concatenates.
    """
    return n_input_blocks - 1 - ca_block if after_skip else n_input_blocks - ca_block


@dataclass(frozen=True)
class HiDiffusionConfig:
    """What the user asked for. ``None`` fields mean "the reference's choice for this model and size"."""

    family: str
    raunet: bool = True
    msw_msa: bool = True
    t1_ratio: float | None = None
    t2_ratio: float | None = None
    aggressive: bool | None = None     # SDXL only; reference: on at the 2048 band unless inpainting/playground
    non_aggressive_model: bool = False  # SDXL inpainting / Playground (reference turns aggressive mode off)
    rad_block: int | None = None
    ca_block: int | None = None
    ca_after_skip: bool = False
    upscale_mode: str = "bicubic"
    odd_window_mode: str = "bicubic"
    controlnet_resize: bool = True
    seed: int = 0
    layout: Layout = field(default=SD_LAYOUT, compare=False)

    @property
    def rad(self) -> int:
        return self.layout.rad_block if self.rad_block is None else self.rad_block

    @property
    def ca(self) -> int:
        return self.layout.ca_block if self.ca_block is None else self.ca_block

    @property
    def ca_output(self) -> int:
        return ca_output_block(self.layout.n_input_blocks, self.ca, self.ca_after_skip)


def make_config(family: str, **options) -> HiDiffusionConfig:
    """A validated config for ``family`` (sd1, sd2, sdxl, sdxl_turbo); raises ``ValueError`` naming the input."""
    if family not in LAYOUTS:
        raise ValueError(f"model_variant must be one of {', '.join(FAMILIES)}, got {family!r}")
    config = replace(HiDiffusionConfig(family=family, layout=LAYOUTS[family]), **options)
    validate(config)
    return config


def validate(config: HiDiffusionConfig) -> None:
    """Refuse combinations the UNet cannot run, before sampling starts."""
    layout = config.layout
    for name in ("t1_ratio", "t2_ratio"):
        value = getattr(config, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1 (or -1 for the reference table), got {value}")
    if config.upscale_mode not in UPSCALE_MODES:
        raise ValueError(f"upscale_mode must be one of {', '.join(UPSCALE_MODES)}, got {config.upscale_mode!r}")
    if config.odd_window_mode not in ODD_WINDOW_MODES:
        raise ValueError(f"odd_window_mode must be one of {', '.join(ODD_WINDOW_MODES)}")
    if config.rad not in layout.downsample_blocks:
        raise ValueError(
            f"rad_block {config.rad} is not a downsampling block of this {layout.name.upper()} UNet; "
            f"use one of {', '.join(map(str, layout.downsample_blocks))} (reference: {layout.rad_block})")
    ca = config.ca
    if not 1 <= ca < layout.n_input_blocks or ca in layout.downsample_blocks:
        valid = [i for i in range(1, layout.n_input_blocks) if i not in layout.downsample_blocks]
        raise ValueError(
            f"ca_block {ca} cannot be pooled and restored (it must be a non-downsampling input block, "
            f"one of {', '.join(map(str, valid))}; reference: {layout.ca_block})")
    if config.family == "sdxl_turbo" and config.t2_ratio:
        raise ValueError("sdxl_turbo has no RAD (T2) stage in the reference; leave t2_ratio at -1 or 0")


@dataclass(frozen=True)
class StepPlan:
    """The resolved schedule for one sampling run: half-open step ranges per operator."""

    family: str
    band: str
    num_steps: int
    rad_steps: range
    ca_steps: range
    msw_msa: bool
    aggressive: bool

    def rad_active(self, step: int) -> bool:
        return step in self.rad_steps

    def ca_active(self, step: int) -> bool:
        return step in self.ca_steps


def resolution_band(family: str, latent_h: int, latent_w: int) -> str:
    """The reference's table key; the *smaller* side decides, in absolute latent pixels."""
    if family in ("sd1", "sd2"):
        return "sd15_1024" if latent_h < SD_BAND_LATENT or latent_w < SD_BAND_LATENT else "sd15_2048"
    if family == "sdxl":
        return "sdxl_2048" if latent_h < SDXL_BAND_LATENT or latent_w < SDXL_BAND_LATENT else "sdxl_4096"
    if family == "sdxl_turbo":
        return "sdxl_turbo_1024"
    raise ValueError(f"unknown family {family!r}")


def resolve_plan(config: HiDiffusionConfig, latent_h: int, latent_w: int, num_steps: int) -> StepPlan:
    """Which steps run RAD and the pool/bicubic pair, exactly as the reference counts them."""
    band = resolution_band(config.family, latent_h, latent_w)
    t1_ref, t2_ref = REFERENCE_RATIOS[band]
    t1 = t1_ref if config.t1_ratio is None else config.t1_ratio
    t2 = t2_ref if config.t2_ratio is None else config.t2_ratio
    n = num_steps
    empty = range(0)
    aggressive = False
    if not config.raunet:
        rad, ca = empty, empty
    elif config.family == "sdxl_turbo":
        rad, ca = empty, range(int(n * t1))
    elif config.family == "sdxl":
        if config.aggressive is None:
            aggressive = band == "sdxl_2048" and not config.non_aggressive_model
        else:
            aggressive = config.aggressive
        if aggressive:
            split = int(AGGRESSIVE_STEP / 50 * n)
            rad, ca = range(split), range(split, int(n * t1))
        else:
            rad, ca = range(int(n * t2)), range(int(n * t1))
    else:
        rad, ca = range(int(n * t1)), range(int(n * t2))
    return StepPlan(family=config.family, band=band, num_steps=n, rad_steps=rad, ca_steps=ca,
                    msw_msa=config.msw_msa, aggressive=aggressive)


def _steps(r: range) -> str:
    return "never" if len(r) == 0 else f"steps {r.start}-{r.stop - 1}"


def describe(config: HiDiffusionConfig, plan: StepPlan) -> str:
    """One log line, e.g. ``SDXL sdxl_2048 (aggressive), 50 steps: RAD input 6 steps 0-7, ...``."""
    parts = [f"{config.family.upper()} {plan.band}{' (aggressive)' if plan.aggressive else ''}, "
             f"{plan.num_steps} steps:"]
    if config.raunet:
        if config.family != "sdxl_turbo":
            parts.append(f"RAD input {config.rad} {_steps(plan.rad_steps)};")
        parts.append(f"pool input {config.ca}{' after skip' if config.ca_after_skip else ''} / "
                     f"{config.upscale_mode} output {config.ca_output} {_steps(plan.ca_steps)};")
    else:
        parts.append("RAU-Net off;")
    if config.msw_msa:
        groups = {}
        for kind, i in config.layout.msw_blocks:
            groups.setdefault(kind, []).append(str(i))
        blocks = " / ".join(f"{kind} {','.join(ids)}" for kind, ids in groups.items())
        parts.append(f"MSW-MSA {blocks} every step (seed {config.seed})")
    else:
        parts.append("MSW-MSA off")
    return " ".join(parts)

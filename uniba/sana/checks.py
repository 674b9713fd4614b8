"""Sana's input checks and memory estimates, from the facts in :mod:`uniba.sana.config`.

* Shapes of what the nodes hand to Sana: the latent (32 channels, not an SD latent), the text
  conditioning (Gemma-2 embeddings, not SD CLIP's 77 x 768/2048), batch sizes, the attention mask.
  Each error names the node input and what it expected.
* Memory of a Sana latent and of sampling it, against a budget, before anything is allocated.

The shared checks (NaN/inf, :class:`~uniba.guards.WorkTooLarge`) are in :mod:`uniba.guards`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..guards import WorkTooLarge, check_finite, check_whole_number
from ..memory import Budget, format_bytes
from ..wording import count
from .config import CAPTION_CHANNELS, LATENT_CHANNELS, LATENT_DOWNSCALE, SanaConfig, latent_shape

__all__ = [
    "check_sana_latent", "check_sana_conditioning", "check_sana_conditioning_input", "check_batch_matches",
    "conditioning_problem", "check_dit_inputs", "SOURCE_KEY", "latent_size_note",
    "check_context_mask", "sana_latent_bytes", "sana_sampling_bytes", "check_sana_memory", "check_sana_empty_latent",
    "check_sana_sampling", "SAMPLER_LATENT_COPIES", "FORWARD_VALUES_PER_TOKEN", "sana_sampling_peak_bytes",
]


def _shape(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


# The conditioning option SanaTextEncode adds: which encoder made the embeddings, so an error can name it.
SOURCE_KEY = "sana_text_encoder"
# Widths of other text encoders, for saying what was connected instead.
_OTHER_ENCODERS = {768: "SD 1.x CLIP (CLIPTextEncode)", 1024: "SD 2.x CLIP (CLIPTextEncode)",
                   1280: "SDXL CLIP (CLIPTextEncode)", 2048: "SDXL CLIP (CLIPTextEncode)",
                   4096: "T5 (CLIPTextEncode with a T5 encoder)"}


def check_sana_latent(samples: object, where: str = "latent_image",
                      channels: int = LATENT_CHANNELS) -> torch.Tensor:
    """A Sana latent: (B >= 1, C, h, w) with ``channels`` = the DiT's (or the DC-AE's) latent channels, finite.
    An SD/SDXL 4-channel latent gets the fix in the message."""
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.shape[1] != channels:
        found = samples.shape[1] if isinstance(samples, torch.Tensor) and samples.ndim == 4 else None
        hint = (" (an SD/SDXL latent?)" if found == 4 else "") \
            if found is not None else ""
        raise ValueError(
            f"{where}: expected a Sana latent of shape (batch, {channels}, height/{LATENT_DOWNSCALE}, "
            f"width/{LATENT_DOWNSCALE}), got {_shape(samples)}{hint}. Start from 'SanaEmptyLatent' or encode the "
            "image with the Sana DC-AE VAE, not an SD VAE.")
    if samples.shape[0] == 0 or min(samples.shape[2:]) == 0:
        raise ValueError(f"{where}: the latent is empty (shape {tuple(samples.shape)}); start from "
                         "'SanaEmptyLatent' with a batch_size of at least 1.")
    check_finite(samples, f"{where} (latent)", "Regenerate it: something upstream produced NaN or inf.")
    return samples


def conditioning_problem(context: object, channels: int, source: str | None = None) -> str | None:
    """Why ``context`` cannot be Sana text embeddings of width ``channels`` (the DiT's caption projection's
    input), naming what was connected; None when it can."""
    if not isinstance(context, torch.Tensor) or context.ndim != 3:
        return (f"expected Sana text conditioning of shape (batch, tokens, {channels}), got {_shape(context)}. "
                "Encode the prompt with 'SanaTextEncode'.")
    if context.shape[0] == 0 or context.shape[1] == 0:
        return (f"the text conditioning is empty (shape {tuple(context.shape)}): it holds no prompt. Encode a "
                "prompt with 'SanaTextEncode' (an empty text is fine).")
    found = context.shape[-1]
    if found == channels:
        return None
    if source:
        return (f"the text embeddings are {found} wide (from 'SanaTextEncode' with {source}), but this Sana DiT's "
                f"caption projection takes {channels}; load the text encoder this DiT was trained with "
                f"({'Gemma-2-2B' if channels == CAPTION_CHANNELS else f'one {channels} wide'}) in "
                "'SanaTextEncoderLoader'.")
    other = _OTHER_ENCODERS.get(found)
    made_by = f", the width of {other}" if other else ""
    return (f"the text embeddings are {found} wide{made_by}, but this Sana DiT's caption projection takes "
            f"{channels}; encode the prompt with 'SanaTextEncode' (load the encoder with 'SanaTextEncoderLoader').")


def check_sana_conditioning(context: object, where: str = "positive", channels: int = CAPTION_CHANNELS,
                            source: str | None = None) -> torch.Tensor:
    """Sana text conditioning: (B >= 1, tokens, ``channels``) embeddings, finite; the error names the input
    and what was connected (``source``: the encoder SanaTextEncode recorded, or the width's usual owner)."""
    problem = conditioning_problem(context, channels, source)
    if problem:
        raise ValueError(f"{where}: {problem}")
    check_finite(context, f"{where} (conditioning)")
    return context


def check_batch_matches(latent_batch: int, context_batch: int, latent_input: str = "latent_image",
                        context_input: str = "positive") -> None:
    """The conditioning's batch must be 1 (shared) or divide the latent's."""
    if context_batch < 1 or (context_batch not in (1, latent_batch) and latent_batch % context_batch):
        raise ValueError(
            f"{context_input}: holds {count(context_batch, 'prompt')} but {latent_input} holds "
            f"{count(latent_batch, 'latent')}; give one prompt for all latents or one per latent.")


def check_context_mask(context: torch.Tensor, mask: object, where: str = "positive") -> torch.Tensor | None:
    """The attention mask of a conditioning: (B, tokens) matching the embeddings, values 0/1."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[1] != context.shape[1] \
            or mask.shape[0] not in (1, context.shape[0]):
        raise ValueError(
            f"{where}: the attention_mask has shape {_shape(mask)} but the embeddings are "
            f"{tuple(context.shape)}; expected ({context.shape[0]}, {context.shape[1]}). Re-encode the prompt "
            "with 'SanaTextEncode' instead of combining conditionings of different lengths.")
    return mask


def check_sana_conditioning_input(conditioning: object, where: str, latent_batch: int | None = None,
                                  latent_input: str = "latent_image", channels: int = CAPTION_CHANNELS) -> None:
    """A node's CONDITIONING input for Sana: ``[[embeddings, {"attention_mask": mask, ...}], ...]``.

    Every entry must hold embeddings ``channels`` wide (the loaded DiT's caption width), a mask matching
    them, and a batch the latent can use; the error names ``where`` (the node input) and what was connected.
    """
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        empty = " (empty)" if isinstance(conditioning, (list, tuple)) else ""
        raise ValueError(f"{where}: expected a CONDITIONING from 'SanaTextEncode', got "
                         f"{type(conditioning).__name__}{empty}.")
    for entry in conditioning:
        if not isinstance(entry, (list, tuple)) or len(entry) < 2 or not isinstance(entry[1], Mapping):
            raise ValueError(f"{where}: a CONDITIONING entry is not [embeddings, options]; connect "
                             "'SanaTextEncode' to it.")
        context = check_sana_conditioning(entry[0], where, channels, entry[1].get(SOURCE_KEY))
        check_context_mask(context, entry[1].get("attention_mask"), where)
        if latent_batch is not None:
            check_batch_matches(latent_batch, context.shape[0], latent_input, where)


def check_dit_inputs(config: SanaConfig, x: object, timestep: object, context: object, mask: object) -> None:
    """The arguments of :meth:`SanaDiT.forward <uniba.sana.model.SanaDiT.forward>`: shapes only (cheap, every
    step), each error naming the argument, instead of a matmul or reshape error from inside the network."""
    channels = config.in_channels
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != channels:
        hint = (" This looks like a 4-channel SD/SDXL latent: Sana works on the 32-channel DC-AE latent at "
                "1/32 of the image size. Start from 'SanaEmptyLatent' or encode the image with the Sana DC-AE "
                "encoder.") if isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] == 4 else ""
        raise ValueError(f"x: Sana expects a latent of shape (batch, {channels}, height/{LATENT_DOWNSCALE}, "
                         f"width/{LATENT_DOWNSCALE}), got {_shape(x)}.{hint}")
    batch = x.shape[0]
    p = config.patch_size
    if batch == 0 or min(x.shape[2:]) == 0:
        raise ValueError(f"x: the latent is empty (shape {tuple(x.shape)}); give at least one latent.")
    if x.shape[-2] % p or x.shape[-1] % p:
        raise ValueError(f"x: Sana latent height and width must be multiples of the patch size {p}, "
                         f"got {tuple(x.shape[-2:])}.")
    steps = torch.as_tensor(timestep).numel() if isinstance(timestep, (torch.Tensor, int, float)) else -1
    if steps not in (1, batch):
        raise ValueError(f"timestep: expected one value or one per latent ({batch}), got "
                         f"{_shape(timestep) if steps >= 0 else type(timestep).__name__}.")
    problem = conditioning_problem(context, config.caption_channels)
    if problem:
        raise ValueError(f"context: {problem}")
    check_batch_matches(batch, context.shape[0], "x", "context")
    if mask is not None:
        check_context_mask(context, mask.reshape(mask.shape[0], -1) if isinstance(mask, torch.Tensor) else mask,
                           "context_mask")
        check_batch_matches(batch, mask.shape[0], "x", "context_mask")


def sana_latent_bytes(batch: int, height: int, width: int, channels: int = LATENT_CHANNELS,
                      element_size: int = 4) -> int:
    """Bytes of one latent tensor (B, C, h, w), float32 by default (as ComfyUI's samplers hold it)."""
    return int(batch) * int(channels) * int(height) * int(width) * int(element_size)


# float32 latent-sized tensors a flow sampler holds at once: x, noise, denoised, the previous
# denoised (multistep), the velocity and the output.
SAMPLER_LATENT_COPIES = 6


def sana_sampling_bytes(batch: int, height: int, width: int, *, hidden_size: int = 1152,
                        mlp_ratio: float = 2.5, element_size: int = 2, cfg: bool = True) -> int:
    """A lower bound of sampling memory above the weights: the sampler's latent copies plus the
    activations of one forward over all tokens (CFG doubles the batch).

    Per token a Sana block holds at least the hidden state, its normed copy, q, k, v, the attention
    output (6 hidden-sized values) and the GLU feed-forward's 2 x ffn hidden values. It is a lower
    bound on purpose: work refused by it cannot run, whatever the real peak is.
    """
    forward_batch = int(batch) * (2 if cfg else 1)
    tokens = int(height) * int(width)
    per_token = (6 * hidden_size + 2 * int(hidden_size * mlp_ratio)) * element_size
    return SAMPLER_LATENT_COPIES * sana_latent_bytes(batch, height, width) + forward_batch * tokens * per_token


# Hidden-sized float32 values one forward holds per latent token at its peak: 13.3-13.4 measured (peak RSS of a
# fresh process, 48x48 and 64x64 latents, batch 2) for the 600M, 1600M and 4.8B widths; rounded up. Half-precision
# runs keep the linear attention's sums in float32, so this float32 figure is the safe side for them too.
FORWARD_VALUES_PER_TOKEN = 14


def sana_sampling_peak_bytes(batch: int, height: int, width: int, *, hidden_size: int, cfg: bool = True) -> int:
    """An estimate of sampling's peak above the weights (the planning figure, not a lower bound): the sampler's
    latent copies plus one forward over all tokens at the measured per-token peak (CFG doubles the batch)."""
    forward_batch = int(batch) * (2 if cfg else 1)
    per_token = FORWARD_VALUES_PER_TOKEN * int(hidden_size) * 4
    return SAMPLER_LATENT_COPIES * sana_latent_bytes(batch, height, width) + forward_batch * height * width * per_token


def check_sana_memory(needed: int, free_bytes: int | None, what: str, *, batch: int, width_px: int,
                      height_px: int, safety_fraction: float = 0.1) -> None:
    """Refuse work whose estimated memory exceeds the budget, with the figures and what to change."""
    if free_bytes is None:
        return
    usable = Budget(int(free_bytes), safety_fraction).usable
    if needed <= usable:
        return
    # the largest batch and the largest square side that would fit, for the message
    fit_batch = max(0, int(batch * usable // max(1, needed)))
    scale = math.sqrt(usable / max(1, needed))
    side = int(math.sqrt(width_px * height_px) * scale) // LATENT_DOWNSCALE * LATENT_DOWNSCALE
    options = []
    if fit_batch >= 1 and batch > 1:
        options.append(f"a batch of {fit_batch} or fewer")
    if side >= LATENT_DOWNSCALE:
        options.append(f"a smaller image (about {side}x{side} px at this batch)")
    options.append("free memory (unload other models)")
    raise WorkTooLarge(
        f"{what}: {count(batch, 'image')} of {width_px}x{height_px} px need at least {format_bytes(needed)}, "
        f"but only {format_bytes(usable)} of {format_bytes(free_bytes)} free can be used. "
        f"Use {' or '.join(options)}.")


def check_sana_empty_latent(batch: int, width_px: int, height_px: int, free_bytes: int | None,
                            what: str = "SanaEmptyLatent") -> tuple[int, int, int, int]:
    """The latent shape for an image size, refused before allocation when it cannot fit ``free_bytes``.

    ``free_bytes`` is the free memory of the device the latent is created on (ComfyUI's intermediate
    device, usually system RAM); ``None`` skips the memory check.
    """
    for name, value, least in (("width", width_px, LATENT_DOWNSCALE), ("height", height_px, LATENT_DOWNSCALE),
                               ("batch_size", batch, 1)):
        check_whole_number(value, f"{what}: {name}", least)
    shape = latent_shape(int(width_px), int(height_px), int(batch))
    check_sana_memory(sana_latent_bytes(shape[0], shape[2], shape[3]), free_bytes, what, batch=shape[0],
                      width_px=shape[3] * LATENT_DOWNSCALE, height_px=shape[2] * LATENT_DOWNSCALE)
    return shape


def latent_size_note(width_px: int, height_px: int, shape: tuple[int, ...]) -> str | None:
    """What a latent ``shape`` made for ``width_px`` x ``height_px`` will decode to, when that differs (a side
    not a multiple of 32 is rounded down): said, not done silently. None when the sizes match."""
    got_w, got_h = shape[-1] * LATENT_DOWNSCALE, shape[-2] * LATENT_DOWNSCALE
    if (got_w, got_h) == (int(width_px), int(height_px)):
        return None
    return (f"{width_px}x{height_px} px is not a multiple of {LATENT_DOWNSCALE} on each side: the latent makes "
            f"a {got_w}x{got_h} px image. Use multiples of {LATENT_DOWNSCALE} to get the size asked for.")


def check_sana_sampling(samples: torch.Tensor, free_bytes: int | None, *, hidden_size: int, mlp_ratio: float = 2.5,
                        element_size: int = 2, cfg: bool = True, what: str = "SanaSampler") -> None:
    """Refuse sampling a latent whose lower-bound working memory exceeds ``free_bytes`` (weights excluded)."""
    batch, _, height, width = samples.shape
    needed = sana_sampling_bytes(batch, height, width, hidden_size=hidden_size, mlp_ratio=mlp_ratio,
                                 element_size=element_size, cfg=cfg)
    check_sana_memory(needed, free_bytes, what, batch=batch, width_px=width * LATENT_DOWNSCALE,
                      height_px=height * LATENT_DOWNSCALE)

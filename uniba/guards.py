"""Checks at the points where data enters or leaves the engine, so that nothing fails silently.

* Non-finite values (NaN, inf): in an input image or latent, in what a sampler produces at a step,
  in a decoded image. A NaN that reaches a saved image turns into black pixels without any message,
  so every path that ends in pixels checks first and raises :class:`NonFiniteError` saying where the
  values came from (loaded weights are checked by :mod:`uniba.checkpoint`, with the same scan from
  :mod:`uniba.finite`).
* Shapes of what the nodes hand to Sana: the latent (32 channels, not an SD latent), the text
  conditioning (Gemma-2 embeddings, not SD CLIP's 77 x 768/2048), batch sizes, the attention mask.
  Each error names the node input and what it expected.
* Memory of a Sana latent and of sampling it, against a budget, before anything is allocated.
* Config values read from checkpoint metadata (:func:`config_from_metadata`): invalid JSON or
  impossible values become a :class:`~uniba.checkpoint.CheckpointError` naming the file.

Everything here is host-free (torch only); the nodes call these functions with their input names.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

from .checkpoint import CheckpointError
from .finite import describe_non_finite, first_non_finite
from .memory import Budget, format_bytes

__all__ = [
    "NonFiniteError", "WorkTooLarge", "check_finite", "finite_denoiser", "check_step_finite",
    "check_sana_latent", "check_sana_conditioning", "check_sana_conditioning_input", "check_batch_matches",
    "check_context_mask",
    "sana_latent_bytes", "sana_sampling_bytes", "check_sana_memory", "check_sana_empty_latent", "check_sana_sampling",
    "config_from_metadata", "validate_config",
]

T = TypeVar("T")

class NonFiniteError(ValueError):
    """NaN or infinity where numbers were expected; the message says where they came from."""


class WorkTooLarge(ValueError):
    """Work whose estimated memory exceeds the budget; refused before allocating (not an OOM to retry)."""


def check_finite(tensor: torch.Tensor, where: str, fix: str = "") -> torch.Tensor:
    """Raise :class:`NonFiniteError` naming ``where`` when ``tensor`` holds NaN or inf; return it otherwise."""
    found = first_non_finite(tensor)
    if found is not None:
        message = f"{where}: {describe_non_finite(tensor, found)}."
        raise NonFiniteError(message + (f" {fix}" if fix else ""))
    return tensor


def check_step_finite(tensor: torch.Tensor, step: int, total: int, where: str, sigma: float | None = None) -> None:
    """The sampler's output at ``step`` (0-based) of ``total`` must be finite."""
    at = f"step {step + 1} of {total}" + (f" (sigma {sigma:.4g})" if sigma is not None else "")
    check_finite(tensor, f"{where} produced non-finite values at {at}",
                 "Try float32 or bfloat16 instead of float16 (float16 overflows in many models), fewer or "
                 "different steps, or check the inputs.")


def finite_denoiser(denoiser: Callable[..., torch.Tensor], sigmas: torch.Tensor,
                    where: str) -> Callable[..., torch.Tensor]:
    """Wrap a k-diffusion denoiser ``D(x, sigma, **kw)`` so a non-finite result names its step and sigma.

    The step is the index of ``sigma`` in ``sigmas`` (Heun's second evaluation at ``sigmas[i + 1]``
    is reported as step ``i + 2``, the step whose noise level it evaluates).
    """
    levels = [float(s) for s in sigmas.flatten()]
    total = max(1, len(levels) - 1)

    def checked(x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = denoiser(x, sigma, **kwargs)
        if first_non_finite(out) is not None:
            value = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
            step = min(range(len(levels)), key=lambda i: abs(levels[i] - value)) if levels else 0
            check_step_finite(out, min(step, total - 1), total, where, value)
        return out

    return checked


def finite_callback(callback: Callable[[dict], Any] | None, total: int, where: str) -> Callable[[dict], Any]:
    """A k-diffusion ``callback`` that checks ``denoised`` at every step, then calls ``callback``.

    For samplers run by a host (ComfyUI's ``sample_custom``), where the denoiser cannot be wrapped.
    """

    def checked(info: dict) -> Any:
        denoised = info.get("denoised")
        if isinstance(denoised, torch.Tensor):
            sigma = info.get("sigma")
            check_step_finite(denoised, int(info.get("i", 0)), total, where,
                              None if sigma is None else float(torch.as_tensor(sigma).flatten()[0]))
        return callback(info) if callback is not None else None

    return checked


# --------------------------------------------------------------------------- Sana inputs

SANA_LATENT_CHANNELS = 32
SANA_CAPTION_CHANNELS = 2304  # Gemma-2-2B hidden size
SANA_DOWNSCALE = 32


def _shape(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def check_sana_latent(samples: object, where: str = "latent_image",
                      channels: int = SANA_LATENT_CHANNELS) -> torch.Tensor:
    """A Sana latent: (B, 32, h, w), finite. An SD/SDXL 4-channel latent gets the fix in the message."""
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.shape[1] != channels:
        found = samples.shape[1] if isinstance(samples, torch.Tensor) and samples.ndim == 4 else None
        hint = (" (an SD/SDXL latent?)" if found == 4 else "") if found is not None else ""
        raise ValueError(
            f"{where}: expected a Sana latent of shape (batch, {channels}, height/{SANA_DOWNSCALE}, "
            f"width/{SANA_DOWNSCALE}), got {_shape(samples)}{hint}. Start from 'SanaEmptyLatent' or encode the "
            "image with the Sana DC-AE VAE, not an SD VAE.")
    check_finite(samples, f"{where} (latent)", "Regenerate it: something upstream produced NaN or inf.")
    return samples


def check_sana_conditioning(context: object, where: str = "positive",
                            channels: int = SANA_CAPTION_CHANNELS) -> torch.Tensor:
    """Sana text conditioning: (B, tokens, 2304) Gemma-2 embeddings. SD CLIP's 77 x 768/1024/2048 is refused."""
    if not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[-1] != channels:
        found = context.shape[-1] if isinstance(context, torch.Tensor) and context.ndim == 3 else None
        hint = ""
        if found in (768, 1024, 1280, 2048):
            hint = " (CLIP text embeddings of an SD/SDXL text encoder)"
        elif found == 4096:
            hint = " (T5 embeddings?)"
        raise ValueError(
            f"{where}: expected Sana text conditioning of shape (batch, tokens, {channels}) from the Gemma-2 "
            f"text encoder, got {_shape(context)}{hint}. Encode the prompt with 'SanaTextEncode' "
            "(load the encoder with 'SanaTextEncoderLoader'), not CLIPTextEncode.")
    check_finite(context, f"{where} (conditioning)")
    return context


def check_batch_matches(latent_batch: int, context_batch: int, latent_input: str = "latent_image",
                        context_input: str = "positive") -> None:
    """The conditioning's batch must be 1 (shared) or equal to the latent's."""
    if context_batch not in (1, latent_batch) and latent_batch % context_batch:
        raise ValueError(
            f"{context_input}: holds {_count(context_batch, 'prompt')} but {latent_input} holds "
            f"{_count(latent_batch, 'latent')}; give one prompt for all latents or one per latent.")


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
                                  latent_input: str = "latent_image") -> None:
    """A node's CONDITIONING input for Sana: ``[[embeddings, {"attention_mask": mask, ...}], ...]``.

    Every entry must hold Gemma-2 embeddings (not SD CLIP's), a mask matching them, and a batch the
    latent can use; the error names ``where`` (the node input) and what was expected.
    """
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        empty = " (empty)" if isinstance(conditioning, (list, tuple)) else ""
        raise ValueError(f"{where}: expected a CONDITIONING from 'SanaTextEncode', got "
                         f"{type(conditioning).__name__}{empty}.")
    for entry in conditioning:
        if not isinstance(entry, (list, tuple)) or len(entry) < 2 or not isinstance(entry[1], Mapping):
            raise ValueError(f"{where}: a CONDITIONING entry is not [embeddings, options]; connect "
                             "'SanaTextEncode' to it.")
        context = check_sana_conditioning(entry[0], where)
        check_context_mask(context, entry[1].get("attention_mask"), where)
        if latent_batch is not None:
            check_batch_matches(latent_batch, context.shape[0], latent_input, where)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def sana_latent_bytes(batch: int, height: int, width: int, channels: int = SANA_LATENT_CHANNELS,
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
    side = int(math.sqrt(width_px * height_px) * scale) // SANA_DOWNSCALE * SANA_DOWNSCALE
    options = []
    if fit_batch >= 1 and batch > 1:
        options.append(f"a batch of {fit_batch} or fewer")
    if side >= SANA_DOWNSCALE:
        options.append(f"a smaller image (about {side}x{side} px at this batch)")
    options.append("free memory (unload other models)")
    raise WorkTooLarge(
        f"{what}: {_count(batch, 'image')} of {width_px}x{height_px} px need at least {format_bytes(needed)}, "
        f"but only {format_bytes(usable)} of {format_bytes(free_bytes)} free can be used. "
        f"Use {' or '.join(options)}.")


def check_sana_empty_latent(batch: int, width_px: int, height_px: int, free_bytes: int | None,
                            what: str = "SanaEmptyLatent") -> tuple[int, int, int, int]:
    """The latent shape for an image size, refused before allocation when it cannot fit ``free_bytes``.

    ``free_bytes`` is the free memory of the device the latent is created on (ComfyUI's intermediate
    device, usually system RAM); ``None`` skips the memory check.
    """
    shape = (int(batch), SANA_LATENT_CHANNELS, max(1, int(height_px) // SANA_DOWNSCALE),
             max(1, int(width_px) // SANA_DOWNSCALE))
    check_sana_memory(sana_latent_bytes(shape[0], shape[2], shape[3]), free_bytes, what, batch=shape[0],
                      width_px=shape[3] * SANA_DOWNSCALE, height_px=shape[2] * SANA_DOWNSCALE)
    return shape


def check_sana_sampling(samples: torch.Tensor, free_bytes: int | None, *, hidden_size: int, mlp_ratio: float = 2.5,
                        element_size: int = 2, cfg: bool = True, what: str = "SanaSampler") -> None:
    """Refuse sampling a latent whose lower-bound working memory exceeds ``free_bytes`` (weights excluded)."""
    batch, _, height, width = samples.shape
    needed = sana_sampling_bytes(batch, height, width, hidden_size=hidden_size, mlp_ratio=mlp_ratio,
                                 element_size=element_size, cfg=cfg)
    check_sana_memory(needed, free_bytes, what, batch=batch, width_px=width * SANA_DOWNSCALE,
                      height_px=height * SANA_DOWNSCALE)


# --------------------------------------------------------------------------- configs from metadata

def _field_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to the defaults' types
        return {f.name: type(f.default) for f in dataclasses.fields(cls)}


def _check_value(name: str, value: Any, hint: Any) -> str | None:
    """Why ``value`` is impossible for a field of type ``hint`` (None if it is fine)."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if dataclasses.is_dataclass(hint):
        if not dataclasses.is_dataclass(value):
            return f"{name} must be an object, got {value!r}"
        problems = _config_problems(value)
        return f"{name}: {problems[0]}" if problems else None
    if hint is bool:
        return None if isinstance(value, bool) else f"{name} must be true or false, got {value!r}"
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{name} must be a whole number, got {value!r}"
        return None if value >= 1 else f"{name} must be at least 1, got {value}"
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name} must be a number, got {value!r}"
        return None if math.isfinite(value) and value > 0 else f"{name} must be a positive number, got {value}"
    return None


def _config_problems(config: Any) -> list[str]:
    hints = _field_types(type(config))
    problems = []
    for f in dataclasses.fields(config):
        problem = _check_value(f.name, getattr(config, f.name), hints.get(f.name, Any))
        if problem:
            problems.append(problem)
    return problems


def validate_config(config: T, path: str | os.PathLike | None, source: str = "its config") -> T:
    """Every int field a whole number >= 1, every float finite and > 0, bools bools; else CheckpointError.

    (No field of the model configs can be zero or negative: widths, depths, head counts, patch and
    block sizes, epsilons, shifts, interpolation factors.)
    """
    problems = _config_problems(config)
    if problems:
        raise CheckpointError(path, f"{source} has impossible values: {'; '.join(problems[:4])}.",
                              "The file's metadata is damaged: convert the original release again.")
    return config


def config_from_metadata(parse: Callable[[str], T], text: object, path: str | os.PathLike | None,
                         key: str = "config") -> T:
    """Parse a config stored as JSON in a file's metadata and validate it (CheckpointError naming the file)."""
    if not isinstance(text, str):
        raise CheckpointError(path, f"has a '{key}' metadata entry that is not text ({type(text).__name__}).",
                              "Convert the original release again.")
    try:
        config = parse(text)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(path, f"has '{key}' metadata that is not valid JSON ({exc}).",
                              "The file's metadata is damaged: convert the original release again.") from None
    except (TypeError, AttributeError, KeyError) as exc:
        raise CheckpointError(path, f"has '{key}' metadata of the wrong form ({exc}).",
                              "The file's metadata is damaged: convert the original release again.") from None
    return validate_config(config, path, f"the '{key}' metadata")

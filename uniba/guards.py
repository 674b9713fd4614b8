"""Checks every family shares, at the points where data enters or leaves the engine, so nothing fails silently.

* Non-finite values (NaN, inf): in an input image or latent, in what a sampler produces at a step,
  in a decoded image. A NaN that reaches a saved image turns into black pixels without any message,
  so every path that ends in pixels checks first and raises :class:`NonFiniteError` saying where the
  values came from (loaded weights are checked by :mod:`uniba.checkpoint`, with the same scan from
  :mod:`uniba.finite`).
* :class:`WorkTooLarge`: work refused before allocating because its estimate exceeds the budget.
* Config values (:func:`validate_config`): impossible values become a
  :class:`~uniba.checkpoint.CheckpointError` naming the file (configs stored in metadata are read by
  :mod:`uniba.metadata`).
* Values handed to the engine's public functions and the nodes (:func:`check_image`, :func:`check_seed`,
  :func:`check_choice`, :func:`check_whole_number`, :func:`check_text`): one sentence naming the input, what
  it got and the fix, instead of a library error from deep inside (or a silently wrong image).

Family-specific checks live beside the family's config (Sana's shapes and memory estimates:
:mod:`uniba.sana.checks`). Everything here is host-free (torch only).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from .checkpoint import CheckpointError
from .finite import describe_non_finite, first_non_finite

__all__ = [
    "NonFiniteError", "WorkTooLarge", "check_finite", "finite_denoiser", "check_step_finite", "check_denoised_finite",
    "validate_config", "check_image", "check_seed", "check_choice", "check_whole_number",
    "check_text",
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


_STEP_FIX = ("Try float32 or bfloat16 instead of float16 (float16 overflows in many models), fewer or different "
             "steps, or check the inputs.")


def check_step_finite(tensor: torch.Tensor, step: int, total: int, where: str, sigma: float | None = None) -> None:
    """The sampler's output at ``step`` (0-based) of ``total`` must be finite."""
    at = f"step {step + 1} of {total}" + (f" (sigma {sigma:.4g})" if sigma is not None else "")
    check_finite(tensor, f"{where} produced non-finite values at {at}", _STEP_FIX)


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


def check_denoised_finite(denoised: torch.Tensor, sigma: torch.Tensor | float, where: str) -> torch.Tensor:
    """A model's prediction at noise level ``sigma`` must be finite. For samplers a host runs (a stock
    KSampler), whose step the model cannot see: the message names the noise level instead."""
    value = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
    return check_finite(denoised, f"{where} produced non-finite values at sigma {value:.4g}", _STEP_FIX)


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


# --------------------------------------------------------------------------- values at the public functions

SEED_MAX = 2**64 - 1  # what torch's generators (and ComfyUI's seed widgets) take


def check_whole_number(value: object, where: str, minimum: int = 1) -> int:
    """A whole number >= ``minimum`` (an int, or an integral float/str such as a JSON "20"); else ValueError."""
    number: int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]{1,99}", value.strip()):
        number = int(value)  # ASCII digits only: str.isdigit() also takes "²" (int() fails) and other scripts
    if number is None:
        raise ValueError(f"{where}: expected a whole number, got {_show(value)}.")
    if number < minimum:
        raise ValueError(f"{where}: must be at least {minimum}, got {number}.")
    return number


def check_seed(value: object, where: str = "seed") -> int:
    """A seed from 0 to 2**64 - 1 (what the host's seed widget offers and torch's generators accept)."""
    seed = check_whole_number(value, where, minimum=0)
    if seed > SEED_MAX:
        raise ValueError(f"{where}: must be from 0 to {SEED_MAX} (2**64 - 1), got {seed}; use a smaller seed.")
    return seed


def check_choice(value: object, choices: tuple[int, ...], where: str) -> int:
    """One of the whole-number ``choices`` (given as a number or its text, e.g. a node's "4")."""
    try:
        number = check_whole_number(value, where, minimum=-(2**63))
    except ValueError:
        number = None
    if number not in choices:
        raise ValueError(f"{where}: must be one of {', '.join(map(str, choices))}, got {_show(value)}.")
    return number


def check_text(value: object, where: str) -> str:
    """Text that can be encoded: a str without lone surrogates (half of a UTF-16 pair, e.g. from a broken paste)."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected text, got {type(value).__name__}.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where}: character {exc.start + 1} is {value[exc.start]!r}, half of a character pair "
                         "(a lone surrogate, e.g. from a broken copy and paste), which is not text; delete it and "
                         "type the character again.") from None
    return value


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_image(image: object, where: str, *, channels_last: bool, value_range: tuple[float, float],
                channels: tuple[int, ...] = (3, 4), fix_range: str = "") -> torch.Tensor:
    """An image batch for a public function: 4-D, at least one image, the channel axis where it is expected,
    a channel count of ``channels``, finite values within ``value_range`` (0..255 pixels are refused, not
    taken as very bright numbers). A 3-D tensor is taken as one image. Each error names ``where``, what it
    got and the fix (transpose, rescale, drop channels).
    """
    layout = "(batch, height, width, channels)" if channels_last else "(batch, channels, height, width)"
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"{where}: expected an image tensor {layout}, got {type(image).__name__}.")
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise ValueError(f"{where}: expected an image tensor {layout}, got shape {tuple(image.shape)}.")
    if image.shape[0] == 0:
        raise ValueError(f"{where}: the batch is empty (shape {tuple(image.shape)}); give at least one image.")
    axis, other = (-1, 1) if channels_last else (1, -1)
    wanted = " or ".join(map(str, channels))
    if image.shape[axis] not in channels:
        if image.shape[other] in channels and image.shape[axis] > max(channels):
            turn = "image.movedim(1, -1)" if channels_last else "image.movedim(-1, 1)"
            kind = "channels first" if channels_last else "channels last (like a ComfyUI IMAGE)"
            raise ValueError(f"{where}: shape {tuple(image.shape)} looks {kind}, but {layout} is expected; "
                             f"pass {turn}.")
        keep = "image[..., :{n}]" if channels_last else "image[:, :{n}]"
        fix = f" Keep the colour channels ({keep.format(n=max(channels))})." if image.shape[axis] > max(channels) \
            else ""
        raise ValueError(f"{where}: has {image.shape[axis]} channels (shape {tuple(image.shape)}); expected "
                         f"{wanted} ({'RGB, RGBA' if channels == (3, 4) else 'channels'}).{fix}")
    height, width = image.shape[1:3] if channels_last else image.shape[2:]
    if min(height, width) < 1:
        raise ValueError(f"{where}: is {width}x{height} px (shape {tuple(image.shape)}); give an image of at least "
                         "1x1 px.")
    check_finite(image, where, "Replace the NaN/inf pixels (something upstream produced them).")
    if image.is_floating_point():
        low, high = (float(v) for v in torch.aminmax(image.detach()))
        lo, hi = value_range
        slack = 0.5 * (hi - lo)  # sharpening or resampling overshoots a little: that is fine
        if low < lo - slack or high > hi + slack:
            looks = " It looks like 0..255 pixel values." if high > 2 and low >= lo - slack else ""
            raise ValueError(f"{where}: values reach {low:.4g}..{high:.4g}, but {lo:g}..{hi:g} is expected.{looks} "
                             f"{fix_range or f'Rescale it to {lo:g}..{hi:g}.'}")
    elif not image.is_floating_point():
        raise ValueError(f"{where}: holds {image.dtype} values; expected floating-point values in "
                         f"{value_range[0]:g}..{value_range[1]:g} ({fix_range or 'convert and rescale it'}).")
    return image

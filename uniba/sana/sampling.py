"""Flow-matching samplers for Sana, in k-diffusion's shape.

Each sampler is ``sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None)``
where ``model(x, sigma * ones(B), **extra_args)`` returns the x0 (data) prediction, as ComfyUI
and k-diffusion hand a denoiser to their samplers. For Sana's rectified flow
``x_sigma = (1 - sigma) * x0 + sigma * noise`` and the network predicts ``v = noise - x0``, so the
host's denoiser is ``x0 = x - sigma * v`` (ComfyUI's ``CONST`` model sampling). Every step's
prediction is checked for NaN/inf (:func:`uniba.guards.check_step_finite`), so a diverging model
stops with the step named instead of decoding to a black image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import trange

from ..guards import check_step_finite, check_whole_number
from .config import DEFAULT_SHIFT, SHIFT_4K

NUM_TRAIN_TIMESTEPS = 1000

__all__ = ["check_shift", "flow_sigmas", "sample_flow_dpm_solver", "sample_flow_euler", "shift_sigma", "start_noise"]


def shift_sigma(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Sana's resolution shift of the flow time: ``shift * t / (1 + (shift - 1) * t)``."""
    return shift * t / (1 + (shift - 1) * t)


def check_shift(shift: object, where: str = "shift") -> float:
    """A flow shift is a finite number > 0: at 0 every sigma is 0 (the sampler returns its input unchanged),
    below 0 the grid leaves [0, 1] and the model produces NaN."""
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"{where}: must be a number above 0 ({DEFAULT_SHIFT} for Sana up to 2K, {SHIFT_4K} for 4K), "
                         f"got {shift!r}; a shift of 0 makes every sigma 0 and a negative one gives NaN.")
    return float(shift)


def flow_sigmas(steps: int, shift: float = DEFAULT_SHIFT, *, kind: str = "dpm_solver",
                denoise: float = 1.0) -> torch.Tensor:
    """Sana's shifted sigma grid: ``steps + 1`` values, descending, ending in 0 (float32).

    * ``kind="dpm_solver"`` (Flow-DPM-Solver, ``time_uniform_flow``): ``t = linspace(1, 1/1000, steps + 1)``,
      ``sigma = shift(1 - t)`` reversed without its last value, then 0 — identical to diffusers'
      ``DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)``; the first sigma is
      ``shift(0.999)`` (0.99967 for shift 3).
    * ``kind="euler"`` (Flow-Euler): diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift)`` grid,
      ``sigma = shift(linspace(1, shift(1/1000), steps))`` then 0 (its low end is shifted twice).

    ``denoise < 1`` keeps the last ``steps`` intervals of a ``int(steps / denoise)``-step grid (as
    ComfyUI's schedulers do) for image-to-image.
    """
    steps = check_whole_number(steps, "steps")
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    check_shift(shift)
    total = steps if denoise >= 1.0 else int(steps / denoise)
    if kind == "dpm_solver":
        t = torch.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, total + 1, dtype=torch.float64)
        sigmas = shift_sigma(1.0 - t, shift).flip(0)[:-1]
    elif kind == "euler":
        low = shift_sigma(1.0 / NUM_TRAIN_TIMESTEPS, shift)
        sigmas = shift_sigma(torch.linspace(1.0, low, total, dtype=torch.float64), shift)
    else:
        raise ValueError(f"unknown sigma grid {kind!r}: use 'dpm_solver' or 'euler'")
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)
    return sigmas[-(steps + 1):]


def start_noise(noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Noise for a host that starts text-to-image at ``sigmas[0] * noise`` (k-diffusion, ComfyUI).

    Sana starts from unit noise itself although its first sigma is ``shift(0.999)``, just below 1; so
    the noise is divided by that sigma, and the host's product is Sana's start exactly.
    """
    return noise / sigmas[0]


def _half_log_snr(sigma: float) -> float:
    """The flow step variable lambda = log(alpha / sigma) = log((1 - sigma) / sigma)."""
    if sigma <= 0.0:
        return math.inf
    if sigma >= 1.0:
        return -math.inf
    return math.log(1.0 - sigma) - math.log(sigma)


@torch.no_grad()
def sample_flow_dpm_solver(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
                           extra_args: dict[str, Any] | None = None, callback: Callable[[dict], None] | None = None,
                           disable: bool | None = None) -> torch.Tensor:
    """Flow-DPM-Solver: DPM-Solver++(2M) (Lu et al., arXiv 2211.01095) in Sana's flow parametrisation.

    Sana (Xie et al., arXiv 2410.10629, §2.4 "Flow-DPM-Solver") runs DPM-Solver++ multistep of
    order 2 with ``alpha = 1 - sigma`` and the step variable ``lambda = log((1 - sigma) / sigma)``,
    data prediction, midpoint second-order correction, and first-order first and last steps
    (``lower_order_final``); the last step to sigma 0 returns the data prediction. Same results as
    diffusers' ``DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")``.
    ComfyUI's stock ``dpmpp_2m`` steps in ``-log(sigma)`` instead and is a different solver.
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    steps = len(sigmas) - 1
    old_denoised = None
    old_lambda = -math.inf
    for i in trange(steps, disable=disable):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        check_step_finite(denoised, i, steps, "Flow-DPM-Solver", sigma)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        lam, lam_next = _half_log_snr(sigma), _half_log_snr(sigma_next)
        if sigma_next <= 0.0:
            x = denoised
        else:
            h = lam_next - lam
            phi = math.expm1(-h)  # e^{-h} - 1
            alpha_next = 1.0 - sigma_next
            first_order = old_denoised is None or i == steps - 1 or not math.isfinite(old_lambda) or h == math.inf
            if first_order:
                d = denoised
            else:
                r = (lam - old_lambda) / h
                d = denoised + (denoised - old_denoised) / (2.0 * r)
            x = (sigma_next / sigma) * x - (alpha_next * phi) * d
        old_denoised, old_lambda = denoised, lam
    return x


@torch.no_grad()
def sample_flow_euler(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
                      extra_args: dict[str, Any] | None = None, callback: Callable[[dict], None] | None = None,
                      disable: bool | None = None) -> torch.Tensor:
    """Flow-Euler: the Euler ODE step of rectified flow (Liu et al., arXiv 2209.03003; Esser et al., 2403.03206).

    ``x <- x + (sigma_next - sigma) * v`` with ``v = (x - x0) / sigma``; Sana's ``FlowEuler``
    (= diffusers ``FlowMatchEulerDiscreteScheduler``), 28 steps by default on ``flow_sigmas(kind="euler")``.
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma = sigmas[i]
        denoised = model(x, sigma * s_in, **extra_args)
        check_step_finite(denoised, i, len(sigmas) - 1, "Flow-Euler", float(sigma))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        velocity = (x - denoised) / sigma
        x = x + velocity * (sigmas[i + 1] - sigma)
    return x


def velocity_denoiser(velocity_model: Callable[..., torch.Tensor],
                      timestep_scale: float = NUM_TRAIN_TIMESTEPS) -> Callable[..., torch.Tensor]:
    """Wrap ``velocity_model(x, timestep, **kw)`` (e.g. :class:`SanaDiT`) as a k-diffusion x0 denoiser."""

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        v = velocity_model(x, sigma * timestep_scale, **kwargs)
        return x - sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype) * v.to(x.dtype)

    return denoiser

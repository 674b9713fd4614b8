"""Samplers for Inf-DiT's EDM denoiser, shaped like k-diffusion's ``sampling.py``.

Every sampler is a pure function ``sample_x(model, x, sigmas, extra_args=None, callback=None,
disable=None, **options)`` where ``model(x, sigma, **extra_args)`` is the denoiser D(x; sigma) and
``sigmas`` a decreasing 1-D tensor ending in 0. So ComfyUI's own samplers (a SAMPLER wraps exactly
such a function) drive the same block-wise denoiser, and these drive ComfyUI's.

The reference is EDM Heun (Karras et al. 2022), 20 steps on a Karras schedule = 39 evaluations.
Samplers that inject noise take a ``noise_sampler(sigma, sigma_next)``; :func:`cpu_noise_sampler`
draws it on a seeded CPU generator, so a run is identical on every device and block batch.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ..guards import check_whole_number

# The reference's ConcatSRHeunEDMSampler (configs/text2image-sr.yaml).
SIGMA_MIN = 0.002
SIGMA_MAX = 40.0
RHO = 7.0
DEFAULT_STEPS = 20

Sampler = Callable[..., torch.Tensor]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def get_sigmas_karras(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Karras et al. (2022) noise levels, float32 like the reference (sigmas[0] = 40.0000114), plus a final 0."""
    ramp = torch.linspace(0, 1, n, device=device)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def model_evaluations(steps: int) -> int:
    """Heun needs two evaluations per step except the last one (to sigma 0): 39 for 20 steps."""
    return max(0, 2 * steps - 1)


def cpu_noise_sampler(x: torch.Tensor, seed: int) -> NoiseSampler:
    """Fresh standard normal noise shaped like ``x`` per call, from a CPU generator seeded with ``seed``."""
    generator = torch.Generator("cpu").manual_seed(int(seed))

    def sample(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)

    return sample


def _mix(*values: int) -> int:
    """splitmix64 folded over the values: a well-spread 63-bit seed from a few small integers."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def position_noise_sampler(x: torch.Tensor, seed: int, block_px: int,
                           origin: tuple[int, int] = (0, 0)) -> NoiseSampler:
    """Standard normal noise shaped like ``x``, fresh per call, drawn per ``block_px`` block from a CPU
    generator seeded by (seed, call, the block's position on the whole canvas).

    ``x`` is the part of the canvas whose top-left block is ``origin`` (block row, column): any part
    gets the same numbers as that part of the whole canvas, so an image split across ranks samples
    the same ancestral noise as one process, on every device and block batch.
    """
    b, ch, height, width = x.shape
    if height % block_px or width % block_px:
        raise ValueError(f"the canvas {height}x{width} must be a multiple of the {block_px}-px block")
    calls = [0]

    def sample(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        out = torch.empty((b, ch, height, width), dtype=torch.float32)
        generator = torch.Generator("cpu")
        for i in range(height // block_px):
            for j in range(width // block_px):
                generator.manual_seed(_mix(seed, calls[0], origin[0] + i, origin[1] + j))
                out[..., i * block_px:(i + 1) * block_px, j * block_px:(j + 1) * block_px] = torch.randn(
                    (b, ch, block_px, block_px), generator=generator)
        return out.to(device=x.device, dtype=x.dtype)

    return sample


def _default_noise_sampler(x: torch.Tensor) -> NoiseSampler:
    return lambda sigma, sigma_next: torch.randn_like(x)


def _to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up): deterministic step target and added noise of an ancestral step."""
    if not eta:
        return sigma_to, sigma_to * 0
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


@torch.no_grad()
def sample_heun_edm(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
                    extra_args: dict[str, Any] | None = None, callback: Callable[[dict], None] | None = None,
                    disable: bool | None = None) -> torch.Tensor:
    """Deterministic EDM Heun sampler (Karras et al. 2022, Algorithm 1 with S_churn = 0).

    ``model(x, sigma, **extra_args)`` is the denoiser D. The last step to sigma 0 is plain Euler.
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        d = _to_d(x, sigma, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        dt = sigma_next - sigma
        euler = x + d * dt
        if sigma_next == 0:
            x = euler
        else:
            denoised_next = model(euler, sigma_next * s_in, **extra_args)
            d_next = _to_d(euler, sigma_next, denoised_next)
            x = x + (d + d_next) / 2 * dt
    return x


@torch.no_grad()
def sample_euler(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
                 extra_args: dict[str, Any] | None = None, callback: Callable[[dict], None] | None = None,
                 disable: bool | None = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
                           extra_args: dict[str, Any] | None = None, callback: Callable[[dict], None] | None = None,
                           disable: bool | None = None, eta: float = 1.0, s_noise: float = 1.0,
                           noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Ancestral Euler: an Euler step to sigma_down, then fresh noise of size sigma_up."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
                    extra_args: dict[str, Any] | None = None, callback: Callable[[dict], None] | None = None,
                    disable: bool | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in log-sigma, one evaluation per step."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised  # the limit of the update for sigma_next -> 0
        else:
            t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
            h = t_next - t
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = (t + sigmas[i - 1].log()) / h  # h_last / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
                        extra_args: dict[str, Any] | None = None, callback: Callable[[dict], None] | None = None,
                        disable: bool | None = None, eta: float = 1.0, s_noise: float = 1.0,
                        noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver++(3M) SDE; with ``eta=0`` the deterministic third-order multistep ODE solver."""
    extra_args = {} if extra_args is None else extra_args
    if eta:
        noise_sampler = _default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    denoised_1 = denoised_2 = None
    h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d
            if eta:
                noise = noise_sampler(sigmas[i], sigmas[i + 1])
                x = x + noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def sample_dpmpp_3m(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
                    extra_args: dict[str, Any] | None = None, callback: Callable[[dict], None] | None = None,
                    disable: bool | None = None) -> torch.Tensor:
    """DPM-Solver++(3M), deterministic (the 3M SDE solver with eta = 0)."""
    return sample_dpmpp_3m_sde(model, x, sigmas, extra_args, callback, disable, eta=0.0)


@torch.no_grad()
def sample_unipc(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
                 extra_args: dict[str, Any] | None = None, callback: Callable[[dict], None] | None = None,
                 disable: bool | None = None, order: int = 3, variant: str = "bh2") -> torch.Tensor:
    """UniPC (Zhao et al. 2023), multistep predictor UniP + corrector UniC in data prediction.

    For EDM (alpha = 1) the half-log-SNR is lambda = -log sigma. Each step predicts x at the next
    sigma with UniP of order p (using the last p denoised values), evaluates the model there once
    and corrects the same step with UniC of order p + 1 using that evaluation, which is then reused
    by the next step: one evaluation per step. The order ramps up over the first steps and down at
    the end (lower_order_final); the last step to sigma 0 takes the limit, x = denoised.
    ``variant``: ``bh1`` (B(h) = h) or ``bh2`` (B(h) = e^h - 1).
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be bh1 or bh2, got {variant!r}")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    steps = len(sigmas) - 1
    lambdas = [(-sigmas[i].log()) if sigmas[i] > 0 else None for i in range(len(sigmas))]
    denoised = model(x, sigmas[0] * s_in, **extra_args)
    history = [(lambdas[0], denoised)]  # (lambda, denoised) of the last `order` points, newest last
    for i in range(steps):
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": history[-1][1]})
        if sigmas[i + 1] == 0:
            x = history[-1][1]
            break
        step_order = min(order, len(history), steps - i)
        lam_0, m0 = history[-1]
        h = lambdas[i + 1] - lam_0
        rks, d1s = [], []
        for k in range(1, step_order):
            lam_k, m_k = history[-(k + 1)]
            rk = (lam_k - lam_0) / h
            rks.append(rk)
            d1s.append((m_k - m0) / rk)
        rks.append(torch.ones_like(h))
        rks_t = torch.stack(rks)
        hh = -h  # data prediction
        h_phi_1 = hh.expm1()
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if variant == "bh1" else hh.expm1()
        rows, b = [], []
        factorial = 1
        for k in range(1, step_order + 1):
            rows.append(rks_t ** (k - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        r_mat, b_vec = torch.stack(rows).double(), torch.stack(b).double()
        x_base = (sigmas[i + 1] / sigmas[i]) * x - h_phi_1 * m0
        # predictor UniP: order step_order from the d1s (rhos 0.5 for order 2, as in the paper)
        if d1s:
            rhos_p = (torch.tensor([0.5], dtype=torch.float64) if step_order == 2
                      else torch.linalg.solve(r_mat[:-1, :-1], b_vec[:-1]))
            pred = sum(rho.to(x.dtype) * d for rho, d in zip(rhos_p, d1s))
            x_pred = x_base - b_h * pred
        else:
            x_pred = x_base
        denoised = model(x_pred, sigmas[i + 1] * s_in, **extra_args)
        # corrector UniC with the new evaluation (order step_order + 1); reused by the next step
        rhos_c = (torch.tensor([0.5], dtype=torch.float64) if step_order == 1
                  else torch.linalg.solve(r_mat, b_vec))
        corr = sum(rho.to(x.dtype) * d for rho, d in zip(rhos_c[:-1], d1s)) if d1s else 0
        x = x_base - b_h * (corr + rhos_c[-1].to(x.dtype) * (denoised - m0))
        history = (history + [(lambdas[i + 1], denoised)])[-order:]
    return x


def count_evaluations(sampler: Sampler, sigmas: torch.Tensor) -> int:
    """Model evaluations ``sampler`` makes on ``sigmas``, counted by a dry run with a stand-in denoiser.

    Exact for every fixed-step sampler; an adaptive one may take a different number on real data.
    """
    calls = [0]

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, **_extra) -> torch.Tensor:
        calls[0] += 1
        return x * (0.25 / (sigma.view(-1, 1, 1, 1) ** 2 + 0.25))

    x = torch.zeros(1, 3, 8, 8) + sigmas[0].float()
    kwargs = {"noise_sampler": lambda s, s_next: torch.zeros_like(x)} if _accepts(sampler, "noise_sampler") else {}
    sampler(denoiser, x, sigmas.float().cpu(), extra_args={"seed": 0}, callback=None, disable=True, **kwargs)
    return calls[0]


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    target = fn.func if isinstance(fn, partial) else fn
    if isinstance(fn, partial) and name in fn.keywords:
        return False
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def run_sampler(sampler: Sampler, denoiser: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
                *, seed: int, callback: Callable[[dict], None] | None = None, block_px: int | None = None,
                origin: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Call a k-diffusion-shaped sampler the way ComfyUI's KSAMPLER does, with seeded CPU noise.

    ``extra_args`` carries ``seed`` (ComfyUI's samplers seed their own noise from it); a sampler that
    takes a ``noise_sampler`` gets :func:`cpu_noise_sampler`, or with ``block_px``
    :func:`position_noise_sampler` (``x`` being the part of the canvas at block ``origin``), so
    ancestral and SDE samplers give the same result on every device, block batch and rank split.
    """
    if not _accepts(sampler, "noise_sampler"):
        kwargs = {}
    elif block_px is None:
        kwargs = {"noise_sampler": cpu_noise_sampler(x, seed)}
    else:
        kwargs = {"noise_sampler": position_noise_sampler(x, seed, block_px, origin)}
    return sampler(denoiser, x, sigmas, extra_args={"seed": int(seed)}, callback=callback, disable=True, **kwargs)


# Named samplers of the CLI and the benchmark.
SAMPLERS: dict[str, Sampler] = {
    "heun": sample_heun_edm,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "unipc": sample_unipc,
    "unipc_bh1": partial(sample_unipc, variant="bh1"),
}


@dataclass(frozen=True, eq=False)
class Sampling:
    """The sampler of a run, its schedule (1-D float32 on the CPU) and the model evaluations they make per pass.

    Built only by :func:`resolve_sampling`, so the evaluation count every plan carries is the one
    the wired sampler really makes on that schedule.
    """

    sampler: Sampler
    sigmas: torch.Tensor
    evaluations: int


class NoiseLeftWarning(UserWarning):
    """The schedule stops above sigma 0: the result keeps that much noise."""


def _check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError("sigmas must be a 1-D tensor of at least two noise levels (e.g. from KarrasScheduler), "
                         f"got {getattr(sigmas, 'shape', type(sigmas).__name__)}")
    sigmas = sigmas.detach().float().cpu()
    if not torch.isfinite(sigmas).all() or (sigmas < 0).any() or sigmas[0] <= 0 or (sigmas[1:] > sigmas[:-1]).any():
        raise ValueError(f"sigmas must be finite, positive at the start and non-increasing, got {sigmas.tolist()}")
    if sigmas[-1] > 0:
        warnings.warn(f"sigmas: the schedule stops at sigma {float(sigmas[-1]):.4g}, not 0, so the image keeps that "
                      "much noise (e.g. the high half of SplitSigmas). End the schedule at 0 for a clean image.",
                      NoiseLeftWarning, stacklevel=3)
    return sigmas


def resolve_sampling(sampler: Sampler | None = None, sigmas: torch.Tensor | None = None,
                     steps: int = DEFAULT_STEPS) -> Sampling:
    """The sampling of a run: ``sampler`` (default: the reference's EDM Heun), ``sigmas`` (default: the
    reference's Karras schedule of ``steps`` steps), and the evaluations they make, counted once."""
    if sigmas is None:
        sigmas = get_sigmas_karras(check_whole_number(steps, "steps"))
    if sampler is not None and not callable(sampler):
        raise TypeError(f"sampler must be a k-diffusion sampler function, got {type(sampler).__name__}")
    sampler = sample_heun_edm if sampler is None else sampler
    sigmas = _check_sigmas(sigmas)
    return Sampling(sampler, sigmas, count_evaluations(sampler, sigmas))


# (sampler, steps). The reference: EDM Heun, 20 steps = 39 evaluations. The fast preset: the cheapest
# candidate of ``python -m uniba bench infdit-solvers`` at least as close to a 200-step solution as the
# reference on both benchmark models (README, "Fewer evaluations").
REFERENCE_PRESET = ("heun", 20)
FAST_PRESET = ("dpmpp_3m", 16)
PRESETS = {"reference": REFERENCE_PRESET, "fast": FAST_PRESET}


def named_sampler(name: str) -> Sampler:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}") from None


__all__ = ["get_sigmas_karras", "model_evaluations", "sample_heun_edm", "sample_euler", "sample_euler_ancestral",
           "sample_dpmpp_2m", "sample_dpmpp_3m", "sample_dpmpp_3m_sde", "sample_unipc", "cpu_noise_sampler",
           "position_noise_sampler", "count_evaluations", "run_sampler", "Sampling", "resolve_sampling",
           "NoiseLeftWarning", "SAMPLERS", "named_sampler", "get_ancestral_step"]

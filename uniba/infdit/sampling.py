"""EDM sampling for Inf-DiT (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"), shaped like k-diffusion's ``sampling.py``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import trange

# The reference's ConcatSRHeunEDMSampler (configs/text2image-sr.yaml).
SIGMA_MIN = 0.002
SIGMA_MAX = 40.0
RHO = 7.0
DEFAULT_STEPS = 20


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


@torch.no_grad()
def sample_heun_edm(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
                    extra_args: dict[str, Any] | None = None, callback: Callable[[dict], None] | None = None,
                    disable: bool | None = None) -> torch.Tensor:
    """Deterministic EDM Heun sampler (Karras et al. 2022, Algorithm 1 with S_churn = 0).

    ``model(x, sigma, **extra_args)`` is the denoiser D. The last step to sigma 0 is plain Euler.
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=True if disable is None else disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        d = (x - denoised) / sigma
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        dt = sigma_next - sigma
        euler = x + d * dt
        if sigma_next == 0:
            x = euler
        else:
            denoised_next = model(euler, sigma_next * s_in, **extra_args)
            d_next = (euler - denoised_next) / sigma_next
            x = x + (d + d_next) / 2 * dt
    return x

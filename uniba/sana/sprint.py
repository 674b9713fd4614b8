"""Sana-Sprint sampling: the release's TrigFlow schedule in flow time, and the sCM sampler in k-diffusion's shape.

Sana-Sprint (Chen et al., arXiv 2503.09641) is distilled with continuous-time consistency (sCM) in
TrigFlow: ``x_theta = cos(theta) x0 + sin(theta) sigma_d z`` with ``theta`` in [0, pi/2] and
``sigma_d = 0.5``. Its transformer is still a flow (velocity) model: diffusers' ``SanaSprintPipeline``
(and SANA's ``SanaMSCM``) feed it ``x_s = x_theta / (sigma_d (sin + cos))`` at the flow time
``s = sin(theta) / (sin(theta) + cos(theta))`` and turn its velocity ``v`` back into TrigFlow. Both
conversions cancel exactly: the TrigFlow data prediction divided by ``sigma_d`` is the flow one,
``x_s - s v``, and the sCM step ``x_theta' = cos(theta') x0 + sin(theta') sigma_d z'`` is, in flow units,
``x_s' = (1 - s') x0 + s' z'`` with fresh noise ``z'``. So a Sprint MODEL is sampled in flow time ``s``
with the ordinary flow (``CONST``) parameterisation and the transformer's timestep equal to ``s``
(multiplier 1, no truncation); what is Sprint's own is the schedule (:func:`sprint_sigmas`) and the
sampler (:func:`sample_scm`), which re-noises fully at every step like a consistency model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import trange

from ..guards import check_step_finite

# diffusers SCMScheduler.set_timesteps / SanaSprintPipeline defaults: the first TrigFlow time (pi/2
# rounded up, so cos is -3.7e-6) and the intermediate time of the released 2-step schedule.
MAX_TIMESTEPS = 1.57080
INTERMEDIATE_TIMESTEPS = 1.3
DEFAULT_STEPS = 2
SIGMA_DATA = 0.5

__all__ = ["DEFAULT_STEPS", "INTERMEDIATE_TIMESTEPS", "MAX_TIMESTEPS", "flow_time", "sample_scm", "sprint_angles",
           "sprint_sigmas"]


def sprint_angles(steps: int, max_timesteps: float = MAX_TIMESTEPS,
                  intermediate_timesteps: float | None = INTERMEDIATE_TIMESTEPS) -> torch.Tensor:
    """The TrigFlow times of ``SCMScheduler.set_timesteps``: ``steps + 1`` values from ``max_timesteps`` to 0.

    Two steps go through ``intermediate_timesteps`` (the release's 1.3); any other count (and 2 with
    ``intermediate_timesteps`` None) is evenly spaced, as diffusers does (it refuses an intermediate
    time with other step counts; here it only applies to 2 steps, which the node's tooltip says).
    """
    if steps < 1:
        raise ValueError(f"Sana-Sprint needs at least 1 step, got {steps}.")
    if not 0.0 < max_timesteps <= MAX_TIMESTEPS + 1e-6:  # a UI's decimal rounding may land a hair above
        raise ValueError(f"max_timesteps must be in (0, {MAX_TIMESTEPS}] (TrigFlow time, pi/2 = pure noise), "
                         f"got {max_timesteps}.")
    if steps == 2 and intermediate_timesteps is not None:
        if not 0.0 < intermediate_timesteps < max_timesteps:
            raise ValueError(f"intermediate_timesteps must lie between 0 and max_timesteps ({max_timesteps}), "
                             f"got {intermediate_timesteps}.")
        return torch.tensor([max_timesteps, intermediate_timesteps, 0.0], dtype=torch.float32)
    return torch.linspace(max_timesteps, 0.0, steps + 1, dtype=torch.float32)


def flow_time(angles: torch.Tensor) -> torch.Tensor:
    """TrigFlow time -> flow time (the MODEL's sigma): ``sin / (sin + cos)``, computed as diffusers does (fp32)."""
    angles = angles.to(torch.float32)
    return torch.sin(angles) / (torch.cos(angles) + torch.sin(angles))


def sprint_sigmas(steps: int = DEFAULT_STEPS, max_timesteps: float = MAX_TIMESTEPS,
                  intermediate_timesteps: float | None = INTERMEDIATE_TIMESTEPS) -> torch.Tensor:
    """The SIGMAS of a Sprint run (flow time, descending, ending in 0). The first is 1.0000037, not 1:
    ``max_timesteps`` lies just past pi/2, and a host's start ``sigmas[0] * noise`` is Sprint's start exactly."""
    return flow_time(sprint_angles(steps, max_timesteps, intermediate_timesteps))


def _cpu_noise_sampler(x: torch.Tensor, seed: int | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Fresh unit noise per step from a CPU generator, so a seed gives the same image on every device."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))

    def sample(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)

    return sample


@torch.no_grad()
def sample_scm(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
               extra_args: dict[str, Any] | None = None, callback: Callable[[dict], None] | None = None,
               disable: bool | None = None,
               noise_sampler: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """sCM multistep sampling (diffusers ``SCMScheduler.step``), in flow units.

    ``model(x, sigma * ones(B), **extra_args)`` is the host's data (x0) prediction of a flow model;
    each step predicts x0 and, unless the next sigma is 0, re-noises it to the next flow time with
    fresh noise: ``x = (1 - s') x0 + s' z`` (= ``cos(t') x0 + sin(t') sigma_d z`` in TrigFlow). The
    noise comes from ``noise_sampler(sigma, sigma_next)``, by default a CPU generator seeded with
    ``extra_args["seed"]`` (ComfyUI passes the sampler's seed there).
    """
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = _cpu_noise_sampler(x, extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    steps = len(sigmas) - 1
    for i in trange(steps, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        check_step_finite(denoised, i, steps, "Sana-Sprint sCM", float(sigma))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if float(sigma_next) <= 0.0:
            x = denoised
        else:
            x = (1.0 - sigma_next) * denoised + sigma_next * noise_sampler(sigma, sigma_next)
    return x


"""The denoising step a UNet call belongs to, from the sampler's sigmas (stateless).

The reference counts UNet forward calls per module, which drifts under split cond/uncond batches,
second-order samplers and interrupted runs. Here the step is recomputed on every call from the
current sigma and the run's sigma schedule (ComfyUI's ``transformer_options["sample_sigmas"]``):

* a call at exactly ``sigmas[j]`` is step ``j`` (Heun's corrector at ``sigmas[i+1]`` and the next
  predictor share step ``i+1``: at a given noise level the network is always the same function);
* a call strictly between ``sigmas[i]`` and ``sigmas[i+1]`` (DPM2/DPM++ 2S midpoints) is step ``i``;
* ``N = len(sigmas) - 1`` steps, so ``denoise < 1`` counts only the steps actually run, as the
  reference's ``_num_timesteps`` does after img2img strength truncation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_REL_TOL = 1e-4


def _as_floats(values: torch.Tensor | Sequence[float]) -> list[float]:
    if isinstance(values, torch.Tensor):
        return [float(v) for v in values.detach().flatten().to("cpu", torch.float64)]
    return [float(v) for v in values]


def current_sigma(sigma: torch.Tensor | float) -> float:
    """The noise level of a (possibly batched) call; all entries are equal in ComfyUI's samplers."""
    if isinstance(sigma, torch.Tensor):
        return float(sigma.detach().flatten().max().to("cpu", torch.float64))
    return float(sigma)


def step_index(sigma: torch.Tensor | float, sample_sigmas: torch.Tensor | Sequence[float]) -> tuple[int, int]:
    """``(step, num_steps)`` of a call at noise level ``sigma`` in a run with ``sample_sigmas``.

    ``sample_sigmas`` is the decreasing schedule including its final value (usually 0).
    """
    sigmas = _as_floats(sample_sigmas)
    if len(sigmas) < 2:
        raise ValueError("sample_sigmas needs at least two values (start and end of the run)")
    num_steps = len(sigmas) - 1
    s = current_sigma(sigma)
    for j, value in enumerate(sigmas):
        if abs(s - value) <= _REL_TOL * max(abs(value), 1e-8):
            return min(j, num_steps - 1), num_steps
    for i in range(num_steps):
        hi, lo = max(sigmas[i], sigmas[i + 1]), min(sigmas[i], sigmas[i + 1])
        if lo < s < hi:
            return i, num_steps
    # Outside the schedule (a guidance trick re-evaluating at another level): nearest step.
    nearest = min(range(num_steps), key=lambda j: abs(sigmas[j] - s))
    return nearest, num_steps


def step_from_percent(sigma: float, percent_sigmas: Sequence[float], num_steps: int) -> int:
    """Fallback when the sampler gives no schedule: the step of a uniform-in-percent run of ``num_steps``.

    ``percent_sigmas[k]`` is the model's sigma at percent ``k / num_steps`` (``percent_to_sigma``).
    """
    for k in range(num_steps):
        if sigma > percent_sigmas[k + 1]:
            return k
    return num_steps - 1

"""EDM Heun sampler: schedule values and number of model evaluations (issue item 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from uniba.infdit.sampling import get_sigmas_karras, model_evaluations, sample_heun_edm

DATA = Path(__file__).resolve().parent / "data"


def test_karras_schedule_matches_the_reference_float32_values():
    ref = json.loads((DATA / "infdit_tiny_a.json").read_text())["sampler"]["sigmas"]
    sigmas = get_sigmas_karras(20)
    assert len(sigmas) == 21 and sigmas[-1] == 0
    assert sigmas.tolist() == pytest.approx(ref, abs=2e-5)
    assert sigmas[0].item() == pytest.approx(40.0000114440918, abs=1e-7)  # the reference's rho round trip
    assert torch.all(sigmas[:-1] > sigmas[1:])


@pytest.mark.parametrize("steps", [1, 2, 20])
def test_heun_evaluates_twice_per_step_except_the_last(steps):
    calls = []

    def model(x, sigma):
        calls.append(sigma[0].item())
        return x * 0.5

    sample_heun_edm(model, torch.ones(1, 3, 4, 4), get_sigmas_karras(steps))
    assert len(calls) == model_evaluations(steps) == 2 * steps - 1


def test_heun_is_exact_for_a_linear_ode():
    # D(x) = 0 gives dx/dsigma = x / sigma, so x(sigma) is proportional to sigma: Heun is exact on it
    sigmas = torch.tensor([4.0, 2.0, 1.0])
    out = sample_heun_edm(lambda x, s: torch.zeros_like(x), torch.full((1, 1, 1, 1), 8.0), sigmas)
    assert out.item() == pytest.approx(2.0)

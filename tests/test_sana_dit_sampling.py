"""Flow-DPM-Solver and Flow-Euler vs diffusers' schedulers (test-only oracles)."""

from __future__ import annotations

import pytest
import torch

from uniba.sana import SanaConfig, flow_sigmas, load_sana, sample_flow_dpm_solver, sample_flow_euler
from uniba.sana.config import diffusers_config_dict
from uniba.sana.sampling import velocity_denoiser

diffusers = pytest.importorskip("diffusers")


def _toy_velocity():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 4, generator=g) * 0.5

    def velocity(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = (timestep.long().float() / 1000).reshape(-1, 1, 1, 1)  # integer timesteps, as Sana's model sees them
        return torch.tanh(torch.einsum("ij,bjhw->bihw", weight, x)) * (1 + t) + 0.3 * t * x

    return velocity


def _run_diffusers(scheduler, velocity, x):
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


@pytest.mark.parametrize("shift", [3.0, 4.0, 6.0])
@pytest.mark.parametrize("steps", [2, 5, 20])
def test_flow_dpm_solver_matches_diffusers(shift: float, steps: int) -> None:
    scheduler = diffusers.DPMSolverMultistepScheduler(flow_shift=shift, use_flow_sigmas=True,
                                                      prediction_type="flow_prediction")
    scheduler.set_timesteps(steps)
    sigmas = flow_sigmas(steps, shift)
    assert torch.equal(sigmas, scheduler.sigmas)  # identical grid, descending, ending in 0
    velocity = _toy_velocity()
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(steps))
    expected = _run_diffusers(scheduler, velocity, x.clone())
    got = sample_flow_dpm_solver(velocity_denoiser(velocity), x.clone(), sigmas, disable=True)
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("shift", [3.0, 6.0])
@pytest.mark.parametrize("steps", [5, 28])
def test_flow_euler_matches_diffusers(shift: float, steps: int) -> None:
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    sigmas = flow_sigmas(steps, shift, kind="euler")
    assert (sigmas - scheduler.sigmas).abs().max().item() == 0
    velocity = _toy_velocity()
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(steps))
    expected = _run_diffusers(scheduler, velocity, x.clone())
    got = sample_flow_euler(velocity_denoiser(velocity), x.clone(), sigmas, disable=True)
    assert (got - expected).abs().max().item() <= 1e-5


def test_sigma_grid_values() -> None:
    sigmas = flow_sigmas(20, 3.0)
    assert len(sigmas) == 21 and sigmas[-1] == 0 and bool((sigmas[:-1] > sigmas[1:]).all())
    assert abs(sigmas[0].item() - 0.99967) < 1e-5
    assert (sigmas[:4] * 1000).long().tolist() == [999, 982, 963, 944]
    assert flow_sigmas(28, 3.0, kind="euler")[0].item() == 1.0
    half = flow_sigmas(10, 3.0, denoise=0.5)
    assert len(half) == 11 and torch.equal(half, flow_sigmas(20, 3.0)[-11:])


def test_flow_dpm_solver_on_a_tiny_sana_model_with_cfg() -> None:
    """20 steps of diffusers' scheduler + diffusers' model vs ours + ours, CFG 4.5 on a padded mask."""
    config = SanaConfig(hidden_size=64, depth=2, cross_heads=4, caption_channels=48)
    torch.manual_seed(0)
    ref = diffusers.SanaTransformer2DModel(**diffusers_config_dict(config)).eval()
    with torch.no_grad():
        for value in ref.state_dict().values():
            value.copy_(torch.randn_like(value) * 0.1)
    ours = load_sana(ref.state_dict(), overrides={"cross_heads": 4})
    g = torch.Generator().manual_seed(2)
    context = torch.randn(2, 8, 48, generator=g)  # [uncond, cond]
    mask = torch.ones(2, 8)
    mask[0, 3:] = 0
    x = torch.randn(1, 32, 4, 6, generator=g)
    cfg = 4.5

    scheduler = diffusers.DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True,
                                                      prediction_type="flow_prediction")
    scheduler.set_timesteps(20)
    expected = x.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            v_uncond, v_cond = ref(expected.repeat(2, 1, 1, 1), context, t.expand(2),
                                   encoder_attention_mask=mask).sample.chunk(2)
            expected = scheduler.step(v_uncond + cfg * (v_cond - v_uncond), t, expected).prev_sample

    def denoiser(xt: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        v_uncond, v_cond = ours(xt.repeat(2, 1, 1, 1), sigma.repeat(2) * 1000, context, mask).chunk(2)
        x0_uncond, x0_cond = xt - sigma * v_uncond, xt - sigma * v_cond  # CFG on x0 == CFG on v
        return x0_uncond + cfg * (x0_cond - x0_uncond)

    got = sample_flow_dpm_solver(denoiser, x.clone(), flow_sigmas(20, 3.0), disable=True)
    print(f"tiny Sana, 20 steps, CFG 4.5: max abs diff {(got - expected).abs().max().item():.2e}")
    assert (got - expected).abs().max().item() <= 1e-4
    assert expected.abs().max().item() > 0.5


def test_callback_gets_every_step() -> None:
    seen = []
    x = torch.randn(1, 4, 3, 3)
    sample_flow_dpm_solver(velocity_denoiser(_toy_velocity()), x, flow_sigmas(6, 3.0),
                           callback=lambda d: seen.append((d["i"], tuple(d["denoised"].shape))), disable=True)
    assert [i for i, _ in seen] == list(range(6)) and seen[0][1] == (1, 4, 3, 3)

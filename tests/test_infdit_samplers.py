"""Samplers over the block-wise denoiser (issue 13 items 1, 2, 4): any k-diffusion sampler, seeded CPU noise,
identical results for every block batch, sigma-independent conditioning computed once per image."""

from __future__ import annotations

import pytest
import torch
from tiny_infdit import TINY, load_tiny_infdit, plan_and_upscale

from uniba.infdit.sampling import (
    SAMPLERS,
    count_evaluations,
    cpu_noise_sampler,
    get_sigmas_karras,
    sample_dpmpp_2m,
    sample_dpmpp_3m,
    sample_dpmpp_3m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun_edm,
    sample_unipc,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return load_tiny_infdit(TINY, seed=5)


def _image(h, w, seed=0):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("sampler", [sample_euler, sample_euler_ancestral, sample_dpmpp_2m, sample_unipc,
                                     sample_dpmpp_3m_sde], ids=lambda f: f.__name__)
def test_block_wise_equals_whole_canvas_for_every_block_batch(model, sampler):
    lr = _image(24, 40)  # 3x5 blocks
    sigmas = get_sigmas_karras(4)
    whole = plan_and_upscale(model, lr, seed=11, sampler=sampler, sigmas=sigmas, block_batch=16)
    assert whole.abs().mean() > 0.1
    for block_batch, offload in ((1, "off"), ("2x3", "on")):  # one ragged, one offloaded
        out = plan_and_upscale(model, lr, seed=11, sampler=sampler, sigmas=sigmas, block_batch=block_batch,
                      offload_cache=offload)
        assert (out - whole).abs().max().item() <= 2e-5, (block_batch, offload)


def test_ancestral_noise_comes_from_the_seed_on_the_cpu(model):
    lr = _image(16, 16)
    sigmas = get_sigmas_karras(3)
    a = plan_and_upscale(model, lr, seed=4, sampler=sample_euler_ancestral, sigmas=sigmas)
    assert torch.equal(a, plan_and_upscale(model, lr, seed=4, sampler=sample_euler_ancestral, sigmas=sigmas))
    assert not torch.equal(a, plan_and_upscale(model, lr, seed=5, sampler=sample_euler_ancestral, sigmas=sigmas))
    # the global RNG plays no part
    torch.manual_seed(123)
    assert torch.equal(a, plan_and_upscale(model, lr, seed=4, sampler=sample_euler_ancestral, sigmas=sigmas))
    # the step noise is a stream of its own: not the x_T noise again
    assert not torch.equal(a, plan_and_upscale(model, lr, seed=4, sampler=sample_euler, sigmas=sigmas))


def test_cpu_noise_sampler_is_seeded_and_fresh_per_call():
    x = torch.zeros(1, 3, 4, 4)
    first, second = cpu_noise_sampler(x, 9), cpu_noise_sampler(x, 9)
    s = torch.tensor(1.0)
    a, b = first(s, s), first(s, s)
    assert not torch.equal(a, b) and torch.equal(a, second(s, s))


def test_position_noise_of_a_part_is_that_part_of_the_whole_canvas():
    """Ancestral noise is seeded per block position: a rank's band draws what one process draws there."""
    from uniba.infdit.sampling import position_noise_sampler

    s = torch.tensor(1.0)
    whole = position_noise_sampler(torch.zeros(1, 3, 12, 16), 9, 4)
    part = position_noise_sampler(torch.zeros(1, 3, 8, 8), 9, 4, origin=(1, 2))
    for _ in range(2):
        a, b = whole(s, s), part(s, s)
        assert torch.equal(b, a[..., 4:12, 8:16])
    assert not torch.equal(a, whole(s, s))  # fresh per call
    assert a.std().item() == pytest.approx(1.0, abs=0.25)


@pytest.mark.parametrize("name,steps,evaluations", [("heun", 20, 39), ("heun", 10, 19), ("euler", 8, 8),
                                                     ("euler_ancestral", 8, 8), ("dpmpp_2m", 10, 10),
                                                     ("dpmpp_3m", 10, 10), ("unipc", 10, 10), ("unipc_bh1", 6, 6)])
def test_evaluation_counts(name, steps, evaluations):
    assert count_evaluations(SAMPLERS[name], get_sigmas_karras(steps)) == evaluations


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_converges_to_the_exact_solution_of_a_gaussian(name):
    # data ~ N(mu, s^2): D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu); the probability-flow ODE maps
    # x_T to mu + s / sqrt(s^2 + sigma_T^2) (x_T - mu) exactly
    mu, s = 0.3, 0.5
    sigmas = get_sigmas_karras(40)

    def denoiser(x, sigma, **_):
        return mu + s**2 / (s**2 + sigma.view(-1, 1, 1, 1) ** 2) * (x - mu)

    x_t = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    exact = mu + s / (s**2 + sigmas[0] ** 2) ** 0.5 * (x_t - mu)
    out = SAMPLERS[name](denoiser, x_t.clone(), sigmas)
    if name == "euler":  # first order: 0.14 at 40 steps on this problem
        assert (out - exact).abs().max().item() < 0.2
    elif name == "euler_ancestral":  # stochastic: right mean and spread, not the same sample
        assert abs(out.mean().item() - mu) < 0.1 and abs(out.std().item() - s) < 0.1
    else:
        assert (out - exact).abs().max().item() < 1.5e-2


def test_higher_order_samplers_are_more_accurate_at_the_same_steps():
    mu, s = 0.1, 0.4

    def denoiser(x, sigma, **_):
        return mu + s**2 / (s**2 + sigma.view(-1, 1, 1, 1) ** 2) * (x - mu)

    x_t = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 40
    exact = mu + s / (s**2 + 40.0**2) ** 0.5 * (x_t - mu)

    def err(sampler, steps):
        return (sampler(denoiser, x_t.clone(), get_sigmas_karras(steps)) - exact).abs().max().item()

    assert err(sample_heun_edm, 20) < err(sample_euler, 20) / 2.5
    assert err(sample_dpmpp_2m, 20) < err(sample_euler, 20) / 2.5
    assert err(sample_unipc, 20) < err(sample_dpmpp_2m, 20) / 2
    assert err(sample_dpmpp_3m, 20) < err(sample_dpmpp_2m, 20) / 2


def test_lr_conditioning_is_computed_once_per_image_not_per_evaluation(model, monkeypatch):
    calls = {"proj_lr": 0, "lr_k_norm": 0, "clip_embed": 0, "clip_tower": 0, "t_embed": 0}

    def counter(name):
        return lambda *args: calls.__setitem__(name, calls[name] + 1)

    # the LR K/V maps are projected one padded LR block line at a time (2 x 3 blocks, column-major: 3 + 2
    # padded columns, the 2 padding lines need no proj_lr); kept for the sampling, each line once per image
    modules = {"proj_lr": model.lr_xattn.proj_lr, "lr_k_norm": model.lr_xattn.k_norm,
               "clip_embed": model.clip_embed, "clip_tower": model.clip, "t_embed": model.t_embed}
    hooks = [module.register_forward_hook(counter(name)) for name, module in modules.items()]
    try:
        plan_and_upscale(model, _image(16, 24), steps=3, block_batch=1)  # 5 evaluations x 6 batches
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"proj_lr": 3, "lr_k_norm": 5, "clip_embed": 1, "clip_tower": 1, "t_embed": 5}


def test_lr_maps_not_kept_are_projected_per_batch_and_never_held(model):
    """Kept, the maps are projected once per image, line by line; not kept, every batch projects its own LR
    blocks and nothing outlives the batch, with the same numbers; a kept line owns no more than it shows."""
    from uniba.infdit.blockwise import BlockwiseDenoiser

    g = torch.Generator().manual_seed(2)
    lr = torch.rand(1, 3, 48, 16, generator=g) * 2 - 1  # 6 x 2 blocks, row-major
    x = torch.randn(1, 3, 192, 64, generator=g)
    emb = torch.nn.functional.normalize(torch.randn(1, model.config.vector_dim, generator=g), dim=-1)
    kept = BlockwiseDenoiser(model, lr, emb, block_batch=1, keep_lr_maps=True)
    whole = kept(x, 3.0)
    assert (kept(x, 3.0) - whole).abs().max().item() == 0
    assert kept.lr_lines.peak_lines == 6 + 2 and kept.lr_lines.projected == 8
    for k, v in kept.lr_lines.lines.values():
        for t in (k, v):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    for n in (1, 2):
        per_batch = BlockwiseDenoiser(model, lr, emb, block_batch=n, keep_lr_maps=False)
        for _ in range(2):
            assert (per_batch(x, 3.0) - whole).abs().max().item() <= 1e-6
        assert per_batch.lr_lines.projected == 2 * per_batch.batches_per_evaluation()
        assert not per_batch.lr_lines.lines and per_batch.lr_lines.peak_lines == 0


def test_the_fast_preset_rule_picks_the_cheapest_candidate_as_close_as_heun_20_on_every_model():
    from uniba.infdit.bench_solvers import cheapest_as_close_as_reference

    def row(model, sampler, steps, evaluations, rel, mx):
        return {"model": model, "sampler": sampler, "steps": steps, "evaluations": evaluations, "rel_l2": rel,
                "max_abs": mx}

    rows = [row(m, "heun", 20, 39, 0.03, 0.1) for m in "ab"]
    rows += [row("a", "dpmpp_3m", 12, 12, 0.02, 0.09), row("b", "dpmpp_3m", 12, 12, 0.02, 0.11)]  # b: max abs worse
    rows += [row("a", "unipc", 15, 15, 0.02, 0.09), row("b", "unipc", 15, 15, 0.03, 0.1)]  # ties count as close
    rows += [row("a", "euler", 20, 20, 0.01, 0.01)]  # measured on one model only
    assert cheapest_as_close_as_reference(rows) == ("unipc", 15)
    assert cheapest_as_close_as_reference(rows[:2] + rows[2:4]) == ("heun", 20)

"""The public upscale(): sizes, padding, alpha, 2x trick, chaining, batches, seeds, bad inputs (items 5, 6, 12)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_infdit import TINY, load_tiny_infdit, plan_and_upscale, sat_state_dict

from uniba.infdit import RopeWrapWarning, SmallInputWarning, load_infdit, plan_upscale, upscale
from uniba.infdit.model import upsample_lr
from uniba.infdit.sampling import count_evaluations, get_sigmas_karras, resolve_sampling, sample_dpmpp_2m
from uniba.infdit.upscale import reflect_pad, sample_canvas

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return load_tiny_infdit(TINY, seed=1)


def _image(h, w, c=3, seed=0):
    return torch.rand(1, c, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_seeded_upscale_equals_the_reference_procedure(model):
    lr = _image(32, 64)
    out = plan_and_upscale(model, lr, steps=2, seed=7, block_batch=1)
    noise = torch.randn((1, 3, 128, 256), generator=torch.Generator().manual_seed(7))
    ref = sample_canvas(model, lr, clip_embedding=model.clip.embed(lr), noise=noise, steps=2)
    assert out.shape == (1, 3, 128, 256)
    assert (out - ref).abs().max().item() <= 1e-5
    # independent of the block batch and of the cache placement
    assert (plan_and_upscale(model, lr, steps=2, seed=7, block_batch=2, offload_cache="on") - out).abs().max() <= 1e-5
    assert not torch.equal(plan_and_upscale(model, lr, steps=2, seed=8, block_batch=2), out)


def test_noise_and_clip_embedding_replace_the_seeded_draws(model):
    lr = _image(32, 32)
    noise = torch.randn(1, 3, 128, 128)
    emb = F.normalize(torch.randn(1, TINY.vector_dim), dim=-1)
    out = plan_and_upscale(model, lr, steps=1, noise=noise, clip_embedding=emb)
    ref = sample_canvas(model, lr, clip_embedding=emb, noise=noise, steps=1)
    assert torch.equal(out, ref)  # unclipped, like the reference's sample()


def test_inputs_that_are_not_whole_blocks_are_reflect_padded_and_cropped(model):
    lr = _image(35, 41)  # blocks of 32 px output = 8 px input: pads to 40x48
    out = plan_and_upscale(model, lr, steps=1, seed=0)
    assert out.shape == (1, 3, 140, 164)
    padded = reflect_pad(lr, 40, 48)
    assert torch.equal(padded[..., :35, :41], lr) and torch.equal(padded[..., 35:40, :41], lr.flip(-2)[..., 1:6, :])
    noise = torch.randn((1, 3, 160, 192), generator=torch.Generator().manual_seed(0))
    ref = sample_canvas(model, padded, clip_embedding=model.clip.embed(lr), noise=noise, steps=1)
    assert (out - ref[..., :140, :164]).abs().max().item() <= 1e-5


def test_alpha_is_upscaled_separately_and_reattached(model):
    rgba = _image(32, 32, c=4)
    out = plan_and_upscale(model, rgba, steps=1, seed=3)
    assert out.shape == (1, 4, 128, 128)
    assert torch.equal(out[:, :3], plan_and_upscale(model, rgba[:, :3], steps=1, seed=3))
    alpha = F.interpolate(rgba[:, 3:], size=(128, 128), mode="bicubic", align_corners=False).clamp(-1, 1)
    assert torch.allclose(out[:, 3:], alpha)


def test_2x_uses_the_reference_trick(model):
    lr = _image(32, 48)
    out = plan_and_upscale(model, lr, scale=2, steps=1, seed=0)
    assert out.shape == (1, 3, 64, 96)
    concat = upsample_lr(lr, 64, 96)
    half = F.interpolate(lr, size=(16, 24), mode="bicubic", align_corners=False, antialias=True)
    noise = torch.randn((1, 3, 64, 96), generator=torch.Generator().manual_seed(0))
    ref = sample_canvas(model, half, concat_lr=concat, clip_embedding=model.clip.embed(half), noise=noise, steps=1)
    assert (out - ref).abs().max().item() <= 1e-5


def test_8x_chains_4x_then_2x(model):
    lr = _image(32, 32)
    out = plan_and_upscale(model, lr, scale=8, steps=1, seed=0)
    assert out.shape == (1, 3, 256, 256)
    gen = torch.Generator().manual_seed(0)
    n1, n2 = torch.randn((1, 3, 128, 128), generator=gen), torch.randn((1, 3, 256, 256), generator=gen)
    first = sample_canvas(model, lr, clip_embedding=model.clip.embed(lr), noise=n1, steps=1).clamp(-1, 1)
    half = F.interpolate(first, size=(64, 64), mode="bicubic", align_corners=False, antialias=True)
    second = sample_canvas(model, half, concat_lr=upsample_lr(first, 256, 256), clip_embedding=model.clip.embed(half),
                           noise=n2, steps=1)
    assert (out - second).abs().max().item() <= 1e-5


def test_a_batch_is_processed_image_by_image(model):
    a, b = _image(32, 32, seed=1), _image(32, 32, seed=2)
    both = plan_and_upscale(model, torch.cat([a, b]), steps=1, seed=5)
    assert torch.equal(both[:1], plan_and_upscale(model, a, steps=1, seed=5))
    assert both.shape == (2, 3, 128, 128) and not torch.equal(both[0], both[1])


def test_progress_reports_every_block_batch_with_a_preview(model):
    seen = []
    plan_and_upscale(model, _image(32, 64), steps=2, block_batch=2,
                     progress=lambda d, t, p=None: seen.append((d, t, p)))
    assert [d for d, _, _ in seen] == list(range(1, 25))  # 3 evals x 8 batches of 2x2 blocks (4x8 grid)
    assert all(t == 24 for _, t, _ in seen)
    assert seen[-1][2].shape == (3, 128, 256) and 0 <= seen[-1][2].min() and seen[-1][2].max() <= 1


def test_wavelet_color_match_keeps_the_input_colours(model):
    lr = _image(32, 32) * 0.3 + 0.4
    plain = plan_and_upscale(model, lr, steps=1, seed=0)
    matched = plan_and_upscale(model, lr, steps=1, seed=0, color_match="wavelet")
    target = F.interpolate(lr, size=(128, 128), mode="bicubic", align_corners=False)
    err = lambda x: (F.avg_pool2d(x, 16) - F.avg_pool2d(target, 16)).abs().mean()  # noqa: E731
    assert err(matched) < err(plain)


@pytest.mark.parametrize("size", [(7, 9), (1, 5), (1, 1)])
def test_inputs_smaller_than_one_block_are_padded_and_cropped_back_with_a_warning(model, size):
    lr = _image(*size)
    with pytest.warns(SmallInputWarning, match="smaller than one 32-px block"):
        out = plan_and_upscale(model, lr, steps=1, seed=0)
    assert out.shape == (1, 3, size[0] * 4, size[1] * 4) and torch.isfinite(out).all()
    padded = reflect_pad(lr, 8, 16 if size[1] > 8 else 8)
    assert torch.equal(padded[..., :size[0], :size[1]], lr)
    if size[0] == 1:  # reflection is impossible on a 1-px side: replicated
        assert torch.equal(padded[..., 1:, :size[1]], lr.expand(-1, -1, padded.shape[-2] - 1, -1))
    noise = torch.randn((1, 3, *[4 * n for n in padded.shape[-2:]]), generator=torch.Generator().manual_seed(0))
    ref = sample_canvas(model, padded, clip_embedding=model.clip.embed(lr), noise=noise, steps=1)
    assert (out - ref[..., :size[0] * 4, :size[1] * 4]).abs().max().item() <= 1e-5


def test_a_given_plan_is_used_as_is(model):
    lr = _image(32, 64)
    plan = plan_upscale(model.config, 32, 64, 4, free_bytes=None, sampling=resolve_sampling(steps=2),
                        block_batch="1x2", offload_cache="on")
    batches = []
    out = upscale(model, lr, plan, seed=7, progress=lambda d, t, p=None: batches.append(t))
    assert batches[-1] == plan.total_batches == 3 * 4 * 4  # 3 evaluations x (4x8 grid in 1x2 batches)
    assert (out - plan_and_upscale(model, lr, steps=2, seed=7, block_batch=4)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="plan it for this image"):
        upscale(model, _image(32, 32), plan)
    with pytest.raises(TypeError, match="plan must be an UpscalePlan"):
        upscale(model, lr, plan.to_dict())


def test_any_k_diffusion_sampler_and_schedule(model):
    lr = _image(32, 32)
    sigmas = get_sigmas_karras(4, sigma_max=20.0)
    out = plan_and_upscale(model, lr, seed=3, sampler=sample_dpmpp_2m, sigmas=sigmas, block_batch=1)
    noise = torch.randn((1, 3, 128, 128), generator=torch.Generator().manual_seed(3))
    ref = sample_canvas(model, lr, clip_embedding=model.clip.embed(lr), noise=noise, sampler=sample_dpmpp_2m,
                        sigmas=sigmas)
    assert (out - ref).abs().max().item() <= 1e-5
    ticks = []
    plan_and_upscale(model, lr, seed=3, sampler=sample_dpmpp_2m, sigmas=sigmas, block_batch=2,
                     progress=lambda d, t, p=None: ticks.append((d, t)))
    assert count_evaluations(sample_dpmpp_2m, sigmas) == 4 and ticks[-1] == (16, 16)  # 4 evaluations x 4 batches
    with pytest.raises(ValueError, match="non-increasing"):
        plan_and_upscale(model, lr, sigmas=torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="1-D tensor"):
        plan_and_upscale(model, lr, sigmas=torch.tensor([[1.0]]))


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(1, 3, 0, 64), "is 64x0 px"),
    (torch.zeros(1, 2, 64, 64), "3 or 4"),
    (torch.zeros(64, 64), r"expected an image tensor \(batch, channels, height, width\), got shape \(64, 64\)"),
])
def test_bad_inputs(model, bad, match):
    plan = plan_upscale(model.config, 64, 64, 4, free_bytes=None, sampling=resolve_sampling(steps=1))
    with pytest.raises(ValueError, match=match):
        upscale(model, bad, plan)


def test_bad_options(model):
    lr = _image(32, 32)
    with pytest.raises(ValueError, match="scale: must be one of"):
        plan_and_upscale(model, lr, scale=3)
    with pytest.raises(ValueError, match="color_match"):
        plan_and_upscale(model, lr, color_match="lab")
    with pytest.raises(ValueError, match="noise must be"):
        plan_and_upscale(model, lr, steps=1, noise=torch.zeros(1, 3, 64, 64))
    without_clip = load_tiny_infdit(TINY.replace(clip=None))
    with pytest.raises(ValueError, match="no CLIP image tower"):
        plan_and_upscale(without_clip, lr)


def test_outputs_beyond_the_rope_table_warn_that_positions_wrap():
    small_table = TINY.replace(rope_grid=32, clip=None)  # 128 px before positions wrap
    model = load_infdit(sat_state_dict(small_table))  # the table size comes from the RoPE buffer's shape
    assert model.config.rope_grid == 32
    with pytest.warns(RopeWrapWarning, match="wrap"):
        plan_and_upscale(model, _image(40, 32), steps=1, clip_embedding=torch.ones(1, TINY.vector_dim) / 4)

"""Sana-Sprint: whole-path parity with diffusers' SanaSprintPipeline (test-only oracle), both file formats,
the schedule, and the one-sentence refusals between the Sprint and the regular paths."""

from __future__ import annotations

import pytest
import torch
from tiny_sana import TINY_SPRINT, tiny_sprint_oracle, write_tiny_sprint_pth

from uniba.sana import keys as sana_keys
from uniba.sana.config import SPRINT_GUIDANCE, infer_config
from uniba.sana.loader import build_sana, read_sana_checkpoint
from uniba.sana.sampling import velocity_denoiser
from uniba.sana.sprint import INTERMEDIATE_TIMESTEPS, MAX_TIMESTEPS, sample_scm, sprint_angles, sprint_sigmas

diffusers = pytest.importorskip("diffusers")

SEED = 7


def _embeddings(batch: int = 2):
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(batch, 9, TINY_SPRINT.caption_channels, generator=g)
    mask = torch.ones(batch, 9, dtype=torch.int64)
    mask[-1, 4:] = 0  # a shorter second prompt
    latents = torch.randn(batch, 32, 4, 6, generator=g)  # non-square
    return emb, mask, latents


def _diffusers_run(transformer, emb, mask, latents, steps: int, guidance: float) -> torch.Tensor:
    pipe = diffusers.SanaSprintPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                        scheduler=diffusers.SCMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt_embeds=emb, prompt_attention_mask=mask, latents=latents.clone(), num_inference_steps=steps,
                intermediate_timesteps=INTERMEDIATE_TIMESTEPS if steps == 2 else None, guidance_scale=guidance,
                height=latents.shape[-2] * 32, width=latents.shape[-1] * 32, use_resolution_binning=False,
                generator=torch.Generator().manual_seed(SEED), output_type="latent").images


def _our_run(model, emb, mask, latents, steps: int, guidance: float) -> torch.Tensor:
    sigmas = sprint_sigmas(steps)
    generator = torch.Generator().manual_seed(SEED)  # the same per-step noise stream as diffusers' generator
    denoiser = velocity_denoiser(model, timestep_scale=1.0)
    x = sigmas[0] * latents  # a host's start: sigma_max * noise
    return sample_scm(denoiser, x, sigmas, extra_args={"context": emb, "context_mask": mask, "guidance": guidance},
                      disable=True, noise_sampler=lambda s, sn: torch.randn(x.shape, generator=generator))


@pytest.fixture(scope="module")
def oracle():
    return tiny_sprint_oracle()


@pytest.fixture(scope="module")
def ours_from_pth(oracle, tmp_path_factory):
    """The oracle's weights written as the original Sprint .pth (cfg_embedder, logvar_linear, pos_embed...)."""
    path = write_tiny_sprint_pth(oracle.state_dict(), tmp_path_factory.mktemp("sprint"))
    checkpoint = read_sana_checkpoint(path, overrides={"cross_heads": 4, "cross_norm_eps": 1e-5})  # eps: diffusers
    return build_sana(checkpoint).eval()


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_whole_path_matches_sana_sprint_pipeline(oracle, ours_from_pth, steps: int) -> None:
    emb, mask, latents = _embeddings()
    with torch.no_grad():
        expected = _diffusers_run(oracle, emb, mask, latents, steps, SPRINT_GUIDANCE)
    got = _our_run(ours_from_pth, emb, mask, latents, steps, SPRINT_GUIDANCE)
    relative = ((got - expected).abs().max() / expected.abs().max()).item()
    print(f"Sprint {steps}-step whole path vs SanaSprintPipeline: max relative error {relative:.2e}")
    assert got.shape == expected.shape
    assert relative <= 1e-4
    assert expected.abs().max() > 0.5


def test_guidance_changes_the_result_as_in_diffusers(oracle, ours_from_pth) -> None:
    emb, mask, latents = _embeddings(batch=1)
    with torch.no_grad():
        expected = _diffusers_run(oracle, emb, mask, latents, 2, 2.0)
    got = _our_run(ours_from_pth, emb, mask, latents, 2, 2.0)
    default = _our_run(ours_from_pth, emb, mask, latents, 2, SPRINT_GUIDANCE)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-4
    assert (got - default).abs().max() > 1e-3


def test_pth_and_diffusers_formats_load_to_the_same_sprint_model(oracle, ours_from_pth) -> None:
    from_diffusers = read_sana_checkpoint(oracle.state_dict(), overrides={"cross_heads": 4})
    assert from_diffusers.config.is_sprint and from_diffusers.source_format == "diffusers"
    assert from_diffusers.config.replace(cross_norm_eps=1e-5) == ours_from_pth.config
    ours = ours_from_pth.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in from_diffusers.state_dict.items()) and \
        from_diffusers.state_dict.keys() == ours.keys()
    # back to the original layout: the Sprint time embedding keys, no logvar (not a weight of the sampler)
    original = sana_keys.ours_to_original(from_diffusers.state_dict)
    assert {"cfg_embedder.mlp.0.weight", "t_embedder.mlp.2.bias"} <= original.keys()
    assert not any(k.startswith(("time_embed.", "logvar")) for k in original)
    assert infer_config(sana_keys.original_to_ours(original), {"cross_heads": 4}) == from_diffusers.config


def test_schedule_is_scm_schedulers() -> None:
    for steps, intermediate in ((1, None), (2, INTERMEDIATE_TIMESTEPS), (3, None), (4, None)):
        scheduler = diffusers.SCMScheduler()
        scheduler.set_timesteps(steps, max_timesteps=MAX_TIMESTEPS, intermediate_timesteps=intermediate)
        assert torch.equal(sprint_angles(steps), scheduler.timesteps)
    sigmas = sprint_sigmas(2)
    assert sigmas[-1] == 0 and 1.0 < float(sigmas[0]) < 1.00001
    assert abs(float(sigmas[1]) - 0.7826) < 1e-3  # sin 1.3 / (sin 1.3 + cos 1.3)
    with pytest.raises(ValueError, match="intermediate_timesteps must lie between"):
        sprint_sigmas(2, intermediate_timesteps=1.6)
    with pytest.raises(ValueError, match="max_timesteps must be in"):
        sprint_sigmas(2, max_timesteps=2.0)

"""Sana-Sprint in a real ComfyUI: SamplerCustom with Sana Sprint Sampler/Sigmas/Guidance equals the engine's sCM run,
the MODEL samples in flow time (multiplier 1), and the wrong sampling node is refused in one sentence."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_sana_dit_comfy import _embedding, _mask, _SanaTestConditioning  # noqa: E402
from tiny_sana import TINY, write_tiny_sana_dit  # noqa: E402

from uniba.sana import load_sana  # noqa: E402
from uniba.sana.sprint import sample_scm, sprint_sigmas  # noqa: E402

SPRINT = TINY.replace(qk_norm=True, cross_norm=True, guidance_embeds=True)
CKPT = "Sana_Sprint_tiny_comfy.safetensors"
REGULAR = "sana_tiny_regular_comfy.safetensors"
SEED = 11
LATENT_SCALE = 0.41407


@pytest.fixture(scope="module")
def sprint_host(comfy_host):
    folder = comfy_host.model_folder("diffusion_models")
    write_tiny_sana_dit(folder, CKPT, fmt="original", config=SPRINT)
    write_tiny_sana_dit(folder, REGULAR, fmt="original")
    comfy_host.nodes["_SanaTestConditioning"] = _SanaTestConditioning
    yield comfy_host
    comfy_host.nodes.pop("_SanaTestConditioning", None)


def _prompt(guidance: float | None, steps: int = 2, unet: str = CKPT) -> dict:
    prompt = {
        "1": {"class_type": "SanaDiTLoader", "inputs": {"unet_name": unet, "weight_dtype": "auto"}},
        "2": {"class_type": "_SanaTestConditioning", "inputs": {"seed": 1, "tokens": 12}},
        "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
        "4": {"class_type": "SanaEmptyLatent", "inputs": {"width": 128, "height": 96, "preset": "custom",
                                                          "batch_size": 1}},
        "5": {"class_type": "SanaSprintSampler", "inputs": {}},
        "6": {"class_type": "SanaSprintSigmas", "inputs": {"model": ["1", 0], "steps": steps,
                                                           "max_timesteps": 1.5708, "intermediate_timesteps": 1.3}},
        "7": {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": True, "noise_seed": SEED, "cfg": 1.0, "positive": ["2", 0],
            "negative": ["3", 0], "sampler": ["5", 0], "sigmas": ["6", 0], "latent_image": ["4", 0]}},
        "99": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "sprint_test"}},
    }
    if guidance is not None:
        prompt["8"] = {"class_type": "SanaSprintGuidance", "inputs": {"conditioning": ["2", 0], "guidance": guidance}}
        prompt["7"]["inputs"]["positive"] = ["8", 0]
    return prompt


def _engine_reference(host, steps: int, guidance: float) -> torch.Tensor:
    model = load_sana(host.model_folder("diffusion_models") / CKPT, torch.float32)
    context, mask = _embedding(1), _mask(12)
    sigmas = sprint_sigmas(steps)
    x = torch.randn(1, 32, 3, 4, generator=torch.manual_seed(SEED)) * sigmas[0]  # prepare_noise, CONST scaling

    def denoiser(xt, sigma, **_):
        v = model(xt, sigma, context, mask, guidance=guidance)  # timestep = flow time itself
        return xt - sigma.reshape(-1, 1, 1, 1) * v

    with torch.no_grad():  # the sampler's fresh noise comes from the seed ComfyUI hands it in extra_args
        return sample_scm(denoiser, x, sigmas, extra_args={"seed": SEED}, disable=True) / LATENT_SCALE


@pytest.mark.parametrize("steps,guidance", [(2, 3.0), (4, None)])
def test_sampler_custom_equals_the_engine(sprint_host, run_prompt, steps: int, guidance: float | None) -> None:
    result = run_prompt(_prompt(guidance, steps))
    samples = result.outputs["7"][0][0]["samples"]
    expected = _engine_reference(sprint_host, steps, 4.5 if guidance is None else guidance)
    assert (samples - expected).abs().max().item() <= 1e-4
    sampling = result.outputs["1"][0][0].get_model_object("model_sampling")
    assert sampling.multiplier == 1.0 and sampling.shift == 1.0  # flow time goes into the DiT unchanged


def test_wrong_sampling_nodes_say_which_to_use(sprint_host, run_prompt) -> None:
    with pytest.raises(AssertionError, match="needs a Sana-Sprint MODEL"):
        run_prompt(_prompt(None, unet=REGULAR))
    prompt = _prompt(None)
    prompt["7"] = {"class_type": "SanaSampler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": SEED,
        "steps": 2, "cfg": 4.5, "solver": "flow_euler", "shift": 0.0, "denoise": 1.0}}
    with pytest.raises(AssertionError, match="this MODEL is Sana-Sprint"):
        run_prompt(prompt)


def test_model_sampling_patch_on_sprint_is_refused(sprint_host, run_prompt) -> None:
    """ModelSamplingSD3 resets the time multiplier to 1000: without the check, every Sprint step is wrong silently."""
    prompt = _prompt(None)
    prompt["9"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}}
    prompt["7"]["inputs"]["model"] = ["9", 0]
    with pytest.raises(AssertionError, match="Sprint's transformer takes flow time unscaled"):
        run_prompt(prompt)


def test_pipeline_folder_runs_text_to_image(sprint_host, run_prompt) -> None:
    """Sana Pipeline Loader's three outputs drive the whole graph: prompt -> 2 Sprint steps -> DC-AE -> image."""
    from tiny_sana_te_vae import write_tiny_gemma, write_tiny_pipeline

    folder = sprint_host.model_folder("diffusion_models")
    write_tiny_pipeline(folder / "Sana_Sprint_tiny_diffusers", write_tiny_gemma(folder.parent / "gemma_src"), SPRINT)
    prompt = _prompt(None)
    prompt["1"] = {"class_type": "SanaPipelineLoader", "inputs": {
        "pipeline_name": "Sana_Sprint_tiny_diffusers/", "weight_dtype": "auto", "text_encoder_dtype": "auto",
        "vae_dtype": "auto"}}
    prompt["2"] = {"class_type": "SanaTextEncode", "inputs": {"text_encoder": ["1", 1], "text": "a red fox",
                                                              "use_chi": True}}
    prompt["9"] = {"class_type": "SanaVAEDecode", "inputs": {"vae": ["1", 2], "samples": ["7", 0], "tile_size": 0}}
    prompt["99"] = {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "sprint_pipe"}}
    result = run_prompt(prompt)
    assert tuple(result.outputs["9"][0][0].shape) == (1, 96, 128, 3)

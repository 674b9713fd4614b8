"""Sana DiT in a real ComfyUI: stock KSampler, SamplerCustom with our sampler/sigmas, SanaSampler, bad latents."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_sana import write_tiny_sana_dit  # noqa: E402

from uniba.sana import flow_sigmas, load_sana, sample_flow_dpm_solver  # noqa: E402

CKPT = "sana_tiny_comfy.safetensors"
SEED = 7
LATENT_SCALE = 0.41407


class _SanaTestConditioning:
    """Gemma-shaped conditioning as SanaTextEncode makes it: (1, 300, 2304) + attention_mask (1, 300)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "tokens": ("INT", {"default": 300})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, tokens):
        return ([[_embedding(seed), {"attention_mask": _mask(tokens)}]],)


def _embedding(seed: int) -> torch.Tensor:
    return torch.randn(1, 300, 2304, generator=torch.Generator().manual_seed(seed))


def _mask(tokens: int) -> torch.Tensor:
    mask = torch.zeros(1, 300)
    mask[:, :tokens] = 1
    return mask


@pytest.fixture(scope="module")
def sana_host(comfy_host):
    write_tiny_sana_dit(comfy_host.model_folder("diffusion_models"), CKPT, fmt="original")
    comfy_host.nodes["_SanaTestConditioning"] = _SanaTestConditioning
    yield comfy_host
    comfy_host.nodes.pop("_SanaTestConditioning", None)


def _base(width: int = 128, height: int = 96, weight_dtype: str = "auto") -> dict:
    return {
        "1": {"class_type": "SanaDiTLoader", "inputs": {"unet_name": CKPT, "weight_dtype": weight_dtype}},
        "2": {"class_type": "_SanaTestConditioning", "inputs": {"seed": 1, "tokens": 12}},
        "3": {"class_type": "_SanaTestConditioning", "inputs": {"seed": 2, "tokens": 1}},
        "4": {"class_type": "SanaEmptyLatent", "inputs": {"width": width, "height": height, "preset": "custom",
                                                          "batch_size": 1}},
    }


def _with_output(prompt: dict, node: str) -> dict:
    """The prompt needs an output node: save the latent (into the temporary output folder)."""
    prompt["99"] = {"class_type": "SaveLatent", "inputs": {"samples": [node, 0], "filename_prefix": "sana_test"}}
    return prompt


def _engine_reference(comfy_host, steps: int, cfg: float, noise_scale_sigma0: bool,
                      storage: torch.dtype | None = None) -> torch.Tensor:
    """The same sampling done with the engine only: model, CFG on x0, Flow-DPM-Solver."""
    model = load_sana(comfy_host.model_folder("diffusion_models") / CKPT, torch.float32, storage_dtype=storage)
    context = torch.cat([_embedding(1), _embedding(2)])
    mask = torch.cat([_mask(12), _mask(1)])
    sigmas = flow_sigmas(steps, 3.0)
    noise = torch.randn(1, 32, 3, 4, generator=torch.manual_seed(SEED))  # comfy.sample.prepare_noise
    x = noise * sigmas[0] if noise_scale_sigma0 else noise

    def denoiser(xt, sigma):
        v = model(xt.repeat(2, 1, 1, 1), sigma.repeat(2) * 1000, context, mask)
        x0_cond, x0_uncond = (xt - sigma * v).chunk(2)
        return x0_uncond + cfg * (x0_cond - x0_uncond)

    with torch.no_grad():
        return sample_flow_dpm_solver(denoiser, x, sigmas, disable=True) / LATENT_SCALE


def test_stock_ksampler_and_model_patch_node(sana_host, run_prompt) -> None:
    prompt = _base()
    prompt["5"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}}
    prompt["6"] = {"class_type": "KSampler", "inputs": {
        "model": ["5", 0], "seed": SEED, "steps": 4, "cfg": 4.5, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}
    result = run_prompt(_with_output(prompt, "6"))
    samples = result.outputs["6"][0][0]["samples"]
    assert tuple(samples.shape) == (1, 32, 3, 4)
    assert torch.isfinite(samples).all() and samples.abs().max() > 0.1
    model = result.outputs["1"][0][0]
    assert model.model.latent_format.latent_channels == 32
    assert model.get_model_object("model_sampling").shift == 3.0


@pytest.mark.parametrize("weight_dtype", ["auto", "fp8_e4m3fn"])
def test_sampler_custom_with_flow_dpm_solver_equals_the_engine(sana_host, run_prompt, weight_dtype) -> None:
    """fp8: ComfyUI's manual-cast layers (fp8 weights, fp32 compute on the CPU) equal the engine's cast-on-use ones."""
    prompt = _base(weight_dtype=weight_dtype)
    prompt["5"] = {"class_type": "FlowDPMSolverSampler", "inputs": {}}
    prompt["6"] = {"class_type": "SanaFlowSigmas", "inputs": {"steps": 6, "shift": 3.0, "denoise": 1.0}}
    prompt["7"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["1", 0], "add_noise": True, "noise_seed": SEED, "cfg": 4.5, "positive": ["2", 0],
        "negative": ["3", 0], "sampler": ["5", 0], "sigmas": ["6", 0], "latent_image": ["4", 0]}}
    result = run_prompt(_with_output(prompt, "7"))
    samples = result.outputs["7"][0][0]["samples"]
    storage = torch.float8_e4m3fn if weight_dtype == "fp8_e4m3fn" else None
    expected = _engine_reference(sana_host, 6, 4.5, noise_scale_sigma0=True, storage=storage)
    assert (samples - expected).abs().max().item() <= 1e-4
    dit = result.outputs["1"][0][0].model.diffusion_model
    assert dit.transformer_blocks[0].attn1.to_q.weight.dtype == (storage or torch.float32)
    if storage is not None:  # really quantised: differs from the full-precision sampling
        assert (samples - _engine_reference(sana_host, 6, 4.5, noise_scale_sigma0=True)).abs().max().item() > 1e-3


def test_sampler_custom_advanced_gives_the_same(sana_host, run_prompt) -> None:
    prompt = _base()
    prompt["5"] = {"class_type": "FlowDPMSolverSampler", "inputs": {}}
    prompt["6"] = {"class_type": "SanaFlowSigmas", "inputs": {"steps": 6, "shift": 3.0, "denoise": 1.0}}
    prompt["7"] = {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0],
                                                         "negative": ["3", 0], "cfg": 4.5}}
    prompt["8"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}}
    prompt["9"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["8", 0], "guider": ["7", 0], "sampler": ["5", 0], "sigmas": ["6", 0], "latent_image": ["4", 0]}}
    samples = run_prompt(_with_output(prompt, "9")).outputs["9"][0][0]["samples"]
    expected = _engine_reference(sana_host, 6, 4.5, noise_scale_sigma0=True)
    assert (samples - expected).abs().max().item() <= 1e-4


def test_loader_refuses_a_non_sana_file(sana_host, run_prompt) -> None:
    from uniba.checkpoint import save_safetensors

    save_safetensors({"input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)},
                     sana_host.model_folder("diffusion_models") / "not_sana_unet.safetensors")
    prompt = _base()
    prompt["1"]["inputs"]["unet_name"] = "not_sana_unet.safetensors"
    prompt["5"] = {"class_type": "SanaSampler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": SEED,
        "steps": 2, "cfg": 4.5, "solver": "flow_euler", "shift": 0.0, "denoise": 1.0}}
    with pytest.raises(AssertionError, match="not a Sana DiT"):
        run_prompt(_with_output(prompt, "5"))


def test_sana_sampler_reuses_the_solver_from_unscaled_noise(sana_host, run_prompt) -> None:
    prompt = _base()
    prompt["5"] = {"class_type": "SanaSampler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": SEED,
        "steps": 6, "cfg": 4.5, "solver": "flow_dpm_solver", "shift": 0.0, "denoise": 1.0}}
    import comfy.utils

    progress = []
    previous_hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: progress.append(
        (value, total, preview is not None)))
    try:
        result = run_prompt(_with_output(prompt, "5"), preview_method="latent2rgb")
    finally:
        comfy.utils.set_progress_bar_global_hook(previous_hook)
    samples = result.outputs["5"][0][0]["samples"]
    expected = _engine_reference(sana_host, 6, 4.5, noise_scale_sigma0=False)
    assert (samples - expected).abs().max().item() <= 1e-4
    # one tick per solver step; newer hosts may drop ticks closer than 100 ms, never the first or the last
    sampling = [tick for tick in progress if tick[1] == 6]  # the loader reports its tensors too, without previews
    assert all(not has_preview for _, t, has_preview in progress if t != 6)
    values = [v for v, _, _ in sampling]
    assert values[0] == 1 and values[-1] == 6 and values == sorted(set(values)), values
    assert all(has_preview for _, _, has_preview in sampling)  # latent-RGB previews of the 32-channel latent


def test_sd_latent_into_sana_sampler_says_what_to_use(sana_host, run_prompt) -> None:
    prompt = _base()
    prompt["4"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}}
    prompt["5"] = {"class_type": "SanaSampler", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": SEED,
        "steps": 2, "cfg": 4.5, "solver": "flow_euler", "shift": 0.0, "denoise": 1.0}}
    with pytest.raises(AssertionError, match="SanaEmptyLatent"):
        run_prompt(_with_output(prompt, "5"))

"""Sana LoRA, ControlNet and PAG in a real ComfyUI: stock LoRA loaders (strength, stacking, unpatching), our
checked loader's refusals, the stock Apply ControlNet node and the PAG patch, each equal to the engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_sana_dit_comfy import _embedding, _mask  # noqa: E402
from tiny_sana import TINY, write_tiny_sana_dit  # noqa: E402
from tiny_sana_te_vae import write_tiny_dcae  # noqa: E402

from uniba.checkpoint import save_safetensors  # noqa: E402
from uniba.dcae import load_dcae  # noqa: E402
from uniba.sana import flow_sigmas, load_sana, sample_flow_dpm_solver  # noqa: E402
from uniba.sana.controlnet import SanaControlNet, control_residuals, load_controlnet  # noqa: E402
from uniba.sana.lora import apply_lora, lora_target_layers, read_lora  # noqa: E402
from uniba.sana.model import PERTURBED_BLOCKS_OPTION  # noqa: E402

CKPT, VAE, CONTROLNET = "sana_tiny_adapters.safetensors", "dcae_tiny_adapters.safetensors", "sana_tiny_cn.safetensors"
LORA_PEFT, LORA_KOHYA = "sana_lora_peft.safetensors", "sana_lora_kohya.safetensors"
LORA_BIG = "sana_lora_big.safetensors"
SEED, CFG, STEPS = 7, 4.5, 4
LATENT_SCALE = 0.41407


def _lora_factors(config, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer, shape in lora_target_layers(config).items():
        kernel = tuple(shape[2:])
        out[layer] = (torch.randn((4, shape[1], *kernel), generator=g) * 0.1,
                      torch.randn((shape[0], 4, *(1 for _ in kernel)), generator=g) * 0.1)
    return out


def _write_loras(folder: Path) -> None:
    peft = {}
    for layer, (down, up) in _lora_factors(TINY, 1).items():
        if layer.endswith("conv_depth"):
            continue  # PEFT's grouped-conv form is not this one
        peft[f"base_model.model.{layer}.lora_A.weight"] = down
        peft[f"base_model.model.{layer}.lora_B.weight"] = up
    save_safetensors(peft, folder / LORA_PEFT)
    kohya = {}
    for layer, (down, up) in _lora_factors(TINY, 2).items():
        name = "lora_transformer_" + layer.replace(".", "_")
        kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"] = down, up
        kohya[f"{name}.alpha"] = torch.tensor(2.0)
    save_safetensors(kohya, folder / LORA_KOHYA)
    big = {}
    for layer, (down, up) in _lora_factors(TINY.replace(hidden_size=96), 3).items():
        big[f"transformer.{layer}.lora_A.weight"], big[f"transformer.{layer}.lora_B.weight"] = down, up
    save_safetensors(big, folder / LORA_BIG)


def _write_controlnet(folder: Path) -> None:
    g = torch.Generator().manual_seed(11)
    model = SanaControlNet(TINY.replace(depth=1))
    save_safetensors({k: torch.randn(v.shape, generator=g) * 0.1 for k, v in model.state_dict().items()},
                     folder / CONTROLNET)
    # a diffusers ControlNet states its head count in config.json; beside the file as <name>.json
    (folder / CONTROLNET).with_suffix(".json").write_text(json.dumps(
        {"_class_name": "SanaControlNetModel", "num_cross_attention_heads": TINY.cross_heads,
         "interpolation_scale": None}))


class _SanaTestInputs:
    """Gemma-shaped conditioning and a random control image."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "tokens": ("INT", {"default": 300})}}

    RETURN_TYPES = ("CONDITIONING", "IMAGE")
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, tokens):
        return ([[_embedding(seed), {"attention_mask": _mask(tokens)}]], _image())


def _image() -> torch.Tensor:
    return torch.rand(1, 96, 128, 3, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def adapters_host(comfy_host):
    write_tiny_sana_dit(comfy_host.model_folder("diffusion_models"), CKPT, fmt="original")
    write_tiny_dcae(comfy_host.model_folder("vae"), VAE)
    _write_loras(comfy_host.model_folder("loras"))
    _write_controlnet(comfy_host.model_folder("controlnet"))
    comfy_host.nodes["_SanaTestInputs"] = _SanaTestInputs
    yield comfy_host
    comfy_host.nodes.pop("_SanaTestInputs", None)


def _load_model(host):
    return host.nodes["SanaDiTLoader"]().load(CKPT, "fp32")[0]


def _patched_weights(patcher) -> dict[str, torch.Tensor]:
    patcher.patch_model()
    try:
        return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    finally:
        patcher.unpatch_model()


def test_stock_lora_loaders_strength_stacking_and_unpatching(adapters_host) -> None:
    import folder_paths

    folder_paths.filename_list_cache.clear()
    model = _load_model(adapters_host)
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    only = adapters_host.nodes["LoraLoaderModelOnly"]()
    with_clip = adapters_host.nodes["LoraLoader"]()
    half = only.load_lora_model_only(model, LORA_PEFT, 0.5)[0]
    stacked = with_clip.load_lora(half, None, LORA_KOHYA, 1.0, 1.0)[0]

    loras = adapters_host.model_folder("loras")
    reference = load_sana(adapters_host.model_folder("diffusion_models") / CKPT, torch.float32)
    apply_lora(reference, read_lora(loras / LORA_PEFT, TINY), 0.5)
    expected_half = {k: v.clone() for k, v in reference.state_dict().items()}
    apply_lora(reference, read_lora(loras / LORA_KOHYA, TINY), 1.0)
    for patcher, expected in ((half, expected_half), (stacked, reference.state_dict())):
        got = _patched_weights(patcher)
        worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
        assert worst <= 1e-5, worst
        changed = sum(not torch.equal(got[k], before[k]) for k in before if k.endswith(".weight"))
        assert changed >= len(lora_target_layers(TINY)) - 2  # every layer type, PEFT file without the depthwise
    # unpatched: the shared weights are bit-identical to before, the input MODEL was never changed
    for key, value in model.model.diffusion_model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_checked_loader_equals_stock_and_refuses_another_size(adapters_host, run_prompt) -> None:
    model = _load_model(adapters_host)
    checked = adapters_host.nodes["SanaLoraLoader"]().load(model, LORA_KOHYA, 0.7)[0]
    stock = adapters_host.nodes["LoraLoaderModelOnly"]().load_lora_model_only(model, LORA_KOHYA, 0.7)[0]
    a, b = _patched_weights(checked), _patched_weights(stock)
    assert all(torch.equal(a[k], b[k]) for k in a)
    prompt = {
        "1": {"class_type": "SanaDiTLoader", "inputs": {"unet_name": CKPT, "weight_dtype": "auto"}},
        "2": {"class_type": "SanaLoraLoader", "inputs": {"model": ["1", 0], "lora_name": LORA_BIG,
                                                          "strength_model": 1.0}},
        "3": {"class_type": "_SanaTestInputs", "inputs": {"seed": 1, "tokens": 12}},
        "4": {"class_type": "SanaEmptyLatent", "inputs": {"width": 128, "height": 96, "preset": "custom",
                                                          "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": SEED, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "99": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "sana_test"}},
    }
    with pytest.raises(AssertionError, match=r"sana_lora_big\.safetensors.*hidden size 96; this model has 64"):
        run_prompt(prompt)


def _prompt(model_node: list, extra: dict) -> dict:
    prompt = {
        "1": {"class_type": "SanaDiTLoader", "inputs": {"unet_name": CKPT, "weight_dtype": "auto"}},
        "2": {"class_type": "_SanaTestInputs", "inputs": {"seed": 1, "tokens": 12}},
        "3": {"class_type": "_SanaTestInputs", "inputs": {"seed": 2, "tokens": 1}},
        "4": {"class_type": "SanaEmptyLatent", "inputs": {"width": 128, "height": 96, "preset": "custom",
                                                          "batch_size": 1}},
        "5": {"class_type": "FlowDPMSolverSampler", "inputs": {}},
        "6": {"class_type": "SanaFlowSigmas", "inputs": {"steps": STEPS, "shift": 3.0, "denoise": 1.0}},
        **extra,
    }
    positive, negative = extra.pop("_conds", (["2", 0], ["3", 0]))
    prompt.pop("_conds", None)
    prompt["7"] = {"class_type": "SamplerCustom", "inputs": {
        "model": model_node, "add_noise": True, "noise_seed": SEED, "cfg": CFG, "positive": positive,
        "negative": negative, "sampler": ["5", 0], "sigmas": ["6", 0], "latent_image": ["4", 0]}}
    prompt["99"] = {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "sana_test"}}
    return prompt


def _engine(host, velocity) -> torch.Tensor:
    """SamplerCustom's run done by the engine: noise from the seed times sigma_0, CFG on x0, Flow-DPM-Solver."""
    sigmas = flow_sigmas(STEPS, 3.0)
    x = torch.randn(1, 32, 3, 4, generator=torch.manual_seed(SEED)) * sigmas[0]
    context = torch.cat([_embedding(1), _embedding(2)])
    mask = torch.cat([_mask(12), _mask(1)])

    def denoiser(xt, sigma):
        return velocity(xt, sigma, context, mask)

    with torch.no_grad():
        return sample_flow_dpm_solver(denoiser, x, sigmas, disable=True) / LATENT_SCALE


def _controlnet_extra(start: float = 0.0, end: float = 1.0) -> dict:
    return {
        "10": {"class_type": "SanaVAELoader", "inputs": {"vae_name": VAE, "dtype": "fp32"}},
        "11": {"class_type": "SanaControlNetLoader", "inputs": {"control_net_name": CONTROLNET,
                                                                "weight_dtype": "auto", "wiring": "diffusers"}},
        "12": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "control_net": ["11", 0], "image": ["2", 1],
            "strength": 0.8, "start_percent": start, "end_percent": end, "vae": ["10", 0]}},
        "_conds": (["12", 0], ["12", 1]),
    }


def _plain(dit):
    def velocity(xt, sigma, context, mask):
        x0_cond, x0_uncond = (xt - sigma * dit(xt.repeat(2, 1, 1, 1), sigma.repeat(2) * 1000, context,
                                               mask)).chunk(2)
        return x0_uncond + CFG * (x0_cond - x0_uncond)

    return velocity


def test_controlnet_start_end_percent_select_the_steps(adapters_host, run_prompt) -> None:
    dit = load_sana(adapters_host.model_folder("diffusion_models") / CKPT, torch.float32)
    never = run_prompt(_prompt(["1", 0], _controlnet_extra(0.0, 0.0))).outputs["7"][0][0]["samples"]
    assert (never - _engine(adapters_host, _plain(dit))).abs().max().item() <= 1e-4
    late = run_prompt(_prompt(["1", 0], _controlnet_extra(0.5, 1.0))).outputs["7"][0][0]["samples"]
    full = run_prompt(_prompt(["1", 0], _controlnet_extra())).outputs["7"][0][0]["samples"]
    assert (late - never).abs().max().item() > 1e-3 and (late - full).abs().max().item() > 1e-3


def test_stock_apply_controlnet_equals_the_engine(adapters_host, run_prompt) -> None:
    samples = run_prompt(_prompt(["1", 0], _controlnet_extra())).outputs["7"][0][0]["samples"]

    dit = load_sana(adapters_host.model_folder("diffusion_models") / CKPT, torch.float32)
    controlnet = load_controlnet(adapters_host.model_folder("controlnet") / CONTROLNET, torch.float32)
    dcae = load_dcae(adapters_host.model_folder("vae") / VAE, torch.float32)
    hint = dcae.encode(_image().movedim(-1, 1) * 2 - 1) * LATENT_SCALE

    def velocity(xt, sigma, context, mask):
        x2, t = xt.repeat(2, 1, 1, 1), sigma.repeat(2) * 1000
        control = control_residuals(controlnet, x2, hint, t, context, mask, 0.8)
        x0_cond, x0_uncond = (xt - sigma * dit(x2, t, context, mask, control=control)).chunk(2)
        return x0_uncond + CFG * (x0_cond - x0_uncond)

    assert (samples - _engine(adapters_host, velocity)).abs().max().item() <= 1e-4
    assert (samples - _engine(adapters_host, _plain(dit))).abs().max().item() > 0.01  # the ControlNet acted


def test_pag_node_equals_the_engine(adapters_host, run_prompt) -> None:
    extra = {"13": {"class_type": "SanaPAG", "inputs": {"model": ["1", 0], "scale": 2.0, "applied_layers": "1",
                                                        "adaptive_scale": 0.0}}}
    samples = run_prompt(_prompt(["13", 0], extra)).outputs["7"][0][0]["samples"]
    dit = load_sana(adapters_host.model_folder("diffusion_models") / CKPT, torch.float32)

    def velocity(xt, sigma, context, mask):
        t = sigma * 1000
        x0_cond, x0_uncond = (xt - sigma * dit(xt.repeat(2, 1, 1, 1), t.repeat(2), context, mask)).chunk(2)
        perturbed = xt - sigma * dit(xt, t, context[:1], mask[:1],
                                     transformer_options={PERTURBED_BLOCKS_OPTION: (1,)})
        return x0_uncond + CFG * (x0_cond - x0_uncond) + 2.0 * (x0_cond - perturbed)

    assert (samples - _engine(adapters_host, velocity)).abs().max().item() <= 1e-4


def test_lora_key_map_changes_nothing_for_other_models(adapters_host) -> None:
    import types

    import comfy.lora

    wrapped = comfy.lora.model_lora_keys_unet
    original = wrapped.__wrapped__

    class OtherModel:  # any model that is not the pack's Sana
        model_config = types.SimpleNamespace(unet_config={})

        def state_dict(self):
            return {"diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
                    "diffusion_model.out.2.bias": torch.zeros(1)}

    assert wrapped(OtherModel(), {}) == original(OtherModel(), {})
    sana = _load_model(adapters_host).model
    ours, theirs = wrapped(sana, {}), original(sana, {})
    assert {k: ours[k] for k in theirs} == theirs  # ComfyUI's own entries are kept as they were
    assert ours["base_model.model.transformer_blocks.1.ff.conv_depth"] == \
        "diffusion_model.transformer_blocks.1.ff.conv_depth.weight"
    assert "transformer.caption_projection.linear_1" not in theirs


def test_nvlabs_wiring_of_a_diffusers_file_is_refused(adapters_host, run_prompt) -> None:
    extra = _controlnet_extra()
    extra["11"]["inputs"]["wiring"] = "nvlabs"
    with pytest.raises(AssertionError, match=r"sana_tiny_cn\.safetensors: has no copy of the DiT's first block"):
        run_prompt(_prompt(["1", 0], extra))


def test_bypass_lora_node_gives_the_patched_result(adapters_host, run_prompt) -> None:
    if "LoraLoaderBypassModelOnly" not in adapters_host.nodes:
        pytest.skip("this ComfyUI has no bypass LoRA loader (added after 0.3.64)")
    results = []
    for loader in ("LoraLoaderModelOnly", "LoraLoaderBypassModelOnly"):
        extra = {"14": {"class_type": loader, "inputs": {"model": ["1", 0], "lora_name": LORA_PEFT,
                                                         "strength_model": 0.5}}}
        results.append(run_prompt(_prompt(["14", 0], extra)).outputs["7"][0][0]["samples"])
    plain = run_prompt(_prompt(["1", 0], {})).outputs["7"][0][0]["samples"]
    assert (results[0] - results[1]).abs().max().item() <= 1e-4
    assert (results[0] - plain).abs().max().item() > 1e-3

"""Sana DiT nodes outside ComfyUI: the node contract other workflows rely on, latents, sigmas, headless loading."""

from __future__ import annotations

import importlib

import pytest
import torch
from tiny_sana import TINY, write_tiny_sana_dit

from uniba.sana import flow_sigmas, load_sana
from uniba.sana.config import RATIO_BINS_1024, RATIO_BINS_4096

sana_nodes = importlib.import_module("uniba_pack.nodes.sana_nodes")

CONTRACT = {
    "SanaDiTLoader": (["unet_name", "weight_dtype"], ("MODEL",)),
    "FlowDPMSolverSampler": ([], ("SAMPLER",)),
    "SanaFlowSigmas": (["steps", "shift", "denoise"], ("SIGMAS",)),
    "SanaSampler": (["model", "positive", "negative", "latent_image", "seed", "steps", "cfg", "solver", "shift",
                     "denoise"], ("LATENT",)),
    "SanaEmptyLatent": (["width", "height", "preset", "batch_size"], ("LATENT",)),
}


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_node_contract(name: str) -> None:
    cls = sana_nodes.NODE_CLASS_MAPPINGS[name]
    inputs, outputs = CONTRACT[name]
    assert list(cls.INPUT_TYPES()["required"]) == inputs
    assert cls.RETURN_TYPES == outputs
    assert cls.CATEGORY == "UniBA/Sana"
    assert callable(getattr(cls, cls.FUNCTION))


def test_defaults() -> None:
    sampler = sana_nodes.SanaSampler.INPUT_TYPES()["required"]
    assert sampler["steps"][1]["default"] == 20 and sampler["cfg"][1]["default"] == 4.5
    assert sampler["solver"][0] == ["flow_dpm_solver", "flow_euler"] and sampler["shift"][1]["default"] == 0.0
    assert sampler["seed"][1]["control_after_generate"]
    sigmas = sana_nodes.SanaFlowSigmas.INPUT_TYPES()["required"]
    assert (sigmas["steps"][1]["default"], sigmas["shift"][1]["default"], sigmas["denoise"][1]["default"]) == (
        20, 3.0, 1.0)
    loader = sana_nodes.SanaDiTLoader.INPUT_TYPES()["required"]
    assert loader["weight_dtype"][0] == ["auto", "bf16", "fp16", "fp32", "fp8_e4m3fn"]


def test_empty_latent_custom_and_presets() -> None:
    node = sana_nodes.SanaEmptyLatent()
    (latent,) = node.generate(1024, 768, "custom", 2)
    assert tuple(latent["samples"].shape) == (2, 32, 24, 32) and not latent["samples"].any()
    presets = sana_nodes.SanaEmptyLatent.INPUT_TYPES()["required"]["preset"][0]
    assert presets[:2] == ["custom", "1024x1024"]
    for name, (w, h) in (("1024x1024", (1024, 1024)), ("2048x512", (2048, 512)), ("4096x4096", (4096, 4096)),
                         ("2816x5632", (2816, 5632)), ("1536x2688", (1536, 2688))):
        assert name in presets
        (latent,) = node.generate(64, 64, name, 1)
        assert tuple(latent["samples"].shape) == (1, 32, h // 32, w // 32)
    assert len(RATIO_BINS_1024) == 33 and len(RATIO_BINS_4096) == 40
    assert all(w % 32 == 0 and h % 32 == 0 for w, h in sana_nodes.RESOLUTION_PRESETS.values())


def test_sigmas_node() -> None:
    (sigmas,) = sana_nodes.SanaFlowSigmas().get_sigmas(20, 3.0, 1.0)
    assert torch.equal(sigmas, flow_sigmas(20, 3.0))
    (partial,) = sana_nodes.SanaFlowSigmas().get_sigmas(10, 6.0, 0.5)
    assert len(partial) == 11 and partial[0] < 0.99


def test_sampler_refuses_an_sd_latent_before_sampling() -> None:
    with pytest.raises(ValueError, match="SanaEmptyLatent"):
        sana_nodes.SanaSampler().sample(None, [], [], {"samples": torch.zeros(1, 4, 64, 64)}, 0, 20, 4.5,
                                        "flow_dpm_solver", 0.0, 1.0)


def test_headless_loader(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "diffusion_models"
    write_tiny_sana_dit(folder, "tiny.safetensors", fmt="original")
    monkeypatch.setenv("UNIBA_MODELS_DIR", str(tmp_path))
    assert "tiny.safetensors" in sana_nodes.SanaDiTLoader.INPUT_TYPES()["required"]["unet_name"][0]
    (patcher,) = sana_nodes.SanaDiTLoader().load("tiny.safetensors", "fp32")
    assert patcher.model.config == TINY and patcher.model.dtype == torch.float32


def test_loader_node_runs_the_engine_load_path(tmp_path, monkeypatch) -> None:
    """Headless and in ComfyUI the node reads and builds through uniba.sana.loader; only the wrapping differs."""
    source = write_tiny_sana_dit(tmp_path / "diffusion_models", "tiny_bf16.safetensors", fmt="original")
    converted = tmp_path / "diffusion_models" / "tiny_bf16_diffusers.safetensors"
    from uniba.cli import main

    assert main(["convert-sana", str(source), str(converted), "--dtype", "bf16"]) == 0
    monkeypatch.setenv("UNIBA_MODELS_DIR", str(tmp_path))
    engine = load_sana(converted, torch.float32)
    (patcher,) = sana_nodes.SanaDiTLoader().load("tiny_bf16_diffusers.safetensors", "auto")
    assert patcher.model.dtype == torch.float32  # the one dtype policy: auto is fp32 on the CPU
    node_state = patcher.model.state_dict()
    assert node_state.keys() == engine.state_dict().keys()
    assert all(torch.equal(v, node_state[k]) for k, v in engine.state_dict().items())
    (kept,) = sana_nodes.SanaDiTLoader().load("tiny_bf16_diffusers.safetensors", "bf16")
    assert kept.model.dtype == torch.bfloat16 and not kept.model.training


def test_convert_cli_round_trip(tmp_path, capsys) -> None:
    from uniba.cli import main
    from uniba.sana import load_sana

    source = write_tiny_sana_dit(tmp_path, "tiny_orig.safetensors", fmt="original")
    out = tmp_path / "tiny_diffusers.safetensors"
    assert main(["convert-sana", str(source), str(out), "--dtype", "bf16"]) == 0
    assert main(["sana-info", str(out)]) == 0
    assert "diffusers format, bfloat16" in capsys.readouterr().out
    a, b = load_sana(source), load_sana(out)
    assert b.dtype == torch.bfloat16 and a.config == b.config
    assert all(torch.equal(v.to(torch.bfloat16), b.state_dict()[k]) for k, v in a.state_dict().items())

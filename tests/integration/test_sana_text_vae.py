"""Sana text encoder and DC-AE nodes inside a real ComfyUI (CPU): the VAE is a ComfyUI VAE, stock nodes work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_sana_te_vae import write_tiny_dcae, write_tiny_gemma, write_tiny_gemma_single_file  # noqa: E402


@pytest.fixture(scope="module")
def sana_files(comfy_host):
    te = comfy_host.model_folder("text_encoders")
    write_tiny_gemma(te / "gemma-tiny")
    write_tiny_gemma_single_file(te, "gemma_2_2b_tiny.safetensors")
    write_tiny_dcae(comfy_host.model_folder("vae"), "dcae_tiny.safetensors", fmt="diffusers")
    write_tiny_dcae(comfy_host.model_folder("vae"), "dcae_tiny_original.safetensors", fmt="original")
    comfy_host.modules["folder_paths"].filename_list_cache.clear()
    return comfy_host


def test_loader_lists_and_returns_a_comfy_vae(sana_files) -> None:
    nodes = sana_files.nodes
    choices = nodes["SanaTextEncoderLoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert "gemma-tiny" in choices and "gemma_2_2b_tiny.safetensors" in choices
    assert not any(c.startswith("gemma-tiny/") for c in choices)
    (vae,) = nodes["SanaVAELoader"]().load("dcae_tiny_original.safetensors", "auto")
    import comfy.sd

    assert isinstance(vae, comfy.sd.VAE)
    assert vae.spacial_compression_decode() == 32 and vae.latent_channels == 32


def test_stock_and_sana_vae_nodes_in_a_prompt(sana_files, run_prompt) -> None:
    prompt = {
        "1": {"class_type": "SanaVAELoader", "inputs": {"vae_name": "dcae_tiny.safetensors", "dtype": "auto"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 96, "height": 64, "batch_size": 1, "color": 0x8040C0}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 0]}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 0]}},
        "5": {"class_type": "SanaVAEDecode", "inputs": {"vae": ["1", 0], "samples": ["3", 0], "tile_size": 0}},
        "6": {"class_type": "SanaVAEEncode", "inputs": {"vae": ["1", 0], "image": ["5", 0]}},
        "7": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["6", 0], "vae": ["1", 0], "tile_size": 512,
                                                         "overlap": 64, "temporal_size": 64, "temporal_overlap": 8}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }
    result = run_prompt(prompt)
    latent = result.outputs["3"][0][0]["samples"]
    assert tuple(latent.shape) == (1, 32, 2, 3)
    stock = result.outputs["4"][0][0]
    ours = result.outputs["5"][0][0]
    assert tuple(stock.shape) == tuple(ours.shape) == (1, 64, 96, 3)
    assert torch.equal(stock, ours)  # stock VAEDecode runs the same DC-AE path
    assert tuple(result.outputs["6"][0][0]["samples"].shape) == (1, 32, 2, 3)
    assert tuple(result.outputs["7"][0][0].shape) == (1, 64, 96, 3)


@pytest.mark.parametrize("name", ["gemma-tiny", "gemma_2_2b_tiny.safetensors"])
def test_text_encoder_runs_under_the_model_manager(sana_files, name) -> None:
    import comfy.model_management as mm
    import comfy.model_patcher

    nodes = sana_files.nodes
    (te,) = nodes["SanaTextEncoderLoader"]().load(name, "auto")
    assert isinstance(te.patcher, comfy.model_patcher.ModelPatcher)
    (cond,) = nodes["SanaTextEncode"]().encode(te, "a red fox in the snow", True)
    emb, extra = cond[0]
    assert tuple(emb.shape) == (1, 300, 2304) and tuple(extra["attention_mask"].shape) == (1, 300)
    assert any(m.model is te.patcher for m in mm.current_loaded_models)  # the manager owns it (and evicts it)

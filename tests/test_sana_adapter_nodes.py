"""Sana adapter nodes outside ComfyUI: their contract and the checks that run before anything is applied."""

from __future__ import annotations

import importlib

import pytest
import torch
from tiny_sana import TINY, tiny_sana_state_dict

from uniba.checkpoint import CheckpointError, save_safetensors
from uniba.sana import load_sana

nodes = importlib.import_module("uniba_pack.nodes.sana_adapter_nodes")
host = importlib.import_module("uniba_pack.nodes.comfy.host")

CONTRACT = {
    "SanaLoraLoader": (["model", "lora_name", "strength_model"], ("MODEL",)),
    "SanaControlNetLoader": (["control_net_name", "weight_dtype", "wiring"], ("CONTROL_NET",)),
    "SanaPAG": (["model", "scale", "applied_layers", "adaptive_scale"], ("MODEL",)),
}


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_node_contract(name: str) -> None:
    cls = nodes.NODE_CLASS_MAPPINGS[name]
    inputs, outputs = CONTRACT[name]
    assert list(cls.INPUT_TYPES()["required"]) == inputs
    assert cls.RETURN_TYPES == outputs and callable(getattr(cls, cls.FUNCTION))


@pytest.fixture()
def sana_model():
    return host.wrap_model(load_sana(tiny_sana_state_dict(), overrides={"cross_heads": TINY.cross_heads}))


def test_lora_of_another_family_is_refused_before_applying(tmp_path, monkeypatch, sana_model) -> None:
    monkeypatch.setenv("UNIBA_MODELS_DIR", str(tmp_path))
    (tmp_path / "loras").mkdir()
    save_safetensors({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
                      "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4)},
                     tmp_path / "loras" / "flux_style.safetensors")
    with pytest.raises(CheckpointError, match=r"flux_style\.safetensors: is not a LoRA for the Sana DiT.*Flux"):
        nodes.SanaLoraLoader().load(sana_model, "flux_style.safetensors", 1.0)


def test_lora_loader_and_pag_need_a_sana_model() -> None:
    with pytest.raises(ValueError, match="model: this node needs a Sana MODEL; connect the output of 'Sana DiT"):
        nodes.SanaPAG().patch(torch.nn.Linear(2, 2), 3.0, "8", 0.0)


def test_pag_layers_beyond_the_model_are_refused(sana_model) -> None:
    with pytest.raises(ValueError, match="block 8 does not exist, this Sana model has 2 blocks"):
        nodes.SanaPAG().patch(sana_model, 3.0, "8", 0.0)

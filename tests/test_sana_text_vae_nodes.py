"""Sana text-encoder and DC-AE nodes, headless (the ComfyUI tier is in tests/integration/)."""

from __future__ import annotations

import pytest
import torch
from tiny_sana_te_vae import write_tiny_dcae, write_tiny_gemma, write_tiny_gemma_single_file

nodes = pytest.importorskip("uniba_pack.nodes.sana_text_vae_nodes")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_tiny_gemma(root / "text_encoders" / "gemma-tiny")
    write_tiny_gemma_single_file(root / "text_encoders", "gemma_2_2b_tiny.safetensors")
    write_tiny_dcae(root / "vae", "dcae_tiny.safetensors", fmt="original")
    return root


@pytest.fixture
def headless_models(models_dir, monkeypatch):
    monkeypatch.setenv("UNIBA_MODELS_DIR", str(models_dir))
    return models_dir


def test_contract_names_inputs_and_outputs() -> None:
    m = nodes.NODE_CLASS_MAPPINGS
    assert set(m) == {"SanaTextEncoderLoader", "SanaTextEncode", "SanaVAELoader", "SanaVAEDecode", "SanaVAEEncode"}
    expected = {
        "SanaTextEncoderLoader": (["model_name", "dtype"], ("SANA_TEXT_ENCODER",)),
        "SanaTextEncode": (["text_encoder", "text", "use_chi"], ("CONDITIONING",)),
        "SanaVAELoader": (["vae_name", "dtype"], ("VAE",)),
        "SanaVAEDecode": (["vae", "samples", "tile_size"], ("IMAGE",)),
        "SanaVAEEncode": (["vae", "image"], ("LATENT",)),
    }
    for name, (inputs, outputs) in expected.items():
        cls = m[name]
        assert list(cls.INPUT_TYPES()["required"]) == inputs, name
        assert cls.RETURN_TYPES == outputs and cls.CATEGORY == "UniBA/Sana"
        assert hasattr(cls, cls.FUNCTION) and name in nodes.NODE_DISPLAY_NAME_MAPPINGS
    assert m["SanaTextEncode"].INPUT_TYPES()["required"]["use_chi"][1]["default"] is True
    assert m["SanaVAEDecode"].INPUT_TYPES()["required"]["tile_size"][1]["default"] == 0
    assert m["SanaTextEncoderLoader"].INPUT_TYPES()["required"]["dtype"][0] == ["auto", "bf16", "fp16", "fp32"]


def test_text_encoder_choices_list_folders_and_single_files(headless_models) -> None:
    choices = nodes.SanaTextEncoderLoader.INPUT_TYPES()["required"]["model_name"][0]
    assert choices == ["gemma-tiny", "gemma_2_2b_tiny.safetensors"]  # not the files inside the folder
    assert nodes.SanaVAELoader.INPUT_TYPES()["required"]["vae_name"][0] == ["dcae_tiny.safetensors"]


@pytest.mark.parametrize("name", ["gemma-tiny", "gemma_2_2b_tiny.safetensors"])
def test_text_encode_conditioning_format(headless_models, name) -> None:
    (te,) = nodes.SanaTextEncoderLoader().load(name, "auto")
    (cond,) = nodes.SanaTextEncode().encode(te, "a red fox in the snow", True)
    assert len(cond) == 1
    emb, extra = cond[0]
    assert emb.shape == (1, 300, 2304) and emb.dtype == torch.float32
    mask = extra["attention_mask"]
    assert mask.shape == (1, 300) and mask.dtype == torch.int64 and mask[0, 0] == 1
    (neg,) = nodes.SanaTextEncode().encode(te, "", False)
    assert int(neg[0][1]["attention_mask"].sum()) == 1
    assert te.patcher.model.embed_tokens.weight.device.type == "cpu"  # offloaded after encoding


def test_vae_decode_and_encode_nodes(headless_models) -> None:
    (vae,) = nodes.SanaVAELoader().load("dcae_tiny.safetensors", "fp32")
    latent = {"samples": torch.randn(2, 32, 2, 3)}
    (image,) = nodes.SanaVAEDecode().decode(vae, latent, 0)
    assert image.shape == (2, 64, 96, 3) and image.min() >= 0 and image.max() <= 1
    direct = (vae.dcae.decode_full(latent["samples"]) * 0.5 + 0.5).clamp(0, 1).movedim(1, -1)
    assert torch.equal(image, direct)
    # odd sizes are center-cropped to multiples of 32, as ComfyUI's own VAEs do
    (out,) = nodes.SanaVAEEncode().encode(vae, torch.rand(1, 70, 100, 3))
    assert out["samples"].shape == (1, 32, 2, 3)
    (tiled,) = nodes.SanaVAEDecode().decode(vae, latent, 64)
    assert tiled.shape == image.shape


def test_decode_rejects_a_vae_that_is_not_dcae() -> None:
    with pytest.raises(ValueError, match="not a Sana DC-AE: load the DC-AE with .Sana DC-AE Loader."):
        nodes.SanaVAEDecode().decode(object(), {"samples": torch.zeros(1, 32, 1, 1)}, 0)


def test_loader_names_the_missing_file(headless_models) -> None:
    with pytest.raises(FileNotFoundError, match="models/vae/"):
        nodes.SanaVAELoader().load("missing.safetensors", "auto")

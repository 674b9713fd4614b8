"""DC-AE f32c32: parity with diffusers' AutoencoderDC (test-only oracle), both key layouts, strict loading."""

from __future__ import annotations

import pytest
import torch
from tiny_sana_te_vae import TINY_DCAE, tiny_dcae_state_dict, write_tiny_dcae

from uniba.checkpoint import CheckpointError, save_safetensors
from uniba.dcae import keys as dcae_keys
from uniba.dcae.config import DCAEConfig
from uniba.dcae.loader import load_dcae
from uniba.dcae.model import DCAE

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def reference():
    """diffusers' AutoencoderDC with the tiny f32c32-structured config and our random weights."""
    from diffusers import AutoencoderDC

    state = tiny_dcae_state_dict()
    model = AutoencoderDC(**TINY_DCAE.diffusers_kwargs()).eval()
    model.load_state_dict(state, strict=True)
    return model, state


def _image(h: int, w: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, h, w, generator=g) * 2 - 1


@pytest.mark.parametrize("fmt", ["diffusers", "original"])
def test_parity_with_diffusers_both_layouts(tmp_path, reference, fmt) -> None:
    ref, _ = reference
    path = write_tiny_dcae(tmp_path, fmt=fmt)
    ours = load_dcae(path)
    assert ours.config == TINY_DCAE
    # 256x192 -> 8x6 latent: linear attention everywhere; 64x64 -> 2x2 latent: the last stages take the
    # quadratic branch (H*W <= head_dim)
    for h, w in ((256, 192), (64, 64)):
        image = _image(h, w)
        with torch.no_grad():
            want = ref.encode(image).latent
            got = ours.encode(image)
            assert got.shape == (2, 32, h // 32, w // 32)
            assert (got - want).abs().max().item() <= 1e-4
            latent = torch.randn(2, 32, h // 32, w // 32, generator=torch.Generator().manual_seed(2))
            want = ref.decode(latent).sample
            got = ours.decode(latent)
            assert got.shape == (2, 3, h, w)
            assert (got - want).abs().max().item() <= 1e-4


def test_key_map_agrees_with_diffusers_converter(reference) -> None:
    from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers

    _, state = reference
    original = dcae_keys.diffusers_to_original(state)
    assert dcae_keys.detect_layout(original) == "original"
    converted = convert_autoencoder_dc_checkpoint_to_diffusers(dict(original))
    assert set(converted) == set(state)
    assert all(torch.equal(converted[k], state[k]) for k in state)
    ours = dcae_keys.original_to_diffusers(original)
    assert set(ours) == set(state)
    assert all(torch.equal(ours[k], state[k]) for k in state)


def test_real_f32c32_config_on_meta_device() -> None:
    """The released Sana DC-AE: 312.3 M parameters, 375 diffusers keys <-> 339 efficientvit keys."""
    from diffusers import AutoencoderDC

    with torch.device("meta"):
        ours = DCAE(DCAEConfig.sana_f32c32())
        ref = AutoencoderDC(**DCAEConfig.sana_f32c32().diffusers_kwargs())
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert len(ours_shapes) == 375
    assert abs(sum(p.numel() for p in ours.parameters()) / 1e6 - 312.25) < 0.05
    fake = {k: torch.empty(s, device="meta") for k, s in ours_shapes.items()}
    original = dcae_keys.diffusers_to_original(fake)
    assert len(original) == 339
    assert "decoder.stages.1.op_list.0.main.conv.conv.bias" in original  # diffusers' detection key
    assert "encoder.project_in.conv.bias" in original  # ... of the sana variant
    assert "encoder.stages.0.op_list.2.main.conv.weight" in original
    assert DCAEConfig.from_shapes(dcae_keys.original_to_diffusers(original)) == DCAEConfig.sana_f32c32()


def test_prefixed_and_dtype(tmp_path) -> None:
    state = {"first_stage_model." + k: v.to(torch.bfloat16) for k, v in tiny_dcae_state_dict().items()}
    model = load_dcae(state)
    assert model.weight_dtype == torch.bfloat16
    out = model.decode(torch.randn(1, 32, 2, 3))
    assert out.shape == (1, 3, 64, 96) and torch.isfinite(out).all()
    assert load_dcae(state, dtype=torch.float32).weight_dtype == torch.float32


def test_missing_key_is_a_clear_error(tmp_path) -> None:
    state = tiny_dcae_state_dict()
    del state["decoder.up_blocks.3.1.attn.to_k.weight"]
    path = tmp_path / "broken.safetensors"
    save_safetensors(state, path)
    with pytest.raises(CheckpointError, match=r"broken\.safetensors.*missing key.*to_k"):
        load_dcae(path)


def test_wrong_family_names_what_was_expected(tmp_path) -> None:
    sd_vae = {"encoder.down.0.block.0.conv1.weight": torch.zeros(4, 3, 3, 3),
              "decoder.up.0.block.0.conv1.weight": torch.zeros(4, 4, 3, 3)}
    path = tmp_path / "sdxl_vae.safetensors"
    save_safetensors(sd_vae, path)
    with pytest.raises(CheckpointError, match=r"not a Sana DC-AE.*looks like a VAE"):
        load_dcae(path)
    gemma = {"model.layers.0.pre_feedforward_layernorm.weight": torch.zeros(4)}
    with pytest.raises(CheckpointError, match=r"not a Sana DC-AE.*Gemma-2"):
        load_dcae(gemma)


def test_bad_shapes_rejected() -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        load_dcae(tiny_dcae_state_dict()).encode(torch.zeros(1, 3, 40, 64))
    with pytest.raises(ValueError, match=r"^latent \(DC-AE decode input\): expected \(batch >= 1, 32, h, w\)"):
        load_dcae(tiny_dcae_state_dict()).decode(torch.zeros(1, 16, 2, 2))

"""Sana LoRA: every format mapped, alphas honoured, parity with diffusers' load_lora_weights + fuse_lora (peft as
the test-only oracle), bit-exact restore, refusals of other families and sizes, unmatched keys named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from uniba.checkpoint import CheckpointError, save_safetensors
from uniba.sana import SanaConfig, load_sana
from uniba.sana.config import diffusers_config_dict
from uniba.sana.lora import apply_lora, convert_lora, layer_aliases, lora_target_layers, read_lora, restore_weights

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

CONFIG = SanaConfig(hidden_size=64, depth=2, cross_heads=4, caption_channels=48)
RANK, ALPHA = 4, 8.0
# every layer type trainers target (peft cannot merge the grouped depthwise conv, so diffusers has no oracle for it)
TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
           "attn2.to_out.0", "ff.conv_inverted", "ff.conv_point", "caption_projection.linear_1",
           "caption_projection.linear_2", "timestep_embedder.linear_1", "timestep_embedder.linear_2",
           "time_embed.linear", "proj_out")


def _ours(ref: torch.nn.Module) -> torch.nn.Module:
    """Our model with its own copy of the reference weights (a shared tensor would hide every difference)."""
    return load_sana({k: v.clone() for k, v in ref.state_dict().items()}, overrides={"cross_heads": 4})


def _reference() -> torch.nn.Module:
    torch.manual_seed(0)
    ref = diffusers.SanaTransformer2DModel(**diffusers_config_dict(CONFIG)).eval()
    with torch.no_grad():
        for value in ref.state_dict().values():
            value.copy_(torch.randn_like(value) * 0.1)
    return ref


def _factors(config: SanaConfig = CONFIG, seed: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer, shape in lora_target_layers(config).items():
        if not layer.endswith(TARGETS):
            continue
        kernel = tuple(shape[2:])
        down = torch.randn((RANK, shape[1], *kernel), generator=g) * 0.2
        up = torch.randn((shape[0], RANK, *(1 for _ in kernel)), generator=g) * 0.2
        out[layer] = (down, up)
    return out


def _diffusers_file(folder: Path, factors, prefix: str = "transformer.") -> Path:
    state = {}
    for layer, (down, up) in factors.items():
        state[f"{prefix}{layer}.lora_A.weight"] = down
        state[f"{prefix}{layer}.lora_B.weight"] = up
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=sorted(factors)).to_dict()
    config = {f"transformer.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    import json
    path = folder / "sana_lora_diffusers.safetensors"
    save_safetensors(state, path, metadata={"lora_adapter_metadata": json.dumps(config, default=str)})
    return path


def _kohya_file(folder: Path, factors, prefix: str = "lora_unet_") -> Path:
    state = {}
    for layer, (down, up) in factors.items():
        name = prefix + layer.replace(".", "_")
        state[f"{name}.lora_down.weight"] = down
        state[f"{name}.lora_up.weight"] = up
        state[f"{name}.alpha"] = torch.tensor(ALPHA)
    path = folder / f"sana_lora_{prefix.strip('_')}.safetensors"
    save_safetensors(state, path)
    return path


def _inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, 4, 6, generator=g)
    context = torch.randn(2, 8, 48, generator=g)
    mask = torch.ones(2, 8)
    mask[0, 5:] = 0
    return x, torch.tensor([999, 500]), context, mask


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_lora_equals_diffusers_load_and_fuse(tmp_path: Path, strength: float) -> None:
    factors = _factors()
    ref = _reference()
    ours = _ours(ref)
    path = _diffusers_file(tmp_path, factors)
    pipe = diffusers.SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=ref,
                                  scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=strength)

    lora = read_lora(path, CONFIG)
    assert sorted(lora.layers) == sorted(factors) and lora.unmatched == []
    assert {layer.alpha for layer in lora.layers.values()} == {ALPHA}
    untouched = ours.get_submodule("transformer_blocks.0.attn1.to_q").weight.clone()
    apply_lora(ours, lora, strength)
    assert (ours.get_submodule("transformer_blocks.0.attn1.to_q").weight - untouched).abs().max().item() > 0.05
    worst = 0.0
    for layer in factors:
        module = ref.get_submodule(layer)
        expected = getattr(module, "base_layer", module).weight
        worst = max(worst, (ours.get_submodule(layer).weight - expected).abs().max().item())
    assert worst <= 1e-5, worst
    x, t, context, mask = _inputs()
    with torch.no_grad():
        expected = ref(x, context, t, encoder_attention_mask=mask).sample
        got = ours(x, t, context, mask)
    print(f"LoRA strength {strength}: weights max diff {worst:.1e}, output {(got - expected).abs().max():.1e}")
    assert (got - expected).abs().max().item() <= 1e-5
    assert ref is pipe.transformer


@pytest.mark.parametrize("prefix", ["lora_unet_", "lora_transformer_", "lycoris_"])
def test_kohya_style_with_alpha_equals_diffusers_format(tmp_path: Path, prefix: str) -> None:
    factors = _factors()
    via_diffusers = read_lora(_diffusers_file(tmp_path, factors), CONFIG)
    via_kohya = read_lora(_kohya_file(tmp_path, factors, prefix), CONFIG)
    assert via_kohya.unmatched == [] and sorted(via_kohya.layers) == sorted(via_diffusers.layers)
    model_a = _ours(_reference())
    model_b = _ours(_reference())
    apply_lora(model_a, via_diffusers, 0.7)
    apply_lora(model_b, via_kohya, 0.7)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("prefix", ["base_model.model.", "base_model.model.transformer.", "", "diffusion_model."])
def test_peft_prefixes_and_no_metadata_means_alpha_equals_rank(prefix: str) -> None:
    factors = _factors()
    state = {}
    for layer, (down, up) in factors.items():
        state[f"{prefix}{layer}.lora_A.weight"] = down
        state[f"{prefix}{layer}.lora_B.weight"] = up
    lora = convert_lora(state, CONFIG)
    assert sorted(lora.layers) == sorted(factors) and lora.unmatched == []
    assert all(layer.scale == 1.0 for layer in lora.layers.values())


def test_restore_is_bit_identical_and_depthwise_conv_lora_applies() -> None:
    model = _ours(_reference())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    depthwise = "transformer_blocks.1.ff.conv_depth"
    shape = lora_target_layers(CONFIG)[depthwise]  # (2*hid, 1, 3, 3)
    state = {f"lora_unet_{depthwise.replace('.', '_')}.lora_down.weight": torch.randn(2, 1, 3, 3, generator=g),
             f"lora_unet_{depthwise.replace('.', '_')}.lora_up.weight": torch.randn(shape[0], 2, 1, 1, generator=g)}
    lora = convert_lora(state, CONFIG)
    backup = apply_lora(model, lora, 1.0)
    changed = model.get_submodule(depthwise).weight
    assert (changed - before[f"{depthwise}.weight"]).abs().max().item() > 0.1
    restore_weights(model, backup)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_other_family_is_refused_with_the_file_name(tmp_path: Path) -> None:
    state = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}
    path = tmp_path / "sdxl_style.safetensors"
    save_safetensors(state, path)
    with pytest.raises(CheckpointError, match=r"sdxl_style\.safetensors.*not a LoRA for the Sana DiT.*SDXL"):
        read_lora(path, CONFIG)


def test_other_sana_size_is_refused_naming_hidden_size_and_depth(tmp_path: Path) -> None:
    bigger = CONFIG.replace(hidden_size=96, cross_heads=4)
    path = _kohya_file(tmp_path, _factors(bigger))
    with pytest.raises(CheckpointError, match=r"another size \(hidden size 96; this model has 64\)"):
        read_lora(path, CONFIG)
    deeper = CONFIG.replace(depth=4)
    path = _kohya_file(tmp_path, _factors(deeper))
    with pytest.raises(CheckpointError, match=r"at least 4 blocks; this model has 2"):
        read_lora(path, CONFIG)


def test_unmatched_keys_are_counted_and_named() -> None:
    factors = _factors()
    state = {}
    for layer, (down, up) in factors.items():
        state[f"transformer.{layer}.lora_A.weight"] = down
        state[f"transformer.{layer}.lora_B.weight"] = up
    state["transformer.transformer_blocks.0.attn1.norm_q.lora_A.weight"] = torch.zeros(4, 64)
    state["text_encoder.layers.0.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    lora = convert_lora(state, CONFIG, name="mixed.safetensors")
    assert len(lora.layers) == len(factors)
    assert lora.unmatched == ["text_encoder.layers.0.q_proj.lora_A.weight",
                              "transformer.transformer_blocks.0.attn1.norm_q.lora_A.weight"]
    message = lora.unmatched_message()
    assert message.startswith("mixed.safetensors: 2 key(s) match no layer") and "norm_q" in message


def test_aliases_cover_every_format_for_every_target() -> None:
    layers = lora_target_layers(CONFIG)
    aliases = layer_aliases(layers)
    assert len(layers) == 2 * 11 + 7  # 8 attention + 3 Mix-FFN per block; patch, 3 timestep, 2 caption, proj_out
    for layer in layers:
        for alias in (f"transformer.{layer}", f"base_model.model.{layer}", f"lora_unet_{layer.replace('.', '_')}",
                      f"lora_transformer_{layer.replace('.', '_')}", f"diffusion_model.{layer}"):
            assert aliases[alias] == layer


def test_dora_is_refused_not_applied_without_its_magnitude() -> None:
    factors = _factors()
    state = {}
    for layer, (down, up) in factors.items():
        state[f"lora_unet_{layer.replace('.', '_')}.lora_down.weight"] = down
        state[f"lora_unet_{layer.replace('.', '_')}.lora_up.weight"] = up
    state["lora_unet_proj_out.dora_scale"] = torch.ones(1, 64)
    with pytest.raises(CheckpointError, match=r"'dora\.safetensors' is a DoRA .*LoraLoaderModelOnly"):
        convert_lora(state, CONFIG, name="dora.safetensors")

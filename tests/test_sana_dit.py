"""Sana DiT: parity with diffusers' SanaTransformer2DModel (test-only oracle), key maps, loading, errors."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_sana import TINY, tiny_sana_state_dict, to_original_format, write_tiny_sana_dit

from uniba.checkpoint import CheckpointError, save_safetensors
from uniba.sana import SanaConfig, SanaDiT, load_sana
from uniba.sana import keys as sana_keys
from uniba.sana.config import RELEASES, diffusers_config_dict, infer_config
from uniba.sana.loader import expected_shapes, read_sana_checkpoint
from uniba.sana.model import sincos_position_embedding

diffusers = pytest.importorskip("diffusers")

VARIANTS = {
    "nope_0.6B_like": dict(hidden_size=64, cross_heads=4),
    "nope_1.6B_like": dict(hidden_size=96, cross_heads=3),
    "2K_sincos_interp1": dict(hidden_size=64, cross_heads=4, use_pe=True, pe_base_size=8, pe_interpolation=1.0),
    "4K_sincos_interp2": dict(hidden_size=64, cross_heads=4, use_pe=True, pe_base_size=16, pe_interpolation=2.0,
                              flow_shift=6.0),
    "1.5_qk_cross_norm": dict(hidden_size=64, cross_heads=4, qk_norm=True, cross_norm=True, cross_norm_eps=1e-5),
}


def _oracle(config: SanaConfig, seed: int = 0):
    torch.manual_seed(seed)
    ref = diffusers.SanaTransformer2DModel(**diffusers_config_dict(config)).eval()
    with torch.no_grad():
        for value in ref.state_dict().values():
            value.copy_(torch.randn_like(value) * 0.2)
    return ref


def _inputs(caption_channels: int, batch: int = 2, h: int = 6, w: int = 5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 32, h, w, generator=g)
    context = torch.randn(batch, 9, caption_channels, generator=g)
    mask = torch.ones(batch, 9)
    mask[-1, 5:] = 0  # padded last prompt
    return x, context, mask, torch.tensor([999, 418])[:batch]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_with_diffusers(variant: str) -> None:
    config = SanaConfig(depth=2, caption_channels=48, **VARIANTS[variant])
    ref = _oracle(config)
    x, context, mask, t = _inputs(48)
    with torch.no_grad():
        expected = ref(x, context, t, encoder_attention_mask=mask).sample
        diffusers_sd = ref.state_dict()
        ours = load_sana(diffusers_sd, overrides=VARIANTS[variant])
        got = ours(x, t, context, mask)
        # the original-format state dict produced by the inverse key map loads to the same model
        original_sd = sana_keys.ours_to_original(diffusers_sd)
        original_sd["pos_embed"] = torch.zeros(1, 64, config.hidden_size)
        original_sd["y_embedder.y_embedding"] = torch.zeros(300, 48)
        from_original = load_sana(original_sd, overrides=VARIANTS[variant])
        got_original = from_original(x, t, context, mask)
    assert ours.config == config
    assert (got - expected).abs().max().item() <= 1e-5
    assert torch.equal(got_original, got)
    assert expected.abs().max() > 1.0  # not a degenerate comparison


def test_parity_non_square_pe_and_batch_one_context() -> None:
    config = SanaConfig(depth=1, caption_channels=48, **VARIANTS["4K_sincos_interp2"])
    ref = _oracle(config, seed=3)
    x, context, mask, t = _inputs(48, batch=2, h=7, w=12)
    with torch.no_grad():
        expected = ref(x, context, t, encoder_attention_mask=mask).sample
        got = load_sana(ref.state_dict(), overrides=VARIANTS["4K_sincos_interp2"])(x, t, context, mask)
    assert (got - expected).abs().max().item() <= 1e-5


def test_original_cross_norm_eps_differs_from_diffusers_only_slightly() -> None:
    """SANA's cross-attention q/k RMSNorm uses eps 1e-6 (ours by default), diffusers 1e-5."""
    config = SanaConfig(depth=2, caption_channels=48, hidden_size=64, cross_heads=4, qk_norm=True, cross_norm=True)
    ref = _oracle(config)
    x, context, mask, t = _inputs(48)
    with torch.no_grad():
        expected = ref(x, context, t, encoder_attention_mask=mask).sample
        model = load_sana(ref.state_dict(), overrides={"cross_heads": 4})
        got = model(x, t, context, mask)
    assert model.config.cross_norm_eps == 1e-6
    deviation = (got - expected).abs().max().item()
    print(f"cross-norm eps 1e-6 vs diffusers 1e-5: max abs diff {deviation:.2e}")
    assert 0 < deviation < 1e-3


def test_sincos_matches_diffusers_for_non_square_grids() -> None:
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for (h, w, base, interp) in ((64, 64, 64, 1.0), (96, 160, 128, 2.0), (5, 9, 16, 2.0)):
        ours = sincos_position_embedding(64, h, w, base, interp, torch.device("cpu"), torch.float64)
        ref = get_2d_sincos_pos_embed(64, (h, w), base_size=base, interpolation_scale=interp, output_type="pt")
        assert (ours - ref.double()).abs().max().item() < 1e-6


def test_timestep_is_truncated_like_the_original() -> None:
    model = SanaDiT(TINY).eval()
    x, context, mask, _ = _inputs(TINY.caption_channels, batch=1)
    with torch.no_grad():
        a = model(x, torch.tensor([999.7]), context, mask[:1])
        b = model(x, torch.tensor([999]), context, mask[:1])
        c = model(x, torch.tensor([998]), context, mask[:1])
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


def test_mask_is_per_batch_element() -> None:
    model = SanaDiT(TINY).eval()
    x, context, mask, t = _inputs(TINY.caption_channels)
    with torch.no_grad():
        both = model(x, t, context, mask)
        second = model(x[1:], t[1:], context[1:, :5], None)
    assert (both[1:] - second).abs().max().item() < 1e-5


# --------------------------------------------------------------------------- real configurations

PARAMS_M = {"Sana_600M_1024px": 591.7, "Sana_1600M_1024px": 1604.5, "SANA1.5_4.8B_1024px": 4721.8,
            "Sana_Sprint_1.6B_1024px": 1610.2}

# one block of the original layout, from SANA's SanaMSBlock (docs/SOURCES.md, Sana §5.2)
ORIGINAL_BLOCK0 = {
    "blocks.0.scale_shift_table", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias",
    "blocks.0.cross_attn.q_linear.weight", "blocks.0.cross_attn.q_linear.bias", "blocks.0.cross_attn.kv_linear.weight",
    "blocks.0.cross_attn.kv_linear.bias", "blocks.0.cross_attn.proj.weight", "blocks.0.cross_attn.proj.bias",
    "blocks.0.mlp.inverted_conv.conv.weight", "blocks.0.mlp.inverted_conv.conv.bias",
    "blocks.0.mlp.depth_conv.conv.weight", "blocks.0.mlp.depth_conv.conv.bias", "blocks.0.mlp.point_conv.conv.weight",
}
ORIGINAL_QK_NORM = {"blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight",
                    "blocks.0.cross_attn.q_norm.weight", "blocks.0.cross_attn.k_norm.weight"}
ORIGINAL_GLOBAL = {
    "x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
    "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias", "t_block.1.weight", "t_block.1.bias",
    "y_embedder.y_proj.fc1.weight", "y_embedder.y_proj.fc1.bias", "y_embedder.y_proj.fc2.weight",
    "y_embedder.y_proj.fc2.bias", "attention_y_norm.weight", "final_layer.linear.weight", "final_layer.linear.bias",
    "final_layer.scale_shift_table",
}


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_real_config_key_coverage_on_meta(release: str) -> None:
    config = RELEASES[release]
    with torch.device("meta"):
        ref = diffusers.SanaTransformer2DModel(**diffusers_config_dict(config))
    diffusers_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = expected_shapes(config)
    assert diffusers_shapes == ours  # diffusers format: every key, same shape

    meta_sd = {k: torch.empty(s, device="meta") for k, s in ours.items()}
    original = sana_keys.ours_to_original(meta_sd)
    block0 = {k for k in original if k.startswith("blocks.0.")}
    assert block0 == ORIGINAL_BLOCK0 | (ORIGINAL_QK_NORM if config.qk_norm else set())
    sprint = {f"cfg_embedder.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")} if config.is_sprint else set()
    assert {k for k in original if not k.startswith("blocks.")} == ORIGINAL_GLOBAL | sprint
    assert len({k for k in original if k.endswith(".scale_shift_table") and k.startswith("blocks.")}) == config.depth
    assert tuple(original["blocks.0.attn.qkv.weight"].shape) == (3 * config.hidden_size, config.hidden_size)
    assert tuple(original["blocks.0.cross_attn.kv_linear.bias"].shape) == (2 * config.hidden_size,)
    # original format back to ours: every real key maps, with the right shape
    back = sana_keys.original_to_ours({**original, "pos_embed": torch.empty(1, 1024, config.hidden_size, device="meta"),
                                       "y_embedder.y_embedding": torch.empty(300, 2304, device="meta")})
    assert {k: tuple(v.shape) for k, v in back.items()} == ours
    # the weights alone give back the release's architecture
    inferred = infer_config(back, {"use_pe": config.use_pe, "pe_base_size": config.pe_base_size,
                                   "pe_interpolation": config.pe_interpolation, "flow_shift": config.flow_shift})
    assert inferred == config
    if release in PARAMS_M:
        n = sum(v.numel() for v in ref.state_dict().values()) / 1e6
        assert abs(n - PARAMS_M[release]) < 0.1


def test_release_shapes() -> None:
    assert RELEASES["Sana_600M_1024px"].linear_heads == 36 and RELEASES["Sana_600M_1024px"].cross_head_dim == 72
    assert RELEASES["Sana_1600M_1024px"].linear_heads == 70 and RELEASES["Sana_1600M_1024px"].cross_head_dim == 112
    assert RELEASES["Sana_1600M_1024px"].ffn_hidden == 5600 and RELEASES["Sana_600M_1024px"].ffn_hidden == 2880
    assert RELEASES["Sana_1600M_4Kpx"].flow_shift == 6.0


# --------------------------------------------------------------------------- files and formats

def _same_weights(a: SanaDiT, b: SanaDiT) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


@pytest.mark.parametrize("fmt", ["original", "diffusers"])
def test_tiny_file_loads_in_both_formats(tmp_path, fmt: str) -> None:
    path = write_tiny_sana_dit(tmp_path, fmt=fmt)
    model = load_sana(path)
    assert model.config == TINY
    reference = SanaDiT(TINY)
    reference.load_state_dict(tiny_sana_state_dict())
    assert _same_weights(model, reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_original_pth_with_state_dict_wrapper_and_prefix(tmp_path, dtype: torch.dtype) -> None:
    state = to_original_format(tiny_sana_state_dict(TINY), TINY)
    wrapped = {"state_dict": {f"model.diffusion_model.{k}": v.to(dtype) for k, v in state.items()}}
    path = tmp_path / "Sana_tiny.pth"
    torch.save(wrapped, path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "SanaTransformer2DModel",
                                                      "num_cross_attention_heads": 4, "num_layers": 2}))
    model = load_sana(path)
    assert model.dtype == dtype
    assert load_sana(path, torch.float32).dtype == torch.float32
    assert model.config.cross_heads == 4


def test_diffusers_sharded_folder_with_config(tmp_path) -> None:
    config = SanaConfig(hidden_size=64, depth=2, cross_heads=4, caption_channels=48, use_pe=True, pe_base_size=128,
                        pe_interpolation=2.0)
    state = tiny_sana_state_dict(config)
    folder = tmp_path / "Sana_tiny_diffusers" / "transformer"
    folder.mkdir(parents=True)
    names = sorted(state)
    half = len(names) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[:half],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[half:]}
    for shard, shard_keys in shards.items():
        save_safetensors({k: state[k] for k in shard_keys}, folder / shard)
    index = {"weight_map": {k: shard for shard, ks in shards.items() for k in ks}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"_class_name": "SanaTransformer2DModel",
                                                    **diffusers_config_dict(config)}))
    scheduler = tmp_path / "Sana_tiny_diffusers" / "scheduler"
    scheduler.mkdir()
    (scheduler / "scheduler_config.json").write_text(json.dumps({"flow_shift": 6.0}))
    model = load_sana(folder)
    assert model.config == config.replace(flow_shift=6.0)


def test_pe_read_from_original_pos_embed_buffer() -> None:
    config = SanaConfig(hidden_size=64, depth=1, cross_heads=4, caption_channels=48, use_pe=True, pe_base_size=16,
                        pe_interpolation=2.0)
    state = to_original_format(tiny_sana_state_dict(config), config)
    state["pos_embed"] = sincos_position_embedding(64, 16, 16, 16, 2.0, torch.device("cpu"), torch.float32)[None]
    ckpt = read_sana_checkpoint(state, {"cross_heads": 4})
    assert ckpt.config.use_pe and ckpt.config.pe_base_size == 16 and ckpt.config.pe_interpolation == 2.0
    nope = to_original_format(tiny_sana_state_dict(config.replace(use_pe=False)), config)
    assert not read_sana_checkpoint(nope, {"cross_heads": 4}).config.use_pe


def test_non_sana_file_is_refused_with_what_it_looks_like(tmp_path) -> None:
    path = tmp_path / "sd15_unet.safetensors"
    save_safetensors({"input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3), "out.2.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(CheckpointError) as err:
        load_sana(path)
    text = str(err.value)
    assert "Sana DiT" in text and "UNet" in text and "sd15_unet" in text


def test_incomplete_file_names_the_missing_keys(tmp_path) -> None:
    state = tiny_sana_state_dict(TINY)
    del state["transformer_blocks.1.ff.conv_depth.bias"]
    path = tmp_path / "broken.safetensors"
    save_safetensors(state, path, metadata={"sana_config": TINY.to_json()})
    with pytest.raises(CheckpointError, match="transformer_blocks.1.ff.conv_depth.bias"):
        load_sana(path)


def test_unknown_width_without_config_asks_for_it() -> None:
    state = tiny_sana_state_dict(TINY)
    with pytest.raises(CheckpointError, match="cross-attention head count"):
        load_sana(state)


def test_sd_latent_gets_a_clear_error() -> None:
    model = SanaDiT(TINY)
    with pytest.raises(ValueError, match="SanaEmptyLatent"):
        model(torch.zeros(1, 4, 8, 8), torch.tensor([500]), torch.zeros(1, 3, TINY.caption_channels))

"""fp8 weight storage for Sana (SANA-1.5 4.8B on a 12 GB card): layers keep fp8 weights and compute in bf16/fp32."""

from __future__ import annotations

import importlib

import pytest
import torch
from tiny_sana import TINY, tiny_sana_state_dict, write_tiny_sana_dit

from uniba import cast_ops
from uniba.cast_ops import CastOnUseOps, to_storage
from uniba.devices import DtypeSupport, choose_weight_dtypes
from uniba.sana.loader import build_sana, load_sana, read_sana_checkpoint
from uniba.sana.model import SanaDiT

sana_nodes = importlib.import_module("uniba_pack.nodes.sana_nodes")
FP8 = torch.float8_e4m3fn


def _inputs(seed: int = 1) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((2, TINY.in_channels, 4, 6), generator=gen)
    context = torch.randn((2, 12, TINY.caption_channels), generator=gen)
    mask = torch.ones((2, 12), dtype=torch.int64)
    mask[1, 7:] = 0
    return x, torch.tensor([300.0, 900.0]), context, mask


def _load(state: dict[str, torch.Tensor], dtype: torch.dtype, storage: torch.dtype | None = None) -> SanaDiT:
    return load_sana(state, dtype, overrides={"cross_heads": TINY.cross_heads}, storage_dtype=storage)


def _is_layer_parameter(model: torch.nn.Module, key: str) -> bool:
    if "." not in key:
        return False
    module = model.get_submodule(key.rsplit(".", 1)[0])
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))


def test_fp8_storage_keeps_layer_weights_in_fp8_and_the_rest_in_the_compute_dtype() -> None:
    state = tiny_sana_state_dict()
    model = _load(state, torch.float32, FP8)
    assert model.compute_dtype == torch.float32
    layer_keys = [k for k in model.state_dict() if _is_layer_parameter(model, k)]
    other_keys = [k for k in model.state_dict() if not _is_layer_parameter(model, k)]
    assert layer_keys and other_keys  # norms and the adaLN table stay out of fp8
    assert {model.state_dict()[k].dtype for k in layer_keys} == {FP8}
    assert {model.state_dict()[k].dtype for k in other_keys} == {torch.float32}
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    full = sum(t.numel() * 4 for t in model.state_dict().values())
    assert stored < 0.3 * full  # fp8 is a quarter of fp32 for the layers, which hold nearly every weight


def test_fp8_forward_is_the_model_with_fp8_rounded_weights() -> None:
    """Casting on use is the only change: the fp8 model equals an fp32 model given the fp8-rounded weights."""
    state = tiny_sana_state_dict()
    fp8_model = _load(state, torch.float32, FP8)
    with torch.device("meta"):
        probe = SanaDiT(TINY)
    rounded = {k: (to_storage(v, FP8).float() if _is_layer_parameter(probe, k) else v) for k, v in state.items()}
    reference = _load(rounded, torch.float32)
    full = _load(state, torch.float32)
    inputs = _inputs()
    with torch.inference_mode():
        out = fp8_model(*inputs)
        expected = reference(*inputs)
        unquantised = full(*inputs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    relative = ((out - unquantised).norm() / unquantised.norm()).item()
    assert 1e-3 < relative < 0.15  # really quantised (e4m3: 3 mantissa bits), and not broken
    assert torch.isfinite(out).all()


def test_fp8_storage_computes_in_bf16() -> None:
    model = _load(tiny_sana_state_dict(), torch.bfloat16, FP8)
    with torch.inference_mode():
        out = model(*_inputs())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_out_of_range_weights_saturate_instead_of_nan() -> None:
    stored = to_storage(torch.tensor([1e4, -1e4, 0.5]), FP8).float()
    assert stored.tolist() == [448.0, -448.0, 0.5]


def test_chunked_conversion_equals_a_whole_tensor_clamp_and_cast(monkeypatch) -> None:
    monkeypatch.setattr(cast_ops, "CHUNK_ELEMENTS", 3)
    t = torch.randn((4, 5), generator=torch.Generator().manual_seed(0)) * 300
    expected = t.clamp(-448, 448).to(FP8)
    assert torch.equal(cast_ops.to_storage(t, FP8).view(torch.uint8), expected.view(torch.uint8))


def test_cast_on_use_layers_keep_torch_keys() -> None:
    assert set(SanaDiT(TINY, operations=CastOnUseOps).state_dict()) == set(SanaDiT(TINY).state_dict())


def test_weight_dtype_rule() -> None:
    gpu, support = torch.device("cuda"), DtypeSupport(bf16=True, fp16=True)
    assert choose_weight_dtypes("fp8_e4m3fn", gpu, support, stored=torch.bfloat16) == (torch.bfloat16, FP8)
    assert choose_weight_dtypes("fp8_e4m3fn", torch.device("cpu"), support) == (torch.float32, FP8)
    assert choose_weight_dtypes("bf16", gpu, support) == (torch.bfloat16, None)
    with pytest.raises(ValueError, match="weight dtype must be one of .*fp8_e4m3fn"):
        choose_weight_dtypes("fp8", gpu, support)


def test_loader_node_offers_fp8_and_loads_it(tmp_path, monkeypatch) -> None:
    path = write_tiny_sana_dit(tmp_path / "diffusion_models")
    monkeypatch.setenv("UNIBA_MODELS_DIR", str(tmp_path))
    choices = sana_nodes.SanaDiTLoader.INPUT_TYPES()["required"]["weight_dtype"][0]
    assert choices[-1] == "fp8_e4m3fn" and choices[0] == "auto"
    (patcher,) = sana_nodes.SanaDiTLoader().load(path.name, "fp8_e4m3fn")
    dit = patcher.model
    assert dit.patch_embed.proj.weight.dtype == FP8 and dit.compute_dtype == torch.float32
    reference = build_sana(read_sana_checkpoint(path), torch.float32, storage_dtype=FP8)
    with torch.inference_mode():
        torch.testing.assert_close(dit(*_inputs()), reference(*_inputs()), rtol=0, atol=0)

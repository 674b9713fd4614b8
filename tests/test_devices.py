"""The one dtype table and the one rule for ``auto``: the node and the CLI give the same dtype for the same facts."""

from __future__ import annotations

import pytest
import torch

from uniba.devices import (
    DTYPE_CHOICES,
    DTYPES,
    DtypeSupport,
    allowed_dtypes,
    choose_dtype,
    dtype_from_name,
    dtype_name,
    torch_dtype_support,
)

CUDA, MPS, CPU = torch.device("cuda"), torch.device("mps"), torch.device("cpu")
BOTH, FP16_ONLY, NEITHER = DtypeSupport(True, True), DtypeSupport(False, True), DtypeSupport(False, False)


def test_names_round_trip_and_storage_names() -> None:
    for name, dtype in DTYPES.items():
        assert dtype_name(dtype) == name
        assert dtype_from_name(name) is dtype
    assert dtype_name(torch.float8_e4m3fn) == "fp8_e4m3fn"  # storage only: not offered as a compute dtype
    assert dtype_from_name("fp8_e4m3fn", names=("fp8_e4m3fn",)) is torch.float8_e4m3fn
    assert dtype_name(torch.float64) == "float64"
    with pytest.raises(ValueError, match=r"weight dtype must be auto, bf16, fp16 or fp32, got 'fp8'"):
        choose_dtype("fp8", CPU, NEITHER)


@pytest.mark.parametrize(("device", "support", "stored", "supported", "expected"), [
    (CPU, BOTH, None, None, torch.float32),                            # the CPU computes half precision slowly
    (CUDA, BOTH, None, None, torch.bfloat16),
    (CUDA, FP16_ONLY, None, None, torch.float16),                      # pre-Ampere cards
    (CUDA, FP16_ONLY, torch.bfloat16, None, torch.float32),            # a bf16 release is not squeezed into fp16
    (CUDA, FP16_ONLY, None, (torch.bfloat16, torch.float32), torch.float32),  # models that overflow in fp16
    (MPS, NEITHER, None, None, torch.float32),
])
def test_auto_rule(device, support, stored, supported, expected) -> None:
    kwargs = {} if supported is None else {"supported": supported}
    assert choose_dtype("auto", device, support, stored=stored, **kwargs) is expected
    assert choose_dtype("fp16", device, support, stored=stored, **kwargs) is torch.float16  # asked for: given


def test_allowed_dtypes_and_choices() -> None:
    assert allowed_dtypes(torch.bfloat16) == [torch.bfloat16, torch.float32]
    assert allowed_dtypes(torch.float16) == [torch.bfloat16, torch.float16, torch.float32]
    assert DTYPE_CHOICES == ("auto", *sorted(DTYPES, key=("bf16", "fp16", "fp32").index))


def test_node_and_cli_ask_the_same_facts_headless() -> None:
    from uniba_pack.nodes.comfy import host

    assert torch_dtype_support(CPU) == NEITHER
    assert torch_dtype_support(MPS) == BOTH
    assert host.dtype_support(CPU) == torch_dtype_support(CPU)
    assert host.torch_device() == torch.device("cpu")  # the one default_device() on this machine

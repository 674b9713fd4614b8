"""Which device and which dtype: the one table of dtype names and the one rule for ``auto``.

The rule needs facts only the host knows well (whether the device computes bf16/fp16 usefully);
the caller passes them in as a :class:`DtypeSupport`. ComfyUI's adapter asks ComfyUI
(``nodes/comfy/host.dtype_support``); the command line asks torch (:func:`torch_dtype_support`). So
the node and the CLI give the same dtype for the same facts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = [
    "DTYPES", "STORAGE_DTYPES", "COMPUTE_DTYPES", "DTYPE_CHOICES", "WEIGHT_DTYPE_CHOICES", "DtypeSupport", "dtype_name",
    "dtype_from_name",
    "torch_dtype_support", "allowed_dtypes", "choose_dtype", "choose_weight_dtypes", "default_device",
]

# The dtypes models compute in, by the names the nodes and the command line use.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Storage-only dtypes: weights may be kept in them and are cast to a compute dtype for each layer.
STORAGE_DTYPES: dict[str, torch.dtype] = {**DTYPES, "fp8_e4m3fn": torch.float8_e4m3fn}
COMPUTE_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)
# What a "dtype" input offers: the rule below, or one of the compute dtypes.
DTYPE_CHOICES: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")
# A DiT loader's "weight_dtype" also offers fp8 storage: weights kept in fp8, each layer cast to auto's compute
# dtype when it runs (the role of core's UNETLoader weight_dtype fp8_e4m3fn).
FP8 = "fp8_e4m3fn"
WEIGHT_DTYPE_CHOICES: tuple[str, ...] = (*DTYPE_CHOICES, FP8)


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a dtype (``torch.bfloat16`` -> "bf16"); torch's own name for others."""
    for name, value in STORAGE_DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str, what: str = "dtype", names: Iterable[str] = tuple(DTYPES)) -> torch.dtype:
    """The dtype called ``name`` among ``names``; ValueError naming ``what`` and the choices otherwise."""
    names = tuple(names)
    if name not in names or name not in STORAGE_DTYPES:
        raise ValueError(f"{what} must be {', '.join(names[:-1])} or {names[-1]}, got {name!r}")
    return STORAGE_DTYPES[name]


@dataclass(frozen=True)
class DtypeSupport:
    """Whether a device computes in bf16 / fp16 at full speed (the host's answer)."""

    bf16: bool
    fp16: bool


def torch_dtype_support(device: torch.device) -> DtypeSupport:
    """torch's answer, for the command line and hosts without their own: CUDA cards as torch reports them,
    Apple GPUs both, the CPU neither (its half-precision kernels are slow)."""
    if device.type == "cuda":
        return DtypeSupport(bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(), fp16=True)
    if device.type == "mps":
        return DtypeSupport(bf16=True, fp16=True)
    return DtypeSupport(bf16=False, fp16=False)


def allowed_dtypes(stored: torch.dtype | None = None,
                   supported: Iterable[torch.dtype] = COMPUTE_DTYPES) -> list[torch.dtype]:
    """The compute dtypes a model may run in: its own ``supported`` ones, without fp16 for a checkpoint
    stored in bf16 (bf16 weights exceed fp16's range; docs/SOURCES.md, Sana §8.5)."""
    return [d for d in supported if not (d == torch.float16 and stored == torch.bfloat16)]


def choose_dtype(requested: str, device: torch.device, support: DtypeSupport, *,
                 supported: Iterable[torch.dtype] = COMPUTE_DTYPES,
                 stored: torch.dtype | None = None) -> torch.dtype:
    """Resolve ``auto|bf16|fp16|fp32`` to a dtype.

    ``auto`` is fp32 on the CPU, else bf16 where the device supports it, else fp16 where the device
    supports it and the model allows it (not for a checkpoint ``stored`` in bf16), else fp32.
    """
    if requested != "auto":
        return dtype_from_name(requested, "weight dtype", DTYPE_CHOICES)
    if device.type == "cpu":
        return torch.float32
    allowed = allowed_dtypes(stored, supported)
    if torch.bfloat16 in allowed and support.bf16:
        return torch.bfloat16
    if torch.float16 in allowed and support.fp16:
        return torch.float16
    return torch.float32


def choose_weight_dtypes(requested: str, device: torch.device, support: DtypeSupport, *,
                         supported: Iterable[torch.dtype] = COMPUTE_DTYPES,
                         stored: torch.dtype | None = None) -> tuple[torch.dtype, torch.dtype | None]:
    """``(compute dtype, storage dtype or None)`` for a DiT loader's ``weight_dtype`` (:data:`WEIGHT_DTYPE_CHOICES`).

    fp8 stores the weights in ``float8_e4m3fn`` and computes in what ``auto`` would choose; every other choice
    stores and computes in one dtype, as :func:`choose_dtype` resolves it.
    """
    if requested == FP8:
        return choose_dtype("auto", device, support, supported=supported, stored=stored), STORAGE_DTYPES[FP8]
    if requested not in WEIGHT_DTYPE_CHOICES:
        raise ValueError(f"weight dtype must be one of {', '.join(WEIGHT_DTYPE_CHOICES)}, got {requested!r}")
    return choose_dtype(requested, device, support, supported=supported, stored=stored), None


def default_device() -> torch.device:
    """The device to compute on when nobody chose one: CUDA, else an Apple GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")

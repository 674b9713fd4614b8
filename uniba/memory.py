"""Memory budgeting shared by all three methods.

One rule everywhere: express the cost of one unit of work (a block batch, a decode tile, a
batch of latents) in bytes, ask :func:`largest_unit` for the biggest unit that fits the budget,
and run the work under :func:`retry_on_oom`, which halves the unit when the device still runs out.
Nothing here imports a host; the budget comes from the caller (ComfyUI's free-memory figure in
the nodes, a ``--vram`` flag in the CLI, an injected number in tests).
"""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import psutil
import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

GIB = 1024**3
MIB = 1024**2

_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": MIB, "mb": MIB, "mib": MIB,
          "g": GIB, "gb": GIB, "gib": GIB, "t": 1024 * GIB, "tb": 1024 * GIB, "tib": 1024 * GIB}


def parse_bytes(text: str | int | float) -> int:
    """Parse ``"12GB"``, ``"512 MiB"``, ``"1.5g"`` or a plain number of bytes.

    Decimal and binary suffixes both mean powers of 1024, as GPU vendors quote "12 GB" cards.
    """
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read a memory size from {text!r}: write it like 12GB, 512MB or 1.5GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(n: float) -> str:
    """Human-readable size with binary units (``"1.50 GiB"``)."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Budget:
    """What a piece of work may use: the free bytes reported by the host, less a safety margin."""

    free_bytes: int
    safety_fraction: float = 0.1
    reserve_bytes: int = 0

    @property
    def usable(self) -> int:
        return max(0, int(self.free_bytes * (1.0 - self.safety_fraction)) - self.reserve_bytes)


def device_free_bytes(device: torch.device | str) -> int:
    """Free bytes on ``device`` as torch sees it: ``cuda.mem_get_info`` on CUDA, else available RAM.

    The one free-memory probe of the pack; inside ComfyUI the nodes use the host's own figure instead.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def largest_unit(
    bytes_for_unit: Callable[[int], float] | float,
    budget: int | Budget,
    *,
    max_unit: int,
    min_unit: int = 1,
    fixed_bytes: float = 0,
) -> int:
    """The largest unit ``u`` in ``[min_unit, max_unit]`` with ``fixed_bytes + bytes_for_unit(u) <= budget``.

    ``bytes_for_unit`` is either a cost per unit (linear work) or a function of the unit (for
    work whose cost grows faster, e.g. n x n block batches). The cost must be non-decreasing in
    the unit. When not even ``min_unit`` fits, ``min_unit`` is returned: the caller runs it under
    :func:`retry_on_oom` rather than refusing work that might still fit once caches are freed.
    """
    if max_unit < min_unit:
        raise ValueError(f"max_unit {max_unit} is below min_unit {min_unit}")
    usable = budget.usable if isinstance(budget, Budget) else int(budget)
    cost = bytes_for_unit if callable(bytes_for_unit) else (lambda u: u * float(bytes_for_unit))
    best = min_unit
    lo, hi = min_unit, max_unit
    while lo <= hi:
        mid = (lo + hi) // 2
        if fixed_bytes + cost(mid) <= usable:
            best = mid
            lo = mid + 1
        else:
            hi = mid - 1
    return best


# Phrases of allocator failures that arrive as plain RuntimeError (or torch.AcceleratorError):
# CUDA/ROCm/XPU "out of memory", MPS "MPS backend out of memory", the CPU allocator's
# "DefaultCPUAllocator: can't allocate memory" and c10's "Failed to allocate".
_OOM_PHRASES = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate",
                "defaultcpuallocator: not enough memory")

def is_out_of_memory(exc: BaseException) -> bool:
    """True for the out-of-memory errors of CUDA, ROCm, MPS, XPU and the CPU allocator.

    Recognised: ``torch.OutOfMemoryError``, ``MemoryError`` (Python's own allocator), and any
    ``RuntimeError``/``torch.AcceleratorError`` whose message says the allocator failed (on the CPU:
    ``DefaultCPUAllocator: can't allocate memory``). Hosts with their own test pass it where the
    engine takes ``is_oom`` (the ComfyUI adapter passes ``host.is_oom``).
    """
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    if oom_types and isinstance(exc, oom_types):
        return True
    if isinstance(exc, MemoryError):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    allocator_types = (RuntimeError,) + ((accelerator_error,) if isinstance(accelerator_error, type) else ())
    if isinstance(exc, allocator_types):
        text = str(exc).lower()
        return any(phrase in text for phrase in _OOM_PHRASES)
    return False


def free_device_cache() -> None:
    """Release cached allocator blocks after an out-of-memory error, on whatever device has them."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


class OutOfMemoryAtMinimum(RuntimeError):
    """Raised when the work ran out of memory even at the smallest unit."""


def retry_on_oom(
    work: Callable[[int], T],
    unit: int,
    *,
    min_unit: int = 1,
    what: str = "work",
    is_oom: Callable[[BaseException], bool] = is_out_of_memory,
    on_oom: Callable[[], None] = free_device_cache,
    shrink: Callable[[int], int] = lambda u: u // 2,
) -> T:
    """Run ``work(unit)``; on out-of-memory free caches, shrink the unit (halve by default) and rerun.

    ``work`` must be restartable: it recomputes the failed piece from its inputs, so a retried
    run gives the same result as an uninterrupted one. When even ``min_unit`` fails, the error
    says so and how to make room.
    """
    current = unit
    while True:
        try:
            return work(current)
        except BaseException as exc:  # noqa: BLE001 - only out-of-memory errors are swallowed
            if not is_oom(exc):
                raise
            on_oom()
            if current <= min_unit:
                raise OutOfMemoryAtMinimum(
                    f"{what} ran out of memory even at the smallest size ({current}). Free memory by "
                    "closing other programs or unloading models, use a lower-precision dtype, "
                    "or enable offloading."
                ) from exc
            smaller = max(min_unit, shrink(current))
            log.warning("%s ran out of memory at %d; retrying at %d", what, current, smaller)
            current = smaller

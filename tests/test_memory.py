"""Memory planning: largest fitting unit and out-of-memory retry, with injected budgets and fake OOMs."""

from __future__ import annotations

import pytest
import torch

from uniba.memory import (
    GIB,
    Budget,
    OutOfMemoryAtMinimum,
    format_bytes,
    is_out_of_memory,
    largest_unit,
    parse_bytes,
    retry_on_oom,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("12GB", 12 * GIB), ("12 GiB", 12 * GIB), ("512MB", 512 * 1024**2), ("1.5g", int(1.5 * GIB)), ("100", 100),
])
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_parse_bytes_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="12GB"):
        parse_bytes("twelve gigs")


def test_format_bytes() -> None:
    assert format_bytes(1.5 * GIB) == "1.50 GiB"
    assert format_bytes(3 * 1024**2) == "3.00 MiB"


def test_largest_unit_linear_cost() -> None:
    # 100 bytes fixed + 10 bytes per unit, budget 1000 -> 90 units
    assert largest_unit(10, 1000, max_unit=1000, fixed_bytes=100) == 90
    assert largest_unit(10, 1000, max_unit=50, fixed_bytes=100) == 50


def test_largest_unit_quadratic_cost_and_budget_margin() -> None:
    def cost(n: int) -> float:
        return n * n * 1000.0

    assert largest_unit(cost, 16_000, max_unit=16) == 4
    # a 10 % safety margin of 20_000 leaves 18_000 -> still 4; without margin 20_000 -> 4; 25_000 -> 5
    assert largest_unit(cost, Budget(20_000), max_unit=16) == 4
    assert largest_unit(cost, Budget(25_000, safety_fraction=0.0), max_unit=16) == 5
    assert largest_unit(cost, Budget(25_000, safety_fraction=0.0, reserve_bytes=10_000), max_unit=16) == 3


def test_largest_unit_returns_minimum_when_nothing_fits() -> None:
    assert largest_unit(10**12, 1, max_unit=8, min_unit=1) == 1
    with pytest.raises(ValueError):
        largest_unit(1, 1, max_unit=0, min_unit=1)


class FakeDevice:
    """Work that 'runs out of memory' above a limit, recording every attempt."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.attempts: list[int] = []

    def work(self, unit: int) -> torch.Tensor:
        self.attempts.append(unit)
        if unit > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {unit} GiB")
        return torch.arange(12.0).sum() * 2  # same result whatever the unit


def test_retry_halves_until_it_fits_and_result_is_unchanged() -> None:
    device = FakeDevice(limit=3)
    cleanups = []
    result = retry_on_oom(device.work, 16, on_oom=lambda: cleanups.append(1))
    assert device.attempts == [16, 8, 4, 2]
    assert len(cleanups) == 3
    assert result == FakeDevice(limit=99).work(16)


def test_retry_gives_up_at_minimum_with_a_sentence() -> None:
    device = FakeDevice(limit=0)
    with pytest.raises(OutOfMemoryAtMinimum, match="smallest size"):
        retry_on_oom(device.work, 4, what="decoding", on_oom=lambda: None)
    assert device.attempts == [4, 2, 1]


def test_retry_does_not_swallow_other_errors() -> None:
    def broken(unit: int) -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        retry_on_oom(broken, 8)


def test_is_out_of_memory_variants() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


# --------------------------------------------------------------------------- real allocator failures

def _absurd_cpu_allocation() -> RuntimeError:
    """The CPU allocator's real failure: 2**50 float32 elements (4 PiB) can never be allocated."""
    try:
        torch.empty(1 << 50, dtype=torch.float32)
    except RuntimeError as exc:
        return exc
    pytest.skip("this machine allocated 4 PiB")


def test_real_cpu_allocator_failure_is_out_of_memory() -> None:
    exc = _absurd_cpu_allocation()
    assert "DefaultCPUAllocator" in str(exc) or "allocate" in str(exc)
    assert is_out_of_memory(exc)


def test_retry_on_oom_shrinks_after_a_real_cpu_allocation_failure() -> None:
    attempts: list[int] = []

    def work(unit: int) -> torch.Tensor:
        attempts.append(unit)
        # unit 8 asks the CPU allocator for 2**50 elements and fails for real; unit 4 is small
        size = (1 << 50) if unit > 4 else 16
        return torch.ones(size).sum() if unit <= 4 else torch.empty(size).sum()

    result = retry_on_oom(work, 8)
    assert attempts == [8, 4]
    assert float(result) == 16.0


@pytest.mark.parametrize("message", [
    "CUDA out of memory. Tried to allocate 2.00 GiB",
    "MPS backend out of memory (MPS allocated: 1.00 GB)",
    "HIP out of memory. Tried to allocate 20.00 MiB",
])
def test_accelerator_messages_are_out_of_memory(message: str) -> None:
    assert is_out_of_memory(RuntimeError(message))
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if isinstance(accelerator_error, type):
        try:
            exc = accelerator_error(message)
        except TypeError:  # constructor signature differs between torch versions
            return
        assert is_out_of_memory(exc)


def test_unrelated_errors_are_not_out_of_memory() -> None:
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only allocator error types count

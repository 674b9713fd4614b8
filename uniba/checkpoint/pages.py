"""Taking the pages of memory-mapped checkpoint tensors out of this process's resident memory (Linux)."""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable, Iterable

import torch

from .files import SUPPORTED_SUFFIXES

_MADV_DONTNEED = 4
_madvise: Callable[[int, int, int], int] | None = None


def _libc_madvise() -> Callable[[int, int, int], int]:
    global _madvise
    if _madvise is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            libc.madvise.restype = ctypes.c_int
            _madvise = libc.madvise
        except (OSError, AttributeError):
            _madvise = lambda *_: -1  # noqa: E731 - remembered: not available here
    return _madvise


def checkpoint_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's private memory maps of checkpoint files (Linux; empty elsewhere)."""
    if not sys.platform.startswith("linux"):
        return []
    ranges = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[1].endswith("p") and parts[5].rstrip().lower().endswith(
                        SUPPORTED_SUFFIXES):
                    low, high = parts[0].split("-")
                    ranges.append((int(low, 16), int(high, 16)))
    except OSError:
        return []
    return ranges


def release_pages(tensors: Iterable[torch.Tensor], mappings: list[tuple[int, int]] | None = None) -> None:
    """Take the pages of tensors memory-mapped from a checkpoint file out of this process's resident memory.

    Checkpoints are memory-mapped, so every page a reader touches (the NaN/inf check, a dtype conversion)
    stays counted until the whole file is unmapped: without this, loading an fp32 file as bf16 would peak at
    the file's size on top of the model. ``MADV_DONTNEED`` on a private *file* mapping only unmaps: the data
    stays in the page cache and the next access maps it again from the file. It is applied to whole pages
    inside tensors that lie in a checkpoint-file mapping (:func:`checkpoint_mappings`) and never to
    ordinary memory. Only for tensors just read and not written to (a written page would revert to the file).
    """
    mappings = checkpoint_mappings() if mappings is None else mappings
    if not mappings:
        return
    madvise = _libc_madvise()
    page = os.sysconf("SC_PAGE_SIZE")
    for tensor in tensors:
        if tensor.device.type != "cpu" or not tensor.numel() or not tensor.is_contiguous():
            continue
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if not any(low <= start and end <= high for low, high in mappings):
            continue
        first = -(-start // page) * page  # whole pages only: a neighbour's partial page stays
        last = end // page * page
        if last > first:
            madvise(first, last - first, _MADV_DONTNEED)

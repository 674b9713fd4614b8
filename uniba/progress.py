"""The progress/cancel protocol between the engine and its host.

Engine loops accept ``progress: ProgressFn | None`` and call ``progress(done, total, preview)``
after each unit of work (a block batch, a tile, a step). The callback may raise to cancel: inside
ComfyUI it raises the interrupt exception when the user pressed Cancel, so the engine must keep
its state consistent at every call (free caches in ``finally``).
"""

from __future__ import annotations

from typing import Protocol

import torch


class ProgressFn(Protocol):
    def __call__(self, done: int, total: int | None = None, preview: torch.Tensor | None = None) -> None: ...


def report(progress: ProgressFn | None, done: int, total: int, preview: torch.Tensor | None = None) -> None:
    """Call ``progress`` if there is one (keeps ``if progress:`` out of every loop)."""
    if progress is not None:
        progress(done, total, preview)

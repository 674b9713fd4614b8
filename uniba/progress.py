"""The progress/cancel protocol between the engine and its host.

Engine loops accept ``progress: ProgressFn | None`` and call ``progress(done, total, preview)``
after each unit of work (a block batch, a tile, a step). The callback may raise to cancel: inside
ComfyUI it raises the interrupt exception when the user pressed Cancel, so the engine must keep
its state consistent at every call (free caches in ``finally``).

Inside a unit that runs long (the transformer layers of one block batch), the engine also calls
:func:`check_cancel`: a callback with a ``check_cancel()`` method (the host's) raises there on
Cancel without redrawing its progress bar; a plain function is only asked at its reports.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch
from tqdm.auto import tqdm


class ProgressFn(Protocol):
    def __call__(self, done: int, total: int | None = None, preview: torch.Tensor | None = None) -> None: ...


def check_cancel(progress: ProgressFn | None) -> None:
    """A Cancel point between reports: calls ``progress.check_cancel()`` when the callback has one."""
    check = getattr(progress, "check_cancel", None)
    if check is not None:
        check()


def report(progress: ProgressFn | None, done: int, total: int, preview: torch.Tensor | None = None) -> None:
    """Call ``progress`` if there is one (keeps ``if progress:`` out of every loop)."""
    if progress is not None:
        progress(done, total, preview)


class TerminalProgress:
    """The one terminal display of a :class:`ProgressFn`: a tqdm bar with ETA, silent with ``UNIBA_QUIET=1``.

    Used by the command line and by the adapter when no ComfyUI shows progress; ``total`` may change
    between calls (the engine knows it only once a pass is planned).
    """

    def __init__(self, total: int, desc: str = "", unit: str = "it", leave: bool = True) -> None:
        self.bar = tqdm(total=total, desc=desc or None, unit=unit, leave=leave, dynamic_ncols=True,
                        disable=os.environ.get("UNIBA_QUIET") == "1")
        self.done = 0

    def __call__(self, done: int, total: int | None = None, preview: torch.Tensor | None = None) -> None:
        if total is not None and total != self.bar.total:
            self.bar.total = total
        self.bar.update(done - self.done)
        self.done = done

    def describe(self, text: str) -> None:
        """Replace the text before the bar (e.g. "3/10 images")."""
        self.bar.set_description_str(text, refresh=False)

    def close(self) -> None:
        self.bar.close()

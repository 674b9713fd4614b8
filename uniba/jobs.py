"""Many inputs on one or many processes: the input list of a command and a work queue shared by the ranks.

A command that takes a folder, a glob or a frame pattern runs the same way on one process and under
``torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint ...]``. The ranks meet through
``torch.distributed``'s own key-value store (the one ``torchrun`` hosts), nothing home-made:

* rank 0 lists the inputs and publishes the list, so every rank works on the same list even if the
  folder changes meanwhile;
* each rank takes the next input with an atomic counter (``store.add``), so a rank that drew small
  images simply takes more of them and unequal inputs balance out;
* every rank adds its finished work units to shared counters, which rank 0 shows as one progress
  display for the whole job;
* a failing input is recorded in the store and the rank goes on; after the queue is empty every
  rank waits for the others and rank 0 reports the failures.

Without ``torchrun`` the store is an in-process ``HashStore`` and the same code runs as one rank.
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from .wording import count

# How long a rank waits for rank 0's input list, and for the others at the end, before giving up.
WAIT = timedelta(hours=24)
# How often a rank publishes its progress (a store round trip per block batch would be wasteful).
PUBLISH_EVERY_S = 0.5

_FRAME_PRINTF = re.compile(r"%0?(\d*)d")
_FRAME_HASHES = re.compile(r"#+")


class JobError(ValueError):
    """The inputs of a job cannot be listed or paired with outputs; the message names the argument."""


def _frame_regex(name: str) -> re.Pattern[str] | None:
    """A file-name regex for a frame pattern (``frame_%04d.png``, ``frame_%d.png``, ``frame_####.png``)."""
    for marker in (_FRAME_PRINTF, _FRAME_HASHES):
        match = marker.search(name)
        if match and not marker.search(name, match.end()):
            if marker is _FRAME_PRINTF:
                width = int(match.group(1) or 0)
                digits = rf"(\d{{{width}}})" if match.group(0).startswith("%0") and width else r"(\d+)"
            else:
                digits = rf"(\d{{{len(match.group(0))}}})"
            return re.compile(re.escape(name[:match.start()]) + digits + re.escape(name[match.end():]) + r"\Z")
    return None


def expand_inputs(spec: str, extensions: tuple[str, ...], what: str = "input") -> list[Path]:
    """The files a command argument names: a folder (its files with ``extensions``, sorted by name), a glob
    (``renders/*.png``), a frame pattern (``frames/f_%04d.png`` or ``frames/f_####.png``, in frame order) or one
    file. Raises :class:`JobError` naming the argument when nothing matches."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in extensions)
        if not found:
            raise JobError(f"{what} {spec}: the folder has no {' / '.join(extensions)} files.")
        return found
    pattern = _frame_regex(path.name)
    if pattern is not None:
        folder = path.parent
        frames = [(int(m.group(1)), p) for p in (folder.iterdir() if folder.is_dir() else ())
                  if p.is_file() and (m := pattern.match(p.name))]
        if not frames:
            raise JobError(f"{what} {spec}: no file in {folder} matches this frame pattern.")
        return [p for _, p in sorted(frames)]
    if glob.has_magic(spec):
        found = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())
        if not found:
            raise JobError(f"{what} {spec}: no file matches this pattern.")
        return found
    return [path]


def is_many(spec: str) -> bool:
    """True when a command argument names several inputs (a folder, a glob or a frame pattern); an existing file
    is one input even if its name looks like a pattern (``shot[1].png``)."""
    path = Path(spec)
    if path.is_file():
        return False
    return path.is_dir() or glob.has_magic(spec) or _frame_regex(path.name) is not None


def output_names(inputs: list[Path], folder: Path, suffix: str) -> list[Path]:
    """One output per input in ``folder``: the input's name with ``suffix``; JobError if two would collide or an
    output would be an input."""
    outputs = [folder / (p.stem + suffix) for p in inputs]
    seen: dict[Path, Path] = {}
    for source, target in zip(inputs, outputs, strict=True):
        if target in seen:
            raise JobError(f"output {target}: both {seen[target]} and {source} would be written there; give inputs "
                           "with different names (or put them in separate folders).")
        seen[target] = source
        if target.exists() and os.path.realpath(target) == os.path.realpath(source):
            raise JobError(f"output {target}: is the input {source}; writing it would destroy the input. Choose "
                           "another output folder.")
    return outputs


def launched_by_torchrun() -> bool:
    """True inside a process that ``torchrun`` started (it sets these variables for every rank)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


@dataclass
class Job:
    """The ranks of one run and their shared store. ``Job.start()`` joins ``torchrun``'s ranks, else is rank 0 of 1."""

    rank: int
    world_size: int
    local_rank: int
    store: dist.Store
    base_store: dist.Store | None = None  # the rendezvous store under torchrun (the job's keys are a prefix of it)

    @classmethod
    def start(cls) -> Job:
        if not launched_by_torchrun():
            return cls(0, 1, 0, dist.HashStore())
        store, rank, world_size = next(iter(dist.rendezvous("env://", timeout=WAIT)))
        return cls(rank, world_size, int(os.environ.get("LOCAL_RANK", 0)), dist.PrefixStore("uniba/job/", store),
                   store)

    def process_group(self, backend: str) -> object:
        """torch.distributed's default process group over the job's ranks (``gloo`` on CPUs, ``nccl`` on CUDA), made
        once, on the job's store; every rank must call this (it is a collective)."""
        if not dist.is_initialized():
            dist.init_process_group(backend, store=dist.PrefixStore("uniba/group/", self.base_store or self.store),
                                    rank=self.rank, world_size=self.world_size)
        return dist.group.WORLD

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, key: str, make: Callable[[], object]) -> object:
        """``make()`` on rank 0, the same value on every rank (JSON through the store). An error raised by
        ``make`` on rank 0 is raised, with the same message, on every rank."""
        if self.is_main:
            try:
                value = {"value": make()}
            except ValueError as exc:
                value = {"error": str(exc)}
            self.store.set(key, json.dumps(value))
        else:
            self.store.wait([key], WAIT)
            value = json.loads(self.store.get(key))
        if "error" in value:
            raise JobError(value["error"])
        return value["value"]

    def take(self) -> int:
        """The index of the next input of the queue (each index goes to exactly one rank)."""
        return self.store.add("next", 1) - 1

    def add(self, counter: str, amount: int) -> int:
        """Add to a shared counter and return its new value (``amount`` 0 reads it)."""
        return self.store.add(counter, int(amount))

    def fail(self, message: str) -> None:
        """Record a failed input (``message`` names it); the rank goes on with the queue."""
        self.store.set(f"failure/{self.add('failures', 1)}", message)

    def finish(self, idle: Callable[[], None] | None = None) -> list[str]:
        """Wait until every rank has emptied its queue, calling ``idle`` meanwhile; the failures of the job."""
        self.add("finished", 1)
        deadline = time.monotonic() + WAIT.total_seconds()
        while self.add("finished", 0) < self.world_size and time.monotonic() < deadline:
            if idle is not None:
                idle()
            time.sleep(0.05)
        return [self.store.get(f"failure/{k}").decode() for k in range(1, self.add("failures", 0) + 1)]


class JobProgress:
    """Work units (e.g. block batches) and finished inputs of every rank, published through the job's store;
    rank 0 draws them on ``display`` (a :class:`~uniba.progress.ProgressFn` with a ``describe(text)``)."""

    def __init__(self, job: Job, total_units: int, total_inputs: int, display=None) -> None:
        self.job, self.total_units, self.total_inputs, self.display = job, total_units, total_inputs, display
        self.pending = 0
        self.last_publish = time.monotonic()

    def unit(self, amount: int = 1) -> None:
        """Count finished units of this rank (published every :data:`PUBLISH_EVERY_S` seconds)."""
        self.pending += amount
        if time.monotonic() - self.last_publish >= PUBLISH_EVERY_S:
            self.publish()

    def input_done(self, units_left: int = 0) -> None:
        """An input is finished (or failed, with ``units_left`` it will never run): publish now."""
        self.pending += units_left
        self.job.add("inputs_done", 1)
        self.publish()

    def publish(self) -> None:
        if self.pending:
            self.job.add("units", self.pending)
            self.pending = 0
        self.last_publish = time.monotonic()
        self.draw()

    def draw(self) -> None:
        if self.display is None:
            return
        units, inputs = self.job.add("units", 0), self.job.add("inputs_done", 0)
        ranks = f" on {count(self.job.world_size, 'process')}" if self.job.world_size > 1 else ""
        self.display.describe(f"{inputs}/{self.total_inputs} images{ranks}")
        self.display(min(units, self.total_units), self.total_units)

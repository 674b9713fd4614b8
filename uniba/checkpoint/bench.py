"""``python -m uniba bench scan``: what the pre-scan of a pickle costs next to the load it protects.

For each ``.pt`` (given, or written here in a release's shape: a DeepSpeed/SAT state with ``module``,
``param_shapes``, an ``argparse.Namespace`` and a numpy RNG state), it times, side by side in one run, the
bounded opcode scan (:func:`~.scan.scan_file`) and ``torch.load`` of the same file, and prints their ratio
and the pickle's size. The scan reads only ``data.pkl``, so its cost does not depend on the weights' size:
the written files keep one element per storage and repeat the layout to reach a release's tensor count
(about 1,100 for Inf-DiT, 900 for Sana 1600M) and a far larger one.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .files import open_regular
from .readers import load_pickle
from .sandbox import safe_globals
from .scan import read_data_pkl, scan_file


def release_shaped_state(tensors: int) -> dict[str, object]:
    """A DeepSpeed/SAT-style checkpoint with ``tensors`` bf16 weights (one element each, expanded views)."""
    module: dict[str, torch.Tensor] = {}
    shapes = ((1280, 1280), (1280,), (3840, 1280), (5120, 1280), (1280, 5120), (1280,))
    for i in range(tensors):
        layer, slot = divmod(i, len(shapes))
        module[f"transformer.layers.{layer}.part_{slot}.weight"] = torch.zeros((), dtype=torch.bfloat16).expand(
            shapes[slot])
    return {
        "module": module,
        "param_shapes": [collections.OrderedDict((k, v.shape) for k, v in module.items())],
        "args": argparse.Namespace(lr=1e-4, bf16=True, seed=0),
        "np_rng_state": np.random.RandomState(0).get_state(),
        "global_steps": 10, "ds_version": "0.9.5",
    }


def _best_of(repeats: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()  # CPU time: a busy shared machine does not skew the ratio
        work()  # type: ignore[operator]
        times.append(time.process_time() - start)
    return min(times)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uniba bench scan", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help=".pt files to measure (default: written here)")
    parser.add_argument("--tensors", default="1100,20000", help="tensor counts of the written files")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="uniba-bench-scan-") as folder:
        files = list(args.files)
        if not files:
            for count in (int(n) for n in args.tensors.split(",")):
                files.append(Path(folder) / f"release_shaped_{count}.pt")
                torch.save(release_shaped_state(count), files[-1])
        print(f"{'file (CPU times)':<34} {'data.pkl':>10} {'scan ms':>9} {'torch.load ms':>14} {'scan/load':>10}")
        for path in files:
            with open_regular(path) as fh:
                size = len(read_data_pkl(fh)) if zipfile.is_zipfile(fh) else path.stat().st_size
            scan = _best_of(args.repeats, lambda p=path: scan_file(p))
            with torch.serialization.safe_globals(safe_globals()):  # torch.load as the loader calls it
                load = _best_of(args.repeats, lambda p=path: torch.load(p, map_location="cpu", weights_only=True,
                                                                         mmap=True))
            guarded = _best_of(args.repeats, lambda p=path: load_pickle(p))
            print(f"{path.name:<34} {size:>10,} {scan * 1e3:>9.1f} {load * 1e3:>14.1f} {scan / load:>10.2f}"
                  f"   (safe load, scan included: {guarded * 1e3:.1f} ms)")
    return 0

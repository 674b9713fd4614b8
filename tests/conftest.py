"""Test set-up shared by both tiers.

The pack is imported as the package ``uniba_pack`` (the way ComfyUI imports it, under a name of
its own), so node modules are reached as ``uniba_pack.nodes.<module>``. A top-level ``nodes``
would collide with ComfyUI's own ``nodes`` module in the integration tier.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"

os.environ.setdefault("UNIBA_QUIET", "1")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _import_pack() -> None:
    if "uniba_pack" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("uniba_pack", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["uniba_pack"] = module
    spec.loader.exec_module(module)


_import_pack()
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def data_dir() -> Path:
    return DATA


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny tensors only gain contention from a second one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""One image split across ranks (issue 21 item 2): the block-by-evaluation wavefront over gloo equals the
one-process result for every sampler we ship, at several shapes, splits and band sizes, with 2 and 3
processes (torchrun), with out-of-memory backoff on one rank; the planner's per-rank figures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_infdit import TINY

from uniba.infdit.model import BlockRect
from uniba.infdit.plan import block_cache_bytes, plan_upscale
from uniba.infdit.ranks import ACROSS, ALONG, plan_ranks, split_bands

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = Path(__file__).resolve().parent
TOLERANCE = 1e-5

# (LR height, width): the tiny model's blocks are 32 px at 4x, so 24 x 16 is 3 x 2 blocks (row-major)
CASES = [dict(case, world=2) for case in [
    {"sampler": "heun", "lr": [24, 16]},
    {"sampler": "euler", "lr": [16, 40], "block_batch": 2},  # 2 x 5 blocks, column-major: bands of block rows
    {"sampler": "euler_ancestral", "lr": [40, 24], "band_sizes": [2, 1], "block_batch": 2},
    {"sampler": "euler_ancestral", "lr": [40, 24], "split": "along", "band_sizes": [1, 4]},
    {"sampler": "dpmpp_2m", "lr": [24, 24], "split": "along", "offload": True},
    {"sampler": "dpmpp_3m", "lr": [24, 32], "block_batch": 2},
    {"sampler": "dpmpp_3m_sde", "lr": [32, 24], "band_sizes": [1, 2]},
    {"sampler": "unipc", "lr": [24, 24], "block_batch": 3},
    {"sampler": "unipc_bh1", "lr": [20, 12], "steps": 2},  # padded input
    {"sampler": "euler", "lr": [8, 12], "scale": 8, "steps": 2},  # two passes: 4x then 2x
    {"sampler": "heun", "lr": [24, 24], "block_batch": 2, "oom_rank": 0, "steps": 2,
     "oom_expect": [1, 4]},  # rank 0's 2 x 2 batches fail and run as single blocks
]] + [dict(case, world=3) for case in [
    {"sampler": "heun", "lr": [24, 24], "steps": 2},
    {"sampler": "euler_ancestral", "lr": [24, 40], "split": "along", "band_sizes": [2, 2, 1], "block_batch": 2},
    {"sampler": "dpmpp_3m_sde", "lr": [16, 16], "steps": 2},  # 2 x 2 blocks: the third rank has no band
    {"sampler": "euler", "lr": [24, 24], "steps": 2, "block_batch": 2, "oom_rank": 2,
     "oom_expect": [1, 2]},  # rank 2's band is one column: its 2 x 1 batches fail
]]
WORLD = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(tmp_path: Path, cases: list[dict]) -> dict:
    """The worker on WORLD processes, started with the environment torchrun gives its workers."""
    cases_file, out_file = tmp_path / "cases.json", tmp_path / "out.json"
    cases_file.write_text(json.dumps(cases))
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent), RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(HERE / "rank_worker.py"), str(out_file), str(cases_file)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errors = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=300)
            if p.returncode:
                errors.append(err[-3000:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert not errors, "\n".join(errors)
    return json.loads(out_file.read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return _run_ranks(tmp_path_factory.mktemp("ranks"), CASES)


@pytest.mark.parametrize("world", [2, 3])
def test_one_image_across_ranks_equals_one_process(report, world):
    results = [r for r in report["results"] if r["case"]["world"] == world]
    assert len(results) == len([c for c in CASES if c["world"] == world])
    for r in results:
        assert r["mean_abs"] > 0.05, r  # a real image, not zeros
        assert r["max_abs"] <= TOLERANCE, r
    oom = [r for r in results if "oom_sizes" in r]
    assert oom
    for r in oom:
        assert r["oom_sizes"] == r["case"]["oom_expect"], r


def test_bytes_sent_per_evaluation_are_what_the_planner_says(report):
    # one block column's K/V of every layer per boundary and evaluation
    per_eval = report["planned_boundary_bytes"]
    sent = [b[0] for b in report["bytes"]]
    received = [b[1] for b in report["bytes"]]
    assert per_eval and sent[:-1] == [b * report["evaluations"] for b in per_eval] and sent[-1] == 0
    assert received[1:] == sent[:-1] and received[0] == 0
    assert "rank 2" in report["describe"] and "speed-up" in report["describe"]


def test_bands_cover_the_grid_in_order():
    assert split_bands((3, 5), "row-major", 2) == [BlockRect(0, 3, 0, 3), BlockRect(0, 3, 3, 5)]
    assert split_bands((3, 5), "row-major", 2, ALONG) == [BlockRect(0, 2, 0, 5), BlockRect(2, 3, 0, 5)]
    assert split_bands((2, 5), "column-major", 3, ACROSS, [1, 1]) == [BlockRect(0, 1, 0, 5), BlockRect(1, 2, 0, 5)]
    with pytest.raises(ValueError, match="add up to the 5 block columns"):
        split_bands((3, 5), "row-major", 2, sizes=[2, 2])


def test_planner_reports_per_rank_memory_bytes_and_speedup():
    config = TINY
    plan = plan_upscale(config, 64, 64, 4, None, block_batch=1, dtype=torch.float32)  # Heun 20: 39 evaluations
    grid = plan.passes[0].grid_rows
    along = plan_ranks(plan, config, 4, split=ALONG, dtype=torch.float32)
    # 8 x 8 blocks, bands of 2 block rows: a rank starts when its neighbour's last row begins, 16 - 7 = 9
    # blocks into that neighbour's evaluation (the N E / (E + N - 1) counts a whole band of fill)
    assert grid == 8 and along.speedup == pytest.approx(4 * 39 * 16 / (39 * 16 + 3 * 9))
    assert 4 * 39 / (39 + 3) < along.speedup < 4
    across = plan_ranks(plan, config, 4, dtype=torch.float32)
    assert across.speedup > along.speedup and across.speedup <= 4
    p = across.passes[0]
    assert p.boundary_bytes == (grid * block_cache_bytes(config, torch.float32),) * 3
    one = plan_ranks(plan, config, 1, dtype=torch.float32).passes[0].peak_bytes[0]
    assert all(peak < one for peak in p.peak_bytes)  # a band's canvases and KV strip are smaller
    text = across.describe()
    assert text.count("estimated peak") == 4 and "per boundary" in text


def test_each_rank_fits_the_budget_with_its_messages_in_flight():
    from uniba.infdit.plan import release_config

    config = release_config()
    plan = plan_upscale(config, 4096, 4096, 4, 16 * 2**30, dtype=torch.bfloat16)  # 16384 px out
    for ranks in (2, 8):
        p = plan_ranks(plan, config, ranks, dtype=torch.bfloat16).passes[0]
        assert max(p.peak_bytes) - plan.weights_bytes <= plan.usable_bytes
        assert p.block_batch[0] <= plan.last.block_batch[0]


# ------------------------------------------------------------------ memory up to 16K (issue 21 item 5)


def test_a_16384_px_output_fits_a_16_gb_card_in_bf16():
    from uniba.infdit.plan import release_config

    plan = plan_upscale(release_config(), 4096, 4096, 4, 16 * 2**30, dtype=torch.bfloat16)
    assert plan.fits and plan.peak_bytes <= 16 * 2**30 * 0.9
    last = plan.last
    assert (last.offload_cache, last.keep_lr_maps, last.state_on_host) == (True, False, True)
    assert "LR maps per batch" in plan.describe() and "in host RAM" in plan.describe()


def test_the_planner_frees_the_largest_area_sized_part_first():
    from uniba.infdit.plan import RUNGS, release_config

    config = release_config()
    seen = []
    for gib in (64, 24, 16, 12, 8, 6):
        last = plan_upscale(config, 2048, 2048, 4, gib * 2**30, dtype=torch.bfloat16, block_batch=1).last
        seen.append((last.offload_cache, last.keep_lr_maps, last.state_on_host))
    assert seen == sorted(seen, key=RUNGS.index) and set(seen) == set(RUNGS)


@pytest.mark.parametrize("rung", [(False, False, False), (True, False, True)])
def test_every_rung_gives_the_same_image(rung):
    import dataclasses

    from tiny_infdit import load_tiny_infdit

    from uniba.infdit import upscale
    from uniba.infdit.sampling import resolve_sampling

    model = load_tiny_infdit(TINY, seed=3)
    lr = torch.rand(1, 4, 24, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1  # with alpha
    plan = plan_upscale(TINY, 24, 40, 4, None, sampling=resolve_sampling(steps=2), block_batch=2,
                        dtype=model.dtype)
    assert (plan.last.offload_cache, plan.last.keep_lr_maps, plan.last.state_on_host) == (False, True, False)
    other = dataclasses.replace(plan, passes=tuple(dataclasses.replace(
        p, offload_cache=rung[0], keep_lr_maps=rung[1], state_on_host=rung[2]) for p in plan.passes))
    assert (upscale(model, lr, other, seed=3) - upscale(model, lr, plan, seed=3)).abs().max().item() <= 1e-6


def test_torchrun_splits_a_single_input_across_its_ranks_with_the_same_output(tmp_path):
    """`uniba upscale` under torchrun with one input: no flag, both ranks work on it, rank 0 prints the
    per-rank plan first and writes the same image as one process."""
    import numpy as np
    from PIL import Image
    from tiny_infdit import write_tiny_infdit

    from uniba.cli import main

    model = write_tiny_infdit(tmp_path, "model.safetensors")
    src = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(3).random((24, 32, 3)) * 255).astype("uint8")).save(src)
    run = ["--model", str(model), "--steps", "2", "--block-batch", "1", "--seed", "4", "--sampler", "euler_ancestral"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["upscale", str(src), str(tmp_path / "one.png"), *run]) == 0
    finally:
        torch.set_num_threads(threads)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "--monitor-interval", "0.1", "-m", "uniba", "upscale", str(src), str(tmp_path / "two.png"),
                           *run], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "one image across 2 ranks" in done.stderr and "rank 1: blocks" in done.stderr
    assert "upscaled 1 image" in done.stdout and "each split across 2 processes" in done.stdout
    one = np.asarray(Image.open(tmp_path / "one.png"), dtype=np.int16)
    two = np.asarray(Image.open(tmp_path / "two.png"), dtype=np.int16)
    assert one.shape == two.shape == (96, 128, 3) and np.abs(one - two).max() == 0


def test_plan_command_reports_the_ranks_before_any_run(capsys):
    from uniba.cli import main

    assert main(["plan", "infdit", "--size", "4096x4096", "--vram", "16GB", "--ranks", "2"]) == 0
    out = capsys.readouterr().out
    assert "one image across 2 ranks" in out and "4.38 GiB per boundary" in out
    assert out.count("estimated peak") == 3  # the one-process plan and each rank

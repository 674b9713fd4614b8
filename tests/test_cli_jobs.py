"""``uniba upscale`` with several inputs (a folder, a glob, a frame pattern), on one process and under torchrun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_infdit import write_tiny_infdit

from uniba.cli import main
from uniba.jobs import JobError, expand_inputs, is_many

REPO = Path(__file__).resolve().parents[1]
SIZES = [(24, 24), (16, 40), (24, 16), (8, 8), (32, 24), (16, 16), (24, 32), (16, 24), (24, 24), (8, 16), (16, 8),
         (24, 40)]
# one Heun step too few for the race below: 3 steps (5 evaluations) of single blocks keep each image busy
RUN = ["--steps", "3", "--block-batch", "1", "--seed", "5"]


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("job")
    write_tiny_infdit(root, "model.safetensors")
    (root / "frames").mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(root / "frames" / f"f_{i:04d}.png")
    (root / "frames" / "f_9999.png").write_bytes(b"not an image")  # one broken frame: reported, the rest go on
    return root


@pytest.fixture(scope="module")
def reference(frames) -> dict[str, bytes]:
    """The one-process run: what every multi-process run must reproduce byte for byte."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker runs (OMP_NUM_THREADS=1)
    try:
        out = frames / "one_process"
        assert main(["upscale", str(frames / "frames"), str(out), "--model", str(frames / "model.safetensors"),
                     *RUN]) == 1  # the broken frame fails the command, after the others are written
    finally:
        torch.set_num_threads(threads)
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_folder_glob_and_frame_patterns_name_the_same_inputs(frames) -> None:
    folder = expand_inputs(str(frames / "frames"), (".png",))
    assert [p.name for p in folder] == [f"f_{i:04d}.png" for i in range(len(SIZES))] + ["f_9999.png"]
    assert expand_inputs(str(frames / "frames" / "f_*.png"), (".png",)) == folder
    assert expand_inputs(str(frames / "frames" / "f_%04d.png"), (".png",)) == folder
    assert expand_inputs(str(frames / "frames" / "f_####.png"), (".png",)) == folder
    assert is_many(str(frames / "frames")) and not is_many(str(frames / "frames" / "f_0001.png"))
    odd = frames / "shot[1]_####.png"  # an existing file whose name looks like a pattern is one input
    odd.write_bytes((frames / "frames" / "f_0001.png").read_bytes())
    assert not is_many(str(odd)) and expand_inputs(str(odd), (".png",)) == [odd]
    with pytest.raises(JobError, match=r"f_%03d\.png: no file in .* matches this frame pattern"):
        expand_inputs(str(frames / "frames" / "f_%03d.png"), (".png",))


def test_one_process_job_skips_complete_outputs_and_reports_failures(frames, reference, capsys, one_thread) -> None:
    assert sorted(reference) == [f"f_{i:04d}.png" for i in range(len(SIZES))]
    out = frames / "rerun"
    out.mkdir()
    (out / "f_0003.png").write_bytes(reference["f_0003.png"])
    (out / "f_0007.png").write_bytes(b"someone else's file")  # never replaced without --overwrite
    capsys.readouterr()
    code = main(["upscale", str(frames / "frames" / "f_%04d.png"), str(out), "--model",
                 str(frames / "model.safetensors"), *RUN])
    captured = capsys.readouterr()
    assert code == 1 and "skipped 2 existing outputs" in captured.out
    assert "failed: input image " in captured.err and "f_9999.png: is not an image file" in captured.err
    assert (out / "f_0007.png").read_bytes() == b"someone else's file"
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "f_0007.png"} == \
        {k: v for k, v in reference.items() if k != "f_0007.png"}


def test_job_refuses_outputs_that_would_collide_or_replace_an_input(frames, capsys) -> None:
    mixed = frames / "mixed"
    mixed.mkdir()
    Image.new("RGB", (8, 8)).save(mixed / "a.png")
    Image.new("RGB", (8, 8)).save(mixed / "a.jpg")
    assert main(["upscale", str(mixed), str(frames / "o"), "--model", str(frames / "model.safetensors")]) == 2
    assert "both" in capsys.readouterr().err
    assert main(["upscale", str(mixed / "*.png"), str(mixed), "--model", str(frames / "model.safetensors")]) == 2
    assert "is the input" in capsys.readouterr().err
    assert main(["upscale", str(mixed), str(mixed / "a.png"), "--model", str(frames / "model.safetensors")]) == 2
    assert "several inputs need an output folder" in capsys.readouterr().err


def _torchrun(nproc: int, frames: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--monitor-interval", "0.1",
         "-m", "uniba", "upscale", str(frames / "frames"), str(out), "--model", str(frames / "model.safetensors"),
         *RUN], cwd=frames, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_torchrun_ranks_share_the_queue_and_a_killed_rank_leaves_nothing_partial(frames, reference) -> None:
    import psutil

    out = frames / "ranks"
    job = _torchrun(3, frames, out)
    try:
        deadline = time.monotonic() + 60
        while not (out.is_dir() and any(p.suffix == ".png" for p in out.iterdir())):
            assert job.poll() is None, job.communicate()
            assert time.monotonic() < deadline, "no output within 60 s"
            time.sleep(0.01)
        workers = psutil.Process(job.pid).children(recursive=True)
        assert len(workers) >= 3, workers
        os.kill(workers[-1].pid, signal.SIGKILL)  # a rank dies mid-job; torchrun stops the others
        _, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0, err[-2000:]
    first = sorted(p.name for p in out.iterdir())
    assert 0 < len(first) < len(reference) and all(n.endswith(".png") and not n.startswith(".") for n in first), first
    assert all((out / n).read_bytes() == reference[n] for n in first)  # what is there is complete

    rerun = _torchrun(2, frames, out)
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode != 0 and "f_9999.png: is not an image file" in stderr  # the broken frame, reported
    assert f"skipped {len(first)} existing output" in stdout
    # both ranks took inputs from the shared queue, and together exactly the missing ones
    each = [int(n) for n in stdout.split("on 2 processes (")[1].split(" each)")[0].split(", ")]
    assert len(each) == 2 and min(each) > 0 and sum(each) == len(reference) - len(first), stdout
    assert {p.name: p.read_bytes() for p in out.iterdir()} == reference  # byte-identical to one process

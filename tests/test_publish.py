"""Nothing is lost when the pack writes a file (issue 23 item 1): no-replace publishing, unique temporary
names, clean-up on errors, Ctrl-C and SIGTERM, and a full disk reported in one sentence."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_infdit import write_tiny_infdit

import uniba.infdit.loader as infdit_loader
from uniba import publish as publish_module
from uniba.cli import main
from uniba.publish import PublishError, publish

REPO = Path(__file__).resolve().parents[1]


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def release(tmp_path: Path) -> Path:
    return write_tiny_infdit(tmp_path, "mp_rank_00_model_states.pt")


def test_an_output_that_appears_during_the_run_is_not_replaced(tmp_path: Path, release: Path, monkeypatch,
                                                               capsys) -> None:
    out = tmp_path / "out.safetensors"
    load = infdit_loader.load_infdit

    def load_then_another_program_writes(*args, **kwargs):  # the name was free when the run started
        model = load(*args, **kwargs)
        out.write_bytes(b"theirs")
        return model

    monkeypatch.setattr(infdit_loader, "load_infdit", load_then_another_program_writes)
    assert main(["convert-infdit", str(release), str(out)]) == 2
    assert "appeared while this ran" in _error(capsys) and out.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == [release.name, out.name]  # no temporary file left
    assert main(["convert-infdit", str(release), str(out), "--overwrite"]) == 0  # asked for: replaced
    assert out.read_bytes()[8:9] == b"{"


def test_an_unrelated_partial_file_survives_a_conversion(tmp_path: Path, release: Path) -> None:
    out = tmp_path / "out.safetensors"
    unrelated = tmp_path / "out.safetensors.partial"
    unrelated.write_bytes(b"someone else's download")
    assert main(["convert-infdit", str(release), str(out)]) == 0
    assert unrelated.read_bytes() == b"someone else's download" and out.read_bytes()[8:9] == b"{"


# A conversion whose safetensors writer stops half-way (after announcing it), so a signal lands mid-write.
_SLOW_WRITER = """
import sys, time
import safetensors.torch
def slow(tensors, filename, metadata=None):
    with open(filename, "wb") as fh:
        fh.write(b"half a file")
    print("writing", flush=True)
    time.sleep(60)
safetensors.torch.save_file = slow
from uniba.cli import main
sys.exit(main(["convert-infdit", sys.argv[1], sys.argv[2]]))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_a_signal_during_a_write_leaves_nothing_behind(tmp_path: Path, release: Path, signum: int) -> None:
    out = tmp_path / "out.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(release), str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert any(p.name.endswith(".partial") for p in tmp_path.iterdir())  # the write is under way
        proc.send_signal(signum)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode in (-signum, 130), proc.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == [release.name]


_FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
from uniba.cli import main
sys.exit(main(["convert-infdit", sys.argv[1], sys.argv[2]]))
"""


def test_a_full_disk_during_conversion_is_one_sentence(tmp_path: Path, release: Path) -> None:
    out = tmp_path / "out.safetensors"
    done = subprocess.run([sys.executable, "-c", _FULL_DISK, str(release), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"{out}: could not be written" in lines[0] and "nothing was left behind" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [release.name]


@pytest.mark.parametrize("mechanism", ["renameat2", "link", "reserved name"])
def test_every_no_replace_mechanism_refuses_a_taken_name(tmp_path: Path, monkeypatch, mechanism: str) -> None:
    if mechanism != "renameat2":
        monkeypatch.setattr(publish_module, "_libc_renameat2", lambda: None)
    if mechanism == "reserved name":
        def no_links(src, dst):  # noqa: ANN001, ANN202 - FAT and some network shares
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(publish_module.os, "link", no_links)
    target = tmp_path / "result.png"

    def write_while_someone_takes_the_name(tmp: Path) -> None:
        tmp.write_bytes(b"ours")
        target.write_bytes(b"theirs")

    with pytest.raises(PublishError, match="result.png: appeared while this ran.*--overwrite"):
        publish(target, write_while_someone_takes_the_name)
    assert target.read_bytes() == b"theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["result.png"]
    fresh = tmp_path / "fresh.png"
    assert publish(fresh, lambda tmp: tmp.write_bytes(b"ours")) == fresh and fresh.read_bytes() == b"ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.png", "result.png"]

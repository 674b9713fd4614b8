"""Command line safety: no data loss, every argument checked before work, one ``error:`` line, no traceback."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_sana import write_tiny_sana_dit

from uniba.cli import main
from uniba.cli_io import (
    SAFETENSORS_FORMATS,
    CliError,
    input_file,
    output_file,
    read_image,
    resolve_device,
    write_image,
)
from uniba.guards import NonFiniteError
from uniba.publish import PublishError, publish

REPO = Path(__file__).resolve().parents[1]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def sana_file(tmp_path: Path) -> Path:
    return write_tiny_sana_dit(tmp_path, "tiny.safetensors")


# --------------------------------------------------------------------------- no data loss (issue 11 item 1)

def test_convert_sana_refuses_to_write_over_its_input(tmp_path: Path, sana_file: Path, capsys) -> None:
    before = sana_file.read_bytes()
    assert main(["convert-sana", str(sana_file), str(sana_file), "--dtype", "fp16", "--overwrite"]) == 2
    assert "is the input file" in _error(capsys)
    link = tmp_path / "link.safetensors"
    link.symlink_to(sana_file)
    assert main(["convert-sana", str(sana_file), str(link), "--dtype", "fp16", "--overwrite"]) == 2
    assert "is the input file" in _error(capsys)
    hard = tmp_path / "hard.safetensors"
    os.link(sana_file, hard)
    assert main(["convert-sana", str(hard), str(sana_file), "--overwrite"]) == 2
    assert "is the input file" in _error(capsys)
    assert sana_file.read_bytes() == before


def test_existing_output_needs_overwrite_and_extension_decides_format(tmp_path: Path, sana_file: Path,
                                                                      capsys) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    assert main(["convert-sana", str(sana_file), str(out)]) == 2
    assert "already exists; pass --overwrite" in _error(capsys)
    assert out.read_bytes() == b"precious"
    assert main(["convert-sana", str(sana_file), str(tmp_path / "out.pt")]) == 2
    assert "the extension '.pt' is not one this command writes; it writes safetensors" in _error(capsys)
    assert not (tmp_path / "out.pt").exists()
    assert main(["convert-sana", str(sana_file), str(out), "--overwrite"]) == 0
    assert out.read_bytes()[8:9] == b"{"  # a safetensors header now
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_publish_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "result.png"
    target.write_bytes(b"old")

    def failing(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(PublishError, match="result.png: could not be written .the disk is full.*unchanged.*Free"):
        publish(target, failing, overwrite=True)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.png"]
    publish(target, lambda tmp: tmp.write_bytes(b"new"), overwrite=True)
    assert target.read_bytes() == b"new"


# --------------------------------------------------------------------------- validate first (issue 11 item 2)

@pytest.mark.parametrize("where", ["folder", "missing_folder", "proc", "sys"])
def test_unusable_output_locations(tmp_path: Path, where: str) -> None:
    target = {"folder": tmp_path, "missing_folder": tmp_path / "nope" / "o.safetensors",
              "proc": Path("/proc/self/o.safetensors"), "sys": Path("/sys/o.safetensors")}[where]
    if where in ("proc", "sys") and not target.parent.is_dir():
        pytest.skip(f"no {target.parent}")
    expected = {"folder": "is a folder", "missing_folder": "does not exist; create it first",
                "proc": "cannot write into the folder", "sys": "cannot write into the folder"}[where]
    with pytest.raises(CliError, match=expected):
        output_file(target, formats=SAFETENSORS_FORMATS)


def test_output_symlink_loop_and_device(tmp_path: Path) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(CliError, match="symbolic link loop"):
        output_file(a, formats={".png": "PNG"})
    with pytest.raises(CliError, match="not a regular file"):
        output_file("/dev/null", formats={".png": "PNG"})
    dev = tmp_path / "null.png"
    dev.symlink_to("/dev/null")
    with pytest.raises(CliError, match="not a regular file"):
        output_file(dev, formats={".png": "PNG"}, overwrite=True)


def test_device_cuda_on_cpu_only_torch_is_one_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    with pytest.raises(CliError, match="--device cuda: CUDA is not available in this torch"):
        resolve_device("cuda")
    with pytest.raises(CliError, match="is not a device name"):
        resolve_device("gpu0")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")


def test_image_inputs(tmp_path: Path) -> None:
    from PIL import Image

    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    with pytest.raises(CliError, match="is not an image file"):
        read_image(not_image)
    with pytest.raises(CliError, match="is a folder"):
        read_image(tmp_path)
    truncated = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(CliError, match="cannot be decoded|not an image"):
        read_image(truncated)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 6), (255, 0, 0, 128)).save(rgba)
    image = read_image(rgba)
    assert image.shape == (1, 4, 6, 8) and image.min() >= -1 and image.max() <= 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_fifo_input_image_is_refused_without_opening(tmp_path: Path) -> None:
    fifo = tmp_path / "in.png"
    os.mkfifo(fifo)
    with pytest.raises(CliError, match="named pipe"):
        input_file(fifo, "input image")  # opening it would block: the check is on stat only


def test_rgba_to_jpeg_drops_alpha_with_a_warning(tmp_path: Path, caplog) -> None:
    from PIL import Image

    from uniba.cli_io import alpha_dropped

    with caplog.at_level(logging.WARNING):
        assert alpha_dropped(4, tmp_path / "o.jpg")
    assert "transparency of the input is dropped" in caplog.text
    assert not alpha_dropped(4, tmp_path / "o.png") and not alpha_dropped(3, tmp_path / "o.jpg")
    image = torch.zeros(1, 4, 4, 4)
    write_image(image, tmp_path / "o.jpg")
    with Image.open(tmp_path / "o.jpg") as img:
        assert img.mode == "RGB"


def test_nan_image_is_never_saved_as_black(tmp_path: Path) -> None:
    image = torch.zeros(1, 3, 4, 4)
    image[0, 1, 2, 2] = float("nan")
    target = tmp_path / "o.png"
    with pytest.raises(NonFiniteError, match="output image: 1 of 48 values are NaN"):
        write_image(image, target)
    assert not list(tmp_path.iterdir())


def test_argument_types_refuse_nonsense(capsys) -> None:
    for argv in (["hidiffusion-plan", "--steps", "-3"], ["hidiffusion-plan", "--size", "0x0"],
                 ["hidiffusion-plan", "--steps", "x"], ["hidiffusion-plan", "--t1", "nan"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "error: argument" in err and "Traceback" not in err


# --------------------------------------------------------------------------- special files through the CLI

def test_special_and_missing_inputs_are_one_error_line(tmp_path: Path, capsys) -> None:
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    assert main(["sana-info", str(loop)]) == 2
    line = _error(capsys)
    assert "symbolic link loop" in line and "does not exist" not in line
    assert main(["sana-info", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in _error(capsys)
    if Path("/dev/zero").exists():
        zero = tmp_path / "zero.safetensors"
        zero.symlink_to("/dev/zero")
        assert main(["convert-sana", str(zero), str(tmp_path / "o.safetensors")]) == 2
        assert "character device" in _error(capsys)


def test_no_traceback_reaches_the_user_in_a_real_process(tmp_path: Path) -> None:
    """The same path as a user's shell: a subprocess with a bad argument prints one line, exit 2."""
    out = tmp_path / "x.pt"
    result = subprocess.run([sys.executable, "-m", "uniba", "convert-sana", str(tmp_path), str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and "extension '.pt'" in result.stderr

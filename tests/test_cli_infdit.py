"""Inf-DiT command line: upscale/convert never lose data, arguments checked first, plan tells the truth."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_infdit import TINY, write_tiny_infdit

from uniba.cli import main
from uniba.infdit.plan import plan_upscale, release_config
from uniba.memory import GIB


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    model = write_tiny_infdit(tmp_path, "tiny.safetensors")
    image = tmp_path / "in.png"
    Image.new("RGB", (16, 16), (40, 120, 200)).save(image)
    return {"model": model, "image": image, "dir": tmp_path}


def _upscale(files: dict[str, Path], output: Path | str, *extra: str) -> int:
    return main(["upscale", str(files["image"]), str(output), "--model", str(files["model"]), "--steps", "2",
                 "--vram", "4GB", *extra])


def test_upscale_refuses_to_overwrite_its_input_before_any_work(files, capsys) -> None:
    before = files["image"].read_bytes()
    start = time.perf_counter()
    assert _upscale(files, files["image"], "--overwrite") == 2
    assert "is the input file" in _error(capsys)
    assert _upscale(files, files["model"].with_suffix(".png")) == 0  # a fresh name works
    capsys.readouterr()
    assert _upscale(files, files["model"].with_suffix(".png")) == 2
    assert "already exists; pass --overwrite" in _error(capsys)
    assert files["image"].read_bytes() == before
    assert time.perf_counter() - start < 60
    assert not [p for p in files["dir"].iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize(("extra", "output", "expected"), [
    (("--device", "cuda"), "o.png", "CUDA is not available"),
    ((), "o.gif", "the extension '.gif' is not one this command writes"),
    ((), "", "is a folder"),
    ((), "nope/o.png", "does not exist; create it first"),
])
def test_bad_arguments_are_one_error_before_the_model_loads(files, capsys, monkeypatch, extra, output,
                                                            expected) -> None:
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("CUDA present")
    import uniba.infdit.loader as loader

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load before the arguments are checked")

    monkeypatch.setattr(loader, "load_infdit", no_load)
    target = files["dir"] / output if output else files["dir"]
    assert _upscale(files, target, *extra) == 2
    assert expected in _error(capsys)


def test_argparse_types(files, capsys) -> None:
    for extra in (("--block-batch", "x"), ("--steps", "-3"), ("--vram", "lots"), ("--seed", "-1")):
        with pytest.raises(SystemExit) as exit_info:
            _upscale(files, files["dir"] / "o.png", *extra)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "error: argument" in err and "Traceback" not in err


def test_input_that_is_not_an_image(files, capsys) -> None:
    assert main(["upscale", str(files["model"]), str(files["dir"] / "o.png"), "--model", str(files["model"])]) == 2
    assert "is not an image file" in _error(capsys)


def test_rgba_to_jpeg_drops_alpha_with_a_warning(files, caplog) -> None:
    rgba = files["dir"] / "rgba.png"
    Image.new("RGBA", (16, 16), (200, 10, 10, 100)).save(rgba)
    files = {**files, "image": rgba}
    assert _upscale(files, files["dir"] / "o.jpg") == 0
    assert "transparency of the input is dropped" in caplog.text
    with Image.open(files["dir"] / "o.jpg") as img:
        assert img.mode == "RGB" and img.size == (64, 64)


def test_model_without_clip_tower_names_the_fix_for_cli_and_nodes(files, capsys) -> None:
    from tiny_infdit import plan_and_upscale

    from uniba.infdit.upscale import NO_CLIP_TOWER

    bare = write_tiny_infdit(files["dir"], "bare.safetensors", config=TINY.replace(clip=None))
    files = {**files, "model": bare}
    assert _upscale(files, files["dir"] / "o.png") == 2
    line = _error(capsys)
    assert "--clip" in line and "convert-infdit" in line and not (files["dir"] / "o.png").exists()
    from uniba.infdit import load_infdit

    with pytest.raises(ValueError, match="in ComfyUI first run python -m uniba convert-infdit .* --clip"):
        plan_and_upscale(load_infdit(bare), torch.zeros(1, 3, 16, 16), steps=1)
    assert "--clip" in NO_CLIP_TOWER


def test_convert_infdit_never_replaces_its_input(files, capsys) -> None:
    model = files["model"]
    before = model.read_bytes()
    assert main(["convert-infdit", str(model), str(model), "--dtype", "fp16", "--overwrite"]) == 2
    assert "is the input file" in _error(capsys)
    assert main(["convert-infdit", str(model), str(files["dir"] / "o.pt")]) == 2
    assert "extension '.pt'" in _error(capsys)
    assert model.read_bytes() == before


def test_upscaled_nan_is_an_error_not_a_black_image(files, capsys, monkeypatch) -> None:
    import importlib

    up = importlib.import_module("uniba.infdit.upscale")  # the package re-exports a function of that name
    real = up.BlockwiseDenoiser.__call__

    def poisoned(self, x, sigma, **kwargs):
        out = real(self, x, sigma, **kwargs)
        return out * float("nan") if float(sigma.flatten()[0]) < 1.0 else out

    monkeypatch.setattr(up.BlockwiseDenoiser, "__call__", poisoned)
    out = files["dir"] / "o.png"
    assert _upscale(files, out) == 2
    line = _error(capsys)
    assert "the Inf-DiT sampler produced non-finite values at step 2 of 2" in line
    assert not out.exists()


# --------------------------------------------------------------------------- plan (issue 16 item 4)

def test_plan_model_missing_or_not_a_checkpoint_is_an_error(tmp_path: Path, capsys) -> None:
    assert main(["plan", "infdit", "--size", "4096x4096", "--model", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in _error(capsys)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    assert main(["plan", "infdit", "--size", "4096x4096", "--model", str(junk)]) == 2
    assert "neither a torch zip checkpoint nor a pickle" in _error(capsys)


def test_plan_pads_a_size_that_is_not_a_multiple_of_the_scale(capsys) -> None:
    assert main(["plan", "infdit", "--size", "4097x4097"]) == 0
    out = capsys.readouterr().out
    assert "planned for an input of 1025x1025 px (4100x4100 px out)" in out
    assert "output 4100x4100 px in 1 pass:" in out


def test_plan_text_warns_about_rope_wrap_and_says_what_to_change(capsys) -> None:
    assert main(["plan", "infdit", "--input", "2048x2048", "--scale", "4", "--vram", "1GB"]) == 1
    out = capsys.readouterr().out
    assert "RoPE positions wrap around" in out
    assert "DOES NOT FIT" in out and "to fit: even one block with the cache offloaded needs" in out
    assert "use a smaller scale or a smaller input" in out
    assert main(["plan", "infdit", "--input", "1024x1024", "--vram", "12GB", "--json"]) in (0, 1)
    data = json.loads(capsys.readouterr().out)
    assert data["rope_wraps"] is False and data["rope_max_side_px"] == 4096


def test_plan_that_fits_with_a_smaller_batch_says_so() -> None:
    plan = plan_upscale(release_config(), 1024, 1024, 4, 12 * GIB, block_batch=8, offload_cache="off")
    assert not plan.fits
    text = plan.describe()
    assert "to fit: a smaller block batch" in text and "offload_cache on" in text


def test_readout_explains_a_peak_above_the_free_figure() -> None:
    """The node measures free memory with the weights loaded: a peak above 'free' can fit."""
    plan = plan_upscale(release_config(), 512, 512, 4, 3 * GIB, weights_resident=True)
    assert plan.fits and plan.peak_bytes > plan.free_bytes
    text = plan.describe()
    assert "(already loaded, so not part of the 3.00 GiB free)" in text and "the work fits" in text
    assert "1 batches" not in text and "1 passes" not in text


def test_plan_dict_carries_the_description_for_the_route_and_readout() -> None:
    plan = plan_upscale(release_config(), 512, 512, 4, 3 * GIB, weights_resident=True)
    data = plan.to_dict()
    assert data["description"] == plan.describe()
    json.dumps(data)  # the route sends it as JSON


def test_absurd_sizes_are_refused_at_once() -> None:
    """Run in a daemon thread with a timeout: a regression must fail, not hang the suite."""
    import threading

    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            plan_upscale(release_config(), 25_000_000, 25_000_000, 4, GIB)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "planning a 10^8 px side did not return within 20 s"
    assert isinstance(outcome[0], ValueError) and "Inf-DiT plans at most 65536 px a side" in str(outcome[0])

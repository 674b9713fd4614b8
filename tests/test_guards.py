"""Checks where data enters the engine: special files, NaN/inf, Sana inputs, latent memory, config metadata."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_infdit import TINY, write_tiny_infdit
from tiny_sana import tiny_sana_state_dict, to_original_format, write_tiny_sana_dit

from uniba import guards
from uniba.checkpoint import CheckpointError, check_file, read_safetensors_metadata, read_state_dict, with_article
from uniba.guards import NonFiniteError, WorkTooLarge, check_denoised_finite, check_finite, finite_denoiser
from uniba.memory import GIB
from uniba.sana.checks import (
    check_batch_matches,
    check_context_mask,
    check_sana_conditioning,
    check_sana_conditioning_input,
    check_sana_empty_latent,
    check_sana_latent,
    check_sana_memory,
    check_sana_sampling,
    sana_latent_bytes,
    sana_sampling_bytes,
)

# --------------------------------------------------------------------------- special files (issue 11 item 3)


def _read_with_timeout(path: Path, seconds: float = 20.0) -> BaseException | None:
    """Call read_state_dict in a daemon thread; a hang fails the test instead of hanging the suite."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            read_state_dict(path)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if path.is_fifo() if hasattr(path, "is_fifo") else False:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # a writer releases the blocked reader
            os.close(fd)
        pytest.fail(f"reading {path} did not return within {seconds} s")
    return outcome[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_checkpoint_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    exc = _read_with_timeout(fifo)
    assert isinstance(exc, CheckpointError)
    assert "named pipe (FIFO)" in str(exc) and str(fifo) in str(exc)
    pt = tmp_path / "model.pt"
    os.mkfifo(pt)
    assert "named pipe" in str(_read_with_timeout(pt))


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_character_device_through_a_symlink_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "model.pt"
    link.symlink_to("/dev/zero")
    exc = _read_with_timeout(link)
    assert isinstance(exc, CheckpointError) and "character device" in str(exc)
    with pytest.raises(CheckpointError, match="character device"):
        read_safetensors_metadata(tmp_path / "model.pt")


def test_symlink_loop_and_dangling_link_are_not_called_missing(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(CheckpointError, match="symbolic link loop") as err:
        read_state_dict(a)
    assert "does not exist" not in str(err.value)
    dangling = tmp_path / "c.safetensors"
    dangling.symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(CheckpointError, match="symbolic link to .*gone.safetensors.*which does not exist"):
        read_state_dict(dangling)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "missing.safetensors")


def test_directory_and_empty_file(tmp_path: Path) -> None:
    folder = tmp_path / "model.safetensors"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="is a folder, not a file"):
        check_file(folder)
    empty = tmp_path / "empty.pt"
    empty.touch()
    with pytest.raises(CheckpointError, match=r"empty \(0 bytes\)"):
        read_state_dict(empty)


def test_header_length_past_the_end_of_the_file_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "liar.safetensors"
    # claims a 50 MB header in a 20-byte file: the reader must not try to read past the size
    path.write_bytes((50_000_000).to_bytes(8, "little") + b"{}" + b" " * 10)
    with pytest.raises(CheckpointError, match="does not fit in a file of 20 bytes"):
        read_safetensors_metadata(path)


# --------------------------------------------------------------------------- NaN / inf (issue 11 item 6)

def test_nan_weight_names_file_and_tensor(tmp_path: Path) -> None:
    state = {"a.weight": torch.ones(4, 4), "b.bias": torch.zeros(3)}
    state["b.bias"][1] = float("nan")
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"m.safetensors: tensor 'b.bias' holds NaN") as err:
        read_state_dict(path)
    assert "1 of 3 values" in str(err.value) and "(1,)" in str(err.value)
    state["b.bias"][1] = float("inf")
    torch.save({"state_dict": state}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="tensor 'b.bias' holds NaN or infinite"):
        read_state_dict(tmp_path / "m.pt")


def test_nan_in_a_real_model_file_is_refused_by_the_loader(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from uniba.infdit import load_infdit

    path = write_tiny_infdit(tmp_path)
    state = load_file(str(path))
    key = "transformer.layers.1.attention.dense.weight"
    state[key][0, 0] = float("nan")
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=f"tensor '{key}' holds NaN"):
        load_infdit(path)


def test_check_finite_names_where_and_passes_finite_through() -> None:
    good = torch.randn(2, 3)
    assert check_finite(good, "x") is good
    assert check_finite(torch.arange(5), "ints") is not None  # integer tensors cannot hold NaN
    bad = torch.zeros(1, 3, 4, 4)
    bad[0, 2, 3, 1] = float("-inf")
    with pytest.raises(NonFiniteError, match=r"input image: 1 of 48 values .*infinite at index \(0, 2, 3, 1\)"):
        check_finite(bad, "input image")


def test_finite_denoiser_names_the_step_the_sampler_produced_nan_at() -> None:
    from uniba.sana.sampling import flow_sigmas, sample_flow_euler

    sigmas = flow_sigmas(6, 3.0, kind="euler")
    calls = []

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        calls.append(float(sigma[0]))
        out = x * 0.5
        return out / 0 if len(calls) == 4 else out  # 0/0 and x/0: NaN and inf from the 4th call on

    with pytest.raises(NonFiniteError, match=r"Flow-Euler produced non-finite values at step 4 of 6"):
        sample_flow_euler(finite_denoiser(denoiser, sigmas, "Flow-Euler"), torch.randn(1, 4, 2, 2), sigmas)
    # for samplers a host runs (stock KSampler), the model's output is checked at each call by its sigma
    ok = torch.zeros(1, 4, 2, 2)
    assert check_denoised_finite(ok, torch.tensor([0.9]), "the Sana DiT") is ok
    with pytest.raises(NonFiniteError, match=r"the Sana DiT produced non-finite values at sigma 0.5: .* float32"):
        check_denoised_finite(torch.full((1, 4, 2, 2), float("nan")), torch.tensor([0.5, 0.5]), "the Sana DiT")


# --------------------------------------------------------------------------- Sana inputs (issue 11 item 8)

def test_sd_latent_into_sana_names_the_input() -> None:
    with pytest.raises(ValueError, match=r"latent_image: expected a Sana latent .* got \(1, 4, 128, 128\) "
                                         r"\(an SD/SDXL latent\?\)"):
        check_sana_latent(torch.zeros(1, 4, 128, 128))
    with pytest.raises(ValueError, match="samples: expected a Sana latent"):
        check_sana_latent(torch.zeros(32, 32), where="samples")
    nan = torch.zeros(1, 32, 4, 4)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"latent_image \(latent\)"):
        check_sana_latent(nan)
    assert check_sana_latent(torch.zeros(2, 32, 4, 4)).shape[0] == 2


@pytest.mark.parametrize("width", [768, 2048])
def test_sd_clip_conditioning_into_sana_is_refused(width: int) -> None:
    with pytest.raises(ValueError, match=rf"positive: the text embeddings are {width} wide, the width of SD.* CLIP "
                                         r"\(CLIPTextEncode\), but this Sana DiT's caption projection takes 2304"):
        check_sana_conditioning(torch.zeros(1, 77, width))
    assert check_sana_conditioning(torch.zeros(1, 300, 2304)).shape == (1, 300, 2304)


def test_batch_and_mask_mismatches() -> None:
    check_batch_matches(4, 1)
    check_batch_matches(4, 4)
    check_batch_matches(4, 2)  # repeated, as ComfyUI repeats conditioning
    with pytest.raises(ValueError, match="negative: holds 3 prompts but latent_image holds 4 latents"):
        check_batch_matches(4, 3, context_input="negative")
    context = torch.zeros(2, 300, 2304)
    assert check_context_mask(context, None) is None
    assert check_context_mask(context, torch.ones(2, 300)).shape == (2, 300)
    with pytest.raises(ValueError, match=r"positive: the attention_mask has shape \(2, 77\).*expected \(2, 300\)"):
        check_context_mask(context, torch.ones(2, 77))


# --------------------------------------------------------------------------- Sana memory (issue 11 item 4)

def test_sana_latent_memory_is_refused_before_allocating() -> None:
    # the example: 16384 px, batch 4096 -> a 137 GB float32 latent
    needed = sana_latent_bytes(4096, 16384 // 32, 16384 // 32)
    assert needed == 4096 * 32 * 512 * 512 * 4
    assert round(needed / 1e9) == 137
    with pytest.raises(WorkTooLarge, match=r"SanaEmptyLatent: 4096 images of 16384x16384 px need at least "
                                           r"128.00 GiB.*of 20.00 GiB free.*batch of 576 or fewer") as err:
        check_sana_memory(needed, 20 * GIB, "SanaEmptyLatent", batch=4096, width_px=16384, height_px=16384)
    assert "1 images" not in str(err.value)
    check_sana_memory(sana_latent_bytes(1, 32, 32), 20 * GIB, "SanaEmptyLatent", batch=1, width_px=1024,
                      height_px=1024)
    check_sana_memory(needed, None, "unknown budget", batch=4096, width_px=16384, height_px=16384)


def test_sana_sampling_estimate_grows_with_tokens_and_cfg() -> None:
    one = sana_sampling_bytes(1, 32, 32, hidden_size=2240)
    assert sana_sampling_bytes(1, 64, 64, hidden_size=2240) == 4 * one
    assert sana_sampling_bytes(1, 32, 32, hidden_size=2240, cfg=False) < one
    # a 4096 px image (128 x 128 latent) with the 1.6B model: several GB of activations
    assert sana_sampling_bytes(1, 128, 128, hidden_size=2240) > 1 * GIB
    with pytest.raises(WorkTooLarge, match=r"SanaSampler: 1 image of 16384x16384 px.*smaller image"):
        check_sana_memory(sana_sampling_bytes(1, 512, 512, hidden_size=2240), 8 * GIB, "SanaSampler",
                          batch=1, width_px=16384, height_px=16384)


# --------------------------------------------------------------------------- config metadata (issue 11 item 8)

def _infdit_with_metadata(tmp_path: Path, text: str) -> Path:
    from uniba.checkpoint import save_safetensors
    from uniba.infdit import load_infdit
    from uniba.infdit.config import METADATA_KEY

    model = load_infdit(write_tiny_infdit(tmp_path))
    path = tmp_path / "converted.safetensors"
    save_safetensors(model.state_dict(), path, metadata={METADATA_KEY: text})
    return path


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: "{not json", "not valid JSON"),
    (lambda d: json.dumps({**d, "num_heads": 0}), "num_heads must be at least 1, got 0"),
    (lambda d: json.dumps({**d, "hidden_size": "32"}), "hidden_size must be a whole number, got '32'"),
    (lambda d: json.dumps({**d, "eps": -1.0}), "eps must be a positive number"),
    (lambda d: json.dumps([1, 2]), "wrong form"),
])
def test_damaged_infdit_metadata_is_a_checkpoint_error_naming_the_file(tmp_path: Path, change, message) -> None:
    from uniba.infdit import load_infdit
    from uniba.infdit.plan import config_for_file

    data = json.loads(TINY.to_json())
    path = _infdit_with_metadata(tmp_path, change(data))
    for read in (load_infdit, config_for_file):
        with pytest.raises(CheckpointError, match=message) as err:
            read(path)
        assert str(err.value).startswith(str(path))


@pytest.mark.parametrize(("change", "message"), [
    ({}, "not valid JSON"),
    ({"cross_heads": 0}, "cross_heads must be at least 1"),
    ({"flow_shift": "3"}, "flow_shift must be a number"),
    ({"pe_interpolation": -2.0}, "pe_interpolation must be a positive number"),
])
def test_damaged_sana_metadata_is_a_checkpoint_error(tmp_path: Path, change: dict, message: str) -> None:
    from uniba.checkpoint import save_safetensors
    from uniba.sana.loader import METADATA_KEY, load_sana

    text = json.dumps({**json.loads(SanaTiny().to_json()), **change}) if change else "{oops"
    path = tmp_path / "sana.safetensors"
    save_safetensors(to_original_format(tiny_sana_state_dict(), SanaTiny()), path, metadata={METADATA_KEY: text})
    with pytest.raises(CheckpointError, match=message) as err:
        load_sana(path)
    assert str(err.value).startswith(str(path))


def SanaTiny():  # noqa: N802 - the tiny config, as in tiny_sana
    from tiny_sana import TINY as SANA_TINY

    return SANA_TINY


def test_validate_config_checks_bools_and_nested_configs() -> None:
    from uniba.guards import validate_config
    from uniba.sana.config import SanaConfig

    with pytest.raises(CheckpointError, match="use_pe must be true or false, got 'yes'"):
        validate_config(SanaConfig(use_pe="yes"), "x.safetensors")
    with pytest.raises(CheckpointError, match="clip: heads must be at least 1"):
        validate_config(TINY.replace(clip=TINY.clip.__class__(heads=0)), "x.safetensors")
    assert validate_config(TINY, None) is TINY


# --------------------------------------------------------------------------- messages (issue 11 item 10)

def test_articles_read_well() -> None:
    assert with_article("Inf-DiT") == "an Inf-DiT"
    assert with_article("unknown model (3 tensors)") == "an unknown model (3 tensors)"
    assert with_article("SDXL checkpoint") == "an SDXL checkpoint"
    assert with_article("UNet (diffusion model only)") == "a UNet (diffusion model only)"
    assert with_article("VAE") == "a VAE"
    assert with_article("Sana DiT") == "a Sana DiT"


def test_unknown_sana_width_names_the_sidecar_file(tmp_path: Path) -> None:
    from uniba.sana.config import SanaConfig
    from uniba.sana.loader import load_sana

    odd = SanaConfig(hidden_size=96, depth=1, cross_heads=4, caption_channels=48)
    path = write_tiny_sana_dit(tmp_path, "my_finetune.safetensors", config=odd)
    # drop the metadata so the head count is unknown
    from safetensors.torch import load_file

    save_file(load_file(str(path)), str(path))
    with pytest.raises(CheckpointError, match=r"which no Sana release uses") as err:
        load_sana(path)
    text = str(err.value)
    assert "'my_finetune.json' beside it" in text and "for every model file there" in text
    (tmp_path / "my_finetune.json").write_text(json.dumps({"_class_name": "SanaTransformer2DModel",
                                                           "num_cross_attention_heads": 4, "num_layers": 1}))
    assert load_sana(path).config.cross_heads == 4


@pytest.mark.parametrize("solver", ["sample_flow_dpm_solver", "sample_flow_euler"])
def test_sana_samplers_stop_at_the_step_that_produced_nan(solver: str) -> None:
    from uniba.sana import sampling

    sigmas = sampling.flow_sigmas(5, 3.0)
    calls = []

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x * float("nan") if len(calls) == 3 else x * 0.5

    with pytest.raises(NonFiniteError, match=r"produced non-finite values at step 3 of 5"):
        getattr(sampling, solver)(denoiser, torch.randn(1, 32, 2, 2), sigmas)
    assert len(calls) == 3  # stopped there, not after decoding the whole run


def test_empty_latent_and_sampling_checks_give_shapes_and_refuse_oversize() -> None:
    assert check_sana_empty_latent(2, 1024, 768, 8 * GIB) == (2, 32, 24, 32)
    with pytest.raises(WorkTooLarge, match="SanaEmptyLatent: 4096 images of 16384x16384 px"):
        check_sana_empty_latent(4096, 16384, 16384, 64 * GIB)
    small = torch.zeros(1, 32, 32, 32)
    check_sana_sampling(small, 8 * GIB, hidden_size=2240)
    with pytest.raises(WorkTooLarge, match=r"SanaSampler: 64 images of 4096x4096 px"):
        check_sana_sampling(torch.zeros(64, 32, 128, 128).expand(64, 32, 128, 128), 24 * GIB, hidden_size=2240)


def test_sharded_folder_checks_each_shard_and_stays_in_its_folder(tmp_path: Path) -> None:
    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, str(folder / "s1.safetensors"))
    save_file({"b": torch.tensor([1.0, float("nan")])}, str(folder / "s2.safetensors"))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"s2.safetensors: tensor 'b' holds NaN"):
        read_state_dict(folder)
    index.write_text(json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside its folder"):
        read_state_dict(folder)


def test_conditioning_input_as_nodes_receive_it() -> None:
    good = [[torch.zeros(1, 300, 2304), {"attention_mask": torch.ones(1, 300)}]]
    check_sana_conditioning_input(good, "positive", latent_batch=4)
    with pytest.raises(ValueError, match=r"negative: the text embeddings are 768 wide"):
        check_sana_conditioning_input([[torch.zeros(1, 77, 768), {"pooled_output": None}]], "negative")
    with pytest.raises(ValueError, match="positive: the attention_mask has shape"):
        check_sana_conditioning_input([[torch.zeros(1, 300, 2304), {"attention_mask": torch.ones(1, 77)}]],
                                      "positive")
    with pytest.raises(ValueError, match="positive: holds 3 prompts but latent_image holds 4 latents"):
        check_sana_conditioning_input([[torch.zeros(3, 300, 2304), {}]], "positive", latent_batch=4)
    with pytest.raises(ValueError, match="positive: expected a CONDITIONING"):
        check_sana_conditioning_input([], "positive")


@pytest.mark.parametrize("text", ["²", "٣", "1e3", "", "--2"])
def test_whole_number_text_is_ascii_digits_only(text: str) -> None:
    """str.isdigit() is True for superscripts (int() then fails with its own error) and other scripts' digits."""
    with pytest.raises(ValueError, match="steps: expected a whole number"):
        guards.check_whole_number(text, "steps")


def test_whole_number_text_accepted() -> None:
    assert [guards.check_whole_number(t, "steps") for t in ("20", " 7 ", "+3")] == [20, 7, 3]

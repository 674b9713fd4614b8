"""Safe checkpoint reading: formats, wrappers, refusal of code-executing pickles, clear errors."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_infdit import deepspeed_model_states

from uniba.checkpoint import (
    CheckpointError,
    check_keys,
    guess_family,
    header_shapes,
    load_model,
    parameters_on_meta,
    read_safetensors_header,
    read_state_dict,
    save_safetensors,
    stored_dtype,
    strip_prefix,
    wrong_family_error,
)


def _state() -> dict[str, torch.Tensor]:
    return {"a.weight": torch.randn(3, 4), "a.bias": torch.randn(3)}


def test_safetensors_round_trip(tmp_path: Path) -> None:
    sd = _state()
    save_file(sd, str(tmp_path / "m.safetensors"))
    loaded = read_state_dict(tmp_path / "m.safetensors")
    assert loaded.keys() == sd.keys()
    assert torch.equal(loaded["a.weight"], sd["a.weight"])


@pytest.mark.parametrize("wrapper", [None, "module", "state_dict"])
def test_pickle_wrappers(tmp_path: Path, wrapper: str | None) -> None:
    sd = _state()
    obj: object = sd if wrapper is None else {wrapper: sd, "global_steps": 10, "dp_world_size": 8}
    torch.save(obj, tmp_path / "m.pt")
    loaded = read_state_dict(tmp_path / "m.pt")
    assert loaded.keys() == sd.keys()


def test_deepspeed_checkpoint_with_namespace_args_is_allowed(tmp_path: Path) -> None:
    sd = _state()
    torch.save({"module": sd, "args": argparse.Namespace(lr=1e-4, bf16=True), "ds_version": "0.9.5"},
               tmp_path / "mp_rank_00_model_states.pt")
    assert read_state_dict(tmp_path / "mp_rank_00_model_states.pt").keys() == sd.keys()


class _Payload:
    """Unpickling this runs os.system; a safe reader must refuse it before it runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zipped", [True, False])
def test_code_executing_pickle_is_refused_and_runs_nothing(tmp_path: Path, zipped: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    if zipped:
        torch.save({"state_dict": _state(), "x": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"x": _Payload(marker)}, protocol=2))
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert str(path) in message and "refused" in message and "nothing in it ran" in message
    assert "system" in message  # names the global it asked for
    assert not marker.exists()


def test_truncated_safetensors(tmp_path: Path) -> None:
    save_file({"w": torch.randn(256, 256)}, str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated or corrupt.*download it again"):
        read_state_dict(tmp_path / "cut.safetensors")


def test_truncated_torch_zip(tmp_path: Path) -> None:
    torch.save({"module": {"w": torch.randn(256, 256)}}, tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt.*download it again"):
        read_state_dict(tmp_path / "cut.pt")


def test_garbage_file(tmp_path: Path) -> None:
    (tmp_path / "junk.pth").write_bytes(b"<html>404 not found</html>")
    with pytest.raises(CheckpointError, match=r"junk\.pth.*neither a torch zip checkpoint nor a pickle"):
        read_state_dict(tmp_path / "junk.pth")


def test_missing_file_and_bad_extension(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="unsupported extension '.gguf'"):
        read_state_dict(tmp_path / "m.gguf")


def test_no_tensors(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "opt.pt")
    with pytest.raises(CheckpointError, match="holds no tensors.*epoch"):
        read_state_dict(tmp_path / "opt.pt")


def test_sharded_folder(tmp_path: Path) -> None:
    import json

    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert sorted(read_state_dict(tmp_path)) == ["a", "b"]
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing the shard 'model-00002-of-00002.safetensors'"):
        read_state_dict(tmp_path)


def test_check_keys_reports_missing_unexpected_and_shapes() -> None:
    expected = {"a.weight": (3, 4), "a.bias": (3,), "b.weight": (2, 2)}
    found = {"a.weight": torch.zeros(4, 3), "a.bias": torch.zeros(3), "c.weight": torch.zeros(1),
             "rope.freqs_cos": torch.zeros(1)}
    with pytest.raises(CheckpointError) as info:
        check_keys(found, expected, path="x.pt", family="Toy", ignore=["rope.*"])
    text = str(info.value)
    assert text.startswith("x.pt: does not match the Toy layout")
    assert "1 missing key(s): b.weight" in text
    assert "1 unexpected key(s): c.weight" in text
    assert "a.weight (expected (3, 4), found (4, 3))" in text
    assert "rope" not in text


class _Toy(torch.nn.Module):
    """A weight from the file and a non-persistent buffer the constructor computes."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)
        self.register_buffer("table", torch.arange(3.0) * 2, persistent=False)


def test_load_model_builds_on_meta_checks_strictly_and_assigns() -> None:
    sd = {"proj.weight": torch.ones(3, 4, dtype=torch.bfloat16), "proj.bias": torch.zeros(3, dtype=torch.bfloat16),
          "legacy.buffer": torch.zeros(5)}
    with pytest.raises(CheckpointError, match="1 unexpected key"):
        load_model(_Toy, sd, path="toy.safetensors", family="Toy", real_buffers=True)
    model = load_model(_Toy, sd, path=None, family="Toy", ignore=["legacy.*"], real_buffers=True)
    assert model.proj.weight.dtype is torch.bfloat16  # dtype None keeps the stored one
    assert model.proj.weight.data_ptr() == sd["proj.weight"].data_ptr()  # assigned, not copied
    assert torch.equal(model.table, torch.tensor([0.0, 2.0, 4.0]))  # computed buffer is real
    assert not model.training and not model.proj.weight.requires_grad
    as_fp32 = load_model(_Toy, sd, path=None, family="Toy", ignore=["legacy.*"], dtype=torch.float32,
                         real_buffers=True)
    assert as_fp32.proj.weight.dtype is torch.float32
    with pytest.raises(CheckpointError, match=r"0\.weight \(expected \(3, 4\), found \(4, 3\)\)"):
        load_model(lambda: torch.nn.Sequential(torch.nn.Linear(4, 3)), {"0.weight": torch.ones(4, 3),
                   "0.bias": torch.zeros(3)}, path=None, family="Toy")
    # built fully on meta, a computed buffer would stay unset: that is reported, not returned
    with pytest.raises(RuntimeError, match="table"):
        load_model(_Toy, sd, path=None, family="Toy", ignore=["legacy.*"])


def test_parameters_on_meta_acts_on_the_calling_thread_only() -> None:
    import threading

    built: dict[str, torch.nn.Linear] = {}
    started, release = threading.Event(), threading.Event()

    def other_thread() -> None:
        started.wait()
        built["other"] = torch.nn.Linear(2, 2)
        release.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    register = torch.nn.Module.register_parameter
    with parameters_on_meta():
        started.set()
        release.wait(timeout=30)
        built["here"] = torch.nn.Linear(2, 2)
    worker.join()
    assert built["here"].weight.is_meta
    assert not built["other"].weight.is_meta
    assert torch.nn.Module.register_parameter is register  # nothing patched
    assert not torch.nn.Linear(2, 2).weight.is_meta  # and nothing left behind


def test_strip_prefix_all_keys_or_marked_subtree() -> None:
    t = torch.zeros(1)
    wrapped = {"vae.encoder.x": t, "vae.decoder.y": t}
    assert strip_prefix(wrapped, ("first_stage_model.", "vae.")) == {"encoder.x": t, "decoder.y": t}
    mixed = {"vae.encoder.x": t, "other": t}
    assert strip_prefix(mixed, ("vae.",)) == mixed  # not every key carries it: unchanged
    pipeline = {"model.diffusion_model.blocks.0.w": t, "first_stage_model.enc": t, "model.diffusion_model.t": t}
    dit = strip_prefix(pipeline, ("model.diffusion_model.",), marker=lambda k: k.startswith("blocks."))
    assert dit == {"blocks.0.w": t, "t": t}
    assert strip_prefix({"model.x": t}, ("model.",), marker=lambda k: k.startswith("blocks.")) == {"model.x": t}


@pytest.mark.parametrize("protocol", [2, 4])
def test_stored_dtype_of_a_zip_pickle_counts_every_tensor(tmp_path: Path, protocol: int) -> None:
    """The Inf-DiT ``.pt`` release is bf16: ``auto`` must know that before loading, or an fp16-only card
    gets fp16 for it. The first storage type is a GLOBAL, later ones come from the pickle memo."""
    path = tmp_path / "mp_rank_00_model_states.pt"
    module = {"first": torch.zeros(2)} | {f"w{i}": torch.zeros(3, dtype=torch.bfloat16) for i in range(3)}
    torch.save({"module": module, "torch_rng_state": torch.zeros(8, dtype=torch.uint8), "iteration": 3}, path,
               pickle_protocol=protocol)
    assert stored_dtype(path) is torch.bfloat16
    torch.save({"a": torch.zeros(1, dtype=torch.float16), "b": torch.zeros(1), "c": torch.zeros(1)}, path,
               pickle_protocol=protocol)
    assert stored_dtype(path) is torch.float32
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(1, dtype=torch.bfloat16)}, legacy, _use_new_zipfile_serialization=False)
    assert stored_dtype(legacy) is None  # not a zip: its loader reads it, and auto stays conservative


def test_stored_dtype_of_a_hostile_pickle_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1, dtype=torch.float16), "x": _Payload(marker)}, path)
    assert stored_dtype(path) is torch.float16
    not_a_pickle = tmp_path / "junk.pt"
    not_a_pickle.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    assert stored_dtype(not_a_pickle) is None
    assert not marker.exists()


def test_safetensors_header_and_stored_dtype(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.zeros(4, dtype=torch.bfloat16),
               "c": torch.zeros(1), "i": torch.zeros(9, dtype=torch.int64)}, str(path), metadata={"k": "v"})
    header = read_safetensors_header(path)
    assert header["a"]["shape"] == [2, 3] and header["__metadata__"] == {"k": "v"}
    assert header_shapes(header) == {"a": (2, 3), "b": (4,), "c": (1,), "i": (9,)}
    assert stored_dtype(path) is torch.bfloat16  # the majority of floating-point tensors
    assert stored_dtype({"w": torch.zeros(1, dtype=torch.float16)}) is torch.float16
    assert stored_dtype({"i": torch.zeros(1, dtype=torch.int64)}) is None
    assert stored_dtype(tmp_path / "m.pt") is None  # a missing file tells nothing (its loader reports it)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\xff" * 8)
    assert stored_dtype(broken) is None
    with pytest.raises(CheckpointError, match="broken.safetensors: has no readable safetensors header"):
        read_safetensors_header(broken)


def test_guess_family_and_wrong_family_error() -> None:
    sdxl_keys = ["conditioner.embedders.1.model.ln_final.weight", "model.diffusion_model.input_blocks.0.0.weight"]
    assert guess_family(sdxl_keys) == "SDXL checkpoint"
    err = wrong_family_error("sdxl.safetensors", "Inf-DiT", sdxl_keys)
    assert "sdxl.safetensors: is not an Inf-DiT checkpoint; it looks like an SDXL checkpoint" in str(err)
    assert guess_family(["foo"]).startswith("unknown model")


def test_save_safetensors_leaves_no_partial_file(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    save_safetensors({"a": torch.ones(2)}, out)
    assert read_state_dict(out)["a"].sum() == 2
    with pytest.raises(Exception):  # noqa: B017 - any failure of the writer
        save_safetensors({"a": "not a tensor"}, tmp_path / "bad.safetensors")  # type: ignore[dict-item]
    assert not list(tmp_path.glob("bad*"))


def test_deepspeed_release_file_with_every_entry_loads(tmp_path: Path) -> None:
    from uniba.checkpoint import DEEPSPEED_EXTRA_KEYS

    sd = _state()
    saved = deepspeed_model_states(sd)
    assert set(saved) - {"module"} == set(DEEPSPEED_EXTRA_KEYS)
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save(saved, path)
    loaded = read_state_dict(path)
    assert loaded.keys() == sd.keys()
    assert torch.equal(loaded["a.weight"], sd["a.weight"])


def test_numpy_rng_state_round_trips_as_plain_array(tmp_path: Path) -> None:
    import numpy as np

    from uniba.checkpoint import load_pickle

    state = np.random.RandomState(11).get_state()
    torch.save({"module": _state(), "np_rng_state": state}, tmp_path / "m.pt")
    got = load_pickle(tmp_path / "m.pt", "cpu")["np_rng_state"]  # type: ignore[index]
    assert got[0] == "MT19937" and got[1].dtype == np.uint32 and np.array_equal(got[1], state[1])


def test_numpy_1x_pickle_names_load(tmp_path: Path) -> None:
    """Files written under numpy 1.x name ``numpy.core.multiarray`` instead of ``numpy._core``."""
    import numpy as np

    sd = _state()
    path = tmp_path / "old_numpy.pt"
    torch.save({"module": sd, "np_rng_state": np.random.RandomState(3).get_state()}, path,
               _use_new_zipfile_serialization=False)  # sequential format: the names can be rewritten
    raw = path.read_bytes()
    assert b"numpy._core.multiarray" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert read_state_dict(path).keys() == sd.keys()


def test_numpy_object_array_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    import numpy as np

    marker = tmp_path / "pwned"
    payload = np.empty(2, dtype=object)
    payload[0], payload[1] = 1, _Payload(marker)
    plain_objects = np.array([1, "two"], dtype=object)
    for name, evil in (("payload", payload), ("objects", plain_objects)):
        path = tmp_path / f"{name}.pt"
        torch.save({"module": _state(), "np_rng_state": ("MT19937", evil, 0, 0, 0.0)}, path)
        with pytest.raises(CheckpointError, match="refused and nothing in it ran"):
            read_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("dtype", ["O", "V8", [("a", "<i4"), ("b", "O")]])
def test_numpy_non_numeric_dtypes_are_refused(tmp_path: Path, dtype: object) -> None:
    import numpy as np

    array = np.zeros(3, dtype=dtype)
    path = tmp_path / "m.pt"
    torch.save({"module": _state(), "np_rng_state": array}, path)
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(path)

"""Hostile and damaged checkpoint files (issue 23 items 2-4): each costs at most seconds and bounded memory,
never the process, and ends as one CheckpointError naming the file, what was expected and what to do.

The files are crafted the way an attacker would: a ``torch.save`` zip whose ``data.pkl`` is replaced, records
re-labelled in the zip directory, or objects whose ``__reduce_ex__`` makes torch's own pickler write values
no honest ``torch.save`` writes (negative or string shapes, numpy stand-ins called with other arguments).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from uniba.checkpoint import CheckpointError, load_model, read_state_dict, stored_dtype

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- crafting


def torch_zip(path: Path, pkl: bytes, compress: int = zipfile.ZIP_STORED, template: object = None) -> Path:
    """A ``torch.save`` zip of ``template`` whose ``data.pkl`` is replaced by ``pkl`` (other records kept)."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)} if template is None else template, buf)
    source = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w") as out:
        for info in source.infolist():
            data = pkl if info.filename.endswith("/data.pkl") else source.read(info)
            out.writestr(info.filename, data, compress_type=compress if info.filename.endswith("/data.pkl")
                         else zipfile.ZIP_STORED)
    return path


def relabel_data_pkl(path: Path, *, method: int | None = None, flags: int | None = None) -> Path:
    """Rewrite the compression method / flag bits of data.pkl in both its local header and the directory."""
    raw = bytearray(path.read_bytes())
    info = next(i for i in zipfile.ZipFile(path).infolist() if i.filename.endswith("/data.pkl"))
    central = next(pos for pos in _all(raw, b"PK\x01\x02")
                   if raw[pos + 46:pos + 46 + len(info.filename)] == info.filename.encode())
    for offset, base in ((info.header_offset, 6), (central, 8)):  # flag bits, then the method 2 bytes later
        if flags is not None:
            struct.pack_into("<H", raw, offset + base, flags)
        if method is not None:
            struct.pack_into("<H", raw, offset + base + 2, method)
    path.write_bytes(bytes(raw))
    return path


def _all(data: bytearray, needle: bytes) -> list[int]:
    found, start = [], 0
    while (pos := data.find(needle, start)) >= 0:
        found.append(pos)
        start = pos + 1
    return found


class _Reduce:
    """Pickles as ``function(*args)``: torch's pickler writes it (and its storages) like any tensor."""

    def __init__(self, function: object, *args: object) -> None:
        self.function, self.args = function, args

    def __reduce_ex__(self, protocol: int) -> tuple:
        return self.function, self.args


def _tensor(size: object, stride: object = (1,)) -> _Reduce:
    storage = torch.zeros(4)._typed_storage()
    return _Reduce(torch._utils._rebuild_tensor_v2, storage, 0, size, stride, False, collections.OrderedDict())


def _numpy_state(**replace: bytes) -> bytes:
    """An RNG-state pickle (what SAT checkpoints carry), with byte strings replaced in it."""
    state = ("MT19937", np.random.RandomState(1).get_state()[1][:4].copy(), 0, 0, 0.0)
    data = pickle.dumps({"w": None, "np_rng_state": state}, protocol=2)
    for old, new in replace.items():
        data = data.replace(old.encode(), new)
    return data


def _saved(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


# --------------------------------------------------------------------------- item 2: the bounded pre-scan


def test_deeply_nested_key_is_refused_and_the_process_survives(tmp_path: Path) -> None:
    """A dict key nested a million tuples deep crashes torch's unpickler when hashed (SIGSEGV)."""
    path = torch_zip(tmp_path / "deep.pt", b"\x80\x02}K\x01" + b"\x85" * 1_000_000 + b"Ns.")
    script = ("import sys\nfrom uniba.checkpoint import CheckpointError, read_state_dict, stored_dtype\n"
              f"assert stored_dtype({str(path)!r}) is None\n"
              f"try:\n    read_state_dict({str(path)!r})\nexcept CheckpointError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(path) in done.stdout and "nested more than 100 deep" in done.stdout and "nothing in it ran" \
        in done.stdout


@pytest.mark.parametrize("name", ["x.pt", "x.safetensors"])
def test_a_fifo_is_refused_without_blocking(tmp_path: Path, name: str) -> None:
    fifo = tmp_path / name
    os.mkfifo(fifo)
    results: dict[str, object] = {}

    def read() -> None:
        results["dtype"] = stored_dtype(fifo)
        try:
            read_state_dict(fifo)
        except CheckpointError as exc:
            results["error"] = str(exc)

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():  # unblock the reader so the test run can end, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO blocked")
    assert results["dtype"] is None
    assert "named pipe (FIFO)" in str(results["error"]) and str(fifo) in str(results["error"])


def test_a_memoize_flood_costs_bounded_memory(tmp_path: Path) -> None:
    """3 million MEMOIZE opcodes deflate into a few KB; memo-following readers must not keep them all."""
    path = torch_zip(tmp_path / "memo.pt", b"\x80\x04N" + b"\x94" * 3_000_000 + b"0}.", zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 50_000
    script = ("import resource\nfrom uniba.checkpoint import CheckpointError, read_state_dict, stored_dtype\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              f"assert stored_dtype({str(path)!r}) is None\n"
              f"try:\n    read_state_dict({str(path)!r})\nexcept CheckpointError as exc:\n    print(exc)\n"
              "print('grew', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, 'MB')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{path}: was refused before loading: its pickle has more than 500,000 memo entries" in done.stdout
    grew = int(done.stdout.split("grew ")[1].split()[0])
    assert grew < 150, done.stdout  # the 3 MB data.pkl and at most 500k memo entries, not 3 million


def test_the_dtype_reader_is_linear_on_a_long_memoized_global(tmp_path: Path) -> None:
    """A 2 MB GLOBAL name fetched from the memo 20,000 times: copying it at every fetch is 40 GB of work."""
    name = b"torch " + b"A" * 2_000_000
    pkl = b"\x80\x02c" + name + b"\nx\n\x94" + b"h\x00\x85" * 20_000 + b"N."
    path = torch_zip(tmp_path / "slow.pt", pkl, zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 100_000
    start = time.monotonic()
    assert stored_dtype(path) is None
    assert time.monotonic() - start < 6  # linear: well under a second here; the scan gives up after 5 s anyway


@pytest.mark.parametrize("damage", ["encrypted", "unknown method", "corrupt deflate"])
def test_zip_damage_is_unknown_to_the_dtype_reader_and_an_error_to_the_loader(tmp_path: Path, damage: str) -> None:
    good = pickle.dumps({"w": None}, protocol=2)
    path = tmp_path / "damaged.pt"
    if damage == "encrypted":
        relabel_data_pkl(torch_zip(path, good), flags=1)
    elif damage == "unknown method":
        relabel_data_pkl(torch_zip(path, good), method=97)
    else:
        torch_zip(path, good * 50, zipfile.ZIP_DEFLATED)
        raw = bytearray(path.read_bytes())
        info = next(i for i in zipfile.ZipFile(path).infolist() if i.filename.endswith("/data.pkl"))
        start = info.header_offset + 30 + len(info.filename)
        raw[start + 2:start + 12] = b"\xff" * 10
        path.write_bytes(bytes(raw))
    assert stored_dtype(path) is None  # the contract: "unknown", never an exception
    with pytest.raises(CheckpointError, match=r"damaged\.pt: .*download"):
        read_state_dict(path)


def test_release_format_files_pass_the_scan(tmp_path: Path) -> None:
    """What torch.save writes (both protocols, legacy format, DeepSpeed extras) still loads."""
    from tiny_infdit import deepspeed_model_states

    state = {"a.weight": torch.randn(3, 4, dtype=torch.bfloat16), "a.bias": torch.randn(3, dtype=torch.bfloat16)}
    for protocol in (2, 4):
        path = _saved(tmp_path / f"p{protocol}.pt", deepspeed_model_states(state))
        assert read_state_dict(path).keys() == state.keys() and stored_dtype(path) is torch.bfloat16
    legacy = tmp_path / "legacy.pth"
    torch.save({"state_dict": state}, legacy, _use_new_zipfile_serialization=False)
    assert read_state_dict(legacy).keys() == state.keys()


# --------------------------------------------------------------------------- item 3: final state of numpy arrays


@pytest.mark.parametrize("change", ["object flag", "fields"])
def test_a_dtype_changed_by_a_later_build_is_refused(tmp_path: Path, change: str) -> None:
    """The array is built with a plain uint32 dtype, then a BUILD on that dtype (fetched from the memo) gives it
    the object flag or fields: the array would read its numbers as object pointers."""
    import pickletools

    data = _numpy_state()
    assert data.endswith(b"u.")
    ops = list(pickletools.genops(data))
    at = next(i for i, (op, arg, _) in enumerate(ops) if op.name == "GLOBAL" and arg == "numpy dtype")
    at = next(i for i in range(at, len(ops)) if ops[i][0].name == "REDUCE")
    slot = bytes([ops[at + 1][1]])  # the BINPUT after the dtype's REDUCE: where the dtype sits in the memo
    fields = change == "fields"
    names = b"X\x01\x00\x00\x00a\x85" if fields else b"N"  # ('a',)
    field_map = b"}X\x01\x00\x00\x00ah" + slot + b"K\x00\x86s" if fields else b"N"  # {'a': (the dtype, 0)}
    state = (b"(K\x03X\x01\x00\x00\x00<N" + names + field_map + b"J\xff\xff\xff\xffJ\xff\xff\xff\xff"
             + (b"K\x00" if fields else b"K\x01") + b"t")
    hostile = data[:-1] + b"X\x01\x00\x00\x00x" + b"h" + slot + state + b"bs."  # result["x"] = BUILD(dtype, ...)
    path = torch_zip(tmp_path / "numpy.pt", hostile, template={"w": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"numpy\.pt: .*refused"):
        read_state_dict(path)


# --------------------------------------------------------------------------- item 4: one sentence per class


def _hostile(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case.replace(' ', '_')}.pt"
    if case == "negative shape":
        return _saved(path, {"w": _tensor((-4,))})
    if case == "string shape":
        return _saved(path, {"w": _tensor(("4",))})
    if case == "overflowing shape":
        return _saved(path, {"w": _tensor((2**40, 2**40), (2**40, 1))})
    if case == "terabyte tensor":
        return _saved(path, {"w": _tensor((2**38,))})
    if case == "terabyte numpy array":
        return _saved(path, {"w": torch.zeros(1), "np": _Reduce(np.ndarray, (2**38,), "f8")})
    if case == "unknown dtype string":
        return torch_zip(path, _numpy_state(u4=b"zz"))
    if case == "stand-in with wrong arguments":
        return _saved(path, {"w": torch.zeros(1), "np": _Reduce(np._core.multiarray._reconstruct, 1, 2, 3, 4)})
    if case == "missing memo slot":
        return torch_zip(path, b"\x80\x02}h\x05Ns.")
    if case == "stack underflow":
        return torch_zip(path, b"\x80\x02\x85.")
    if case == "integer state-dict keys":
        return _saved(path, {"module": {1: torch.zeros(2), 2: torch.zeros(2)}})
    raise AssertionError(case)


HOSTILE = ["negative shape", "string shape", "overflowing shape", "terabyte tensor", "terabyte numpy array",
           "unknown dtype string", "stand-in with wrong arguments", "missing memo slot", "stack underflow",
           "integer state-dict keys"]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_contents_become_one_checkpoint_error(tmp_path: Path, case: str) -> None:
    path = _hostile(tmp_path, case)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and "\n" not in text
    assert "download" in text.lower() or "convert" in text.lower()  # what to do
    assert stored_dtype(path) in (None, torch.float32)  # the dtype reader never raises either


def test_weights_relabelled_as_integers_are_one_sentence() -> None:
    """Not torch's load_state_dict error listing every parameter."""
    state = {"0.weight": torch.zeros(3, 4, dtype=torch.int64), "0.bias": torch.zeros(3, dtype=torch.int64)}
    with pytest.raises(CheckpointError) as info:
        load_model(lambda: torch.nn.Sequential(torch.nn.Linear(4, 3)), state, path="toy.safetensors", family="Toy")
    text = str(info.value)
    assert text.startswith("toy.safetensors: stores 2 tensor(s) as the wrong kind of number for the Toy layout")
    assert "0.weight (int64)" in text and "download it again" in text and "\n" not in text


@pytest.mark.parametrize("content", [b"[" * 100_000, b"\xff\xfe{}", b'{"weight_map": 3}'])
def test_a_damaged_shard_index_is_one_checkpoint_error(tmp_path: Path, content: bytes) -> None:
    """Deep nesting (RecursionError in json), bad UTF-8 or the wrong shape of index: the file named, the fix."""
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: .*(index|JSON).*\. .+"):
        read_state_dict(tmp_path)


def test_a_text_encoder_folder_with_a_deeply_nested_config_is_one_error(tmp_path: Path) -> None:
    """transformers raises RecursionError on a deeply nested config.json; the loader names the file."""
    from uniba.sana.text_encoder import load_text_encoder

    folder = tmp_path / "gemma-2-2b-it"
    folder.mkdir()
    (folder / "config.json").write_text("[" * 100_000)
    with pytest.raises(CheckpointError, match=r"config\.json: is not valid JSON \(nested too deeply\)"):
        load_text_encoder(folder)

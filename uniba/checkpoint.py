"""Safe checkpoint reading and strict key checking, shared by every model family.

Rules:

* ``.safetensors`` files are memory-mapped; nothing in them can execute code.
* ``.pt/.pth/.ckpt/.bin`` files go through ``torch.load(weights_only=True)``. The only extra
  globals allowed are the plain containers that real releases put beside their weights
  (:data:`EXTRA_SAFE_GLOBALS`). A pickle that asks for anything else is refused before any of it
  runs, with an error that says how to convert the file.
* Every error is a :class:`CheckpointError` whose message names the file, what was expected and
  what was found, instead of a stack trace from deep inside torch.
"""

from __future__ import annotations

import argparse
import errno
import fnmatch
import json
import os
import pickle
import stat
import sys
import threading
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

import torch

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
SUPPORTED_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES

# Containers that model releases pickle next to the tensors. ``argparse.Namespace`` carries the
# training arguments in SwissArmyTransformer/DeepSpeed checkpoints (Inf-DiT); reconstructing it
# only sets attributes on an empty namespace.
EXTRA_SAFE_GLOBALS: tuple[object, ...] = (argparse.Namespace,)

# What a SwissArmyTransformer/DeepSpeed ``mp_rank_00_model_states.pt`` holds beside ``module``
# (SAT ``training/model_io.py:save_checkpoint`` without ``--no-save-rng``, DeepSpeed
# ``engine._save_checkpoint``), for documentation and tests:
#   SAT client state: iteration, random_rng_state (random.getstate(): tuple of ints),
#     np_rng_state (numpy.random.get_state(): ('MT19937', uint32 ndarray[624], int, int, float)),
#     torch_rng_state / cuda_rng_state (uint8 tensors), rng_tracker_states (dict of uint8 tensors)
#   DeepSpeed: buffer_names, optimizer (None under ZeRO), param_shapes (list of OrderedDict of
#     torch.Size), frozen_param_shapes, shared_params, frozen_param_fragments, lr_scheduler,
#     data_sampler, random_ltd, sparse_tensor_module_names, skipped_steps, global_steps,
#     global_samples, dp_world_size, mp_world_size, ds_config, ds_version, args (argparse.Namespace)
# Only ``np_rng_state`` needs globals beyond torch's defaults: numpy's array reconstruction. Those
# names are served by the narrow stand-ins below, which build plain numeric arrays and refuse
# anything else (object arrays, structured dtypes), so no numpy code path that could run pickled
# objects is ever reached.
DEEPSPEED_EXTRA_KEYS: tuple[str, ...] = (
    "iteration", "random_rng_state", "np_rng_state", "torch_rng_state", "cuda_rng_state",
    "rng_tracker_states", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes",
    "shared_params", "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd",
    "sparse_tensor_module_names", "skipped_steps", "global_steps", "global_samples", "dp_world_size",
    "mp_world_size", "ds_config", "ds_version", "args",
)

_NUMERIC_DTYPE_KINDS = "biufc"  # bool, signed, unsigned, float, complex


def _numeric_dtype(dtype: object) -> object:
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.hasobject or dtype.fields is not None \
            or dtype.subdtype is not None or dtype.kind not in _NUMERIC_DTYPE_KINDS:
        raise pickle.UnpicklingError(f"numpy array of dtype {dtype!r} is not allowed (plain numbers only)")
    return dtype


def _safe_numpy_dtype(spec: object, align: object = False, copy: object = True) -> object:
    """``numpy.dtype`` for the unpickler: only numeric type codes such as ``'u4'`` or ``'<f8'``."""
    import numpy as np

    if not isinstance(spec, str) or len(spec) > 8:
        raise pickle.UnpicklingError(f"numpy dtype {spec!r} is not allowed (plain numbers only)")
    return _numeric_dtype(np.dtype(spec, align=bool(align), copy=bool(copy)))


def _numpy_safe_array_class() -> type:
    import numpy as np

    class _PlainArray(np.ndarray):
        """An ndarray whose unpickled state must be a numeric dtype over raw bytes."""

        def __new__(cls, shape: object, dtype: object = float, *args: object, **kwargs: object) -> object:
            if not isinstance(dtype, np.dtype):
                dtype = _safe_numpy_dtype(dtype if isinstance(dtype, str) else repr(dtype))
            return super().__new__(cls, shape, _numeric_dtype(dtype), *args, **kwargs)

        def __setstate__(self, state: object) -> None:
            if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[4], (bytes, bytearray))):
                raise pickle.UnpicklingError("numpy array state is not plain numeric data")
            _numeric_dtype(state[2])
            super().__setstate__(state)

    return _PlainArray


def _numpy_safe_globals() -> list[object]:
    """Stand-ins for the numpy globals that ``numpy.random.get_state()`` pickles through."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a requirement
        return []
    plain_array = _numpy_safe_array_class()

    def reconstruct(cls: object, shape: object, typecode: object) -> object:
        if cls is not plain_array:
            raise pickle.UnpicklingError("numpy reconstruction of anything but ndarray is not allowed")
        return np.ndarray.__new__(plain_array, (0,), np.uint8)

    def scalar(dtype: object, data: object) -> object:
        if not isinstance(data, (bytes, bytearray)):
            raise pickle.UnpicklingError("numpy scalar state is not plain numeric data")
        return np.frombuffer(bytes(data), dtype=_numeric_dtype(dtype), count=1)[0]

    entries: list[object] = [(plain_array, "numpy.ndarray"), (_safe_numpy_dtype, "numpy.dtype")]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):  # numpy 2.x and 1.x names
        entries += [(reconstruct, f"{module}._reconstruct"), (scalar, f"{module}.scalar")]
    # BUILD (``__setstate__``) on a dtype needs its concrete class allowed; these names are private
    # so that no pickle can reach the classes by name.
    for code in "?bBhHiIlLqQefdgFDG":
        cls = type(np.dtype(code))
        entries.append((cls, f"uniba.checkpoint.numpy_dtype_class.{code}"))
    return entries

# Wrappers around the real state dict, tried in this order: DeepSpeed's ``module`` (Inf-DiT),
# the ``state_dict`` of Lightning/Sana releases, and ``model`` used by some trainers.
WRAPPER_KEYS = ("module", "state_dict", "model")


class CheckpointError(ValueError):
    """A checkpoint could not be used. The message names the file and says what to do."""

    def __init__(self, path: str | os.PathLike | None, problem: str, fix: str = "") -> None:
        where = f"{os.fspath(path)}: " if path is not None else ""
        text = f"{where}{problem}"
        if fix:
            text += f" {fix}"
        super().__init__(text)
        self.path = os.fspath(path) if path is not None else None


StateDict = dict[str, torch.Tensor]


def _describe_size(path: Path) -> str:
    try:
        return f"{path.stat().st_size:,} bytes"
    except OSError:
        return "unknown size"


_SPECIAL_FILES = (
    (stat.S_ISFIFO, "is a named pipe (FIFO), not a regular file; reading it would wait for a writer forever"),
    (stat.S_ISCHR, "is a character device (such as /dev/zero), not a regular file"),
    (stat.S_ISBLK, "is a block device, not a regular file"),
    (stat.S_ISSOCK, "is a socket, not a regular file"),
)


def check_file(path: str | os.PathLike, *, allow_dir: bool = False,
               fix: str = "Choose the model file itself.") -> os.stat_result:
    """``stat`` a path before anything opens it: a regular, non-empty file (or a folder if ``allow_dir``).

    Opening a FIFO blocks until someone writes to it and ``/dev/zero`` never ends, so the file type is
    checked first, through symlinks; a symlink loop or a dangling link gets its own message.
    Returns the ``stat`` result so readers can bound what they read by ``st_size``.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise CheckpointError(path, f"is a symbolic link to '{os.readlink(path)}', which does not exist.",
                                  "Fix or remove the link.") from None
        raise CheckpointError(path, "does not exist.", "Check the file name and the models folder.") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(path, "is a symbolic link loop (the links point at each other, never at a file).",
                                  "Replace the link with the real file or a link to it.") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise CheckpointError(path, "cannot be read (permission denied).",
                                  "Give your user read access to it.") from None
        raise CheckpointError(path, f"cannot be examined ({exc.strerror or exc}).",
                              "Check the path.") from None
    if stat.S_ISDIR(st.st_mode):
        if allow_dir:
            return st
        raise CheckpointError(path, "is a folder, not a file.", fix)
    for test, problem in _SPECIAL_FILES:
        if test(st.st_mode):
            raise CheckpointError(path, problem + ".", fix)
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(path, "is not a regular file.", fix)
    if st.st_size == 0:
        raise CheckpointError(path, "is empty (0 bytes).", "The download did not finish: download it again.")
    return st


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> StateDict:
    """Read a ``.safetensors`` file (memory-mapped) into a dict of tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    check_file(path)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            path,
            f"is not a readable safetensors file ({_describe_size(path)}; {exc}).",
            "It is probably truncated or corrupt: download it again and compare its size with the source.",
        ) from None


SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file, without reading any tensor data.

    ``{name: {"dtype": "BF16", "shape": [...], "data_offsets": [...]}, "__metadata__": {...}}``: enough
    to infer a config from shapes and to know the stored dtypes before loading anything.

    Reads at most the header the file's size allows; a header length past the end of the file is an error.
    """
    path = Path(path)
    size = check_file(path).st_size
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or n > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {n} does not fit in a file of {size:,} bytes")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError) as exc:
        raise CheckpointError(path, f"has no readable safetensors header ({exc}).",
                              "Download the file again.") from None
    return header


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header (empty when there is none)."""
    metadata = read_safetensors_header(path).get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(path, "has a safetensors __metadata__ entry that is not an object.",
                              "Download the file again.")
    return dict(metadata)


def header_shapes(header: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the tensors listed in a safetensors header."""
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__" and isinstance(v, Mapping)}


def stored_dtype(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The dtype most floating-point tensors of a checkpoint are stored in (releases use one).

    A state dict is read from its tensors; a safetensors path from its header only; a zip pickle
    (``torch.save``'s format, the Inf-DiT and Sana releases) from the storage types its ``data.pkl`` names,
    read as opcodes without unpickling anything. ``None`` when nothing tells: no floating-point tensors, a
    legacy (non-zip) pickle, or an unreadable file (its loader reports that with a proper message).
    """
    if isinstance(source, Mapping):
        dtypes = [v.dtype for v in source.values() if v.is_floating_point()]
    elif os.fspath(source).lower().endswith(PICKLE_SUFFIXES):
        dtypes = _zip_pickle_storage_dtypes(Path(source))
    else:
        if not os.fspath(source).lower().endswith(SAFETENSORS_SUFFIXES):
            return None
        try:
            header = read_safetensors_header(source)
        except CheckpointError:
            return None
        dtypes = [SAFETENSORS_DTYPES.get(entry.get("dtype")) for key, entry in header.items()
                  if key != "__metadata__" and isinstance(entry, Mapping)]
        dtypes = [d for d in dtypes if d is not None and d.is_floating_point]
    return Counter(dtypes).most_common(1)[0][0] if dtypes else None


_STORAGE_DTYPES = {"torch BFloat16Storage": torch.bfloat16, "torch HalfStorage": torch.float16,
                   "torch FloatStorage": torch.float32, "torch DoubleStorage": torch.float64}
_MAX_DATA_PKL_BYTES = 256 * 2**20  # a release's data.pkl is a few hundred KB: the tensors live beside it
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                         "BINSTRING", "STRING"})


def _zip_pickle_storage_dtypes(path: Path) -> list[torch.dtype]:
    """One dtype per storage reference in a ``torch.save`` zip's ``data.pkl``, from its opcodes alone.

    ``torch.save`` names each tensor's storage type (``torch.BFloat16Storage``...) in the persistent id
    it writes; the first mention is a GLOBAL (or STACK_GLOBAL) that later mentions fetch from the memo.
    Walking the opcodes with ``pickletools`` and following the memo counts them without building any
    object, so this is safe on any file. Returns ``[]`` for anything else (or anything unreadable).
    """
    import pickletools

    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(names) != 1 or archive.getinfo(names[0]).file_size > _MAX_DATA_PKL_BYTES:
                return []
            data = archive.read(names[0])
    except (OSError, zipfile.BadZipFile, KeyError, ValueError):
        return []
    memo: dict[int, str] = {}
    recent: list[str] = []  # the last values pushed: STACK_GLOBAL takes its module and name from them
    found: list[torch.dtype] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            value: str | None = None
            if name in _STRING_OPS:
                value = str(arg)
            elif name == "GLOBAL":
                value = "global:" + str(arg)
            elif name == "STACK_GLOBAL" and len(recent) >= 2:
                value = f"global:{recent[-2]} {recent[-1]}"
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                value = memo.get(int(arg), "")
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = recent[-1] if recent else ""
                continue
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else ""
                continue
            recent = (recent + [value or ""])[-2:]
            if value and value.startswith("global:") and value[7:] in _STORAGE_DTYPES:
                found.append(_STORAGE_DTYPES[value[7:]])
    except (ValueError, EOFError):  # a broken pickle: its loader says what is wrong
        return []
    return found


def _unsupported_global(message: str) -> str:
    """The ``module.name`` a weights-only unpickler refused, from torch's message ("code" if not found)."""
    import re

    match = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL)\s+([\w.]+)", message)
    return match.group(1) if match else "code"


def _torch_load_safely(path: Path, device: str | torch.device) -> object:
    check_file(path)
    if not zipfile.is_zipfile(path):
        # torch.save writes zip archives since 1.6; an old raw pickle still loads through the
        # weights-only unpickler, but a file that is neither is truncated or not a checkpoint.
        with open(path, "rb") as fh:
            head = fh.read(2)
        if not head or head[0] != 0x80:
            raise CheckpointError(
                path,
                f"is neither a torch zip checkpoint nor a pickle ({_describe_size(path)}).",
                "It is probably truncated or not a model file: download it again.",
            )
    try:
        with torch.serialization.safe_globals([*EXTRA_SAFE_GLOBALS, *_numpy_safe_globals()]):
            return torch.load(path, map_location=device, weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        found = _unsupported_global(str(exc))
        raise CheckpointError(
            path,
            f"asks to run or build {found} while loading; only tensors and plain containers are "
            "allowed, so it was refused and nothing in it ran.",
            "If you trust the file, convert it once to .safetensors (for Inf-DiT: "
            "python -m uniba convert-infdit IN.pt OUT.safetensors) or download the safetensors release.",
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            path,
            f"could not be read as a torch checkpoint ({_describe_size(path)}; {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}).",
            "It is probably truncated or corrupt: download it again.",
        ) from None


def unwrap_state_dict(obj: object, path: str | os.PathLike | None = None) -> StateDict:
    """Find the tensor dict inside a loaded checkpoint (``module``/``state_dict``/``model`` wrappers)."""
    current = obj
    for _ in range(3):
        if isinstance(current, Mapping) and current and all(isinstance(v, torch.Tensor) for v in current.values()):
            return dict(current)
        if not isinstance(current, Mapping):
            break
        for key in WRAPPER_KEYS:
            inner = current.get(key)
            if isinstance(inner, Mapping) and inner:
                current = inner
                break
        else:
            break
    if isinstance(current, Mapping):
        tensors = {k: v for k, v in current.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        keys = ", ".join(list(map(str, current.keys()))[:8])
        raise CheckpointError(path, f"holds no tensors (top-level keys: {keys or 'none'}).",
                              "Expected a model state dict, directly or under 'module' or 'state_dict'.")
    raise CheckpointError(path, f"holds a {type(obj).__name__}, not a state dict.",
                          "Expected a dict of tensors, directly or under 'module' or 'state_dict'.")


def read_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu") -> StateDict:
    """Read any supported checkpoint file into a flat ``{key: tensor}`` dict, safely."""

    path = Path(path)
    if stat.S_ISDIR(check_file(path, allow_dir=True).st_mode):
        return read_sharded_folder(path, device)  # checks every shard itself
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        state = read_safetensors(path, device)
    elif suffix in PICKLE_SUFFIXES:
        state = unwrap_state_dict(_torch_load_safely(path, device), path)
    else:
        raise CheckpointError(path, f"has the unsupported extension '{suffix}'.",
                              f"Use one of {', '.join(SUPPORTED_SUFFIXES)}.")
    _check_finite(state, path)
    return state


def _check_finite(state: StateDict, path: Path) -> None:
    """NaN/inf check per tensor (a NaN weight would otherwise give black images with no message).

    The check touches every page of the memory-mapped file; each tensor's pages are unmapped right after
    (:func:`release_pages`; the data stays in the page cache), so reading never holds the whole file.
    """
    from .guards import check_state_dict_finite

    mappings = checkpoint_mappings()
    for key, value in state.items():
        try:
            check_state_dict_finite({key: value}, path)
        except CheckpointError as exc:
            if value.dtype != torch.float16:
                raise
            # An fp16 copy of a bf16 release: values past fp16's 65504 became inf when it was converted.
            raise CheckpointError(None, f"{exc} It is stored in fp16, which cannot hold this model's range (an fp16 "
                                        "copy of a bf16 release overflows).",
                                  "Use the original bf16 or an fp32 file; the loader's dtype option then "
                                  "converts it as needed.") from None
        release_pages([value], mappings)


def read_sharded_folder(folder: str | os.PathLike, device: str | torch.device = "cpu") -> StateDict:
    """Read a diffusers-style folder: ``*.safetensors.index.json`` shards, or a single safetensors file."""

    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        check_file(indexes[0], fix="Replace it with the real shard index of the model.")
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(indexes[0], f"is not a valid shard index ({exc}).",
                                  "Download the folder again.") from None
        state: StateDict = {}
        for shard in sorted(set(map(str, weight_map.values()))):
            shard_path = folder / shard
            if Path(shard).name != shard:  # shards live beside the index, never elsewhere
                raise CheckpointError(indexes[0], f"names the shard '{shard}' outside its folder.",
                                      "Download the folder again.")
            if not shard_path.exists():
                raise CheckpointError(folder, f"is missing the shard '{shard}' named in {indexes[0].name}.",
                                      "Download every shard of the model into the same folder.")
            shard_state = read_safetensors(shard_path, device)
            _check_finite(shard_state, shard_path)
            state.update(shard_state)
        return state
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        state = read_safetensors(files[0], device)
        _check_finite(state, files[0])
        return state
    raise CheckpointError(folder, f"holds {len(files)} safetensors files and no *.safetensors.index.json.",
                          "Point at one file, or at a folder with one model (diffusers layout).")


def with_article(noun: str) -> str:
    """``noun`` with "a" or "an" as it is read aloud: "an Inf-DiT", "an SDXL checkpoint", "a UNet", "a VAE"."""
    word = noun.split(maxsplit=1)[0] if noun.strip() else noun
    spoken_vowel = word[:1].lower() in "aeiou" and not word.lower().startswith(("uni", "une", "use", "eu"))
    if word[:2] == "UN" or word.startswith("UNet"):
        spoken_vowel = False
    # an acronym read letter by letter ("SD", "F1", "MLP") starts with a vowel sound for these letters
    acronym = len(word) > 1 and (word[:2].isupper() or any(c.isdigit() for c in word[:3])) and word[:1].isupper()
    if acronym and word[0] in "AEFHILMNORSX":
        spoken_vowel = True
    return f"{'an' if spoken_vowel else 'a'} {noun}"


def matches_any(key: str, patterns: Iterable[str]) -> bool:
    """Shell-style matching (``*`` and ``?``) of a key against ignore patterns."""
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _short_list(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_keys(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...] | torch.Size],
    *,
    path: str | os.PathLike | None,
    family: str,
    ignore: Iterable[str] = (),
) -> None:
    """Strict comparison of a state dict with the expected keys and shapes.

    Keys matching ``ignore`` (documented per family) are allowed to be present and are dropped by
    the caller. Anything else missing, unexpected or of the wrong shape is reported at once.
    """
    ignore = tuple(ignore)
    found = {k for k in state_dict if not matches_any(k, ignore)}
    missing = sorted(set(expected) - found)
    unexpected = sorted(found - set(expected))
    wrong = sorted(
        f"{k} (expected {tuple(expected[k])}, found {tuple(state_dict[k].shape)})"
        for k in found & set(expected)
        if tuple(state_dict[k].shape) != tuple(expected[k])
    )
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_short_list(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_short_list(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} key(s) with the wrong shape: {_short_list(wrong, 3)}")
    raise CheckpointError(
        path,
        f"does not match the {family} layout: " + "; ".join(parts) + ".",
        f"Make sure this is {with_article(family)} checkpoint of a supported release, complete and unmodified.",
    )


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefixes: Iterable[str], *,
                 marker: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The tensors under the wrapper prefix a checkpoint puts its model in, with the prefix removed.

    The first of ``prefixes`` that applies wins: without ``marker`` a prefix applies when every key
    carries it; with ``marker`` when some key carrying it passes ``marker`` once stripped, and then keys
    outside the prefix are dropped (a whole pipeline file ``model.diffusion_model.* + first_stage_model.*``
    gives the DiT alone). When no prefix applies, the state dict is returned unchanged.
    """
    keys = list(state_dict)
    for prefix in prefixes:
        carrying = [k for k in keys if k.startswith(prefix)]
        if not carrying:
            continue
        applies = (len(carrying) == len(keys) if marker is None
                   else any(marker(k[len(prefix):]) for k in carrying))
        if applies:
            return {k[len(prefix):]: state_dict[k] for k in carrying}
    return dict(state_dict)


M = TypeVar("M", bound=torch.nn.Module)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device but real buffers.

    For models that compute non-persistent buffers in their constructor (Gemma-2's rotary table and
    embedding scale), which a checkpoint does not hold. Uses torch's parameter-registration hook and
    acts only on the calling thread, so a module built elsewhere meanwhile is unaffected.
    """
    builder = threading.get_ident()

    def to_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> torch.nn.Parameter | None:
        if param is None or param.is_meta or threading.get_ident() != builder:
            return None
        return torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


_MADV_DONTNEED = 4
_madvise: Callable[[int, int, int], int] | None = None


def _libc_madvise() -> Callable[[int, int, int], int]:
    global _madvise
    if _madvise is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            libc.madvise.restype = ctypes.c_int
            _madvise = libc.madvise
        except (OSError, AttributeError):
            _madvise = lambda *_: -1  # noqa: E731 - remembered: not available here
    return _madvise


def checkpoint_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's private memory maps of checkpoint files (Linux; empty elsewhere)."""
    if not sys.platform.startswith("linux"):
        return []
    ranges = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[1].endswith("p") and parts[5].rstrip().lower().endswith(
                        SUPPORTED_SUFFIXES):
                    low, high = parts[0].split("-")
                    ranges.append((int(low, 16), int(high, 16)))
    except OSError:
        return []
    return ranges


def release_pages(tensors: Iterable[torch.Tensor], mappings: list[tuple[int, int]] | None = None) -> None:
    """Take the pages of tensors memory-mapped from a checkpoint file out of this process's resident memory.

    Checkpoints are memory-mapped, so every page a reader touches (the NaN/inf check, a dtype conversion)
    stays counted until the whole file is unmapped: without this, loading an fp32 file as bf16 would peak at
    the file's size on top of the model. ``MADV_DONTNEED`` on a private *file* mapping only unmaps: the data
    stays in the page cache and the next access maps it again from the file. It is applied to whole pages
    inside tensors that lie in a checkpoint-file mapping (:func:`checkpoint_mappings`) and never to
    ordinary memory. Only for tensors just read and not written to (a written page would revert to the file).
    """
    mappings = checkpoint_mappings() if mappings is None else mappings
    if not mappings:
        return
    madvise = _libc_madvise()
    page = os.sysconf("SC_PAGE_SIZE")
    for tensor in tensors:
        if tensor.device.type != "cpu" or not tensor.numel() or not tensor.is_contiguous():
            continue
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if not any(low <= start and end <= high for low, high in mappings):
            continue
        first = -(-start // page) * page  # whole pages only: a neighbour's partial page stays
        last = end // page * page
        if last > first:
            madvise(first, last - first, _MADV_DONTNEED)


def load_model(
    build: Callable[[], M],
    state_dict: Mapping[str, torch.Tensor],
    *,
    path: str | os.PathLike | None,
    family: str,
    ignore: Iterable[str] = (),
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    real_buffers: bool = False,
) -> M:
    """The one way every family turns a converted state dict into a model.

    ``build()`` runs on the meta device, so nothing is allocated or initialised twice
    (``real_buffers=True``: only parameters go to meta, see :func:`parameters_on_meta`). The state
    dict is then checked strictly against the model (:func:`check_keys`, with the family's documented
    ``ignore`` patterns) and its tensors are assigned, cast to ``dtype`` (``None``: the stored dtype,
    :func:`stored_dtype`) and moved to ``device``. Returns the model in eval mode without gradients.
    """
    if real_buffers:
        with parameters_on_meta():
            model = build()
    else:
        with torch.device("meta"):
            model = build()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(state_dict, expected, path=path, family=family, ignore=ignore)
    dtype = dtype or stored_dtype(state_dict) or torch.float32
    weights = {}
    mappings = checkpoint_mappings()
    for key, value in state_dict.items():  # one tensor at a time: never a second full copy of the model
        if key not in expected:
            continue
        converted = value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
        if converted is not value:
            release_pages([value], mappings)
        weights[key] = converted
    model.load_state_dict(weights, strict=True, assign=True)
    unset = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if unset:  # a non-persistent buffer built on meta: the model needs real_buffers=True
        raise RuntimeError(f"{family}: {_short_list(unset)} were neither in the checkpoint nor computed; "
                           "build this model with real_buffers=True.")
    return model.eval().requires_grad_(False)


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically: a partial file never stays behind on error."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# Key fingerprints of common model files, for error messages that say what a wrong file is.
_FAMILY_FINGERPRINTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Inf-DiT", ("mixins.adaln_layer.", "transformer.layers.0.attention.query_key_value.weight")),
    ("Sana DiT (original format)", ("t_block.1.weight", "blocks.0.attn.qkv.weight")),
    ("Sana DiT (diffusers format)", ("caption_projection.linear_1.weight", "transformer_blocks.0.attn1.to_q.weight")),
    ("DC-AE autoencoder", ("encoder.project_in.", "decoder.project_out.")),
    ("Gemma-2 text encoder", ("model.layers.0.pre_feedforward_layernorm.weight",)),
    ("SDXL checkpoint", ("conditioner.embedders.1.model.",)),
    ("SD1.x/SD2.x checkpoint", ("model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.")),
    ("UNet (diffusion model only)", ("input_blocks.0.0.weight",)),
    ("diffusers UNet", ("conv_in.weight", "down_blocks.0.")),
    ("Flux model", ("double_blocks.0.", "single_blocks.0.")),
    ("SD3 model", ("joint_blocks.0.",)),
    ("VAE", ("encoder.down.0.", "decoder.up.0.")),
    ("CLIP vision model", ("vision_model.encoder.layers.0.",)),
    ("CLIP text model", ("text_model.encoder.layers.0.",)),
    ("T5 text encoder", ("encoder.block.0.layer.0.",)),
)


def guess_family(keys: Iterable[str]) -> str:
    """A best guess at what kind of model a set of keys belongs to ("unknown model" if none fits)."""
    keys = list(keys)
    for name, fingerprints in _FAMILY_FINGERPRINTS:
        if all(any(k.startswith(fp) for k in keys) for fp in fingerprints):
            return name
    return f"unknown model ({len(keys)} tensors, e.g. {_short_list(sorted(keys), 3)})"


def wrong_family_error(
    path: str | os.PathLike | None, expected: str, keys: Iterable[str], fix: str = ""
) -> CheckpointError:
    """The error for a file of another model family: names what was expected and what it looks like."""
    return CheckpointError(
        path,
        f"is not {with_article(expected)} checkpoint; it looks like {with_article(guess_family(keys))}.",
        fix or f"Choose {with_article(expected)} file.",
    )

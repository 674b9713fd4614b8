"""Reading checkpoint files into state dicts: safetensors (memory-mapped), pickles (sandboxed), sharded folders.

Every file is opened through :func:`~.files.open_regular` (a pipe or device is refused, never waited on), every
pickle is walked by the bounded scan of :mod:`.scan` before torch unpickles it, and every failure, whatever
the library below raised, becomes one :class:`~.errors.CheckpointError` naming the file, what was expected
and what to do.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..finite import describe_non_finite, first_non_finite
from .errors import CheckpointError, describe_size
from .files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, SUPPORTED_SUFFIXES, check_file, open_regular
from .pages import checkpoint_mappings, release_pages
from .sandbox import check_loaded, safe_globals
from .scan import PickleRefused, scan_file

StateDict = dict[str, torch.Tensor]

# Wrappers around the real state dict, tried in this order: DeepSpeed's ``module`` (Inf-DiT),
# the ``state_dict`` of Lightning/Sana releases, and ``model`` used by some trainers.
WRAPPER_KEYS = ("module", "state_dict", "model")
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
_DOWNLOAD_AGAIN = "It is probably truncated or corrupt: download it again."


def _pinned(fh: BinaryIO, path: Path) -> str:
    """A name for the file ``fh`` has open, so a library that opens by name reads the file that was checked."""
    by_fd = f"/proc/self/fd/{fh.fileno()}"
    return by_fd if os.path.exists(by_fd) else str(path)


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> StateDict:
    """Read a ``.safetensors`` file (memory-mapped) into a dict of tensors."""
    path = Path(path)
    with open_regular(path) as fh:
        try:
            return load_file(_pinned(fh, path), device=str(device))
        except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError, MemoryError) as exc:
            raise CheckpointError(
                path,
                f"is not a readable safetensors file ({describe_size(path)}; {str(exc)[:300]}).",
                "It is probably truncated or corrupt: download it again and compare its size with the source.",
            ) from None


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file, without reading any tensor data.

    ``{name: {"dtype": "BF16", "shape": [...], "data_offsets": [...]}, "__metadata__": {...}}``: enough
    to infer a config from shapes and to know the stored dtypes before loading anything.

    Reads at most the header the file's size allows; a header length past the end of the file is an error.
    """
    path = Path(path)
    try:
        with open_regular(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or n > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {n} does not fit in a file of {size:,} bytes")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested past Python's limit
        raise CheckpointError(path, f"has no readable safetensors header ({str(exc)[:200]}).",
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


def _refusal_text(message: str) -> tuple[str, bool]:
    """What a weights-only unpickler refused, from torch's message, and whether it was a global (code)."""
    match = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL)\s+([\w.]+)", message)
    if match:
        return match.group(1), True
    match = re.search(r"WeightsUnpickler error:\s*(.+)", message)
    detail = (match.group(1) if match else message).strip().splitlines()
    return (detail[0] if detail else "data it does not allow")[:300], False


def load_pickle(path: str | os.PathLike, device: str | torch.device = "cpu") -> object:
    """Unpickle a ``.pt`` safely: regular file, bounded pre-scan, weights-only sandbox, final-state check."""
    path = Path(path)
    with open_regular(path) as fh:
        is_zip = zipfile.is_zipfile(fh)
        if not is_zip:
            # torch.save writes zip archives since 1.6; an old raw pickle still loads through the
            # weights-only unpickler, but a file that is neither is truncated or not a checkpoint.
            fh.seek(0)
            head = fh.read(2)
            if not head or head[0] != 0x80:
                raise CheckpointError(path, f"is neither a torch zip checkpoint nor a pickle ({describe_size(path)}).",
                                      "It is probably truncated or not a model file: download it again.")
        try:
            scan_file(path, fh)
        except PickleRefused as refused:
            if refused.broken:
                raise CheckpointError(path, f"is damaged: its pickle has {refused.reason}, so it was not loaded.",
                                      _DOWNLOAD_AGAIN) from None
            raise CheckpointError(path, f"was refused before loading: its pickle has {refused.reason}, which no "
                                        "model checkpoint has; nothing in it ran.",
                                  "It is damaged or was made to attack the loader: download the release "
                                  "again.") from None
        try:
            with torch.serialization.safe_globals(safe_globals()):
                loaded = torch.load(_pinned(fh, path), map_location=device, weights_only=True, mmap=is_zip)
        except pickle.UnpicklingError as exc:
            found, is_global = _refusal_text(str(exc))
            if is_global:
                problem = (f"asks to run or build {found} while loading; only tensors and plain containers are "
                           "allowed, so it was refused and nothing in it ran.")
            else:
                problem = (f"holds data the safe loader does not allow ({found}); only tensors, plain containers "
                           "and plain numbers are allowed, so it was refused and nothing in it ran.")
            raise CheckpointError(
                path, problem,
                "If you trust the file, convert it once to .safetensors (for Inf-DiT: "
                "python -m uniba convert-infdit IN.pt OUT.safetensors) or download the safetensors release.",
            ) from None
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged pickle raises anything from torch's rebuild code
            text = str(exc).strip().splitlines()
            raise CheckpointError(
                path,
                f"could not be read as a torch checkpoint ({describe_size(path)}; {type(exc).__name__}"
                f"{': ' + text[0][:300] if text else ''}).",
                _DOWNLOAD_AGAIN,
            ) from None
    check_loaded(loaded, path)
    return loaded


def _named_tensors(mapping: Mapping[Any, Any], path: str | os.PathLike | None) -> StateDict:
    tensors = {k: v for k, v in mapping.items() if isinstance(v, torch.Tensor)}
    not_text = [k for k in tensors if not isinstance(k, str)]
    if not_text:
        raise CheckpointError(path, f"names {len(not_text)} of its tensors with {type(not_text[0]).__name__} "
                                    f"values such as {not_text[0]!r:.40} instead of parameter names.",
                              "It is damaged or not a model checkpoint: download it again.")
    return tensors


def unwrap_state_dict(obj: object, path: str | os.PathLike | None = None) -> StateDict:
    """Find the tensor dict inside a loaded checkpoint (``module``/``state_dict``/``model`` wrappers)."""
    current = obj
    for _ in range(3):
        if isinstance(current, Mapping) and current and all(isinstance(v, torch.Tensor) for v in current.values()):
            return _named_tensors(current, path)
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
        tensors = _named_tensors(current, path)
        if tensors:
            return tensors
        keys = ", ".join(list(map(str, current.keys()))[:8])
        raise CheckpointError(path, f"holds no tensors (top-level keys: {keys[:300] or 'none'}).",
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
        state = unwrap_state_dict(load_pickle(path, device), path)
    else:
        raise CheckpointError(path, f"has the unsupported extension '{suffix}'.",
                              f"Use one of {', '.join(SUPPORTED_SUFFIXES)}.")
    check_weights_finite(state, path)
    return state


def check_weights_finite(state: Mapping[str, torch.Tensor], path: str | os.PathLike | None) -> None:
    """NaN/inf check per tensor (a NaN weight would otherwise give black images with no message).

    The check touches every page of the memory-mapped file; each tensor's pages are unmapped right after
    (:func:`~.pages.release_pages`; the data stays in the page cache), so reading never holds the whole file.
    """
    mappings = checkpoint_mappings()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        found = first_non_finite(value)
        if found is not None:
            problem = f"tensor '{key}' holds NaN or infinite values ({describe_non_finite(value, found)})."
            if value.dtype == torch.float16:
                # An fp16 copy of a bf16 release: values past fp16's 65504 became inf when it was converted.
                raise CheckpointError(path, problem + " It is stored in fp16, which cannot hold this model's range "
                                                      "(an fp16 copy of a bf16 release overflows).",
                                      "Use the original bf16 or an fp32 file; the loader's dtype option then "
                                      "converts it as needed.")
            raise CheckpointError(path, problem,
                                  "The file is corrupt or was saved after training diverged: download it again.")
        release_pages([value], mappings)


MAX_JSON_BYTES = 64 * 2**20  # a config, index or tokenizer JSON beside a model is kilobytes to a few MB


def read_json(path: str | os.PathLike, fix: str = "Download the model folder again.") -> Any:
    """A JSON file beside a model (config, shard index): regular file, bounded size, any damage one error.

    Deep nesting (RecursionError), bad UTF-8 and a file larger than :data:`MAX_JSON_BYTES` are a
    :class:`CheckpointError` naming the file like a syntax error is.
    """
    with open_regular(path, fix=fix) as fh:
        raw = fh.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(path, f"is larger than {MAX_JSON_BYTES // 2**20} MB, not a JSON file of a model.", fix)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise CheckpointError(path, f"is not valid JSON ({problem}).", fix) from None


def read_sharded_folder(folder: str | os.PathLike, device: str | torch.device = "cpu") -> StateDict:
    """Read a diffusers-style folder: ``*.safetensors.index.json`` shards, or a single safetensors file."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        data = read_json(indexes[0], "Replace it with the real shard index of the model.")
        try:
            shards = sorted(set(map(str, data["weight_map"].values())))
        except (KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(indexes[0], f"is not a valid shard index ({type(exc).__name__}: {str(exc)[:200]}).",
                                  "Download the folder again.") from None
        state: StateDict = {}
        for shard in shards:
            shard_path = folder / shard
            if Path(shard).name != shard:  # shards live beside the index, never elsewhere
                raise CheckpointError(indexes[0], f"names the shard '{shard[:200]}' outside its folder.",
                                      "Download the folder again.")
            if not shard_path.exists():
                raise CheckpointError(folder, f"is missing the shard '{shard}' named in {indexes[0].name}.",
                                      "Download every shard of the model into the same folder.")
            shard_state = read_safetensors(shard_path, device)
            check_weights_finite(shard_state, shard_path)
            state.update(shard_state)
        return state
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        state = read_safetensors(files[0], device)
        check_weights_finite(state, files[0])
        return state
    raise CheckpointError(folder, f"holds {len(files)} safetensors files and no *.safetensors.index.json.",
                          "Point at one file, or at a folder with one model (diffusers layout).")


"""The dtype a checkpoint's weights are stored in, read before loading it (headers and opcodes only)."""

from __future__ import annotations

import os
import zipfile
from collections import Counter
from collections.abc import Mapping

import torch

from .errors import CheckpointError
from .files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, open_regular
from .readers import read_safetensors_header
from .scan import PickleRefused, read_data_pkl, scan_pickle

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_STORAGE_DTYPES = {"torch BFloat16Storage": torch.bfloat16, "torch HalfStorage": torch.float16,
                   "torch FloatStorage": torch.float32, "torch DoubleStorage": torch.float64}


def stored_dtype(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The dtype most floating-point tensors of a checkpoint are stored in (releases use one).

    A state dict is read from its tensors; a safetensors path from its header only; a zip pickle
    (``torch.save``'s format, the Inf-DiT and Sana releases) from the storage types its ``data.pkl`` names,
    read as opcodes without unpickling anything (:func:`zip_pickle_storage_dtypes`). ``None`` when nothing
    tells: no floating-point tensors, a legacy (non-zip) pickle, or an unreadable or hostile file (its loader
    reports that with a proper message).
    """
    if isinstance(source, Mapping):
        dtypes = [v.dtype for v in source.values() if v.is_floating_point()]
    elif os.fspath(source).lower().endswith(PICKLE_SUFFIXES):
        dtypes = zip_pickle_storage_dtypes(source)
    else:
        if not os.fspath(source).lower().endswith(SAFETENSORS_SUFFIXES):
            return None
        try:
            header = read_safetensors_header(source)
        except CheckpointError:
            return None
        named = [SAFETENSORS_DTYPES.get(entry.get("dtype")) for key, entry in header.items()
                 if key != "__metadata__" and isinstance(entry, Mapping)]
        dtypes = [d for d in named if d is not None and d.is_floating_point]
    return Counter(dtypes).most_common(1)[0][0] if dtypes else None


def zip_pickle_storage_dtypes(path: str | os.PathLike) -> list[torch.dtype]:
    """One dtype per storage reference in a ``torch.save`` zip's ``data.pkl``, from its opcodes alone.

    ``torch.save`` names each tensor's storage type (``torch.BFloat16Storage``...) in the persistent id it
    writes; the first mention is a GLOBAL (or STACK_GLOBAL) that later mentions fetch from the memo. The
    bounded walk of :mod:`.scan` reports both, so this is safe, linear and bounded on any file. Returns
    ``[]`` for anything else (not a zip, unreadable, past the scan's limits).
    """
    found: list[torch.dtype] = []

    def count(name: str) -> None:
        if name in _STORAGE_DTYPES:
            found.append(_STORAGE_DTYPES[name])

    try:
        with open_regular(path) as fh:
            if not zipfile.is_zipfile(fh):
                return []
            scan_pickle(read_data_pkl(fh), on_global=count)
    except (CheckpointError, PickleRefused, OSError):
        return []
    return found

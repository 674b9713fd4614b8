"""Safe checkpoint reading and strict key checking, shared by every model family.

Rules:

* ``.safetensors`` files are memory-mapped; nothing in them can execute code.
* ``.pt/.pth/.ckpt/.bin`` files are walked by a bounded opcode scan first (:mod:`.scan`: nesting depth,
  memo size, opcode count, CPU time), then go through ``torch.load(weights_only=True)`` with only plain
  containers and plain-number numpy stand-ins allowed (:mod:`.sandbox`), and the result is checked again.
* Every path is ``stat``-ed and opened as a regular file only (:mod:`.files`): a pipe never blocks a reader.
* Every error is a :class:`CheckpointError` whose message names the file, what was expected and what was
  found, instead of a stack trace from deep inside torch.

One job per file: ``errors`` (the error and its wording), ``files`` (what a path may be), ``scan`` (the
bounded pickle walk and ``data.pkl``), ``sandbox`` (what unpickling may build), ``readers`` (files to state
dicts, JSON beside them), ``dtype`` (stored dtype from headers), ``shapes`` (a ``.pt``'s tensor shapes from
its opcodes), ``keys`` (layout checks, family names), ``build`` (state dict to model), ``pages`` (releasing
mapped pages), ``write`` (safetensors output through :mod:`uniba.publish`), ``bench`` (what the scan costs).
"""

from __future__ import annotations

from .build import check_kinds, load_model, parameters_on_meta
from .dtype import SAFETENSORS_DTYPES, stored_dtype, zip_pickle_storage_dtypes
from .errors import CheckpointError, describe_size, short_list, with_article
from .files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, SUPPORTED_SUFFIXES, check_file, open_regular, read_head
from .keys import check_keys, guess_family, matches_any, strip_prefix, wrong_family_error
from .pages import checkpoint_mappings, release_pages
from .readers import (
    MAX_HEADER_BYTES,
    MAX_JSON_BYTES,
    WRAPPER_KEYS,
    StateDict,
    check_weights_finite,
    header_shapes,
    load_pickle,
    read_json,
    read_safetensors,
    read_safetensors_header,
    read_safetensors_metadata,
    read_sharded_folder,
    read_state_dict,
    unwrap_state_dict,
)
from .sandbox import DEEPSPEED_EXTRA_KEYS, EXTRA_SAFE_GLOBALS, check_loaded
from .scan import LIMITS, Limits, PickleRefused, scan_file, scan_pickle
from .shapes import zip_pickle_shapes
from .write import save_safetensors

__all__ = [
    "CheckpointError", "describe_size", "short_list", "with_article",
    "PICKLE_SUFFIXES", "SAFETENSORS_SUFFIXES", "SUPPORTED_SUFFIXES", "check_file", "open_regular", "read_head",
    "LIMITS", "Limits", "PickleRefused", "scan_file", "scan_pickle",
    "DEEPSPEED_EXTRA_KEYS", "EXTRA_SAFE_GLOBALS", "check_loaded",
    "MAX_HEADER_BYTES", "MAX_JSON_BYTES", "read_json", "WRAPPER_KEYS", "StateDict", "check_weights_finite",
    "header_shapes", "load_pickle",
    "read_safetensors", "read_safetensors_header", "read_safetensors_metadata", "read_sharded_folder",
    "read_state_dict", "unwrap_state_dict",
    "SAFETENSORS_DTYPES", "stored_dtype", "zip_pickle_storage_dtypes", "zip_pickle_shapes",
    "check_keys", "guess_family", "matches_any", "strip_prefix", "wrong_family_error",
    "check_kinds", "load_model", "parameters_on_meta",
    "checkpoint_mappings", "release_pages",
    "save_safetensors",
]

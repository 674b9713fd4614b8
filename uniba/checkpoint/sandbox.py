"""What a pickled checkpoint may build besides tensors: plain containers and plain numeric numpy arrays.

``.pt/.pth/.ckpt/.bin`` files go through ``torch.load(weights_only=True)``. The only extra globals allowed
are the containers real releases put beside their weights (:data:`EXTRA_SAFE_GLOBALS`) and narrow
stand-ins for the numpy names that ``numpy.random.get_state()`` pickles through. The stand-ins build plain
numeric arrays only, and :func:`check_loaded` checks the *final* state of every array, dtype and scalar in
the result, because a later BUILD opcode can change an object that was fine when it was built.
"""

from __future__ import annotations

import argparse
import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import CheckpointError

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
# Only ``np_rng_state`` needs globals beyond torch's defaults: numpy's array reconstruction, served by
# the stand-ins below, so no numpy code path that could run pickled objects is ever reached.
DEEPSPEED_EXTRA_KEYS: tuple[str, ...] = (
    "iteration", "random_rng_state", "np_rng_state", "torch_rng_state", "cuda_rng_state",
    "rng_tracker_states", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes",
    "shared_params", "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd",
    "sparse_tensor_module_names", "skipped_steps", "global_steps", "global_samples", "dp_world_size",
    "mp_world_size", "ds_config", "ds_version", "args",
)

_NUMERIC_DTYPE_KINDS = "biufc"  # bool, signed, unsigned, float, complex
_NUMERIC_CODES = "?bBhHiIlLqQefdgFDG"
# An RNG state is 2.5 KB; nothing a checkpoint carries beside its tensors needs more than this.
MAX_NUMPY_BYTES = 16 * 2**20
_MAX_DIMS = 32


def _refuse(what: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"{what} is not allowed (plain numbers only)")


def _plain_dtype_problem(dtype: object) -> str | None:
    """Why ``dtype`` is not a plain numeric numpy dtype (in words), or None when it is one."""
    if not isinstance(dtype, np.dtype):
        return f"a numpy dtype given as {type(dtype).__name__}"
    if dtype.hasobject or dtype.flags != 0:
        return f"dtype {dtype} carrying object flags ({dtype.flags})"
    if dtype.fields is not None or dtype.subdtype is not None:
        return f"structured dtype {dtype!r:.80}"
    if dtype.kind not in _NUMERIC_DTYPE_KINDS or dtype.char not in _NUMERIC_CODES:
        return f"dtype {dtype!r:.80}"
    if dtype.itemsize != np.dtype(dtype.char).itemsize:
        return f"dtype {dtype} of item size {dtype.itemsize}"
    return None


def _fresh_dtype(dtype: object) -> Any:
    """A new builtin dtype equal to a checked one: arrays never keep an object the pickle can reach again."""
    problem = _plain_dtype_problem(dtype)
    if problem:
        raise _refuse(problem)
    return np.dtype(dtype.str)  # type: ignore[union-attr]


def _checked_shape(shape: object, itemsize: int) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, tuple) or len(shape) > _MAX_DIMS \
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise pickle.UnpicklingError(f"numpy array shape {shape!r:.80} is not a tuple of sizes")
    count = 1
    for n in shape:
        count *= n
        if count * itemsize > MAX_NUMPY_BYTES:
            raise pickle.UnpicklingError(f"numpy array of shape {shape!r:.80} is larger than "
                                         f"{MAX_NUMPY_BYTES // 2**20} MB; a checkpoint's extras are small")
    return shape  # type: ignore[return-value]


def _safe_numpy_dtype(spec: object, align: object = False, copy: object = True) -> object:
    """``numpy.dtype`` for the unpickler: only numeric type codes such as ``'u4'`` or ``'<f8'``."""
    if not isinstance(spec, str) or len(spec) > 8:
        raise _refuse(f"numpy dtype {spec!r:.40}")
    try:
        dtype = np.dtype(spec)
    except TypeError:
        raise pickle.UnpicklingError(f"numpy dtype {spec!r} is not a dtype numpy knows") from None
    _fresh_dtype(dtype)
    return np.dtype(spec, align=bool(align), copy=bool(copy))


class _PlainArray(np.ndarray):
    """An ndarray whose unpickled state must be a numeric dtype over raw bytes."""

    def __new__(cls, shape: object, dtype: object = float, *args: object, **kwargs: object) -> object:
        if args or kwargs:
            raise pickle.UnpicklingError("numpy.ndarray called with more than a shape and a dtype")
        dtype = _fresh_dtype(dtype if isinstance(dtype, np.dtype) else _safe_numpy_dtype(
            dtype if isinstance(dtype, str) else repr(dtype)))
        return super().__new__(cls, _checked_shape(shape, dtype.itemsize), dtype)

    def __setstate__(self, state: object) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[0], int)
                and isinstance(state[3], bool) and isinstance(state[4], (bytes, bytearray))):
            raise pickle.UnpicklingError("numpy array state is not plain numeric data")
        dtype = _fresh_dtype(state[2])
        shape = _checked_shape(state[1], dtype.itemsize)
        super().__setstate__((state[0], shape, dtype, state[3], state[4]))


def _reconstruct(cls: object, shape: object = (0,), typecode: object = b"b") -> object:
    """``numpy.core.multiarray._reconstruct``: an empty plain array that BUILD then fills."""
    if cls is not _PlainArray:
        raise pickle.UnpicklingError("numpy reconstruction of anything but ndarray is not allowed")
    return np.ndarray.__new__(_PlainArray, (0,), np.uint8)


def _scalar(dtype: object, data: object = None) -> object:
    """``numpy.core.multiarray.scalar``: one plain number from its raw bytes."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("numpy scalar state is not plain numeric data")
    fresh = _fresh_dtype(dtype)
    if len(data) != fresh.itemsize:
        raise pickle.UnpicklingError(f"numpy scalar of {len(data)} bytes for dtype {fresh}")
    return np.frombuffer(bytes(data), dtype=fresh, count=1)[0]


def safe_globals() -> list[object]:
    """Everything :func:`torch.serialization.safe_globals` gets beyond torch's defaults."""
    entries: list[object] = [*EXTRA_SAFE_GLOBALS, (_PlainArray, "numpy.ndarray"), (_safe_numpy_dtype, "numpy.dtype")]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):  # numpy 2.x and 1.x names
        entries += [(_reconstruct, f"{module}._reconstruct"), (_scalar, f"{module}.scalar")]
    # BUILD (``__setstate__``) on a dtype needs its concrete class allowed; these names are private
    # so that no pickle can reach the classes by name.
    for code in _NUMERIC_CODES:
        entries.append((type(np.dtype(code)), f"uniba.checkpoint.numpy_dtype_class.{code}"))
    return entries


def _numpy_problem(value: object) -> str | None:
    """Why a numpy object in a loaded checkpoint is not plain numbers, or None (also None for non-numpy)."""
    if isinstance(value, np.dtype):
        problem = _plain_dtype_problem(value)
        return f"numpy {problem}" if problem else None
    if isinstance(value, (np.ndarray, np.generic)):
        problem = _plain_dtype_problem(value.dtype)
        if problem:
            return f"numpy array of {problem}"
        if value.nbytes > MAX_NUMPY_BYTES:
            return f"numpy array of {value.nbytes:,} bytes"
    return None


def check_loaded(obj: object, path: str | os.PathLike) -> None:
    """Refuse a loaded checkpoint holding a numpy object that is not plain numbers *now*.

    The stand-ins check what they build, but an object can be changed by a later BUILD opcode (a dtype
    given the object flag or fields after an array was made with it), so the final result is walked too.
    """
    seen: set[int] = set()
    pending: list[object] = [obj]
    while pending:
        value = pending.pop()
        if id(value) in seen or isinstance(value, (str, bytes, int, float, bool, type(None))):
            continue
        seen.add(id(value))
        problem = _numpy_problem(value)
        if problem:
            raise CheckpointError(path, f"holds a {problem} once loaded; only plain numbers are allowed beside "
                                        "the tensors, so it was refused.",
                                  "The file was changed after it was saved: download it again.")
        if isinstance(value, Mapping):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            pending.extend(value)
        elif isinstance(value, argparse.Namespace):
            pending.extend(vars(value).values())

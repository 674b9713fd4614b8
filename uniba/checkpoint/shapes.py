"""The tensor shapes of a ``torch.save`` zip, read from its ``data.pkl`` opcodes without unpickling anything.

A safetensors file states its shapes in its header; a ``.pt`` states them in the arguments of the
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` calls its pickle makes. After the
bounded scan of :mod:`.scan` (depth, memo, opcode count, time) has accepted the pickle, :func:`zip_pickle_shapes`
walks it once more with a small evaluator that builds only what describes the state dict: strings, numbers,
tuples, lists and dicts, and a :class:`_Tensor` holding a shape where the pickle rebuilds a tensor. Every other
global is an opaque placeholder that is never imported or called; tensor data is never read. This is how a
``.pt`` of another size is planned with its own config (block size, width, depth) before it is loaded.
"""

from __future__ import annotations

import io
import os
import pickletools
import zipfile
from collections.abc import Mapping

from .errors import CheckpointError
from .files import open_regular
from .readers import WRAPPER_KEYS
from .scan import PickleRefused, read_data_pkl, scan_pickle

__all__ = ["zip_pickle_shapes"]


class _Opaque:
    """Any value the evaluator does not build (arrays, namespaces, bytes, sets...)."""


_OPAQUE = _Opaque()
_MARK = object()


class _Global:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class _Tensor:
    __slots__ = ("shape",)

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


_REBUILD_TENSOR = frozenset({"torch._utils _rebuild_tensor", "torch._utils _rebuild_tensor_v2",
                             "torch._utils _rebuild_tensor_v3"})
_REBUILD_PARAMETER = frozenset({"torch._utils _rebuild_parameter", "torch._utils _rebuild_parameter_with_state"})
_INTS = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"})
_STRINGS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE",
                      "BINUNICODE8"})
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}


def _shape(value: object) -> tuple[int, ...] | None:
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    return None


def _call(function: object, args: object) -> object:
    name = function.name if isinstance(function, _Global) else ""
    args = args if isinstance(args, tuple) else ()
    if name in _REBUILD_TENSOR and len(args) >= 3 and _shape(args[2]) is not None:
        return _Tensor(_shape(args[2]))  # type: ignore[arg-type]
    if name in _REBUILD_PARAMETER and args and isinstance(args[0], _Tensor):
        return args[0]
    if name == "collections OrderedDict":
        return {}
    if name == "torch Size" and args and _shape(args[0]) is not None:
        return _shape(args[0])
    return _OPAQUE


def _hashable(key: object) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True


def _evaluate(data: bytes) -> object:
    """The pickle's value with only containers, strings, numbers and tensor shapes built (already scanned)."""
    stack: list[object] = []
    marks: list[int] = []
    memo: dict[int, object] = {}

    def pop_mark() -> list[object]:
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    for opcode, arg, _ in pickletools.genops(io.BytesIO(data)):
        name = opcode.name
        if name in _INTS or name in ("FLOAT", "BINFLOAT"):
            stack.append(arg)
        elif name in _STRINGS:
            stack.append(arg if isinstance(arg, str) else _OPAQUE)
        elif name in _CONSTANTS:
            stack.append(_CONSTANTS[name])
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "MARK":
            marks.append(len(stack))
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            count = int(name[-1])
            items = tuple(stack[-count:])
            del stack[-count:]
            stack.append(items)
        elif name == "LIST":
            stack.append(pop_mark())
        elif name == "DICT":
            items = pop_mark()
            stack.append({k: v for k, v in zip(items[::2], items[1::2]) if _hashable(k)})
        elif name in ("APPEND", "APPENDS"):
            items = [stack.pop()] if name == "APPEND" else pop_mark()
            if isinstance(stack[-1], list):
                stack[-1].extend(items)
        elif name in ("SETITEM", "SETITEMS"):
            items = stack[-2:] if name == "SETITEM" else pop_mark()
            if name == "SETITEM":
                del stack[-2:]
            target = stack[-1]
            if isinstance(target, dict):
                target.update((k, v) for k, v in zip(items[::2], items[1::2]) if _hashable(k))
        elif name == "GLOBAL":
            stack.append(_Global(str(arg)))
        elif name == "STACK_GLOBAL":
            module, attr = stack[-2:]
            del stack[-2:]
            stack.append(_Global(f"{module} {attr}"))
        elif name == "REDUCE":
            function, args = stack[-2:]
            del stack[-2:]
            stack.append(_call(function, args))
        elif name in ("BINPERSID", "BUILD"):
            stack.pop()
            if name == "BINPERSID":
                stack.append(_OPAQUE)  # a storage: its data is never read
        elif name in ("NEWOBJ", "NEWOBJ_EX"):
            del stack[-(2 if name == "NEWOBJ" else 3):]
            stack.append(_OPAQUE)
        elif name in ("INST", "OBJ", "FROZENSET"):
            pop_mark()
            stack.append(_OPAQUE)
        elif name == "ADDITEMS":
            pop_mark()
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name == "POP":
            if len(stack) > (marks[-1] if marks else 0):
                stack.pop()
            else:
                pop_mark()
        elif name == "POP_MARK":
            pop_mark()
        elif name == "DUP":
            stack.append(stack[-1])
        elif name == "STOP":
            return stack.pop()
        elif name in ("PROTO", "FRAME", "READONLY_BUFFER"):
            continue
        else:  # bytes, buffers, PERSID, EMPTY_SET, extension codes: values no state dict key or shape needs
            stack.append(_OPAQUE)
    raise PickleRefused("a pickle that ends without STOP", broken=True)


def _state_dict_shapes(obj: object) -> dict[str, tuple[int, ...]]:
    """The ``{key: shape}`` of the tensor dict inside ``obj``, found as the loader finds it (wrapper keys)."""
    current = obj
    for _ in range(3):
        if not isinstance(current, Mapping):
            return {}
        shapes = {k: v.shape for k, v in current.items() if isinstance(k, str) and isinstance(v, _Tensor)}
        inner = next((current[k] for k in WRAPPER_KEYS if isinstance(current.get(k), Mapping) and current[k]), None)
        if (shapes and len(shapes) == len(current)) or inner is None:
            return shapes
        current = inner
    return {}


def zip_pickle_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the state dict in a ``torch.save`` zip (directly or under ``module``/``state_dict``/
    ``model``), from ``data.pkl``'s opcodes: nothing is unpickled or imported and no tensor data is read.

    ``{}`` when the file is not a zip (a legacy pickle) or names no tensors; a pickle the bounded scan
    refuses, or a damaged one, is a :class:`CheckpointError` naming the file.
    """
    try:
        with open_regular(path) as fh:
            if not zipfile.is_zipfile(fh):
                return {}
            data = read_data_pkl(fh)
        scan_pickle(data)  # the bounds first: the evaluator below only ever sees a pickle they accepted
        return _state_dict_shapes(_evaluate(data))
    except PickleRefused as refused:
        raise CheckpointError(path, f"is not a checkpoint this pack can read: its data.pkl holds {refused.reason}.",
                              "Download the file again; if it came from elsewhere, do not use it.") from None
    except (KeyError, IndexError, ValueError, TypeError) as exc:  # damaged in a way the scan's walk allowed
        raise CheckpointError(path, f"has a damaged data.pkl ({type(exc).__name__}).",
                              "It is probably truncated or corrupt: download it again.") from None

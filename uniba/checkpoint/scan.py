"""A bounded walk over a pickle's opcodes, run before anything unpickles it, and the one reader of ``data.pkl``.

``torch.load(weights_only=True)`` never runs code, but it trusts the *shape* of the pickle: a dict key that is
a tuple nested a million deep crashes the process when it is hashed, millions of MEMOIZE opcodes cost
gigabytes, and a missing memo slot or a stack underflow escapes as ``KeyError``/``IndexError``. No honest
checkpoint looks like that, so :func:`scan_pickle` simulates the unpickler's stack and memo *without building
any object* (only each value's nesting depth and, for short strings, its text) and refuses, with a
:class:`PickleRefused`, anything past the limits in :class:`Limits`. It stays linear in time (long strings
are never copied) and bounded in memory, and gives up after a wall-time limit.

The same walk reports every storage type the pickle names (``torch.BFloat16Storage``...), which is how
:mod:`.dtype` knows a ``.pt``'s dtype without loading it.
"""

from __future__ import annotations

import io
import os
import pickletools
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from .files import open_regular


@dataclass(frozen=True)
class Limits:
    """What no honest checkpoint pickle exceeds, by a wide margin.

    The Inf-DiT release's ``data.pkl`` (DeepSpeed states included) is 131 KB: 30k opcodes, 8k memo entries,
    containers 6 deep; Sana 1600M's is 37 KB. A million-deep tuple is what crashes torch's unpickler.
    """

    max_bytes: int = 64 * 2**20  # of one data.pkl (or of the pickles at the head of a legacy file)
    max_opcodes: int = 2_000_000
    max_memo: int = 500_000
    max_stack: int = 200_000
    max_depth: int = 100  # containers inside containers
    max_seconds: float = 10.0  # of this thread's CPU time: a busy machine does not refuse an honest file


LIMITS = Limits()
_TEXT_CHARS = 200  # longer strings are never kept: a storage type name is short, and copies stay cheap
_CLOCK_EVERY = 1 << 15


class PickleRefused(Exception):
    """The pickle is past a limit or broken; ``reason`` says how, in words for the user."""

    def __init__(self, reason: str, broken: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.broken = broken  # corrupt (True) rather than over a limit (False)


class _Node:
    """One simulated value: how deep its containers nest, its text if it is a short string or a global."""

    __slots__ = ("depth", "text", "contained")

    def __init__(self, depth: int, text: str | None = None) -> None:
        self.depth = depth
        self.text = text
        self.contained = False


_ATOM = _Node(0)  # every number, None, bool and bytes value: shared, so pushing one costs no memory

# What each opcode does to the simulated stack, as a small number (checked in order of frequency).
(_PUT, _GET, _TEXT, _ATOM_OP, _BUILD_N, _MARK_OP, _FROM_MARK, _ADD_FROM_MARK, _POP_INTO, _EMPTY, _GLOBAL,
 _STACK_GLOBAL, _POP, _POP_MARK, _DUP, _STOP, _NOTHING) = range(17)
_KIND: dict[str, int] = {
    **dict.fromkeys(("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"), _PUT),
    **dict.fromkeys(("GET", "BINGET", "LONG_BINGET"), _GET),
    **dict.fromkeys(("STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE",
                     "BINUNICODE8"), _TEXT),
    **dict.fromkeys(("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "NONE", "NEWTRUE",
                     "NEWFALSE", "FLOAT", "BINFLOAT", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8",
                     "NEXT_BUFFER", "EXT1", "EXT2", "EXT4", "PERSID"), _ATOM_OP),
    **dict.fromkeys(("TUPLE1", "TUPLE2", "TUPLE3", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BINPERSID"), _BUILD_N),
    "MARK": _MARK_OP,
    **dict.fromkeys(("TUPLE", "LIST", "DICT", "FROZENSET", "INST", "OBJ"), _FROM_MARK),
    **dict.fromkeys(("APPENDS", "SETITEMS", "ADDITEMS"), _ADD_FROM_MARK),
    **dict.fromkeys(("APPEND", "SETITEM", "BUILD"), _POP_INTO),
    **dict.fromkeys(("EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_DICT", "EMPTY_SET"), _EMPTY),
    "GLOBAL": _GLOBAL, "STACK_GLOBAL": _STACK_GLOBAL, "POP": _POP, "POP_MARK": _POP_MARK, "DUP": _DUP,
    "STOP": _STOP, **dict.fromkeys(("PROTO", "FRAME", "READONLY_BUFFER"), _NOTHING),
}
# values taken from the stack by the opcodes that take a fixed number
_TAKES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3, "REDUCE": 2, "NEWOBJ": 2, "NEWOBJ_EX": 3, "BINPERSID": 1,
          "APPEND": 1, "SETITEM": 2, "BUILD": 1}


class _Walk:
    def __init__(self, limits: Limits, on_global: Callable[[str], None] | None, deadline: float) -> None:
        self.limits = limits
        self.on_global = on_global
        self.deadline = deadline
        self.opcodes = 0

    def _new(self, children: list[_Node]) -> _Node:
        depth = 0
        for child in children:
            child.contained = True
            if child.depth > depth:
                depth = child.depth
        node = _Node(depth + 1)
        if node.depth > self.limits.max_depth:
            raise PickleRefused(f"values nested more than {self.limits.max_depth} deep")
        return node

    def _grow(self, target: _Node, children: list[_Node]) -> None:
        grown = self._new(children)
        if target is _ATOM or grown.depth <= target.depth:
            return
        if target.contained:
            # its containers were measured without this: a depth only honest pickles keep honest
            raise PickleRefused("a container grown after it was placed inside another one")
        target.depth = grown.depth

    def run(self, stream: BinaryIO) -> None:
        """Walk one pickle (up to its STOP); raise :class:`PickleRefused` when it is past a limit or broken."""
        limits = self.limits
        stack: list[_Node] = []
        marks: list[int] = []
        memo: dict[int, _Node] = {}

        def pop(count: int) -> list[_Node]:
            if len(stack) - (marks[-1] if marks else 0) < count:
                raise PickleRefused("a stack underflow (an opcode takes more values than were pushed)", broken=True)
            taken = stack[-count:]
            del stack[-count:]
            return taken

        def pop_mark() -> list[_Node]:
            if not marks:
                raise PickleRefused("a stack underflow (no MARK to return to)", broken=True)
            start = marks.pop()
            taken = stack[start:]
            del stack[start:]
            return taken

        def top() -> _Node:
            if len(stack) <= (marks[-1] if marks else 0):
                raise PickleRefused("a stack underflow (an opcode needs a value that is not there)", broken=True)
            return stack[-1]

        try:
            for opcode, arg, _ in pickletools.genops(stream):
                self.opcodes += 1
                if self.opcodes % _CLOCK_EVERY == 0:
                    if self.opcodes > limits.max_opcodes:
                        raise PickleRefused(f"more than {limits.max_opcodes:,} pickle opcodes")
                    if time.thread_time() > self.deadline:
                        raise PickleRefused(f"more than {limits.max_seconds:g} s of pickle opcodes to examine")
                name = opcode.name
                kind = _KIND.get(name)
                if kind == _PUT:
                    value = top()
                    memo[len(memo) if name == "MEMOIZE" else arg] = value
                    if len(memo) > limits.max_memo:
                        raise PickleRefused(f"more than {limits.max_memo:,} memo entries")
                elif kind == _GET:
                    value = memo.get(arg)
                    if value is None:
                        raise PickleRefused(f"a read of memo slot {arg} that was never written", broken=True)
                    stack.append(value)
                    if self.on_global and value.text and value.text.startswith("global:"):
                        self.on_global(value.text[7:])
                elif kind == _TEXT:
                    stack.append(_Node(0, arg if isinstance(arg, str) and len(arg) <= _TEXT_CHARS else None))
                elif kind == _ATOM_OP:
                    stack.append(_ATOM)
                elif kind == _BUILD_N:
                    stack.append(self._new(pop(_TAKES[name])))
                elif kind == _MARK_OP:
                    marks.append(len(stack))
                    if len(marks) > limits.max_depth:
                        raise PickleRefused(f"MARKs nested more than {limits.max_depth} deep")
                elif kind == _FROM_MARK:
                    stack.append(self._new(pop_mark()))
                elif kind == _ADD_FROM_MARK:
                    items = pop_mark()
                    self._grow(top(), items)
                elif kind == _POP_INTO:
                    items = pop(_TAKES[name])
                    self._grow(top(), items)
                elif kind == _EMPTY:
                    stack.append(_Node(1))
                elif kind == _GLOBAL:
                    text = "global:" + arg if isinstance(arg, str) and len(arg) <= _TEXT_CHARS else None
                    stack.append(_Node(0, text))
                    if self.on_global and text:
                        self.on_global(text[7:])
                elif kind == _STACK_GLOBAL:
                    module, attr = pop(2)
                    parts = (module.text, attr.text)
                    text = f"global:{parts[0]} {parts[1]}" if all(parts) else None
                    stack.append(_Node(0, text))
                    if self.on_global and text:
                        self.on_global(text[7:])
                elif kind == _POP:
                    if len(stack) > (marks[-1] if marks else 0):
                        stack.pop()
                    else:
                        pop_mark()  # what CPython's unpickler does with POP right after MARK
                elif kind == _POP_MARK:
                    pop_mark()
                elif kind == _DUP:
                    stack.append(top())
                elif kind == _STOP:
                    pop(1)
                    return
                elif kind != _NOTHING:
                    raise PickleRefused(f"the opcode {name}, which checkpoints do not use", broken=True)
                if len(stack) > limits.max_stack:
                    raise PickleRefused(f"more than {limits.max_stack:,} values on the pickle stack")
        except (ValueError, EOFError, UnicodeDecodeError, OverflowError) as exc:
            raise PickleRefused(f"a damaged pickle ({exc})", broken=True) from None
        raise PickleRefused("a pickle that ends without STOP", broken=True)


def scan_pickle(data: bytes | BinaryIO, limits: Limits = LIMITS,
                on_global: Callable[[str], None] | None = None) -> None:
    """Walk one pickle; ``on_global("module name")`` is told of every global it names or fetches from its memo.

    Raises :class:`PickleRefused` when it is past ``limits`` or broken.
    """
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    _Walk(limits, on_global, time.thread_time() + limits.max_seconds).run(stream)


def _scan_legacy(head: bytes, limits: Limits, on_global: Callable[[str], None] | None) -> None:
    """torch.save's legacy format: magic number, protocol, system info, the object, the storage keys.

    torch reads them in turn and stops at the first broken one, so the walk does too; the raw tensor bytes
    after the fifth are never examined. Only the first must be a pickle at all.
    """
    stream = io.BytesIO(head)
    walk = _Walk(limits, on_global, time.thread_time() + limits.max_seconds)
    for index in range(5):
        if stream.tell() >= len(head):
            return
        try:
            walk.run(stream)
        except PickleRefused as refused:
            if not refused.broken:
                raise
            if len(head) >= limits.max_bytes:  # cut off by the bound, not broken
                raise PickleRefused(f"pickles longer than {limits.max_bytes // 2**20} MB") from None
            if index == 0:
                raise
            return


def data_pkl_name(archive: zipfile.ZipFile) -> str:
    """The one ``data.pkl`` record of a ``torch.save`` zip (torch reads ``<archive name>/data.pkl``)."""
    names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(names) != 1:
        raise PickleRefused(f"a zip with {len(names)} data.pkl records instead of one", broken=True)
    return names[0]


def read_data_pkl(fh: BinaryIO, limits: Limits = LIMITS) -> bytes:
    """The bytes of a ``torch.save`` zip's ``data.pkl``, read from an open regular file with a size bound.

    An encrypted record, an unknown compression method, a corrupt deflate stream or a damaged directory is a
    :class:`PickleRefused` (broken), whatever :mod:`zipfile` raised for it.
    """
    try:
        with zipfile.ZipFile(fh) as archive:
            info = archive.getinfo(data_pkl_name(archive))
            if info.flag_bits & 0x1:
                raise PickleRefused("an encrypted data.pkl record", broken=True)
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise PickleRefused(f"a data.pkl record compressed with method {info.compress_type}, which torch "
                                    "does not write", broken=True)
            if info.file_size > limits.max_bytes:
                raise PickleRefused(f"a data.pkl of {info.file_size:,} bytes (more than "
                                    f"{limits.max_bytes // 2**20} MB)")
            with archive.open(info) as record:
                data = record.read(limits.max_bytes + 1)
            if len(data) > limits.max_bytes:
                raise PickleRefused(f"a data.pkl larger than {limits.max_bytes // 2**20} MB")
            return data
    except PickleRefused:
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile raises RuntimeError, NotImplementedError, zlib.error...
        raise PickleRefused(f"a damaged zip ({type(exc).__name__}: {str(exc)[:200]})", broken=True) from None


def scan_file(path: str | os.PathLike, fh: BinaryIO | None = None, limits: Limits = LIMITS,
              on_global: Callable[[str], None] | None = None) -> None:
    """Scan the pickle(s) a ``.pt`` holds: a zip's ``data.pkl``, or the five pickles that open a legacy file.

    ``fh`` is the file already opened by the caller (so the scanned file is the one it loads); raises
    :class:`PickleRefused`. A legacy file's raw tensor bytes after its pickles are never read.
    """
    own = fh is None
    fh = open_regular(path) if fh is None else fh
    try:
        fh.seek(0)
        if zipfile.is_zipfile(fh):
            scan_pickle(read_data_pkl(fh, limits), limits, on_global)
            return
        fh.seek(0)
        _scan_legacy(fh.read(limits.max_bytes), limits, on_global)
    finally:
        if own:
            fh.close()

"""What a checkpoint path may be before anything opens it: a regular, non-empty file of a known kind.

Opening a FIFO blocks until someone writes to it and ``/dev/zero`` never ends, so every reader first
``stat``-s the path (:func:`check_file`) and then opens it through :func:`open_regular`, which checks the
opened file again: a path swapped for a pipe between the two is still refused, never waited on.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
SUPPORTED_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES

_SPECIAL_FILES = (
    (stat.S_ISFIFO, "is a named pipe (FIFO), not a regular file; reading it would wait for a writer forever"),
    (stat.S_ISCHR, "is a character device (such as /dev/zero), not a regular file"),
    (stat.S_ISBLK, "is a block device, not a regular file"),
    (stat.S_ISSOCK, "is a socket, not a regular file"),
)


def _refuse_special(path: str | os.PathLike, st: os.stat_result, fix: str) -> None:
    for test, problem in _SPECIAL_FILES:
        if test(st.st_mode):
            raise CheckpointError(path, problem + ".", fix)
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(path, "is not a regular file.", fix)


def check_file(path: str | os.PathLike, *, allow_dir: bool = False,
               fix: str = "Choose the model file itself.") -> os.stat_result:
    """``stat`` a path before anything opens it: a regular, non-empty file (or a folder if ``allow_dir``).

    Follows symlinks; a symlink loop or a dangling link gets its own message. Returns the ``stat``
    result so readers can bound what they read by ``st_size``.
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
    _refuse_special(path, st, fix)
    if st.st_size == 0:
        raise CheckpointError(path, "is empty (0 bytes).", "The download did not finish: download it again.")
    return st


def open_regular(path: str | os.PathLike, fix: str = "Choose the model file itself.") -> BinaryIO:
    """Open a checked file for reading; the opened file is checked again, so a swapped-in pipe never blocks.

    ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a writer; the flag is
    cleared again once ``fstat`` has confirmed a regular file.
    """
    check_file(path, fix=fix)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be opened ({exc.strerror or exc}).", "Check the path.") from None
    try:
        _refuse_special(path, os.fstat(fd), fix)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_head(path: str | os.PathLike, count: int) -> bytes:
    """The first ``count`` bytes of a checked regular file (a signature test)."""
    with open_regular(path) as fh:
        return fh.read(count)

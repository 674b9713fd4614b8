"""Writing an output file without ever losing one: the only place the engine and the CLI create output files.

Rules:

* The data goes to a temporary file with a unique name in the target's folder (``mkstemp``: created by us,
  never an existing file), so a failed or interrupted write leaves the old file, or nothing, behind.
* The temporary file is removed on any error, on Ctrl-C and on SIGTERM (while a write runs, SIGTERM becomes
  an exception, so the clean-up runs; the signal is delivered again afterwards, so the process still ends
  the way its sender expects). Only that temporary name, created exclusively by this process, is ever
  removed; no other file is deleted.
* Publishing does not replace: the temporary file gets the target name with ``renameat2(RENAME_NOREPLACE)``,
  or a hard link, or a name reserved with ``O_EXCL``, whichever this system and file system allow. If the name
  appeared while we worked (another program wrote it), nothing is replaced and :class:`PublishError` says so,
  unless the caller asked to overwrite.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path


class PublishError(ValueError):
    """An output could not be written or published; the message names the file and says what to do."""


class _Terminated(BaseException):
    """SIGTERM during a write: unwinds like Ctrl-C so the temporary file is removed."""


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_renameat2: Callable[..., int] | None | bool = False  # False: not looked up yet; None: not available


def _libc_renameat2() -> Callable[..., int] | None:
    global _renameat2
    if _renameat2 is False:
        _renameat2 = None
        if sys.platform.startswith("linux"):
            try:
                function = ctypes.CDLL(None, use_errno=True).renameat2
                function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                function.restype = ctypes.c_int
                _renameat2 = function
            except (OSError, AttributeError):  # an older C library
                pass
    return _renameat2  # type: ignore[return-value]


def _exists_error(target: Path, what: str) -> PublishError:
    return PublishError(f"{what} {target}: appeared while this ran (another program wrote it), so it was not "
                        "replaced and the new result was discarded; pass --overwrite to replace it, or choose "
                        "another name.")


def publish_no_replace(tmp: Path, target: Path, what: str = "output") -> None:
    """Give ``tmp`` the name ``target`` only if that name is free; :class:`PublishError` if it is taken."""
    rename = _libc_renameat2()
    if rename is not None:
        if rename(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise _exists_error(target, what)
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
            raise OSError(code, os.strerror(code), str(target))
    try:
        os.link(tmp, target)  # fails if the name exists; then our temporary name goes
    except FileExistsError:
        raise _exists_error(target, what) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV):
            raise
        # no hard links here (FAT, some network shares): reserve the name, then replace our own placeholder
        try:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            raise _exists_error(target, what) from None
        os.replace(tmp, target)
        return
    os.unlink(tmp)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`_Terminated` (main thread only; elsewhere Python cannot catch it)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, previous)
        previous = None
        signal.raise_signal(signal.SIGTERM)  # the clean-up has run: now end as the sender asked
        raise KeyboardInterrupt from None  # only reached if the previous handler returns
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _reason(exc: OSError) -> tuple[str, str]:
    """(what went wrong, what to do) for a failed write."""
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return "the disk is full", "Free some space or write to another folder."
    if exc.errno == errno.EFBIG:
        return "the file is larger than this file system or the process's limits allow", \
            "Write to another folder or raise the file size limit."
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied ({exc.strerror})", "Choose a folder you can write to."
    return exc.strerror or str(exc), "Check the folder and try again."


def publish(target: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = False,
            what: str = "output") -> Path:
    """Run ``write(tmp)`` on a new temporary file beside ``target``, then publish it under ``target``.

    Without ``overwrite``, an existing ``target`` (even one that appeared during the write) is never replaced.
    With it, a symbolic link at ``target`` keeps pointing where it did and its file is replaced. ``write``'s
    ``OSError`` becomes a :class:`PublishError`; anything else it raises passes through after the clean-up.
    Returns the path written.
    """
    target = Path(target)
    final = Path(os.path.realpath(target)) if overwrite and target.is_symlink() else target
    folder = Path(os.path.realpath(final)).parent
    with _sigterm_unwinds():
        tmp: Path | None = None
        try:
            try:
                fd, name = tempfile.mkstemp(dir=folder, prefix=f".{final.name}.", suffix=".partial")
            except OSError as exc:
                problem, fix = _reason(exc)
                raise PublishError(f"{what} {target}: cannot write into the folder {folder} ({problem}). "
                                   f"{fix}") from None
            tmp = Path(name)
            os.close(fd)
            try:
                write(tmp)
                if overwrite:
                    os.replace(tmp, final)
                else:
                    publish_no_replace(tmp, final, what)
            except OSError as exc:
                problem, fix = _reason(exc)
                kept = " The existing file is unchanged." if os.path.lexists(final) else ""
                raise PublishError(f"{what} {target}: could not be written ({problem}); nothing was left "
                                   f"behind.{kept} {fix}") from None
        finally:
            if tmp is not None:  # a name mkstemp created for us alone (writers may replace the file under it)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
    return final

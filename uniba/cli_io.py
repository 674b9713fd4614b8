"""File handling of the command line: every argument checked before any work, outputs that never lose data.

Rules (issue 11 items 1 and 2):

* Inputs are ``stat``-ed first (:func:`uniba.checkpoint.check_file`): a FIFO, a device, a folder, a
  symlink loop or an empty file is one clear error, never a hang.
* An output that is an input (the same file, after resolving links and hard links) is refused, and so
  is an existing output unless ``--overwrite`` is given. The output's folder must exist and accept a
  new file (probed by creating one), and its extension must name a format the command writes.
* Outputs are written through :func:`uniba.publish.publish`: a uniquely named temporary file in the target
  folder, removed on error, Ctrl-C and SIGTERM, and published without replacing a file that appeared
  meanwhile unless ``--overwrite`` was given.
* Errors are :class:`CliError` (a ``ValueError``): ``python -m uniba`` prints them as one
  ``error: ...`` line without a traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .checkpoint import CheckpointError, check_file
from .devices import default_device
from .guards import check_finite
from .memory import parse_bytes
from .publish import publish

log = logging.getLogger(__name__)

# Image formats the upscaler writes, by extension, and whether they keep an alpha channel.
IMAGE_FORMATS: dict[str, str] = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP",
                                 ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}
ALPHA_FORMATS = frozenset({"PNG", "WEBP", "TIFF", "BMP"})
SAFETENSORS_FORMATS: dict[str, str] = {".safetensors": "safetensors"}


class CliError(ValueError):
    """A bad command-line argument, reported as one ``error:`` line."""


# --------------------------------------------------------------------------- argparse types

def _number(text: str, cast: type, noun: str, ok: Callable[[Any], bool], rule: str) -> Any:
    """Parse ``text`` with ``cast`` and check it, as argparse types report: one sentence, no traceback."""
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
    if not ok(value):  # nan fails every comparison, so it is refused here too
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    return _number(text, int, "a whole number", lambda v: v >= 1, "at least 1")


def seed_int(text: str) -> int:
    """argparse type: a seed, 0 to 2**64 - 1."""
    return _number(text, int, "a whole number", lambda v: 0 <= v < 2**64, "between 0 and 2**64 - 1")


def unit_float(text: str) -> float:
    """argparse type: a finite number in [0, 1]."""
    return _number(text, float, "a number", lambda v: 0.0 <= v <= 1.0, "between 0 and 1")


def memory_size(text: str) -> int:
    """argparse type: a memory size such as ``12GB`` (at least 1 byte)."""
    try:
        value = parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 bytes, got {text!r}")
    return value


# --------------------------------------------------------------------------- inputs

def input_file(path: str | os.PathLike, what: str, *, allow_dir: bool = False) -> Path:
    """An existing, regular, non-empty input file (or a folder if ``allow_dir``); CliError otherwise."""
    try:
        check_file(path, allow_dir=allow_dir, fix=f"Give {what} as a regular file.")
    except CheckpointError as exc:
        raise CliError(f"{what}: {exc}") from None
    return Path(path)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def output_file(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                overwrite: bool = False, formats: Mapping[str, str], what: str = "output") -> Path:
    """Check an output path before any work: format from the extension, not an input, folder writable.

    ``formats`` maps the extensions the command writes to their format names; any other extension
    is refused (the extension decides the format, so bytes of one format never get another's name).
    """
    target = Path(path)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
        if os.path.islink(target):
            raise CliError(f"{what} {target}: is a symbolic link to a missing file; give a plain file name.") \
                from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CliError(f"{what} {target}: is a symbolic link loop; give a plain file name.") from None
        raise CliError(f"{what} {target}: cannot be used ({_reason(exc)}).") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise CliError(f"{what} {target}: is a folder; give a file name inside it, e.g. "
                           f"{target / ('result' + next(iter(formats)))}.")
        if not stat.S_ISREG(st.st_mode):
            raise CliError(f"{what} {target}: is not a regular file (a device, pipe or socket); choose a file name.")
    if target.suffix.lower() not in formats:
        names = ", ".join(sorted(formats))
        kinds = " or ".join(sorted(set(formats.values())))
        raise CliError(f"{what} {target}: the extension '{target.suffix or '(none)'}' is not one this command "
                       f"writes; it writes {kinds}: name the file with {names}.")
    if st is not None:
        for source in inputs:
            if source is not None and _same_file(target, Path(source)):
                raise CliError(f"{what} {target}: is the input file {source}; writing it would destroy the input. "
                               "Choose another output name.")
        if not overwrite:
            raise CliError(f"{what} {target}: already exists; pass --overwrite to replace it, or choose another "
                           "name.")
    folder = Path(os.path.realpath(target)).parent
    if not folder.is_dir():
        raise CliError(f"{what} {target}: the folder {folder} does not exist; create it first.")
    try:  # the only reliable writability test (root, read-only mounts, /proc, /sys) is to create a file
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".uniba-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CliError(f"{what} {target}: cannot write into the folder {folder} ({_reason(exc)}).") from None
    return target


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


# --------------------------------------------------------------------------- devices

def resolve_device(text: str | None) -> torch.device:
    """``--device``: cuda/mps/cpu (with an index) that this torch build can use; default
    :func:`uniba.devices.default_device`."""
    if not text:
        return default_device()
    try:
        device = torch.device(text)
    except RuntimeError:
        raise CliError(f"--device {text!r} is not a device name; use cpu, cuda, cuda:1 or mps.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = torch.__version__ + ("" if torch.version.cuda else ", built without CUDA")
            raise CliError(f"--device {text}: CUDA is not available in this torch ({build}). Install a CUDA build "
                           "of torch, or use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {text}: there are only {torch.cuda.device_count()} CUDA device(s).")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise CliError(f"--device {text}: MPS (Apple GPU) is not available here; use --device cpu.")
    elif device.type != "cpu":
        raise CliError(f"--device {text}: only cpu, cuda and mps are supported.")
    return device


# --------------------------------------------------------------------------- images

def read_image(path: str | os.PathLike, what: str = "input") -> torch.Tensor:
    """An image file as (1, 3 or 4, H, W) in [-1, 1] (4 when it has transparency); CliError if it is not one."""
    source = input_file(path, f"{what} image")
    try:
        with Image.open(source) as img:
            img.load()
            has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
            array = np.asarray(img.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise CliError(f"{what} image {source}: is not an image file this program can read "
                       "(PNG, JPEG, WebP, TIFF, BMP ...).") from None
    except Image.DecompressionBombError as exc:
        raise CliError(f"{what} image {source}: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise CliError(f"{what} image {source}: cannot be decoded ({exc}); the file is probably damaged.") from None
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1


def image_format(path: str | os.PathLike) -> str:
    """The image format an output path asks for (by extension; :func:`output_file` refused others)."""
    return IMAGE_FORMATS[Path(path).suffix.lower()]


def alpha_dropped(channels: int, path: str | os.PathLike) -> bool:
    """True (and a warning) when an image with alpha goes to a format without it: the alpha is dropped."""
    fmt = image_format(path)
    if channels == 4 and fmt not in ALPHA_FORMATS:
        log.warning("%s: %s has no alpha channel, so the transparency of the input is dropped; "
                    "use .png or .webp to keep it", path, fmt)
        return True
    return False


def write_image(tensor: torch.Tensor, path: str | os.PathLike, what: str = "output image", *,
                overwrite: bool = False) -> None:
    """(1, 3 or 4, H, W) in [-1, 1] -> an image file, atomically; refuses NaN/inf (they would save as black).

    Without ``overwrite`` a file that appeared under ``path`` while the work ran is never replaced.
    """
    check_finite(tensor, what, "Nothing was written. Try --dtype fp32 (fp16 overflows), or check the model file.")
    fmt = image_format(path)
    image = tensor[0]
    if image.shape[0] == 4 and fmt not in ALPHA_FORMATS:
        image = image[:3]
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(array, "RGBA" if array.shape[-1] == 4 else "RGB")
    publish(path, lambda tmp: pil.save(tmp, format=fmt), overwrite=overwrite, what=what)

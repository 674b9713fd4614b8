"""Writing a state dict as a safetensors file, published without losing any file (:mod:`uniba.publish`)."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..publish import publish


def _as_os_error(exc: SafetensorError) -> OSError:
    """The OS error inside safetensors' message ("... Os { code: 28, ... }"), so the write is reported in words."""
    match = re.search(r"code: (\d+)|os error (\d+)", str(exc))
    code = int(next(g for g in match.groups() if g)) if match else errno.EIO
    return OSError(code, os.strerror(code))


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None, *, overwrite: bool = True,
                     what: str = "output") -> Path:
    """Write a safetensors file through a temporary file; nothing partial stays behind on error or signal.

    ``overwrite=False`` (the converters without ``--overwrite``) never replaces a file, even one that
    appeared while this ran; a full disk is one :class:`~uniba.publish.PublishError` sentence.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as exc:
            if "code:" in str(exc) or "os error" in str(exc):
                raise _as_os_error(exc) from None
            raise

    return publish(path, write, overwrite=overwrite, what=what)

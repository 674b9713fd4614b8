"""Config dataclasses as JSON, the form the converters store them in a safetensors file's metadata, and the one
reader of such metadata: bad JSON or impossible values become a CheckpointError naming the file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, fields
from typing import Any, TypeVar

from .checkpoint import CheckpointError
from .guards import validate_config

T = TypeVar("T")
_DAMAGED = "The file's metadata is damaged: convert the original release again."


def config_to_json(config: Any) -> str:
    """A config dataclass as sorted JSON (nested dataclasses become objects)."""
    return json.dumps(asdict(config), sort_keys=True)


def config_from_json(cls: type[T], text: str, nested: dict[str, type] | None = None) -> T:
    """Rebuild ``cls`` from :func:`config_to_json` output, ignoring fields a newer version added.

    ``nested`` names fields that hold a dataclass of their own (``{"clip": ClipVisionConfig}``).
    """
    data = json.loads(text)
    known = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in data.items() if k in known}
    for name, sub in (nested or {}).items():
        if kwargs.get(name) is not None:
            kwargs[name] = sub(**kwargs[name])
    return cls(**kwargs)


def _text(text: object, path: str | os.PathLike | None, key: str) -> str:
    if not isinstance(text, str):
        raise CheckpointError(path, f"has a '{key}' metadata entry that is not text ({type(text).__name__}).",
                              "Convert the original release again.")
    return text


def metadata_object(text: object, path: str | os.PathLike | None, key: str = "config") -> dict[str, Any]:
    """A JSON object stored in a file's metadata (config fields a loader completes and validates itself)."""
    try:
        data = json.loads(_text(text, path, key))
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(path, f"has '{key}' metadata that is not valid JSON ({exc}).", _DAMAGED) from None
    if not isinstance(data, dict):
        raise CheckpointError(path, f"has '{key}' metadata that is not a JSON object.", _DAMAGED)
    return data


def config_from_metadata(parse: Callable[[str], T], text: object, path: str | os.PathLike | None,
                         key: str = "config") -> T:
    """Parse a whole config stored as JSON in a file's metadata and validate it."""
    try:
        config = parse(_text(text, path, key))
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(path, f"has '{key}' metadata that is not valid JSON ({exc}).", _DAMAGED) from None
    except (TypeError, AttributeError, KeyError) as exc:
        raise CheckpointError(path, f"has '{key}' metadata of the wrong form ({exc}).", _DAMAGED) from None
    return validate_config(config, path, f"the '{key}' metadata")

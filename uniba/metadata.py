"""Config dataclasses as JSON, the form the converters store them in a safetensors file's metadata."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any, TypeVar

T = TypeVar("T")


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

"""DC-AE f32c32, the deep-compression autoencoder of Sana: config, key conversion, model, loader, exact tiling.

Public names are imported lazily (the CLI lists benchmarks without building models).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DCAEConfig": ".config",
    "DCAE": ".model",
    "load_dcae": ".loader",
    "decode_exact": ".tiling",
    "encode_exact": ".tiling",
    "plan_pass": ".tiling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

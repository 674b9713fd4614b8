"""DC-AE f32c32, the deep-compression autoencoder of Sana: config, key conversion, model, loader, exact tiling.

Public names are imported lazily (the CLI lists benchmarks without building models).
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "DCAEConfig": ".config",
    "DCAE": ".model",
    "load_dcae": ".loader",
    "read_dcae_checkpoint": ".loader",
    "build_dcae": ".loader",
    "decode_exact": ".tiling",
    "encode_exact": ".tiling",
    "plan_pass": ".tiling",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)

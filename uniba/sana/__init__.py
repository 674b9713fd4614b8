"""Sana: linear DiT, Flow-DPM-Solver, Gemma-2 prompt encoding and the DC-AE autoencoder.

Public names are imported lazily so that using one part (say the DC-AE) does not import the
others (say transformers for Gemma).
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    # the DiT and its sampler (issue: Sana DiT)
    "SanaDiT": ".model",
    "SanaConfig": ".model",
    "load_sana": ".loader",
    "flow_sigmas": ".sampling",
    "sample_flow_dpm_solver": ".sampling",
    "sample_flow_euler": ".sampling",
    # Sana-Sprint's sCM sampler and schedule
    "sample_scm": ".sprint",
    "sprint_sigmas": ".sprint",
    # text encoder and autoencoder (issue: Sana text encoder and DC-AE)
    "encode_prompt": ".text_encoder",
    "load_text_encoder": ".text_encoder",
    "DCAE": "uniba.dcae.model",
    "load_dcae": "uniba.dcae.loader",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)

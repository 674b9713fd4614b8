"""UniBA engine: host-free torch implementations of Inf-DiT, HiDiffusion and Sana.

Nothing in this package imports ComfyUI. Subpackages: :mod:`uniba.infdit`, :mod:`uniba.sana`,
:mod:`uniba.hidiffusion`; shared pieces: :mod:`uniba.memory` (budgeting and out-of-memory retry),
:mod:`uniba.checkpoint` (safe reading, strict key checks, the one model-loading path),
:mod:`uniba.progress`, :mod:`uniba.metadata` (config dataclasses as JSON in checkpoint metadata).
"""

__version__ = "0.1.0"

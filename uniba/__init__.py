"""UniBA engine: host-free torch implementations of Inf-DiT, HiDiffusion and Sana.

Nothing in this package imports ComfyUI. Subpackages: :mod:`uniba.infdit`, :mod:`uniba.sana`,
:mod:`uniba.hidiffusion`; shared pieces: :mod:`uniba.memory` (budgeting and out-of-memory retry),
:mod:`uniba.checkpoint` (safe reading, strict key checks), :mod:`uniba.attention`,
:mod:`uniba.progress`.
"""

__version__ = "0.1.0"

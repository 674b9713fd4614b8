"""ComfyUI entry point of the UniBA node pack (Inf-DiT, HiDiffusion, Sana).

ComfyUI imports this file as a package named after its folder. The host-free engine ``uniba``
sits beside it and is imported by its absolute name, so the pack folder goes on ``sys.path``
first (appended: it never shadows another installed package).
"""

import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # Imported as a plain module, not as a package (pytest collecting a checkout whose folder name
    # is not an identifier): this is not ComfyUI loading the pack, so there is nothing to register.
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

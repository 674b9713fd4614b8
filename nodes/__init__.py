"""Thin ComfyUI node classes (V1 API). Each module exports its own mappings; they are merged here.

Node modules are declarations plus calls into the engine (``uniba``) or the ComfyUI adapter
(:mod:`.comfy`), the only code that touches ComfyUI.
"""

from . import (
    hidiffusion_nodes,
    infdit_nodes,
    routes,
    sana_adapter_nodes,
    sana_nodes,
    sana_sprint_nodes,
    sana_text_vae_nodes,
)
from .comfy import host

_MODULES = (infdit_nodes, sana_nodes, sana_sprint_nodes, sana_text_vae_nodes, sana_adapter_nodes, hidiffusion_nodes)

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
for _module in _MODULES:
    for _name, _cls in _module.NODE_CLASS_MAPPINGS.items():
        if _name in NODE_CLASS_MAPPINGS:
            raise RuntimeError(f"node id {_name} is defined twice")
        NODE_CLASS_MAPPINGS[_name] = _cls
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

host.register_model_folders()
routes.register()  # the pack's HTTP routes, on ComfyUI's server when there is one

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

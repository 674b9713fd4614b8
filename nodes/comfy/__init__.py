"""The ComfyUI adapter: the only code of the pack that touches ComfyUI.

* :mod:`.host`: devices, dtypes, free memory, model patchers, progress and Cancel, model folders,
  server routes, the out-of-memory test. Every function falls back to plain torch outside ComfyUI.
* :mod:`.sana`: Sana as native ComfyUI types (MODEL around the engine's DiT, the DC-AE as a VAE,
  the flow samplers as SAMPLERs, the one-node sampler's call into ComfyUI's sampling).
* :mod:`.hidiffusion`: facts about a ComfyUI UNet, registering the engine's hooks on a clone, and
  the host-side UNet benchmark.

Node modules (``nodes/*.py``) import these; nothing else in the pack imports ComfyUI, which
``tests/test_foundation.py`` checks by parsing every file.
"""

"""Our MODELs under core's multi-GPU nodes (v0.28 ``comfy_extras/nodes_multigpu.py``, issue 21 item 4).

Select Model Device and MultiGPU CFG Split give each extra GPU a deep clone made by
``ModelPatcher.deepclone_multigpu``, which rebuilds the model with the loader's ``cached_patcher_init``
factory. What a CPU can check: the clone owns its own weights (not the primary's module, which a
second device would then pull away), the clone computes the same image, and the non-dynamic twin
(``clone(disable_dynamic=True)``) still shares the module. Splitting work across real GPUs needs GPUs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_infdit import write_tiny_infdit  # noqa: E402
from tiny_sana import write_tiny_sana_dit  # noqa: E402

INFDIT = "infdit_tiny_multigpu.safetensors"
SANA = "sana_tiny_multigpu.safetensors"


@pytest.fixture(scope="module")
def patchers(comfy_host):
    import comfy.model_patcher as mp

    if not hasattr(mp.ModelPatcher, "deepclone_multigpu"):
        pytest.skip("this host has no multi-GPU deep clones (added in v0.28)")
    write_tiny_infdit(comfy_host.model_folder("infdit"), INFDIT)
    write_tiny_sana_dit(comfy_host.model_folder("diffusion_models"), SANA, fmt="original")
    (infdit,) = comfy_host.nodes["InfDiTLoader"]().load(INFDIT, "auto")
    (sana,) = comfy_host.nodes["SanaDiTLoader"]().load(SANA, "auto")
    return {"infdit": infdit, "sana": sana}


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict())


@pytest.mark.parametrize("family", ["infdit", "sana"])
def test_a_multigpu_deep_clone_owns_equal_weights_of_its_own(patchers, family):
    patcher = patchers[family]
    clone = patcher.deepclone_multigpu(new_load_device=torch.device("cpu"))
    assert clone.model is not patcher.model and type(clone.model) is type(patcher.model)
    ours, theirs = _tensors(patcher.model), _tensors(clone.model)
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
        assert value.data_ptr() != theirs[key].data_ptr() or value.numel() == 0, key
    # a non-dynamic twin on the same device is a view of the same module, not a copy
    twin = patcher.clone(disable_dynamic=True, force_deepcopy=True)
    assert twin.model is patcher.model


def test_the_infdit_node_gives_the_same_image_on_the_deep_clone(comfy_host, patchers):
    patcher = patchers["infdit"]
    clone = patcher.deepclone_multigpu(new_load_device=torch.device("cpu"))
    image = torch.rand(1, 24, 32, 3, generator=torch.Generator().manual_seed(1))
    node = comfy_host.nodes["InfDiTUpscale"]()
    (a,) = node.upscale(patcher, image, scale="4", steps=2, seed=3, block_batch="1")
    (b,) = node.upscale(clone, image, scale="4", steps=2, seed=3, block_batch="1")
    # the clone is not loaded yet, so the node plans it from another free-memory figure (another block batch
    # or LR-map rung): the same image to the float32 rounding of the tiny random model (outputs up to ~50)
    assert a.shape == (1, 96, 128, 3) and 0 < a.std() and (a - b).abs().max().item() <= 1e-3

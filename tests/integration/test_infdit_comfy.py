"""Inf-DiT in a real ComfyUI: InfDiTLoader -> InfDiTUpscale -> SaveImage, equal to the engine; model management."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_infdit import plan_and_upscale, write_tiny_infdit  # noqa: E402

from uniba.infdit import load_infdit  # noqa: E402

CKPT = "infdit_tiny_comfy.safetensors"


class _InfDiTTestImage:
    """A seeded random IMAGE (B, H, W, C) in [0, 1]."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "width": ("INT", {"default": 40}),
                             "height": ("INT", {"default": 36}), "channels": ("INT", {"default": 3})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, width, height, channels):
        return (_image(seed, width, height, channels),)


def _image(seed: int, width: int, height: int, channels: int = 3) -> torch.Tensor:
    return torch.rand(1, height, width, channels, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def infdit_host(comfy_host):
    write_tiny_infdit(comfy_host.model_folder("infdit"), CKPT)
    comfy_host.nodes["_InfDiTTestImage"] = _InfDiTTestImage
    yield comfy_host
    comfy_host.nodes.pop("_InfDiTTestImage", None)


def _prompt(scale="4", steps=2, seed=3, block_batch="auto", offload="auto", color="none", width=40, height=36,
            channels=3) -> dict:
    return {
        "1": {"class_type": "InfDiTLoader", "inputs": {"model_name": CKPT, "dtype": "auto"}},
        "2": {"class_type": "_InfDiTTestImage", "inputs": {"seed": 11, "width": width, "height": height,
                                                            "channels": channels}},
        "3": {"class_type": "InfDiTUpscale", "inputs": {
            "model": ["1", 0], "image": ["2", 0], "scale": scale, "steps": steps, "seed": seed,
            "block_batch": block_batch, "offload_cache": offload, "color_match": color}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "infdit_test"}},
    }


def _engine(comfy_host, scale=4, steps=2, seed=3, width=40, height=36, channels=3) -> torch.Tensor:
    model = load_infdit(comfy_host.model_folder("infdit") / CKPT, torch.float32)
    lr = _image(11, width, height, channels).movedim(-1, 1) * 2 - 1
    out = plan_and_upscale(model, lr, scale=scale, steps=steps, seed=seed, block_batch=1)
    return ((out + 1) / 2).clamp(0, 1).movedim(1, -1)


def test_nodes_are_registered(infdit_host):
    assert {"InfDiTLoader", "InfDiTUpscale"} <= set(infdit_host.pack_node_names)
    choices = infdit_host.nodes["InfDiTLoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert CKPT in choices


def test_upscale_in_comfyui_equals_the_engine(infdit_host, run_prompt):
    result = run_prompt(_prompt())
    image = result.outputs["3"][0][0]
    assert image.shape == (1, 144, 160, 3)
    assert (image.cpu() - _engine(infdit_host)).abs().max().item() <= 1e-5
    saved = list(infdit_host.output_dir.glob("infdit_test*.png"))
    assert saved
    # the model was loaded through ComfyUI's model manager, like its own models
    mm = sys.modules["comfy.model_management"]
    assert any(type(m.model.model).__name__ == "InfDiT" for m in mm.current_loaded_models if m.model is not None)


def test_block_batch_and_offload_do_not_change_the_image(infdit_host, run_prompt):
    a = run_prompt(_prompt(block_batch="1", offload="on", seed=5)).outputs["3"][0][0]
    b = run_prompt(_prompt(block_batch="4", offload="off", seed=5)).outputs["3"][0][0]
    assert (a - b).abs().max().item() <= 1e-5


def test_2x_with_alpha_and_wavelet(infdit_host, run_prompt):
    out = run_prompt(_prompt(scale="2", steps=1, channels=4, color="wavelet", width=32, height=32)).outputs["3"][0][0]
    assert out.shape == (1, 64, 64, 4)


def test_image_smaller_than_a_block_is_padded_and_cropped_back(infdit_host, run_prompt):
    out = run_prompt(_prompt(width=20, height=20, steps=1)).outputs["3"][0][0]
    assert out.shape == (1, 80, 80, 3)
    assert (out.cpu() - _engine(infdit_host, steps=1, width=20, height=20)).abs().max().item() <= 1e-5


def test_a_file_that_is_not_inf_dit_is_refused_by_name(infdit_host, run_prompt):
    from uniba.checkpoint import save_safetensors

    save_safetensors({"foo.weight": torch.zeros(2, 2)}, infdit_host.model_folder("infdit") / "not_infdit.safetensors")
    prompt = _prompt(steps=1)
    prompt["1"]["inputs"]["model_name"] = "not_infdit.safetensors"
    with pytest.raises(AssertionError, match="not_infdit.safetensors: is not an Inf-DiT checkpoint"):
        run_prompt(prompt)


def test_plan_route_counts_comfyui_samplers_by_name(infdit_host):
    """The readout sends the wired KSamplerSelect name; the route counts that ComfyUI sampler's model calls the
    way the node does (a dry run of the sampler itself), not from the steps alone."""
    routes = __import__(infdit_host.pack_module.__name__ + ".nodes.routes", fromlist=["x"])
    base = {"model": CKPT, "width": "40", "height": "36", "steps": "5"}

    def evaluations(sampler: str) -> int:
        return routes.plan_for_query({**base, "sampler": sampler}, free_bytes=lambda: 2**30)["evaluations"]

    assert (evaluations("euler"), evaluations("heun"), evaluations("dpmpp_2s_ancestral")) == (5, 9, 9)
    assert routes.plan_for_query(base, free_bytes=lambda: 2**30)["evaluations"] == 9  # none wired: EDM Heun
    with pytest.raises(routes.BadRequest, match="sampler must be one of ComfyUI's samplers .*got 'heun_edm'"):
        evaluations("heun_edm")

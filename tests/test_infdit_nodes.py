"""The Inf-DiT nodes headless (issue item 9): inputs, loading from models/infdit, upscale, progress, cancel."""

from __future__ import annotations

import pytest
import torch
from tiny_infdit import write_tiny_infdit
from uniba_pack.nodes import infdit_nodes
from uniba_pack.nodes.comfy import host
from uniba_pack.nodes.infdit_nodes import InfDiTLoader, InfDiTUpscale

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    write_tiny_infdit(tmp_path / "infdit")
    monkeypatch.setenv("UNIBA_MODELS_DIR", str(tmp_path))
    return tmp_path


def test_input_contract():
    loader = InfDiTLoader.INPUT_TYPES()["required"]
    assert list(loader) == ["model_name", "dtype"] and loader["dtype"][0] == ["auto", "bf16", "fp16", "fp32"]
    up = InfDiTUpscale.INPUT_TYPES()["required"]
    assert list(up) == ["model", "image", "scale", "steps", "seed", "block_batch", "offload_cache", "color_match"]
    assert up["scale"][0] == ["4", "2", "8", "16"] and up["scale"][1]["default"] == "4"
    assert up["steps"][1]["default"] == 20 and up["seed"][1]["default"] == 0
    assert up["seed"][1]["control_after_generate"]
    assert up["block_batch"][0] == ["auto"] + [str(n) for n in range(1, 17)]
    assert up["offload_cache"][0] == ["auto", "on", "off"] and up["color_match"][0] == ["none", "wavelet"]
    assert InfDiTLoader.RETURN_TYPES == ("INFDIT_MODEL",) and InfDiTUpscale.RETURN_TYPES == ("IMAGE",)
    assert InfDiTLoader.CATEGORY == InfDiTUpscale.CATEGORY == "UniBA/Inf-DiT"
    assert set(infdit_nodes.NODE_CLASS_MAPPINGS) == {"InfDiTLoader", "InfDiTUpscale"}


def test_load_and_upscale_headless(models_dir):
    assert InfDiTLoader.INPUT_TYPES()["required"]["model_name"][0] == ["infdit_tiny.safetensors"]
    (patcher,) = InfDiTLoader().load("infdit_tiny.safetensors", "fp32")
    image = torch.rand(1, 36, 40, 3)
    (out,) = InfDiTUpscale().upscale(patcher, image, "4", 1, 0, "2", "off", "none")
    assert out.shape == (1, 144, 160, 3) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    (again,) = InfDiTUpscale().upscale(patcher, image, "4", 1, 0, "auto", "auto", "none")
    assert (again - out).abs().max() <= 1e-5  # the same on any block batch
    (rgba,) = InfDiTUpscale().upscale(patcher, torch.rand(1, 32, 32, 4), "2", 1, 0, "1", "on", "wavelet")
    assert rgba.shape == (1, 64, 64, 4)


def test_cancel_propagates_from_the_progress_callback(models_dir, monkeypatch):
    (patcher,) = InfDiTLoader().load("infdit_tiny.safetensors", "auto")

    class Interrupted(Exception):
        pass

    calls = []

    def check():
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted

    monkeypatch.setattr(host, "check_interrupt", check)
    with pytest.raises(Interrupted):
        InfDiTUpscale().upscale(patcher, torch.rand(1, 32, 32, 3), "4", 2, 0, "1", "auto", "none")
    assert len(calls) == 3  # stopped at the block batch where Cancel was seen


def test_missing_model_file_says_where_to_put_it(models_dir):
    with pytest.raises(FileNotFoundError, match="models/infdit"):
        InfDiTLoader().load("nope.safetensors", "auto")


class FakeKSampler:
    """What ComfyUI's KSamplerSelect returns: a KSAMPLER holding a k-diffusion function and its options."""

    def __init__(self, function, extra_options=None):
        self.sampler_function = function
        self.extra_options = extra_options or {}
        self.inpaint_options = {}


def comfy_style_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                s_noise=1.0, noise_sampler=None):
    """Shaped like ComfyUI's sample_euler_ancestral: it inspects model_sampling where ComfyUI keeps it."""
    assert not hasattr(model.inner_model.inner_model.model_sampling, "shift")  # not a flow model
    sampling = model.inner_model.model_patcher.get_model_object("model_sampling")
    assert sampling.sigma_data == 0.5 and extra_args["seed"] >= 0
    from uniba.infdit.sampling import sample_euler_ancestral

    return sample_euler_ancestral(model, x, sigmas, extra_args, callback, disable, eta=eta, s_noise=s_noise,
                                  noise_sampler=noise_sampler)


def test_optional_sampler_and_sigmas_inputs(models_dir):
    from uniba.infdit.sampling import get_sigmas_karras, sample_dpmpp_2m

    optional = InfDiTUpscale.INPUT_TYPES()["optional"]
    assert optional["sampler"][0] == "SAMPLER" and optional["sigmas"][0] == "SIGMAS"
    (patcher,) = InfDiTLoader().load("infdit_tiny.safetensors", "fp32")
    image = torch.rand(1, 32, 48, 3, generator=torch.Generator().manual_seed(0))
    sigmas = get_sigmas_karras(3)
    node = InfDiTUpscale()
    ancestral = FakeKSampler(comfy_style_euler_ancestral)
    (a,) = node.upscale(patcher, image, "4", 20, 7, "1", "off", "none", ancestral, sigmas)
    (b,) = node.upscale(patcher, image, "4", 20, 7, "auto", "on", "none", ancestral, sigmas)
    assert (a - b).abs().max() <= 1e-5  # seeded CPU noise: the same on every block batch
    (c,) = node.upscale(patcher, image, "4", 20, 7, "1", "off", "none", FakeKSampler(comfy_style_euler_ancestral,
                                                                                     {"eta": 0.0}), sigmas)
    (d,) = node.upscale(patcher, image, "4", 3, 7, "1", "off", "none", FakeKSampler(sample_dpmpp_2m), None)
    assert not torch.equal(a, c) and a.shape == c.shape == d.shape == (1, 128, 192, 3)

    def sample_euler_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="CFG\\+\\+ sampler.*euler instead of euler_cfg_pp"):
        node.upscale(patcher, image, "4", 20, 7, "1", "off", "none", FakeKSampler(sample_euler_cfg_pp), sigmas)


def test_progress_counts_the_chosen_samplers_evaluations(models_dir, monkeypatch):
    from uniba.infdit.sampling import get_sigmas_karras, sample_dpmpp_2m

    seen = []

    class Recorder:
        def __init__(self, total, node_id=None, desc=""):
            seen.append(("total", total))

        def __call__(self, done, total=None, preview=None):
            seen.append((done, total))

        def close(self):
            pass

    monkeypatch.setattr(host, "Progress", Recorder)
    (patcher,) = InfDiTLoader().load("infdit_tiny.safetensors", "fp32")
    seen.clear()  # the loader reports its tensors too
    InfDiTUpscale().upscale(patcher, torch.rand(1, 32, 32, 3), "4", 20, 0, "2", "off", "none",
                            FakeKSampler(sample_dpmpp_2m), get_sigmas_karras(5))
    assert seen[0] == ("total", 5 * 4) and seen[-1] == (20, 20)  # 5 evaluations x 4 batches of 2x2 blocks

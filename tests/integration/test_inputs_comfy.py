"""Issue 23 items 6 and 7 in a real ComfyUI: a stock SD latent is never sampled into a 4x too large Sana image,
the conditioning width comes from the loaded DiT and its error names what was connected, a size the latent
cannot hold is said in the log."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_sana import TINY, write_tiny_sana_dit  # noqa: E402

CKPT = "sana_tiny_inputs.safetensors"


class _InputsTestConditioning:
    """Conditioning of any width, optionally marked as SanaTextEncode marks it (the encoder's name)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 2304, "max": 8192}), "source": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, width, source):
        options = {"attention_mask": torch.ones(1, 8)}
        if source:
            options["sana_text_encoder"] = source
        return ([[torch.randn(1, 8, width, generator=torch.Generator().manual_seed(width)), options]],)


@pytest.fixture(scope="module")
def host(comfy_host):
    write_tiny_sana_dit(comfy_host.model_folder("diffusion_models"), CKPT, fmt="original")
    comfy_host.nodes["_InputsTestConditioning"] = _InputsTestConditioning
    yield comfy_host
    comfy_host.nodes.pop("_InputsTestConditioning", None)


def _ksampler(latent: dict, positive_width: int = 2304, source: str = "") -> dict:
    return {
        "1": {"class_type": "SanaDiTLoader", "inputs": {"unet_name": CKPT, "weight_dtype": "auto"}},
        "2": {"class_type": "_InputsTestConditioning", "inputs": {"width": positive_width, "source": source}},
        "3": {"class_type": "_InputsTestConditioning", "inputs": {"width": 2304, "source": ""}},
        "4": latent,
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 1, "steps": 1, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "99": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "inputs_test"}},
    }


def test_stock_empty_latent_gives_the_right_size_or_the_fix(host, run_prompt) -> None:
    """0.28+ resize the stock latent to 1/32 (spacial_downscale_ratio); older hosts would have sampled a
    32-channel latent at 1/8 (a 4x too large image): there it is refused, naming SanaEmptyLatent."""
    import inspect

    import comfy.sample

    stock = {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 96, "batch_size": 1}}
    if "downscale_ratio_spacial" in inspect.signature(comfy.sample.fix_empty_latent_channels).parameters:
        samples = run_prompt(_ksampler(stock)).outputs["5"][0][0]["samples"]
        assert tuple(samples.shape) == (1, 32, 3, 4)
    else:
        with pytest.raises(AssertionError, match=r"\(1, 4, 12, 16\) \(an SD/SDXL latent.*Start from 'SanaEmptyLatent'"):
            run_prompt(_ksampler(stock))


def test_conditioning_width_error_names_what_was_connected(host, run_prompt) -> None:
    sana = {"class_type": "SanaEmptyLatent", "inputs": {"width": 128, "height": 96, "preset": "custom",
                                                        "batch_size": 1}}
    with pytest.raises(AssertionError, match=r"768 wide, the width of SD 1.x CLIP .*takes 2304"):
        run_prompt(_ksampler(sana, 768))
    with pytest.raises(AssertionError, match=r"3584 wide \(from 'SanaTextEncode' with gemma-2-9b\).*takes 2304"):
        run_prompt(_ksampler(sana, 3584, "gemma-2-9b"))
    assert TINY.caption_channels == 2304  # the width checked is the DiT's caption projection's


def test_a_size_the_latent_cannot_hold_is_said(host, run_prompt, caplog) -> None:
    prompt = {"4": {"class_type": "SanaEmptyLatent", "inputs": {"width": 1000, "height": 96, "preset": "custom",
                                                                "batch_size": 1}},
              "99": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "inputs_test"}}}
    with caplog.at_level(logging.WARNING, logger="uniba"):
        samples = run_prompt(prompt).outputs["4"][0][0]["samples"]
    assert tuple(samples.shape) == (1, 32, 3, 31)
    assert any("1000x96 px is not a multiple of 32" in r.getMessage() and "992x96 px" in r.getMessage()
               for r in caplog.records)

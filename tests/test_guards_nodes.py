"""Node inputs checked where they enter (headless: the checks run before anything needs ComfyUI)."""

from __future__ import annotations

import importlib
import time
from types import SimpleNamespace

import pytest
import torch

from uniba.guards import NonFiniteError, WorkTooLarge
from uniba.memory import GIB
from uniba.sana.config import SanaConfig

sana_nodes = importlib.import_module("uniba_pack.nodes.sana_nodes")
comfy_sana = importlib.import_module("uniba_pack.nodes.comfy.sana")
host = importlib.import_module("uniba_pack.nodes.comfy.host")

GOOD_COND = [[torch.zeros(1, 300, 2304), {"attention_mask": torch.ones(1, 300)}]]


def _sample(latent: torch.Tensor, positive=GOOD_COND, negative=GOOD_COND, model=None, cfg: float = 4.5):
    return sana_nodes.SanaSampler().sample(model, positive, negative, {"samples": latent}, seed=0, steps=2, cfg=cfg,
                                           solver="flow_dpm_solver", shift=0.0, denoise=1.0)


def test_empty_latent_of_137_gb_is_refused_before_allocating(monkeypatch) -> None:
    monkeypatch.setattr(host, "free_memory", lambda device=None: 64 * GIB)
    start = time.perf_counter()
    with pytest.raises(WorkTooLarge, match=r"SanaEmptyLatent: 4096 images of 16384x16384 px need at least 128.00 GiB"):
        sana_nodes.SanaEmptyLatent().generate(16384, 16384, "custom", 4096)
    assert time.perf_counter() - start < 5
    (latent,) = sana_nodes.SanaEmptyLatent().generate(1024, 768, "custom", 2)
    assert latent["samples"].shape == (2, 32, 24, 32)


def test_sd_latent_into_the_sana_sampler(monkeypatch) -> None:
    with pytest.raises(ValueError, match=r"latent_image: expected a Sana latent .*got \(1, 4, 128, 128\) \(an SD/SDXL"):
        _sample(torch.zeros(1, 4, 128, 128))
    nan = torch.zeros(1, 32, 4, 4)
    nan[..., 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"latent_image \(latent\)"):
        _sample(nan)


def test_sd_clip_conditioning_into_the_sana_sampler() -> None:
    clip_l = [[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 768)}]]
    with pytest.raises(ValueError, match=r"positive: the text embeddings are 768 wide, the width of SD 1.x CLIP"):
        _sample(torch.zeros(1, 32, 4, 4), positive=clip_l)
    sdxl = [[torch.zeros(1, 77, 2048), {}]]
    with pytest.raises(ValueError, match=r"negative: the text embeddings are 2048 wide, the width of SDXL CLIP"):
        _sample(torch.zeros(1, 32, 4, 4), negative=sdxl)


def test_batch_and_mask_mismatch_into_the_sana_sampler() -> None:
    three = [[torch.zeros(3, 300, 2304), {"attention_mask": torch.ones(3, 300)}]]
    with pytest.raises(ValueError, match="positive: holds 3 prompts but latent_image holds 4 latents"):
        _sample(torch.zeros(4, 32, 4, 4), positive=three)
    short_mask = [[torch.zeros(1, 300, 2304), {"attention_mask": torch.ones(1, 120)}]]
    with pytest.raises(ValueError, match=r"negative: the attention_mask has shape \(1, 120\)"):
        _sample(torch.zeros(1, 32, 4, 4), negative=short_mask)


def test_sampler_refuses_work_larger_than_the_device(monkeypatch) -> None:
    monkeypatch.setattr(host, "total_memory", lambda device=None: 24 * GIB)
    dit = SimpleNamespace(config=SanaConfig(hidden_size=2240, depth=1, cross_heads=20, mlp_ratio=2.5))
    model = SimpleNamespace(model=SimpleNamespace(diffusion_model=dit), load_device=torch.device("cpu"))
    latent = torch.zeros(1, 32, 1, 1).expand(64, 32, 128, 128)  # 64 images of 4096 px, no real allocation
    with pytest.raises(WorkTooLarge, match=r"SanaSampler: 64 images of 4096x4096 px need at least .* Use a batch"):
        _sample(latent, model=model)


def test_four_channel_latent_into_the_sana_vae_and_nan_decode(monkeypatch) -> None:
    dcae = SimpleNamespace(config=SimpleNamespace(latent_channels=32), spatial_ratio=32)
    vae = SimpleNamespace(dcae=dcae, patcher=None)
    with pytest.raises(ValueError, match=r"samples: expected a Sana latent .*got \(1, 4, 8, 8\)"):
        comfy_sana.decode_images(vae, torch.zeros(1, 4, 8, 8))

    class NanDecoder:
        def decode(self, samples, **kwargs):
            return torch.full((samples.shape[0], 3, 32, 32), float("nan"))

    monkeypatch.setattr(comfy_sana, "_prepare_model", lambda vae, pixels, batch: (NanDecoder(), GIB))
    with pytest.raises(NonFiniteError, match="Sana VAE decode output: 3072 of 3072 values are NaN"):
        comfy_sana.decode_images(vae, torch.zeros(1, 32, 1, 1))
    bad_pixels = torch.zeros(1, 64, 64, 3)
    bad_pixels[0, 1, 1, 1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"image \(VAE encode input\)"):
        comfy_sana.encode_images(vae, bad_pixels)

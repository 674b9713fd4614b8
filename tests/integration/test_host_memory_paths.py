"""The adapter's memory paths against the real host code that runs on the CPU (both branches where it exists).

Dynamic VRAM itself needs an NVIDIA GPU (``ModelPatcherDynamic`` hands CPU load devices back to the legacy
``ModelPatcher``); what runs here: the patcher class the host binds as ``CoreModelPatcher``, its
``get_free_memory``, ``model_management.is_oom`` with ``torch.AcceleratorError``, the text-encoder placement
under ``--lowvram``, the Sana latent's spatial ratio honoured by stock EmptyLatentImage, and the DC-AE VAE's
size and offload flags. Stand-ins for the GPU-only parts: ``tests/test_host_dynamic_vram.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_sana import write_tiny_sana_dit  # noqa: E402

SANA = "sana_tiny_memory_paths.safetensors"


@pytest.fixture(scope="module")
def host(comfy_host):
    return __import__(comfy_host.pack_module.__name__ + ".nodes.comfy.host", fromlist=["host"])


def test_models_are_wrapped_by_the_hosts_core_patcher(host, monkeypatch) -> None:
    import comfy.model_patcher as mp

    model = torch.nn.Linear(4, 4)
    try:  # what main.py binds as CoreModelPatcher when comfy-aimdo starts (never with --cpu)
        monkeypatch.setattr(mp, "CoreModelPatcher", mp.ModelPatcherDynamic)
    except AttributeError:  # hosts before Dynamic VRAM
        pass
    patcher = host.wrap_model(model, torch.device("cpu"), torch.device("cpu"))
    # on a CPU load device the dynamic class itself hands back a legacy patcher, as for core's own models
    assert type(patcher) is mp.ModelPatcher and patcher.model is model
    if hasattr(patcher, "cached_patcher_init"):
        twin = patcher.clone(disable_dynamic=True, force_deepcopy=True)
        assert type(twin) is mp.ModelPatcher and twin.model is model
    host.load_to_device(patcher)
    assert next(patcher.model.parameters()).device.type == "cpu"


def test_free_memory_is_the_patchers_figure_where_it_has_one(host) -> None:
    import comfy.model_management as mm

    patcher = host.wrap_model(torch.nn.Linear(4, 4))
    device = host.torch_device()
    ours = host.free_memory(device, patcher=patcher)
    reference = patcher.get_free_memory(device) if hasattr(patcher, "get_free_memory") else mm.get_free_memory(device)
    assert abs(ours - reference) < 256 * 2**20  # the same figure, up to RAM moving between the two reads


def test_accelerator_out_of_memory_is_recognised(host) -> None:
    error = getattr(torch, "AcceleratorError", None)
    if error is None:
        pytest.skip("this torch has no AcceleratorError")
    assert host.is_oom(error("CUDA error: out of memory"))
    assert not host.is_oom(ValueError("bad input"))


def test_text_encoder_stays_off_the_gpu_in_lowvram(host, monkeypatch) -> None:
    import comfy.model_management as mm

    for state in (mm.VRAMState.LOW_VRAM, mm.VRAMState.NO_VRAM):
        monkeypatch.setattr(mm, "vram_state", state)
        monkeypatch.setattr(mm, "text_encoder_device", lambda: torch.device("meta"))  # what aimdo hosts answer
        assert host.text_encoder_device() == mm.text_encoder_offload_device()


def test_stock_empty_latent_has_the_sana_size_where_the_host_honours_the_ratio(comfy_host, run_prompt) -> None:
    import nodes

    probe = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    if "downscale_ratio_spacial" not in probe:
        pytest.skip("this ComfyUI's EmptyLatentImage does not declare a spatial ratio (SanaEmptyLatent is the way)")
    write_tiny_sana_dit(comfy_host.model_folder("diffusion_models"), SANA, fmt="original")
    prompt = {
        "1": {"class_type": "SanaDiTLoader", "inputs": {"unet_name": SANA, "weight_dtype": "auto"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 192, "batch_size": 1}},
        "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 0]}},
        "4": {"class_type": "_MemoryPathsConditioning", "inputs": {}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 1, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["4", 0], "negative": ["3", 0], "latent_image": ["2", 0], "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "memory_paths"}},
    }
    comfy_host.nodes["_MemoryPathsConditioning"] = _Conditioning
    try:
        samples = run_prompt(prompt).outputs["5"][0][0]["samples"]
    finally:
        comfy_host.nodes.pop("_MemoryPathsConditioning", None)
    assert tuple(samples.shape) == (1, 32, 192 // 32, 256 // 32)


class _Conditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self):
        return ([[torch.randn(1, 300, 2304, generator=torch.Generator().manual_seed(0)),
                  {"attention_mask": torch.ones(1, 300)}]],)


def test_dcae_vae_reports_its_own_size_and_offloads(comfy_host) -> None:
    from tiny_sana_te_vae import write_tiny_dcae

    write_tiny_dcae(comfy_host.model_folder("vae"), "dcae_tiny_memory_paths.safetensors")
    import folder_paths

    folder_paths.filename_list_cache.clear()
    loader = comfy_host.nodes["SanaVAELoader"]
    vae = getattr(loader(), loader.FUNCTION)(vae_name="dcae_tiny_memory_paths.safetensors", dtype="auto")[0]
    weights = sum(t.numel() * t.element_size() for t in vae.patcher.model.state_dict().values())
    assert weights > 1000
    if hasattr(vae, "model_size"):  # newer hosts cache the size at the end of VAE.__init__, before our swap
        assert vae.model_size() == pytest.approx(weights, rel=0.05)
    assert vae.patcher.model_size() == pytest.approx(weights, rel=0.05)
    assert vae.disable_offload is False  # the DC-AE may be offloaded like any VAE

"""Both memory paths of the host adapter, with small stand-ins for what only runs on an NVIDIA GPU.

Newer ComfyUI (Dynamic VRAM, comfy-aimdo) pages weights in through ``ModelPatcherDynamic`` (bound as
``CoreModelPatcher``), counts reclaimable VRAM in ``patcher.get_free_memory()``, detects accelerator OOMs in
``model_management.is_oom`` and puts text encoders on the GPU even in ``--lowvram``. The adapter feature-detects
each; these tests drive both branches of every check. The same code against a real newer ComfyUI on the CPU:
``tests/integration/test_host_memory_paths.py``.
"""

from __future__ import annotations

import enum
from types import SimpleNamespace

import pytest
import torch
from uniba_pack.nodes.comfy import host

CPU = torch.device("cpu")
GPU = torch.device("meta")  # stands for the accelerator: never touched, only compared


class VRAMState(enum.Enum):  # the host's enum, by name
    DISABLED = 0
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4
    SHARED = 5


class LegacyPatcher:
    """The old ModelPatcher's shape: no dynamic loading, no own free-memory figure."""

    def __init__(self, model, load_device=None, offload_device=None, size=0, weight_inplace_update=False):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device

    def is_dynamic(self) -> bool:
        return False


class DynamicPatcher(LegacyPatcher):
    """ModelPatcherDynamic's shape: pages weights in, refuses full loads, counts reclaimable VRAM."""

    reclaimable = 3 << 30

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cached_patcher_init = None

    def is_dynamic(self) -> bool:
        return True

    def get_free_memory(self, device):
        return fake_mm_free(device) + self.reclaimable


def fake_mm_free(device) -> int:
    return 5 << 30


def _fake_mm(**overrides):
    calls = []

    def load_models_gpu(models, memory_required=0, force_full_load=False, **_):
        calls.append((models, memory_required, force_full_load))

    mm = SimpleNamespace(
        get_free_memory=fake_mm_free, load_models_gpu=load_models_gpu, OOM_EXCEPTION=torch.OutOfMemoryError,
        VRAMState=VRAMState, vram_state=VRAMState.NORMAL_VRAM, text_encoder_device=lambda: GPU,
        text_encoder_offload_device=lambda: CPU, get_torch_device=lambda: GPU, unet_offload_device=lambda: CPU,
        args=SimpleNamespace(gpu_only=False), loads=calls)
    for key, value in overrides.items():
        setattr(mm, key, value)
    return mm


@pytest.fixture
def in_host(monkeypatch):
    """The adapter as if inside a ComfyUI whose modules are the given stand-ins."""

    def install(mm, patcher_module):
        monkeypatch.setattr(host, "IN_COMFYUI", True)
        monkeypatch.setattr(host, "_mm", mm)
        monkeypatch.setattr(host, "_model_patcher", patcher_module)
        return mm

    return install


def test_free_memory_asks_the_patcher_when_it_can_count_reclaimable_vram(in_host) -> None:
    in_host(_fake_mm(), SimpleNamespace(ModelPatcher=LegacyPatcher))
    dynamic = DynamicPatcher(torch.nn.Linear(2, 2), GPU, CPU)
    assert host.free_memory(GPU, patcher=dynamic) == (5 << 30) + (3 << 30)
    assert host.free_memory(GPU, patcher=LegacyPatcher(torch.nn.Linear(2, 2), GPU, CPU)) == 5 << 30
    assert host.free_memory(GPU) == 5 << 30


def test_models_load_through_the_core_patcher_when_the_host_has_one(in_host) -> None:
    mm = in_host(_fake_mm(), SimpleNamespace(ModelPatcher=LegacyPatcher, CoreModelPatcher=DynamicPatcher))
    model = torch.nn.Linear(2, 2)
    patcher = host.wrap_model(model, GPU, CPU)
    assert type(patcher) is DynamicPatcher and patcher.model is model
    # core can still make a non-dynamic twin of it (hooked conds, multi-GPU): a legacy patcher on the same module
    reload, args = patcher.cached_patcher_init[:2]
    twin = reload(*args, disable_dynamic=True)
    assert type(twin) is LegacyPatcher and twin.model is model and twin.load_device == GPU
    # a dynamic patcher asserts against full loads: weights are paged in on demand instead
    host.load_to_device(patcher, memory_required=123)
    assert mm.loads[-1] == ([patcher], 123, False)


def test_models_keep_the_legacy_full_load_where_the_host_has_no_core_patcher(in_host) -> None:
    mm = in_host(_fake_mm(), SimpleNamespace(ModelPatcher=LegacyPatcher))
    patcher = host.wrap_model(torch.nn.Linear(2, 2), GPU, CPU)
    assert type(patcher) is LegacyPatcher and not hasattr(patcher, "cached_patcher_init")
    host.load_to_device(patcher)
    assert mm.loads[-1] == ([patcher], 0, True)


class AcceleratorError(RuntimeError):
    pass


def test_out_of_memory_detection_delegates_to_the_host(in_host) -> None:
    seen = []

    def is_oom(exc):  # the host's also clears the queued CUDA error; the adapter must let it
        seen.append(exc)
        return isinstance(exc, AcceleratorError) and "out of memory" in str(exc)

    in_host(_fake_mm(is_oom=is_oom), SimpleNamespace(ModelPatcher=LegacyPatcher))
    accelerator_oom = AcceleratorError("CUDA error: out of memory")
    assert host.is_oom(accelerator_oom) and seen == [accelerator_oom]
    assert not host.is_oom(ValueError("bad input"))
    # the CPU allocator's failure, which the host's check does not know, is still recognised by the engine's
    assert host.is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: "
                                    "you tried to allocate 1099511627776 bytes."))


def test_out_of_memory_detection_without_the_host_helper(in_host) -> None:
    in_host(_fake_mm(), SimpleNamespace(ModelPatcher=LegacyPatcher))
    assert host.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not host.is_oom(ValueError("bad input"))


@pytest.mark.parametrize("state, expected", [
    (VRAMState.LOW_VRAM, CPU), (VRAMState.NO_VRAM, CPU), (VRAMState.NORMAL_VRAM, GPU), (VRAMState.HIGH_VRAM, GPU)])
def test_gemma_placement_respects_lowvram_and_novram(in_host, state, expected) -> None:
    # newer hosts answer the GPU for text encoders whenever Dynamic VRAM is on, even in --lowvram
    in_host(_fake_mm(vram_state=state), SimpleNamespace(ModelPatcher=LegacyPatcher))
    assert host.text_encoder_device() == expected


def test_gpu_only_keeps_the_text_encoder_on_the_gpu(in_host) -> None:
    in_host(_fake_mm(vram_state=VRAMState.LOW_VRAM, args=SimpleNamespace(gpu_only=True)),
            SimpleNamespace(ModelPatcher=LegacyPatcher))
    assert host.text_encoder_device() == GPU

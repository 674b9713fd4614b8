"""The pack loads in a real ComfyUI with every node registered, and a prompt runs through it."""

from __future__ import annotations


def test_every_pack_node_registered(comfy_host) -> None:
    assert comfy_host.pack_node_names, "the pack registered no nodes"
    for name in comfy_host.pack_node_names:
        assert comfy_host.nodes.get(name) is comfy_host.pack_module.NODE_CLASS_MAPPINGS[name], name


def test_host_adapter_sees_comfyui(comfy_host) -> None:
    host = __import__(comfy_host.pack_module.__name__ + ".nodes.comfy.host", fromlist=["host"])
    assert host.IN_COMFYUI
    assert host.torch_device().type == "cpu"
    assert host.free_memory() > 0
    assert "infdit" in comfy_host.modules["folder_paths"].folder_names_and_paths


def test_core_prompt_runs(comfy_host, run_prompt) -> None:
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 0}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    result = run_prompt(prompt)
    image = result.outputs["1"][0][0]
    assert tuple(image.shape) == (1, 48, 64, 3)
    assert result.ui["2"]["images"]

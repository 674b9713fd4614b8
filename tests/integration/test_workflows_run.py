"""Every sample workflow, converted to API format the way the frontend queues it, runs in a real ComfyUI.

Models are tiny random checkpoints of the real file layouts, written into the host's temporary model
folders; sizes and step counts are shrunk through API-input overrides (the graph itself is unchanged).

SDXL gap, stated plainly: ComfyUI only detects an SDXL checkpoint whose UNet has the full SDXL shape
(320 channels, 2048-dim context), and SDXL's CLIP-L + CLIP-G text encoders are ~0.8 B parameters, too
heavy for this test tier. The SDXL workflows therefore run with two test nodes swapped in:
``CheckpointLoaderSimple`` -> a tiny SDXL-architecture UNet in ComfyUI's own SDXL model class (random
weights) + a TAESDXL-architecture VAE (ComfyUI's real tiny-VAE class, random weights), and
``CLIPTextEncode`` -> random conditioning of that UNet's shapes (context + pooled output). Everything
downstream (HiDiffusionPatch, KSampler, VAEDecode, Inf-DiT 2x, SaveImage) is the shipped graph.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import workflow_tools as wt  # noqa: E402

INFDIT = "infdit_tiny.safetensors"
SANA = "sana_tiny.safetensors"
DCAE = "dcae_tiny.safetensors"
GEMMA = "gemma_tiny"
RENDER = "uniba_render.png"

TINY_SDXL_CONTEXT = 32
TINY_SDXL_POOLED = 32


def _init_(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """ComfyUI's layers skip weight init (torch.empty): draw every weight, norms around 1."""
    g = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                base = 1.0 if isinstance(m, norms) and name == "weight" else 0.0
                p.copy_(base + std * torch.randn(p.shape, generator=g))


class _TinySDXLCheckpoint:
    """Test stand-in for CheckpointLoaderSimple: tiny SDXL-class MODEL, no CLIP, TAESDXL-architecture VAE."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, ckpt_name):
        import comfy.model_patcher
        import comfy.sd
        import comfy.supported_models
        import comfy.taesd.taesd

        unet_config = dict(
            image_size=32, in_channels=4, out_channels=4, model_channels=32, context_dim=TINY_SDXL_CONTEXT,
            use_spatial_transformer=True, legacy=False, use_temporal_attention=False, use_temporal_resblock=False,
            num_heads=8, num_head_channels=-1, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
            transformer_depth=[0, 0, 2, 2, 1, 1], transformer_depth_output=[0, 0, 0, 2, 2, 2, 1, 1, 1],
            transformer_depth_middle=1, use_linear_in_transformer=True, num_classes="sequential",
            adm_in_channels=TINY_SDXL_POOLED + 6 * 256)  # ComfyUI's SDXL adds six 256-dim size embeddings
        config = comfy.supported_models.SDXL(unet_config)
        config.unet_config.update(num_heads=8, num_head_channels=-1)
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model({})
        _init_(model.diffusion_model, seed=1)
        model.diffusion_model.eval()
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                                   offload_device=torch.device("cpu"))
        taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
        _init_(taesd, seed=2, std=0.1)
        sd = {k: v for k, v in taesd.state_dict().items()}
        vae = comfy.sd.VAE(sd=sd)
        return (patcher, None, vae)


class _TinySDXLConditioning:
    """Test stand-in for CLIPTextEncode: conditioning of the tiny UNet's shapes (context + pooled output)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": ""})}, "optional": {"clip": ("CLIP",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, text, clip=None):
        g = torch.Generator().manual_seed(len(text))
        context = torch.randn(1, 77, TINY_SDXL_CONTEXT, generator=g)
        pooled = torch.randn(1, TINY_SDXL_POOLED, generator=g)
        return ([[context, {"pooled_output": pooled}]],)


@pytest.fixture(scope="module")
def env(comfy_host):
    from PIL import Image
    from tiny_infdit import write_tiny_infdit
    from tiny_sana import write_tiny_sana_dit
    from tiny_sana_te_vae import write_tiny_dcae, write_tiny_gemma

    write_tiny_infdit(comfy_host.model_folder("infdit"), INFDIT)
    write_tiny_sana_dit(comfy_host.model_folder("diffusion_models"), SANA, fmt="original")
    write_tiny_dcae(comfy_host.model_folder("vae"), DCAE)
    write_tiny_gemma(comfy_host.model_folder("text_encoders") / GEMMA)
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(40, 56, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(comfy_host.input_dir / RENDER)
    comfy_host.nodes["_TinySDXLCheckpoint"] = _TinySDXLCheckpoint
    comfy_host.nodes["_TinySDXLConditioning"] = _TinySDXLConditioning
    defs = wt.node_definitions(comfy_host.pack_module.NODE_CLASS_MAPPINGS)
    yield comfy_host, defs
    comfy_host.nodes.pop("_TinySDXLCheckpoint", None)
    comfy_host.nodes.pop("_TinySDXLConditioning", None)


SANA_MODELS = {
    "SanaDiTLoader": {"unet_name": SANA},
    "SanaTextEncoderLoader": {"model_name": GEMMA},
    "SanaVAELoader": {"vae_name": DCAE},
    "SanaSampler": {"steps": 2},
    "InfDiTLoader": {"model_name": INFDIT},
    "InfDiTUpscale": {"steps": 1},
}


def _saved_sizes(comfy_host, result, prompt: dict, class_type: str) -> list[tuple[int, int]]:
    from PIL import Image

    sizes = []
    for node_id, node in prompt.items():
        if node["class_type"] != class_type:
            continue
        for image in result.ui[node_id]["images"]:
            folder = comfy_host.output_dir if image["type"] == "output" else Path(
                comfy_host.modules["folder_paths"].get_temp_directory())
            with Image.open(folder / image["subfolder"] / image["filename"]) as img:
                sizes.append(img.size)
    return sizes


def _swap_sdxl_loaders(prompt: dict) -> dict:
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["class_type"] = "_TinySDXLCheckpoint"
        elif node["class_type"] == "CLIPTextEncode":
            node["class_type"] = "_TinySDXLConditioning"
            node["inputs"].pop("clip")
    return prompt


def test_sana_1024_to_4096_infdit(env, run_prompt) -> None:
    comfy_host, defs = env
    overrides = dict(SANA_MODELS, SanaEmptyLatent={"width": 96, "height": 64, "preset": "custom"})
    prompt = wt.to_api(wt.load_workflow("sana_1024_to_4096_infdit.json"), defs, overrides)
    result = run_prompt(prompt)
    assert _saved_sizes(comfy_host, result, prompt, "SaveImage") == [(384, 256)]  # 96x64 Sana, 4x Inf-DiT
    assert _saved_sizes(comfy_host, result, prompt, "PreviewImage") == [(96, 64)]


def test_sana_4k_native(env, run_prompt) -> None:
    comfy_host, defs = env
    overrides = dict(SANA_MODELS, SanaEmptyLatent={"width": 128, "height": 64, "preset": "custom"},
                     SanaVAEDecode={"tile_size": 64})  # force the tiled decode at test size
    prompt = wt.to_api(wt.load_workflow("sana_4k_native.json"), defs, overrides)
    result = run_prompt(prompt)
    assert _saved_sizes(comfy_host, result, prompt, "SaveImage") == [(128, 64)]


def test_sana_sprint_2step(env, run_prompt) -> None:
    from tiny_sana import TINY, write_tiny_sana_dit

    comfy_host, defs = env
    sprint = TINY.replace(qk_norm=True, cross_norm=True, guidance_embeds=True)
    write_tiny_sana_dit(comfy_host.model_folder("diffusion_models"), "sana_sprint_tiny.safetensors", config=sprint)
    overrides = dict(SANA_MODELS, SanaDiTLoader={"unet_name": "sana_sprint_tiny.safetensors"},
                     SanaEmptyLatent={"width": 96, "height": 64, "preset": "custom"})
    prompt = wt.to_api(wt.load_workflow("sana_sprint_2step.json"), defs, overrides)
    result = run_prompt(prompt)
    assert _saved_sizes(comfy_host, result, prompt, "SaveImage") == [(96, 64)]


def test_sdxl_hidiffusion_2048(env, run_prompt) -> None:
    comfy_host, defs = env
    overrides = {"EmptyLatentImage": {"width": 256, "height": 256}, "KSampler": {"steps": 3}}
    prompt = _swap_sdxl_loaders(wt.to_api(wt.load_workflow("sdxl_hidiffusion_2048.json"), defs, overrides))
    assert any(n["class_type"] == "HiDiffusionPatch" for n in prompt.values())
    result = run_prompt(prompt)
    assert _saved_sizes(comfy_host, result, prompt, "SaveImage") == [(256, 256)]


def test_sdxl_hidiffusion_to_4096_infdit(env, run_prompt) -> None:
    comfy_host, defs = env
    overrides = {"EmptyLatentImage": {"width": 128, "height": 128}, "KSampler": {"steps": 2},
                 "InfDiTLoader": {"model_name": INFDIT}, "InfDiTUpscale": {"steps": 1}}
    prompt = _swap_sdxl_loaders(wt.to_api(wt.load_workflow("sdxl_hidiffusion_to_4096_infdit.json"), defs,
                                          overrides))
    result = run_prompt(prompt)
    assert _saved_sizes(comfy_host, result, prompt, "PreviewImage") == [(128, 128)]
    assert _saved_sizes(comfy_host, result, prompt, "SaveImage") == [(256, 256)]  # Inf-DiT 2x


def test_upscale_render_4x(env, run_prompt) -> None:
    comfy_host, defs = env
    overrides = {"LoadImage": {"image": RENDER}, "InfDiTLoader": {"model_name": INFDIT},
                 "InfDiTUpscale": {"steps": 2}}
    prompt = wt.to_api(wt.load_workflow("upscale_render_4x.json"), defs, overrides)
    result = run_prompt(prompt)
    assert _saved_sizes(comfy_host, result, prompt, "SaveImage") == [(224, 160)]  # 56x40 render, 4x
    upscale_id = next(k for k, n in prompt.items() if n["class_type"] == "InfDiTUpscale")
    image = result.outputs[upscale_id][0][0]
    assert tuple(image.shape) == (1, 160, 224, 3)
    assert torch.isfinite(image).all() and 0 <= float(image.min()) and float(image.max()) <= 1


def _blueprint_prompt(name: str, defs: dict, overrides: dict, image: str | None = None) -> dict:
    """A blueprint as the frontend queues it inside a graph: flattened, fed a Load Image, its output saved."""
    blueprint = wt.load_workflow(wt.REPO / "subgraphs" / f"{name}.json")
    prompt, (output,) = wt.blueprint_to_api(blueprint, defs, {"image": ["load", 0]}, overrides)
    prompt = {f"bp:{k}": v for k, v in prompt.items()}  # subgraph node ids are prefixed in a real prompt too
    for node in prompt.values():
        for key, value in node["inputs"].items():
            if isinstance(value, list) and value[0] != "load":
                node["inputs"][key] = [f"bp:{value[0]}", value[1]]
    if image is not None:
        prompt["load"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    prompt["save"] = {"class_type": "SaveImage", "inputs": {"images": [f"bp:{output[0]}", output[1]],
                                                            "filename_prefix": "uniba/blueprint"}}
    return prompt


def test_blueprint_infdit_4x_upscale(env, run_prompt) -> None:
    comfy_host, defs = env
    prompt = _blueprint_prompt("Inf-DiT 4x Upscale", defs,
                               {"InfDiTLoader": {"model_name": INFDIT}, "InfDiTUpscale": {"steps": 1}}, RENDER)
    result = run_prompt(prompt)
    assert _saved_sizes(comfy_host, result, prompt, "SaveImage") == [(224, 160)]  # 56x40 render, 4x


def test_blueprint_sana_text_to_4k(env, run_prompt) -> None:
    comfy_host, defs = env
    overrides = dict(SANA_MODELS, SanaEmptyLatent={"width": 128, "height": 64, "preset": "custom"},
                     SanaVAEDecode={"tile_size": 64})
    prompt = _blueprint_prompt("Sana text to 4K image", defs, overrides)
    result = run_prompt(prompt)
    assert _saved_sizes(comfy_host, result, prompt, "SaveImage") == [(128, 64)]


def test_blueprint_sdxl_hidiffusion_then_infdit(env, run_prompt) -> None:
    comfy_host, defs = env
    overrides = {"EmptyLatentImage": {"width": 128, "height": 128}, "KSampler": {"steps": 2},
                 "InfDiTLoader": {"model_name": INFDIT}, "InfDiTUpscale": {"steps": 1}}
    prompt = _swap_sdxl_loaders(_blueprint_prompt("SDXL 2048 with HiDiffusion, then Inf-DiT to 4096", defs,
                                                  overrides))
    assert {n["class_type"] for n in prompt.values()} >= {"HiDiffusionPatch", "InfDiTUpscale"}
    result = run_prompt(prompt)
    assert _saved_sizes(comfy_host, result, prompt, "SaveImage") == [(256, 256)]  # 128 px, Inf-DiT 2x


def _write_sana_adapters(comfy_host) -> tuple[str, str, str]:
    """A tiny LoRA (kohya names) and ControlNet (diffusers keys + <name>.json) for the tiny Sana, an HED-like image."""
    import json

    from PIL import Image
    from tiny_sana import TINY

    from uniba.checkpoint import save_safetensors
    from uniba.sana.controlnet import SanaControlNet
    from uniba.sana.lora import lora_target_layers

    g = torch.Generator().manual_seed(3)
    lora = {}
    for layer, shape in lora_target_layers(TINY).items():
        name = "lora_unet_" + layer.replace(".", "_")
        kernel = tuple(shape[2:])
        lora[f"{name}.lora_down.weight"] = torch.randn((2, shape[1], *kernel), generator=g) * 0.1
        lora[f"{name}.lora_up.weight"] = torch.randn((shape[0], 2, *(1 for _ in kernel)), generator=g) * 0.1
    save_safetensors(lora, comfy_host.model_folder("loras") / "sana_tiny_lora.safetensors")
    controlnet = SanaControlNet(TINY.replace(depth=1))
    save_safetensors({k: torch.randn(v.shape, generator=g) * 0.1 for k, v in controlnet.state_dict().items()},
                     comfy_host.model_folder("controlnet") / "sana_tiny_cn.safetensors")
    (comfy_host.model_folder("controlnet") / "sana_tiny_cn.json").write_text(json.dumps(
        {"_class_name": "SanaControlNetModel", "num_cross_attention_heads": TINY.cross_heads}))
    edges = (torch.rand(80, 112, 3, generator=g) > 0.8).to(torch.uint8).mul(255).numpy()
    Image.fromarray(edges).save(comfy_host.input_dir / "uniba_hed.png")
    return "sana_tiny_lora.safetensors", "sana_tiny_cn.safetensors", "uniba_hed.png"


def test_sana_lora(env, run_prompt) -> None:
    comfy_host, defs = env
    lora, _, _ = _write_sana_adapters(comfy_host)
    overrides = dict(SANA_MODELS, SanaEmptyLatent={"width": 96, "height": 64, "preset": "custom"},
                     SanaLoraLoader={"lora_name": lora})
    prompt = wt.to_api(wt.load_workflow("sana_lora.json"), defs, overrides)
    result = run_prompt(prompt)
    assert _saved_sizes(comfy_host, result, prompt, "SaveImage") == [(96, 64)]


def test_sana_controlnet(env, run_prompt) -> None:
    comfy_host, defs = env
    _, controlnet, image = _write_sana_adapters(comfy_host)
    # the control image (112x80) is not the output size (96x64): resized as ComfyUI does for every ControlNet
    overrides = dict(SANA_MODELS, SanaEmptyLatent={"width": 96, "height": 64, "preset": "custom"},
                     SanaControlNetLoader={"control_net_name": controlnet}, LoadImage={"image": image})
    prompt = wt.to_api(wt.load_workflow("sana_controlnet.json"), defs, overrides)
    result = run_prompt(prompt)
    assert _saved_sizes(comfy_host, result, prompt, "SaveImage") == [(96, 64)]

"""Writes the sample workflows in ``workflows/`` (UI format) from short descriptions.

Run ``python tests/workflow_builder.py`` after a node's inputs change: widget values are given by input
name here and laid out positionally from the node definitions (the pack's classes + the core snapshot),
with seed control values where the frontend adds them, so the files always match the nodes.
Hand edits in ComfyUI (moving nodes) are fine; rerunning the builder overwrites them.
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import workflow_tools as wt  # noqa: E402

SANA_1K = "Sana_1600M_1024px_BF16.pth"
SANA_4K = "Sana_1600M_4Kpx_BF16.pth"
SPRINT_1K = "Sana_Sprint_1.6B_1024px.pth"
GEMMA = "gemma-2-2b-it"
DCAE = "dc-ae-f32c32-sana-1.1.safetensors"
INFDIT = "mp_rank_00_model_states.pt"  # the released file name (see INFDIT_NOTE)
ROW2 = 640  # y of the second row: decode, preview, upscale, save
GAP = 40  # px between a node and the title bar below it, room for the frontend's "UniBA" badge above that title
# Widths frontends 1.27-1.58 widen a node to when it loads (its computeSize): the readout makes Inf-DiT Upscale 404 px.
MIN_WIDTH = {"InfDiTUpscale": 420}
SDXL = "sd_xl_base_1.0.safetensors"
# the diffusers DreamBooth example LoRA for Sana 1600M (its file is pytorch_lora_weights.safetensors; the frontend
# saves it under this name, which says what it is)
SANA_LORA = "sana_1600m_dreambooth_dog_lora.safetensors"
SANA_CONTROLNET = "Sana_1600M_1024px_BF16_ControlNet_HED.pth"
HED_IMAGE = "example_hed.png"

# properties.models of every loader: newer frontends check the preselected file and offer its download
# (name = the file name the loader expects, url = where it comes from, directory = the ComfyUI model folder).
# Inf-DiT has no direct file link (Tsinghua cloud, linked from the README) and Gemma-2 is a whole folder: their
# url is the page the note sends users to, which the frontend shows instead of "Unknown".
HF = "https://huggingface.co"
MODEL_DOWNLOADS: dict[str, tuple[str, str]] = {
    SANA_1K: (f"{HF}/Efficient-Large-Model/Sana_1600M_1024px_BF16/resolve/main/checkpoints/{SANA_1K}",
              "diffusion_models"),
    SANA_4K: (f"{HF}/Efficient-Large-Model/Sana_1600M_4Kpx_BF16/resolve/main/checkpoints/{SANA_4K}",
              "diffusion_models"),
    SPRINT_1K: (f"{HF}/Efficient-Large-Model/Sana_Sprint_1.6B_1024px/resolve/main/checkpoints/{SPRINT_1K}",
                "diffusion_models"),
    GEMMA: (f"{HF}/Efficient-Large-Model/gemma-2-2b-it", "text_encoders"),
    DCAE: (f"{HF}/mit-han-lab/dc-ae-f32c32-sana-1.1/resolve/main/model.safetensors", "vae"),
    INFDIT: ("https://github.com/zai-org/Inf-DiT", "infdit"),
    SDXL: (f"{HF}/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/{SDXL}", "checkpoints"),
    SANA_LORA: (f"{HF}/ariG23498/trained-sana-lora/resolve/main/pytorch_lora_weights.safetensors", "loras"),
    SANA_CONTROLNET: (f"{HF}/Efficient-Large-Model/Sana_1600M_1024px_BF16_ControlNet_HED/resolve/main/checkpoints/"
                      f"{SANA_CONTROLNET}", "controlnet"),
}
LOADER_WIDGETS = {"SanaDiTLoader": "unet_name", "SanaTextEncoderLoader": "model_name", "SanaVAELoader": "vae_name",
                  "InfDiTLoader": "model_name", "CheckpointLoaderSimple": "ckpt_name", "SanaLoraLoader": "lora_name",
                  "SanaControlNetLoader": "control_net_name"}

PROMPT = ("A cozy alpine village at dawn, snow on the roofs, warm light in the windows, a frozen lake in the "
          "foreground reflecting the mountains, ultra detailed, sharp focus, 8k photograph")
NEGATIVE_SDXL = "blurry, lowres, jpeg artifacts, watermark, text, deformed"

INFDIT_NOTE = """\
**Inf-DiT** (models/infdit/): the released checkpoint `mp_rank_00_model_states.pt` from the
[Inf-DiT README](https://github.com/zai-org/Inf-DiT) (Tsinghua cloud link; about 2.5 GB). Put it in
`ComfyUI/models/infdit/` (a converted `.safetensors` works too) and press *Refresh*.
The readout under **Inf-DiT Upscale** shows the block grid, the block batch chosen from your free VRAM,
the passes and the estimated peak memory before you run; during the run it shows which blocks are done.
If it says *does not fit*, lower `block_batch` or set `offload_cache` to `on`."""

SANA_TE_VAE_NOTE = """\
**Gemma-2 text encoder** (models/text_encoders/): the whole Hugging Face folder
[Efficient-Large-Model/gemma-2-2b-it](https://huggingface.co/Efficient-Large-Model/gemma-2-2b-it)
(config.json, tokenizer and safetensors) as `ComfyUI/models/text_encoders/gemma-2-2b-it/`.
**DC-AE** (models/vae/): `model.safetensors` of
[mit-han-lab/dc-ae-f32c32-sana-1.1](https://huggingface.co/mit-han-lab/dc-ae-f32c32-sana-1.1),
saved as `ComfyUI/models/vae/dc-ae-f32c32-sana-1.1.safetensors` (the diffusers `-diffusers` layout works too)."""

SDXL_NOTE = """\
**SDXL base 1.0** (models/checkpoints/): `sd_xl_base_1.0.safetensors` from
[stabilityai/stable-diffusion-xl-base-1.0](https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0).
Any SDXL fine-tune works; set `model_variant` to `sdxl_turbo` for Turbo models.
**HiDiffusion** needs no weights: it patches the UNet (RAU-Net for the early steps, MSW-MSA window
attention) so SDXL renders 2048 px without repeated objects. Ancestral samplers work best with it."""

NOTES = {
    "sana_1024_to_4096_infdit": f"""\
# Sana 1.6B 1024 px -> Inf-DiT 4x -> 4096 px

Sana renders 1024x1024 in 20 Flow-DPM-Solver steps (CFG 4.5), the DC-AE decodes it, Inf-DiT adds
4x detail block by block (memory grows with the width, not the area) and the result is saved at 4096x4096.
About 12 GB of VRAM is enough: each model is unloaded before the next one runs.

**Sana 1.6B 1024px** (models/diffusion_models/): `{SANA_1K}` from
[Efficient-Large-Model/Sana_1600M_1024px_BF16](https://huggingface.co/Efficient-Large-Model/Sana_1600M_1024px_BF16)
(`checkpoints/` folder). Other 1024 px Sana releases (fp16, MultiLing) work too.

{SANA_TE_VAE_NOTE}

{INFDIT_NOTE}
""",
    "sana_4k_native": f"""\
# Sana 4K, native 4096 px

The Sana 1.6B 4K model samples a 128x128 DC-AE latent directly (Flow-DPM-Solver, 20 steps, CFG 4.5;
the shift is chosen for the resolution when `shift` is 0). The DC-AE decode is tiled
(`tile_size` 0 = chosen from free memory) so the 4096 px image decodes on a 12-16 GB card.

**Sana 1.6B 4Kpx** (models/diffusion_models/): `{SANA_4K}` from
[Efficient-Large-Model/Sana_1600M_4Kpx_BF16](https://huggingface.co/Efficient-Large-Model/Sana_1600M_4Kpx_BF16)
(`checkpoints/` folder). It is a bf16 release: keep `weight_dtype` on auto/bf16 (fp16 overflows).

{SANA_TE_VAE_NOTE}
""",
    "sana_sprint_2step": f"""\
# Sana-Sprint 1.6B, text to image in 2 steps

Sana-Sprint is distilled (sCM) to render 1024 px in 1-4 steps. **Sana Sprint Sigmas** gives the release's
2-step schedule (TrigFlow times 1.5708 -> 1.3 -> 0), **Sana Sprint Sampler** runs the sCM steps in
SamplerCustom. Sprint has no CFG and no negative prompt: its guidance (4.5) is embedded and set with
**Sana Sprint Guidance**; keep SamplerCustom's `cfg` at 1.0 (the zeroed negative is then never evaluated).

**Sana-Sprint 1.6B** (models/diffusion_models/): `{SPRINT_1K}` from
[Efficient-Large-Model/Sana_Sprint_1.6B_1024px](https://huggingface.co/Efficient-Large-Model/Sana_Sprint_1.6B_1024px)
(`checkpoints/` folder; the 0.6B release works the same). A whole `Sana_Sprint_1.6B_1024px_diffusers` folder
works too, in **Sana DiT Loader** or in **Sana Pipeline Loader** (which also gives the text encoder and VAE).
It is a bf16 release: keep `weight_dtype` on auto/bf16.

{SANA_TE_VAE_NOTE}
""",
    "sana_lora": f"""\
# Sana 1.6B + LoRA

**Sana LoRA Loader** applies a LoRA trained for Sana through ComfyUI's patches (stock LoraLoaderModelOnly and
LoraLoader work on the Sana MODEL too; this node also checks that the LoRA was made for this model and reads
alphas stored only in the file's metadata). Chain several loaders to stack LoRAs; `strength_model` scales each.
Formats: diffusers/PEFT, kohya (`lora_unet_`), OneTrainer (`lora_transformer_`), LyCORIS names.

**LoRA** (models/loras/): `{SANA_LORA}`, the diffusers DreamBooth example for Sana 1600M, from
[ariG23498/trained-sana-lora](https://huggingface.co/ariG23498/trained-sana-lora) (`pytorch_lora_weights.safetensors`,
saved under the name above); use its trigger words (model card) in the prompt. Any Sana 1600M LoRA works the same.

**Sana 1.6B** (models/diffusion_models/): `{SANA_1K}` from
[Efficient-Large-Model/Sana_1600M_1024px_BF16](https://huggingface.co/Efficient-Large-Model/Sana_1600M_1024px_BF16)
(`checkpoints/` folder).

{SANA_TE_VAE_NOTE}
""",
    "sana_controlnet": f"""\
# Sana 1.6B + ControlNet (HED)

**Sana ControlNet Loader** gives a CONTROL_NET for the stock **Apply ControlNet** node: control image, `strength`,
`start_percent`/`end_percent` and the Sana DC-AE as its `vae` (the control image is encoded to a Sana latent). The
control image is a soft-edge (HED) map; make one with an HED preprocessor (e.g. comfyui_controlnet_aux) or load one.
An image of another size is resized to the output as ComfyUI does for every ControlNet.

**ControlNet** (models/controlnet/): `{SANA_CONTROLNET}` from
[Efficient-Large-Model/Sana_1600M_1024px_BF16_ControlNet_HED](https://huggingface.co/Efficient-Large-Model/Sana_1600M_1024px_BF16_ControlNet_HED)
(`checkpoints/` folder). It pairs with the 1600M DiT below (the 600M one with Sana_600M_1024px).

**Sana 1.6B** (models/diffusion_models/): `{SANA_1K}` from
[Efficient-Large-Model/Sana_1600M_1024px_BF16](https://huggingface.co/Efficient-Large-Model/Sana_1600M_1024px_BF16)
(`checkpoints/` folder).

**Control image** (ComfyUI/input/): `{HED_IMAGE}`, any HED edge map of the size to render (1024x1024 here).

{SANA_TE_VAE_NOTE}
""",
    "sdxl_hidiffusion_2048": f"""\
# SDXL + HiDiffusion, 2048 px

Plain SDXL at 2048x2048 repeats objects; **HiDiffusion Patch** fixes that without training and is faster
than the unpatched model. Keep `raunet` and `msw_msa` on; `model_variant` auto detects SD1.5/SD2.1/SDXL.

{SDXL_NOTE}
""",
    "sdxl_hidiffusion_to_4096_infdit": f"""\
# SDXL + HiDiffusion 2048 px -> Inf-DiT 2x -> 4096 px

SDXL with HiDiffusion renders 2048x2048, then Inf-DiT in its 2x mode adds detail up to 4096x4096.
The 2048 px image is also shown in the preview node.

{SDXL_NOTE}

{INFDIT_NOTE}
""",
    "upscale_render_4x": f"""\
# Upscale a render 4x with Inf-DiT

Load any image (a render, a photo, a generated image) and Inf-DiT upscales it 4x, e.g. 1024 -> 4096 px.
It generates new detail (it is a diffusion model) while staying faithful to the input; `color_match`
wavelet keeps the input's colours exactly. Sides are padded to whole 128 px blocks and cropped back.
Use `scale` 16 for two 4x passes (memory still grows only with the width).

{INFDIT_NOTE}
""",
}


@dataclass
class N:
    """One node of a workflow description: widget values by input name, links by input name."""

    id: int
    type: str
    pos: tuple[float, float]
    widgets: dict[str, Any] = field(default_factory=dict)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)  # input name -> (source id, output slot)
    title: str | None = None
    size: tuple[float, float] | None = None


def _note(id_: int, text: str, pos: tuple[float, float]) -> N:
    return N(id_, "MarkdownNote", pos, {"text": text}, title="Read me: models and downloads", size=(460, 560))


def build(name: str, spec: list[N], defs: dict[str, Any]) -> dict[str, Any]:
    by_id = {n.id: n for n in spec}
    links: list[list[Any]] = []
    out_links: dict[tuple[int, int], list[int]] = {}
    inputs_of: dict[int, list[dict[str, Any]]] = {}
    for node in spec:
        if node.type in ("MarkdownNote", "Note"):
            continue
        node_def = defs[node.type]
        socket_inputs = []
        for inp_name, kind, opts, _req in wt._ordered_inputs(node_def):
            if wt._is_widget(kind, opts) and inp_name not in node.links:
                continue
            entry: dict[str, Any] = {"name": inp_name, "type": kind if isinstance(kind, str) else "COMBO",
                                     "link": None}
            if wt._is_widget(kind, opts):
                entry["widget"] = {"name": inp_name}
            if inp_name in node.links:
                src, slot = node.links[inp_name]
                link_id = len(links) + 1
                out_type = defs[by_id[src].type]["output"][slot]
                links.append([link_id, src, slot, node.id, len(socket_inputs), out_type])
                entry["link"] = link_id
                out_links.setdefault((src, slot), []).append(link_id)
            socket_inputs.append(entry)
        inputs_of[node.id] = socket_inputs

    nodes = []
    for order, node in enumerate(spec):
        if node.type in ("MarkdownNote", "Note"):
            nodes.append({"id": node.id, "type": node.type, "pos": list(node.pos), "size": list(node.size),
                          "flags": {}, "order": order, "mode": 0, "inputs": [], "outputs": [],
                          "title": node.title, "properties": {}, "widgets_values": [node.widgets["text"]],
                          "color": "#432", "bgcolor": "#653"})
            continue
        node_def = defs[node.type]
        values = []
        for inp_name, role in wt.widget_slots(node_def):
            if role == "control":
                values.append(node.widgets.get(f"{inp_name}:control", "fixed"))
            elif role == "upload":
                values.append("image")
            else:
                if inp_name not in node.widgets:
                    kind, opts, _ = wt.input_spec(node_def, inp_name)
                    default = opts.get("default", kind[0] if isinstance(kind, list) and kind else None)
                    values.append(default)
                else:
                    values.append(node.widgets[inp_name])
        outputs = [{"name": oname, "type": otype, "links": out_links.get((node.id, slot), []), "slot_index": slot}
                   for slot, (otype, oname) in enumerate(zip(node_def["output"], node_def["output_name"],
                                                             strict=True))]
        n_widgets = len(wt.widget_slots(node_def))
        height = 46 + 24 * max(len(inputs_of[node.id]), len(outputs)) + 26 * n_widgets
        if node.type == "InfDiTUpscale":
            height += 240  # the plan readout
        entry = {"id": node.id, "type": node.type, "pos": list(node.pos),
                 "size": list(node.size or (max(340, MIN_WIDTH.get(node.type, 0)), height)), "flags": {},
                 "order": order, "mode": 0,
                 "inputs": inputs_of[node.id], "outputs": outputs,
                 "properties": {"Node name for S&R": node.type}, "widgets_values": values}
        if node.type in LOADER_WIDGETS:
            file_name = node.widgets[LOADER_WIDGETS[node.type]]
            url, directory = MODEL_DOWNLOADS[file_name]
            entry["properties"]["models"] = [{"name": file_name, "url": url, "directory": directory}]
        if node.title:
            entry["title"] = node.title
        nodes.append(entry)
    _stack_columns(nodes)
    clashes = wt.overlaps(nodes)
    if clashes:
        raise SystemExit(f"{name}: nodes overlap at the default zoom: " + "; ".join(clashes))
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"https://github.com/uniba-ultrares/ComfyUI-UniBA/{name}")),
        "revision": 0, "last_node_id": max(by_id), "last_link_id": len(links),
        "nodes": nodes, "links": links, "groups": [], "config": {},
        "extra": {"ds": {"scale": 0.6, "offset": [40, 60]}, "uniba": {"workflow": name}},
        "version": 0.4,
    }


def _stack_columns(nodes: list[dict[str, Any]]) -> None:
    """Nodes placed in one column (same x) keep their order and move down until each title bar clears the
    node above by GAP: sizes come from the node definitions, so positions written by hand cannot know them."""
    columns: dict[float, list[dict[str, Any]]] = {}
    for node in nodes:
        columns.setdefault(node["pos"][0], []).append(node)
    for column in columns.values():
        column.sort(key=lambda n: n["pos"][1])
        for above, node in zip(column, column[1:]):
            lowest = above["pos"][1] + above["size"][1] + wt.TITLE_HEIGHT + GAP
            if node["pos"][1] < lowest:
                node["pos"] = [node["pos"][0], lowest]


def _sana_text_to_latent(first_id: int, unet: str, width: int, height: int, x0: float) -> list[N]:
    i = first_id
    return [
        N(i, "SanaDiTLoader", (x0, 0), {"unet_name": unet, "weight_dtype": "auto"}),
        N(i + 1, "SanaTextEncoderLoader", (x0, 170), {"model_name": GEMMA, "dtype": "auto"}),
        N(i + 2, "SanaTextEncode", (x0 + 380, 0), {"text": PROMPT, "use_chi": True},
          links={"text_encoder": (i + 1, 0)}, title="Positive prompt", size=(400, 220)),
        N(i + 3, "SanaTextEncode", (x0 + 380, 260), {"text": "", "use_chi": False},
          links={"text_encoder": (i + 1, 0)}, title="Negative prompt", size=(400, 180)),
        N(i + 4, "SanaEmptyLatent", (x0, 340), {"width": width, "height": height, "batch_size": 1}),
        N(i + 5, "SanaSampler", (x0 + 820, 0),
          {"seed": 42, "seed:control": "fixed", "steps": 20, "cfg": 4.5, "solver": "flow_dpm_solver", "shift": 0.0,
           "denoise": 1.0},
          links={"model": (i, 0), "positive": (i + 2, 0), "negative": (i + 3, 0), "latent_image": (i + 4, 0)}),
        N(i + 6, "SanaVAELoader", (x0 + 820, 330), {"vae_name": DCAE, "dtype": "auto"}),
        N(i + 7, "SanaVAEDecode", (x0, ROW2), {"tile_size": 0}, links={"samples": (i + 5, 0), "vae": (i + 6, 0)}),
    ]


def _sana_sprint(first_id: int, x0: float) -> list[N]:
    i = first_id
    return [
        N(i, "SanaDiTLoader", (x0, 0), {"unet_name": SPRINT_1K, "weight_dtype": "auto"}),
        N(i + 1, "SanaTextEncoderLoader", (x0, 170), {"model_name": GEMMA, "dtype": "auto"}),
        N(i + 2, "SanaTextEncode", (x0 + 380, 0), {"text": PROMPT, "use_chi": True},
          links={"text_encoder": (i + 1, 0)}, title="Prompt", size=(400, 220)),
        N(i + 3, "SanaSprintGuidance", (x0 + 380, 260), {"guidance": 4.5}, links={"conditioning": (i + 2, 0)}),
        N(i + 4, "ConditioningZeroOut", (x0 + 380, 380), links={"conditioning": (i + 2, 0)},
          title="No negative (cfg 1)"),
        N(i + 5, "SanaEmptyLatent", (x0, 340), {"width": 1024, "height": 1024, "batch_size": 1}),
        N(i + 6, "SanaSprintSigmas", (x0 + 820, 0), {"steps": 2, "max_timesteps": 1.5708,
                                                     "intermediate_timesteps": 1.3}, links={"model": (i, 0)}),
        N(i + 7, "SanaSprintSampler", (x0 + 820, 170)),
        N(i + 8, "SamplerCustom", (x0 + 1200, 0),
          {"add_noise": True, "noise_seed": 42, "noise_seed:control": "fixed", "cfg": 1.0},
          links={"model": (i, 0), "positive": (i + 3, 0), "negative": (i + 4, 0), "sampler": (i + 7, 0),
                 "sigmas": (i + 6, 0), "latent_image": (i + 5, 0)}),
        N(i + 9, "SanaVAELoader", (x0 + 820, 330), {"vae_name": DCAE, "dtype": "auto"}),
        N(i + 10, "SanaVAEDecode", (x0, ROW2), {"tile_size": 0}, links={"samples": (i + 8, 0), "vae": (i + 9, 0)}),
    ]


def _sana_lora(first_id: int, x0: float) -> list[N]:
    """Sana text to image with a LoRA between the DiT loader and the sampler (ids first_id .. first_id + 8)."""
    base = _sana_text_to_latent(first_id, SANA_1K, 1024, 1024, x0)
    lora_id = first_id + 8
    sampler = base[5]
    sampler.links["model"] = (lora_id, 0)
    return [*base, N(lora_id, "SanaLoraLoader", (x0, 520), {"lora_name": SANA_LORA, "strength_model": 1.0},
                     links={"model": (first_id, 0)})]


def _sana_controlnet(first_id: int, x0: float) -> list[N]:
    """Sana text to image steered by a ControlNet through the stock Apply ControlNet (ids first_id .. + 11)."""
    i = first_id
    base = _sana_text_to_latent(i, SANA_1K, 1024, 1024, x0)
    sampler = base[5]
    sampler.pos = (x0 + 1200, 0)
    sampler.links["positive"], sampler.links["negative"] = (i + 11, 0), (i + 11, 1)
    return [
        *base,
        N(i + 8, "LoadImage", (x0 + 1600, 0), {"image": HED_IMAGE}, title="HED control image", size=(340, 420)),
        N(i + 9, "SanaControlNetLoader", (x0 + 1200, 520), {"control_net_name": SANA_CONTROLNET,
                                                            "weight_dtype": "auto", "wiring": "diffusers"}),
        N(i + 11, "ControlNetApplyAdvanced", (x0 + 1600, 480),
          {"strength": 0.8, "start_percent": 0.0, "end_percent": 1.0},
          links={"positive": (i + 2, 0), "negative": (i + 3, 0), "control_net": (i + 9, 0), "image": (i + 8, 0),
                 "vae": (i + 6, 0)}),
    ]


def _sdxl_hidiffusion(first_id: int, x0: float) -> list[N]:
    i = first_id
    return [
        N(i, "CheckpointLoaderSimple", (x0, 0), {"ckpt_name": SDXL}),
        N(i + 1, "HiDiffusionPatch", (x0, 160),
          {"raunet": True, "msw_msa": True, "model_variant": "auto", "seed": 0, "seed:control": "fixed"},
          links={"model": (i, 0)}),
        N(i + 2, "CLIPTextEncode", (x0 + 380, 0), {"text": PROMPT}, links={"clip": (i, 1)},
          title="Positive prompt", size=(400, 200)),
        N(i + 3, "CLIPTextEncode", (x0 + 380, 240), {"text": NEGATIVE_SDXL}, links={"clip": (i, 1)},
          title="Negative prompt", size=(400, 160)),
        N(i + 4, "EmptyLatentImage", (x0, 380), {"width": 2048, "height": 2048, "batch_size": 1}),
        N(i + 5, "KSampler", (x0 + 820, 0),
          {"seed": 42, "seed:control": "fixed", "steps": 30, "cfg": 7.0, "sampler_name": "euler_ancestral",
           "scheduler": "normal", "denoise": 1.0},
          links={"model": (i + 1, 0), "positive": (i + 2, 0), "negative": (i + 3, 0), "latent_image": (i + 4, 0)}),
        N(i + 6, "VAEDecode", (x0, ROW2), links={"samples": (i + 5, 0), "vae": (i, 2)}),
    ]


def _infdit(first_id: int, image: tuple[int, int], scale: str, x0: float, y0: float = 0) -> list[N]:
    i = first_id
    return [
        N(i, "InfDiTLoader", (x0, y0 + 560), {"model_name": INFDIT, "dtype": "auto"}),
        N(i + 1, "InfDiTUpscale", (x0, y0),
          {"scale": scale, "steps": 20, "seed": 0, "seed:control": "fixed", "block_batch": "auto",
           "offload_cache": "auto", "color_match": "wavelet"},
          links={"model": (i, 0), "image": image}),
    ]


def specs() -> dict[str, list[N]]:
    sana1k = _sana_text_to_latent(2, SANA_1K, 1024, 1024, 0)
    sana4k = _sana_text_to_latent(2, SANA_4K, 4096, 4096, 0)
    return {
        "sana_1024_to_4096_infdit": [
            _note(1, NOTES["sana_1024_to_4096_infdit"], (-500, 0)), *sana1k,
            N(10, "PreviewImage", (380, ROW2), links={"images": (9, 0)}, title="Sana 1024 px", size=(360, 400)),
            *_infdit(11, (9, 0), "4", 780, ROW2),
            N(13, "SaveImage", (1240, ROW2), {"filename_prefix": "uniba/sana_infdit_4096"}, links={"images": (12, 0)},
              size=(480, 520)),
        ],
        "sana_4k_native": [
            _note(1, NOTES["sana_4k_native"], (-500, 0)), *sana4k,
            N(10, "SaveImage", (380, ROW2), {"filename_prefix": "uniba/sana_4k"}, links={"images": (9, 0)},
              size=(480, 520)),
        ],
        "sana_sprint_2step": [
            _note(1, NOTES["sana_sprint_2step"], (-500, 0)), *_sana_sprint(2, 0),
            N(13, "SaveImage", (380, ROW2), {"filename_prefix": "uniba/sana_sprint"}, links={"images": (12, 0)},
              size=(480, 520)),
        ],
        "sana_lora": [
            _note(1, NOTES["sana_lora"], (-500, 0)), *_sana_lora(2, 0),
            N(11, "SaveImage", (380, ROW2), {"filename_prefix": "uniba/sana_lora"}, links={"images": (9, 0)},
              size=(480, 520)),
        ],
        "sana_controlnet": [
            _note(1, NOTES["sana_controlnet"], (-500, 0)), *_sana_controlnet(2, 0),
            N(14, "SaveImage", (380, ROW2), {"filename_prefix": "uniba/sana_controlnet"}, links={"images": (9, 0)},
              size=(480, 520)),
        ],
        "sdxl_hidiffusion_2048": [
            _note(1, NOTES["sdxl_hidiffusion_2048"], (-500, 0)), *_sdxl_hidiffusion(2, 0),
            N(9, "SaveImage", (380, ROW2), {"filename_prefix": "uniba/sdxl_hidiffusion_2048"}, links={"images": (8, 0)},
              size=(480, 520)),
        ],
        "sdxl_hidiffusion_to_4096_infdit": [
            _note(1, NOTES["sdxl_hidiffusion_to_4096_infdit"], (-500, 0)), *_sdxl_hidiffusion(2, 0),
            N(9, "PreviewImage", (380, ROW2), links={"images": (8, 0)}, title="SDXL 2048 px", size=(360, 400)),
            *_infdit(10, (8, 0), "2", 780, ROW2),
            N(12, "SaveImage", (1240, ROW2), {"filename_prefix": "uniba/sdxl_hidiffusion_infdit_4096"},
              links={"images": (11, 0)}, size=(480, 520)),
        ],
        "upscale_render_4x": [
            _note(1, NOTES["upscale_render_4x"], (-500, 0)),
            N(2, "LoadImage", (0, 0), {"image": "example.png"}, size=(340, 420)),
            *_infdit(3, (2, 0), "4", 400),
            N(5, "SaveImage", (860, 0), {"filename_prefix": "uniba/upscaled_4x"}, links={"images": (4, 0)},
              size=(480, 520)),
        ],
    }


def main(classes: dict[str, type] | None = None) -> None:
    if classes is None:
        sys.path.insert(0, str(HERE.parent))
        import conftest  # noqa: F401 - registers the pack as uniba_pack
        from uniba_pack.nodes import NODE_CLASS_MAPPINGS as classes

    defs = wt.node_definitions(classes)
    for name, spec in specs().items():
        workflow = build(name, spec, defs)
        errors = wt.validate_workflow(workflow, defs)
        if errors:
            raise SystemExit(f"{name}: " + "\n".join(errors))
        path = wt.WORKFLOWS / f"{name}.json"
        path.write_text(json.dumps(workflow, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print("wrote", path.relative_to(HERE.parent))


if __name__ == "__main__":
    main()

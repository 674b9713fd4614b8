"""The sample workflows match the node definitions: the pack's classes and a recorded core snapshot."""

from __future__ import annotations

import copy
import json
import re
import uuid

import pytest
import workflow_tools as wt
from uniba_pack.nodes import NODE_CLASS_MAPPINGS

EXPECTED = {
    "sana_1024_to_4096_infdit", "sana_4k_native", "sdxl_hidiffusion_2048", "sdxl_hidiffusion_to_4096_infdit",
    "upscale_render_4x", "sana_sprint_2step", "sana_lora", "sana_controlnet",
}


@pytest.fixture(scope="module")
def defs() -> dict:
    return wt.node_definitions(NODE_CLASS_MAPPINGS)


def _load(name: str) -> dict:
    return wt.load_workflow(f"{name}.json")


def _widgets(workflow: dict, node_type: str, defs: dict, index: int = 0) -> dict:
    node = wt.nodes_of_type(workflow, node_type)[index]
    return wt.widget_values_by_name(node, defs[node_type])


def test_the_workflows_are_shipped() -> None:
    assert {p.stem for p in wt.workflow_files()} == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_workflow_has_a_thumbnail_a_screenshot_and_a_section_in_the_docs(name: str) -> None:
    """The template browser shows workflows/<name>.jpg (a grey card without it); docs/workflows.md lists each one."""
    docs = wt.WORKFLOWS.parent / "docs"
    made_by = "made by UNIBA_WRITE_SCREENSHOTS=1 pytest tests/integration/test_browser.py (see docs/workflows.md)"
    assert (wt.WORKFLOWS / f"{name}.jpg").is_file(), f"workflows/{name}.jpg is missing: {made_by}"
    assert (docs / "screenshots" / f"{name}.png").is_file(), f"docs/screenshots/{name}.png is missing: {made_by}"
    page = (docs / "workflows.md").read_text(encoding="utf-8")
    assert f"| `{name}` |" in page, f"docs/workflows.md: add a table row for `{name}` (what it does, its models)"
    assert f"### {name}\n![" in page and f"(screenshots/{name}.png)" in page, \
        f"docs/workflows.md: add a '### {name}' section with its screenshot"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_workflow_matches_node_definitions(name: str, defs: dict) -> None:
    workflow = _load(name)
    assert workflow["version"] == 0.4 and isinstance(workflow["links"], list)
    uuid.UUID(workflow["id"])  # the frontend's schema rejects a workflow whose id is not a UUID
    assert wt.validate_workflow(workflow, defs) == []


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_workflow_has_a_note_naming_models_and_downloads(name: str, defs: dict) -> None:
    workflow = _load(name)
    notes = [n for n in workflow["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    assert "models/" in text and "https://" in text
    pack_types = {n["type"] for n in workflow["nodes"]} & set(NODE_CLASS_MAPPINGS)
    if pack_types & {"InfDiTLoader"}:
        assert "models/infdit" in text
    if pack_types & {"SanaDiTLoader"}:
        assert "models/diffusion_models" in text and "models/text_encoders" in text and "models/vae" in text
    if any(n["type"] == "CheckpointLoaderSimple" for n in workflow["nodes"]):
        assert "models/checkpoints" in text


RELEASE_FILES = {  # what a user downloads, as the notes say; the loader must preselect exactly that
    "InfDiTLoader": ("model_name", "mp_rank_00_model_states.pt", "infdit"),
    "SanaTextEncoderLoader": ("model_name", "gemma-2-2b-it", "text_encoders"),
    "SanaVAELoader": ("vae_name", "dc-ae-f32c32-sana-1.1.safetensors", "vae"),
    "CheckpointLoaderSimple": ("ckpt_name", "sd_xl_base_1.0.safetensors", "checkpoints"),
    "SanaLoraLoader": ("lora_name", "sana_1600m_dreambooth_dog_lora.safetensors", "loras"),
    "SanaControlNetLoader": ("control_net_name", "Sana_1600M_1024px_BF16_ControlNet_HED.pth", "controlnet"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loaders_preselect_the_release_files_and_declare_their_download(name: str, defs: dict) -> None:
    workflow = _load(name)
    note = next(n for n in workflow["nodes"] if n["type"] == "MarkdownNote")["widgets_values"][0]
    loaders = [n for n in workflow["nodes"] if n["type"].endswith("Loader") or n["type"] == "CheckpointLoaderSimple"]
    assert loaders
    for node in loaders:
        chosen = wt.widget_values_by_name(node, defs[node["type"]])
        if node["type"] == "SanaDiTLoader":
            widget, directory = "unet_name", "diffusion_models"
            expected = chosen[widget]
            assert re.fullmatch(r"Sana_1600M_(1024px|4Kpx)_BF16\.pth|Sana_Sprint_1\.6B_1024px\.pth", expected), expected
        else:
            widget, expected, directory = RELEASE_FILES[node["type"]]
        assert chosen[widget] == expected, (node["type"], chosen[widget])
        assert f"`{expected}`" in note or expected in note, f"the note does not name {expected}"
        models = node["properties"]["models"]
        assert models == [{"name": expected, "url": models[0]["url"], "directory": directory}], models
        assert models[0]["url"].startswith("https://")
        if expected.endswith(".safetensors") or expected.endswith(".pth"):
            # a direct file link the frontend can download (Inf-DiT and the Gemma folder link to their pages)
            assert "/resolve/main/" in models[0]["url"], models[0]["url"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_api_conversion_gives_every_required_input(name: str, defs: dict) -> None:
    prompt = wt.to_api(_load(name), defs)
    assert prompt, "empty prompt"
    for node_id, node in prompt.items():
        node_def = defs[node["class_type"]]
        for input_name in node_def["input"].get("required", {}):
            assert input_name in node["inputs"], f"{node_id} {node['class_type']} misses {input_name}"
        for input_name, value in node["inputs"].items():
            assert wt.input_spec(node_def, input_name) is not None, f"{node['class_type']} has no {input_name}"
            if isinstance(value, list):
                assert value[0] in prompt, f"{node_id}.{input_name} links to a node that is not queued"
        assert all(v not in wt.SEED_CONTROL_VALUES for k, v in node["inputs"].items() if k.endswith("seed"))


def test_sana_1024_to_4096_settings(defs: dict) -> None:
    w = _load("sana_1024_to_4096_infdit")
    latent = _widgets(w, "SanaEmptyLatent", defs)
    assert (latent["width"], latent["height"]) == (1024, 1024)
    sampler = _widgets(w, "SanaSampler", defs)
    assert (sampler["steps"], sampler["cfg"], sampler["solver"]) == (20, 4.5, "flow_dpm_solver")
    assert _widgets(w, "InfDiTUpscale", defs)["scale"] == "4"
    prompt = wt.to_api(w, defs)
    upscale = next(n for n in prompt.values() if n["class_type"] == "InfDiTUpscale")
    decode_id = upscale["inputs"]["image"][0]
    assert prompt[decode_id]["class_type"] == "SanaVAEDecode"
    save = next(n for n in prompt.values() if n["class_type"] == "SaveImage")
    assert prompt[save["inputs"]["images"][0]]["class_type"] == "InfDiTUpscale"


def test_sana_4k_settings(defs: dict) -> None:
    w = _load("sana_4k_native")
    latent = _widgets(w, "SanaEmptyLatent", defs)
    assert (latent["width"], latent["height"]) == (4096, 4096)
    assert "4K" in _widgets(w, "SanaDiTLoader", defs)["unet_name"]
    assert _widgets(w, "SanaVAEDecode", defs)["tile_size"] == 0  # 0 = tiles chosen from free memory
    assert _widgets(w, "SanaSampler", defs)["solver"] == "flow_dpm_solver"


def test_sana_sprint_settings(defs: dict) -> None:
    w = _load("sana_sprint_2step")
    assert _widgets(w, "SanaDiTLoader", defs)["unet_name"] == "Sana_Sprint_1.6B_1024px.pth"
    assert _widgets(w, "SanaSprintSigmas", defs) == {"steps": 2, "max_timesteps": 1.5708,
                                                      "intermediate_timesteps": 1.3}
    assert _widgets(w, "SanaSprintGuidance", defs)["guidance"] == 4.5
    assert _widgets(w, "SamplerCustom", defs)["cfg"] == 1.0  # Sprint has no CFG: the negative is never run
    prompt = wt.to_api(w, defs)
    sampler = next(n for n in prompt.values() if n["class_type"] == "SamplerCustom")
    kinds = {name: prompt[value[0]]["class_type"] for name, value in sampler["inputs"].items()
             if isinstance(value, list)}
    assert kinds == {"model": "SanaDiTLoader", "positive": "SanaSprintGuidance", "negative": "ConditioningZeroOut",
                     "sampler": "SanaSprintSampler", "sigmas": "SanaSprintSigmas", "latent_image": "SanaEmptyLatent"}


def _inputs_from(prompt: dict, class_type: str) -> dict[str, str]:
    node = next(n for n in prompt.values() if n["class_type"] == class_type)
    return {name: prompt[value[0]]["class_type"] for name, value in node["inputs"].items() if isinstance(value, list)}


def test_sana_lora_chain(defs: dict) -> None:
    w = _load("sana_lora")
    assert _widgets(w, "SanaLoraLoader", defs)["strength_model"] == 1.0
    prompt = wt.to_api(w, defs)
    assert _inputs_from(prompt, "SanaLoraLoader") == {"model": "SanaDiTLoader"}
    assert _inputs_from(prompt, "SanaSampler")["model"] == "SanaLoraLoader"


def test_sana_controlnet_chain(defs: dict) -> None:
    w = _load("sana_controlnet")
    assert _widgets(w, "ControlNetApplyAdvanced", defs) == {"strength": 0.8, "start_percent": 0.0, "end_percent": 1.0}
    prompt = wt.to_api(w, defs)
    assert _inputs_from(prompt, "ControlNetApplyAdvanced") == {
        "positive": "SanaTextEncode", "negative": "SanaTextEncode", "control_net": "SanaControlNetLoader",
        "image": "LoadImage", "vae": "SanaVAELoader"}
    sampler = _inputs_from(prompt, "SanaSampler")
    assert sampler["positive"] == sampler["negative"] == "ControlNetApplyAdvanced"
    assert sampler["model"] == "SanaDiTLoader"


@pytest.mark.parametrize("name,scale", [("sdxl_hidiffusion_2048", None), ("sdxl_hidiffusion_to_4096_infdit", "2")])
def test_sdxl_hidiffusion_settings(name: str, scale: str | None, defs: dict) -> None:
    w = _load(name)
    latent = _widgets(w, "EmptyLatentImage", defs)
    assert (latent["width"], latent["height"]) == (2048, 2048)
    patch = _widgets(w, "HiDiffusionPatch", defs)
    assert patch["raunet"] is True and patch["msw_msa"] is True
    prompt = wt.to_api(w, defs)
    ksampler = next(n for n in prompt.values() if n["class_type"] == "KSampler")
    assert prompt[ksampler["inputs"]["model"][0]]["class_type"] == "HiDiffusionPatch"
    if scale:
        assert _widgets(w, "InfDiTUpscale", defs)["scale"] == scale
    else:
        assert not wt.nodes_of_type(w, "InfDiTUpscale")


def test_upscale_render_chain(defs: dict) -> None:
    prompt = wt.to_api(_load("upscale_render_4x"), defs)
    assert sorted(n["class_type"] for n in prompt.values()) == ["InfDiTLoader", "InfDiTUpscale", "LoadImage",
                                                                 "SaveImage"]
    upscale = next(n for n in prompt.values() if n["class_type"] == "InfDiTUpscale")
    assert upscale["inputs"]["scale"] == "4"
    assert prompt[upscale["inputs"]["image"][0]]["class_type"] == "LoadImage"


def test_seed_control_values_follow_seeds(defs: dict) -> None:
    w = _load("upscale_render_4x")
    node = wt.nodes_of_type(w, "InfDiTUpscale")[0]
    slots = wt.widget_slots(defs["InfDiTUpscale"])
    seed_at = slots.index(("seed", "value"))
    assert slots[seed_at + 1] == ("seed", "control")
    assert node["widgets_values"][seed_at + 1] in wt.SEED_CONTROL_VALUES
    load = wt.nodes_of_type(w, "LoadImage")[0]
    assert load["widgets_values"] == ["example.png", "image"]  # file name + the upload button's value


# --------------------------------------------------------------------------- the checker itself catches mistakes

def _broken(mutate) -> list[str]:
    defs = wt.node_definitions(NODE_CLASS_MAPPINGS)
    workflow = copy.deepcopy(_load("sana_1024_to_4096_infdit"))
    mutate(workflow)
    return wt.validate_workflow(workflow, defs)


def _node(workflow: dict, node_type: str) -> dict:
    return wt.nodes_of_type(workflow, node_type)[0]


def test_checker_flags_unknown_node_type() -> None:
    errors = _broken(lambda w: _node(w, "SanaSampler").update(type="SanaSamplerOld"))
    assert any("unknown node type" in e for e in errors)


def test_checker_flags_mismatched_link() -> None:
    def mutate(w: dict) -> None:
        link = next(link for link in w["links"] if link[5] == "VAE")
        link[1], link[2] = _node(w, "SanaDiTLoader")["id"], 0  # MODEL into a VAE input
    errors = _broken(mutate)
    assert any("MODEL" in e and "vae" in e for e in errors)


def test_checker_flags_bad_widget_values() -> None:
    defs = wt.node_definitions(NODE_CLASS_MAPPINGS)
    slots = wt.widget_slots(defs["SanaSampler"])

    def set_value(name: str, role: str, value) -> list[str]:
        return _broken(lambda w: _node(w, "SanaSampler")["widgets_values"].__setitem__(slots.index((name, role)),
                                                                                       value))

    assert any("solver" in e for e in set_value("solver", "value", "dpmpp_2m"))
    assert any("steps" in e for e in set_value("steps", "value", 0))
    assert any("steps" in e for e in set_value("steps", "value", 2.5))
    assert any("control_after_generate" in e for e in set_value("seed", "control", "sometimes"))
    assert _broken(lambda w: _node(w, "SanaSampler")["widgets_values"].pop())  # one value short


def test_checker_flags_unconnected_required_input() -> None:
    def mutate(w: dict) -> None:
        node = _node(w, "InfDiTUpscale")
        image = next(i for i in node["inputs"] if i["name"] == "image")
        w["links"] = [link for link in w["links"] if link[0] != image["link"]]
        image["link"] = None
    assert any("'image' is not connected" in e for e in _broken(mutate))


def test_checker_accepts_any_model_file_name(defs: dict) -> None:
    assert wt.check_widget_value("InfDiTLoader", "model_name", [], {}, "my-own.safetensors") is None
    assert wt.check_widget_value("InfDiTLoader", "model_name", [], {}, "") is not None


def test_core_snapshot_is_recorded() -> None:
    snapshot = json.loads(wt.CORE_SNAPSHOT.read_text(encoding="utf-8"))
    assert {"KSampler", "CheckpointLoaderSimple", "SaveImage", "LoadImage", "VAEDecode"} <= set(snapshot)
    assert not set(snapshot) & set(NODE_CLASS_MAPPINGS), "a pack node id collides with a core node"


@pytest.mark.parametrize("path", wt.workflow_files(), ids=lambda p: p.stem)
def test_no_node_covers_another_at_the_default_zoom(path) -> None:
    # every template in workflows/, also ones added later; the title bar counts (it is drawn above pos)
    nodes = wt.load_workflow(path)["nodes"]
    assert all(len(n["size"]) == 2 and min(n["size"]) > 0 for n in nodes)
    assert wt.overlaps(nodes) == []


def test_overlap_check_sees_a_covered_title_bar() -> None:
    upscale = {"id": 1, "type": "InfDiTUpscale", "pos": [400, 0], "size": [340, 564]}
    loader = {"id": 2, "type": "InfDiTLoader", "pos": [400, 580], "size": [340, 122]}  # title bar at 550-580
    assert wt.overlaps([upscale, loader]) == ["1 InfDiTUpscale overlaps 2 InfDiTLoader"]
    loader["pos"] = [400, 564 + wt.TITLE_HEIGHT]
    assert wt.overlaps([upscale, loader]) == []

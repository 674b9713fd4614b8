"""Writes the subgraph blueprints in ``subgraphs/`` from the same short descriptions as the workflows.

ComfyUI v0.28 serves a pack's ``subgraphs/*.json`` (``app/subgraph_manager.py``: ``/global_subgraphs``), and
frontend 1.5x lists each under *Subgraph Blueprints/<category>* in the node library, named after its file.
The format is the frontend's own (what *Publish subgraph* saves): a workflow whose root graph is a single
node whose ``type`` is the id of a subgraph in ``definitions.subgraphs``; inside, links are objects and the
subgraph's boundary is the input node -10 and the output node -20.

Each blueprint is first built as an ordinary workflow (``workflow_builder.build``, so widget values follow
the node definitions and the layout never overlaps), with stand-in nodes where the boundary goes; the
stand-ins become the boundary. Run ``python tests/blueprint_builder.py`` after a node's inputs change.
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import workflow_builder as wb  # noqa: E402
import workflow_tools as wt  # noqa: E402
from workflow_builder import N  # noqa: E402

SUBGRAPHS = wt.REPO / "subgraphs"
CATEGORY = "UniBA"
INPUT_NODE, OUTPUT_NODE = -10, -20
SOURCE, SINK = 900, 901  # stand-in node ids: the boundary's image input and output


@dataclass
class Blueprint:
    name: str  # the file name, which the node library shows
    description: str
    aliases: list[str]
    spec: list[N]  # with SOURCE (a LoadImage) when the blueprint takes an image, and SINK (a PreviewImage)
    widgets: list[tuple[int, str]]  # inner (node id, widget) shown on the blueprint node


def _sink(link: tuple[int, int]) -> N:
    return N(SINK, "PreviewImage", (0, -400), links={"images": link})


def blueprints() -> list[Blueprint]:
    infdit = wb._infdit(2, (SOURCE, 0), "4", 0)
    sana = wb._sana_text_to_latent(2, wb.SANA_4K, 4096, 4096, 0)
    sdxl = wb._sdxl_hidiffusion(2, 0)
    sdxl_up = wb._infdit(9, (8, 0), "2", 400, wb.ROW2)
    return [
        Blueprint("Inf-DiT 4x Upscale",
                  "Upscale an image 4x with Inf-DiT block by block (memory grows with the side, not the area). "
                  "Needs models/infdit/mp_rank_00_model_states.pt.",
                  ["UniBA", "Inf-DiT", "upscale", "4x"],
                  [N(SOURCE, "LoadImage", (0, -900), {"image": "example.png"}), *infdit, _sink((3, 0))],
                  [(2, "model_name"), (3, "scale"), (3, "steps"), (3, "seed"), (3, "color_match")]),
        Blueprint("Sana text to 4K image",
                  "Sana 1.6B 4K samples 4096 px natively (Flow-DPM-Solver, 20 steps, CFG 4.5), exact tiled DC-AE "
                  "decode. Needs Sana_1600M_4Kpx_BF16.pth, the gemma-2-2b-it folder and the DC-AE f32c32.",
                  ["UniBA", "Sana", "text to image", "4K"],
                  [*sana, _sink((9, 0))],
                  [(4, "text"), (7, "seed"), (6, "width"), (6, "height")]),
        Blueprint("SDXL 2048 with HiDiffusion, then Inf-DiT to 4096",
                  "SDXL with HiDiffusion at 2048 px (euler_ancestral, 30 steps), then Inf-DiT 2x to 4096 px. Needs "
                  "an SDXL checkpoint and models/infdit/mp_rank_00_model_states.pt.",
                  ["UniBA", "HiDiffusion", "Inf-DiT", "SDXL", "upscale", "4K"],
                  [*sdxl, *sdxl_up, _sink((10, 0))],
                  [(2, "ckpt_name"), (4, "text"), (7, "seed"), (9, "model_name")]),
    ]


def _ids(name: str, what: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"https://github.com/uniba-ultrares/ComfyUI-UniBA/subgraphs/{name}/{what}"))


def build_blueprint(bp: Blueprint, defs: dict[str, Any]) -> dict[str, Any]:
    flat = wb.build(bp.name, bp.spec, defs)
    errors = wt.validate_workflow(flat, defs)
    if errors:
        raise SystemExit(f"{bp.name}: " + "\n".join(errors))
    nodes = [n for n in flat["nodes"] if n["id"] not in (SOURCE, SINK)]
    links = []
    boundary_in: list[dict[str, Any]] = []
    boundary_out: list[dict[str, Any]] = []
    for link_id, src, slot, dst, dslot, kind in flat["links"]:
        if src == SOURCE:
            src, slot = INPUT_NODE, 0
            boundary_in.append({"id": _ids(bp.name, "in"), "name": "image", "type": kind, "linkIds": [link_id],
                                "localized_name": "image", "label": "image", "pos": [-180, 20]})
        if dst == SINK:
            dst, dslot = OUTPUT_NODE, 0
            boundary_out.append({"id": _ids(bp.name, "out"), "name": "IMAGE", "type": kind, "linkIds": [link_id],
                                 "localized_name": "IMAGE", "label": "IMAGE", "pos": [1300, 20]})
        links.append({"id": link_id, "origin_id": src, "origin_slot": slot, "target_id": dst, "target_slot": dslot,
                      "type": kind})
    by_id = {n["id"]: n for n in nodes}
    for node_id, widget in bp.widgets:
        assert any(name == widget for name, _ in wt.widget_slots(defs[by_id[node_id]["type"]])), (node_id, widget)
    subgraph_id = _ids(bp.name, "subgraph")
    subgraph = {
        "id": subgraph_id, "version": 1,
        "state": {"lastGroupId": 0, "lastNodeId": max(by_id), "lastLinkId": flat["last_link_id"], "lastRerouteId": 0},
        "revision": 0, "config": {}, "name": bp.name,
        "inputNode": {"id": INPUT_NODE, "bounding": [-300, 0, 120, 60]},
        "outputNode": {"id": OUTPUT_NODE, "bounding": [1280, 0, 120, 60]},
        "inputs": boundary_in, "outputs": boundary_out, "widgets": [], "nodes": nodes, "groups": [], "links": links,
        "extra": {}, "category": CATEGORY, "description": bp.description,
    }
    outer = max(by_id) + 1
    root = {
        "id": outer, "type": subgraph_id, "pos": [0, 0], "size": [320, 46 + 24 * len(bp.widgets)], "flags": {},
        "order": 0, "mode": 0,
        "inputs": [{"label": i["label"], "localized_name": i["name"], "name": i["name"], "type": i["type"],
                    "link": None} for i in boundary_in],
        "outputs": [{"label": o["label"], "localized_name": o["name"], "name": o["name"], "type": o["type"],
                     "links": []} for o in boundary_out],
        "properties": {"proxyWidgets": [[str(node_id), widget] for node_id, widget in bp.widgets]},
        "widgets_values": [], "title": bp.name,
    }
    return {"revision": 0, "last_node_id": outer, "last_link_id": 0, "nodes": [root], "links": [], "version": 0.4,
            "definitions": {"subgraphs": [subgraph]}, "extra": {"BlueprintSearchAliases": bp.aliases}}


def main(classes: dict[str, type] | None = None) -> None:
    if classes is None:
        import conftest  # noqa: F401 - registers the pack as uniba_pack
        from uniba_pack.nodes import NODE_CLASS_MAPPINGS as classes

    defs = wt.node_definitions(classes)
    SUBGRAPHS.mkdir(exist_ok=True)
    for bp in blueprints():
        path = SUBGRAPHS / f"{bp.name}.json"
        path.write_text(json.dumps(build_blueprint(bp, defs), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print("wrote", path.relative_to(wt.REPO))


if __name__ == "__main__":
    main()

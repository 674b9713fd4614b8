"""Subgraph blueprints (``subgraphs/*.json``): valid in the frontend's format, built from existing node types,
generated (not hand-edited), and flattened to a prompt whose every required input is given."""

from __future__ import annotations

import json

import blueprint_builder as bb
import pytest
import workflow_tools as wt
from uniba_pack.nodes import NODE_CLASS_MAPPINGS

NAMES = {"Inf-DiT 4x Upscale", "Sana text to 4K image", "SDXL 2048 with HiDiffusion, then Inf-DiT to 4096"}
FILES = sorted(bb.SUBGRAPHS.glob("*.json"))


@pytest.fixture(scope="module")
def defs() -> dict:
    return wt.node_definitions(NODE_CLASS_MAPPINGS)


def _load(path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_three_blueprints_are_shipped() -> None:
    assert NAMES <= {p.stem for p in FILES}


@pytest.mark.parametrize("bp", bb.blueprints(), ids=lambda bp: bp.name)
def test_files_are_what_the_builder_writes(bp: bb.Blueprint, defs: dict) -> None:
    path = bb.SUBGRAPHS / f"{bp.name}.json"
    assert _load(path) == bb.build_blueprint(bp, defs), f"{path.name} is stale: run python tests/blueprint_builder.py"


def _problems(blueprint: dict, defs: dict) -> list[str]:
    """What the frontend would refuse or break on (SubgraphBlueprint.validateSubgraph, LiteGraph's links)."""
    problems = []
    roots = blueprint["nodes"]
    subgraphs = {s["id"]: s for s in blueprint.get("definitions", {}).get("subgraphs", [])}
    if len(roots) != 1 or roots[0]["type"] not in subgraphs:
        return ["the root graph must be a single node of a subgraph in definitions.subgraphs"]
    root, sub = roots[0], subgraphs[roots[0]["type"]]
    nodes = {n["id"]: n for n in sub["nodes"]}
    links = {k["id"]: k for k in sub["links"]}
    for node in nodes.values():
        if node["type"] not in defs:
            problems.append(f"node {node['id']}: unknown type {node['type']}")
    problems += [p for p in wt.validate_workflow(
        {"nodes": list(nodes.values()), "last_node_id": sub["state"]["lastNodeId"],
         "last_link_id": sub["state"]["lastLinkId"],
         "links": [[k["id"], k["origin_id"], k["origin_slot"], k["target_id"], k["target_slot"], k["type"]]
                   for k in links.values() if k["origin_id"] in nodes and k["target_id"] in nodes]}, defs)
                 if not p.startswith("no output node")]  # a blueprint hands its image out through its boundary
    for link in links.values():
        src, dst = link["origin_id"], link["target_id"]
        if src == wt.SUBGRAPH_INPUT:
            boundary = sub["inputs"][link["origin_slot"]]
            ok = link["id"] in boundary["linkIds"] and boundary["type"] == link["type"]
        else:
            origin = defs.get(nodes[src]["type"]) if src in nodes else None
            ok = origin is not None and origin["output"][link["origin_slot"]] == link["type"] \
                and link["id"] in nodes[src]["outputs"][link["origin_slot"]]["links"]
        if dst == wt.SUBGRAPH_OUTPUT:
            boundary = sub["outputs"][link["target_slot"]]
            ok = ok and link["id"] in boundary["linkIds"] and boundary["type"] == link["type"]
        else:
            ok = ok and dst in nodes and nodes[dst]["inputs"][link["target_slot"]]["link"] == link["id"] \
                and wt.types_match(link["type"], nodes[dst]["inputs"][link["target_slot"]]["type"])
        if not ok:
            problems.append(f"link {link['id']} {src}:{link['origin_slot']} -> {dst}:{link['target_slot']} is broken")
    for side in ("inputs", "outputs"):
        if [(p["name"], p["type"]) for p in sub[side]] != [(p["name"], p["type"]) for p in root[side]]:
            problems.append(f"the root node's {side} differ from the subgraph's")
    for node_id, widget in root["properties"].get("proxyWidgets", []):
        node = nodes.get(int(node_id))
        if node is None or node["type"] not in defs \
                or widget not in [name for name, _ in wt.widget_slots(defs[node["type"]])]:
            problems.append(f"proxy widget {node_id}.{widget} does not exist")
    if not sub.get("category") or not sub.get("description") or not sub["name"]:
        problems.append("name, category and description are what the node library shows")
    return problems


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_blueprint_is_valid(path, defs: dict) -> None:
    blueprint = _load(path)
    assert _problems(blueprint, defs) == []
    assert wt.blueprint_subgraph(blueprint)["category"] == bb.CATEGORY  # "Subgraph Blueprints/UniBA" in the library
    assert "UniBA" in blueprint["extra"]["BlueprintSearchAliases"]
    assert wt.overlaps(wt.blueprint_subgraph(blueprint)["nodes"]) == []


def test_the_check_sees_broken_blueprints(defs: dict) -> None:
    good = _load(bb.SUBGRAPHS / "Inf-DiT 4x Upscale.json")
    bad = json.loads(json.dumps(good))
    wt.blueprint_subgraph(bad)["nodes"][1]["type"] = "NoSuchNode"
    assert any("unknown type NoSuchNode" in p for p in _problems(bad, defs))
    bad = json.loads(json.dumps(good))
    wt.blueprint_subgraph(bad)["links"][0]["target_slot"] = 1
    assert any(p.startswith("link ") for p in _problems(bad, defs))
    bad = json.loads(json.dumps(good))
    bad["nodes"].append(dict(bad["nodes"][0], id=99))
    assert _problems(bad, defs) == ["the root graph must be a single node of a subgraph in definitions.subgraphs"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_flattened_prompt_gives_every_required_input(path, defs: dict) -> None:
    blueprint = _load(path)
    inputs = {i["name"]: ["outer", 0] for i in wt.blueprint_subgraph(blueprint)["inputs"]}
    prompt, outputs = wt.blueprint_to_api(blueprint, defs, inputs)
    assert len(outputs) == 1 and outputs[0][0] in prompt
    for node_id, node in prompt.items():
        node_def = defs[node["class_type"]]
        missing = [k for k in node_def["input"].get("required", {}) if k not in node["inputs"]]
        assert not missing, f"{node_id} {node['class_type']} misses {missing}"
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in prompt or value == ["outer", 0]
    assert sum(v == ["outer", 0] for n in prompt.values() for v in n["inputs"].values()) == len(inputs)

"""Read the shipped UI-format workflows the way ComfyUI's frontend does: check them, convert them to API format.

Node definitions come in ComfyUI's ``/object_info`` shape: the pack's node classes (converted from their
``INPUT_TYPES``) plus core nodes from a recorded snapshot (``tests/data/core_object_info_0.3.64.json``).
The widget rules follow frontend 1.27: widget inputs (INT, FLOAT, STRING, BOOLEAN, combos) fill
``widgets_values`` in input order; an INT with ``control_after_generate`` (or named ``seed``/``noise_seed``)
is followed by its control value; an image-upload combo is followed by the upload button's value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
CORE_SNAPSHOT = Path(__file__).resolve().parent / "data" / "core_object_info_0.3.64.json"

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
SEED_CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# Loader combos listing model files: what is valid depends on the user's folders, so any name is.
FILE_LIST_INPUTS = {"model_name", "unet_name", "vae_name", "ckpt_name", "clip_name", "text_encoder", "image"}


def load_workflow(name_or_path: str | Path) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.is_absolute() and not path.exists():
        path = WORKFLOWS / path
    return json.loads(path.read_text(encoding="utf-8"))


def workflow_files() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.json"))


# --------------------------------------------------------------------------- node definitions

def _v1_input(spec: Any) -> tuple[Any, dict[str, Any]]:
    spec = tuple(spec) if isinstance(spec, (list, tuple)) else (spec,)
    kind = spec[0]
    opts = dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
    if isinstance(kind, tuple):
        kind = list(kind)
    return kind, opts


def class_to_object_info(name: str, cls: type) -> dict[str, Any]:
    """What ComfyUI's ``/object_info`` reports for a V1 node class."""
    types = cls.INPUT_TYPES()
    inputs: dict[str, dict[str, Any]] = {}
    order: dict[str, list[str]] = {}
    for section in ("required", "optional"):
        if section in types:
            inputs[section] = {k: list(_v1_input(v)) for k, v in types[section].items()}
            order[section] = list(types[section])
    returns = list(getattr(cls, "RETURN_TYPES", ()))
    return {
        "input": inputs, "input_order": order, "output": returns,
        "output_name": list(getattr(cls, "RETURN_NAMES", None) or returns),
        "output_node": bool(getattr(cls, "OUTPUT_NODE", False)), "name": name,
        "category": getattr(cls, "CATEGORY", ""),
    }


def node_definitions(pack_classes: Mapping[str, type], core_snapshot: Path = CORE_SNAPSHOT) -> dict[str, Any]:
    defs = json.loads(core_snapshot.read_text(encoding="utf-8"))
    for name, cls in pack_classes.items():
        defs[name] = class_to_object_info(name, cls)
    return defs


def _ordered_inputs(node_def: Mapping[str, Any]) -> list[tuple[str, Any, dict[str, Any], bool]]:
    """(name, type or combo list, options, required) in the frontend's order."""
    out = []
    order = node_def.get("input_order") or {s: list(node_def["input"].get(s, {})) for s in ("required", "optional")}
    for section in ("required", "optional"):
        specs = node_def["input"].get(section, {})
        for name in order.get(section, []):
            kind, opts = _v1_input(specs[name])
            out.append((name, kind, opts, section == "required"))
    return out


def _is_widget(kind: Any, opts: Mapping[str, Any]) -> bool:
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def widget_slots(node_def: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The frontend's serialized widget values of a node, in order: (input name, role).

    role is ``value`` for the input's own value, ``control`` for a seed's control_after_generate,
    ``upload`` for an image-upload button.
    """
    slots = []
    for name, kind, opts, _req in _ordered_inputs(node_def):
        if not _is_widget(kind, opts):
            continue
        slots.append((name, "value"))
        is_combo = isinstance(kind, list) or kind == "COMBO"
        if kind == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
            slots.append((name, "control"))
        elif is_combo and opts.get("control_after_generate"):
            slots.append((name, "control"))
        if is_combo and (opts.get("image_upload") or opts.get("video_upload") or opts.get("audio_upload")):
            slots.append((name, "upload"))
    return slots


def input_spec(node_def: Mapping[str, Any], name: str) -> tuple[Any, dict[str, Any], bool] | None:
    for n, kind, opts, req in _ordered_inputs(node_def):
        if n == name:
            return kind, opts, req
    return None


# --------------------------------------------------------------------------- validation

def types_match(out_type: str, in_type: Any) -> bool:
    if isinstance(in_type, list) or in_type == "COMBO":
        return out_type == "COMBO" or isinstance(out_type, list)
    if "*" in (out_type, in_type):
        return True
    outs = set(str(out_type).split(","))
    ins = set(str(in_type).split(","))
    return bool(outs & ins)


def check_widget_value(node_type: str, name: str, kind: Any, opts: Mapping[str, Any], value: Any) -> str | None:
    """None if ``value`` is valid for the input, else why not."""
    where = f"{node_type}.{name}={value!r}"
    options = kind if isinstance(kind, list) else opts.get("options") if kind == "COMBO" else None
    if options is not None:
        if name in FILE_LIST_INPUTS or not options:
            return None if isinstance(value, str) and value else f"{where}: a file name is required"
        return None if value in options else f"{where}: not one of {options}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{where}: not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{where}: not a string"
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{where}: not a number"
        if kind == "INT" and value != int(value):
            return f"{where}: not an integer"
        lo, hi = opts.get("min"), opts.get("max")
        if lo is not None and value < lo:
            return f"{where}: below min {lo}"
        if hi is not None and value > hi:
            return f"{where}: above max {hi}"
        return None
    return f"{where}: {kind} is not a widget type"


def widget_values_by_name(node: Mapping[str, Any], node_def: Mapping[str, Any]) -> dict[str, Any]:
    slots = widget_slots(node_def)
    values = node.get("widgets_values") or []
    if isinstance(values, Mapping):  # some packs serialize widgets by name
        return dict(values)
    return {name: v for (name, role), v in zip(slots, values, strict=False) if role == "value"}


def validate_workflow(workflow: Mapping[str, Any], defs: Mapping[str, Any]) -> list[str]:
    """Every problem the frontend or the server would have with a UI-format workflow."""
    errors: list[str] = []
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    links = {link[0]: link for link in workflow.get("links", [])}
    if len(nodes) != len(workflow.get("nodes", [])):
        errors.append("duplicate node ids")
    if workflow.get("last_node_id", 0) < max(nodes, default=0):
        errors.append("last_node_id is smaller than a node id")
    if workflow.get("last_link_id", 0) < max(links, default=0):
        errors.append("last_link_id is smaller than a link id")

    for node in nodes.values():
        ntype = node["type"]
        label = f"node {node['id']} ({ntype})"
        if ntype in ("Note", "MarkdownNote"):
            vals = node.get("widgets_values") or []
            if len(vals) != 1 or not isinstance(vals[0], str) or not vals[0].strip():
                errors.append(f"{label}: a note needs one non-empty text")
            continue
        if ntype in FRONTEND_ONLY:
            continue
        if ntype not in defs:
            errors.append(f"{label}: unknown node type")
            continue
        node_def = defs[ntype]
        slots = widget_slots(node_def)
        values = node.get("widgets_values") or []
        if len(values) != len(slots):
            errors.append(f"{label}: {len(values)} widget values for {len(slots)} widgets {slots}")
        for (name, role), value in zip(slots, values, strict=False):
            kind, opts, _req = input_spec(node_def, name)
            if role == "control":
                if value not in SEED_CONTROL_VALUES:
                    errors.append(f"{label}: control_after_generate of {name} is {value!r}")
            elif role == "upload":
                continue
            else:
                problem = check_widget_value(ntype, name, kind, opts, value)
                if problem:
                    errors.append(f"{label}: {problem}")
        # sockets: names exist, required ones are linked
        linked = {}
        for slot, inp in enumerate(node.get("inputs", [])):
            spec = input_spec(node_def, inp["name"])
            if spec is None:
                errors.append(f"{label}: input {inp['name']!r} does not exist")
                continue
            if inp.get("link") is not None:
                linked[inp["name"]] = slot
        for name, kind, opts, required in _ordered_inputs(node_def):
            if required and not _is_widget(kind, opts) and name not in linked:
                errors.append(f"{label}: required input {name!r} is not connected")
        outputs = node_def.get("output", [])
        for slot, out in enumerate(node.get("outputs", [])):
            if slot >= len(outputs):
                errors.append(f"{label}: output slot {slot} does not exist")
            elif out.get("type") != outputs[slot]:
                errors.append(f"{label}: output {slot} is {out.get('type')}, the node makes {outputs[slot]}")

    for link_id, link in links.items():
        _lid, src, src_slot, dst, dst_slot, ltype = link[:6]
        if src not in nodes or dst not in nodes:
            errors.append(f"link {link_id}: joins a missing node")
            continue
        s, d = nodes[src], nodes[dst]
        if s["type"] in FRONTEND_ONLY or d["type"] in FRONTEND_ONLY:
            continue
        if s["type"] not in defs or d["type"] not in defs:
            continue
        out_types = defs[s["type"]].get("output", [])
        if src_slot >= len(out_types):
            errors.append(f"link {link_id}: {s['type']} has no output {src_slot}")
            continue
        if dst_slot >= len(d.get("inputs", [])):
            errors.append(f"link {link_id}: {d['type']} has no input slot {dst_slot}")
            continue
        inp = d["inputs"][dst_slot]
        spec = input_spec(defs[d["type"]], inp["name"])
        if spec is None:
            continue
        out_type = out_types[src_slot]
        if not types_match(out_type, spec[0]):
            errors.append(f"link {link_id}: {s['type']} output {out_type} -> {d['type']}.{inp['name']} ({spec[0]})")
        if ltype != out_type:
            errors.append(f"link {link_id}: labelled {ltype}, carries {out_type}")
        if inp.get("link") != link_id:
            errors.append(f"link {link_id}: {d['type']}.{inp['name']} does not point back to it")
        if link_id not in (s.get("outputs", [])[src_slot].get("links") or []):
            errors.append(f"link {link_id}: {s['type']} output {src_slot} does not list it")
    if not any(defs.get(n["type"], {}).get("output_node") for n in nodes.values()):
        errors.append("no output node: nothing would run")
    return errors


# --------------------------------------------------------------------------- API format

def to_api(workflow: Mapping[str, Any], defs: Mapping[str, Any],
           overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The API-format prompt the frontend would queue for this workflow (muted/bypassed nodes dropped).

    ``overrides`` maps a node type or node id to input values to replace (tests shrink sizes this way).
    """
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt: dict[str, dict[str, Any]] = {}

    def source(link_id: int) -> list[Any]:
        _lid, src, slot = links[link_id][:3]
        node = nodes[src]
        while node["type"] == "Reroute":  # a reroute forwards its single input
            _lid, src, slot = links[node["inputs"][0]["link"]][:3]
            node = nodes[src]
        return [str(src), slot]

    for node in nodes.values():
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        node_def = defs[node["type"]]
        inputs: dict[str, Any] = dict(widget_values_by_name(node, node_def))
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                inputs[inp["name"]] = source(inp["link"])
        for key in (node["type"], str(node["id"])):
            inputs.update((overrides or {}).get(key, {}))
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title") or node_def.get("display_name", node["type"])}}
    return prompt


def nodes_of_type(workflow: Mapping[str, Any], node_type: str) -> list[Mapping[str, Any]]:
    return [n for n in workflow["nodes"] if n["type"] == node_type]


def used_types(workflows: Iterable[Mapping[str, Any]]) -> set[str]:
    return {n["type"] for w in workflows for n in w["nodes"]}


# LiteGraph draws a node's title bar above its ``pos`` (LiteGraph.NODE_TITLE_HEIGHT, 30 px in frontends 1.27-1.58).
TITLE_HEIGHT = 30


def node_box(node: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a node on the canvas, title bar included."""
    x, y = node["pos"]
    w, h = node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


def overlaps(nodes: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every pair of nodes whose boxes (title bar included) intersect, named by id, type and title."""
    boxes = [(n, node_box(n)) for n in nodes]
    found = []
    for i, (a, (al, at, ar, ab)) in enumerate(boxes):
        for b, (bl, bt, br, bb) in boxes[i + 1:]:
            if al < br and bl < ar and at < bb and bt < ab:
                name = [f"{n['id']} {n.get('title') or n['type']}" for n in (a, b)]
                found.append(f"{name[0]} overlaps {name[1]}")
    return found


SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = -10, -20  # the boundary nodes inside a subgraph


def blueprint_subgraph(blueprint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The subgraph a blueprint's single root node instantiates."""
    (root,) = blueprint["nodes"]
    (subgraph,) = [s for s in blueprint["definitions"]["subgraphs"] if s["id"] == root["type"]]
    return subgraph


def blueprint_to_api(blueprint: Mapping[str, Any], defs: Mapping[str, Any], inputs: Mapping[str, list[Any]],
                     overrides: Mapping[str, Mapping[str, Any]] | None = None
                     ) -> tuple[dict[str, dict[str, Any]], list[list[Any]]]:
    """The prompt of a blueprint's inner graph as the frontend flattens it, its boundary inputs fed from
    ``inputs`` (input name -> [node id, slot] of the outer prompt); returns it with the [node id, slot] of
    each boundary output."""
    subgraph = blueprint_subgraph(blueprint)
    names = [i["name"] for i in subgraph["inputs"]]
    links = {link["id"]: link for link in subgraph["links"]}
    inner_links = [[k["id"], k["origin_id"], k["origin_slot"], k["target_id"], k["target_slot"], k["type"]]
                   for k in links.values() if SUBGRAPH_INPUT != k["origin_id"] and k["target_id"] != SUBGRAPH_OUTPUT]
    nodes = json.loads(json.dumps(subgraph["nodes"]))
    fed: dict[tuple[str, str], list[Any]] = {}
    for node in nodes:
        for inp in node.get("inputs", []):
            link = links.get(inp.get("link"))
            if link is not None and link["origin_id"] == SUBGRAPH_INPUT:
                fed[str(node["id"]), inp["name"]] = list(inputs[names[link["origin_slot"]]])
                inp["link"] = None
    prompt = to_api({"nodes": nodes, "links": inner_links}, defs, overrides)
    for (node_id, name), source in fed.items():
        prompt[node_id]["inputs"][name] = source
    outputs = [[str(links[o["linkIds"][0]]["origin_id"]), links[o["linkIds"][0]]["origin_slot"]]
               for o in subgraph["outputs"]]
    return prompt, outputs

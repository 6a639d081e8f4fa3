"""Convert a workflow as the ComfyUI front end saves it (UI format) into the API format that
``POST /prompt`` takes, using the server's ``/object_info`` to know each node's widget order.

UI format: ``{"nodes": [{id, type, mode, inputs: [{name, type, link, widget?}], widgets_values}],
"links": [[id, from_node, from_slot, to_node, to_slot, type]]}``.
API format: ``{"<id>": {"class_type": ..., "inputs": {name: value | [from_id, from_slot]}}}``.

Rules follow the front end's own graph-to-prompt conversion:
* widget values are consumed in the order the node declares its inputs (required, then optional);
  an INT input declared with ``control_after_generate`` is followed by one extra UI-only value;
* a linked input (also a widget converted to an input) takes the link instead of the value;
* muted nodes (mode 2) are dropped; bypassed nodes (mode 4) pass their first input of the
  link's type through; ``Reroute`` nodes are followed; notes and other front-end-only nodes,
  which have no entry in /object_info, are dropped.
"""
from __future__ import annotations

import json
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MUTED, BYPASS = 2, 4


class WorkflowError(ValueError):
    """A workflow that cannot be converted; the message names the node and what is wrong."""


def _is_widget(spec) -> bool:
    kind = spec[0]
    if isinstance(kind, list):
        return True
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return kind in WIDGET_TYPES and not opts.get("forceInput", False)


def _declared_inputs(info: dict):
    for section in ("required", "optional"):
        for name, spec in info.get("input", {}).get(section, {}).items():
            yield name, spec


def to_api(workflow: dict, object_info: dict) -> dict:
    """UI-format ``workflow`` → API-format prompt. Raises WorkflowError with the node id."""
    if "nodes" not in workflow or "links" not in workflow:
        if all(isinstance(v, dict) and "class_type" in v for v in workflow.values()):
            return workflow  # already API format
        raise WorkflowError("not a ComfyUI workflow: it has neither 'nodes'/'links' (UI format) nor class_type entries (API format)")
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = {int(lk[0]): lk for lk in workflow["links"] if lk is not None}

    def resolve(link_id: int, seen=()):
        """(from_node_id, from_slot) of a link, following reroutes and bypassed nodes."""
        if link_id not in links:
            raise WorkflowError(f"link {link_id} is referenced but missing from 'links'")
        _, src, slot, _, _, ltype = links[link_id][:6]
        node = nodes.get(int(src))
        if node is None:
            raise WorkflowError(f"link {link_id} comes from node {src}, which is not in the workflow")
        if int(src) in seen:
            raise WorkflowError(f"link cycle through node {src}")
        if node["type"] == "Reroute" or node.get("mode", 0) == BYPASS:
            for inp in node.get("inputs", []):
                if inp.get("link") is not None and (node["type"] == "Reroute" or inp.get("type") in (ltype, "*")):
                    return resolve(int(inp["link"]), seen + (int(src),))
            return None
        if node.get("mode", 0) == MUTED:
            return None
        return [str(src), int(slot)]

    prompt = {}
    for nid, node in sorted(nodes.items()):
        ntype = node["type"]
        if node.get("mode", 0) in (MUTED, BYPASS) or ntype in FRONTEND_ONLY:
            continue
        info = object_info.get(ntype)
        if info is None:
            raise WorkflowError(
                f"node {nid} is of type {ntype!r}, which this ComfyUI does not have: install the custom node that provides it, or remove the node"
            )
        linked = {i["name"]: i.get("link") for i in node.get("inputs", [])}
        values = node.get("widgets_values", [])
        by_name = values if isinstance(values, dict) else None
        pos = 0
        inputs = {}
        for name, spec in _declared_inputs(info):
            if _is_widget(spec):
                if by_name is not None:
                    if name in by_name:
                        inputs[name] = by_name[name]
                elif pos < len(values):
                    inputs[name] = values[pos]
                    pos += 1
                    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                    if opts.get("control_after_generate") or (
                        spec[0] == "INT" and name in ("seed", "noise_seed") and pos < len(values) and values[pos] in ("fixed", "increment", "decrement", "randomize")
                    ):
                        pos += 1
            if linked.get(name) is not None:
                src = resolve(int(linked[name]))
                if src is not None:
                    inputs[name] = src
        prompt[str(nid)] = {"class_type": ntype, "inputs": inputs}
    return prompt


def referenced_files(workflow: dict) -> list[tuple[str, str]]:
    """(node type, file name) for every model/image file name a workflow's widgets name."""
    out = []
    for node in workflow.get("nodes", []):
        vals = node.get("widgets_values") or []
        vals = vals.values() if isinstance(vals, dict) else vals
        for v in vals:
            if isinstance(v, str) and v.lower().endswith((".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".png", ".jpg", ".jpeg", ".webp")):
                out.append((node["type"], v))
    return out


def load(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{path} is not valid JSON ({e}); re-save it from ComfyUI") from e

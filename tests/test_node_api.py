"""The nodes on ComfyUI's public node API, and every saved workflow still loading.

* Every node is a ``comfy_api`` ``io.ComfyNode``, handed to ComfyUI by one ``ComfyExtension``
  (``comfy_entrypoint``); the plugin no longer exports V1 mappings.
* The interface a saved workflow depends on (node ids, input names, widget order, widget types,
  choices, defaults and ranges, outputs) is what version 0.2.0 served on the V1 API, recorded in
  tests/data/node_interface_0.2.json from that version's ``/object_info`` (``interface()`` below made
  it). Inputs may be added at the end of the optional ones; nothing may be renamed, removed or moved.
* Every workflow the plugin shipped in 0.2.x (tests/data/workflows_0.2/, one file per version that
  changed, named ``<name>@<commit>``) and every shipped one converts, through the front end's
  widget-order rules (scripts/workflow_api.py) and the server's ``/object_info``, into the same
  inputs for the plugin's nodes as it did on the V1 API (tests/data/workflows_0.2/expected_inputs.json,
  made the same way from 0.2.0's ``/object_info``). test_browser.py opens the old ones in the page.
"""
from __future__ import annotations

import asyncio
import json

import pytest

from scripts.comfy_host import ROOT
from scripts.workflow_api import to_api

DATA = ROOT / "tests" / "data"
INTERFACE = json.loads((DATA / "node_interface_0.2.json").read_text())
OLD_WORKFLOWS = sorted((DATA / "workflows_0.2").glob("*@*.json"))
SHIPPED = sorted((ROOT / "workflows").glob("*.json"))
EXPECTED_INPUTS = json.loads((DATA / "workflows_0.2" / "expected_inputs.json").read_text())
SPEC_KEYS = ("options", "default", "min", "max", "step", "round", "control_after_generate", "multiline")
V3_OUTPUT_HIDDEN = {"prompt", "extra_pnginfo"}
# Choices that come from the host or the user's files, not from the plugin: compared as a combo only.
HOST_LISTS = {("ADDLoraMerge", "lora_name"): "files in models/loras",
              ("ADDTinyVAELoader", "tae_name"): "files in models/vae_approx",
              ("ADDCompare", "teacher_sampler"): "the host's KSampler samplers"}


def _spec(spec: list) -> dict:
    """One input's type and widget settings, in a form the V1 and the V3 schema share."""
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    out = {"type": "COMBO", "options": kind} if isinstance(kind, list) else {"type": kind}
    for key in SPEC_KEYS:
        if key in opts and key not in out:
            out[key] = opts[key]
    if not out.get("multiline"):
        out.pop("multiline", None)  # V3 writes multiline False where V1 left it out
    return out


def interface(object_info: dict) -> dict:
    """The part of /object_info that saved workflows depend on, for the plugin's nodes."""
    out = {}
    for node_id, info in object_info.items():
        if not node_id.startswith("ADD"):
            continue
        inputs = info.get("input", {})
        order = info.get("input_order") or {s: list(inputs.get(s, {})) for s in ("required", "optional")}
        out[node_id] = {
            "display_name": info["display_name"],
            "output": list(info["output"]),
            "output_name": list(info["output_name"]),
            "output_node": bool(info["output_node"]),
            **{section: [[name, _spec(inputs[section][name]) | ({"options": HOST_LISTS[node_id, name]}
                                                                  if (node_id, name) in HOST_LISTS else {})]
                         for name in order.get(section, [])]
               for section in ("required", "optional")},
            # comfy_api gives every output node the hidden prompt and extra_pnginfo, which the executor fills
            # in (a V1 output node declared none); a saved workflow never holds hidden inputs
            "hidden": sorted(set(inputs.get("hidden", {})) - (V3_OUTPUT_HIDDEN if info["output_node"] else set())),
        }
    return out


def plugin_inputs(workflow: dict, object_info: dict) -> dict:
    """node id -> the plugin's node's widget inputs, as the front end turns this workflow into a prompt."""
    api = to_api(workflow, object_info)
    return {nid: {"class_type": n["class_type"],
                  "inputs": {k: v for k, v in n["inputs"].items() if not isinstance(v, list)}}
            for nid, n in api.items() if n["class_type"].startswith("ADD")}


def test_every_node_is_a_comfy_node_handed_over_by_one_extension(comfy, plugin):
    from comfy_api.latest import ComfyExtension, io

    package = plugin("")
    assert not hasattr(package, "NODE_CLASS_MAPPINGS"), "the V1 mappings are gone: ComfyUI reads comfy_entrypoint"
    extension = asyncio.run(package.comfy_entrypoint())
    assert isinstance(extension, ComfyExtension)
    nodes = asyncio.run(extension.get_node_list())
    assert all(isinstance(n, type) and issubclass(n, io.ComfyNode) for n in nodes), nodes
    ids = [n.GET_SCHEMA().node_id for n in nodes]
    assert sorted(ids) == sorted(INTERFACE) and len(set(ids)) == len(ids)
    # ComfyUI registered exactly these classes under these ids
    assert all(comfy.NODE_CLASS_MAPPINGS[n.GET_SCHEMA().node_id] is n for n in nodes)


@pytest.mark.server
def test_the_interface_saved_workflows_use_is_the_one_of_0_2(comfy_server):
    now = interface(comfy_server.get("/object_info"))
    assert sorted(now) == sorted(INTERFACE), "a node id was added or removed"
    for node_id, was in INTERFACE.items():
        cur = now[node_id]
        for key in ("display_name", "output", "output_name", "output_node", "required", "hidden"):
            assert cur[key] == was[key], f"{node_id}: {key} changed from {was[key]} to {cur[key]}"
        n = len(was["optional"])
        assert cur["optional"][:n] == was["optional"], (
            f"{node_id}: optional inputs changed: {was['optional']} -> {cur['optional']} (only appending is compatible)")


@pytest.mark.server
@pytest.mark.parametrize("path", OLD_WORKFLOWS + SHIPPED, ids=lambda p: p.stem)
def test_saved_workflows_give_the_same_inputs_as_on_0_2(comfy_server, path):
    got = plugin_inputs(json.loads(path.read_text()), comfy_server.get("/object_info"))
    assert got, f"{path.name} has none of the plugin's nodes"
    assert got == EXPECTED_INPUTS[path.name]

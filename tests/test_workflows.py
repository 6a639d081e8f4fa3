"""Every shipped workflow converts to API format and runs on a real ComfyUI server."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from scripts.comfy_host import ROOT
from scripts.workflow_api import WorkflowError, load, to_api

SHIPPED = sorted((ROOT / "workflows").glob("*.json"))
CORE_UI = ROOT / "tests" / "data" / "core_txt2img_ui.json"


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/object_info")


@pytest.mark.server
def test_converter_follows_widget_order_and_drops_frontend_nodes(object_info):
    api = to_api(load(CORE_UI), object_info)
    assert "7" not in api  # the Note
    ks = api["4"]["inputs"]
    # seed, its "fixed" control value (UI only), steps, cfg, sampler, scheduler, denoise
    assert ks["seed"] == 42 and ks["steps"] == 1 and ks["cfg"] == 1.0
    assert ks["sampler_name"] == "euler_ancestral" and ks["scheduler"] == "sgm_uniform" and ks["denoise"] == 1.0
    assert ks["model"] == ["1", 0] and ks["latent_image"] == ["3", 0]


@pytest.mark.server
def test_converter_follows_reroutes_and_bypassed_nodes(object_info):
    wf = copy.deepcopy(load(CORE_UI))
    # Insert a Reroute on the MODEL link (1 → 4) and check the API prompt skips it.
    wf["nodes"].append({"id": 9, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 20}],
                        "outputs": [{"name": "", "type": "MODEL", "links": [1]}]})
    for lk in wf["links"]:
        if lk[0] == 1:
            lk[1], lk[2] = 9, 0
    wf["links"].append([20, 1, 0, 9, 0, "MODEL"])
    assert to_api(wf, object_info)["4"]["inputs"]["model"] == ["1", 0]
    # Bypass the KSampler: VAEDecode then reads the latent straight from EmptyLatentImage.
    for n in wf["nodes"]:
        if n["id"] == 4:
            n["mode"] = 4
    api = to_api(wf, object_info)
    assert "4" not in api and api["5"]["inputs"]["samples"] == ["3", 0]


def test_converter_errors_name_the_problem():
    with pytest.raises(WorkflowError, match="not a ComfyUI workflow"):
        to_api({"foo": 1}, {})
    with pytest.raises(WorkflowError, match="NoSuchNode"):
        to_api({"nodes": [{"id": 1, "type": "NoSuchNode"}], "links": []}, {})


# Settings a 2-core CPU finishes in seconds (the shipped defaults are for a GPU at 512²).
CPU_SIZED = {
    "ADDTrain": dict(width=64, height=64, batch_size=2, max_steps=2, data_steps=2, save_every=1, preview_every=1,
                     run_mode="alongside"),
    "ADDCompare": dict(width=64, height=64, teacher_steps=2),
    "ADDLoadFrames": dict(width=64, height=64, max_frames=4),
    "EmptyLatentImage": dict(width=64, height=64),
}


@pytest.mark.server
@pytest.mark.parametrize("path", SHIPPED + [CORE_UI], ids=lambda p: p.stem)
def test_workflow_runs_on_tiny_models(comfy_server, object_info, path):
    wf = load(path)
    assert wf.get("nodes"), f"{path.name} is not a UI-format workflow (the front end loads UI format)"
    api = to_api(wf, object_info)
    for node in api.values():
        node["inputs"].update(CPU_SIZED.get(node["class_type"], {}))
        if node["class_type"] == "ADDTrain":
            node["inputs"]["name"] = f"wf_{path.stem}"
    hist = comfy_server.run(api)
    for job in comfy_server.get("/add/jobs")["jobs"]:  # let no started job outlive this test
        if job["state"] in ("queued", "running", "paused"):
            comfy_server.post(f"/add/jobs/{job['id']}/cancel", {})
    assert hist["status"]["status_str"] == "success", json.dumps(hist["status"], indent=1)[:3000]
    images = [i for out in hist["outputs"].values() for i in out.get("images", [])]
    assert images, "a shipped workflow should produce an image"
    for img in images:
        p = Path(comfy_server.home) / img["type"] / img["subfolder"] / img["filename"]
        if img["type"] == "output":
            assert p.is_file() and p.stat().st_size > 0


@pytest.mark.server
def test_workflows_are_offered_as_templates(comfy_server):
    """The front end's template browser lists and fetches the plugin's workflows."""
    assert SHIPPED, "workflows/ should hold the plugin's workflows"
    templates = comfy_server.get("/workflow_templates")
    assert sorted(templates.get("comfyui-add", [])) == sorted(p.stem for p in SHIPPED)
    name = SHIPPED[0].name
    served = comfy_server.get(f"/api/workflow_templates/comfyui-add/{name}")
    assert served == json.loads(SHIPPED[0].read_text())


def test_client_only_talks_to_this_machine():
    from scripts.comfy_client import ComfyClient

    assert ComfyClient("http://127.0.0.1:8188").url == "http://127.0.0.1:8188"
    with pytest.raises(ValueError, match="only talks to a ComfyUI server on this machine"):
        ComfyClient("http://example.com:8188")

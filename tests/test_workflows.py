"""Every shipped workflow converts to API format and runs on a real ComfyUI server, twice in a row."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
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
    "EmptyLatentImage": dict(width=64, height=64),  # stand-in models draw noise at any size
}
# The plugin's savers and the first folder each writes into (relative to the server's base folder).
SAVERS = {"ADDSaveTurboCheckpoint": "output", "ADDExtractLoRA": "models/loras"}
NUMBERED = re.compile(r"_\d{5}_\.safetensors$")
# One cheap prompt: when it has finished, the server has acted on an earlier POST /free.
SYNC = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}


def cpu_sized(path: Path, object_info: dict) -> dict:
    """The workflow as the front end queues it, with CPU-sized training / comparison settings."""
    api = to_api(load(path), object_info)
    for node in api.values():
        node["inputs"].update(CPU_SIZED.get(node["class_type"], {}))
        if node["class_type"] == "ADDTrain":
            node["inputs"]["name"] = f"wf_{path.stem}"
    return api


def next_seed(api: dict, object_info: dict) -> dict:
    """The prompt the front end queues next: every widget with a control_after_generate (an INT named
    seed / noise_seed, or declared so) one higher, as its 'increment' setting does."""
    out = copy.deepcopy(api)
    for node in out.values():
        specs = {n: sp for sec in ("required", "optional")
                 for n, sp in object_info[node["class_type"]]["input"].get(sec, {}).items()}
        for name, value in node["inputs"].items():
            spec = specs.get(name)
            opts = spec[1] if spec and len(spec) > 1 and isinstance(spec[1], dict) else {}
            if spec and spec[0] == "INT" and isinstance(value, int) and (
                    opts.get("control_after_generate") or name in ("seed", "noise_seed")):
                node["inputs"][name] = value + 1
    return out


def forget_cache(server) -> None:
    """Drop the server's cached node outputs, so every node of the next prompt runs again.

    A saver whose inputs do not depend on the seed (the LoRA-merge workflow's checkpoint save)
    would otherwise be answered from the cache on the second queue; it runs again whenever
    anything upstream changes or ComfyUI was restarted, which is where a saver that refuses an
    existing name failed. POST /free acts between prompts, so one cheap prompt follows it.
    """
    assert server.post("/free", {"free_memory": True}) == {}
    assert server.run(SYNC)["status"]["status_str"] == "success"


def file_state(path: str) -> tuple[str, int]:
    """(sha256, mtime): a rewrite or a replacement changes it."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns


def _training_run_file(path: str) -> bool:
    """A resumable ADD training run's LoRA or state: rewritten at each save by design (its name is the run)."""
    return ".add-state" in path or os.path.isdir(os.path.splitext(path)[0] + ".add-state")


def snapshot(home: Path, runs: tuple[str, ...] = ()) -> dict[str, tuple[str, int]]:
    """{path: file_state} of every file under output/ and models/loras/ but training runs' files."""
    out = {}
    for top in ("output", "models/loras"):
        for dirpath, _, names in os.walk(home / top):
            for n in names:
                p = os.path.join(dirpath, n)
                if not _training_run_file(p) and not any(n.startswith(r + ".") for r in runs):
                    out[p] = file_state(p)
    return out


def saved_paths(hist: dict, api: dict) -> dict[str, str]:
    """{node id: file written} for the plugin's savers, from the path their report starts with."""
    out = {}
    for nid, node in api.items():
        if node["class_type"] in SAVERS:
            report = hist["outputs"][nid]["text"][0]
            assert report.startswith("saved "), report[:300]
            out[nid] = report.splitlines()[0][len("saved "):]
    return out


def output_images(home: Path, hist: dict) -> list[Path]:
    images = [i for out in hist["outputs"].values() for i in out.get("images", [])]
    assert images, "a shipped workflow should produce an image"
    return [home / i["type"] / i["subfolder"] / i["filename"] for i in images if i["type"] == "output"]


def cancel_jobs(server) -> None:
    for job in server.get("/add/jobs")["jobs"]:  # let no started job outlive the test
        if job["state"] in ("queued", "running", "paused"):
            server.post(f"/add/jobs/{job['id']}/cancel", {})


@pytest.mark.server
@pytest.mark.parametrize("path", SHIPPED + [CORE_UI], ids=lambda p: p.stem)
def test_workflow_runs_twice_on_tiny_models(comfy_server, object_info, path):
    """Queued, then queued again with the next seed (a user pressing Queue twice): both succeed;
    saved files are numbered, the second run's are new, and no file of the first run changed."""
    wf = load(path)
    assert wf.get("nodes"), f"{path.name} is not a UI-format workflow (the front end loads UI format)"
    home = Path(comfy_server.home)
    api = cpu_sized(path, object_info)
    runs = [n["inputs"]["name"] for n in api.values() if n["class_type"] == "ADDTrain"]  # rewritten by design
    try:
        first = comfy_server.run(api)
        assert first["status"]["status_str"] == "success", json.dumps(first["status"], indent=1)[:3000]
        before = snapshot(home, tuple(runs))
        forget_cache(comfy_server)
        again = next_seed(api, object_info)
        second = comfy_server.run(again)
    finally:
        cancel_jobs(comfy_server)
    assert second["status"]["status_str"] == "success", json.dumps(second["status"], indent=1)[:3000]

    images = [output_images(home, h) for h in (first, second)]
    for img in images[0] + images[1]:
        assert img.is_file() and img.stat().st_size > 0
    assert not set(images[0]) & set(images[1]), "the second run must write new images"
    saved = [saved_paths(h, api) for h in (first, second)]
    for nid, p1 in saved[0].items():
        p2 = saved[1][nid]
        assert NUMBERED.search(p1) and NUMBERED.search(p2) and p1 != p2, (p1, p2)
        assert Path(p1).is_file() and Path(p2).is_file()
        assert Path(p2).is_relative_to((home / SAVERS[api[nid]["class_type"]]).resolve()), p2
    changed = [p for p, st in before.items() if not os.path.exists(p) or file_state(p) != st]
    assert not changed, f"the second run changed files of the first: {changed}"
    for nid, node in api.items():
        if node["class_type"] == "ADDTrain":  # the run's name is the run: no numbered copies, the same seed
            assert again[nid]["inputs"]["training_seed"] == node["inputs"]["training_seed"]
            texts = [h["outputs"][nid]["text"][0] for h in (first, second)]
            assert all(f"ADD training '{node['inputs']['name']}'" in t for t in texts), texts
            assert not list((home / "models" / "loras").glob(node["inputs"]["name"] + "_0*"))


OLD_SAVERS_UI = ROOT / "tests" / "data" / "old_savers_ui.json"


@pytest.mark.server
def test_workflow_saved_with_the_old_saver_widgets_still_runs(comfy_server, object_info):
    """A workflow saved before filename_prefix existed: its filename / overwrite values are restored
    by position, as the front end does, so overwrite on still replaces the same file and overwrite
    off now numbers the files instead of failing the second time."""
    home = Path(comfy_server.home)
    wf = load(OLD_SAVERS_UI)
    old_values = {n["type"]: n["widgets_values"] for n in wf["nodes"]}
    api = to_api(wf, object_info)
    ckpt = next(n["inputs"] for n in api.values() if n["class_type"] == "ADDSaveTurboCheckpoint")
    lora = next(n["inputs"] for n in api.values() if n["class_type"] == "ADDExtractLoRA")
    assert (ckpt["filename_prefix"], ckpt["exact_name_overwrite"]) == tuple(old_values["ADDSaveTurboCheckpoint"][:2])
    assert (lora["filename_prefix"], lora["exact_name_overwrite"]) == tuple(old_values["ADDExtractLoRA"][1:3])
    assert ckpt["exact_name_overwrite"] is True and lora["exact_name_overwrite"] is False
    exact = home / "output" / (ckpt["filename_prefix"] + ".safetensors")
    inodes = []
    for _ in range(2):
        forget_cache(comfy_server)
        hist = comfy_server.run(api)
        assert hist["status"]["status_str"] == "success", json.dumps(hist["status"], indent=1)[:3000]
        inodes.append(exact.stat().st_ino)
    assert inodes[0] != inodes[1], "overwrite on: the second run replaces the file (a new one renamed onto it)"
    assert sorted(p.name for p in exact.parent.glob(exact.stem + "*")) == [exact.name]
    numbered = sorted(p.name for p in (home / "models" / "loras").glob(lora["filename_prefix"] + "_*"))
    assert numbered == [f"{lora['filename_prefix']}_0000{i}_.safetensors" for i in (1, 2)]


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

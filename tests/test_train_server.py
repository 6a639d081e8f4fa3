"""The training node through a real ComfyUI server (tiny SD1.5, CPU): POST /prompt starts a job that
runs in the background; /add/ routes; foreground prompts, Cancel and /interrupt; a killed server."""
from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request

import pytest

from server_harness import ComfyServer

pytestmark = pytest.mark.server

CKPT = "tiny_sd15.safetensors"


def train_prompt(name: str, **over) -> dict:
    """API prompt: CheckpointLoaderSimple -> ADD Train (small settings for a CPU)."""
    inputs = dict(name=name, prompts="a red fox\na blue car", max_steps=400, batch_size=2, width=64, height=64,
                  student_timesteps="999,499", lora_rank=4, lora_alpha=4.0, lr_lora=1e-3, lr_disc=1e-3,
                  distill_weight=2.5, discriminator="teacher", data_cfg=3.0, data_steps=2, distill_cfg=1.0,
                  save_every=0, preview_every=2, training_seed=0, gradient_checkpointing=False, run_mode="polite",
                  model=["1", 0], clip=["1", 1])
    inputs.update(over)
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
            "2": {"class_type": "ADDTrain", "inputs": inputs}}


def sample_prompt(lora: str | None = None, steps: int = 1, size: int = 64, sampler: str = "ADDKSampler") -> dict:
    """A foreground prompt: (LoRA) -> ADD KSampler (or core KSampler) -> VAE decode -> SaveImage."""
    p = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
         "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["1", 1]}},
         "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
         "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
         "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"fg_{lora or 'base'}"}}}
    model = ["1", 0]
    if lora:
        p["2"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": lora,
                                                                  "strength_model": 1.0}}
        model = ["2", 0]
    if sampler == "ADDKSampler":
        p["5"] = {"class_type": "ADDKSampler", "inputs": {"model": model, "positive": ["3", 0], "latent_image": ["4", 0],
                                                          "seed": 7, "steps": steps, "schedule": "custom",
                                                          "custom": "999", "denoise": 1.0}}
    else:
        p["5"] = {"class_type": "KSampler", "inputs": {"model": model, "positive": ["3", 0], "negative": ["3", 0],
                                                       "latent_image": ["4", 0], "seed": 7, "steps": steps, "cfg": 1.0,
                                                       "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    return p


def job_of(srv, name: str) -> dict:
    jobs = [j for j in srv.get("/add/jobs")["jobs"] if j["name"] == name]
    assert jobs, f"no job named {name}"
    return srv.get(f"/add/jobs/{jobs[-1]['id']}")


def wait_job(srv, job_id: str, until, timeout: float = 240) -> dict:
    t0 = time.time()
    while True:
        job = srv.get(f"/add/jobs/{job_id}")
        if until(job):
            return job
        assert job["state"] != "failed", job["error"]
        assert time.time() - t0 < timeout, f"job {job_id} stuck: {job['state']} step {job['step']}"
        time.sleep(0.2)


def finished(job):
    return job["state"] in ("done", "cancelled", "failed")


def output_bytes(srv, hist) -> bytes:
    img = next(i for out in hist["outputs"].values() for i in out.get("images", []))
    with open(os.path.join(srv.home, img["type"], img["subfolder"], img["filename"]), "rb") as f:
        return f.read()


def test_prompt_returns_at_once_job_finishes_and_core_loads_the_lora(comfy_server):
    srv = comfy_server
    t0 = time.time()
    hist = srv.run(train_prompt("srv_full", max_steps=4, preview_every=2, save_every=2))
    assert hist["status"]["status_str"] == "success", hist["status"]
    text = hist["outputs"]["2"]["text"][0]
    assert "srv_full" in text and "job" in text  # the node's UI line
    job = job_of(srv, "srv_full")
    assert time.time() - t0 < 60 and job["state"] in ("queued", "running", "paused", "done")
    job = wait_job(srv, job["id"], finished)
    assert job["state"] == "done" and job["step"] == 4 and job["last_checkpoint_step"] == 4
    assert [h["step"] for h in job["history"]] == [1, 2, 3, 4]
    with urllib.request.urlopen(srv.url + f"/add/jobs/{job['id']}/preview.png") as r:
        assert r.headers["Content-Type"] == "image/png" and r.read()[:4] == b"\x89PNG"

    # core LoraLoaderModelOnly finds every key (ComfyUI logs each key it cannot load) ...
    log_before = len(srv.log())
    with_lora = srv.run(sample_prompt("srv_full.safetensors"))
    assert with_lora["status"]["status_str"] == "success", with_lora["status"]
    assert "lora key not loaded" not in srv.log()[log_before:]
    # ... and the LoRA changes the image
    base = srv.run(sample_prompt(None))
    assert output_bytes(srv, with_lora) != output_bytes(srv, base)


def test_foreground_prompt_completes_while_a_job_runs_and_cancel_resumes(comfy_server):
    srv = comfy_server
    hist = srv.run(train_prompt("srv_cancel", max_steps=10_000))
    assert hist["status"]["status_str"] == "success"
    job = wait_job(srv, job_of(srv, "srv_cancel")["id"], lambda j: j["step"] >= 2)
    # a foreground prompt runs to the end while the job exists (polite: the job pauses meanwhile)
    fg = srv.run(sample_prompt(None, steps=2, size=128, sampler="KSampler"))
    assert fg["status"]["status_str"] == "success"
    job = wait_job(srv, job["id"], lambda j: j["state"] == "running")
    # cancel through the route: a checkpoint at the stop step
    srv.post(f"/add/jobs/{job['id']}/cancel", {})
    job = wait_job(srv, job["id"], finished)
    assert job["state"] == "cancelled" and job["last_checkpoint_step"] == job["step"] >= 2
    stopped = job["step"]
    srv.run(train_prompt("srv_cancel", max_steps=stopped + 1))
    again = job_of(srv, "srv_cancel")
    assert again["id"] != job["id"] and again["start_step"] == stopped
    again = wait_job(srv, again["id"], finished)
    assert again["state"] == "done" and again["step"] == stopped + 1


def test_interrupt_cancels_the_foreground_prompt_not_the_job(comfy_server):
    srv = comfy_server
    srv.run(train_prompt("srv_interrupt", max_steps=10_000, run_mode="alongside"))
    job = wait_job(srv, job_of(srv, "srv_interrupt")["id"], lambda j: j["step"] >= 1)
    ans = srv.queue(sample_prompt(None, steps=100, size=512, sampler="KSampler"))  # minutes on a CPU
    pid = ans["prompt_id"]
    t0 = time.time()
    while srv.get("/queue")["queue_running"] == [] or time.time() - t0 < 4:
        assert time.time() - t0 < 60
        time.sleep(0.2)
    srv.post("/interrupt", {})
    t0 = time.time()
    while True:
        h = srv.get(f"/history/{pid}").get(pid)
        if h and h["status"]["status_str"] in ("success", "error"):
            break
        assert time.time() - t0 < 120
        time.sleep(0.2)
    assert h["status"]["status_str"] == "error"  # the prompt was interrupted ...
    step = srv.get(f"/add/jobs/{job['id']}")["step"]
    job = wait_job(srv, job["id"], lambda j: j["step"] > step + 1)  # ... the job goes on
    assert job["state"] in ("running", "paused")
    srv.post(f"/add/jobs/{job['id']}/cancel", {})
    assert wait_job(srv, job["id"], finished)["state"] == "cancelled"


@pytest.mark.parametrize("path", ["/add/jobs/0123456789ab", "/add/jobs/..%2F..%2Fetc", "/add/jobs/XYZ",
                                  "/add/jobs/0123456789ab/preview.png"])
def test_unknown_or_malformed_ids_are_json_404(comfy_server, path):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(comfy_server.url + path)
    assert err.value.code == 404
    assert "error" in json.loads(err.value.read())
    ans = comfy_server.post("/add/jobs/0123456789ab/cancel", {})
    assert ans["http_status"] == 404 and "no ADD training job" in ans["error"]


def test_bad_input_fails_the_prompt_with_the_reason_and_starts_nothing(comfy_server):
    n = len(comfy_server.get("/add/jobs")["jobs"])
    hist = comfy_server.run(train_prompt("srv_bad", width=100))
    assert hist["status"]["status_str"] == "error"
    msg = json.dumps(hist["status"]["messages"])
    assert "width 100 must be a multiple of 8" in msg
    assert len(comfy_server.get("/add/jobs")["jobs"]) == n


@pytest.mark.slow
def test_killed_server_resumes_from_the_last_save(comfy_server, tmp_path):
    """SIGKILL mid-run loses at most save_every steps: a new server resumes the same name."""
    home = tmp_path / "home"
    (home / "models" / "checkpoints").mkdir(parents=True)
    (home / "models" / "checkpoints" / CKPT).symlink_to(os.path.realpath(comfy_server.home / "models" / "checkpoints" / CKPT))
    srv = ComfyServer(home, tmp_path / "a.log")
    try:
        srv.wait_ready(srv.proc, timeout=180, log_tail=lambda: srv.log()[-3000:])
        srv.run(train_prompt("killed", max_steps=10_000, save_every=2, preview_every=0, run_mode="alongside"))
        job = wait_job(srv, job_of(srv, "killed")["id"], lambda j: (j["last_checkpoint_step"] or 0) >= 2)
        saved = srv.get(f"/add/jobs/{job['id']}")["last_checkpoint_step"]
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait()
    finally:
        srv.stop()
    lora = home / "models" / "loras" / "killed.safetensors"
    assert lora.is_file()
    leftovers = [p.name for p in lora.parent.iterdir() if p.name.endswith(".partial")]
    srv2 = ComfyServer(home, tmp_path / "b.log")
    try:
        srv2.wait_ready(srv2.proc, timeout=180, log_tail=lambda: srv2.log()[-3000:])
        srv2.run(train_prompt("killed", max_steps=10_000, save_every=2, preview_every=0, run_mode="alongside"))
        job = job_of(srv2, "killed")
        assert job["start_step"] >= saved and job["start_step"] % 2 == 0, (job["start_step"], saved)
        wait_job(srv2, job["id"], lambda j: j["step"] > job["start_step"])
        srv2.post(f"/add/jobs/{job['id']}/cancel", {})
        assert wait_job(srv2, job["id"], finished)["state"] == "cancelled"
    finally:
        srv2.stop()
    assert not leftovers or all(not p.endswith(".safetensors") for p in leftovers)

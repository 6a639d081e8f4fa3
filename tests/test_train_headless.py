"""Headless ADD training (scripts/train_add.py) on the tiny SD1.5, CPU, gloo: torchrun with 2 ranks against one
process, resume across world sizes, a killed rank, bad configs, and runs shared with the ADD Train node.

torchrun runs are subprocesses (OMP_NUM_THREADS=1 as torchrun itself sets for several workers); the
one-process runs call the script's training function in this process, where ComfyUI is already up.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scratch import model_folder

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "train_add.py"
# 2 ranks average their gradients with one all_reduce; one process accumulates the same two
# sub-batches x 1/2 (exact in binary floating point). Both run the same kernels on the same
# sub-batches, so the fp32 state agrees to float rounding; this bound is ~100x what we measured.
TOL = 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (a busy 2-core machine spin-waits with 2 threads)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def loras_dir(comfy, tmp_path_factory):
    """A folder registered first in ComfyUI's 'loras' paths, so the node and the script share runs."""
    with model_folder(tmp_path_factory, "loras", "headless_loras") as d:
        yield d


def config(tiny, path: Path, output: Path, **over) -> Path:
    """The node test's small settings (tests/test_train_node.py), as a headless config file."""
    cfg = dict(model=str(tiny["tiny_sd15"]), output=str(output), prompts=["a red fox", "a blue car", "a green tree"],
               width=64, height=64, data_cfg=3.0, data_steps=1, student_timesteps=[999, 499], lora_rank=4,
               lora_alpha=4.0, lr_lora=1e-3, lr_disc=1e-3, batch_size=2, max_steps=2, save_every=1, preview_every=0,
               seed=0)
    cfg.update(over)
    path.write_text(json.dumps(cfg))
    return path


def torchrun(nproc: int, cfg: Path, wait: bool = True, timeout: float = 400):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(SCRIPT),
           str(cfg)]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def in_process(cfg: Path, plugin) -> int:
    """One process, as ``python scripts/train_add.py cfg`` minus the interpreter start and ComfyUI import."""
    from scripts import train_add
    from comfyui_add.training.distributed import Dist

    settings = train_add.check_config(train_add.read_config(cfg))
    rc = train_add._train(settings, Dist(), torch.device("cpu"))
    # the run was assembled by the plugin's one copy of adapters/ and training/, without the nodes
    assert "comfyui_add.adapters.run_setup" in sys.modules
    assert not [m for m in sys.modules if m.startswith("comfyui_add.nodes")]
    return rc


def state(lora: Path) -> dict[str, torch.Tensor]:
    """Trained tensors of the latest checkpoint (fp32: student adapters, heads, optimisers, EMA)."""
    sdir = lora.with_suffix(".add-state")
    latest = json.loads((sdir / "latest.json").read_text())["checkpoint"]
    tensors = load_file(str(sdir / latest / "state.add-ckpt"))
    return {k: v for k, v in tensors.items() if not k.startswith("rng.")}


def meta(lora: Path) -> dict:
    sdir = lora.with_suffix(".add-state")
    latest = json.loads((sdir / "latest.json").read_text())["checkpoint"]
    return json.loads((sdir / latest / "meta.json").read_text())


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def logged_steps(lora: Path) -> list[int]:
    path = lora.with_suffix(".add-state") / "train_log.jsonl"
    return [json.loads(ln)["step"] for ln in path.read_text().splitlines() if ln.strip()]


def test_bad_configs_fail_before_training_naming_the_key_or_file(tiny, comfy, tmp_path):
    from scripts.train_add import ConfigError, check_config, read_config

    out = tmp_path / "bad"
    toml = tmp_path / "typo.toml"
    toml.write_text(f'model = "{tiny["tiny_sd15"]}"\noutput = "{out}"\nprompts = ["a fox"]\nlearning_rate = 1e-4\n')
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rate'.*did you mean 'lr_lora'"):
        check_config(read_config(toml))
    with pytest.raises(ConfigError, match=r"model file '.*missing\.safetensors' does not exist"):
        check_config(json.loads(config(tiny, tmp_path / "m.json", out, model=str(tmp_path / "missing.safetensors"))
                                .read_text()))
    with pytest.raises(ConfigError, match=r"prompts is empty and no images"):
        check_config(json.loads(config(tiny, tmp_path / "p.json", out, prompts=["", "# comment"]).read_text()))
    with pytest.raises(ConfigError, match=r"lora_rank is 0: type a whole number from 1 to 1024"):
        check_config(json.loads(config(tiny, tmp_path / "r.json", out, lora_rank=0).read_text()))
    # launched on 2 ranks: the first rank to refuse (before ComfyUI is imported or a process group
    # exists) ends the launch; torchrun stops the other
    t0 = time.time()
    res = torchrun(2, toml, timeout=120)
    assert res.returncode != 0
    assert "error: config" in res.stderr and "unknown key 'learning_rate'" in res.stderr, res.stderr[-3000:]
    assert not out.with_suffix(".add-state").exists() and not Path(str(out) + ".safetensors").exists()
    assert time.time() - t0 < 60  # no model was loaded


def test_preset_fills_the_fields_it_names_and_the_files_own_keys_win(tiny, comfy, tmp_path):
    from scripts.train_add import ConfigError, check_config
    from comfyui_add.training.presets import preset_fields

    out = tmp_path / "p"
    settings = check_config(json.loads(config(tiny, tmp_path / "p.json", out, preset="small_data",
                                              lr_lora=5e-4).read_text()))
    small = preset_fields("small_data")
    cfg = settings["request"].config()  # what the run trains with (the model's schedule: 1000 steps)
    assert cfg.ema_decay == small["ema_decay"]
    assert cfg.disc_features == small["disc_features"]
    assert small["lr_lora"] == 1e-3 and cfg.lr_lora == 5e-4  # the file's own key wins
    assert cfg.lora_rank == 4
    with pytest.raises(ConfigError, match=r"preset 'fast' is not known"):
        check_config(json.loads(config(tiny, tmp_path / "q.json", out, preset="fast").read_text()))
    # a file's images for the discriminator: the preset's pairs stay (the student learns from the teacher's data)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for_d = check_config(json.loads(config(tiny, tmp_path / "d.json", out, preset="small_data", image_folder=str(folder),
                                           images_for="discriminator").read_text()))
    assert for_d["request"].config(images=True).paired_weight == small["paired_weight"] > 0
    with pytest.raises(ConfigError, match=r"images_for is 'discriminator' but adv_weight is 0"):
        check_config(json.loads(config(tiny, tmp_path / "e.json", out, image_folder=str(folder), adv_weight=0.0,
                                       images_for="discriminator").read_text()))
    with pytest.raises(ConfigError, match=r"images_for is 'discriminator' but no images"):
        check_config(json.loads(config(tiny, tmp_path / "f.json", out, images_for="discriminator").read_text()))


def test_two_ranks_equal_one_process_and_resume_across_world_sizes(tiny, comfy, plugin, loras_dir, tmp_path):
    # A: torchrun, 2 ranks x batch 2; B: one process running the same 2 data streams
    a, b = loras_dir / "ddp_a.safetensors", loras_dir / "ddp_b.safetensors"
    res = torchrun(2, config(tiny, tmp_path / "a.json", a))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "global batch 4" in res.stderr and "[rank 0/2] done" in res.stderr
    assert in_process(config(tiny, tmp_path / "b.json", b, data_streams=2), plugin) == 0
    # one LoRA and one state per run, written by rank 0 only
    assert sorted(p.name for p in loras_dir.glob("ddp_a*")) == ["ddp_a.add-state", "ddp_a.safetensors"]
    assert sorted(p.name for p in a.with_suffix(".add-state").iterdir()) == [
        "latest.json", "run.json", "step_00000001", "step_00000002", "train_log.jsonl"]
    assert meta(a)["data_streams"] == meta(b)["data_streams"] == 2 and meta(a)["step"] == 2
    sa, sb = state(a), state(b)
    assert max_diff(sa, sb) < TOL
    assert max(float(v.abs().max()) for k, v in sa.items() if k.endswith(".up.weight")) > 1e-4  # trained, not vacuous
    assert logged_steps(a) == [1, 2]

    # resume 2 -> 1 (A, one process) and 1 -> 2 (B, torchrun): both continue the same 2-stream run
    assert in_process(config(tiny, tmp_path / "a3.json", a, max_steps=3), plugin) == 0
    res = torchrun(2, config(tiny, tmp_path / "b3.json", b, max_steps=3, data_streams=2))
    assert res.returncode == 0, res.stderr[-4000:]
    assert "resuming at step 2" in res.stderr and "note:" not in res.stderr
    assert meta(a)["step"] == meta(b)["step"] == 3
    assert max_diff(state(a), state(b)) < TOL
    assert max_diff(state(a), sa) > 100 * TOL  # the third step changed the weights
    assert logged_steps(a) == [1, 2, 3]


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """{RANK: pid} of torchrun's worker processes."""
    out = {}
    for task in Path(f"/proc/{launcher_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
            except OSError:
                continue
            if "RANK" in env:
                out[int(env["RANK"])] = int(pid)
    return out


def test_a_killed_rank_stops_the_run_with_the_checkpoint_intact_and_a_rerun_resumes(tiny, comfy, plugin, tmp_path):
    from safetensors import safe_open

    lora = tmp_path / "killed.safetensors"
    cfg = config(tiny, tmp_path / "k.json", lora, max_steps=200)
    proc = torchrun(2, cfg, wait=False)
    latest = lora.with_suffix(".add-state") / "latest.json"
    t0 = time.time()
    try:
        while not (latest.is_file() and json.loads(latest.read_text())["step"] >= 2):
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.time() - t0 < 300, "the run did not reach step 2"
            time.sleep(0.2)
        pids = _worker_pids(proc.pid)
        assert sorted(pids) == [0, 1]
        os.kill(pids[1], signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    # rank 0 says what happened and what to do (gloo's broken connection, or torchrun's SIGTERM)
    assert "[rank 0/2]" in output and "Run the same command again to resume" in output, output[-4000:]
    step = json.loads(latest.read_text())["step"]
    assert 2 <= step < 200
    assert meta(lora)["step"] == step and state(lora)  # the checkpoint loads
    with safe_open(str(lora), "pt") as f:  # and so does the LoRA, written at a save
        assert 1 <= int(f.metadata()["add.steps_trained"]) <= step
    # the rerun (max_steps lowered, a run-control setting, to keep the test short) resumes there
    assert in_process(config(tiny, cfg, lora, max_steps=step + 1), plugin) == 0
    assert meta(lora)["step"] == step + 1
    assert logged_steps(lora) == list(range(1, step + 2))  # steps after the last save were dropped from the log


def test_node_and_script_resume_each_others_runs(tiny, comfy, plugin, sd15, loras_dir, tmp_path):
    T = plugin("nodes.train")
    model, clip, vae = sd15
    node_settings = dict(prompts="a red fox\na blue car\na green tree", batch_size=2, width=64, height=64,
                         student_timesteps="999,499", lora_rank=4, lora_alpha=4.0, lr_lora=1e-3, lr_disc=1e-3,
                         distill_weight=2.5, discriminator="teacher", data_cfg=3.0, data_steps=1, distill_cfg=1.0,
                         save_every=1, preview_every=0, seed=0, gradient_checkpointing=False, run_mode="alongside")

    def node_run(name, max_steps):
        job = T.start_training(model=model, clip=clip, vae=vae, name=name, max_steps=max_steps, **node_settings)
        while job.state not in ("done", "cancelled", "failed"):
            time.sleep(0.05)
        assert job.state == "done", job.error
        return job

    # script -> node
    lora = loras_dir / "shared_s.safetensors"
    assert in_process(config(tiny, tmp_path / "s.json", lora, max_steps=1), plugin) == 0
    job = node_run("shared_s", 2)
    assert job.start_step == 1 and meta(lora)["step"] == 2
    # node -> script
    node_run("shared_n", 1)
    lora = loras_dir / "shared_n.safetensors"
    assert in_process(config(tiny, tmp_path / "n.json", lora, max_steps=2), plugin) == 0
    assert meta(lora)["step"] == 2
    assert logged_steps(lora) == [2]  # the script logs the steps it trained


def test_a_run_of_only_nonfinite_steps_fails_at_rc_1_without_a_lora(tiny, tmp_path):
    """A checkpoint whose UNet computes NaN: every step is non-finite. The command says 'failed' with the
    reason and exits 1; it never prints 'done', and no LoRA file is left."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tiny["tiny_sd15"]))
    sd["model.diffusion_model.out.2.bias"] = torch.full_like(sd["model.diffusion_model.out.2.bias"], float("nan"))
    model = tmp_path / "nan_unet.safetensors"
    save_file(sd, str(model))
    out = tmp_path / "nan_run.safetensors"
    cfg = config(tiny, tmp_path / "nan.json", out, model=str(model), max_steps=3, batch_size=1, data_steps=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(SCRIPT), str(cfg)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=400)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "failed: the last 3 of 3 steps had a non-finite loss" in res.stderr and "no LoRA was written" in res.stderr
    assert "done:" not in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()

"""training/run.py and training/resume.py without ComfyUI: files beside the LoRA, resume rules, atomic writes, teacher data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from training_helpers import ROOT, single_thread, ring_data, tiny_config, tiny_network  # noqa: F401 (autouse)
from comfyui_add.training import checkpoint as ckpt_mod
from comfyui_add.training import run as run_mod
from comfyui_add.core.errors import ResumeConflict
from comfyui_add.training.resume import check_start, state_dir_for
from comfyui_add.training.run import ADDRun, RunHooks, RunSpec
from comfyui_add.training.schedule import DiscreteSchedule
from comfyui_add.training.toy import TOY_FEATURES, toy_denoise


def spec(tmp_path, name="toy", **cfg_over) -> RunSpec:
    cfg = tiny_config(max_steps=4, save_every=2, preview_every=2, **cfg_over)
    return RunSpec(cfg=cfg, network=tiny_network(), denoise=toy_denoise, data=ring_data,
                   schedule=DiscreteSchedule.scaled_linear(), lora_path=str(tmp_path / f"{name}.safetensors"),
                   device=torch.device("cpu"), feature_modules=TOY_FEATURES[:3],
                   base_info={"base_fingerprint": "abc"}, preview_cond=None, preview_shape=(3, 2))


def test_run_writes_lora_and_state_and_reports_progress(tmp_path):
    seen, saved, previews = [], [], []
    run = ADDRun(spec(tmp_path))
    result = run.train(hooks=RunHooks(progress=seen.append, saved=lambda s, p: saved.append(s),
                                      preview=lambda s, lat: previews.append((s, tuple(lat.shape)))))
    assert result.step == 4 and [s["step"] for s in seen] == [1, 2, 3, 4]
    assert seen[-1]["eta_s"] == 0 and seen[-1]["it_s"] > 0 and "d_loss" in seen[-1]["logs"]
    assert saved == [2, 4] and previews == [(2, (3, 2)), (4, (3, 2))]
    with safe_open(str(tmp_path / "toy.safetensors"), "pt") as f:
        md, keys = f.metadata(), list(f.keys())
    assert md["add.format"] == run_mod.LORA_FORMAT and md["add.steps_trained"] == "4"
    assert md["add.base_fingerprint"] == "abc" and json.loads(md["add.student_timesteps"]) == [999, 499]
    assert any(k.endswith(".lora_up.weight") for k in keys) and any(k.endswith(".alpha") for k in keys)
    state = tmp_path / "toy.add-state"
    assert (state / "run.json").is_file() and ckpt_mod.list_checkpoints(state) == ["step_00000002", "step_00000004"]
    # nothing in the state folder carries an extension a model list would show
    assert not [p for p in state.rglob("*") if p.suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")]


def test_resume_continues_bit_exactly(tmp_path):
    a = ADDRun(spec(tmp_path / "a"))
    os.makedirs(tmp_path / "a")
    a.train()
    b_spec = spec(tmp_path / "b")
    os.makedirs(tmp_path / "b")
    stop = threading.Event()
    b = ADDRun(b_spec)
    b.train(stop, RunHooks(progress=lambda s: stop.set() if s["step"] == 1 else None))
    assert b.trainer.step == 1  # stopped after step 1, saved there
    resumed = ADDRun(spec(tmp_path / "b"))
    assert resumed.build() == 1
    resumed.train()
    from safetensors.torch import load_file
    fa, fb = load_file(str(tmp_path / "a" / "toy.safetensors")), load_file(str(tmp_path / "b" / "toy.safetensors"))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def test_check_start_rules(tmp_path):
    s = spec(tmp_path)
    assert check_start(s.lora_path, s.cfg, "abc") == 0  # nothing there: a new run
    ADDRun(s).train()
    assert check_start(s.lora_path, s.cfg.replace(max_steps=10), "abc") == 4  # run control may change
    with pytest.raises(ResumeConflict, match=r"lora_rank: saved 4, now 8"):
        check_start(s.lora_path, s.cfg.replace(lora_rank=8, lora_alpha=8.0), "abc")
    with pytest.raises(ResumeConflict, match="base model: saved fingerprint abc, now xyz"):
        check_start(s.lora_path, s.cfg, "xyz")
    users = tmp_path / "mine.safetensors"
    save_file({"w": torch.zeros(1)}, str(users))
    with pytest.raises(FileExistsError, match="was not made by an ADD training run"):
        check_start(str(users), s.cfg, "abc")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(FileExistsError, match="not made by an ADD training run"):
        check_start(str(junk), s.cfg, "abc")


def test_a_failed_lora_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    run = ADDRun(spec(tmp_path))
    run.train()
    before = (tmp_path / "toy.safetensors").read_bytes()

    def disk_full(fd):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", disk_full)  # the write fails after the bytes went out
    with pytest.raises(OSError, match="disk full"):
        run.write_lora()
    monkeypatch.undo()
    assert (tmp_path / "toy.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_teacher_data_is_made_with_the_adapters_off(tmp_path):
    """data_factory receives the teacher pass (adapters off), not the live network, whose hooks
    would make the 'teacher' data the student's own."""
    got = []

    def factory(teacher):
        got.append(teacher)
        return ring_data
    s = spec(tmp_path)
    s.data, s.data_factory = None, factory
    run = ADDRun(s)
    run.train()
    x, sigma = torch.ones(2, 2), torch.full((2,), 1.0)
    with torch.no_grad():
        from_factory = got[-1](x, sigma, None)
        assert torch.equal(from_factory, run.models.student.teacher(x, sigma, None))
        assert not torch.allclose(from_factory, run.models.student.student(x, sigma, None))


def test_state_dir_is_beside_the_lora():
    assert state_dir_for("/m/loras/x.safetensors") == "/m/loras/x.add-state"


def test_training_lives_only_under_the_plugin_package():
    """Imported as the plugin's subpackage (as ComfyUI does), training/ registers no top-level
    'training' (or 'core') module and imports no ComfyUI module."""
    code = (
        "import importlib.machinery, importlib.util, sys\n"
        f"root = {str(ROOT)!r}\n"
        "spec = importlib.machinery.ModuleSpec('some_plugin', None, is_package=True)\n"
        "pkg = importlib.util.module_from_spec(spec); pkg.__path__ = [root]; sys.modules['some_plugin'] = pkg\n"
        "import some_plugin.training.run, some_plugin.training.toy, some_plugin.training.checkpoint\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('training', 'core', 'nodes', 'comfy', 'folder_paths', 'server')]\n"
        "print('BAD', bad)\n"
        "sys.exit(1 if bad else 0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_base_fingerprint_samples_names_and_first_values():
    from comfyui_add.core.fingerprint import sampled_fingerprint

    g = torch.Generator().manual_seed(0)
    weights = {f"w{i:02d}": torch.randn(5000, generator=g) for i in range(40)}  # every 2nd tensor sampled
    fp = sampled_fingerprint(weights)
    assert fp == sampled_fingerprint({k: v.clone() for k, v in weights.items()})
    assert fp == "abbc2419457c4dcc"  # saved runs compare it: the sample must never change
    changed = dict(weights, w00=weights["w00"].clone().index_fill_(0, torch.tensor([0]), 9.0))
    assert sampled_fingerprint(changed) != fp
    unsampled = dict(weights, w01=torch.zeros(5000), w00=weights["w00"].clone().index_fill_(0, torch.tensor([4999]), 9.0))
    assert sampled_fingerprint(unsampled) == fp  # other tensors, and values past the first 4096, are not read

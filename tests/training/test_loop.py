"""The loop: bit-exact resume, non-finite skipping/stopping, cooperative stop, atomic checkpoints."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from training_helpers import single_thread, ring_data, straight_and_resumed, tiny_config, tiny_models  # noqa: F401 (autouse)
from comfyui_add.core.errors import ADDError
from comfyui_add.training import checkpoint as ckpt_mod
from comfyui_add.training.checkpoint import list_checkpoints, load_checkpoint, read_meta, save_checkpoint
from comfyui_add.training.loop import NonFiniteTrainingError, Trainer
from comfyui_add.training.toy import toy_denoise


def _snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"s{i}": p.detach().clone() for i, p in enumerate(trainer.student_params)}
    out.update({f"d{i}": p.detach().clone() for i, p in enumerate(trainer.disc_params)})
    for name, opt in (("g", trainer.opt_g), ("d", trainer.opt_d)):
        for i, st in opt.state_dict()["state"].items():
            out.update({f"opt{name}{i}{k}": v.clone() for k, v in st.items() if torch.is_tensor(v)})
    if trainer.ema is not None:
        out.update({f"e{i}": s.clone() for i, s in enumerate(trainer.ema.shadow)})
    out["gen"] = trainer.generator.get_state()
    return out


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_equals_straight_run(tmp_path, mode):
    cfg = tiny_config(training_mode=mode, max_steps=6)
    straight = Trainer(tiny_models(cfg), cfg, ring_data)
    straight.run()

    first = Trainer(tiny_models(cfg.replace(max_steps=3)), cfg.replace(max_steps=3), ring_data)
    first.run(checkpoint_dir=str(tmp_path))
    assert list_checkpoints(tmp_path) == ["step_00000003"]
    resumed = Trainer(tiny_models(cfg), cfg, ring_data)
    load_checkpoint(resumed, tmp_path)
    assert resumed.step == 3
    resumed.run()

    a, b = _snapshot(straight), _snapshot(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=1e-7), k
    # the comparison is not vacuous: training moved the student away from its initial weights
    init = _snapshot(Trainer(tiny_models(cfg), cfg, ring_data))
    assert any(not torch.equal(init[k], a[k]) for k in a if k.startswith("s"))


def test_checkpoint_meta_is_json_and_config_mismatch_is_refused(tmp_path):
    cfg = tiny_config(max_steps=2)
    trainer = Trainer(tiny_models(cfg), cfg, ring_data)
    trainer.run(checkpoint_dir=str(tmp_path))
    meta = read_meta(tmp_path)
    assert meta["step"] == 2 and meta["config"]["seed"] == cfg.seed and "plugin_version" in meta
    other = cfg.replace(distill_weight=1.0)
    with pytest.raises(ValueError, match="distill_weight"):
        load_checkpoint(Trainer(tiny_models(other), other, ring_data), tmp_path)


class _NaNSwitch:
    """Denoiser wrapper whose output turns NaN while ``on``."""

    def __init__(self) -> None:
        self.on = False

    def __call__(self, net, x, sigma, cond):
        out = toy_denoise(net, x, sigma, cond)
        return out * float("nan") if self.on else out


def test_nan_step_is_skipped_counted_and_training_continues():
    cfg = tiny_config(max_steps=6, training_mode="full")
    switch = _NaNSwitch()
    trainer = Trainer(tiny_models(cfg, denoise=switch), cfg, ring_data)
    seen, before_bad = {}, {}

    def progress(step, logs):
        seen[step] = dict(logs)
        if step == 2:  # poison step 3 only
            switch.on = True
            before_bad.update(_snapshot(trainer))
        if step == 3:
            switch.on = False
            after = _snapshot(trainer)
            for k in before_bad:
                if k != "gen":
                    assert torch.equal(before_bad[k], after[k]), f"{k} changed on a skipped step"

    result = trainer.run(progress=progress)
    assert result.step == 6 and result.nonfinite_total == 1
    assert seen[3]["skipped"] == 1.0 and seen[4]["skipped"] == 0.0
    assert all(torch.isfinite(p).all() for p in trainer.student_params + trainer.disc_params)


def test_persistent_nan_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config(max_steps=20, save_every=2, max_nonfinite_steps=3, training_mode="full")
    switch = _NaNSwitch()
    trainer = Trainer(tiny_models(cfg, denoise=switch), cfg, ring_data)
    good = {}

    def progress(step, logs):
        if step == 2:
            good.update(_snapshot(trainer))
        if step == 3:
            switch.on = True  # from step 4 on, every step is non-finite

    with pytest.raises(NonFiniteTrainingError, match="3 consecutive steps") as err:
        trainer.run(progress=progress, checkpoint_dir=str(tmp_path))
    assert "step_00000002" in str(err.value)
    assert isinstance(err.value, ADDError)  # the user-facing type (its message says what to change)
    assert list_checkpoints(tmp_path) == ["step_00000002"]
    fresh = Trainer(tiny_models(cfg), cfg, ring_data)
    load_checkpoint(fresh, tmp_path)
    assert fresh.step == 2
    restored = _snapshot(fresh)
    for k in good:
        assert torch.equal(good[k], restored[k]), k


def test_stop_event_preview_and_progress():
    cfg = tiny_config(max_steps=50, preview_every=2)
    stop = threading.Event()
    previews, steps = [], []

    def progress(step, logs):
        steps.append(step)
        assert {"d_loss", "g_loss", "adv", "distill", "r1"} <= set(logs)
        if step == 5:
            stop.set()

    trainer = Trainer(tiny_models(cfg), cfg, ring_data)
    result = trainer.run(stop_event=stop, progress=progress, preview=lambda s, t: previews.append(s))
    assert result.stopped and result.step == 5 and steps == [1, 2, 3, 4, 5]
    assert previews == [2, 4]


def test_interrupted_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    cfg = tiny_config(max_steps=1)
    trainer = Trainer(tiny_models(cfg), cfg, ring_data)
    trainer.run(checkpoint_dir=str(tmp_path))
    manifest = (tmp_path / "latest.json").read_text()
    state_bytes = (tmp_path / "step_00000001" / ckpt_mod.STATE_FILE).read_bytes()

    def failing_writer(tensors, path, metadata):
        with open(path, "wb") as f:
            f.write(b"partial")  # half-written file, then the "crash"
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod, "_write_safetensors", failing_writer)
    trainer.step = 2
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(trainer, tmp_path)
    assert list_checkpoints(tmp_path) == ["step_00000001"]
    assert sorted(os.listdir(tmp_path)) == ["latest.json", "step_00000001"], "temporary left behind"
    assert (tmp_path / "latest.json").read_text() == manifest
    assert (tmp_path / "step_00000001" / ckpt_mod.STATE_FILE).read_bytes() == state_bytes

    # a failing manifest write also leaves the old manifest readable
    monkeypatch.undo()

    def failing_json(obj, path):
        with open(path, "w") as f:
            f.write("{\"checkp")
        raise OSError("power cut (simulated)")

    monkeypatch.setattr(ckpt_mod, "_write_json", failing_json)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(trainer, tmp_path)
    assert json.loads((tmp_path / "latest.json").read_text())["checkpoint"] == "step_00000001"
    assert list_checkpoints(tmp_path) == ["step_00000001"]


def test_extra_critic_updates_train_only_the_heads_and_resume_exactly(tmp_path):
    """disc_updates = 3: two more discriminator updates per step (fresh batches), the student still one;
    a resumed run equals a straight one."""
    cfg = tiny_config(disc_updates=3, max_steps=4)
    models = tiny_models(cfg)
    student_before = [p.detach().clone() for p in models.student.trainable_parameters()]
    trainer = Trainer(models, cfg, ring_data)
    calls = []
    original = trainer.opt_d.step

    def counting_step(*a, **k):
        calls.append(1)
        return original(*a, **k)

    trainer.opt_d.step = counting_step
    trainer.train_step()
    assert len(calls) == 3  # three critic updates in one iteration
    assert any(not torch.equal(a, b) for a, b in zip(student_before, models.student.trainable_parameters()))

    straight, resumed = straight_and_resumed(cfg, tmp_path)
    for a, b in zip(straight.student_params + straight.disc_params, resumed.student_params + resumed.disc_params):
        assert torch.equal(a, b)

"""Full fine-tuning (training_mode='full') in the training core, without ComfyUI: the LoRA extracted
from student - teacher, its reported error, the EMA export, resume and gradient checkpointing."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from training_helpers import single_thread, ring_data, tiny_config, tiny_network  # noqa: F401 (autouse)
from comfyui_add.training.lora_extract import extract_lora
from comfyui_add.training.run import ADDRun, RunHooks, RunSpec
from comfyui_add.training.schedule import DiscreteSchedule
from comfyui_add.training.toy import TOY_FEATURES, toy_denoise


def spec(tmp_path, name="full", **cfg_over) -> RunSpec:
    cfg = tiny_config(**{"training_mode": "full", "max_steps": 4, "save_every": 2, **cfg_over})
    return RunSpec(cfg=cfg, network=tiny_network(), denoise=toy_denoise, data=ring_data,
                   schedule=DiscreteSchedule.scaled_linear(), lora_path=str(tmp_path / f"{name}.safetensors"),
                   device=torch.device("cpu"), feature_modules=TOY_FEATURES[:3], base_info={"base_fingerprint": "abc"})


def apply_lora(network: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights a LoRA loader computes: W + up @ down * alpha / r per layer, W + diff for 1-D tensors."""
    out = {k: v.detach().clone().double() for k, v in network.named_parameters()}
    for key in sd:
        if key.endswith(".lora_up.weight"):
            mod = key[: -len(".lora_up.weight")]
            up, down = sd[key].double(), sd[f"{mod}.lora_down.weight"].double()
            scale = float(sd[f"{mod}.alpha"]) / up.shape[1]
            w = out[f"{mod}.weight"]
            out[f"{mod}.weight"] = w + (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * scale
        elif key.endswith(".diff_b"):
            out[f"{key[: -len('.diff_b')]}.bias"] += sd[key].double()
        elif key.endswith(".diff"):
            out[f"{key[: -len('.diff')]}.weight"] += sd[key].double()
    return out


def test_extract_lora_is_the_optimal_low_rank_approximation():
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(48, 40, generator=g), "c.weight": torch.randn(16, 8, 3, 3, generator=g),
            "a.bias": torch.randn(48, generator=g)}
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    pairs = lambda: ((k, tuned[k], base[k]) for k in base)  # noqa: E731
    for rank in (4, 8):
        sd, rep = extract_lora(pairs(), rank, dtype=torch.float32)
        for key in ("a.weight", "c.weight"):
            s = torch.linalg.svdvals((tuned[key] - base[key]).flatten(1).double())
            optimum = float((s[rank:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())  # Eckart-Young
            assert rep.errors[key] == pytest.approx(optimum, rel=0.02, abs=1e-6), (key, rank)
        assert rep.rank == rank and rep.exact_diffs == 1 and "a.diff_b" in sd
        assert rep.worst[1] == max(rep.errors.values()) and 0 < rep.mean <= rep.worst[1]
    sd, rep = extract_lora(pairs(), 1024, dtype=torch.float32)  # full rank: exact up to float rounding
    assert rep.rank == 40 and rep.overall < 1e-5  # min(48, 40)
    with pytest.raises(ValueError, match="same architecture"):
        extract_lora([("a.weight", torch.zeros(2, 3), torch.zeros(3, 2))], 4)


def test_full_run_exports_a_lora_that_reproduces_the_student(tmp_path):
    run = ADDRun(spec(tmp_path, lora_rank=64, ema_decay=None))
    saved = []
    run.train(hooks=RunHooks(saved=lambda step, path: saved.append((step, run.export_report))))
    assert [s for s, _ in saved] == [2, 4] and all(r is not None for _, r in saved)
    sd = load_file(str(tmp_path / "full.safetensors"))
    student, teacher = run.models.student.copy, run.models.student.network
    want = {k: v.detach().double() for k, v in student.named_parameters()}
    got = apply_lora(teacher, sd)
    delta = max(float((want[k] - dict(teacher.named_parameters())[k].double()).abs().max()) for k in want)
    assert delta > 1e-4  # training moved the weights: the comparison is not vacuous
    assert max(float((want[k] - got[k]).abs().max()) for k in want) < 1e-3 * delta  # fp16 factors
    report = run.export_report
    assert report.rank == 32 and report.overall < 2e-3 and report.worst[1] < 2e-3  # width 32: full rank
    with safe_open(str(tmp_path / "full.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["add.training_mode"] == "full" and md["add.lora_rank"] == "32" and md["add.requested_rank"] == "64"
    assert float(md["add.relative_error"]) == pytest.approx(report.overall, rel=1e-4)
    assert float(md["add.mean_layer_error"]) == pytest.approx(report.mean, rel=1e-4)
    assert md["add.worst_layer"].startswith(report.worst[0] + "=")
    assert json.loads(md["add.config"])["training_mode"] == "full"


def test_low_rank_export_reports_a_larger_error(tmp_path):
    run = ADDRun(spec(tmp_path, lora_rank=2, max_steps=2, save_every=0, ema_decay=None))
    run.train()
    rep = run.export_report
    assert rep.rank == 2 and 0.01 < rep.overall < 1 and rep.worst[1] >= rep.mean
    sd = load_file(str(tmp_path / "full.safetensors"))
    assert {v.shape[0] for k, v in sd.items() if k.endswith(".lora_down.weight")} == {2}


def test_the_ema_weights_are_exported(tmp_path):
    run = ADDRun(spec(tmp_path, lora_rank=64, ema_decay=0.5, max_steps=3, save_every=0))
    run.train()
    student = run.models.student
    names = [n for n, _ in student.copy.named_parameters()]
    ema = {n: s.double() for n, s in zip(names, run.trainer.ema.shadow)}
    live = {n: p.detach().double() for n, p in student.copy.named_parameters()}
    assert max(float((ema[n] - live[n]).abs().max()) for n in names) > 1e-5  # EMA and live weights differ
    got = apply_lora(student.network, load_file(str(tmp_path / "full.safetensors")))
    assert max(float((ema[n] - got[n]).abs().max()) for n in names) < 1e-5


def test_full_resume_restores_the_weights_exactly_and_continues_bit_exactly(tmp_path):
    a = ADDRun(spec(tmp_path / "a"))
    os.makedirs(tmp_path / "a")
    a.train()
    os.makedirs(tmp_path / "b")
    stop = threading.Event()
    b = ADDRun(spec(tmp_path / "b"))
    b.train(stop, RunHooks(progress=lambda s: stop.set() if s["step"] == 1 else None))
    saved_weights = {k: v.clone() for k, v in b.models.student.copy.state_dict().items()}
    saved_moments = {i: {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
                     for i, st in b.trainer.opt_g.state_dict()["state"].items()}
    saved_ema = [s.clone() for s in b.trainer.ema.shadow]
    resumed = ADDRun(spec(tmp_path / "b"))
    assert resumed.build() == 1
    loaded = resumed.models.student.copy.state_dict()
    assert saved_weights.keys() == loaded.keys() and all(torch.equal(saved_weights[k], loaded[k]) for k in loaded)
    moments = resumed.trainer.opt_g.state_dict()["state"]
    assert all(torch.equal(saved_moments[i][k], moments[i][k]) for i in saved_moments for k in saved_moments[i])
    assert all(torch.equal(x, y) for x, y in zip(saved_ema, resumed.trainer.ema.shadow))
    # the teacher is the untouched base, not the saved student
    assert all(torch.equal(p, q) for p, q in zip(resumed.models.student.network.parameters(),
                                                  tiny_network().parameters()))
    resumed.train()
    wa, wb = a.models.student.copy.state_dict(), resumed.models.student.copy.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    fa, fb = load_file(str(tmp_path / "a" / "full.safetensors")), load_file(str(tmp_path / "b" / "full.safetensors"))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def test_full_mode_gradient_checkpointing_gives_the_same_update(tmp_path):
    plain = ADDRun(spec(tmp_path / "p", max_steps=2, save_every=0))
    ckpt_spec = spec(tmp_path / "c", max_steps=2, save_every=0)
    ckpt_spec.checkpoint_modules = ["layers.0", "layers.1"]
    ckpt = ADDRun(ckpt_spec)
    for run in (plain, ckpt):
        os.makedirs(os.path.dirname(run.spec.lora_path))
        run.train()
    assert ckpt.models.student._checkpointed  # the wrappers are in place
    wa, wb = plain.models.student.copy.state_dict(), ckpt.models.student.copy.state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)

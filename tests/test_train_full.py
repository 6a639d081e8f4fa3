"""Full fine-tuning (training_mode 'full') on the tiny SD1.5, CPU: the headless trainer and the ADD
Train node train every weight, save and resume the full student, and write a LoRA extracted from
student - teacher that ComfyUI's own loader applies."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from test_train_headless import config, in_process, meta, one_thread  # noqa: F401  (autouse fixture)
from test_train_node import settings, wait
from scratch import model_folder


@pytest.fixture(scope="module")
def loras_dir(comfy, tmp_path_factory):
    with model_folder(tmp_path_factory, "loras", "full_loras") as d:
        yield d


def deepcopy_network(net):
    """copy.deepcopy of a ComfyUI BaseModel, its model config shared: from ComfyUI 0.33 the config answers
    every missing attribute (``__deepcopy__``, ``__setstate__``) with None, which deepcopy cannot use."""
    cfg = getattr(net, "model_config", None)
    return copy.deepcopy(net, {id(cfg): cfg} if cfg is not None else None)


def student_weights(lora: Path) -> dict[str, torch.Tensor]:
    """The full student's weights in the latest resumable state."""
    sdir = lora.with_suffix(".add-state")
    latest = json.loads((sdir / "latest.json").read_text())["checkpoint"]
    tensors = load_file(str(sdir / latest / "state.add-ckpt"))
    return {k[len("student."):]: v for k, v in tensors.items() if k.startswith("student.")}


def outputs(adapter, networks, seed=0):
    """apply_model of each network on one fixed noisy latent and prompt embedding."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) * 14.6
    ctx = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        return [adapter.comfy_denoise(n, x, torch.tensor([14.6, 3.0]), {"context": ctx}).double() for n in networks]


def test_headless_full_run_saves_resumes_and_exports_a_comfy_lora(tiny, comfy, plugin, sd15, tmp_path, capsys):
    import comfy.lora
    import comfy.sd

    adapter = plugin("adapters.model")
    lora = tmp_path / "full_cli.safetensors"
    over = dict(training_mode="full", lr_full=1e-3, lora_rank=1024, lora_alpha=1024.0, max_steps=2, save_every=2)
    assert in_process(config(tiny, tmp_path / "f.json", lora, **over), plugin) == 0
    out = capsys.readouterr()
    assert "training_mode full" in out.err, out.err[-2000:]
    assert "step 2: exported the full fine-tune as a rank" in out.out + out.err, out.out[-2000:]
    m = meta(lora)
    assert m["step"] == 2 and m["config"]["training_mode"] == "full" and m["config"]["lr_full"] == 1e-3

    # the resumable state holds the whole student (every weight of the network, fp32) and its AdamW moments
    model, _, _ = sd15
    teacher = adapter.frozen_copy(model, torch.device("cpu"))
    student_sd = student_weights(lora)
    assert student_sd.keys() == teacher.state_dict().keys()
    n_params = len(list(teacher.parameters()))
    state = load_file(str(lora.with_suffix(".add-state") / "step_00000002" / "state.add-ckpt"))
    assert sum(1 for k in state if k.startswith("opt_g.state.") and k.endswith(".exp_avg")) == n_params
    student = deepcopy_network(teacher)
    student.load_state_dict(student_sd)
    moved = max(float((p - q).abs().max()) for p, q in zip(student.parameters(), teacher.parameters()))
    assert moved > 1e-4  # every weight was trainable and training moved them

    # the exported LoRA: ComfyUI maps every key, and applying it reproduces the student
    sd = comfy.utils.load_torch_file(str(lora), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(sd, key_map)
    lora_modules = [k for k in sd if k.endswith(".lora_up.weight")]
    diffs = [k for k in sd if k.endswith((".diff", ".diff_b"))]
    assert len(lora_modules) > 50 and diffs
    assert len(patches) == len(lora_modules) + len(diffs)  # every factor and 1-D difference is mapped
    patched = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0.0)[0]
    lora_net = adapter.frozen_copy(patched, torch.device("cpu"))  # the patched weights, fused
    t_out, s_out, l_out = outputs(adapter, [teacher, student, lora_net])
    change = float((s_out - t_out).norm())
    assert change > 1e-3 * float(t_out.norm())  # the student's output differs from the teacher's
    assert float((l_out - s_out).norm()) < 0.1 * change  # and the LoRA carries that difference

    with safe_open(str(lora), "pt") as f:
        md = f.metadata()
    assert md["add.training_mode"] == "full" and md["add.steps_trained"] == "2"
    overall, mean = float(md["add.relative_error"]), float(md["add.mean_layer_error"])
    worst = float(md["add.worst_layer"].rsplit("=", 1)[1])
    # layers no wider than 1024 are exact up to fp16 rounding; only the 1280x1280 ones lose a tail
    assert 0 <= mean <= worst < 0.5 and overall < 0.2 and mean < 0.05, md
    print(f"tiny SD1.5, rank {md['add.rank']}: overall {overall:.4g}, mean {mean:.4g}, worst {md['add.worst_layer']}")


def test_headless_full_resume_continues_and_a_low_rank_export_reports_more_error(tiny, comfy, plugin, tmp_path,
                                                                                capsys):
    lora = tmp_path / "full_low.safetensors"
    over = dict(training_mode="full", lr_full=1e-3, lora_rank=4, lora_alpha=4.0, max_steps=1, save_every=1)
    assert in_process(config(tiny, tmp_path / "l.json", lora, **over), plugin) == 0
    first = student_weights(lora)
    assert in_process(config(tiny, tmp_path / "l.json", lora, **{**over, "max_steps": 2}), plugin) == 0
    assert "resuming at step 1" in capsys.readouterr().err
    assert meta(lora)["step"] == 2
    second = student_weights(lora)
    assert max(float((first[k] - second[k]).abs().max()) for k in first) > 0  # step 2 trained on from step 1
    with safe_open(str(lora), "pt") as f:
        md = f.metadata()
    assert md["add.rank"] == "4" and md["add.steps_trained"] == "2"
    assert 0.05 < float(md["add.relative_error"]) <= 1.0  # rank 4 of a dense update loses most of it, and says so
    print(f"tiny SD1.5, rank 4: overall {md['add.relative_error']}, mean {md['add.mean_layer_error']}, "
          f"worst {md['add.worst_layer']}")
    # the mode cannot change on resume
    with pytest.raises(ValueError, match=r"training_mode: saved 'full', now 'lora'"):
        in_process(config(tiny, tmp_path / "l.json", lora, **{**over, "max_steps": 3, "training_mode": "lora"}),
                   plugin)


def test_node_trains_full_reports_the_export_and_refuses_a_mode_change_on_resume(plugin, sd15, loras_dir):
    import comfy.sd

    T = plugin("nodes.train")
    model, clip, vae = sd15
    assert list(T.ADDTrain.INPUT_TYPES()["optional"])[-8:] == ["training_mode", "lr_full", "preset", "paired_weight",
                                                               "distill_loss", "paired_metric",
                                                               "backward_simulation",
                                                               "images_for"]  # appended last, in release order
    run = settings(name="full_node", training_mode="full", lr_full=1e-3, lora_rank=8, lora_alpha=8.0, max_steps=2,
                   save_every=1, preview_every=1)
    job = wait(T.start_training(model=model, clip=clip, vae=vae, **run))
    assert job.state == "done", job.error
    assert job.last_checkpoint_step == 2 and job.preview_image is not None
    assert "exported the full fine-tune as a rank 8 LoRA" in job.message and "relative error overall" in job.message
    assert "exported the full fine-tune" in T.status_text(job)
    path = loras_dir / "full_node.safetensors"
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    assert md["add.training_mode"] == "full" and md["add.rank"] == "8" and md["add.steps_trained"] == "2"
    assert float(md["add.relative_error"]) == pytest.approx(float(job.message.split("overall ")[1].split(",")[0]),
                                                            rel=2e-3)
    # the file is an ordinary LoRA for ComfyUI: it loads and changes the model's output
    adapter = plugin("adapters.model")
    patched = comfy.sd.load_lora_for_models(model, None, load_file(str(path)), 1.0, 0.0)[0]
    base_out, lora_out = outputs(adapter, [adapter.frozen_copy(model, torch.device("cpu")),
                                           adapter.frozen_copy(patched, torch.device("cpu"))])
    assert not torch.allclose(base_out, lora_out)
    # the mode and its learning rate are saved with the run and checked on resume
    with pytest.raises(ValueError, match=r"lr_full: saved 0.001, now 0.0001"):
        T.start_training(model=model, clip=clip, vae=vae, **{**run, "max_steps": 3, "lr_full": 1e-4})
    with pytest.raises(ValueError, match=r"training_mode: saved 'full', now 'lora'"):
        T.start_training(model=model, clip=clip, vae=vae, **{**run, "max_steps": 3, "training_mode": "lora"})
    again = wait(T.start_training(model=model, clip=clip, vae=vae, **{**run, "max_steps": 3}))
    assert again.state == "done" and again.start_step == 2 and again.step == 3, again.error


def test_bad_training_mode_is_named(plugin, sd15, loras_dir):
    T = plugin("nodes.train")
    model, clip, vae = sd15
    with pytest.raises(ValueError, match=r"training_mode is 'partial': expected one of \('lora', 'full'\)"):
        T.start_training(model=model, clip=clip, vae=vae, **settings(name="bad_mode", training_mode="partial"))


def test_memory_estimate_counts_the_full_copy_and_its_optimiser(plugin, sd15, loras_dir, monkeypatch):
    T = plugin("nodes.train")
    adapter = plugin("adapters.model")
    net = sd15[0].model
    n = sum(p.numel() for p in net.parameters())
    lora = adapter.estimate_memory(net, 2, (8, 8), 4, False)
    full = adapter.estimate_memory(net, 2, (8, 8), 4, False, "full")
    full_ema = adapter.estimate_memory(net, 2, (8, 8), 4, False, "full", ema=True)
    assert full["trainable"] == 16 * n and full_ema["trainable"] == 20 * n  # fp32 copy, grad, 2 moments (+ EMA)
    assert full["total"] - lora["total"] == full["trainable"] - lora["trainable"] > 15 * n
    # enough for a LoRA run, not for a full one: refused before any job, saying what to change
    monkeypatch.setattr(adapter, "free_memory_bytes", lambda device: (lora["total"] + full["total"]) // 2)
    with pytest.raises(ValueError, match=r"full fp32 student copy and optimiser .* use training_mode lora"):
        T.start_training(model=sd15[0], clip=sd15[1], vae=sd15[2],
                         **settings(name="full_too_big", training_mode="full", width=64, height=64))


def test_the_full_student_of_a_half_precision_model_trains_fp32_master_weights(plugin, sd15):
    """On GPUs the job's network is fp16/bf16; AdamW steps of lr 1e-6 would vanish in such weights,
    so the full student is an fp32 copy that runs in fp32."""
    adapter = plugin("adapters.model")
    net = adapter.frozen_copy(sd15[0], torch.device("cpu"))
    half = deepcopy_network(net).to(torch.bfloat16)
    half.diffusion_model.dtype = torch.bfloat16  # as frozen_copy leaves a bf16 model
    student = adapter.trainable_copy(half)
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}  # the teacher is left as it was
    h_out, s_out = outputs(adapter, [half, student])
    assert float((s_out - h_out).norm()) < 0.05 * float(h_out.norm())  # the same network, at higher precision
    w = next(student.parameters())
    with torch.no_grad():
        assert bool(((w + 1e-6 * w.sign()) != w).all())  # a 1e-6 step is kept by every fp32 weight ...
        wh = next(half.parameters())
        assert float(((wh + 1e-6 * wh.sign()) == wh).float().mean()) > 0.9  # ... and lost by most bf16 ones


def test_digits_train_student_takes_the_training_mode_and_samples_through_the_export(comfy, tmp_path):
    """benchmarks/digits.py's full fine-tune: trained, exported, loaded by sample_student (ComfyUI's loader)."""
    from benchmarks import digits as D

    assert D.Size().training_mode == "lora" and D.Size() == D.FULL  # the proof's defaults are unchanged
    size = D.Size(name="full-test", training_mode="full", lr_full=1e-3, lora_rank=1024, add_steps=2, add_batch=4,
                  per_class=2)
    x, y = D.load_splits(size).train
    clip = D.ClassEmbeddingCLIP(size.context_dim, seed=size.seed)
    mp = D.model_patcher(size)  # untrained weights: this checks the plumbing, not the quality
    lora = str(tmp_path / "digits_full.safetensors")
    info = D.train_student(mp, clip, size, lora, data="real", real=(x[:16], y[:16]), log=lambda m: None)
    assert info["export"]["rank"] >= 1 and 0 <= info["export"]["relative_error"] < 1e-2  # rank >= every layer
    samples, evals = D.sample_student(mp, lora, clip, size, 1)
    assert samples.shape == (D.CLASSES * size.per_class, 1, 8, 8) and evals == 1
    assert bool(torch.isfinite(samples).all())

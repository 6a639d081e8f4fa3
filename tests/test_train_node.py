"""ADD training node in-process (tiny SD1.5, CPU): the job thread, files, resume, errors, LoRA loading."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors import safe_open
from scratch import model_folder


@pytest.fixture(scope="module")
def T(plugin):
    return plugin("nodes.train")


@pytest.fixture(scope="module")
def loras_dir(comfy, tmp_path_factory):
    """An empty folder registered first in ComfyUI's 'loras' paths: where trained LoRAs land."""
    with model_folder(tmp_path_factory, "loras", "trained_loras") as d:
        yield d


def settings(**over):
    """Small, fast settings for the tiny SD1.5 on a CPU (64x64 images = 8x8 latents)."""
    base = dict(name="tiny_add", prompts="a red fox\na blue car\na green tree", max_steps=3, batch_size=2, width=64,
                height=64, student_timesteps="999,499", lora_rank=4, lora_alpha=4.0, lr_lora=1e-3, lr_disc=1e-3,
                distill_weight=2.5, discriminator="teacher", data_cfg=3.0, data_steps=2, distill_cfg=1.0,
                save_every=2, preview_every=1, seed=0, gradient_checkpointing=False, run_mode="alongside")
    base.update(over)
    return base


def wait(job, states=("done", "cancelled", "failed"), timeout=240):
    t0 = time.time()
    while job.state not in states:
        assert time.time() - t0 < timeout, f"job stuck in {job.state} at step {job.step}"
        time.sleep(0.05)
    return job


def start(T, sd15, **over):
    model, clip, vae = sd15
    return T.start_training(model=model, clip=clip, vae=vae, **settings(**over))


def test_job_trains_in_background_and_writes_a_comfy_lora(T, sd15, loras_dir, plugin):
    import comfy.lora
    import comfy.sd

    t0 = time.time()
    job = start(T, sd15, name="bg_run")
    returned_after = time.time() - t0
    assert job.state in ("queued", "running")  # returned before the run finished
    wait(job)
    assert job.state == "done", job.error
    assert returned_after < 30
    path = loras_dir / "bg_run.safetensors"
    assert path.is_file() and job.step == 3 and job.last_checkpoint_step == 3
    assert job.preview_image is not None and job.preview_image.shape[-1] == 3 and job.preview_png[:4] == b"\x89PNG"
    assert [h["step"] for h in job.history] == [1, 2, 3] and "d_loss" in job.history[0]

    # every key of the file maps onto the model through ComfyUI's own key map: none unloaded
    model = sd15[0]
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(sd, key_map)
    modules = {k.rsplit(".", 2)[0] for k in sd if k.endswith(".lora_up.weight")}
    assert len(patches) == len(modules) > 50
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    assert md["add.format"] == "comfyui-add-lora" and json.loads(md["add.student_timesteps"]) == [999, 499]
    assert md["add.recommended_cfg"] == "1" and md["add.steps_trained"] == "3" and md["add.base_fingerprint"]

    # the LoRA changes the model's output (the adapters' up-projections were trained away from 0)
    patched = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0.0)[0]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1))
    import comfy.model_management as mm
    outs = []
    for m in (model, patched):
        mm.load_models_gpu([m])
        with torch.no_grad():
            outs.append(m.model.apply_model(x, torch.tensor([14.6]), c_crossattn=ctx).clone())
    assert not torch.allclose(outs[0], outs[1])
    # the state sits beside the LoRA and nothing in it looks like a model to ComfyUI's lists
    import folder_paths
    assert (loras_dir / "bg_run.add-state" / "latest.json").is_file()
    assert [f for f in folder_paths.get_filename_list("loras") if "bg_run" in f] == ["bg_run.safetensors"]


def test_input_model_is_untouched_and_copy_is_trainable(T, sd15, plugin):
    model = sd15[0]
    before = {k: v.clone() for k, v in list(model.model.state_dict().items())[:20]}
    adapter = plugin("adapters.model")
    with torch.inference_mode():  # as node execution runs
        net = adapter.frozen_copy(model, torch.device("cpu"))
    w = next(net.parameters())
    assert not w.is_inference() and not w.requires_grad
    assert not [type(m) for m in net.modules() if type(m).__module__.startswith("comfy.ops")]
    assert all(torch.equal(before[k], model.model.state_dict()[k]) for k in before)
    assert adapter.feature_modules(net)  # teacher-feature discriminator has layers to read


def test_cancel_then_same_name_resumes_at_the_stop_step(T, sd15, loras_dir):
    job = start(T, sd15, name="cancel_run", max_steps=200, save_every=0, preview_every=0)
    while job.step < 2:
        assert job.state not in ("failed", "done"), job.error
        time.sleep(0.05)
    T.REGISTRY.cancel(job)
    wait(job)
    assert job.state == "cancelled"
    stopped = job.step
    assert job.last_checkpoint_step == stopped  # cancel wrote a checkpoint at the stop step
    assert (loras_dir / "cancel_run.safetensors").is_file()
    again = start(T, sd15, name="cancel_run", max_steps=stopped + 1, save_every=0, preview_every=0)
    assert again.start_step == stopped
    wait(again)
    assert again.state == "done" and again.step == stopped + 1


def test_changed_settings_refuse_to_resume_and_name_them(T, sd15, loras_dir):
    wait(start(T, sd15, name="conflict_run", max_steps=1, preview_every=0))
    with pytest.raises(ValueError, match=r"lora_rank: saved 4, now 8.*student_timesteps"):
        start(T, sd15, name="conflict_run", lora_rank=8, student_timesteps="999")


def test_discriminator_noise_range_norm_and_lr_schedule_reach_the_run(T, sd15, loras_dir):
    """The settings the digits proof found to matter are node inputs; they are saved with the run
    and, like the other training settings, cannot change on resume."""
    job = wait(start(T, sd15, name="disc_opts_run", max_steps=1, preview_every=0, disc_max_timestep=50,
                     disc_norm="sample", lr_schedule="cosine"))
    assert job.state == "done", job.error
    blob = json.dumps([json.loads(p.read_text()) for p in (loras_dir / "disc_opts_run.add-state").rglob("*.json")])
    assert '"disc_timestep_range": [0, 50]' in blob and '"disc_norm": "sample"' in blob
    assert '"lr_schedule": "cosine"' in blob
    with pytest.raises(ValueError, match=r"disc_max_timestep: saved 50, now 999"):  # the input's name, not the field's
        start(T, sd15, name="disc_opts_run", max_steps=2, preview_every=0, disc_max_timestep=999,
              disc_norm="sample", lr_schedule="cosine")


def test_preset_sets_the_fields_it_names_and_they_are_saved_with_the_run(T, sd15, loras_dir):
    from comfyui_add.training.presets import preset_fields

    job = wait(start(T, sd15, name="preset_run", max_steps=1, preview_every=0, preset="small_data",
                     lr_lora=1e-4, lora_rank=4))
    assert job.state == "done", job.error
    saved = next(json.loads(p.read_text())["config"] for p in (loras_dir / "preset_run.add-state").rglob("meta.json"))
    for key, value in preset_fields("small_data").items():
        assert saved[key] == (list(value) if isinstance(value, tuple) else value), key
    assert saved["lora_rank"] == 4  # not a preset field: the widget's value
    with pytest.raises(ValueError, match="preset 'fast'"):
        start(T, sd15, name="preset_bad", preset="fast")


def test_the_nodes_text_lists_what_the_preset_set_on_this_run(T, sd15, loras_dir):
    """From prompts small_data sets its pairs and its distribution matching; on given images it sets neither
    (no noise to pair with; training/setup.py keeps the user's distillation there), and the text says so."""
    from comfyui_add.training.presets import WITH_PAIRS_ONLY

    model, clip, vae = sd15
    texts = {}
    for run, extra in (("prompts", {}), ("images", {"images": torch.rand(2, 64, 64, 3)}),
                       ("images_for_d", {"images": torch.rand(2, 64, 64, 3), "images_for": "discriminator"})):
        s = settings(name=f"preset_text_{run}", max_steps=1, preview_every=0, save_every=0, preset="small_data",
                     **extra)
        s["training_seed"] = s.pop("seed")
        out = T.ADDTrain.execute(model=model, clip=clip, vae=vae, **s)
        job = wait(T.REGISTRY.get(out.args[0]))
        assert job.state == "done", job.error
        texts[run] = out.ui["text"][0]
    for key in ("paired_weight", *WITH_PAIRS_ONLY):
        assert f"{key} = " in texts["prompts"] and f"{key} = " not in texts["images"], (key, texts)
        assert f"{key} = " in texts["images_for_d"], (key, texts)  # images for D: the student learns the teacher's
    assert "lr_lora = 0.001" in texts["images"] and "lr_lora = 0.001" in texts["prompts"]


@pytest.mark.parametrize("which", ["encoder", "input+encoder", "all"])
def test_discriminator_feature_sets_are_real_modules_that_run(T, sd15, plugin, which):
    adapter = plugin("adapters.model")
    network = adapter.frozen_copy(sd15[0], torch.device("cpu"))
    names = adapter.feature_modules(network, which)
    encoder = adapter.feature_modules(network, "encoder")
    if which == "encoder":
        assert any(".middle_block." in n for n in names) and not any("output_blocks" in n for n in names)
    else:
        assert names[0] == "diffusion_model.input_blocks.0.0" and set(encoder) < set(names)
    assert any("output_blocks" in n for n in names) == (which == "all")
    from comfyui_add.training.discriminator import HookedActivations

    x = torch.randn(2, 4, 8, 8)
    cond = {"context": torch.randn(2, 77, sd15[0].model.model_config.unet_config["context_dim"])}
    feats = HookedActivations(network, names)(lambda: adapter.comfy_denoise(network, x, torch.ones(2), cond))
    assert len(feats) == len(names) and all(f.shape[0] == 2 for f in feats)


def test_users_own_lora_is_never_overwritten(T, sd15, loras_dir):
    from safetensors.torch import save_file

    path = loras_dir / "users_lora.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="not made by an ADD training run"):
        start(T, sd15, name="users_lora")
    assert path.read_bytes() == before


@pytest.mark.parametrize("over, match", [
    (dict(prompts="  \n# only a comment\n"), "prompts is empty"),
    (dict(width=100), "width 100 must be a multiple of 8"),
    (dict(height=60), "height 60 must be a multiple of 8"),
    (dict(name="../evil"), "name '../evil' contains"),
    (dict(name="a/b"), "contains a path separator"),
    (dict(name="a\\b"), "contains"),
    (dict(discriminator="dinov2", dinov2_file="dinov2/missing.safetensors"), "no such file"),
    (dict(discriminator="dinov2"), "dinov2_file is empty"),
    (dict(student_timesteps="999,abc"), "student_timesteps '999,abc' is not valid"),
    (dict(student_timesteps="999,999"), "is not valid"),
    (dict(student_timesteps="1000"), "is not valid"),
    (dict(image_folder="../outside"), "image_folder"),
    (dict(image_folder="no_such_folder"), "no such folder"),
    (dict(disc_max_timestep=1000), "disc_max_timestep is 1000: type a whole number from 0 to 999"),
    (dict(disc_norm="layer"), "disc_norm"),
    (dict(lr_schedule="linear"), "lr_schedule"),
])
def test_bad_input_is_a_clear_error_before_any_job(T, sd15, loras_dir, over, match):
    n = len(T.REGISTRY.jobs)
    with pytest.raises(ValueError, match=match):
        start(T, sd15, **over)
    assert len(T.REGISTRY.jobs) == n


def test_a_family_it_cannot_train_is_named(T, sd15):
    import comfy.model_patcher

    class Flux(torch.nn.Module):
        pass
    fake = comfy.model_patcher.ModelPatcher(Flux(), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match="cannot train this model: it is a Flux"):
        T.start_training(model=fake, clip=sd15[1], **settings())


def test_images_train_from_the_vae_latents(T, sd15, loras_dir):
    imgs = torch.rand(3, 48, 80, 3, generator=torch.Generator().manual_seed(0))
    job = start(T, sd15, name="image_run", images=imgs, prompts="a photo", max_steps=2, preview_every=0)
    wait(job)
    assert job.state == "done", job.error
    assert (loras_dir / "image_run.add-state" / "run.json").is_file()
    run = json.loads((loras_dir / "image_run.add-state" / "run.json").read_text())
    assert run["data"] == "images" and run["images"] == 3


def test_images_for_the_discriminator_keep_the_teachers_data_and_pairs_and_are_what_d_calls_real(T, sd15, loras_dir,
                                                                                                   plugin, monkeypatch):
    """images_for 'discriminator': the student's batches are the teacher's samples of the images' captions (with
    the noise the preset's pairs need), and the discriminator's real side is rows of the given images' latents."""
    run_setup = plugin("adapters.run_setup")
    seen, prompt_lists = [], []

    class Recording(run_setup.WithRealImages):
        def __call__(self, generator, batch_size):
            batch = super().__call__(generator, batch_size)
            lat = self.real.latents.flatten(1)
            seen.append((all(bool((lat == r.flatten()).all(1).any()) for r in batch["real"]["x0"]),
                         "noise" in batch, bool((lat == batch["x0"][0].flatten()).all(1).any())))
            prompt_lists.append(list(self.data.prompts))
            return batch

    monkeypatch.setattr(run_setup, "WithRealImages", Recording)
    imgs = torch.rand(4, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    job = wait(start(T, sd15, name="images_for_d", images=imgs, images_for="discriminator", preset="small_data",
                     prompts="a red fox\na blue car\na green tree", max_steps=2, preview_every=0))
    assert job.state == "done", job.error
    assert seen and all(real_rows and noise and not teacher_is_image for real_rows, noise, teacher_is_image in seen)
    # the teacher draws from the images' captions (the prompt lines cycled over the 4 images): both sides alike
    assert prompt_lists[0] == ["a red fox", "a blue car", "a green tree", "a red fox"]
    run = json.loads((loras_dir / "images_for_d.add-state" / "run.json").read_text())
    assert run["data"] == "teacher+images" and run["images"] == 4
    saved = next(json.loads(p.read_text())["config"] for p in (loras_dir / "images_for_d.add-state").rglob("meta.json"))
    assert saved["images_for"] == "discriminator" and saved["paired_weight"] == 100.0  # the preset's pairs stay


def test_images_for_the_discriminator_needs_images_and_a_known_value_is_checked(T, sd15, loras_dir):
    imgs = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="images_for is 'discriminator' but no images"):
        start(T, sd15, name="d_no_images", images_for="discriminator")
    with pytest.raises(ValueError, match="images_for"):
        start(T, sd15, name="d_unknown", images=imgs, images_for="sideways")


def test_gradient_checkpointing_recomputes_the_blocks_and_gives_the_same_first_step(T, plugin, sd15, loras_dir,
                                                                                     monkeypatch):
    """With checkpointing on, the checkpointed UNet blocks run again in backward: a ResBlock's layers
    run twice per gradient-carrying forward instead of once (no-grad passes are not checkpointed).
    The gradients are the same: identical LoRAs after one step."""
    adapter = plugin("adapters.model")
    frozen_copy = adapter.frozen_copy
    runs = {}

    def counting_copy(model, device):
        network = frozen_copy(model, device)
        modules = dict(network.named_modules())
        block = next(modules[n] for n in adapter.checkpoint_modules(network) if hasattr(modules[n], "in_layers"))
        seen = runs[current]
        block.in_layers.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
        return network

    monkeypatch.setattr(adapter, "frozen_copy", counting_copy)
    for current, on in (("ckpt_off", False), ("ckpt_on", True)):
        runs[current] = []
        job = wait(start(T, sd15, name=current, max_steps=1, preview_every=0, gradient_checkpointing=on))
        assert job.state == "done", job.error
    (off_grad, off_plain), (on_grad, on_plain) = ((sum(r), len(r) - sum(r)) for r in runs.values())
    assert off_grad > 0 and on_grad == 2 * off_grad and on_plain == off_plain
    import comfy.utils
    sa = comfy.utils.load_torch_file(str(loras_dir / "ckpt_off.safetensors"))
    sb = comfy.utils.load_torch_file(str(loras_dir / "ckpt_on.safetensors"))
    assert sa.keys() == sb.keys()
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-3) for k in sa)


def test_status_and_compare_nodes(T, plugin, sd15, loras_dir):
    job = wait(start(T, sd15, name="compare_run", max_steps=2, preview_every=1))
    text, img = T.ADDTrainingStatus.execute(job.id)
    assert "compare_run" in text and "done" in text and img.shape[-1] == 3
    with pytest.raises(ValueError, match="no ADD training job with this id"):
        T.ADDTrainingStatus.execute("0123456789ab")
    model, clip, vae = sd15
    compare = plugin("nodes.compare")
    (grid,) = compare.ADDCompare.execute(model, clip, vae, "compare_run", "a red fox\na blue car", 0, 2, 3.0, "euler",
                                         2, 64, 64)
    assert grid.shape[0] == 1 and grid.shape[2] == 128 and grid.shape[1] == 28 + 2 * 64
    assert compare.pick_timesteps([999, 749, 499, 249], 2) == [999, 499]
    with pytest.raises(ValueError, match="teacher_sampler 'no_such' is not a sampler"):  # 0.3.75 leaves it to the node
        compare.ADDCompare.execute(model, clip, vae, "compare_run", "a red fox", 0, 2, 3.0, "no_such", 2, 64, 64)


def test_job_never_touches_comfyuis_interrupt_flag(T, sd15, loras_dir):
    """The user's Cancel (a global flag that ComfyUI's ops check and clear) survives a whole job."""
    import comfy.model_management as mm

    job = start(T, sd15, name="interrupt_flag", max_steps=2, preview_every=1)  # set-up honours Cancel: flag after
    mm.interrupt_current_processing(True)
    try:
        wait(job)
        assert job.state == "done", job.error
        assert mm.processing_interrupted()  # still set: the job neither cleared it nor died of it
    finally:
        mm.interrupt_current_processing(False)


def test_polite_job_pauses_while_the_queue_is_busy(T, sd15, loras_dir, monkeypatch):
    busy = {"on": False}
    monkeypatch.setattr(T.REGISTRY, "busy", lambda: busy["on"])
    job = start(T, sd15, name="polite_run", max_steps=10_000, preview_every=0, save_every=0, run_mode="polite")
    while job.step < 1:
        assert job.state not in ("failed", "done"), job.error
        time.sleep(0.05)
    busy["on"] = True
    wait(job, states=("paused",), timeout=60)
    held = job.step
    time.sleep(1.5)
    assert job.state == "paused" and job.step == held  # no step while ComfyUI has work
    busy["on"] = False
    t0 = time.time()
    while job.step <= held:
        assert time.time() - t0 < 60
        time.sleep(0.05)
    assert job.state == "running"
    T.REGISTRY.cancel(job)
    assert wait(job).state == "cancelled"


def test_memory_estimate_refuses_with_numbers_and_what_to_lower(T, plugin, sd15, loras_dir, monkeypatch):
    adapter = plugin("adapters.model")
    monkeypatch.setattr(adapter, "free_memory_bytes", lambda device: 10 * 2**20)
    with pytest.raises(ValueError, match=r"needs about .* GB on cpu .* but about 0\.0 GB is free\. Lower batch_size"):
        start(T, sd15, name="too_big")
    need_small = adapter.estimate_memory(sd15[0].model, 2, (8, 8), 4, True)
    need_big = adapter.estimate_memory(sd15[0].model, 2, (8, 8), 4, False)
    assert need_small["activations"] < need_big["activations"] and need_small["weights"] == need_big["weights"]


def test_out_of_memory_in_the_job_fails_it_cleanly_with_the_checkpoint_intact(T, sd15, loras_dir, monkeypatch):
    from importlib import import_module
    loop = import_module(T.__name__.rsplit(".", 2)[0] + ".training.loop")
    real = loop.Trainer.train_step

    def step_then_oom(self):
        if self.step >= 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self)
    monkeypatch.setattr(loop.Trainer, "train_step", step_then_oom)
    job = wait(start(T, sd15, name="oom_run", max_steps=50, save_every=2, preview_every=0))
    assert job.state == "failed" and job.last_checkpoint_step == 2
    assert "Out of memory at step 2" in job.error and "queue the same name to resume" in job.error
    assert (loras_dir / "oom_run.safetensors").is_file()
    monkeypatch.undo()
    again = wait(start(T, sd15, name="oom_run", max_steps=3, save_every=2, preview_every=0))
    assert again.start_step == 2 and again.state == "done"


def test_our_merge_node_fuses_the_trained_lora_with_every_module_matched(T, sd15, loras_dir, plugin):
    wait(start(T, sd15, name="merge_me", max_steps=1, preview_every=0))
    L = plugin("nodes.lora_merge")
    model, clip, _ = sd15
    fused, _clip, report = L.ADDLoraMerge.execute(model, "merge_me.safetensors", 1.0, 0.0, "auto", clip=clip)
    assert "WARNING" not in report and "note: ComfyUI's LoraLoader would skip" not in report, report
    import re
    m = re.search(r"unet: (\d+)/(\d+) LoRA modules matched", report)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) > 50, report
    assert "LCM: no" in report  # an ADD LoRA keeps eps sampling


class _StandInClip:
    """A CLIP-shaped object for in-memory models that ship without a text encoder: seeded
    embeddings of the family's widths, different per prompt (what ADD Train reads from a CLIP)."""

    def __init__(self, width: int, pooled: int | None):
        self.width, self.pooled = width, pooled

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        g = torch.Generator().manual_seed(abs(hash(tokens)) % 2**31)
        out = {"cond": torch.randn(1, 77, self.width, generator=g)}
        out["pooled_output"] = torch.randn(1, self.pooled, generator=g) if self.pooled else None
        return out


@pytest.mark.parametrize("family", ["sdxl", "sd2v"])
def test_sdxl_and_v_prediction_train_through_the_node(T, family, request, loras_dir):
    import comfy.lora

    model = request.getfixturevalue(family)
    clip = _StandInClip(2048, 1280) if family == "sdxl" else _StandInClip(1024, 1024)
    job = wait(T.start_training(model=model, clip=clip, vae=None, **settings(name=f"fam_{family}", max_steps=2,
                                                                             preview_every=1, save_every=0)))
    assert job.state == "done", job.error
    assert job.preview_image is not None  # latent->RGB preview without a VAE
    sd = comfy.utils.load_torch_file(str(loras_dir / f"fam_{family}.safetensors"))
    patches = comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(model.model, {}))
    assert len(patches) == len({k.rsplit(".", 2)[0] for k in sd if k.endswith(".lora_up.weight")}) > 10


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd2v"])
def test_pairs_and_distribution_matching_train_through_the_node_on_every_family(T, family, request, loras_dir):
    """paired_weight (the teacher data's own noise) compared in the teacher's features (paired_metric),
    distill_loss 'dmd' (the fake score's LoRA on the job's copy) and backward_simulation on SD1.5, SDXL (ADM
    conditioning) and v-prediction; the options reach the run's saved config."""
    model = request.getfixturevalue(family)
    clip = {"sd15": None, "sdxl": _StandInClip(2048, 1280), "sd2v": _StandInClip(1024, 1024)}[family]
    if family == "sd15":
        model, clip = model[0], model[1]
    name = f"pairs_dmd_{family}"
    job = wait(T.start_training(model=model, clip=clip, vae=None, **settings(
        name=name, max_steps=2, preview_every=0, save_every=0, paired_weight=10.0, distill_loss="dmd",
        paired_metric="features", backward_simulation=True)))
    assert job.state == "done", job.error
    saved = next(json.loads(p.read_text())["config"] for p in (loras_dir / f"{name}.add-state").rglob("meta.json"))
    assert saved["paired_weight"] == 10.0 and saved["distill_loss"] == "dmd" and saved["paired_metric"] == "features"
    assert saved["backward_simulation"] is True
    assert (loras_dir / f"{name}.safetensors").is_file()


def test_a_finished_run_queued_again_reports_done_and_trains_further_when_asked(T, sd15, loras_dir):
    first = wait(start(T, sd15, name="finished_run", max_steps=1, preview_every=0))
    assert first.state == "done"
    again = start(T, sd15, name="finished_run", max_steps=1, preview_every=0)
    assert again.state == "done" and again.thread is None and "raise max_steps" in again.message
    more = wait(start(T, sd15, name="finished_run", max_steps=2, preview_every=0))
    assert more.start_step == 1 and more.step == 2 and more.state == "done"


def test_quantized_weights_are_refused_by_name(T, sd15, loras_dir, monkeypatch):
    """A scaled-fp8 layer (a weight scale a plain torch layer would ignore) is an error naming it."""
    layer = sd15[0].model.diffusion_model.input_blocks[1][1].proj_in
    monkeypatch.setattr(layer, "scale_weight", torch.ones(()), raising=False)
    with pytest.raises(ValueError, match=r"cannot train quantized weights .*input_blocks\.1\.1\.proj_in"):
        start(T, sd15, name="quantized")


def test_dinov2_discriminator_trains_through_the_node(T, sd15, loras_dir, monkeypatch, comfy):
    """discriminator='dinov2': a local DINOv2 file judges TinyVAE-decoded images (the paper's D)."""
    import folder_paths
    import transformers
    from safetensors.torch import save_file

    tiny_cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=12, num_attention_heads=2,
                                         intermediate_size=64, patch_size=14, image_size=56)
    disc = import_module_of(T, "training.discriminator")
    monkeypatch.setattr(disc, "dinov2_vits14_config", lambda: tiny_cfg)
    weights = transformers.Dinov2Model(tiny_cfg).state_dict()
    target = os.path.join(folder_paths.models_dir, "dinov2_test")
    os.makedirs(target, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(target, "tiny.safetensors"))
    job = wait(start(T, sd15, name="dino_run", discriminator="dinov2", dinov2_file="dinov2_test/tiny.safetensors",
                     max_steps=2, preview_every=0))
    assert job.state == "done", job.error
    assert (loras_dir / "dino_run.safetensors").is_file()


def import_module_of(T, sub: str):
    from importlib import import_module
    return import_module(T.__name__.rsplit(".", 2)[0] + "." + sub)


@pytest.mark.parametrize("layout", ["ssd1b", "vega", "koala"])
def test_distilled_sdxl_layouts_train_through_the_node(T, layout, loras_dir, comfy):
    """SSD-1B / Vega (other transformer depths per level) and KOALA (one ResBlock per level, no middle
    block): ComfyUI's detection reads each layout from its keys; ADD Train trains it, with gradient
    checkpointing, and every key of the LoRA maps onto the model."""
    import comfy.lora
    from scripts.tiny_models import distilled_model_patcher

    model = distilled_model_patcher(layout)
    assert (model.model.diffusion_model.middle_block is None) == (layout == "koala")
    job = wait(T.start_training(model=model, clip=_StandInClip(2048, 1280), vae=None,
                                **settings(name=f"distilled_{layout}", max_steps=2, preview_every=1, save_every=0,
                                           gradient_checkpointing=True)))
    assert job.state == "done", job.error
    sd = comfy.utils.load_torch_file(str(loras_dir / f"distilled_{layout}.safetensors"))
    patches = comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(model.model, {}))
    assert len(patches) == len({k.rsplit(".", 2)[0] for k in sd if k.endswith(".lora_up.weight")}) > 10


def test_a_unet_without_any_encoder_feature_is_refused_in_words(T, plugin):
    """The teacher discriminator reads encoder features; a UNet with none is refused before a job starts."""
    from types import SimpleNamespace

    adapter = plugin("adapters.model")
    bare = SimpleNamespace(diffusion_model=SimpleNamespace(input_blocks=[[torch.nn.Conv2d(4, 8, 3)]], middle_block=None))
    with pytest.raises(ValueError, match=r"cannot use discriminator 'teacher' on this UNet.*Use discriminator 'dinov2'"):
        adapter.feature_modules(bare)

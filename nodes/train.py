"""ADD Train (background) and ADD Training Status.

ADD Train checks every input on the prompt thread, turns the widgets into a
``training.setup.RunRequest``, assembles the run through ``adapters/run_setup.py`` (the same path the
headless trainer takes: its own frozen copy of the base weights, the prompts encoded once, image
latents), hands a job to the registry (nodes/jobs.py) and returns at once. The run itself is
``training/run.py``. ADD Compare is in nodes/compare.py.
"""
from __future__ import annotations

import logging
import os

import torch

import comfy.model_management as mm
import folder_paths
from comfy_api.latest import io

from ..adapters import run_setup
from ..core import files
from ..core.errors import ADDError
from ..core.images import png_bytes
from ..training import image_folder as image_files
from ..training.config import (DISC_NORMS, DISCRIMINATOR_TYPES, DISTILL_LOSSES, IMAGES_FOR, LR_SCHEDULES,
                               PAIRED_METRICS, TRAINING_MODES)
from ..training.presets import PRESET_NAMES, fields_on_run
from ..training.resume import STATE_SUFFIX, check_start, existing_run, state_dir_for
from ..training.run import ADDRun, RunHooks, RunSpec
from ..training.setup import RUN_MODES, WIDGET_NAMES, RunRequest, describe_change, parse_prompts
from .jobs import REGISTRY, Job

log = logging.getLogger("comfyui-add")
CATEGORY = "ADD/training"
_DEFAULT_PROMPTS = ("a photograph of a red fox in a snowy forest, golden hour\n"
                    "a bowl of ramen on a wooden table, studio lighting\n"
                    "a watercolor painting of a lighthouse on a cliff\n"
                    "portrait of an old sailor with a grey beard, dramatic light\n"
                    "a futuristic city skyline at night, neon reflections")


# --------------------------------------------------------------------------------------------
# validation helpers (each error names the input and says how to fix it)
# --------------------------------------------------------------------------------------------
def check_name(name: str, what: str = "name") -> str:
    """The LoRA file name (without .safetensors); no folders, no '..', nothing a file system refuses
    (its state folder ``<name>.add-state`` must fit too)."""
    return files.check_name(name, what, ".safetensors", suffixes=(STATE_SUFFIX,),
                            folder=folder_paths.get_folder_paths("loras")[0], example="my_turbo_lora")


def load_image_folder(folder: str, width: int, height: int) -> tuple[torch.Tensor, list[str]]:
    """Images of ``input/<folder>`` resized and centre-cropped to width x height -> (N, H, W, 3), captions."""
    base = folder_paths.get_input_directory()
    label = f"image_folder {str(folder).strip()!r}"
    path = image_files.input_subfolder(base, folder, "image_folder", "Put your images (with same-name .txt captions) "
                                        "in a folder there and type its name.")
    return run_setup.read_image_folder(path, width, height, label)


# --------------------------------------------------------------------------------------------
# ADD Train (background)
# --------------------------------------------------------------------------------------------
class ADDTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADDTrain", display_name="ADD Train (background)", category=CATEGORY,
            description=("Distils the connected checkpoint into a 1-4 step ADD LoRA (Adversarial Diffusion Distillation), "
                         "in the background: the prompt returns at once with a job id while training continues; keep "
                         "generating meanwhile. No dataset needed: the teacher makes its own training images from the "
                         "prompt list. The LoRA is saved to models/loras/<name>.safetensors every save_every steps; queue "
                         "the same name again to resume. Progress, losses and previews are in the ADD Training sidebar tab."),
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint to distil: teacher and the student's base (SD1.x, SD2.x, SDXL)."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP, to encode the prompts (once, before training starts)."),
                io.String.Input("name", default="my_turbo_lora", tooltip=
                    "The run's name, not a file prefix: the LoRA is models/loras/<name>.safetensors (never numbered), its "
                    "resumable state <name>.add-state/ beside it. Queueing again with the same name continues that run: it "
                    "reports the job while it trains, resumes after a Cancel or a restart, and says 'done' once max_steps "
                    "is reached (raise max_steps to train on). Only max_steps, save_every and preview_every may change on "
                    "resume; other changes are refused with a message. A new name starts a new run."),
                io.String.Input("prompts", default=_DEFAULT_PROMPTS, multiline=True, tooltip=
                    "One prompt per line. Without images, the teacher generates the training images from these (LADD: no "
                    "dataset needed); with images, a caption for images that have none."),
                io.Int.Input("max_steps", default=2000, min=1, max=1_000_000, tooltip=
                    "Training iterations (one discriminator + one student update each). Can be raised on resume."),
                io.Int.Input("batch_size", default=4, min=1, max=256, tooltip=
                    "Samples per iteration. >= 4 recommended (hinge loss collapses at batch 1)."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip=
                    "Training image width in pixels (multiple of 8; 512 for SD1.5/2.x, 1024 for SDXL)."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip=
                    "Training image height in pixels (multiple of 8)."),
                io.String.Input("student_timesteps", default="999,749,499,249", tooltip=
                    "Timesteps the student learns to denoise from in one step; sample the trained LoRA with the same ones "
                    "(ADD Scheduler 'custom'). Default: the paper's 4 steps."),
                io.Int.Input("lora_rank", default=16, min=1, max=1024, tooltip=
                    "LoRA rank (capacity and file size). With training_mode full: the rank the fine-tune is exported at "
                    "(higher = closer to the student)."),
                io.Float.Input("lora_alpha", default=16.0, min=0.01, max=1024.0, step=0.01, tooltip=
                    "LoRA alpha (scale = alpha / rank); usually equal to the rank."),
                io.Float.Input("lr_lora", default=1e-4, min=1e-7, max=1e-1, step=1e-6, round=False, tooltip=
                    "Student (LoRA) learning rate (AdamW)."),
                io.Float.Input("lr_disc", default=1e-4, min=1e-7, max=1e-1, step=1e-6, round=False, tooltip=
                    "Discriminator heads' learning rate (AdamW, betas 0/0.999)."),
                io.Float.Input("distill_weight", default=2.5, min=0.0, max=100.0, step=0.1, tooltip=
                    "lambda: weight of the distillation loss against the adversarial loss (paper: 2.5)."),
                io.Combo.Input("discriminator", options=list(DISCRIMINATOR_TYPES), tooltip=
                    "teacher: the frozen teacher UNet's own features (LADD; latent space, no extra file). dinov2: DINOv2 "
                    "ViT-S on decoded images (paper; needs the VAE and dinov2_file)."),
                io.Float.Input("data_cfg", default=7.0, min=1.0, max=30.0, step=0.1, tooltip=
                    "CFG scale of the teacher when it generates training images from the prompts."),
                io.Int.Input("data_steps", default=25, min=1, max=200, tooltip=
                    "Teacher sampling steps per generated training image (DDIM). More = cleaner targets, slower iterations."),
                io.Float.Input("distill_cfg", default=1.0, min=0.0, max=30.0, step=0.1, tooltip=
                    "CFG scale of the teacher's distillation target (1 = no CFG, one teacher pass)."),
                io.Int.Input("save_every", default=500, min=0, max=1_000_000, tooltip=
                    "Save the LoRA and the resumable state every N steps (and at the end and on cancel). A crash loses at "
                    "most N steps. 0 = only at the end."),
                io.Int.Input("preview_every", default=100, min=0, max=1_000_000, tooltip=
                    "Make preview images (fixed seeds, 1-step student) every N steps; 0 = never."),
                # Not named 'seed': the front end gives such widgets a 'randomize after queue' control, and
                # a changed seed cannot resume the run.
                io.Int.Input("training_seed", default=0, min=0, max=2**63 - 1, tooltip=
                    "Seed of the whole run (initialisation, data, noise): the same seed and settings give the same LoRA. "
                    "Fixed: a run resumes only with its seed."),
                io.Boolean.Input("gradient_checkpointing", default=False, tooltip=
                    "Recompute activations in the backward pass: much less memory, ~30% slower. Turn on for SDXL or "
                    "large batches."),
                io.Combo.Input("run_mode", options=list(RUN_MODES), tooltip=
                    "polite: training pauses while ComfyUI runs prompts and continues when the queue is idle. alongside: "
                    "trains while prompts run (both slower)."),
                # optional
                io.Vae.Input("vae", optional=True, tooltip=
                    "Needed for images (encoding) and the dinov2 discriminator; a TinyVAE (TAESD) also decodes the "
                    "previews (otherwise a cheap latent approximation is shown)."),
                io.Image.Input("images", optional=True, tooltip=
                    "Train on these images (encoded with the VAE) instead of teacher-generated ones, or (images_for "
                    "discriminator) give them to the discriminator as real; captions are taken from the prompt lines in "
                    "order (cycled)."),
                io.String.Input("image_folder", default="", optional=True, tooltip=
                    "A folder inside ComfyUI's input/ with images (png/jpg/webp/bmp/tif, natural order) and same-name "
                    "UTF-8 .txt captions (e.g. my_dataset); symbolic links in input/ are followed. Empty = not used."),
                io.String.Input("dinov2_file", default="", optional=True, tooltip=
                    "For discriminator dinov2: DINOv2 ViT-S/14 .safetensors, path relative to ComfyUI's models/ folder."),
                # Added after the others: saved workflows restore widget values by position.
                io.Int.Input("disc_max_timestep", default=999, min=0, max=999, optional=True, tooltip=
                    "Discriminator teacher: the highest noise level t-hat at which the teacher's features of real and "
                    "generated latents are compared (0 to the model's last timestep, 999). 999 = LADD's full range. On "
                    "small data or small models a low value (e.g. 50) is what lets the discriminator tell real from "
                    "generated at all (found in this plugin's digits proof)."),
                io.Combo.Input("disc_norm", options=list(DISC_NORMS), optional=True, tooltip=
                    "Normalisation in the discriminator heads: batch_local (StyleGAN-T's, statistics over small groups of "
                    "the batch) or sample (per-sample GroupNorm: no mixing between samples; steadier at small batches)."),
                io.Combo.Input("lr_schedule", options=list(LR_SCHEDULES), optional=True, tooltip=
                    "Learning rate after the warm-up, for student and discriminator: constant, or cosine (decays to 0 at "
                    "max_steps; raising max_steps on resume stretches the curve)."),
                io.Combo.Input("training_mode", options=list(TRAINING_MODES), optional=True, tooltip=
                    "lora: train low-rank adapters on the shared weights (one consumer GPU; lr_lora). full: fine-tune "
                    "every weight of a copy, as the ADD paper does (lr_full; about 16 bytes per weight more memory: copy, "
                    "gradient, optimiser). Either way the result is a LoRA file: a full run is exported as a LoRA of rank "
                    "lora_rank extracted from student - teacher, with its reconstruction error in the status and the file."),
                io.Float.Input("lr_full", default=1e-6, min=1e-9, max=1e-1, step=1e-7, round=False, optional=True, tooltip=
                    "Student learning rate when training_mode is full (AdamW; the whole network, so far smaller than "
                    "lr_lora)."),
                io.Combo.Input("preset", options=list(PRESET_NAMES), optional=True, tooltip=
                    "A named set of settings that replaces the inputs it names: none (the inputs as set), paper (the ADD "
                    "paper's starting values for SD-class models), small_data (what the plugin's digits proof found for "
                    "small models and little data: learning rates 1e-3, discriminator at low noise and on the input "
                    "convolution too, per-sample head norm, cosine decay, EMA of the student, the noise-paired "
                    "regression with weight 100, distribution matching as the distillation term with weight 25). The "
                    "node's text lists what it set."),
                io.Float.Input("paired_weight", default=0.0, min=0.0, max=1000.0, step=1.0, optional=True, tooltip=
                    "Weight of the noise-paired regression (0 = off, the paper's ADD): the 1-step student, started from "
                    "the noise each teacher-generated training image was sampled from, learns to give that image. On the "
                    "digits proof it made the single step better under both distances, precision, recall and accuracy, and stopped it drifting with longer "
                    "training (weight 100). Needs the teacher's own samples: not with images / image_folder."),
                io.Combo.Input("distill_loss", options=list(DISTILL_LOSSES), optional=True, tooltip=
                    "The distillation term: regression (the paper's: each sample onto the teacher's denoising of it "
                    "re-noised) or dmd (distribution matching, DMD2: a second LoRA learns the student's samples and the "
                    "student moves along teacher minus that; about 1.4x the time per step; on the digits proof, with "
                    "weight 25 beside the noise-paired regression, it made the 2- and 4-step students better under "
                    "both distances, recall and diversity; the small_data preset's)."),
                io.Combo.Input("paired_metric", options=list(PAIRED_METRICS), optional=True, tooltip=
                    "How the noise-paired regression (paired_weight > 0) compares the student's image with the "
                    "teacher's: mse (in latent space; can blur on large models), features (an LPIPS-like distance in "
                    "the selected discriminator's feature network, re-noised to a t-hat up to disc_max_timestep, the "
                    "same noise on both sides; two more feature passes per step; not with discriminator pixel), or "
                    "mse+features (their sum; the small_data preset's, better than mse under every distance on the "
                    "digits proof)."),
                io.Boolean.Input("backward_simulation", default=False, optional=True, tooltip=
                    "DMD2's backward simulation: the student's training inputs below its first timestep come from its "
                    "own earlier steps (as the 2-4 step sampler makes them) instead of a training image re-noised. "
                    "Costs up to (number of student_timesteps - 1) extra student passes per step without a graph; "
                    "no effect with a single student timestep."),
                io.Combo.Input("images_for", options=list(IMAGES_FOR), optional=True, tooltip=
                    "What the images (or image_folder) are for. training: the student learns from them (no noise-paired "
                    "regression). discriminator: the teacher generates the student's training images from the images' "
                    "captions (with the preset's noise-paired regression), and the images are what the discriminator "
                    "learns as real, as in the ADD paper. On the digits proof the discriminator on real digits made the "
                    "2- and 4-step students better under both distances, recall and diversity (a little less precise), "
                    "the single step equal."),
            ],
            outputs=[io.String.Output(display_name="job_id", tooltip="The job's id, for ADD Training Status."),
                     io.String.Output(display_name="lora_name", tooltip=
                         "The LoRA's file name in models/loras (for LoraLoader and ADD Compare).")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # every queue re-checks the run (resume after a cancel, status line)

    @classmethod
    def execute(cls, model, clip, name, prompts, max_steps, batch_size, width, height, student_timesteps, lora_rank,
                lora_alpha, lr_lora, lr_disc, distill_weight, discriminator, data_cfg, data_steps, distill_cfg,
                save_every, preview_every, training_seed, gradient_checkpointing, run_mode, vae=None, images=None,
                image_folder="", dinov2_file="", disc_max_timestep=999, disc_norm="batch_local", lr_schedule="constant",
                training_mode="lora", lr_full=1e-6, preset="none", paired_weight=0.0,
                distill_loss="regression", paired_metric="mse", backward_simulation=False,
                images_for="training") -> io.NodeOutput:
        args = locals_without_self(locals())
        args["seed"] = args.pop("training_seed")
        job = start_training(**args)
        line = f"ADD training '{job.name}': job {job.id}, {job.state}"
        if job.state == "done":
            line += f" ({job.message})"
        elif job.start_step:
            line += f" (resuming at step {job.start_step})"
            if job.message.startswith("resuming from"):  # broken state files were skipped: say which
                line += f"; {job.message}"
        if preset != "none":  # on images: without the pairs (no noise to pair with) and what they came with
            fields = fields_on_run(preset, images=(images is not None or bool(str(image_folder).strip()))
                                   and images_for == "training")
            line += f"\npreset {preset}: " + ", ".join(f"{k} = {v}" for k, v in fields.items())
        return io.NodeOutput(job.id, os.path.basename(job.lora_path), ui={"text": [line]})


def locals_without_self(d: dict) -> dict:
    """A method's ``locals()`` as its keyword arguments (without self / cls)."""
    return {k: v for k, v in d.items() if k not in ("self", "cls", "__class__")}


def _dinov2_path(name: str) -> str:
    """dinov2_file: a file under ComfyUI's models/ folder, typed relative to it."""
    rel = str(name).strip()
    if not rel:
        raise ADDError("discriminator is 'dinov2' but dinov2_file is empty: put DINOv2 ViT-S/14 weights "
                       "(model.safetensors of facebook/dinov2-small) under ComfyUI's models/ folder and type its "
                       "path relative to models/, e.g. dinov2/dinov2_vits14.safetensors; or use discriminator 'teacher'.")
    root = os.path.abspath(folder_paths.models_dir)
    path = files.resolve_inside(root, rel, "dinov2_file", kind="file", example="dinov2/dinov2_vits14.safetensors")
    if not os.path.isfile(path):
        raise ADDError(f"dinov2_file {rel!r}: no such file in {root}. Put the DINOv2 ViT-S/14 .safetensors file there, "
                       "or use discriminator 'teacher' (needs no file).")
    return path


def _node_images(images, image_folder: str, width: int, height: int):
    """-> (the training images or None, the folder's captions or None): the 'images' input, else the
    image_folder's images; ADDError for an empty batch."""
    if images is not None and int(images.shape[0]) == 0:  # an empty batch is a mistake upstream, not "no images"
        raise ADDError(f"images is an empty batch (shape {tuple(images.shape)}): the node connected to 'images' "
                       "produced no image. Fix that node (e.g. its folder, index or length), or disconnect "
                       "'images' to train on images the teacher generates from the prompts.")
    folder_images = folder_captions = None
    if str(image_folder).strip():
        folder_images, folder_captions = load_image_folder(image_folder, int(width), int(height))
    if images is not None:
        return images, None
    return folder_images, folder_captions


def start_training(model, clip, name, prompts, max_steps, batch_size, width, height, student_timesteps, lora_rank,
                   lora_alpha, lr_lora, lr_disc, distill_weight, discriminator, data_cfg, data_steps, distill_cfg,
                   save_every, preview_every, seed, gradient_checkpointing, run_mode, vae=None, images=None,
                   image_folder="", dinov2_file="", disc_max_timestep=999, disc_norm="batch_local",
                   lr_schedule="constant", training_mode="lora", lr_full=1e-6, preset="none", paired_weight=0.0,
                   distill_loss="regression", paired_metric="mse", backward_simulation=False,
                   images_for="training") -> Job:
    """Check the widgets, assemble the run on this (prompt) thread (adapters/run_setup.py), start the
    job; returns it at once."""
    # ---- check everything before anything is built ------------------------------------
    name = check_name(name)
    if run_mode not in RUN_MODES:
        raise ADDError(f"run_mode {run_mode!r}: choose one of {RUN_MODES}.")
    try:
        disc_hi = int(disc_max_timestep)
    except (TypeError, ValueError):
        disc_hi = disc_max_timestep  # refused by request.check, in the user's words
    train = dict(student_timesteps=str(student_timesteps), lora_rank=lora_rank, lora_alpha=lora_alpha,
                 lr_lora=lr_lora, lr_disc=lr_disc, distill_weight=distill_weight, discriminator=discriminator,
                 teacher_cfg_scale=distill_cfg, batch_size=batch_size, seed=seed, max_steps=max_steps,
                 save_every=save_every, preview_every=preview_every, disc_norm=str(disc_norm),
                 lr_schedule=str(lr_schedule), training_mode=str(training_mode), lr_full=lr_full,
                 paired_weight=paired_weight, distill_loss=str(distill_loss), paired_metric=str(paired_metric),
                 backward_simulation=bool(backward_simulation), images_for=str(images_for))
    request = RunRequest(lora_path=os.path.join(folder_paths.get_folder_paths("loras")[0], name + ".safetensors"),
                         prompts=tuple(parse_prompts(prompts)), width=width, height=height, data_cfg=data_cfg,
                         data_steps=data_steps, gradient_checkpointing=bool(gradient_checkpointing), train=train,
                         preset=preset, disc_max_timestep=disc_hi, names=WIDGET_NAMES,
                         dinov2_path=_dinov2_path(dinov2_file) if discriminator == "dinov2" else None)
    # The widgets' ranges, again: an API prompt skips the browser, and NaN passes ComfyUI's min/max.
    request.check(has_images=images is not None or bool(str(image_folder).strip()))
    image_batch, folder_captions = _node_images(images, image_folder, width, height)
    if image_batch is not None and vae is None:
        raise ADDError("images / image_folder need the VAE to encode them: connect the checkpoint's VAE to 'vae'.")
    if request.dinov2_path is not None and vae is None:
        raise ADDError("discriminator 'dinov2' judges decoded images: connect the checkpoint's VAE to 'vae'.")
    plan = run_setup.plan_run(model, request, int(image_batch.shape[0]) if image_batch is not None else None)
    cfg, lora_path = plan.cfg, request.lora_path
    settings = {**cfg.to_dict(), **plan.run_info, "base_fingerprint": plan.fingerprint, "run_mode": run_mode,
                "gradient_checkpointing": bool(gradient_checkpointing)}
    running = REGISTRY.active_for(lora_path)
    if running is not None:  # queued again while it trains: the same job, unless the settings differ
        changed = [describe_change(k, running.settings.get(k), v, then="running") for k, v in settings.items()
                   if running.settings.get(k) != v]
        if changed:
            raise ADDError(
                f"ADD Train: the run {name!r} is training now (job {running.id}, step {running.step}/{running.max_steps}) "
                f"with other settings: {'; '.join(changed)}. A running job keeps its settings: cancel it (ADD Training "
                "panel) and queue again to continue with these, set them back to watch it, or choose a new name.")
        return running
    start_step = check_start(lora_path, cfg, plan.fingerprint, plan.run_info, describe=describe_change)
    prev = existing_run(lora_path)

    # ---- memory, then the run's inputs (prompt thread: ComfyUI's models are not in use elsewhere) --
    device = mm.get_torch_device()
    run_setup.check_memory(model, cfg, width, height, gradient_checkpointing, device)
    spec, decode_preview = run_setup.build_run_spec(model, clip, vae, request, plan, lora_path, device=device,
                                                    images=image_batch, folder_captions=folder_captions)
    job = Job(name=name, max_steps=cfg.max_steps, lora_path=lora_path, state_dir=state_dir_for(lora_path),
              mode=run_mode, step=start_step, start_step=start_step, settings=settings,
              last_checkpoint_step=prev["step"] if prev is not None and prev["checkpoint"] is not None else None)
    if prev is not None and prev["note"]:
        job.message = prev["note"]
    if start_step >= cfg.max_steps:
        job.state, job.message = "done", (f"already trained to step {start_step}; raise max_steps to train further "
                                          "(same name) or choose a new name")
        return REGISTRY.add(job)
    return REGISTRY.start(job, lambda j: _job_body(j, spec, decode_preview))


def _export_line(step, report) -> str:
    """training_mode 'full': the status line of the last LoRA export (rank and reconstruction error)."""
    return f"step {step}: exported the full fine-tune as a {report.summary()}"


def _job_body(job: Job, spec: RunSpec, decode_preview) -> None:
    """Runs on the job's thread: build (resume), train with events, finish."""
    run = ADDRun(spec)
    job.step = job.start_step = run.build()
    job.last_checkpoint_step = run.trainer.saved_step
    note = run.resume_note or (job.message if job.message.startswith("resuming from") else "")
    if note:
        log.warning("ADD training %r: %s", job.name, note)
        job.message = note
        REGISTRY.emit(job, force=True)

    def progress(stats: dict) -> None:
        job.step, job.it_s, job.eta_s = stats["step"], stats["it_s"], stats["eta_s"]
        job.losses = {k: round(float(v), 6) for k, v in stats["logs"].items() if isinstance(v, (int, float))}
        job.add_history(stats["step"], stats["logs"])
        REGISTRY.emit(job)

    def preview(step: int, lat: torch.Tensor) -> None:
        img = decode_preview(lat)
        job.preview_image, job.preview_png, job.preview_step = img, png_bytes(img), step
        REGISTRY.emit(job, force=True)

    def saved(step: int, _path: str) -> None:
        job.last_checkpoint_step = step
        if run.export_report is not None:  # full mode: what the LoRA export kept
            job.message = _export_line(step, run.export_report)
        REGISTRY.emit(job, force=True)

    hooks = RunHooks(progress=progress, preview=preview if spec.preview_shape else None, saved=saved,
                     wait_if_busy=lambda: REGISTRY.wait_if_busy(job))
    try:
        result = run.train(job.stop_event, hooks)
    finally:  # a run that stops with an error reports the step it stopped at
        job.step = run.trainer.step
    job.eta_s = 0.0 if not result.stopped else None
    # (job.message may have been replaced by a polite pause since the last save)
    export = f"; {_export_line(run.trainer.saved_step, run.export_report)}" if run.export_report is not None else ""
    if result.stopped:
        job.state, job.message = "cancelled", (f"cancelled at step {result.step}; saved; queue the same name to resume"
                                               + export)
    else:
        job.state, job.message = "done", (f"done: {os.path.basename(spec.lora_path)} trained to step {result.step}"
                                          + (f" ({note})" if note else "") + export)


# --------------------------------------------------------------------------------------------
# ADD Training Status
# --------------------------------------------------------------------------------------------
def status_text(job: Job) -> str:
    def fmt_eta(s):
        if s is None:
            return "-"
        s = int(s)
        return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
    losses = ", ".join(f"{k} {job.losses[k]:.4g}" for k in ("d_loss", "g_loss", "adv", "distill") if k in job.losses)
    lines = [f"{job.name} [{job.id}]: {job.state}, step {job.step}/{job.max_steps}",
             f"losses: {losses or '-'}",
             f"speed: {job.it_s:.3g} it/s, ETA {fmt_eta(job.eta_s)}" if job.it_s else "speed: -",
             f"LoRA: {job.lora_path} (" + (f"last saved at step {job.last_checkpoint_step})"
                                           if job.last_checkpoint_step is not None else "not saved yet)")]
    if job.message:
        lines.append(job.message)
    if job.error:
        lines.append(f"error: {job.error}")
    return "\n".join(lines)


class ADDTrainingStatus(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADDTrainingStatus", display_name="ADD Training Status", category=CATEGORY,
            description="State of an ADD training job: step, losses, speed, ETA, LoRA path, and its latest preview.",
            inputs=[io.String.Input("job_id", default="",
                                    tooltip="The job id ADD Train returns (connect its job_id output).")],
            outputs=[io.String.Output(display_name="status", tooltip="Status text."),
                     io.Image.Output(display_name="preview", tooltip=
                         "The latest preview (1-step student, fixed seeds); black until the first one.")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")

    @classmethod
    def execute(cls, job_id) -> io.NodeOutput:
        job = REGISTRY.get(str(job_id).strip())
        if job is None:
            raise ADDError(f"job_id {str(job_id)[:40]!r}: no ADD training job with this id in this ComfyUI session (jobs "
                             "live until ComfyUI restarts). Connect ADD Train's job_id output; to continue a run after a "
                             "restart, queue ADD Train with the same name.")
        img = job.preview_image if job.preview_image is not None else torch.zeros(1, 64, 64, 3)
        text = status_text(job)
        return io.NodeOutput(text, img, ui={"text": [text]})


NODES = [ADDTrain, ADDTrainingStatus]

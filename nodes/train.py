"""ADD training nodes: ADD Train (background), ADD Training Status, ADD Compare (teacher vs student).

The node validates every input on the prompt thread, builds the run's inputs there (its own frozen
copy of the base weights, the prompts encoded once, image latents), hands a job to the registry
(nodes/jobs.py) and returns at once. The run itself is training/run.py; ComfyUI-specific pieces
are in nodes/train_adapter.py.
"""
from __future__ import annotations

import hashlib
import json
import math
import logging
import os
import re
import time

import torch

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
import latent_preview

from ..training.config import ADDConfig, DISC_NORMS, DISCRIMINATOR_TYPES, LR_SCHEDULES, TRAINING_MODES
from ..training.data import SyntheticTeacherData, LatentDataset
from ..training.presets import PRESET_NAMES, apply_preset, preset_fields
from ..core import files
from ..core.errors import ADDError
from ..training import image_folder as image_files
from ..training.inputs import check_run_inputs, memory_error
from ..training.run import STATE_SUFFIX, ADDRun, RunHooks, RunSpec, check_start, existing_run, state_dir_for
from ..training.schedule import DiscreteSchedule
from . import train_adapter as adapter
from .jobs import REGISTRY, Job, png_bytes
from .sampling import add_sample, build_sigmas

log = logging.getLogger("comfyui-add")
CATEGORY = "ADD/training"
RUN_MODES = ("polite", "alongside")
# ADDConfig fields whose widget has another name (for messages)
_WIDGET_OF_FIELD = {"seed": "training_seed", "teacher_cfg_scale": "distill_cfg", "disc_timestep_range": "disc_max_timestep",
                    "num_train_timesteps": "the model's schedule length",
                    "teacher_timestep_range": "the model's schedule (distillation timesteps)"}
_DEFAULT_PROMPTS = ("a photograph of a red fox in a snowy forest, golden hour\n"
                    "a bowl of ramen on a wooden table, studio lighting\n"
                    "a watercolor painting of a lighthouse on a cliff\n"
                    "portrait of an old sailor with a grey beard, dramatic light\n"
                    "a futuristic city skyline at night, neon reflections")


# --------------------------------------------------------------------------------------------
# validation helpers (each error names the input and says how to fix it)
# --------------------------------------------------------------------------------------------
def parse_timesteps(text: str, t_max: int = 999) -> tuple[int, ...]:
    """'999,749,499,249' -> (999, 749, 499, 249); ValueError naming the input otherwise."""
    parts = [p.strip() for p in str(text).replace(";", ",").split(",") if p.strip()]
    try:
        ts = tuple(int(p) for p in parts)
    except ValueError:
        ts = ()
    if not ts or len(ts) > 8 or len(set(ts)) != len(ts) or any(not 0 <= t <= t_max for t in ts):
        raise ADDError(f"student_timesteps {str(text)[:60]!r} is not valid: type 1-8 distinct whole numbers from 0 to "
                         f"{t_max}, separated by commas, e.g. 999,749,499,249 (the ADD paper's 4 steps) or 999 (1 step).")
    return tuple(sorted(ts, reverse=True))


def _shown(name: str, value) -> str:
    if name == "disc_timestep_range" and isinstance(value, (list, tuple)) and value:
        return repr(value[-1])  # the widget sets only the upper end
    if name == "student_timesteps" and isinstance(value, (list, tuple)):
        return repr(",".join(map(str, value)))
    return repr(value)


def describe_change(name: str, old, new, then: str = "saved") -> str:
    """One changed setting in the node's words: 'distill_cfg: saved 1.0, now 2.0' (widget names, not
    ADDConfig fields; disc_max_timestep shows the upper end it sets)."""
    return f"{_WIDGET_OF_FIELD.get(name, name)}: {then} {_shown(name, old)}, now {_shown(name, new)}"


def config_error(exc: ValueError) -> ADDError:
    """ADDConfig's 'ADDConfig.teacher_cfg_scale=nan is invalid: expected ...' in the node's words."""
    text = str(exc)
    m = re.match(r"ADDConfig\.(\w+)=(.*?) is invalid: expected (.*?)\.?$", text, re.S)
    if m is None:
        return ADDError(f"ADD Train: {text}")
    name, value, expected = m.groups()
    if name == "disc_timestep_range":
        return ADDError(f"disc_max_timestep is {value}: type a whole number from 0 to the model's last timestep.")
    return ADDError(f"ADD Train: {_WIDGET_OF_FIELD.get(name, name)} is {value}: expected {expected}.")


def run_summary(width: int, height: int, prompt_list: list[str], data_cfg: float, data_steps: int,
                n_images: int | None = None) -> dict:
    """What run.json records of a run's data, and what a resume must match (training.run.RUN_INFO_COMPARED):
    size, and the prompts (count and hash), data_cfg and data_steps of teacher data, or the image count."""
    info = {"width": int(width), "height": int(height)}
    if n_images is not None:
        return {**info, "data": "images", "images": int(n_images)}
    texts = sorted(set(prompt_list))
    digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()[:16]
    return {**info, "data": "teacher", "prompts": len(texts), "prompts_sha256": digest, "data_cfg": float(data_cfg),
            "data_steps": int(data_steps)}


def parse_prompts(text: str) -> list[str]:
    """One prompt per non-empty line (lines starting with '#' are comments)."""
    return [ln.strip() for ln in str(text).splitlines() if ln.strip() and not ln.strip().startswith("#")]


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
    return image_files.read_captioned_folder(path, width, height, label,
                                             available=adapter.free_memory_bytes(torch.device("cpu")))


def read_image_folder(path: str, width: int, height: int, label: str) -> tuple[torch.Tensor, list[str]]:
    """Images of folder ``path`` anywhere (the headless trainer's image_folder); ``label`` names the input."""
    return image_files.read_captioned_folder(path, width, height, label,
                                             available=adapter.free_memory_bytes(torch.device("cpu")))


def _fit_images(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """IMAGE (N, H, W, 3) -> centre-cropped and resized to (N, height, width, 3)."""
    x = images.movedim(-1, 1)
    x = comfy.utils.common_upscale(x, width, height, "bilinear", "center")
    return x.movedim(1, -1)


def _dinov2_path(name: str) -> str:
    rel = str(name).strip()
    if not rel:
        raise ADDError("discriminator is 'dinov2' but dinov2_file is empty: put DINOv2 ViT-S/14 weights "
                         "(model.safetensors of facebook/dinov2-small) under ComfyUI's models/ folder and type its "
                         "path relative to models/, e.g. dinov2/dinov2_vits14.safetensors; or use discriminator 'teacher'.")
    root = os.path.abspath(folder_paths.models_dir)
    if "\0" in rel or any(ord(ch) < 32 for ch in rel):
        raise ADDError(f"dinov2_file {rel!r} contains a NUL or control character: type the file's path relative to "
                             f"{root}, e.g. dinov2/dinov2_vits14.safetensors.")
    path = os.path.normpath(os.path.join(root, rel.replace("\\", "/")))
    if not image_files.inside(root, path) or path == root:
        raise ADDError(f"dinov2_file {rel!r} must be a path relative to {root} without '..'.")
    if not os.path.isfile(path):
        raise ADDError(f"dinov2_file {rel!r}: no such file in {root}. Put the DINOv2 ViT-S/14 .safetensors file there, "
                         "or use discriminator 'teacher' (needs no file).")
    return path


def _latent_to_rgb(model, latents: torch.Tensor) -> torch.Tensor:
    """Cheap preview without a VAE: ComfyUI's latent->RGB factors, x8 nearest -> (P, H, W, 3)."""
    fmt = model.get_model_object("latent_format")
    factors = getattr(fmt, "latent_rgb_factors", None)
    lat = latents.float().cpu()
    if factors is None:
        rgb = lat[:, :3].movedim(1, -1) * 0.5
    else:
        rgb = lat.movedim(1, -1) @ torch.tensor(factors, dtype=torch.float32)
        bias = getattr(fmt, "latent_rgb_factors_bias", None)
        if bias is not None:
            rgb = rgb + torch.tensor(bias, dtype=torch.float32)
    rgb = ((rgb + 1.0) / 2.0).clamp(0, 1)
    return rgb.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)


def _private_taesd(vae, device):
    """A private fp32 copy of a TAESD-based VAE's model (small), or None for other VAEs."""
    from comfy.taesd.taesd import TAESD

    if vae is None or not isinstance(getattr(vae, "first_stage_model", None), TAESD):
        return None
    import copy
    with torch.inference_mode(False):
        return adapter.plain_torch_modules_(copy.deepcopy(vae.first_stage_model).float().to(device).eval()
                                            .requires_grad_(False))


# --------------------------------------------------------------------------------------------
# ADD Train (background)
# --------------------------------------------------------------------------------------------
def _tip(text: str, **kw) -> dict:
    return {"tooltip": text, **kw}


class ADDTrain:
    DESCRIPTION = ("Distils the connected checkpoint into a 1-4 step ADD LoRA (Adversarial Diffusion Distillation), in "
                   "the background: the prompt returns at once with a job id while training continues; keep generating "
                   "meanwhile. No dataset needed: the teacher makes its own training images from the prompt list. "
                   "The LoRA is saved to models/loras/<name>.safetensors every save_every steps; queue the same name "
                   "again to resume. Progress, losses and previews are in the ADD Training sidebar tab.")
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("job_id", "lora_name")
    OUTPUT_TOOLTIPS = ("The job's id, for ADD Training Status.", "The LoRA's file name in models/loras (for LoraLoader "
                       "and ADD Compare).")
    FUNCTION = "start"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", _tip("The checkpoint to distil: teacher and the student's base (SD1.x, SD2.x, SDXL).")),
            "clip": ("CLIP", _tip("The checkpoint's CLIP, to encode the prompts (once, before training starts).")),
            "name": ("STRING", _tip("The run's name, not a file prefix: the LoRA is models/loras/<name>.safetensors "
                                    "(never numbered), its resumable state <name>.add-state/ beside it. Queueing again "
                                    "with the same name continues that run: it reports the job while it trains, resumes "
                                    "after a Cancel or a restart, and says 'done' once max_steps is reached (raise "
                                    "max_steps to train on). Only max_steps, save_every and preview_every may change on "
                                    "resume; other changes are refused with a message. A new name starts a new run.", default="my_turbo_lora")),
            "prompts": ("STRING", _tip("One prompt per line. Without images, the teacher generates the training images "
                                       "from these (LADD: no dataset needed); with images, a caption for images that "
                                       "have none.", default=_DEFAULT_PROMPTS, multiline=True)),
            "max_steps": ("INT", _tip("Training iterations (one discriminator + one student update each). Can be "
                                      "raised on resume.", default=2000, min=1, max=1_000_000)),
            "batch_size": ("INT", _tip("Samples per iteration. >= 4 recommended (hinge loss collapses at batch 1).",
                                       default=4, min=1, max=256)),
            "width": ("INT", _tip("Training image width in pixels (multiple of 8; 512 for SD1.5/2.x, 1024 for SDXL).",
                                  default=512, min=64, max=4096, step=8)),
            "height": ("INT", _tip("Training image height in pixels (multiple of 8).", default=512, min=64, max=4096,
                                   step=8)),
            "student_timesteps": ("STRING", _tip("Timesteps the student learns to denoise from in one step; sample the "
                                                 "trained LoRA with the same ones (ADD Scheduler 'custom'). Default: the "
                                                 "paper's 4 steps.", default="999,749,499,249")),
            "lora_rank": ("INT", _tip("LoRA rank (capacity and file size). With training_mode full: the rank the "
                                      "fine-tune is exported at (higher = closer to the student).", default=16,
                                      min=1, max=1024)),
            "lora_alpha": ("FLOAT", _tip("LoRA alpha (scale = alpha / rank); usually equal to the rank.", default=16.0,
                                         min=0.01, max=1024.0, step=0.01)),
            "lr_lora": ("FLOAT", _tip("Student (LoRA) learning rate (AdamW).", default=1e-4, min=1e-7, max=1e-1,
                                      step=1e-6, round=False)),
            "lr_disc": ("FLOAT", _tip("Discriminator heads' learning rate (AdamW, betas 0/0.999).", default=1e-4,
                                      min=1e-7, max=1e-1, step=1e-6, round=False)),
            "distill_weight": ("FLOAT", _tip("lambda: weight of the distillation loss against the adversarial loss "
                                             "(paper: 2.5).", default=2.5, min=0.0, max=100.0, step=0.1)),
            "discriminator": (list(DISCRIMINATOR_TYPES), _tip("teacher: the frozen teacher UNet's own features (LADD; "
                                                              "latent space, no extra file). dinov2: DINOv2 ViT-S on "
                                                              "decoded images (paper; needs the VAE and dinov2_file).")),
            "data_cfg": ("FLOAT", _tip("CFG scale of the teacher when it generates training images from the prompts.",
                                       default=7.0, min=1.0, max=30.0, step=0.1)),
            "data_steps": ("INT", _tip("Teacher sampling steps per generated training image (DDIM). More = cleaner "
                                       "targets, slower iterations.", default=25, min=1, max=200)),
            "distill_cfg": ("FLOAT", _tip("CFG scale of the teacher's distillation target (1 = no CFG, one teacher "
                                          "pass).", default=1.0, min=0.0, max=30.0, step=0.1)),
            "save_every": ("INT", _tip("Save the LoRA and the resumable state every N steps (and at the end and on "
                                       "cancel). A crash loses at most N steps. 0 = only at the end.", default=500,
                                       min=0, max=1_000_000)),
            "preview_every": ("INT", _tip("Make preview images (fixed seeds, 1-step student) every N steps; 0 = never.",
                                          default=100, min=0, max=1_000_000)),
            # Not named 'seed': the front end gives such widgets a 'randomize after queue' control, and
            # a changed seed cannot resume the run.
            "training_seed": ("INT", _tip("Seed of the whole run (initialisation, data, noise): the same seed and "
                                          "settings give the same LoRA. Fixed: a run resumes only with its seed.",
                                          default=0, min=0, max=2**63 - 1)),
            "gradient_checkpointing": ("BOOLEAN", _tip("Recompute activations in the backward pass: much less memory, "
                                                       "~30% slower. Turn on for SDXL or large batches.", default=False)),
            "run_mode": (list(RUN_MODES), _tip("polite: training pauses while ComfyUI runs prompts and continues when "
                                               "the queue is idle. alongside: trains while prompts run (both slower).")),
        }, "optional": {
            "vae": ("VAE", _tip("Needed for images (encoding) and the dinov2 discriminator; a TinyVAE (TAESD) also "
                                "decodes the previews (otherwise a cheap latent approximation is shown).")),
            "images": ("IMAGE", _tip("Train on these images (encoded with the VAE) instead of teacher-generated ones; "
                                     "captions are taken from the prompt lines in order (cycled).")),
            "image_folder": ("STRING", _tip("A folder inside ComfyUI's input/ with images (png/jpg/webp/bmp/tif, "
                                            "natural order) and same-name UTF-8 .txt captions (e.g. my_dataset); "
                                            "symbolic links in input/ are followed. Empty = not used.", default="")),
            "dinov2_file": ("STRING", _tip("For discriminator dinov2: DINOv2 ViT-S/14 .safetensors, path relative to "
                                           "ComfyUI's models/ folder.", default="")),
            # Added after the others: saved workflows restore widget values by position.
            "disc_max_timestep": ("INT", _tip("Discriminator teacher: the highest noise level t-hat at which the teacher's "
                                              "features of real and generated latents are compared (0 to the model's "
                                              "last timestep, 999). 999 = LADD's full range. On small data or small "
                                              "models a low value (e.g. 50) is what lets the discriminator tell real "
                                              "from generated at all (found in this plugin's digits proof).",
                                              default=999, min=0, max=999)),
            "disc_norm": (list(DISC_NORMS), _tip("Normalisation in the discriminator heads: batch_local (StyleGAN-T's, "
                                                 "statistics over small groups of the batch) or sample (per-sample "
                                                 "GroupNorm: no mixing between samples; steadier at small batches).")),
            "lr_schedule": (list(LR_SCHEDULES), _tip("Learning rate after the warm-up, for student and discriminator: "
                                                     "constant, or cosine (decays to 0 at max_steps; raising max_steps "
                                                     "on resume stretches the curve).")),
            "training_mode": (list(TRAINING_MODES), _tip("lora: train low-rank adapters on the shared weights (one "
                                                         "consumer GPU; lr_lora). full: fine-tune every weight of a "
                                                         "copy, as the ADD paper does (lr_full; about 16 bytes per "
                                                         "weight more memory: copy, gradient, optimiser). Either way "
                                                         "the result is a LoRA file: a full run is exported as a LoRA "
                                                         "of rank lora_rank extracted from student - teacher, with its "
                                                         "reconstruction error in the status and the file.")),
            "lr_full": ("FLOAT", _tip("Student learning rate when training_mode is full (AdamW; the whole network, "
                                      "so far smaller than lr_lora).", default=1e-6, min=1e-9, max=1e-1, step=1e-7,
                                      round=False)),
            "preset": (list(PRESET_NAMES), _tip("A named set of settings that replaces the inputs it names: none (the "
                                                "inputs as set), paper (the ADD paper's starting values for SD-class "
                                                "models), small_data (what the plugin's digits proof found for small "
                                                "models and little data: learning rates 1e-3, discriminator at low "
                                                "noise and on the input convolution too, per-sample head norm, cosine "
                                                "decay, EMA of the student). The node's text lists what it set.")),
        }}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # every queue re-checks the run (resume after a cancel, status line)

    def start(self, model, clip, name, prompts, max_steps, batch_size, width, height, student_timesteps, lora_rank,
              lora_alpha, lr_lora, lr_disc, distill_weight, discriminator, data_cfg, data_steps, distill_cfg,
              save_every, preview_every, training_seed, gradient_checkpointing, run_mode, vae=None, images=None,
              image_folder="", dinov2_file="", disc_max_timestep=999, disc_norm="batch_local", lr_schedule="constant",
              training_mode="lora", lr_full=1e-6, preset="none"):
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
        if preset != "none":
            line += f"\npreset {preset}: " + ", ".join(f"{k} = {v}" for k, v in preset_fields(preset).items())
        return {"ui": {"text": [line]}, "result": (job.id, os.path.basename(job.lora_path))}


def locals_without_self(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("self", "__class__")}


def config_for_model(t_max: int, **fields) -> ADDConfig:
    """ADDConfig for a model whose schedule has ``t_max + 1`` timesteps: the schedule-derived fields
    (length, teacher and discriminator timestep ranges) from the model, the rest from ``fields`` or
    ADDConfig's defaults. The node and the headless trainer both build their config here, so equal
    settings give equal configs and either can resume the other's run."""
    base = {"num_train_timesteps": t_max + 1, "teacher_timestep_range": (1, t_max), "disc_timestep_range": (0, t_max)}
    base.update(fields)
    return ADDConfig(**base)


def start_training(model, clip, name, prompts, max_steps, batch_size, width, height, student_timesteps, lora_rank,
                   lora_alpha, lr_lora, lr_disc, distill_weight, discriminator, data_cfg, data_steps, distill_cfg,
                   save_every, preview_every, seed, gradient_checkpointing, run_mode, vae=None, images=None,
                   image_folder="", dinov2_file="", disc_max_timestep=999, disc_norm="batch_local",
                   lr_schedule="constant", training_mode="lora", lr_full=1e-6, preset="none") -> Job:
    """Validate, build the run's inputs on this (prompt) thread, start the job; returns it at once."""
    # ---- validate everything before anything is built --------------------------------
    name = check_name(name)
    family = adapter.check_trainable(model)
    # The widgets' ranges, again: an API prompt skips the browser, and NaN passes ComfyUI's min/max.
    check_run_inputs({"width": width, "height": height, "batch_size": batch_size, "data_cfg": data_cfg,
                      "data_steps": data_steps, "teacher_cfg_scale": distill_cfg, "lora_rank": lora_rank,
                      "lora_alpha": lora_alpha, "lr_lora": lr_lora, "lr_disc": lr_disc, "distill_weight": distill_weight,
                      "max_steps": max_steps, "save_every": save_every, "preview_every": preview_every},
                     names=_WIDGET_OF_FIELD)
    if run_mode not in RUN_MODES:
        raise ADDError(f"run_mode {run_mode!r}: choose one of {RUN_MODES}.")
    t_max = len(adapter.schedule_sigmas(model)) - 1
    timesteps = parse_timesteps(student_timesteps, t_max)
    try:
        disc_hi = int(disc_max_timestep)
    except (TypeError, ValueError):
        disc_hi = -1
    if not 0 <= disc_hi <= 999:
        raise ADDError(f"disc_max_timestep is {disc_max_timestep!r}: type a whole number from 0 to 999 (999 = the "
                             "full range; 50 for small data).")
    disc_hi = min(disc_hi, t_max)
    prompt_list = parse_prompts(prompts)
    folder_images, folder_captions = (None, [])
    if str(image_folder).strip():
        folder_images, folder_captions = load_image_folder(image_folder, int(width), int(height))
    if images is not None and int(images.shape[0]) == 0:  # an empty batch is a mistake upstream, not "no images"
        raise ADDError(f"images is an empty batch (shape {tuple(images.shape)}): the node connected to 'images' "
                             "produced no image. Fix that node (e.g. its folder, index or length), or disconnect "
                             "'images' to train on images the teacher generates from the prompts.")
    if not prompt_list and images is None and folder_images is None:
        raise ADDError("prompts is empty and no images are connected: type at least one prompt per line (the teacher "
                         "then generates the training images), or connect images / set image_folder.")
    if (images is not None or folder_images is not None) and vae is None:
        raise ADDError("images / image_folder need the VAE to encode them: connect the checkpoint's VAE to 'vae'.")
    dino_path = _dinov2_path(dinov2_file) if discriminator == "dinov2" else None
    if dino_path is not None and vae is None:
        raise ADDError("discriminator 'dinov2' judges decoded images: connect the checkpoint's VAE to 'vae'.")
    if preset not in PRESET_NAMES:
        raise ADDError(f"preset {preset!r}: choose one of {PRESET_NAMES}.")
    fields = dict(student_timesteps=timesteps, lora_rank=int(lora_rank), lora_alpha=float(lora_alpha),
                  lr_lora=float(lr_lora), lr_disc=float(lr_disc), distill_weight=float(distill_weight),
                  discriminator=discriminator, teacher_cfg_scale=float(distill_cfg), batch_size=int(batch_size),
                  seed=int(seed), max_steps=int(max_steps), save_every=int(save_every),
                  preview_every=int(preview_every), disc_timestep_range=(0, disc_hi), disc_norm=str(disc_norm),
                  lr_schedule=str(lr_schedule), training_mode=str(training_mode), lr_full=float(lr_full))
    fields, _ = apply_preset(preset, fields, t_max=t_max)
    try:
        cfg = config_for_model(t_max, **fields)
    except ValueError as exc:  # name the input, not ADDConfig's field
        raise config_error(exc) from None
    lora_dir = folder_paths.get_folder_paths("loras")[0]
    lora_path = os.path.join(lora_dir, name + ".safetensors")
    n_images = (int(images.shape[0]) if images is not None
                else int(folder_images.shape[0]) if folder_images is not None else None)
    run_info = run_summary(width, height, prompt_list, data_cfg, data_steps, n_images)
    fingerprint = adapter.base_fingerprint(model)
    settings = {**cfg.to_dict(), **run_info, "base_fingerprint": fingerprint, "run_mode": run_mode,
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
    start_step = check_start(lora_path, cfg, fingerprint, run_info, describe=describe_change)
    prev = existing_run(lora_path)

    # ---- memory check ------------------------------------------------------------------
    device = mm.get_torch_device()
    check_memory(model, cfg, width, height, gradient_checkpointing, device)

    # ---- build the run's inputs (prompt thread: ComfyUI's models are not in use elsewhere) --
    spec, decode_preview = build_run_spec(
        model, clip, vae, cfg, lora_path, family=family, fingerprint=fingerprint, prompt_list=prompt_list,
        width=width, height=height, data_cfg=data_cfg, data_steps=data_steps,
        gradient_checkpointing=gradient_checkpointing, images=images, folder_images=folder_images,
        folder_captions=folder_captions, dino_path=dino_path, device=device)
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


def check_memory(model, cfg: ADDConfig, width: int, height: int, gradient_checkpointing: bool, device) -> None:
    """ADDError with the numbers when the run would not fit the device's free memory (node and headless)."""
    lat_hw = (int(height) // 8, int(width) // 8)
    need = adapter.estimate_memory(model.model, cfg.batch_size, lat_hw, cfg.lora_rank, bool(gradient_checkpointing),
                                   cfg.training_mode, cfg.ema_decay is not None)
    # Free device memory plus what the input model occupies there (ComfyUI can offload it).
    free = adapter.free_memory_bytes(device) + (model.loaded_size() if device.type != "cpu" else 0)
    if need["total"] > free:
        raise memory_error(need, free, str(device), training_mode=cfg.training_mode)


def build_run_spec(model, clip, vae, cfg: ADDConfig, lora_path: str, *, family: str, fingerprint: str,
                   prompt_list: list[str], width: int, height: int, data_cfg: float, data_steps: int,
                   gradient_checkpointing: bool, images=None, folder_images=None, folder_captions=(),
                   dino_path: str | None = None, device: torch.device):
    """The run's inputs from ComfyUI objects -> (RunSpec, decode_preview(latents) -> IMAGE).

    The one place a run is assembled: the ADD Train node and the headless trainer
    (``python -m ...scripts.train_add``) both call it, so they train the same way and write the
    same files, and either can resume the other's run. Inputs are already validated.
    """
    lat_hw = (int(height) // 8, int(width) // 8)
    network = adapter.frozen_copy(model, device)
    c = adapter.latent_channels(model)
    captions = prompt_list
    image_batch = images if images is not None else folder_images
    if image_batch is not None:
        if folder_images is not None and images is None:
            fallback = prompt_list[0] if prompt_list else ""
            captions = [c_ or fallback for c_ in folder_captions]
        else:
            base = prompt_list or [""]
            captions = [base[i % len(base)] for i in range(int(image_batch.shape[0]))]
    bank = adapter.PromptBank(clip, sorted(set(captions)) if captions else [""], network, int(width), int(height))
    schedule = DiscreteSchedule(adapter.schedule_sigmas(model))

    if image_batch is not None:
        pixels = _fit_images(image_batch, int(width), int(height))
        with torch.no_grad():
            lat = vae.encode(pixels[..., :3])
        with torch.inference_mode(False):  # ordinary tensors, no graph: the data is a constant
            lat = model.model.process_latent_in(lat.detach().float().cpu().clone()).to(device)
        cond, pooled = bank.encode(captions, device)
        uncond = bank.uncond_on(device)

        def data_factory(_teacher):
            return LatentDataset(lat, cond=cond, pooled=pooled, uncond=uncond)
    else:
        def data_factory(teacher):
            return SyntheticTeacherData(teacher, bank.prompts, lambda ps: bank.encode(ps, device), (c, *lat_hw),
                                        schedule, steps=int(data_steps), cfg_scale=float(data_cfg),
                                        uncond=bank.uncond_on(device), device=device)

    feature_fn = None
    decoder = _private_taesd(vae, device)
    if dino_path is not None:
        feature_fn = _dinov2_features(dino_path, vae, network, device)
    n_prev = min(4, len(bank.prompts))
    preview_cond, _ = bank.rows(range(n_prev), device)
    spec = RunSpec(
        cfg=cfg, network=network, denoise=adapter.comfy_denoise, data=None, data_factory=data_factory,
        schedule=schedule, lora_path=lora_path, device=device,
        feature_modules=adapter.feature_modules(network, cfg.disc_features) if feature_fn is None else None, feature_fn=feature_fn,
        target_modules=adapter.lora_targets(network),
        checkpoint_modules=adapter.checkpoint_modules(network) if gradient_checkpointing else (),
        c_dim=bank.c_dim, lora_prefix="", full_copy=adapter.trainable_copy,
        base_info={"base_model": f"{family} ({type(model.model.model_config).__name__})",
                   "base_fingerprint": fingerprint},
        run_info=run_summary(width, height, prompt_list, data_cfg, data_steps,
                             int(image_batch.shape[0]) if image_batch is not None else None),
        preview_cond=preview_cond, preview_shape=(n_prev, c, *lat_hw))

    def decode_preview(lat: torch.Tensor) -> torch.Tensor:
        if decoder is None:
            return _latent_to_rgb(model, lat)
        with torch.no_grad():
            img = decoder.decode(network.process_latent_out(lat.to(device)))
        return ((img.float() + 1.0) / 2.0).clamp(0, 1).movedim(1, -1).cpu()
    return spec, decode_preview


def _dinov2_features(path, vae, network, device):
    """The paper's discriminator features: a frozen fp32 copy of the VAE decoder (differentiable)
    feeding DINOv2 ViT-S/14 from a local file."""
    import copy

    from ..training.discriminator import DinoV2Features, load_dinov2

    dino = load_dinov2(path).to(device)
    with torch.inference_mode(False):
        dec = adapter.plain_torch_modules_(copy.deepcopy(vae.first_stage_model).float().to(device).eval()
                                           .requires_grad_(False))

    def decode(x0):
        img = dec.decode(network.process_latent_out(x0).float())
        return ((img + 1.0) / 2.0).clamp(0, 1)
    return DinoV2Features(dino, decode)


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


class ADDTrainingStatus:
    DESCRIPTION = "State of an ADD training job: step, losses, speed, ETA, LoRA path, and its latest preview."
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("status", "preview")
    OUTPUT_TOOLTIPS = ("Status text.", "The latest preview (1-step student, fixed seeds); black until the first one.")
    FUNCTION = "status"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"job_id": ("STRING", _tip("The job id ADD Train returns (connect its job_id output).",
                                                       default=""))}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def status(self, job_id):
        job = REGISTRY.get(str(job_id).strip())
        if job is None:
            raise ADDError(f"job_id {str(job_id)[:40]!r}: no ADD training job with this id in this ComfyUI session (jobs "
                             "live until ComfyUI restarts). Connect ADD Train's job_id output; to continue a run after a "
                             "restart, queue ADD Train with the same name.")
        img = job.preview_image if job.preview_image is not None else torch.zeros(1, 64, 64, 3)
        text = status_text(job)
        return {"ui": {"text": [text]}, "result": (text, img)}


# --------------------------------------------------------------------------------------------
# ADD Compare (teacher vs student)
# --------------------------------------------------------------------------------------------
def _count_evals(model):
    """A clone of ``model`` counting UNet sample-evaluations (batch entries) in ``counter[0]``."""
    counter = [0]
    m = model.clone()
    prev = m.model_options.get("model_function_wrapper")

    def wrapper(apply_model, args):
        counter[0] += int(args["input"].shape[0])
        return prev(apply_model, args) if prev is not None else apply_model(args["input"], args["timestep"], **args["c"])
    m.set_model_unet_function_wrapper(wrapper)
    return m, counter


def pick_timesteps(trained: list[int], steps: int) -> list[int]:
    """``steps`` of the trained timesteps, evenly spread from the noisiest (4 of 999,749,499,249 = all; 2 -> 999,499)."""
    trained = sorted(trained, reverse=True)
    steps = max(1, min(steps, len(trained)))
    return [trained[round(i * len(trained) / steps)] for i in range(steps)]


def _label_grid(rows: list[list[torch.Tensor]], headers: list[str]) -> torch.Tensor:
    """Images (H, W, 3) in rows, a header line above each column -> one IMAGE (1, H', W', 3)."""
    from PIL import Image, ImageDraw

    h, w = rows[0][0].shape[:2]
    pad = 28
    canvas = Image.new("RGB", (w * len(headers), pad + h * len(rows)), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(headers):
        draw.text((j * w + 4, 4), text, fill=(235, 235, 235))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            canvas.paste(Image.fromarray(arr), (j * w, pad + i * h))
    out = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).reshape(canvas.height, canvas.width, 3)
    return (out.float() / 255.0)[None]


class ADDCompare:
    DESCRIPTION = ("Teacher vs ADD student on the same prompts and seeds: the base model at N steps with CFG against the "
                   "model with the trained LoRA at 1-4 steps without CFG; a grid labelled with measured seconds and model "
                   "evaluations per image.")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("grid",)
    OUTPUT_TOOLTIPS = ("Rows = prompts; columns = teacher, student.",)
    FUNCTION = "compare"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", _tip("The base model (teacher).")),
            "clip": ("CLIP", _tip("The base model's CLIP.")),
            "vae": ("VAE", _tip("Decodes both columns (a TinyVAE is fine).")),
            "lora_name": ("STRING", _tip("The trained LoRA's file name in models/loras (connect ADD Train's lora_name).",
                                         default="my_turbo_lora.safetensors")),
            "prompts": ("STRING", _tip("One prompt per line (a row each).", multiline=True,
                                       default="a photograph of a red fox in a snowy forest, golden hour")),
            "seed": ("INT", _tip("Noise seed, the same for both.", default=0, min=0, max=0xffffffffffffffff,
                                 control_after_generate=True)),
            "teacher_steps": ("INT", _tip("Teacher sampling steps.", default=25, min=1, max=200)),
            "teacher_cfg": ("FLOAT", _tip("Teacher CFG scale.", default=7.0, min=1.0, max=30.0, step=0.1)),
            "teacher_sampler": (comfy.samplers.KSampler.SAMPLERS, _tip("Teacher sampler.", default="euler")),
            "student_steps": ("INT", _tip("Student steps (1-4), taken from the timesteps it was trained on.",
                                          default=1, min=1, max=4)),
            "width": ("INT", _tip("Image width (multiple of 8).", default=512, min=64, max=4096, step=8)),
            "height": ("INT", _tip("Image height (multiple of 8).", default=512, min=64, max=4096, step=8)),
        }}

    def compare(self, model, clip, vae, lora_name, prompts, seed, teacher_steps, teacher_cfg, teacher_sampler,
                student_steps, width, height):
        prompt_list = parse_prompts(prompts)
        if not prompt_list:
            raise ADDError("prompts is empty: type at least one prompt (one per line).")
        if not (math.isfinite(float(teacher_cfg)) and 1.0 <= float(teacher_cfg) <= 30.0):  # NaN passes min/max
            raise ADDError(f"teacher_cfg is {teacher_cfg!r}: type a number from 1 to 30 (7 is typical).")
        name = check_name(lora_name, "lora_name") + ".safetensors"
        for label, v in (("width", width), ("height", height)):
            if int(v) % 8 or int(v) < 64:
                raise ADDError(f"{label} {v} must be a multiple of 8 and at least 64; try {max(64, round(int(v) / 8) * 8)}.")
        path = folder_paths.get_full_path("loras", name)
        student, trained = None, [999]
        if path is not None:
            sd, md = files.read_safetensors(path, f"loras/{name}", "Queue ADD Train with the same name to write it "
                                            "again, or re-download it as an intact .safetensors file.")
            try:
                trained = [int(t) for t in json.loads(md.get("add.student_timesteps", "[999, 749, 499, 249]"))]
            except (ValueError, TypeError):
                raise ADDError(f"loras/{name}: its add.student_timesteps metadata is not a list of whole "
                                     "numbers; the file was edited or is not from ADD Train.") from None
            student, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0.0)
        ts = pick_timesteps(trained, int(student_steps))
        latent = {"samples": torch.zeros(1, adapter.latent_channels(model), int(height) // 8, int(width) // 8)}
        teacher_m, t_count = _count_evals(model)
        student_m, s_count = _count_evals(student) if student is not None else (None, [0])
        rows, t_time, s_time = [], 0.0, 0.0
        neg = _encode(clip, "")
        for p in prompt_list:
            pos = _encode(clip, p)
            noise = comfy.sample.prepare_noise(latent["samples"], seed)
            callback = latent_preview.prepare_callback(teacher_m, int(teacher_steps))  # progress, preview, Cancel
            t0 = time.perf_counter()
            t_lat = comfy.sample.sample(teacher_m, noise, int(teacher_steps), float(teacher_cfg), teacher_sampler,
                                        "normal", pos, neg, latent["samples"], seed=seed, callback=callback)
            t_time += time.perf_counter() - t0
            row = [vae.decode(t_lat)[0]]
            if student_m is not None:
                sigmas = build_sigmas(student_m, "custom", len(ts), 1.0, ",".join(map(str, ts)))
                t0 = time.perf_counter()
                s_lat = add_sample(student_m, pos, latent, seed, sigmas)["samples"]
                s_time += time.perf_counter() - t0
                row.append(vae.decode(s_lat)[0])
            else:
                row.append(torch.zeros_like(row[0]))
            rows.append(row)
        n = len(prompt_list)
        headers = [f"teacher {teacher_steps} steps cfg {teacher_cfg:g}: {t_time / n:.2f} s, {t_count[0] / n:.0f} evals/img"]
        headers.append(f"student {len(ts)} step{'s' if len(ts) > 1 else ''} {','.join(map(str, ts))}: "
                       f"{s_time / n:.2f} s, {s_count[0] / n:.0f} evals/img" if student is not None
                       else f"student: {name} not saved yet - queue again after its first save")
        return (_label_grid(rows, headers),)


def _encode(clip, text: str):
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


NODE_CLASS_MAPPINGS = {"ADDTrain": ADDTrain, "ADDTrainingStatus": ADDTrainingStatus, "ADDCompare": ADDCompare}
NODE_DISPLAY_NAME_MAPPINGS = {"ADDTrain": "ADD Train (background)", "ADDTrainingStatus": "ADD Training Status",
                              "ADDCompare": "ADD Compare (teacher vs student)"}

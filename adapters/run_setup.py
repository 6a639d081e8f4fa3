"""A checked ``RunRequest`` + ComfyUI objects -> ``RunSpec``: the one place a training run is assembled.

The ADD Train node and the headless trainer (``scripts/train_add.py``) both go through here, so they
train the same way, write the same files, and either can resume the other's run:

1. :func:`plan_run` — the model's family and schedule, the request's ``ADDConfig``, the base weights'
   fingerprint and the data record (``run.json``); nothing is copied yet;
2. ``training.resume.check_start`` (by the caller: the node first looks for a running job) — new run,
   resume, or a conflict named in the user's words;
3. :func:`check_memory` — refuse a run that would not fit, with the numbers;
4. :func:`build_run_spec` — the job's own frozen copy of the base weights, the prompts encoded once,
   the data (teacher-generated or image latents), previews; everything the run needs, on the
   calling (prompt) thread.

Also here: :func:`load_checkpoint` (the headless trainer's model) and :func:`read_image_folder`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

import comfy.sd
import comfy.utils

from ..core.errors import ADDError
from ..training import image_folder as image_files
from ..training.config import ADDConfig
from ..training.data import LatentDataset, SyntheticTeacherData, WithRealImages
from ..training.inputs import memory_error
from ..training.run import RunSpec
from ..training.schedule import DiscreteSchedule
from ..training.setup import RunRequest
from . import model as adapter
from .patched_weights import weights_fingerprint

PREVIEW_COUNT = 4


@dataclass(frozen=True)
class RunPlan:
    """What a request becomes on a given model, before anything is copied."""

    cfg: ADDConfig
    family: str
    fingerprint: str
    run_info: dict
    t_max: int


def plan_run(model, request: RunRequest, n_images: int | None = None) -> RunPlan:
    """The request on ``model`` (a ComfyUI MODEL): ADDError naming what cannot be trained or set."""
    family = adapter.check_trainable(model)
    t_max = len(adapter.schedule_sigmas(model)) - 1
    cfg = request.config(t_max, images=n_images is not None)
    return RunPlan(cfg=cfg, family=family, fingerprint=weights_fingerprint(model),
                   run_info=request.run_info(n_images), t_max=t_max)


def load_checkpoint(path: str, label: str):
    """(model, clip, vae) of a checkpoint file, by ComfyUI's own loader; ADDError naming ``label`` otherwise."""
    try:
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)[:3]
    except RuntimeError as exc:  # ComfyUI's detection found no model family it knows
        raise ADDError(f"{label} {path}: ComfyUI cannot load it as a checkpoint ({str(exc).splitlines()[0][:200]}). "
                       "Use an SD1.x/SD2.x/SDXL checkpoint.") from None
    if model is None or clip is None:
        raise ADDError(f"{label} {path}: ComfyUI found no " + ("UNet" if model is None else "text encoder")
                       + " it can load in it. Use a full SD1.x/SD2.x/SDXL checkpoint (UNet, CLIP and VAE).")
    return model, clip, vae


def read_image_folder(path: str, width: int, height: int, label: str) -> tuple[torch.Tensor, list[str]]:
    """Images of folder ``path`` resized and centre-cropped to width x height -> (N, H, W, 3), captions;
    ``label`` names the input in messages. Refused when they would not fit the host's free memory."""
    return image_files.read_captioned_folder(path, width, height, label,
                                             available=adapter.free_memory_bytes(torch.device("cpu")))


def check_memory(model, cfg: ADDConfig, width: int, height: int, gradient_checkpointing: bool, device,
                 where: str = "") -> None:
    """ADDError with the numbers when the run would not fit the device's free memory."""
    lat_hw = (int(height) // 8, int(width) // 8)
    need = adapter.estimate_memory(model.model, cfg.batch_size, lat_hw, cfg.lora_rank, bool(gradient_checkpointing),
                                   cfg.training_mode, cfg.ema_decay is not None, paired=cfg.paired_passes,
                                   dmd=cfg.distill_loss == "dmd")
    # Free device memory plus what the input model occupies there (ComfyUI can offload it).
    free = adapter.free_memory_bytes(device) + (model.loaded_size() if device.type != "cpu" else 0)
    if need["total"] > free:
        raise memory_error(need, free, str(device), where=where, training_mode=cfg.training_mode)


def fit_images(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """IMAGE (N, H, W, 3) -> centre-cropped and resized to (N, height, width, 3)."""
    x = images.movedim(-1, 1)
    x = comfy.utils.common_upscale(x, width, height, "bilinear", "center")
    return x.movedim(1, -1)


def latent_to_rgb(model, latents: torch.Tensor) -> torch.Tensor:
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


def _private_vae_model(vae, device) -> torch.nn.Module:
    """A frozen fp32 plain-torch copy of a VAE's model on ``device``, usable off the prompt thread."""
    with torch.inference_mode(False):
        return adapter.plain_torch_modules_(copy.deepcopy(vae.first_stage_model).float().to(device).eval()
                                            .requires_grad_(False))


def _private_taesd(vae, device):
    """A private copy of a TAESD-based VAE's model (small), or None for other VAEs."""
    from comfy.taesd.taesd import TAESD

    if vae is None or not isinstance(getattr(vae, "first_stage_model", None), TAESD):
        return None
    return _private_vae_model(vae, device)


def _dinov2_features(path, vae, network, device):
    """The paper's discriminator features: a frozen fp32 copy of the VAE decoder (differentiable)
    feeding DINOv2 ViT-S/14 from a local file."""
    from ..training.discriminator import DinoV2Features, load_dinov2

    dino = load_dinov2(path).to(device)
    dec = _private_vae_model(vae, device)

    def decode(x0):
        img = dec.decode(network.process_latent_out(x0).float())
        return ((img + 1.0) / 2.0).clamp(0, 1)
    return DinoV2Features(dino, decode)


def _captions(prompts: list[str], n_images: int, folder_captions=None) -> list[str]:
    """One caption per image: a folder's own captions (the first prompt where one has none), or the
    prompt lines in order, cycled."""
    if folder_captions is not None:
        fallback = prompts[0] if prompts else ""
        return [c or fallback for c in folder_captions]
    base = prompts or [""]
    return [base[i % len(base)] for i in range(n_images)]


def build_run_spec(model, clip, vae, request: RunRequest, plan: RunPlan, lora_path: str, *, device: torch.device,
                   images: torch.Tensor | None = None, folder_captions: list[str] | None = None):
    """The run's inputs from ComfyUI objects -> (RunSpec, decode_preview(latents) -> IMAGE).

    ``images`` (N, H, W, 3) are the training images, if any (``folder_captions`` when they came from
    an image folder, else the prompts caption them); with ``images_for`` 'discriminator' the student trains on the
    teacher's samples of the images' captions and the images are the discriminator's real side. Inputs are
    already checked (plan_run, check_start).
    """
    cfg, prompts = plan.cfg, list(request.prompts)
    width, height = int(request.width), int(request.height)
    lat_hw = (height // 8, width // 8)
    network = adapter.frozen_copy(model, device)
    c = adapter.latent_channels(model)
    captions = prompts if images is None else _captions(prompts, int(images.shape[0]), folder_captions)
    # images_for 'discriminator': the teacher generates the student's data from the images' own captions (one
    # entry per image, so each caption as often as among the images): D's two sides then carry the same texts
    for_d = images is not None and cfg.images_for == "discriminator"
    bank = adapter.PromptBank(clip, sorted(set(captions)) if captions else [""], network, width, height)
    schedule = DiscreteSchedule(adapter.schedule_sigmas(model))

    def teacher_data(teacher):
        return SyntheticTeacherData(teacher, captions if for_d else bank.prompts, lambda ps: bank.encode(ps, device),
                                    (c, *lat_hw), schedule, steps=int(request.data_steps),
                                    cfg_scale=float(request.data_cfg), uncond=bank.uncond_on(device), device=device)

    if images is not None:
        pixels = fit_images(images, width, height)
        with torch.no_grad():
            lat = vae.encode(pixels[..., :3])
        with torch.inference_mode(False):  # ordinary tensors, no graph: the data is a constant
            lat = model.model.process_latent_in(lat.detach().float().cpu().clone()).to(device)
        cond, pooled = bank.encode(captions, device)
        uncond = bank.uncond_on(device)

        def data_factory(teacher):
            if for_d:
                return WithRealImages(teacher_data(teacher), LatentDataset(lat, cond=cond, pooled=pooled))
            return LatentDataset(lat, cond=cond, pooled=pooled, uncond=uncond)
    else:
        data_factory = teacher_data

    feature_fn = None
    decoder = _private_taesd(vae, device)
    if cfg.discriminator == "dinov2":
        feature_fn = _dinov2_features(request.dinov2_path, vae, network, device)
    n_prev = min(PREVIEW_COUNT, len(bank.prompts))
    preview_cond, _ = bank.rows(range(n_prev), device)
    spec = RunSpec(
        cfg=cfg, network=network, denoise=adapter.comfy_denoise, data=None, data_factory=data_factory,
        schedule=schedule, lora_path=lora_path, device=device,
        feature_modules=adapter.feature_modules(network, cfg.disc_features) if feature_fn is None else None,
        feature_fn=feature_fn, target_modules=adapter.lora_targets(network),
        checkpoint_modules=adapter.checkpoint_modules(network) if request.gradient_checkpointing else (),
        c_dim=bank.c_dim, lora_prefix="", full_copy=adapter.trainable_copy,
        base_info={"base_model": f"{plan.family} ({type(model.model.model_config).__name__})",
                   "base_fingerprint": plan.fingerprint},
        run_info=plan.run_info, preview_cond=preview_cond, preview_shape=(n_prev, c, *lat_hw))

    def decode_preview(lat: torch.Tensor) -> torch.Tensor:
        if decoder is None:
            return latent_to_rgb(model, lat)
        with torch.no_grad():
            img = decoder.decode(network.process_latent_out(lat.to(device)))
        return ((img.float() + 1.0) / 2.0).clamp(0, 1).movedim(1, -1).cpu()
    return spec, decode_preview

"""ADD Compare (teacher vs student): the base model at N steps with CFG against the model with a
trained ADD LoRA at 1-4 steps without CFG, on the same prompts and seeds; a labelled grid with the
measured seconds and model evaluations per image."""
from __future__ import annotations

import json
import math
import time

import torch

import comfy.sample
import comfy.samplers
import comfy.sd
import latent_preview
import folder_paths
from comfy_api.latest import io

from ..adapters import comfy_internals as internals
from ..adapters import model as adapter
from ..core import files, images
from ..core.errors import ADDError
from ..training.setup import parse_prompts
from .sampling import add_sample, build_sigmas
from .train import CATEGORY, check_name

def _count_evals(model):
    """A clone of ``model`` counting UNet sample-evaluations (batch entries) in ``counter[0]``."""
    counter = [0]
    m = model.clone()
    prev = internals.unet_function_wrapper(m)

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


class ADDCompare(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADDCompare", display_name="ADD Compare (teacher vs student)", category=CATEGORY,
            description=("Teacher vs ADD student on the same prompts and seeds: the base model at N steps with CFG "
                         "against the model with the trained LoRA at 1-4 steps without CFG; a grid labelled with "
                         "measured seconds and model evaluations per image."),
            inputs=[
                io.Model.Input("model", tooltip="The base model (teacher)."),
                io.Clip.Input("clip", tooltip="The base model's CLIP."),
                io.Vae.Input("vae", tooltip="Decodes both columns (a TinyVAE is fine)."),
                io.String.Input("lora_name", default="my_turbo_lora.safetensors", tooltip=
                    "The trained LoRA's file name in models/loras (connect ADD Train's lora_name)."),
                io.String.Input("prompts", multiline=True,
                                default="a photograph of a red fox in a snowy forest, golden hour",
                                tooltip="One prompt per line (a row each)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Noise seed, the same for both."),
                io.Int.Input("teacher_steps", default=25, min=1, max=200, tooltip="Teacher sampling steps."),
                io.Float.Input("teacher_cfg", default=7.0, min=1.0, max=30.0, step=0.1, tooltip="Teacher CFG scale."),
                io.Combo.Input("teacher_sampler", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="Teacher sampler."),
                io.Int.Input("student_steps", default=1, min=1, max=4, tooltip=
                    "Student steps (1-4), taken from the timesteps it was trained on."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Image width (multiple of 8)."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Image height (multiple of 8)."),
            ],
            outputs=[io.Image.Output(display_name="grid", tooltip="Rows = prompts; columns = teacher, student.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, lora_name, prompts, seed, teacher_steps, teacher_cfg, teacher_sampler,
                student_steps, width, height) -> io.NodeOutput:
        prompt_list = parse_prompts(prompts)
        if not prompt_list:
            raise ADDError("prompts is empty: type at least one prompt (one per line).")
        if not (math.isfinite(float(teacher_cfg)) and 1.0 <= float(teacher_cfg) <= 30.0):  # NaN passes min/max
            raise ADDError(f"teacher_cfg is {teacher_cfg!r}: type a number from 1 to 30 (7 is typical).")
        if teacher_sampler not in comfy.samplers.KSampler.SAMPLERS:  # a comfy_api combo: not every host checks it
            raise ADDError(f"teacher_sampler {teacher_sampler!r} is not a sampler of this ComfyUI: pick one from the "
                           "list (euler is a safe choice).")
        name = check_name(lora_name, "lora_name") + ".safetensors"
        for label, v in (("width", width), ("height", height)):
            images.check_size(v, label)
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
        grid = images.image_grid([img for row in rows for img in row], columns=len(headers), headers=headers,
                                 background=(24, 24, 24))
        return io.NodeOutput(images.to_image(grid))


def _encode(clip, text: str):
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


NODES = [ADDCompare]

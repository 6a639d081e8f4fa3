"""ADD Save Turbo Checkpoint: a fused model (+ CLIP + VAE) as one .safetensors with honest metadata.

* ``turbo_metadata``          modelspec metadata: base model, merged LoRAs (the merge record of
                              nodes/lora_merge.py), recommended steps / cfg / sampler / timesteps.
* ``recommended_timesteps``   those timesteps, from ``core.schedules``: the ADD Scheduler's
                              ``add_trailing`` spacing, or LCMScheduler's for LCM-LoRA merges.
* ``checkpoint_state_dict``   the tensors ComfyUI's CheckpointSave writes, refused when non-finite.
* ``ADDSaveTurboCheckpoint``  the node; numbered / atomic writing is nodes/saving.py's.
"""
from __future__ import annotations

import json
import os

import torch

import comfy.model_management
import folder_paths
from comfy_api.latest import io

from ..adapters import comfy_internals as internals
from ..core import files
from ..core import schedules
from ..core.errors import ADDError
from . import saving
from .lora_match import _MODELSPEC_ARCH, _examples, _model_family
from .lora_merge import MERGE_INFO_KEY


def recommended_timesteps(steps: int, lcm: bool) -> list[int]:
    """The timesteps a saved checkpoint recommends, from ``core.schedules``: LCM-LoRA merges ->
    diffusers' LCMScheduler (50 original steps; 4 steps -> 999, 759, 499, 259); ADD / turbo -> the
    ADD Scheduler's ``add_trailing`` spacing (3 steps -> 999, 666, 332), also past its 1-4 steps."""
    if lcm:
        return list(schedules.lcm_timesteps(steps))
    return schedules.trailing_timesteps(steps)


def turbo_metadata(model, title: str, steps: int, cfg: float, base_model_name: str) -> tuple[dict, dict]:
    """(safetensors metadata, extra keys) in the modelspec convention CheckpointSave writes."""
    import comfy.model_base

    record = internals.model_option(model, MERGE_INFO_KEY) or {}
    fam = record.get("family") or _model_family(model)[0]
    lcm = record.get("sampling") == "lcm" or any(l.get("lcm") for l in record.get("loras", []))
    md = {"modelspec.sai_model_spec": "1.0.0", "modelspec.implementation": "sgm", "modelspec.title": title}
    arch = _MODELSPEC_ARCH.get(fam)
    extra = {}
    if model.model.model_type == comfy.model_base.ModelType.V_PREDICTION:
        md["modelspec.predict_key"] = "v"
        extra["v_pred"] = torch.tensor([])
        if fam == "sd2":
            arch = "stable-diffusion-v2-768-v"
    else:
        md["modelspec.predict_key"] = "epsilon"
    if arch:
        md["modelspec.architecture"] = arch
    loras = record.get("loras", [])
    merged = [base_model_name or f"unknown {record.get('base_class', type(model.model.model_config).__name__)} checkpoint"]
    merged += [f"{l['name']} @ {l['strength_model']:g}" for l in loras]
    md["modelspec.merged_from"] = ", ".join(merged)
    timesteps = recommended_timesteps(steps, lcm)
    sampler, scheduler = ("lcm" if lcm else "euler_ancestral"), "sgm_uniform"
    md["modelspec.usage_hint"] = (f"{steps} steps, cfg {cfg:g}, sampler {sampler}, scheduler {scheduler}"
                                  + (", ModelSamplingDiscrete 'lcm'" if lcm else ""))
    md.update({
        "add.base_model": merged[0], "add.base_fingerprint": str(record.get("base_fingerprint", "")),
        "add.merged_loras": json.dumps(loras), "add.recommended_steps": str(steps),
        "add.recommended_cfg": f"{cfg:g}", "add.recommended_timesteps": json.dumps(timesteps),
        "add.recommended_sampler": sampler, "add.recommended_scheduler": scheduler,
        "add.sampling": "lcm" if lcm else "eps",
    })
    return md, extra


class ADDSaveTurboCheckpoint(io.ComfyNode):
    """Save a fused model (+ CLIP + VAE) as one .safetensors with honest metadata, atomically."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADDSaveTurboCheckpoint", display_name="ADD Save Turbo Checkpoint", category="ADD/lora",
            description=("Writes model + CLIP + VAE as one .safetensors checkpoint in the output folder with modelspec "
                         "metadata (base model, merged LoRAs and strengths, recommended steps / timesteps / cfg). Numbered "
                         "like ComfyUI's Save Checkpoint (<prefix>_00001_.safetensors, ...): queueing again writes the "
                         "next number and never replaces a file, unless exact_name_overwrite is on. Atomic."),
            inputs=[
                io.Model.Input("model", tooltip="The fused model (from ADD LoRA Merge, or any model)."),
                io.Clip.Input("clip", tooltip="Text encoder saved into the checkpoint."),
                io.Vae.Input("vae", tooltip="VAE saved into the checkpoint."),
                # filename_prefix / exact_name_overwrite sit where the old filename / overwrite widgets were:
                # old workflows restore their values by position (see nodes/saving.py).
                saving.prefix_input("checkpoints/turbo_model", "ComfyUI's output folder"),
                saving.exact_input(),
                io.Int.Input("steps", default=4, min=1, max=50, tooltip="Recommended sampling steps written to metadata."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1, tooltip="Recommended cfg written to metadata."),
                io.String.Input("base_model_name", default="", tooltip=
                    "Name of the checkpoint the merge started from (MODEL does not carry its file name); written to "
                    "metadata."),
            ],
            outputs=[io.String.Output(display_name="report", tooltip="Where the file went and the metadata written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, filename_prefix, exact_name_overwrite, steps, cfg, base_model_name) -> io.NodeOutput:
        out = folder_paths.get_output_directory()
        # the name is checked before gathering gigabytes of weights
        title = os.path.basename(saving.check_prefix(filename_prefix, out, exact_name_overwrite))
        md, extra = turbo_metadata(model, title, steps, cfg, base_model_name)
        path = saving.save_safetensors(out, filename_prefix, exact_name_overwrite,
                                       checkpoint_state_dict(model, clip, vae, extra), md)
        report = f"saved {path}\n" + "\n".join(f"{k}: {v}" for k, v in md.items())
        return io.NodeOutput(report, ui={"text": [report]})


def checkpoint_state_dict(model, clip, vae, extra_keys: dict) -> dict:
    """The tensors ``comfy.sd.save_checkpoint`` writes (patched weights + CLIP + VAE), not yet on disk."""
    load = [model] + ([clip.load_model()] if clip is not None else [])
    comfy.model_management.load_models_gpu(load, force_patch_weights=True)
    sd = internals.checkpoint_state_dict(model, clip, vae)
    sd.update(extra_keys)
    nonfinite = files.nonfinite_keys(sd)
    if nonfinite:
        raise ADDError(f"the model to save holds NaN or infinite weights in {len(nonfinite)} tensors, e.g. "
                             f"{_examples(nonfinite, 2)}: saving it would write a broken checkpoint. Check the LoRAs and "
                             "strengths merged into it.")
    return sd


NODES = [ADDSaveTurboCheckpoint]

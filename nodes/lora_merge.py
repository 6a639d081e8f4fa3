"""ADD LoRA Merge: fuse a LoRA into a NEW model (and CLIP), with a report of exactly what matched.

ComfyUI applies LoRAs lazily (patches added to a ModelPatcher, computed at load) and skips keys it
cannot map with one log line. This node fuses eagerly into a NEW module (the input model and its
clones keep their weights), says exactly what matched, and refuses LoRAs for another architecture.

The weight math is ComfyUI's own (``comfy.lora.load_lora`` adapters + ``comfy.lora.calculate_weight``),
exactly what a lazily patched model computes, so fused == lazily patched. Matching and input checks:
nodes/lora_match.py; the fused copy: adapters/patched_weights.py. The merge record (``MERGE_INFO_KEY``)
this node leaves on the MODEL is read by nodes/turbo_checkpoint.py and nodes/lora_extract.py.
"""
from __future__ import annotations

import logging

import folder_paths
from comfy_api.latest import io

from ..core.errors import ADDError
from .lora_match import LoraMatch, check_lora_values, check_strength, read_lora
from ..adapters import comfy_internals as internals
from ..adapters.patched_weights import weights_fingerprint, fused_module, patcher_around

log = logging.getLogger(__name__)

MERGE_INFO_KEY = "add_lora_merge"  # model_options entry: where the merge record rides on the MODEL
SAMPLING_MODES = ("auto", "eps", "lcm", "none")


def _with_sampling(model, mode: str):
    """Clone with ComfyUI's ModelSamplingDiscrete patch ('eps' / 'lcm'), as the core node makes it."""
    import comfy.model_sampling
    from comfy_extras.nodes_model_advanced import LCM, ModelSamplingDiscreteDistilled

    bases = {"eps": (comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS),
             "lcm": (ModelSamplingDiscreteDistilled, LCM)}
    base, kind = bases[mode]

    class ModelSamplingAdvanced(base, kind):
        pass

    m = model.clone()
    m.add_object_patch("model_sampling", ModelSamplingAdvanced(model.model.model_config, zsnr=False))
    return m


class ADDLoraMerge(io.ComfyNode):
    """Fuse a LoRA into a NEW model (and CLIP), with a report of exactly what matched."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADDLoraMerge", display_name="ADD LoRA Merge (fuse)", category="ADD/lora",
            description=("Fuses a LoRA (LCM-LoRA, ADD LoRA, any kohya / ComfyUI / diffusers / PEFT layout) into a new "
                         "copy of the model's weights. The input model is untouched. Reports matched keys per component; "
                         "refuses LoRAs made for another architecture."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to fuse the LoRA into (it is not modified)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="LoRA file from models/loras."),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Scale of the LoRA delta on the diffusion model."),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Scale of the LoRA delta on the text encoder (when a CLIP is connected)."),
                io.Combo.Input("sampling", options=list(SAMPLING_MODES), default="auto", tooltip=
                    "Model sampling patch: auto = 'lcm' when the file's metadata or name says LCM, else leave as is; "
                    "eps / lcm force ComfyUI's ModelSamplingDiscrete patch; none = leave as is."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional text encoder to fuse the LoRA's text-encoder keys into."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="A new model whose own weights contain the LoRA."),
                io.Clip.Output(display_name="clip", tooltip="A new CLIP whose weights contain the LoRA's text-encoder "
                                                            "part (the input CLIP when none is connected)."),
                io.String.Output(display_name="report", tooltip="What matched: modules per component, unmatched "
                                                                "examples, format, family, LCM detection."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, lora_name, strength_model, strength_clip, sampling, clip=None) -> io.NodeOutput:
        lora_sd, metadata = read_lora(lora_name)
        new_model, new_clip, report = fuse_lora(model, clip, lora_sd, metadata or {}, lora_name,
                                                strength_model, strength_clip, sampling)
        return io.NodeOutput(new_model, new_clip, report, ui={"text": [report]})


def fuse_lora(model, clip, lora_sd, metadata, lora_name, strength_model, strength_clip, sampling="auto"):
    """(new model, new clip or the input clip, report). Pure ComfyUI objects in and out."""
    if sampling not in SAMPLING_MODES:
        raise ADDError(f"sampling {sampling!r} is not one of {SAMPLING_MODES}")
    strength_model = check_strength(strength_model, "strength_model")
    strength_clip = check_strength(strength_clip, "strength_clip")
    check_lora_values(lora_sd, lora_name)
    match = LoraMatch(lora_sd, metadata, lora_name, model, clip)
    match.raise_if_unusable(model, clip)
    mode = ("lcm" if match.info.is_lcm else "none") if sampling == "auto" else sampling

    tmp = model.clone()
    tmp.add_patches(match.unet_patches, strength_model)
    new_model = patcher_around(tmp, fused_module(tmp))
    del tmp
    new_clip = clip
    if clip is not None and match.matched_clip:
        tmp_clip = clip.clone()
        tmp_clip.add_patches(match.clip_patches, strength_clip)
        new_clip = internals.clip_like(clip, patcher_around(tmp_clip.patcher, fused_module(tmp_clip.patcher)))
        del tmp_clip
    if mode in ("eps", "lcm"):
        new_model = _with_sampling(new_model, mode)

    record = dict(internals.model_option(model, MERGE_INFO_KEY) or {})
    if "base_fingerprint" not in record:
        record["base_fingerprint"] = weights_fingerprint(model)
        record["base_class"] = type(model.model.model_config).__name__
        record["family"] = match.model_family[0]
    record["loras"] = list(record.get("loras", [])) + [{
        "name": lora_name, "strength_model": strength_model,
        "strength_clip": strength_clip if (clip is not None and match.matched_clip) else 0.0,
        "format": match.info.format, "lcm": match.info.is_lcm,
        "matched_unet": len(match.matched_unet), "matched_clip": len(match.matched_clip),
    }]
    if mode != "none":
        record["sampling"] = mode
    internals.set_model_option(new_model, MERGE_INFO_KEY, record)
    report = f"{lora_name}\n" + match.report(strength_model, strength_clip, mode)
    log.info("ADD LoRA merge:\n%s", report)
    return new_model, new_clip, report


NODES = [ADDLoraMerge]

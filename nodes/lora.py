"""LoRA nodes: fuse a LoRA into a new model, save a turbo checkpoint, extract a LoRA from two models.

ComfyUI applies LoRAs lazily (patches added to a ModelPatcher, computed at load) and skips keys it
cannot map with one log line. These nodes fuse eagerly into a NEW module (the input model and its
clones keep their weights), say exactly what matched, and refuse LoRAs for another architecture.

Key-format logic lives in ``core.lora_keys``; the weight math is ComfyUI's own
(``comfy.lora.load_lora`` adapters + ``comfy.lora.calculate_weight``), exactly what a lazily
patched model computes, so fused == lazily patched.
"""
from __future__ import annotations

import json
import logging
import math
import os
import uuid

import torch

import comfy.float
import comfy.lora
import comfy.lora_convert
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.utils
import folder_paths

from ..core import lora_keys
from ..core import files
from ..core.errors import ADDError
from ..core.fingerprint import sampled_fingerprint
from ..training import lora_extract
from . import saving

log = logging.getLogger(__name__)

MERGE_INFO_KEY = "add_lora_merge"  # model_options entry: where the merge record rides on the MODEL
SAMPLING_MODES = ("auto", "eps", "lcm", "none")
# Per-module / root state of newer ComfyUI's dynamic-VRAM loader (a share of the original's GPU
# allocation); a copy must not carry it.
_DYNAMIC_VRAM_STATE = ("_v", "_v_signature", "_v_weight", "_v_bias", "_v_block", "_pin_state", "_prefetch",
                       "seed_key", "weight_lowvram_function", "bias_lowvram_function")
_DYNAMIC_VRAM_ROOT_STATE = ("dynamic_vbars", "dynamic_pins", "dynamic_patchers")
# string_to_seed moved to comfy.utils upstream (the old name logs a warning on every call).
_string_to_seed = getattr(comfy.utils, "string_to_seed", None) or comfy.model_patcher.string_to_seed

_MODEL_ROOT_DEFAULTS = {  # per-load bookkeeping ModelPatcher keeps on the root module
    "model_loaded_weight_memory": 0, "lowvram_patch_counter": 0, "model_lowvram": False,
    "current_weight_patches_uuid": None, "model_offload_buffer_memory": 0, "current_patcher": None,
}


# --------------------------------------------------------------------------------------------
# building a fused copy
# --------------------------------------------------------------------------------------------
def _copy_structure(root: torch.nn.Module) -> torch.nn.Module:
    """A new module tree sharing no containers with ``root`` (tensors still shared until replaced).

    Cheaper than deepcopy (no tensor is copied here) and safe while ``root`` is loaded: per-load
    state ComfyUI hangs on modules (lowvram weight functions, patched flags) is wiped.
    """
    memo: dict[int, torch.nn.Module] = {}

    def rec(m):
        if id(m) in memo:
            return memo[id(m)]
        new = m.__class__.__new__(m.__class__)
        d = {k: (v.copy() if isinstance(v, (dict, list, set)) and k != "_modules" else v) for k, v in m.__dict__.items()}
        new.__dict__ = d
        memo[id(m)] = new
        new.__dict__["_modules"] = {k: (rec(c) if c is not None else None) for k, c in m._modules.items()}
        if "prev_comfy_cast_weights" in d:
            new.comfy_cast_weights = d.pop("prev_comfy_cast_weights")
        for attr in ("weight_function", "bias_function"):
            if attr in d:
                d[attr] = []
        d.pop("comfy_patched_weights", None)
        for attr in _DYNAMIC_VRAM_STATE:  # newer ComfyUI's dynamic-VRAM loader: per-load GPU state
            d.pop(attr, None)
        return new

    out = rec(root)
    for k, v in _MODEL_ROOT_DEFAULTS.items():
        if k in out.__dict__:
            out.__dict__[k] = v
    for k in _DYNAMIC_VRAM_ROOT_STATE:
        out.__dict__.pop(k, None)
    return out


def _fused_module(patcher, compute_device=None) -> torch.nn.Module:
    """A new module holding ``patcher``'s weights with all its weight patches applied.

    Layer by layer: each weight is computed from the ORIGINAL weight (ComfyUI's backup when the
    shared module is currently patched) in fp32 scratch, rounded to the weight's dtype exactly
    like ``ModelPatcher.patch_weight_to_device`` does, and stored on the offload device. Peak
    memory: the original + this copy + one layer of fp32 scratch.
    """
    key_patches = patcher.get_key_patches()
    patches = patcher.patches
    offload = patcher.offload_device
    new = _copy_structure(patcher.model)
    for k, orig_obj in patcher.object_patches_backup.items():  # undo object patches applied on the shared module
        comfy.utils.set_attr(new, k, orig_obj)
    done: dict[int, torch.Tensor] = {}
    pbar = comfy.utils.ProgressBar(max(1, len(patches)))  # one tick per fused weight; Cancel stops here
    with torch.no_grad():
        for mod_name, m in new.named_modules(remove_duplicate=True):
            for pname, t in list(m._parameters.items()):
                if t is None:
                    continue
                key = f"{mod_name}.{pname}" if mod_name else pname
                src, convert = (key_patches[key][0][0], key_patches[key][0][1]) if key in key_patches else (t, None)
                if id(src) in done and key not in patches:
                    m._parameters[pname] = done[id(src)]
                    continue
                if key in patches:
                    dev = compute_device if compute_device is not None else src.device
                    scratch = src.to(device=dev, dtype=torch.float32, copy=True)
                    if convert is not None:
                        scratch = convert(scratch, inplace=True)
                    out = comfy.lora.calculate_weight(patches[key], scratch, key)
                    pbar.update(1)
                    _, set_func, _ = comfy.model_patcher.get_key_weight(new, key)
                    seed = _string_to_seed(key)
                    if set_func is not None:  # quantised ops store their own format
                        set_func(out, inplace_update=False, seed=seed)
                        continue
                    value = comfy.float.stochastic_rounding(out, src.dtype, seed=seed).to(offload)
                    del scratch, out
                else:
                    value = src.detach().to(device=offload, copy=True)
                p = torch.nn.Parameter(value, requires_grad=False)
                m._parameters[pname] = p
                done[id(src)] = p
            for bname, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[bname] = b.detach().to(device=offload, copy=True)
    if hasattr(new, "device"):
        new.device = offload
    return new


def _patcher_around(template, module: torch.nn.Module):
    """A ModelPatcher like ``template`` (options, wrappers, object patches) over ``module``, with no
    weight patches: the weights already contain them."""
    n = template.clone()
    n.model = module
    n.patches = {}
    n.patches_uuid = uuid.uuid4()
    n.backup = {}
    n.object_patches_backup = {}
    n.hook_backup = {}
    n.cached_hook_patches = {}
    n.pinned = set()
    n.parent = None
    return n


# --------------------------------------------------------------------------------------------
# matching a LoRA against a model
# --------------------------------------------------------------------------------------------
def _model_family(model) -> tuple[str, str]:
    """(family, description) of a ModelPatcher's diffusion model."""
    cfg = model.model.model_config
    ctx = cfg.unet_config.get("context_dim")
    fam = lora_keys.CONTEXT_DIM_FAMILY.get(ctx, "unknown")
    return fam, f"{type(cfg).__name__} (context width {ctx})"


def _expected_shape_problem(adapter, weight_shape) -> str | None:
    """Why a patch cannot apply to a weight of ``weight_shape`` (None when it fits)."""
    ws = tuple(weight_shape)
    numel = 1
    for s in ws[1:]:
        numel *= s
    if isinstance(adapter, tuple) and len(adapter) == 2 and adapter[0] == "diff":
        ds = tuple(adapter[1][0].shape)
        return None if ds == ws else f"diff {ds}"
    weights = getattr(adapter, "weights", None)
    if getattr(adapter, "name", "") != "lora" or weights is None or weights[3] is not None or weights[5] is not None:
        return None  # other adapters (LoHa, LoKr, OFT, LoCon mid) check themselves
    up, down = weights[0], weights[1]
    out_f, in_numel = int(up.shape[0]), int(down.flatten(1).shape[1])
    if ws and out_f == ws[0] and in_numel == numel and up.flatten(1).shape[1] == down.shape[0]:
        return None
    return f"up {tuple(up.shape)} x down {tuple(down.shape)} -> ({out_f}, {in_numel})"


def _examples(keys, n=3) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


class LoraMatch:
    """Which modules of a LoRA file map onto a model (+ CLIP), with the patches to apply."""

    def __init__(self, lora_sd: dict, metadata: dict | None, filename: str, model, clip):
        self.filename = filename
        self.info = lora_keys.describe({k: tuple(v.shape) for k, v in lora_sd.items()}, metadata, filename)
        norm, self.renamed = lora_keys.normalise_keys(lora_sd)
        norm = comfy.lora_convert.convert_lora(norm)
        self.unet_map = comfy.lora.model_lora_keys_unet(model.model, {}) if model is not None else {}
        self.clip_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}) if clip is not None else {}
        modules = lora_keys.group_modules(norm.keys())
        self.unet_patches = comfy.lora.load_lora(norm, self.unet_map, log_missing=False) if self.unet_map else {}
        self.clip_patches = comfy.lora.load_lora(norm, self.clip_map, log_missing=False) if self.clip_map else {}
        comp = {m: lora_keys.classify_module(m, [lora_keys.split_key(k)[1] for k in ks])[1] for m, ks in modules.items()}
        self.total = {c: sum(1 for m in modules if comp[m] == c) for c in ("unet", "clip", "other")}
        self.matched_unet = [m for m in modules if m in self.unet_map and self.unet_map[m] in self.unet_patches]
        self.matched_clip = [m for m in modules if m in self.clip_map and self.clip_map[m] in self.clip_patches]
        matched = set(self.matched_unet) | set(self.matched_clip)
        self.unmatched = [m for m in modules if m not in matched]
        # modules ComfyUI's own LoraLoader would drop (their original names are not in its map)
        inv = {v: k for k, v in self.renamed.items()}
        self.core_would_skip = [inv[m] for m in matched if m in inv and inv[m] not in self.unet_map]
        self.model_family = _model_family(model) if model is not None else ("unknown", "no model")
        self.clip_connected = clip is not None
        self.norm = norm

    def raise_if_unusable(self, model, clip) -> None:
        """Errors: nothing matched, or shapes that do not fit (another architecture)."""
        fam, fam_desc = self.model_family
        lora_fam = lora_keys.FAMILY_NAMES[self.info.family]
        expected = [k for k in self.unet_map if k.startswith("lora_unet_")][:3] + [k for k in self.unet_map if k.startswith("diffusion_model.")][:2]
        hint = (f"The model is {lora_keys.FAMILY_NAMES[fam]} [{fam_desc}]; the LoRA looks like {lora_fam} "
                f"({self.info.family_reason}), format {self.info.format}. ")
        name = f"loras/{self.filename}"
        if not self.matched_unet and not self.matched_clip:
            raise ADDError(
                f"{name}: No key of this LoRA matches the model ({self.info.n_modules} modules, e.g. {_examples(self.unmatched)}). "
                + hint + f"Expected module names like: {', '.join(expected)}. "
                "Load a LoRA made for this model family (or connect the CLIP if it only holds text-encoder keys).")
        corrupt = [f"{m}: up {tuple(a.weights[0].shape)} x down {tuple(a.weights[1].shape)}"
                   for patches in (self.unet_patches, self.clip_patches) for m, a in patches.items()
                   if getattr(a, "name", "") == "lora" and getattr(a, "weights", None) is not None
                   and a.weights[0].ndim >= 2 and a.weights[1].ndim >= 1
                   and int(a.weights[0].flatten(1).shape[1]) != int(a.weights[1].shape[0])]
        if corrupt:
            raise ADDError(
                f"{name} is corrupt: in {len(corrupt)} modules the up and down matrices disagree on the rank, e.g. "
                f"{corrupt[0]} (up's second size must equal down's first). Re-download the file or use an intact copy.")
        bad = []
        for patches, sd_model in ((self.unet_patches, model.model if model is not None else None),
                                  (self.clip_patches, clip.cond_stage_model if clip is not None else None)):
            if sd_model is None:
                continue
            shapes = {k: tuple(v.shape) for k, v in sd_model.state_dict().items()}
            for target, adapter in patches.items():
                key = target[0] if isinstance(target, tuple) else target
                if key not in shapes or isinstance(target, tuple):
                    continue
                problem = _expected_shape_problem(adapter, shapes[key])
                if problem is not None:
                    bad.append(f"{key}: model weight {shapes[key]} vs LoRA {problem}")
        if bad:
            raise ADDError(
                f"{name}: {len(bad)} LoRA weights do not fit the model's shapes, e.g. {bad[0]}"
                + (f"; {bad[1]}" if len(bad) > 1 else "") + ". " + hint
                + f"Expected module names like: {', '.join(expected)}. "
                + "This LoRA was made for another architecture: pick one trained for this model.")

    def report(self, strength_model, strength_clip, sampling: str) -> str:
        info = self.info
        lines = [
            f"format: {info.format}  rank: {info.rank}  family: {lora_keys.FAMILY_NAMES[info.family]} ({info.family_reason})",
            f"model: {self.model_family[1]}",
            f"unet: {len(self.matched_unet)}/{self.total['unet']} LoRA modules matched (strength {strength_model:g})",
        ]
        if self.clip_connected:
            lines.append(f"clip: {len(self.matched_clip)}/{self.total['clip']} LoRA modules matched (strength {strength_clip:g})")
        elif self.total["clip"]:
            lines.append(f"clip: {self.total['clip']} text-encoder modules NOT applied (no CLIP connected)")
        if self.total["other"]:
            lines.append(f"other: {self.total['other']} modules of unknown layout")
        real_unmatched = [m for m in self.unmatched if not (lora_keys.classify_module(m)[1] == "clip" and not self.clip_connected)]
        if real_unmatched:
            lines.append(f"WARNING: partial match: {len(real_unmatched)} LoRA modules did not match and were NOT applied, "
                         f"e.g. {_examples(real_unmatched)}")
        if self.renamed:
            lines.append(f"converted {len(self.renamed)} PEFT/new-diffusers module names to kohya form")
        if self.core_would_skip:
            lines.append(f"note: ComfyUI's LoraLoader would skip {len(self.core_would_skip)} of these modules "
                         f"(partial load), e.g. {_examples(self.core_would_skip, 2)}")
        lines.append(f"LCM: {'yes' if info.is_lcm else 'no'} ({info.lcm_reason}); sampling: {sampling}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# sampling patch, merge record, file names
# --------------------------------------------------------------------------------------------
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


def base_fingerprint(model) -> str:
    """Identifies the base checkpoint of a MODEL: core/fingerprint.py's hash of its UNet weights as
    loaded (before any patch)."""
    return sampled_fingerprint({k: p[0][0] for k, p in model.get_key_patches("diffusion_model.").items()})


def read_lora(lora_name: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a file in models/loras, through the plugin's one checked reader."""
    path = folder_paths.get_full_path("loras", lora_name)
    if path is None:
        raise ADDError(f"lora_name {str(lora_name)[:120]!r} is not a file in models/loras: put the LoRA there "
                             "(press 'r' in the browser to refresh the list) and select it.")
    return files.read_safetensors(path, f"loras/{lora_name}",
                                  "Re-download the LoRA (or copy it again) as an intact .safetensors file into models/loras.")


def check_lora_values(lora_sd: dict, lora_name: str) -> None:
    """NaN / inf anywhere in the file would make every fused weight, and every image, NaN."""
    bad = files.nonfinite_keys(lora_sd)
    if bad:
        raise ADDError(f"loras/{lora_name} holds NaN or infinite values in {len(bad)} tensors, e.g. "
                             f"{_examples(bad, 2)}: the file is broken (a diverged training run or a bad conversion). "
                             "Use an intact copy, or retrain it.")


def check_strength(value, label: str, limit: float = 10.0) -> float:
    """A finite strength within +-limit (ComfyUI's min/max check lets a typed NaN through)."""
    v = float(value)
    if not math.isfinite(v) or abs(v) > limit:
        raise ADDError(f"{label} is {value!r}: type a number from {-limit:g} to {limit:g} (1 = the LoRA as trained).")
    return v


# --------------------------------------------------------------------------------------------
# nodes
# --------------------------------------------------------------------------------------------
class ADDLoraMerge:
    """Fuse a LoRA into a NEW model (and CLIP), with a report of exactly what matched."""

    DESCRIPTION = ("Fuses a LoRA (LCM-LoRA, ADD LoRA, any kohya / ComfyUI / diffusers / PEFT layout) into a new copy of "
                   "the model's weights. The input model is untouched. Reports matched keys per component; refuses "
                   "LoRAs made for another architecture.")
    CATEGORY = "ADD/lora"
    FUNCTION = "merge"
    OUTPUT_NODE = True
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "report")
    OUTPUT_TOOLTIPS = ("A new model whose own weights contain the LoRA.",
                       "A new CLIP whose weights contain the LoRA's text-encoder part (the input CLIP when none is connected).",
                       "What matched: modules per component, unmatched examples, format, family, LCM detection.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to fuse the LoRA into (it is not modified)."}),
                "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "LoRA file from models/loras."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                             "tooltip": "Scale of the LoRA delta on the diffusion model."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                            "tooltip": "Scale of the LoRA delta on the text encoder (when a CLIP is connected)."}),
                "sampling": (list(SAMPLING_MODES), {"default": "auto",
                             "tooltip": "Model sampling patch: auto = 'lcm' when the file's metadata or name says LCM, else "
                                        "leave as is; eps / lcm force ComfyUI's ModelSamplingDiscrete patch; none = leave as is."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Optional text encoder to fuse the LoRA's text-encoder keys into."}),
            },
        }

    def merge(self, model, lora_name, strength_model, strength_clip, sampling, clip=None):
        lora_sd, metadata = read_lora(lora_name)
        new_model, new_clip, report = fuse_lora(model, clip, lora_sd, metadata or {}, lora_name,
                                                strength_model, strength_clip, sampling)
        return {"ui": {"text": [report]}, "result": (new_model, new_clip, report)}


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
    new_model = _patcher_around(tmp, _fused_module(tmp))
    del tmp
    new_clip = clip
    if clip is not None and match.matched_clip:
        tmp_clip = clip.clone()
        tmp_clip.add_patches(match.clip_patches, strength_clip)
        new_clip = clip.clone()
        new_clip.cond_stage_model = _fused_module(tmp_clip.patcher)
        new_clip.patcher = _patcher_around(tmp_clip.patcher, new_clip.cond_stage_model)
        del tmp_clip
    if mode in ("eps", "lcm"):
        new_model = _with_sampling(new_model, mode)

    record = dict(model.model_options.get(MERGE_INFO_KEY) or {})
    if "base_fingerprint" not in record:
        record["base_fingerprint"] = base_fingerprint(model)
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
    new_model.model_options[MERGE_INFO_KEY] = record
    report = f"{lora_name}\n" + match.report(strength_model, strength_clip, mode)
    log.info("ADD LoRA merge:\n%s", report)
    return new_model, new_clip, report


_MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}


def turbo_metadata(model, title: str, steps: int, cfg: float, base_model_name: str) -> tuple[dict, dict]:
    """(safetensors metadata, extra keys) in the modelspec convention CheckpointSave writes."""
    import comfy.model_base

    record = model.model_options.get(MERGE_INFO_KEY) or {}
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
    # Recommended schedule: LCM-LoRA -> diffusers LCMScheduler timesteps (50 original steps);
    # ADD/turbo -> trailing spacing t_i = 999 - i*1000/steps (arXiv 2311.17042 uses 1-4 steps).
    if lcm:
        origin = [999 - 20 * i for i in range(50)]
        timesteps = [origin[int(i * 50 / steps)] for i in range(steps)]
        sampler, scheduler = "lcm", "sgm_uniform"
    else:
        timesteps = [int(999 - i * 1000 / steps) for i in range(steps)]
        sampler, scheduler = "euler_ancestral", "sgm_uniform"
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


class ADDSaveTurboCheckpoint:
    """Save a fused model (+ CLIP + VAE) as one .safetensors with honest metadata, atomically."""

    DESCRIPTION = ("Writes model + CLIP + VAE as one .safetensors checkpoint in the output folder with modelspec metadata "
                   "(base model, merged LoRAs and strengths, recommended steps / timesteps / cfg). Numbered like "
                   "ComfyUI's Save Checkpoint (<prefix>_00001_.safetensors, ...): queueing again writes the next "
                   "number and never replaces a file, unless exact_name_overwrite is on. Atomic.")
    CATEGORY = "ADD/lora"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("Where the file went and the metadata written.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The fused model (from ADD LoRA Merge, or any model)."}),
                "clip": ("CLIP", {"tooltip": "Text encoder saved into the checkpoint."}),
                "vae": ("VAE", {"tooltip": "VAE saved into the checkpoint."}),
                # filename_prefix / exact_name_overwrite sit where the old filename / overwrite widgets were:
                # old workflows restore their values by position (see nodes/saving.py).
                "filename_prefix": saving.prefix_input("checkpoints/turbo_model", "ComfyUI's output folder"),
                "exact_name_overwrite": saving.exact_input(),
                "steps": ("INT", {"default": 4, "min": 1, "max": 50, "tooltip": "Recommended sampling steps written to metadata."}),
                "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip": "Recommended cfg written to metadata."}),
                "base_model_name": ("STRING", {"default": "", "tooltip": "Name of the checkpoint the merge started from "
                                               "(MODEL does not carry its file name); written to metadata."}),
            },
        }

    def save(self, model, clip, vae, filename_prefix, exact_name_overwrite, steps, cfg, base_model_name):
        out = folder_paths.get_output_directory()
        # the name is checked before gathering gigabytes of weights
        title = os.path.basename(saving.check_prefix(filename_prefix, out, exact_name_overwrite))
        md, extra = turbo_metadata(model, title, steps, cfg, base_model_name)
        path = saving.save_safetensors(out, filename_prefix, exact_name_overwrite,
                                       checkpoint_state_dict(model, clip, vae, extra), md)
        report = f"saved {path}\n" + "\n".join(f"{k}: {v}" for k, v in md.items())
        return {"ui": {"text": [report]}, "result": (report,)}


def checkpoint_state_dict(model, clip, vae, extra_keys: dict) -> dict:
    """The tensors ``comfy.sd.save_checkpoint`` writes (patched weights + CLIP + VAE), not yet on disk."""
    load = [model]
    clip_sd = None
    if clip is not None:
        load.append(clip.load_model())
        clip_sd = clip.get_sd()
    vae_sd = vae.get_sd() if vae is not None else None
    comfy.model_management.load_models_gpu(load, force_patch_weights=True)
    sd = model.model.state_dict_for_saving(clip_sd, vae_sd, None)
    sd.update(extra_keys)
    nonfinite = files.nonfinite_keys(sd)
    if nonfinite:
        raise ADDError(f"the model to save holds NaN or infinite weights in {len(nonfinite)} tensors, e.g. "
                             f"{_examples(nonfinite, 2)}: saving it would write a broken checkpoint. Check the LoRAs and "
                             "strengths merged into it.")
    return sd


@torch.no_grad()
def _effective_weights(patcher, prefix="diffusion_model."):
    """Yield (key, weight in fp32) with the patcher's patches applied, one layer at a time."""
    kp = patcher.get_key_patches(prefix)
    for key in kp:
        w, convert = kp[key][0][0], kp[key][0][1]
        t = convert(w.to(torch.float32, copy=True), inplace=True)
        if key in patcher.patches:
            t = comfy.lora.calculate_weight(patcher.patches[key], t, key)
        yield key, t


def check_same_architecture(turbo, base, prefix="diffusion_model.") -> None:
    """Both models hold the same weights with the same shapes, checked both ways before any SVD."""
    kt, kb = turbo.get_key_patches(prefix), base.get_key_patches(prefix)
    only_t, only_b = sorted(set(kt) - set(kb)), sorted(set(kb) - set(kt))
    if only_t or only_b:
        side = (f"turbo_model has {len(only_t)} weights the base lacks (e.g. {_examples(only_t, 2)})" if only_t else
                f"base_model has {len(only_b)} weights the turbo model lacks (e.g. {_examples(only_b, 2)})")
        raise ADDError(f"{side}: the two models differ in architecture, so a LoRA between them would be "
                             "meaningless. Connect the base checkpoint this turbo model was made from.")
    for k in sorted(kt):
        st, sb = tuple(kt[k][0][0].shape), tuple(kb[k][0][0].shape)
        if st != sb:
            raise ADDError(f"{k}: turbo_model {st} vs base_model {sb}: the two models differ in architecture. "
                                 "Connect the base checkpoint this turbo model was made from.")


@torch.no_grad()
def extract_lora_sd(turbo, base, rank: int, prefix="diffusion_model.", dtype=torch.float16):
    """(LoRA state dict in ComfyUI-native names, per-layer relative errors, overall error).

    dW = W_turbo - W_base per weight, made low-rank by ``training.lora_extract`` (per-layer truncated
    SVD; 1-D dW stored exactly); weights are read one layer at a time with the patches applied.
    """
    check_same_architecture(turbo, base, prefix)
    base_w = dict(_effective_weights(base, prefix))
    pbar = comfy.utils.ProgressBar(max(1, len(base_w)))  # one tick per weight; Cancel stops here
    pairs = ((key, wt, base_w.pop(key)) for key, wt in _effective_weights(turbo, prefix))
    sd, report = lora_extract.extract_lora(pairs, rank, dtype, tick=lambda: pbar.update(1))
    return sd, report.errors, report.overall


class ADDExtractLoRA:
    """Low-rank LoRA (per-layer SVD) reproducing turbo − base; reports the reconstruction error."""

    DESCRIPTION = ("Extracts a LoRA from a turbo model and its base (truncated SVD per layer at the chosen rank), saves it "
                   "to models/loras in ComfyUI-native keys (loads in ADD LoRA Merge and core LoraLoader) and reports the "
                   "relative reconstruction error, overall and for the worst layer. Files are numbered "
                   "(<prefix>_00001_.safetensors, ...): queueing again never replaces one, unless exact_name_overwrite is on.")
    CATEGORY = "ADD/lora"
    FUNCTION = "extract"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("File written, rank, relative error overall and worst layers.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "turbo_model": ("MODEL", {"tooltip": "The fast (distilled / LoRA-merged) model."}),
                "base_model": ("MODEL", {"tooltip": "The base model the turbo model was made from (same architecture)."}),
                "rank": ("INT", {"default": 64, "min": 1, "max": 1024, "tooltip": "LoRA rank: higher = closer, bigger file."}),
                "filename_prefix": saving.prefix_input("add_extracted_lora", "models/loras"),
                "exact_name_overwrite": saving.exact_input(),
            },
        }

    def extract(self, turbo_model, base_model, rank, filename_prefix, exact_name_overwrite):
        fam_t, fam_b = _model_family(turbo_model), _model_family(base_model)
        if fam_t != fam_b:
            raise ADDError(f"turbo_model is {fam_t[1]} but base_model is {fam_b[1]}: connect the base of the same family")
        loras = folder_paths.get_folder_paths("loras")[0]  # the first loras folder: where LoraLoader looks
        saving.check_prefix(filename_prefix, loras, exact_name_overwrite)  # before the SVD: minutes lost on a typo
        sd, errs, overall = extract_lora_sd(turbo_model, base_model, rank)
        if not sd:
            raise ADDError("the two models have identical weights: nothing to extract (connect the turbo model and its base)")
        worst = sorted(errs.items(), key=lambda kv: -kv[1])[:3]
        record = turbo_model.model_options.get(MERGE_INFO_KEY) or {}
        # The rank actually stored: a layer narrower than the requested rank keeps its full width.
        used = max((int(v.shape[0]) for k, v in sd.items() if k.endswith(".lora_down.weight")), default=0)
        md = {"ss_network_module": "networks.lora", "ss_network_dim": str(used), "ss_network_alpha": str(used),
              "modelspec.architecture": _MODELSPEC_ARCH.get(fam_t[0], "unknown") + "/lora",
              "add.rank": str(used), "add.requested_rank": str(rank), "add.relative_error": f"{overall:.6g}",
              "add.worst_layer": f"{worst[0][0]}={worst[0][1]:.6g}" if worst else "",
              "add.sampling": record.get("sampling", "eps")}
        path = saving.save_safetensors(loras, filename_prefix, exact_name_overwrite, sd, md)
        capped = f" (requested {rank}; no layer is wider than {used})" if used < rank else ""
        report = (f"saved {path}\nrank {used}{capped}: {len(errs)} low-rank layers, "
                  f"{sum(1 for k in sd if k.endswith(('.diff', '.diff_b')))} exact 1-D diffs\n"
                  f"relative error overall: {overall:.4g}\n"
                  + "\n".join(f"worst: {k} {v:.4g}" for k, v in worst))
        return {"ui": {"text": [report]}, "result": (report,)}


NODE_CLASS_MAPPINGS = {
    "ADDLoraMerge": ADDLoraMerge,
    "ADDSaveTurboCheckpoint": ADDSaveTurboCheckpoint,
    "ADDExtractLoRA": ADDExtractLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ADDLoraMerge": "ADD LoRA Merge (fuse)",
    "ADDSaveTurboCheckpoint": "ADD Save Turbo Checkpoint",
    "ADDExtractLoRA": "ADD Extract LoRA",
}

"""Matching a LoRA file against a model (+ CLIP), and the input checks the LoRA nodes share.

* ``LoraMatch``        which LoRA modules map onto the model / CLIP (ComfyUI's key maps), the patches to
                       apply, the errors for LoRAs made for another architecture, and the merge report.
* ``read_lora``        a file of models/loras through the plugin's checked reader; ``check_lora_values``
                       and ``check_strength`` refuse NaN / out-of-range inputs.
* ``_model_family``    a model's family (sd1 / sd2 / sdxl), and ``_MODELSPEC_ARCH`` its modelspec name.

Key-format logic lives in ``core.lora_keys``. The nodes using this: nodes/lora_merge.py,
nodes/turbo_checkpoint.py, nodes/lora_extract.py.
"""
from __future__ import annotations

import math

import comfy.lora
import comfy.lora_convert
import folder_paths

from ..adapters import comfy_internals as internals
from ..core import lora_keys
from ..core import files
from ..core.errors import ADDError

_MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}


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
    diff = internals.diff_patch_weight(adapter)
    if diff is not None:
        ds = tuple(diff.shape)
        return None if ds == ws else f"diff {ds}"
    up_down = internals.lora_up_down(adapter, plain=True)
    if up_down is None:
        return None  # other adapters (LoHa, LoKr, OFT, LoCon mid) check themselves
    up, down = up_down
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
        corrupt = [f"{m}: up {tuple(up.shape)} x down {tuple(down.shape)}"
                   for patches in (self.unet_patches, self.clip_patches) for m, a in patches.items()
                   for up, down in [internals.lora_up_down(a, plain=False) or (None, None)]
                   if up is not None and up.ndim >= 2 and down.ndim >= 1
                   and int(up.flatten(1).shape[1]) != int(down.shape[0])]
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
# input checks
# --------------------------------------------------------------------------------------------
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

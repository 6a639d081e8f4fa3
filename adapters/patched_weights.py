"""A ModelPatcher's weights with its patches applied: fused copies, per-layer reads, a fingerprint.

The one place in the plugin's LoRA and training code that reaches into ComfyUI's private per-load state (module
attributes its loaders hang on weights, ``ModelPatcher`` bookkeeping): ``copy_structure`` wipes it
from a copied module tree, ``patcher_around`` wraps a fused module in a fresh patcher.

* ``fused_module``       a new module holding the weights with all patches applied (ADD LoRA Merge,
                          and the training job's frozen copy in adapters/model.py).
* ``effective_weights``  the same weights one layer at a time, in fp32 (ADD Extract LoRA).
* ``weights_fingerprint`` a short hash of the base weights (the merge record; training runs).
"""
from __future__ import annotations

import uuid

import torch

import comfy.float
import comfy.lora
import comfy.model_patcher
import comfy.utils

from ..core.fingerprint import sampled_fingerprint

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
def copy_structure(root: torch.nn.Module) -> torch.nn.Module:
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


def fused_module(patcher, compute_device=None) -> torch.nn.Module:
    """A new module holding ``patcher``'s weights with all its weight patches applied.

    Layer by layer: each weight is computed from the ORIGINAL weight (ComfyUI's backup when the
    shared module is currently patched) in fp32 scratch, rounded to the weight's dtype exactly
    like ``ModelPatcher.patch_weight_to_device`` does, and stored on the offload device. Peak
    memory: the original + this copy + one layer of fp32 scratch.
    """
    key_patches = patcher.get_key_patches()
    patches = patcher.patches
    offload = patcher.offload_device
    new = copy_structure(patcher.model)
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


def patcher_around(template, module: torch.nn.Module):
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
# reading weights
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def effective_weights(patcher, prefix="diffusion_model."):
    """Yield (key, weight in fp32) with the patcher's patches applied, one layer at a time."""
    kp = patcher.get_key_patches(prefix)
    for key in kp:
        w, convert = kp[key][0][0], kp[key][0][1]
        t = convert(w.to(torch.float32, copy=True), inplace=True)
        if key in patcher.patches:
            t = comfy.lora.calculate_weight(patcher.patches[key], t, key)
        yield key, t


def weights_fingerprint(model) -> str:
    """Identifies the base checkpoint of a MODEL: core/fingerprint.py's hash of its UNet weights as
    loaded (before any patch)."""
    return sampled_fingerprint({k: p[0][0] for k, p in model.get_key_patches("diffusion_model.").items()})

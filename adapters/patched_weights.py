"""A ModelPatcher's weights with its patches applied: fused copies, per-layer reads, a fingerprint.

The weight math of the plugin's LoRA and training code, on ComfyUI's public weight functions
(``comfy.lora.calculate_weight``, ``comfy.float.stochastic_rounding``,
``comfy.model_patcher.get_key_weight``). What it needs of ModelPatcher's private bookkeeping (the
original weights and object patches of a loaded module, a module tree without per-load state, a
new patcher with the template's options) comes from ``adapters/comfy_internals.py``.

* ``fused_module``       a new module holding the weights with all patches applied (ADD LoRA Merge,
                          and the training job's frozen copy in adapters/model.py).
* ``patcher_around``     a new ModelPatcher over such a module, with the template's options.
* ``effective_weights``  the same weights one layer at a time, in fp32 (ADD Extract LoRA).
* ``weights_fingerprint`` a short hash of the base weights (the merge record; training runs).
"""
from __future__ import annotations

import torch

import comfy.float
import comfy.lora
import comfy.model_patcher
import comfy.utils

from ..core.fingerprint import sampled_fingerprint
from . import comfy_internals as internals


# --------------------------------------------------------------------------------------------
# building a fused copy
# --------------------------------------------------------------------------------------------
def fused_module(patcher, compute_device=None) -> torch.nn.Module:
    """A new module holding ``patcher``'s weights with all its weight patches applied.

    Layer by layer: each weight is computed from the ORIGINAL weight (ComfyUI's backup when the
    shared module is currently patched) in fp32 scratch, rounded to the weight's dtype exactly
    like ``ModelPatcher.patch_weight_to_device`` does, and stored on the offload device. Peak
    memory: the original + this copy + one layer of fp32 scratch.
    """
    key_patches = internals.key_patches(patcher)
    offload = patcher.offload_device
    with internals.ejected(patcher):  # the module as loaded, without the patcher's injections
        new = internals.copy_module_tree(patcher.model)
    for k, orig_obj in internals.object_patch_originals(patcher).items():  # undo object patches on the shared module
        comfy.utils.set_attr(new, k, orig_obj)
    buffers = internals.original_buffers(patcher)
    done: dict[int, torch.Tensor] = {}
    pbar = comfy.utils.ProgressBar(max(1, sum(1 for _, _, p in key_patches.values() if p)))  # one tick per fused weight
    with torch.no_grad():
        for mod_name, m in new.named_modules(remove_duplicate=True):
            for pname, t in list(m._parameters.items()):
                if t is None:
                    continue
                key = f"{mod_name}.{pname}" if mod_name else pname
                src, convert, patches = key_patches.get(key, (t, None, []))
                if id(src) in done and not patches:
                    m._parameters[pname] = done[id(src)]
                    continue
                if patches:
                    dev = compute_device if compute_device is not None else src.device
                    scratch = src.to(device=dev, dtype=torch.float32, copy=True)
                    if convert is not None:
                        scratch = convert(scratch, inplace=True)
                    out = comfy.lora.calculate_weight(patches, scratch, key)
                    pbar.update(1)
                    _, set_func, _ = comfy.model_patcher.get_key_weight(new, key)
                    seed = internals.weight_seed(key)
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
                    b = buffers.get(f"{mod_name}.{bname}" if mod_name else bname, b)
                    m._buffers[bname] = b.detach().to(device=offload, copy=True)
    if hasattr(new, "device"):
        new.device = offload
    return new


def patcher_around(template, module: torch.nn.Module):
    """A ModelPatcher like ``template`` (options, wrappers, object patches) over ``module``, with no
    weight patches: the weights already contain them (``comfy_internals.patcher_like``)."""
    return internals.patcher_like(template, module)


# --------------------------------------------------------------------------------------------
# reading weights
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def effective_weights(patcher, prefix="diffusion_model."):
    """Yield (key, weight in fp32) with the patcher's patches applied, one layer at a time."""
    for key, (w, convert, patches) in internals.key_patches(patcher, prefix).items():
        t = convert(w.to(torch.float32, copy=True), inplace=True)
        if patches:
            t = comfy.lora.calculate_weight(patches, t, key)
        yield key, t


def weights_fingerprint(model) -> str:
    """Identifies the base checkpoint of a MODEL: core/fingerprint.py's hash of its UNet weights as
    loaded (before any patch)."""
    return sampled_fingerprint({k: w for k, (w, _, _) in internals.key_patches(model, "diffusion_model.").items()})

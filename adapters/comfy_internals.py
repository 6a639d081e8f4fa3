"""Every ComfyUI private attribute or internal structure the plugin touches, in one place.

ComfyUI has no stable Python API below its node interface: a plugin that copies a model, drives a
sampler function or watches the queue has to read fields that upstream may rename or extend in
any release. This module is the only file of the plugin that does; everything else calls the small
named functions below, and ``tests/test_layers.py`` fails when a file in ``nodes/``, ``adapters/``,
``core/`` or ``training/`` reads such a name itself. ``tests/test_comfy_internals.py`` runs every
function against the ComfyUI in the test process and fails with the field's name when the host no
longer has what a function expects (e.g. a new ``ModelPatcher`` field nobody decided about).

Each function says which ComfyUI structure it touches. Checked against ComfyUI 0.3.75 (the
vendored test host) and upstream v0.33.0; where the two differ, both are handled and the
docstring says so.

Model copies
  :func:`copy_module_tree`       a module tree sharing no containers, without per-load state
  :func:`key_patches`            (original weight, convert, patches) per state-dict key
  :func:`object_patch_originals` objects a loaded patcher replaced on the shared module
  :func:`original_buffers`       buffers a loaded patcher cast (v0.33 dynamic VRAM)
  :func:`ejected`                the shared module with the patcher's injections taken out
  :func:`weight_seed`            ComfyUI's per-key rounding seed
  :func:`patcher_like`           a new ModelPatcher (public constructor) with a template's options
  :func:`clip_like`              a CLIP clone around another text-encoder module
  :func:`plain_torch_modules_`   ComfyUI ops -> their torch base classes (training copy)
  :func:`is_quantized_layer`     a layer whose weights a plain torch layer cannot use
  :func:`compute_dtype`, :func:`set_compute_dtype_`  the dtype a BaseModel's UNet runs in
Sampling
  :func:`sampler_model_sampling`, :func:`sampler_guider`, :func:`sampler_model_options`
  :func:`guider_predict_positive`, :func:`guider_predict_cond`, :func:`guider_has_cond`
Model management and server
  :func:`loaded_base_models`, :func:`prompt_server`, :func:`tasks_remaining`
transformer_options and model_options
  :func:`per_call_patches`, :func:`weights_streamed`, :func:`without_diffusion_model_wrappers`,
  :func:`diffusion_model_wrapper_count`, :func:`model_option`, :func:`set_model_option`,
  :func:`unet_function_wrapper`
LoRA patches and plugin state on ComfyUI objects
  :func:`lora_up_down`, :func:`diff_patch_weight`, :func:`plugin_state`
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Optional

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import comfy.utils

from ..core.errors import ADDError

# --------------------------------------------------------------------------------------------
# ModelPatcher fields: what a copy built by patcher_like takes from its template
# --------------------------------------------------------------------------------------------
# Every field ``ModelPatcher.__init__`` sets, in one of two tables. A host whose fresh patcher has a
# field in neither fails tests/test_comfy_internals.py with that field's name: decide whether a
# copy must carry it (PATCHER_OPTION_FIELDS) or start it fresh (PATCHER_FRESH_FIELDS).
#
# Option state: what the user asked for on this MODEL (the way clone() copies it).
PATCHER_OPTION_FIELDS: dict[str, str] = {
    "model_options": "sampler options, transformer_options (patches, wrappers by key): deep-copied",
    "object_patches": "objects to put on the module at load (e.g. model_sampling)",
    "weight_wrapper_patches": "weight functions per key",
    "force_cast_weights": "flag",
    "weight_inplace_update": "constructor argument",
    "attachments": "extension objects (on_model_patcher_clone when they have it)",
    "additional_models": "models loaded alongside (cloned)",
    "callbacks": "callbacks by type and key",
    "wrappers": "wrappers by type and key",
    "injections": "PatcherInjection lists by key",
    "skip_injection": "flag",
    "hook_patches": "weight hooks (applied at sampling time on top of the weights)",
    "hook_patches_backup": "hook_patches saved during a hooked sampling (None outside one)",
    "forced_hooks": "hooks always applied (CLIP)",
    "is_clip": "flag",
    "hook_mode": "EnumHookMode",
}
# Fresh: tied to the old module, its weights or its load; the copy starts with the constructor's value.
PATCHER_FRESH_FIELDS: dict[str, str] = {
    "model": "the new module (constructor argument)",
    "load_device": "constructor argument (the template's)",
    "offload_device": "constructor argument (the template's)",
    "size": "measured from the new module on first use",
    "patches": "weight patches: already fused into the new module's weights",
    "patches_uuid": "identity of the patch set",
    "backup": "original weights of a loaded, patched module",
    "backup_buffers": "original buffers of a dynamically loaded module (v0.33; not in 0.3.75)",
    "object_patches_backup": "originals of object patches applied at load",
    "pinned": "keys pinned in host memory",
    "parent": "the patcher this one was cloned from",
    "is_injected": "whether injections are applied to the module (the copy is made ejected)",
    "hook_backup": "original weights while hook patches are applied",
    "cached_hook_patches": "hooked weights computed from the old weights",
    "current_hooks": "hooks applied to the old module's weights right now",
    "cached_patcher_init": "loader call that rebuilds the ORIGINAL weights (v0.33; not in 0.3.75): "
                           "would lose the fused patches",
    "is_multigpu_base_clone": "multi-GPU bookkeeping (v0.33; not in 0.3.75)",
    "clone_base_uuid": "identity of the weights shared by clones (v0.33; not in 0.3.75)",
    "non_dynamic_delegate_model": "ModelPatcherDynamic's non-dynamic twin (v0.33; not in 0.3.75)",
}

# Known fields a host may lack: added upstream after 0.3.75, or set by a subclass only.
PATCHER_FIELDS_NOT_EVERYWHERE: dict[str, str] = {
    "backup_buffers": "since v0.33", "cached_patcher_init": "since v0.33", "is_multigpu_base_clone": "since v0.33",
    "clone_base_uuid": "since v0.33", "non_dynamic_delegate_model": "v0.33's ModelPatcherDynamic only",
}

# What ModelPatcher.__init__ hangs on the ROOT module when it is missing (both versions), plus
# BaseModel's current_patcher: per-load bookkeeping a copy starts again with.
ROOT_PER_LOAD_DEFAULTS: dict[str, Any] = {
    "model_loaded_weight_memory": 0, "lowvram_patch_counter": 0, "model_lowvram": False,
    "current_weight_patches_uuid": None, "model_offload_buffer_memory": 0, "current_patcher": None,
}
# ModelPatcherDynamic's root state (v0.33 dynamic VRAM: the original's GPU address space, pinned
# host buffers, registered patchers). Dropped from a copy; a dynamic patcher recreates it.
ROOT_DYNAMIC_STATE = ("dynamic_vbars", "dynamic_pins", "dynamic_patchers")
# What loading puts on each module of the tree: lowvram weight functions, the patched flag, the
# saved cast flag (both versions); forced casts, per-module dynamic-VRAM state, prefetch and pinned
# buffers (v0.33). Dropped from a copy (``weight_function``/``bias_function`` reset to empty lists,
# ``prev_comfy_cast_weights`` restored into ``comfy_cast_weights``).
MODULE_PER_LOAD_STATE = (
    "comfy_patched_weights", "comfy_force_cast_weights", "seed_key", "weight_lowvram_function",
    "bias_lowvram_function", "_v", "_v_signature", "_v_weight", "_v_bias", "_v_block", "_v_block_faulted",
    "_pin_state", "_prefetch", "_pins", "_comfy_graph",
)
MODULE_WEIGHT_FUNCTIONS = ("weight_function", "bias_function")
MODULE_SAVED_CAST_FLAG = ("prev_comfy_cast_weights", "comfy_cast_weights")  # (saved, live)


# --------------------------------------------------------------------------------------------
# model copies
# --------------------------------------------------------------------------------------------
def copy_module_tree(root: torch.nn.Module) -> torch.nn.Module:
    """A new module tree sharing no containers with ``root`` (tensors still shared until replaced).

    Cheaper than deepcopy (no tensor is copied) and safe while ``root`` is loaded: every module is
    rebuilt with ``cls.__new__`` and a copy of its ``__dict__`` (there is no public way to copy a
    module tree without its tensors), and the per-load state ComfyUI hangs on modules
    (MODULE_PER_LOAD_STATE, the weight functions, the saved cast flag) and on the root
    (ROOT_PER_LOAD_DEFAULTS, ROOT_DYNAMIC_STATE) is wiped. Shared submodules stay shared.
    """
    memo: dict[int, torch.nn.Module] = {}
    saved_flag, live_flag = MODULE_SAVED_CAST_FLAG

    def rec(m):
        if id(m) in memo:
            return memo[id(m)]
        cls = type(m)
        new = cls.__new__(cls)
        d = {k: (v.copy() if isinstance(v, (dict, list, set)) and k != "_modules" else v) for k, v in vars(m).items()}
        new.__dict__ = d
        memo[id(m)] = new
        d["_modules"] = {k: (rec(c) if c is not None else None) for k, c in m._modules.items()}
        if saved_flag in d:
            d[live_flag] = d.pop(saved_flag)
        for attr in MODULE_WEIGHT_FUNCTIONS:
            if attr in d:
                d[attr] = []
        for attr in MODULE_PER_LOAD_STATE:
            d.pop(attr, None)
        return new

    out = rec(root)
    d = vars(out)
    for k, v in ROOT_PER_LOAD_DEFAULTS.items():
        if k in d:
            d[k] = v
    for k in ROOT_DYNAMIC_STATE:
        d.pop(k, None)
    return out


def key_patches(patcher, prefix: Optional[str] = None) -> dict[str, tuple[torch.Tensor, Callable, list]]:
    """``{key: (original weight, convert, patches)}`` for every state-dict key (under ``prefix``).

    Unpacks ``ModelPatcher.get_key_patches``, whose values are ``[(weight, convert_func)] + patches``
    (the weight is ComfyUI's backup while the shared module is patched; same layout in 0.3.75 and
    v0.33). ``patches`` is empty for an unpatched key.
    """
    return {k: (v[0][0], v[0][1], list(v[1:])) for k, v in patcher.get_key_patches(prefix).items()}


def object_patch_originals(patcher) -> dict[str, Any]:
    """``{name: original object}`` of the object patches a loaded patcher applied to the shared
    module (``ModelPatcher.object_patches_backup``; empty while unloaded). Both versions."""
    return dict(patcher.object_patches_backup)


def original_buffers(patcher) -> dict[str, torch.Tensor]:
    """``{key: original buffer}`` for buffers a dynamically loaded patcher replaced by cast copies
    (``ModelPatcher.backup_buffers``, since v0.33; 0.3.75 never replaces buffers: empty)."""
    return dict(getattr(patcher, "backup_buffers", None) or {})


def ejected(patcher):
    """Context manager: the shared module with ``patcher``'s injections taken out, put back on exit
    (``ModelPatcher.use_ejected``, both versions; a no-op without injections)."""
    use = getattr(patcher, "use_ejected", None)
    return use() if use is not None else contextlib.nullcontext()


# string_to_seed moved to comfy.utils upstream (the old name in comfy.model_patcher logs a warning on
# every call there); 0.3.75 has it in comfy.model_patcher only.
_string_to_seed = getattr(comfy.utils, "string_to_seed", None) or comfy.model_patcher.string_to_seed


def weight_seed(key: str) -> int:
    """ComfyUI's seed for the stochastic rounding of weight ``key``, as patch_weight_to_device uses
    (``string_to_seed``: comfy.utils in v0.33, comfy.model_patcher in 0.3.75)."""
    return _string_to_seed(key)


def patcher_class(template) -> type:
    """The class a copy of ``template`` is built with: the template's own, as ``clone()`` does (so a
    v0.33 ModelPatcherDynamic stays dynamic; its ``__new__`` reroutes CPU load devices itself)."""
    return type(template)


def patcher_like(template, module: torch.nn.Module):
    """A new ModelPatcher over ``module`` with ``template``'s options and no weight patches.

    Built with the public constructor ``cls(model, load_device, offload_device,
    weight_inplace_update=...)``; only the fields in PATCHER_OPTION_FIELDS are copied (the way
    ``clone()`` copies them), everything in PATCHER_FRESH_FIELDS keeps the constructor's value, and
    the template's ON_CLONE callbacks run as they would for a clone.
    """
    n = patcher_class(template)(module, template.load_device, template.offload_device,
                                weight_inplace_update=template.weight_inplace_update)
    deepcopy_options = getattr(comfy.utils, "deepcopy_list_dict", None) or copy.deepcopy  # v0.33 / 0.3.75
    n.model_options = deepcopy_options(template.model_options)
    n.object_patches = template.object_patches.copy()
    n.weight_wrapper_patches = template.weight_wrapper_patches.copy()
    n.force_cast_weights = template.force_cast_weights
    n.attachments = {k: (a.on_model_patcher_clone() if hasattr(a, "on_model_patcher_clone") else a)
                     for k, a in template.attachments.items()}
    n.additional_models = {k: [m.clone() for m in ms] for k, ms in template.additional_models.items()}
    for table in ("callbacks", "wrappers"):
        setattr(n, table, {k: {k1: list(v1) for k1, v1 in v.items()} for k, v in getattr(template, table).items()})
    n.injections = {k: list(v) for k, v in template.injections.items()}
    n.skip_injection = template.skip_injection
    clone_hooks = comfy.model_patcher.create_hook_patches_clone
    n.hook_patches = clone_hooks(template.hook_patches)
    n.hook_patches_backup = clone_hooks(template.hook_patches_backup) if template.hook_patches_backup else None
    n.forced_hooks = template.forced_hooks.clone() if template.forced_hooks else template.forced_hooks
    n.is_clip = template.is_clip
    n.hook_mode = template.hook_mode
    for callback in template.get_all_callbacks(comfy.patcher_extension.CallbacksMP.ON_CLONE):
        callback(template, n)
    return n


def clip_like(clip, patcher):
    """A clone of the CLIP ``clip`` whose text encoder is ``patcher.model`` and whose patcher is
    ``patcher`` (``CLIP.clone`` shares ``cond_stage_model``/``patcher``; both versions)."""
    n = clip.clone()
    n.cond_stage_model = patcher.model
    n.patcher = patcher
    return n


def _is_comfy_op(cls) -> bool:
    return cls.__module__.startswith("comfy.ops")


def comfy_op_torch_base(cls) -> type | None:
    """The torch.nn layer class a ComfyUI op class (``comfy.ops`` Linear, Conv2d, ...) extends;
    None for a class that is no ComfyUI op or extends only nn.Module."""
    if not _is_comfy_op(cls):
        return None
    base = next((b for b in cls.__mro__ if b.__module__.startswith("torch.nn")), None)
    return None if base is None or base is torch.nn.Module else base


def is_quantized_layer(m: torch.nn.Module) -> bool:
    """Whether ``m`` stores weights a plain torch layer cannot use: scaled fp8 (``scale_weight``),
    ComfyUI's quantized formats (``quant_format``, QuantizedTensor parameters), or a ComfyUI op with
    parameters and no torch base class."""
    cls = type(m)
    return (getattr(m, "scale_weight", None) is not None or getattr(m, "quant_format", None) is not None
            or (_is_comfy_op(cls) and comfy_op_torch_base(cls) is None
                and any(True for _ in m.parameters(recurse=False)))
            or any(type(p) not in (torch.Tensor, torch.nn.Parameter) for p in m.parameters(recurse=False)))


def plain_torch_modules_(module: torch.nn.Module) -> torch.nn.Module:
    """Turn every ComfyUI op (``comfy.ops`` Linear, Conv2d, GroupNorm, ...) of a PRIVATE copy into
    its torch base class, in place: same parameters and attributes, plain torch forward.

    ComfyUI's ops call ``run_every_op()`` in every forward, which checks AND CLEARS the global
    interrupt flag: a background thread running them would swallow the user's Cancel of a
    foreground prompt (and be killed by it). Assigning ``__class__`` is the only way to change the
    forward without rebuilding every layer from its constructor arguments (which differ per class
    and per ComfyUI version); the copy is private, so nothing else sees the change. An op with
    parameters but no torch base is an ADDError.
    """
    for m in module.modules():
        cls = type(m)
        if _is_comfy_op(cls):
            base = comfy_op_torch_base(cls)
            if base is None:
                if any(True for _ in m.parameters(recurse=False)):
                    raise ADDError(f"{cls.__name__} layers cannot run outside ComfyUI's ops; "
                                "load the model unquantized to train it.")
                continue
            m.__class__ = base
    return module


def compute_dtype(network) -> torch.dtype:
    """The dtype a BaseModel computes in: ``manual_cast_dtype`` when ComfyUI casts weights on the
    fly, else the weights' dtype (``BaseModel.get_dtype``). Both versions."""
    return getattr(network, "manual_cast_dtype", None) or network.get_dtype()


def set_compute_dtype_(network, dtype: torch.dtype) -> None:
    """Make a BaseModel run its UNet in ``dtype`` with no on-the-fly cast: ``apply_model`` casts its
    inputs to ``diffusion_model.dtype`` and ``manual_cast_dtype`` (both versions)."""
    network.diffusion_model.dtype = dtype
    if hasattr(network, "manual_cast_dtype"):
        network.manual_cast_dtype = None


# --------------------------------------------------------------------------------------------
# sampling: what a KSAMPLER function and a guider subclass are handed
# --------------------------------------------------------------------------------------------
def sampler_model_sampling(model):
    """The ``model_sampling`` of the BaseModel behind ``model``, the KSamplerX0Inpaint a sampler
    function receives: ``model.inner_model`` (the guider) ``.inner_model`` (the BaseModel), the
    path k-diffusion's own samplers use in ComfyUI (both versions)."""
    return model.inner_model.inner_model.model_sampling


def sampler_guider(model):
    """The guider behind the KSamplerX0Inpaint ``model`` a sampler function receives (None if none)."""
    return getattr(model, "inner_model", None)


def sampler_model_options(extra_args: Optional[dict]) -> dict:
    """The model_options in a sampler function's ``extra_args`` (empty when absent)."""
    return (extra_args or {}).get("model_options", {})


def guider_predict_positive(guider, x, timestep, model_options: Optional[dict] = None, seed=None):
    """x0 of ``guider``'s "positive" cond alone (no uncond, cond_scale 1): ``sampling_function`` on
    the guider's ``inner_model`` (the BaseModel during ``sample``) and ``conds`` (both versions)."""
    return comfy.samplers.sampling_function(guider.inner_model, x, timestep, None, guider.conds.get("positive", None),
                                            1.0, model_options=model_options or {}, seed=seed)


def guider_predict_cond(guider, name: str, x, timestep, model_options: Optional[dict] = None):
    """x0 of ``guider``'s cond ``name`` at (x, timestep): one ``calc_cond_batch`` evaluation."""
    return comfy.samplers.calc_cond_batch(guider.inner_model, [guider.conds[name]], x, timestep, model_options or {})[0]


def guider_has_cond(guider, name: str) -> bool:
    """Whether ``guider`` holds the cond ``name`` (``CFGGuider.conds``, set by ``inner_set_conds``)."""
    return name in getattr(guider, "conds", {})


# --------------------------------------------------------------------------------------------
# model management and the server
# --------------------------------------------------------------------------------------------
def loaded_base_models() -> Optional[list]:
    """The BaseModels ComfyUI's model management holds as loaded (``model_management.loaded_models()``,
    public in both versions); None on a host without it."""
    loaded = getattr(mm, "loaded_models", None)
    if loaded is None:
        return None
    return [p.model for p in loaded() if p is not None and getattr(p, "model", None) is not None]


def prompt_server():
    """ComfyUI's running PromptServer (``server.PromptServer.instance``), or None (no server in this
    process, e.g. the in-process tests and the headless trainer)."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def tasks_remaining(server) -> int:
    """Prompts queued or running on ``server``: ``PromptServer.prompt_queue`` (an
    ``execution.PromptQueue``) ``.get_tasks_remaining()``, the number GET /prompt reports as
    ``queue_remaining`` (both versions)."""
    return int(server.prompt_queue.get_tasks_remaining())


# --------------------------------------------------------------------------------------------
# transformer_options (what a diffusion-model wrapper is called with) and model_options
# --------------------------------------------------------------------------------------------
# transformer_options entries whose non-empty value changes what the forward computes (attention
# and block patches: IP-Adapter, PAG, FreeU, attention couple...); they run per call in Python.
PER_CALL_PATCH_KEYS = ("patches", "patches_replace")
# Set (True) by v0.33's dynamic VRAM when weights are paged in per layer during the forward
# (absent in 0.3.75).
STREAMED_WEIGHTS_KEY = "prefetch_dynamic_vbars"
WRAPPERS_KEY = "wrappers"  # transformer_options[WRAPPERS_KEY][wrapper type][key] -> [wrapper, ...]


def per_call_patches(transformer_options: Optional[dict]) -> dict[str, list[str]]:
    """``{"transformer_options['patches']": [patch names], ...}`` for each non-empty per-call
    patch table of a diffusion-model call (empty when there is none)."""
    opts = transformer_options or {}
    return {f"transformer_options['{k}']": [str(n) for n in opts[k]] for k in PER_CALL_PATCH_KEYS if opts.get(k)}


def weights_streamed(transformer_options: Optional[dict]) -> bool:
    """Whether ComfyUI streams the weights in per layer during this call (v0.33 dynamic VRAM)."""
    return bool((transformer_options or {}).get(STREAMED_WEIGHTS_KEY))


def without_diffusion_model_wrappers(transformer_options: dict) -> dict:
    """A shallow copy whose wrapper table has no DIFFUSION_MODEL entry, so that calling the module's
    forward with it runs the bare forward (not the wrappers again)."""
    opts = dict(transformer_options)
    wrappers = dict(opts.get(WRAPPERS_KEY, {}))
    wrappers.pop(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, None)
    opts[WRAPPERS_KEY] = wrappers
    return opts


def diffusion_model_wrapper_count(transformer_options: dict) -> int:
    """How many DIFFUSION_MODEL wrappers run around this call (every key; public
    ``patcher_extension.get_all_wrappers``)."""
    pe = comfy.patcher_extension
    return len(pe.get_all_wrappers(pe.WrappersMP.DIFFUSION_MODEL, transformer_options))


def model_option(model, key: str, default=None):
    """``model.model_options[key]``: where a plugin keeps its own per-MODEL record (``clone()``
    copies it: deepcopy in 0.3.75, deepcopy_list_dict in v0.33)."""
    return model.model_options.get(key, default)


def set_model_option(model, key: str, value) -> None:
    """Store ``value`` under ``key`` in ``model.model_options`` (see :func:`model_option`)."""
    model.model_options[key] = value


def unet_function_wrapper(model):
    """The wrapper ``set_model_unet_function_wrapper`` installed on ``model`` (None if none), to chain
    a new one around it (``model_options['model_function_wrapper']``, both versions)."""
    return model.model_options.get("model_function_wrapper")


# --------------------------------------------------------------------------------------------
# LoRA patches (comfy.lora.load_lora's values) and plugin state on ComfyUI objects
# --------------------------------------------------------------------------------------------
def lora_up_down(adapter, plain: bool = True) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(up, down) of a LoRA patch (``comfy.weight_adapter.LoRAAdapter``, ``name == "lora"``, whose
    ``weights`` are (up, down, alpha, mid, dora_scale, reshape) in both versions); None for any other
    adapter and, with ``plain``, for a LoRA with a mid (LoCon) or reshape weight."""
    weights = getattr(adapter, "weights", None)
    if getattr(adapter, "name", "") != "lora" or weights is None:
        return None
    if plain and (weights[3] is not None or weights[5] is not None):
        return None
    return weights[0], weights[1]


def diff_patch_weight(adapter) -> Optional[torch.Tensor]:
    """The full weight of a ``("diff", (weight, ...))`` patch (load_lora's format for .diff keys); None otherwise."""
    if isinstance(adapter, tuple) and len(adapter) == 2 and adapter[0] == "diff":
        return adapter[1][0]
    return None


def plugin_state(obj, name: str, factory: Callable[[], Any] = dict):
    """A value the plugin keeps on a ComfyUI object (e.g. converted copies on a VAE), created with
    ``factory`` on first use; it lives exactly as long as ``obj``. ``name`` should start with
    ``_add_`` so that it cannot clash with ComfyUI's own fields."""
    state = vars(obj)
    if name not in state:
        state[name] = factory()
    return state[name]


def checkpoint_state_dict(model, clip, vae) -> dict:
    """The tensors ``comfy.sd.save_checkpoint`` writes (the MODEL's patched weights, CLIP, VAE); the
    caller has loaded them with ``force_patch_weights``.

    From 0.33 ``ModelPatcher.state_dict_for_saving(clip, vae, clip_vision)`` builds the UNet part and
    ``BaseModel.state_dict_for_saving`` takes that UNet dict first; before, the BaseModel's took
    ``(clip, vae, clip_vision)``. Likewise a CLIP's ``state_dict_for_saving`` (0.33) over ``get_sd``."""
    clip_sd = None
    if clip is not None:
        clip_sd = clip.state_dict_for_saving() if hasattr(clip, "state_dict_for_saving") else clip.get_sd()
    vae_sd = vae.get_sd() if vae is not None else None
    if hasattr(model, "state_dict_for_saving"):
        return model.state_dict_for_saving(clip_sd, vae_sd, None)
    return model.model.state_dict_for_saving(clip_sd, vae_sd, None)


def host_noise_sampler(x: torch.Tensor, extra_args: Optional[dict]):
    """The host's own noise draws for a sampler function (its ``default_noise_sampler`` with the
    prompt's seed), so ADD sampling equals the host's LCM sampler draw for draw: from 0.33 the host
    seeds CPU draws with seed + 1."""
    import comfy.k_diffusion.sampling

    return comfy.k_diffusion.sampling.default_noise_sampler(x, seed=(extra_args or {}).get("seed"))


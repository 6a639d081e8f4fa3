"""adapters/comfy_internals.py, the one module that reads ComfyUI's private fields and internal
structures, against the ComfyUI in this process: every function finds what it expects on this host,
or a test fails naming the field. And the rule that makes the module worth having: no other file in
nodes/, adapters/, core/ or training/ reads such a name (an AST scan, proved to catch each kind).

``ADD_OTHER_COMFYUI=/path/to/ComfyUI`` also checks the ModelPatcher field tables against that
tree's source (e.g. an upstream release next to the vendored host).
"""
from __future__ import annotations

import ast
import inspect
import os
import re
import textwrap
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def CI(plugin):
    return plugin("adapters.comfy_internals")


def _known_fields(CI) -> set[str]:
    return set(CI.PATCHER_OPTION_FIELDS) | set(CI.PATCHER_FRESH_FIELDS)


def _fresh_patcher(module=None):
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(module if module is not None else torch.nn.Linear(2, 2), CPU, CPU)


# ------------------------------------------------------------------------------------------
# ModelPatcher fields: the copy's tables against the host
# ------------------------------------------------------------------------------------------
def test_the_field_tables_do_not_overlap(CI):
    both = set(CI.PATCHER_OPTION_FIELDS) & set(CI.PATCHER_FRESH_FIELDS)
    assert not both, f"fields both copied and fresh: {sorted(both)}"
    assert set(CI.PATCHER_FIELDS_NOT_EVERYWHERE) <= _known_fields(CI)


def test_a_fresh_patcher_has_no_field_the_copy_does_not_know(comfy, CI):
    """A new upstream field fails here by name: decide whether patcher_like copies it
    (PATCHER_OPTION_FIELDS) or leaves the constructor's value (PATCHER_FRESH_FIELDS)."""
    unknown = sorted(set(vars(_fresh_patcher())) - _known_fields(CI))
    assert not unknown, (f"ModelPatcher fields comfy_internals does not know: {unknown}; add each to "
                         "PATCHER_OPTION_FIELDS or PATCHER_FRESH_FIELDS")


def test_every_field_the_copy_copies_or_resets_exists_on_this_host(comfy, CI):
    fresh = vars(_fresh_patcher())
    missing = sorted(f for f in _known_fields(CI) if f not in fresh and f not in CI.PATCHER_FIELDS_NOT_EVERYWHERE)
    assert not missing, f"this host's ModelPatcher has no field(s) {missing} that comfy_internals.patcher_like expects"


def _init_fields(source: str, classes=("ModelPatcher", "ModelPatcherDynamic")) -> dict[str, set[str]]:
    """``self.<name> = ...`` targets of each class's __init__ in a model_patcher.py source."""
    out = {}
    for cls in ast.parse(source).body:
        if isinstance(cls, ast.ClassDef) and cls.name in classes:
            for fn in cls.body:
                if isinstance(fn, ast.FunctionDef) and fn.name == "__init__":
                    out[cls.name] = {t.attr for n in ast.walk(fn) if isinstance(n, (ast.Assign, ast.AnnAssign))
                                     for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                                     if isinstance(t, ast.Attribute) and getattr(t.value, "id", "") == "self"}
    return out


def _model_patcher_sources() -> list[tuple[str, str]]:
    import comfy.model_patcher

    sources = [("this host", inspect.getsource(comfy.model_patcher))]
    other = os.environ.get("ADD_OTHER_COMFYUI")
    if other:
        sources.append((other, (Path(other) / "comfy" / "model_patcher.py").read_text(encoding="utf-8")))
    return sources


def test_every_field_any_constructor_sets_is_known(comfy, CI):
    """The constructors' source (ModelPatcher and, where it exists, ModelPatcherDynamic), which also
    sees fields set only on some paths."""
    for where, source in _model_patcher_sources():
        fields = _init_fields(source)
        assert "ModelPatcher" in fields, f"{where}: no ModelPatcher.__init__ found"
        for cls, names in fields.items():
            unknown = sorted(names - _known_fields(CI))
            assert not unknown, f"{where}: {cls}.__init__ sets fields comfy_internals does not know: {unknown}"
        missing = sorted(f for f in _known_fields(CI) - set().union(*fields.values())
                         if f not in CI.PATCHER_FIELDS_NOT_EVERYWHERE)
        assert not missing, f"{where}: ModelPatcher.__init__ no longer sets {missing}"


def test_root_state_a_patcher_adds_is_what_the_copy_resets(comfy, CI):
    module = torch.nn.Linear(2, 2)
    before = set(vars(module))
    _fresh_patcher(module)
    added = {k: v for k, v in vars(module).items() if k not in before}
    unknown = sorted(set(added) - set(CI.ROOT_PER_LOAD_DEFAULTS) - set(CI.ROOT_DYNAMIC_STATE) - {"device"})
    assert not unknown, f"ModelPatcher puts {unknown} on the root module; copy_module_tree must reset or drop it"
    wrong = {k: v for k, v in added.items() if k in CI.ROOT_PER_LOAD_DEFAULTS and v != CI.ROOT_PER_LOAD_DEFAULTS[k]}
    assert not wrong, f"a fresh patcher starts these root fields elsewhere: {wrong}"


def _ops_tree():
    import comfy.ops

    ops = comfy.ops.disable_weight_init
    return torch.nn.Sequential(ops.Linear(4, 4), ops.Conv2d(4, 4, 1), ops.GroupNorm(2, 4))


def test_per_load_module_state_is_known_and_the_copy_wipes_it(comfy, CI):
    """A lowvram load hangs weight functions and flags on every op; each one is in the tables, and
    copy_module_tree of the loaded tree holds none of it."""
    module = _ops_tree()
    before = {id(m): set(vars(m)) for m in module.modules()}
    mp = _fresh_patcher(module)
    mp.add_patches({"0.weight": ("diff", (torch.ones(4, 4),))}, 1.0)
    mp.load(CPU, lowvram_model_memory=1)
    try:
        known = set(CI.MODULE_PER_LOAD_STATE) | set(CI.MODULE_WEIGHT_FUNCTIONS) | set(CI.MODULE_SAVED_CAST_FLAG)
        for name, m in module.named_modules():
            if m is module:
                continue
            unknown = sorted(set(vars(m)) - before[id(m)] - known)
            assert not unknown, f"loading puts {unknown} on module {name!r}: add them to MODULE_PER_LOAD_STATE"
        assert module[0].weight_function, "the patched layer got no lowvram weight function: nothing was tested"
        copy = CI.copy_module_tree(module)
        saved, live = CI.MODULE_SAVED_CAST_FLAG
        for (name, m), orig in zip(copy.named_modules(), module.modules()):
            assert m is not orig and type(m) is type(orig)
            left = sorted(set(vars(m)) & (set(CI.MODULE_PER_LOAD_STATE) | {saved}))
            assert not left, f"the copy of {name!r} keeps per-load state {left}"
            if name:
                assert m.weight_function == [] and m.bias_function == []
                assert getattr(m, live) == vars(orig)[saved]  # the cast flag from before the load
                assert m.weight is orig.weight  # tensors shared until replaced
    finally:
        mp.detach()


def test_copy_module_tree_resets_root_bookkeeping(comfy, CI):
    module = _ops_tree()
    _fresh_patcher(module)
    module.model_loaded_weight_memory, module.model_lowvram, module.dynamic_vbars = 123, True, {}
    copy = CI.copy_module_tree(module)
    assert copy.model_loaded_weight_memory == 0 and copy.model_lowvram is False
    assert not hasattr(copy, "dynamic_vbars") and module.model_loaded_weight_memory == 123


# ------------------------------------------------------------------------------------------
# the fused copy's patcher, weights and object patches
# ------------------------------------------------------------------------------------------
def test_patcher_like_takes_the_options_and_starts_the_rest_fresh(comfy, CI, sd15):
    import comfy.patcher_extension as pe

    template = sd15[0].clone()
    cloned = []
    template.add_callback_with_key(pe.CallbacksMP.ON_CLONE, "t", lambda old, new: cloned.append((old, new)))
    template.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "t", lambda executor, *a, **k: executor(*a, **k))
    template.set_model_attn2_patch(lambda q, k, v, extra_options: (q, k, v))
    template.add_object_patch("model_sampling", template.get_model_object("model_sampling"))
    template.model_options["add_test"] = {"a": [1]}
    template.add_patches({k: ("diff", (torch.zeros_like(w),)) for k, (w, _, _) in
                          list(CI.key_patches(template, "diffusion_model.").items())[:1]}, 1.0)
    module = CI.copy_module_tree(template.model)
    n = CI.patcher_like(template, module)
    fresh = vars(_fresh_patcher())
    assert type(n) is type(template) and n.model is module
    assert cloned == [(template, n)]  # ON_CLONE ran as for a clone
    for field in CI.PATCHER_OPTION_FIELDS:
        if hasattr(template, field):
            assert getattr(n, field) == getattr(template, field), f"patcher_like did not copy {field}"
    assert n.model_options is not template.model_options and n.model_options["add_test"] is not template.model_options["add_test"]
    for field in CI.PATCHER_FRESH_FIELDS:
        if field in fresh and field not in ("model", "load_device", "offload_device", "size"):
            value = getattr(n, field)
            assert type(value) is type(fresh[field]), f"{field} is not the constructor's"
            if isinstance(value, (dict, list, set, bool)) or value is None:
                assert value == fresh[field], f"{field} is not the constructor's"
    assert n.patches_uuid != template.patches_uuid and n.parent is None and not n.patches
    assert (n.load_device, n.offload_device) == (template.load_device, template.offload_device)


def test_key_patches_unpacks_the_patch_lists(comfy, CI, sd15):
    model = sd15[0].clone()
    key = next(k for k in model.model.state_dict() if k.startswith("diffusion_model.") and k.endswith(".weight"))
    model.add_patches({key: ("diff", (torch.zeros(model.model.state_dict()[key].shape),))}, 0.5)
    kp = CI.key_patches(model, "diffusion_model.")
    w, convert, patches = kp[key]
    assert torch.is_tensor(w) and w.shape == model.model.state_dict()[key].shape and callable(convert)
    assert len(patches) == 1 and patches[0][0] == 0.5  # (strength, adapter, ...) as ComfyUI stores it
    assert all(not p for k, (_, _, p) in kp.items() if k != key)


def test_object_patch_originals_and_buffers_of_a_loaded_patcher(comfy, CI, sd15):
    import comfy.model_management as mm

    model = sd15[0].clone()
    original = model.get_model_object("model_sampling")
    replacement = type(original)(model.model.model_config)
    model.add_object_patch("model_sampling", replacement)
    mm.load_models_gpu([model])
    try:
        assert model.model.model_sampling is replacement
        assert CI.object_patch_originals(model) == {"model_sampling": original}
        assert isinstance(CI.original_buffers(model), dict)
        with CI.ejected(model):
            pass
    finally:
        mm.unload_all_models()
    assert model.model.model_sampling is original


def test_weight_seed_and_the_quantized_checks(comfy, CI):
    import comfy.ops

    assert CI.weight_seed("a.weight") == CI.weight_seed("a.weight") != CI.weight_seed("b.weight")
    ops = comfy.ops.disable_weight_init
    assert CI.comfy_op_torch_base(ops.Linear) is torch.nn.Linear
    assert CI.comfy_op_torch_base(ops.Conv2d) is torch.nn.Conv2d and CI.comfy_op_torch_base(torch.nn.Linear) is None
    assert not CI.is_quantized_layer(ops.Linear(2, 2))
    scaled = ops.Linear(2, 2)
    scaled.scale_weight = torch.ones(())
    assert CI.is_quantized_layer(scaled)


def test_plain_torch_modules_gives_the_same_forward_without_comfy_ops(comfy, CI):
    tree = _ops_tree()
    for p in tree.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(1, 4, 3, 3)
    want = tree[2](tree[1](x))
    CI.plain_torch_modules_(tree)
    assert [type(m) for m in tree] == [torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm]
    assert torch.equal(tree[2](tree[1](x)), want)


def test_compute_dtype_and_clip_like(comfy, CI, sd15):
    model, clip = sd15[0], sd15[1]
    assert CI.compute_dtype(model.model) == model.model.get_dtype()
    assert hasattr(model.model, "manual_cast_dtype") and hasattr(model.model.diffusion_model, "dtype")
    patcher = CI.patcher_like(clip.patcher, CI.copy_module_tree(clip.patcher.model))
    new = CI.clip_like(clip, patcher)
    assert new.patcher is patcher and new.cond_stage_model is patcher.model
    assert clip.cond_stage_model is clip.patcher.model is not patcher.model
    assert new.tokenize("a cat")  # a working CLIP


# ------------------------------------------------------------------------------------------
# sampling: what a sampler function and a guider receive on this host
# ------------------------------------------------------------------------------------------
def test_sampler_accessors_inside_a_real_sampling(comfy, CI, sd15):
    import comfy.samplers

    model = sd15[0]
    g = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    seen = {}

    def sampler(m, x, sigmas, extra_args=None, callback=None, disable=None):
        guider = CI.sampler_guider(m)
        seen.update(ms=CI.sampler_model_sampling(m), guider=guider, opts=CI.sampler_model_options(extra_args),
                    has=(CI.guider_has_cond(guider, "positive"), CI.guider_has_cond(guider, "negative")))
        sigma = sigmas[:1].expand(x.shape[0])
        seen["pos"] = CI.guider_predict_positive(guider, x, sigma, seen["opts"])
        seen["cond"] = CI.guider_predict_cond(guider, "positive", x, sigma, seen["opts"])
        return x

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, positive)
    guider.set_cfg(1.0)
    ms = model.get_model_object("model_sampling")
    sigmas = torch.stack([ms.sigma(torch.tensor(999.0)), torch.tensor(0.0)])
    guider.sample(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), comfy.samplers.KSAMPLER(sampler), sigmas, seed=0,
                  disable_pbar=True)
    assert seen["ms"] is ms and seen["guider"] is guider and seen["has"] == (True, True)
    assert "transformer_options" in seen["opts"]
    assert seen["pos"].shape == (1, 4, 8, 8) and torch.allclose(seen["pos"], seen["cond"], atol=1e-5)
    assert CI.sampler_model_options(None) == {} and CI.sampler_guider(object()) is None


def test_transformer_options_accessors_inside_a_real_call(comfy, CI, sd15):
    import comfy.patcher_extension as pe
    import comfy.samplers

    model = sd15[0].clone()
    model.set_model_attn2_patch(lambda q, k, v, extra_options: (q, k, v))
    seen = {}

    def wrapper(executor, x, *args, **kwargs):
        opts = args[4] if len(args) > 4 else kwargs["transformer_options"]
        seen.update(patches=CI.per_call_patches(opts), streamed=CI.weights_streamed(opts),
                    count=CI.diffusion_model_wrapper_count(opts),
                    bare=CI.diffusion_model_wrapper_count(CI.without_diffusion_model_wrappers(opts)),
                    kept=CI.diffusion_model_wrapper_count(opts))
        return executor(x, *args, **kwargs)

    model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "add_test", wrapper)
    positive = [[torch.randn(1, 77, 768), {}]]
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, positive)
    guider.set_cfg(1.0)
    sigmas = torch.tensor([14.6, 0.0])
    guider.sample(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), comfy.samplers.KSAMPLER(
        lambda m, x, s, extra_args=None, **kw: m(x, s[:1].expand(x.shape[0]), **(extra_args or {}))), sigmas, seed=0,
        disable_pbar=True)
    assert seen["patches"] == {"transformer_options['patches']": ["attn2_patch"]}
    assert seen["streamed"] is False and seen["count"] == seen["kept"] == 1 and seen["bare"] == 0
    assert CI.weights_streamed({CI.STREAMED_WEIGHTS_KEY: True}) and CI.per_call_patches(None) == {}
    assert CI.per_call_patches({"patches_replace": {"attn1": {}}, "patches": {}}) == {
        "transformer_options['patches_replace']": ["attn1"]}


def test_model_options_accessors(comfy, CI, sd15):
    model = sd15[0].clone()
    assert CI.unet_function_wrapper(model) is None and CI.model_option(model, "add_test") is None
    w = lambda apply_model, args: apply_model(args["input"], args["timestep"], **args["c"])  # noqa: E731
    model.set_model_unet_function_wrapper(w)
    CI.set_model_option(model, "add_test", {"loras": [1]})
    clone = model.clone()
    assert CI.unet_function_wrapper(clone) is w
    assert CI.model_option(clone, "add_test") == {"loras": [1]} and CI.model_option(clone, "add_test") is not \
        CI.model_option(model, "add_test")


# ------------------------------------------------------------------------------------------
# model management, the queue, LoRA patch layouts, plugin state
# ------------------------------------------------------------------------------------------
def test_loaded_base_models_follows_loads_and_unloads(comfy, CI, sd15):
    import comfy.model_management as mm

    mm.unload_all_models()
    assert sd15[0].model not in CI.loaded_base_models()
    mm.load_models_gpu([sd15[0]])
    assert any(m is sd15[0].model for m in CI.loaded_base_models())
    mm.unload_all_models()
    assert not any(m is sd15[0].model for m in CI.loaded_base_models())


def test_tasks_remaining_reads_the_hosts_prompt_queue(comfy, CI):
    import execution

    from scripts.comfy_host import host_path

    server = types.SimpleNamespace(queue_updated=lambda: None)
    server.prompt_queue = execution.PromptQueue(server)
    assert CI.tasks_remaining(server) == 0
    server.prompt_queue.put((0, "prompt-id"))
    assert CI.tasks_remaining(server) == 1
    source = (host_path() / "server.py").read_text(encoding="utf-8")
    assert re.search(r"self\.prompt_queue\s*=\s*execution\.PromptQueue\(self\)", source), \
        "this host's PromptServer no longer creates its prompt_queue: comfy_internals.tasks_remaining needs it"
    assert CI.prompt_server() is None or hasattr(CI.prompt_server(), "prompt_queue")


def test_lora_patch_layouts(comfy, CI):
    import comfy.lora

    up, down, mid = torch.randn(6, 2), torch.randn(2, 5), torch.randn(2, 2, 1, 1)
    patches = comfy.lora.load_lora({"a.lora_up.weight": up, "a.lora_down.weight": down,
                                    "b.lora_up.weight": up, "b.lora_down.weight": down, "b.lora_mid.weight": mid,
                                    "c.diff": torch.ones(3)}, {"a": "ka", "b": "kb", "c": "kc"}, log_missing=False)
    got = CI.lora_up_down(patches["ka"])
    assert got is not None and got[0] is up and got[1] is down
    assert CI.lora_up_down(patches["kb"]) is None and CI.lora_up_down(patches["kb"], plain=False)[0] is up
    assert torch.equal(CI.diff_patch_weight(patches["kc"]), torch.ones(3))
    assert CI.diff_patch_weight(patches["ka"]) is None and CI.lora_up_down(patches["kc"]) is None


def test_plugin_state_lives_on_the_object(CI):
    obj = types.SimpleNamespace()
    first = CI.plugin_state(obj, "_add_test")
    assert first == {} and CI.plugin_state(obj, "_add_test") is first and obj._add_test is first


# ------------------------------------------------------------------------------------------
# nothing outside comfy_internals.py reads a private ComfyUI name
# ------------------------------------------------------------------------------------------
SCANNED = ("nodes", "adapters", "core", "training")
INTERNALS = ROOT / "adapters" / "comfy_internals.py"
# Fields and methods of ComfyUI objects whose use moved into comfy_internals.py (see its functions).
PRIVATE_ATTRS = {
    "inner_model",            # KSamplerX0Inpaint -> guider -> BaseModel (sampler_model_sampling, sampler_guider)
    "conds",                  # CFGGuider.conds (guider_predict_*, guider_has_cond)
    "current_loaded_models",  # model_management's list (loaded_base_models)
    "prompt_queue",           # PromptServer's queue (tasks_remaining)
    "model_options",          # ModelPatcher.model_options (model_option, unet_function_wrapper)
    "get_key_patches",        # its [(weight, convert)] + patches layout (key_patches)
    "patches", "patches_uuid", "backup", "backup_buffers", "object_patches_backup", "hook_backup",
    "cached_hook_patches", "hook_patches_backup", "pinned", "cached_patcher_init", "clone_base_uuid",
    "is_multigpu_base_clone", "use_ejected",  # ModelPatcher bookkeeping (patcher_like, object_patch_originals, ...)
    "manual_cast_dtype",      # BaseModel's on-the-fly cast (compute_dtype, set_compute_dtype_)
    "string_to_seed",         # moved between comfy modules upstream (string_to_seed)
    "__dict__", "__class__", "__mro__",  # module surgery (copy_module_tree, plain_torch_modules_, plugin_state)
}
# Fields of ComfyUI objects the plugin must not write outside comfy_internals.py.
PRIVATE_WRITES = {"cond_stage_model", "patcher", "model", "dtype"}
# Keys of ComfyUI's option dicts (transformer_options, model_options, a sampler's extra_args).
PRIVATE_KEYS = {"patches", "patches_replace", "prefetch_dynamic_vbars", "wrappers", "model_function_wrapper",
                "model_options", "transformer_options"}
# Strings that name ComfyUI internals wherever they appear (getattr(x, "inner_model"), module checks).
PRIVATE_STRINGS = {"comfy.ops", "prefetch_dynamic_vbars", "patches_replace", "model_function_wrapper",
                   "inner_model", "current_loaded_models", "prompt_queue", "object_patches_backup"}
TORCH_PRIVATE = {"_parameters", "_buffers", "_modules"}  # torch.nn.Module's containers: torch, not ComfyUI
GETATTR_FAMILY = {"getattr", "hasattr", "setattr", "delattr"}


def _scanned_files() -> list[Path]:
    return sorted(p for pkg in SCANNED for p in (ROOT / pkg).rglob("*.py") if p != INTERNALS)


def _defined_names(trees) -> set[str]:
    """Every name the plugin itself defines (functions, classes, variables, arguments, fields its
    classes assign on self/cls): a leading underscore on one of those is the plugin's own privacy,
    not ComfyUI's."""
    names = set()
    for tree in trees:
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(n.name)
            elif isinstance(n, ast.arg):
                names.add(n.arg)
            elif isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]):
                    for e in ast.walk(t):
                        if isinstance(e, ast.Name):
                            names.add(e.id)
                        elif isinstance(e, ast.Attribute) and getattr(e.value, "id", "") in ("self", "cls"):
                            names.add(e.attr)  # a field of the plugin's own class (not x._f = ... on any x)
    return names


def _is_private(name: str, own: set[str]) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__")) \
        and name not in TORCH_PRIVATE and name not in own


def _root_name(node) -> str:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return getattr(node, "id", "")


def _const_str(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def private_accesses(source: str, own: set[str], label: str = "") -> list[str]:
    """Each place in ``source`` that reads a private ComfyUI name, as 'label:line what'."""
    found = []

    def hit(node, what):
        found.append(f"{label}:{node.lineno} {what}")

    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.Attribute):
            if n.attr in PRIVATE_ATTRS:
                hit(n, f".{n.attr}")
            elif _is_private(n.attr, own) and _root_name(n) != "torch":
                hit(n, f".{n.attr} (a private name the plugin does not define)")
        elif isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target]):
                if isinstance(t, ast.Attribute) and t.attr in PRIVATE_WRITES and _root_name(t) not in ("self", "cls"):
                    hit(t, f"writes .{t.attr}")
        elif isinstance(n, ast.Call):
            fn = n.func
            fname = getattr(fn, "id", None)
            if fname == "vars":
                hit(n, "vars() (a __dict__)")
            if fname in GETATTR_FAMILY and len(n.args) >= 2 and (s := _const_str(n.args[1])) is not None:
                if s in PRIVATE_ATTRS or _is_private(s, own):
                    hit(n, f"{fname}(..., {s!r})")
            if isinstance(fn, ast.Attribute) and fn.attr in ("get", "pop", "setdefault") and n.args:
                if _const_str(n.args[0]) in PRIVATE_KEYS:
                    hit(n, f".{fn.attr}({_const_str(n.args[0])!r})")
        elif isinstance(n, ast.Subscript) and _const_str(n.slice) in PRIVATE_KEYS:
            hit(n, f"[{_const_str(n.slice)!r}]")
        elif isinstance(n, ast.Subscript) and isinstance(n.value, ast.Attribute) and n.value.attr == "weights" \
                and isinstance(n.slice, ast.Constant) and isinstance(n.slice.value, int):
            hit(n, f".weights[{n.slice.value}] (a LoRA adapter's weight tuple)")
        elif isinstance(n, ast.Compare) and _const_str(n.left) in PRIVATE_KEYS and \
                any(isinstance(op, (ast.In, ast.NotIn)) for op in n.ops):
            hit(n, f"{_const_str(n.left)!r} in ...")
        elif isinstance(n, ast.Dict):
            for k in n.keys:
                if _const_str(k) in PRIVATE_KEYS:
                    hit(k, f"{{{_const_str(k)!r}: ...}}")
        elif isinstance(n, (ast.Tuple, ast.List, ast.Set)) and n.elts and all(_const_str(e) is not None for e in n.elts):
            bad = [_const_str(e) for e in n.elts if _const_str(e) in PRIVATE_KEYS]
            if bad:
                hit(n, f"key list {bad}")
        if isinstance(n, ast.Constant) and n.value in PRIVATE_STRINGS:
            hit(n, f"the string {n.value!r}")
    return found


@pytest.fixture(scope="module")
def own_names() -> set[str]:
    return _defined_names(ast.parse(p.read_text(encoding="utf-8")) for p in _scanned_files())


def test_no_file_outside_comfy_internals_reads_a_private_comfyui_name(own_names):
    found = []
    for path in _scanned_files():
        found += private_accesses(path.read_text(encoding="utf-8"), own_names, str(path.relative_to(ROOT)))
    assert not found, ("private ComfyUI names outside adapters/comfy_internals.py (add a named function there "
                       "and call it):\n" + "\n".join(found))


@pytest.mark.parametrize("code", [
    # each kind of access that moved into comfy_internals.py, written back the way it used to be
    "ms = model.inner_model.inner_model.model_sampling",
    "guider = getattr(model, 'inner_model', None)",
    "loaded = getattr(mm, 'current_loaded_models', None)",
    "busy = srv.prompt_queue.get_tasks_remaining() > 0",
    "record = model.model_options.get('add_lora_merge')",
    "model.model_options['x'] = 1",
    "prev = m.model_options.get('model_function_wrapper')",
    "n.patches = {}",
    "n.backup = {}",
    "for k, v in patcher.object_patches_backup.items(): pass",
    "kp = patcher.get_key_patches(prefix)",
    "new = m.__class__.__new__(m.__class__)",
    "m.__class__ = base",
    "new.__dict__ = d",
    "cache = vae.__dict__.setdefault('_add_x', {})",
    "d = vars(m)",
    "base = next(b for b in cls.__mro__)",
    "ok = cls.__module__.startswith('comfy.ops')",
    "compute = getattr(copy, 'manual_cast_dtype', None)",
    "student.manual_cast_dtype = None",
    "unet.dtype = torch.float32",
    "new_clip.cond_stage_model = fused",
    "new_clip.patcher = p",
    "n.model = module",
    "if opts.get('prefetch_dynamic_vbars'): pass",
    "PATCH_KEYS = ('patches', 'patches_replace')",
    "x = opts['patches']",
    "w = dict(opts.get('wrappers', {}))",
    "if 'patches' in opts: pass",
    "opts = {'wrappers': {}}",
    "o = extra_args.get('model_options', {})",
    "m._v = None",
    "pin = module._pin_state",
    "f = getattr(m, '_v_signature', None)",
    "vae._add_tiny_runners = {}",
    "up = adapter.weights[0]",
    "seed = comfy.model_patcher.string_to_seed(key)",
    "with patcher.use_ejected(): pass",
])
def test_the_scan_catches_each_access_that_moved(own_names, code):
    assert private_accesses(textwrap.dedent(code), own_names), f"the scan misses: {code}"


@pytest.mark.parametrize("code", [
    "for n, p in list(m._parameters.items()): m._parameters[n] = p",  # torch's containers
    "job._last_event = 0.0",                                            # the plugin's own private field
    "sched = add_nodes._stream_schedule_inputs()",                      # the plugin's own private function
    "ms = model.get_model_object('model_sampling')",                    # public ModelPatcher API
    "return 'patches', f'the model carries {where} patches'",           # a reason code, not a key
    "self.model = model",                                               # the plugin's own field
    "x = torch._dynamo",                                                # torch's private module
])
def test_the_scan_lets_the_plugins_own_and_public_names_through(own_names, code):
    assert not private_accesses(textwrap.dedent(code), own_names), code


def test_the_scan_catches_an_access_put_back_into_a_real_file(own_names):
    """The same scan over nodes/sampling.py with one line of the old code restored."""
    path = ROOT / "nodes" / "sampling.py"
    source = path.read_text(encoding="utf-8")
    assert not private_accesses(source, own_names)
    broken = source.replace("ms = internals.sampler_model_sampling(model)",
                            "ms = model.inner_model.inner_model.model_sampling", 1)
    assert broken != source
    assert [f for f in private_accesses(broken, own_names, "sampling.py") if ".inner_model" in f]


def test_the_in_process_host_imports_comfyuis_image_nodes_as_a_start_does(host_nodes):
    # nodes_images imports ComfyUI's server, which needs its utils package (not comfy/utils.py that
    # nodes.py puts first on sys.path): scripts/comfy_host.py imports it first, as main.py does
    import utils

    assert hasattr(utils, "__path__"), utils  # the package, not comfy/utils.py
    assert "ImageCrop" in host_nodes.NODE_CLASS_MAPPINGS

"""ADD Fast Path node (MODEL -> MODEL): CUDA graphs or torch.compile for the fixed-shape ADD loop.

Attached the way ComfyUI attaches its own torch.compile (``comfy_api.torch_helpers``): a clone of
the ModelPatcher gets a keyed DIFFUSION_MODEL wrapper (``comfy.patcher_extension.WrappersMP``),
so nothing in ComfyUI is replaced and every other clone of the model is untouched. The wrapper
hands each UNet call to core.fast_path, which replays a graph / runs the compiled module when the
call fits and runs the exact eager call otherwise. An ON_DETACH callback drops the captured graphs
when ComfyUI unloads the model (not when it merely swaps in another clone of the same weights), so
their memory goes with it; weights that move anyway are caught by core.fast_path.WeightWatch.

State that outlives a prompt: each runner lives in the wrapper on the MODEL the node returns, as
long as that model lives (its CUDA graphs are dropped on unload, see above; a compiled module stays
with the runner). Module-level, only ``_told_cpu``: the modes whose CPU pass-through was logged, so
it is logged once per process.
"""
from __future__ import annotations

import logging

import torch

from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.patcher_extension import CallbacksMP, WrappersMP
from comfy_api.latest import io

from ..adapters import comfy_internals as internals
from ..core import fast_path as core
from ..core.errors import ADDError

KEY = "comfyui_add.fast_path"
MODES = ("off", "cuda_graph", "torch_compile")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
MAX_CACHE = 16

_MODE_TOOLTIP = (
    "off: the model as it is (removes a fast path attached upstream). "
    "cuda_graph: capture the UNet call once per shape into a CUDA graph and replay it (no compile wait; biggest "
    "gain at batch 1 / 1 step). torch_compile: inductor-compiled UNet (first run per shape compiles for minutes). "
    "Both need a CUDA GPU with the model fully loaded; on a CPU the model passes through unchanged (logged once). "
    "Calls that do not fit (ControlNet, attention/block patches such as IP-Adapter, new shapes past cache_size, "
    "training) run the normal eager path, with one log line saying why.")
_COMPILE_TOOLTIP = (
    "torch.compile mode (torch_compile only). default: fastest compile. max-autotune-no-cudagraphs: tunes kernels "
    "(compiles much longer). reduce-overhead / max-autotune: inductor's own CUDA graphs on top.")
_CACHE_TOOLTIP = (
    "How many call signatures (latent size, batch, prompt length, dtype) keep a graph or compiled kernel. Each "
    "CUDA graph holds its own activation memory (a few hundred MB at 512x512); other signatures run eagerly.")

_told_cpu: set[str] = set()


def _check(mode: str, compile_mode: str, cache_size) -> int:
    if mode not in MODES:
        raise ADDError(f"mode is {str(mode)[:60]!r}: pick one of {', '.join(MODES)}.")
    if compile_mode not in COMPILE_MODES:
        raise ADDError(f"compile_mode is {str(compile_mode)[:60]!r}: pick one of {', '.join(COMPILE_MODES)}.")
    try:
        size = int(cache_size)
    except (TypeError, ValueError):
        size = 0
    if isinstance(cache_size, bool) or size != cache_size or not 1 <= size <= MAX_CACHE:
        raise ADDError(f"cache_size is {cache_size!r}: type a whole number from 1 to {MAX_CACHE}.")
    return size


def _check_model(model) -> None:
    if not hasattr(model, "add_wrapper_with_key") or not hasattr(model, "get_model_object"):
        raise ADDError(f"model is a {type(model).__name__}, not a ComfyUI MODEL: connect a checkpoint loader's "
                             "MODEL output.")
    unet = model.get_model_object("diffusion_model")
    if not isinstance(unet, UNetModel):
        raise ADDError(
            f"model is a {type(unet).__name__} model; the ADD fast path supports UNet models (SD1.x, SD2.x, SDXL, "
            "SD-Turbo, SDXL-Turbo). Remove the node or set mode to off for this model.")


def has_fast_path(model) -> bool:
    """True when ``model`` carries this plugin's fast-path wrapper."""
    return bool(model.get_wrappers(WrappersMP.DIFFUSION_MODEL, KEY))


def runner_of(model):
    """The core runner behind ``model``'s fast path (None without one): its ``stats`` count replays,
    captures and eager fallbacks by reason."""
    wrappers = model.get_wrappers(WrappersMP.DIFFUSION_MODEL, KEY)
    return getattr(wrappers[0], "runner", None) if wrappers else None


def make_wrapper(runner):
    """The DIFFUSION_MODEL wrapper: UNetModel.forward(x, timesteps, context, y, control, transformer_options)."""

    def add_fast_path(executor, x, timesteps=None, context=None, y=None, control=None, transformer_options={},
                      **kwargs):
        def eager():
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

        def forward(target, x_, t_, c_, y_):
            # .forward, not __call__: the outer call already ran the module's hooks once
            fn = target.forward if isinstance(target, torch.nn.Module) else target
            # the bare forward: this wrapper (and any other diffusion-model wrapper) not again
            return fn(x_, t_, c_, y_, None, internals.without_diffusion_model_wrappers(transformer_options))

        others = internals.diffusion_model_wrapper_count(transformer_options) - 1
        return runner(executor.class_obj, (x, timesteps, context, y), eager, forward, control=control,
                      patches=internals.per_call_patches(transformer_options),
                      streamed=internals.weights_streamed(transformer_options), kwargs=kwargs,
                      other_wrappers=max(others, 0))

    add_fast_path.runner = runner
    return add_fast_path


def attach(model, runner):
    """A clone of ``model`` whose diffusion model calls go through ``runner`` (any earlier fast path
    replaced). No device check: apply_fast_path decides whether to attach at all."""
    m = model.clone()
    m.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, KEY)
    m.remove_callbacks_with_key(CallbacksMP.ON_DETACH, KEY)
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, make_wrapper(runner))
    m.add_callback_with_key(CallbacksMP.ON_DETACH, KEY, _on_detach(runner))
    return m


def _on_detach(runner):
    """ON_DETACH callback(patcher, unpatch_all): a real unload drops the graphs (their memory goes
    with the model); a swap to another clone of the same weights (unpatch_all False) keeps them."""
    def drop_graphs(patcher, unpatch_all=True, *args, **kwargs):
        if unpatch_all:
            runner.clear()

    return drop_graphs


def detach(model):
    """``model`` without this plugin's fast path (the same object when it has none)."""
    if not has_fast_path(model):
        return model
    m = model.clone()
    m.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, KEY)
    m.remove_callbacks_with_key(CallbacksMP.ON_DETACH, KEY)
    return m


def make_runner(mode: str, compile_mode: str = "default", cache_size: int = 4):
    if mode == "cuda_graph":
        return core.GraphRunner(max_entries=cache_size)
    return core.CompiledRunner(mode=compile_mode, max_entries=cache_size)


def apply_fast_path(model, mode: str, compile_mode: str = "default", cache_size: int = 4):
    """``model`` with the fast path ``mode`` attached (a clone), for this node and any other.

    "off" removes a fast path; on a non-CUDA load device the model comes back unchanged (logged
    once per mode): CUDA graphs do not exist there, and inductor on a CPU needs a C++ toolchain,
    compiles a UNet for minutes and gains little over oneDNN's eager kernels.
    """
    size = _check(mode, compile_mode, cache_size)
    _check_model(model)
    if mode == "off":
        return detach(model)
    device = torch.device(model.load_device)
    if device.type != "cuda" or not torch.cuda.is_available():
        if mode not in _told_cpu:
            _told_cpu.add(mode)
            logging.info("ADD fast path: %s is off on %s (CUDA only); the model runs unchanged.", mode, device)
        return model
    return attach(model, make_runner(mode, compile_mode, size))


class ADDFastPath(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADDFastPath", display_name="ADD Fast Path", category="ADD/sampling",
            description=("GPU fast path for ADD sampling: replays the UNet as a CUDA graph (or runs it torch.compile-d) "
                         "for fixed shapes, falling back to the exact normal path for anything else. Off on a CPU."),
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x/2.x/XL-family model (SD-Turbo, SDXL-Turbo, your ADD models); "
                                                "put LoRA loaders before or after this node, both work."),
                io.Combo.Input("mode", options=list(MODES), default="cuda_graph", tooltip=_MODE_TOOLTIP),
                io.Combo.Input("compile_mode", options=list(COMPILE_MODES), default="default", tooltip=_COMPILE_TOOLTIP),
                io.Int.Input("cache_size", default=4, min=1, max=MAX_CACHE, tooltip=_CACHE_TOOLTIP),
            ],
            outputs=[io.Model.Output(tooltip="The model with the fast path attached (a clone; the input model is "
                                             "unchanged).")],
        )

    @classmethod
    def execute(cls, model, mode, compile_mode, cache_size) -> io.NodeOutput:
        return io.NodeOutput(apply_fast_path(model, mode, compile_mode, cache_size))


NODES = [ADDFastPath]

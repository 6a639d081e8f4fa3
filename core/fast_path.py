"""The GPU fast path for the fixed-shape 1-4-step ADD loop (pure torch; never imports comfy).

A 1-step ADD frame at batch 1 is launch-bound on a fast GPU: the UNet's ~1,000 small kernels
cost more in Python and driver time than in arithmetic. Two ways around it, both of which keep
the eager call as the exact fallback:

* :class:`GraphRunner` captures the diffusion model's forward for one call signature
  (shapes, dtypes, device of x / timesteps / context / y) into a ``torch.cuda.CUDAGraph`` with
  static input and output buffers, and afterwards replays it: copy the inputs in, replay, copy
  the output out. A new signature is captured while the cache has room (``max_graphs``).
* :class:`CompiledRunner` runs a ``torch.compile``-d module (inductor), bounded the same way.

Every call first goes through :func:`unfit_reason`; anything the fast path cannot reproduce
exactly (CPU tensors, model patches, ControlNet residuals, unknown arguments, autograd, weights
that the host streams in per call) runs the eager call instead, with one log line per reason. So
does a capture or compile failure (then for that signature only).

The host adapter (nodes/fast_path.py) hands every call over as: the module, the four tensors,
``eager()`` (the unchanged call) and ``forward(target, x, timesteps, context, y)`` (the same
forward on ``target``, the module or its compiled twin, with no other wrapper around it), plus
what it read from the host's call options (adapters/comfy_internals.py): the per-call patches by
name, whether the weights are streamed in, how many other wrappers run. This module knows no
host structure.
Tests run all of this on a CPU by injecting a capturer (see :func:`recompute_capturer`).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

Tensors = tuple[Optional[torch.Tensor], ...]  # (x, timesteps, context, y); y is None for SD1.x/2.x
Forward = Callable[..., torch.Tensor]          # forward(target, x, timesteps, context, y) -> model output
Replay = Callable[[], None]
# capture(fn, static_inputs) -> (replay, static_output): after replay() the output holds fn(*static_inputs)
Capturer = Callable[[Callable[..., torch.Tensor], Tensors], tuple[Replay, torch.Tensor]]

ARG_NAMES = ("x", "timesteps", "context", "y")


def _log_info(msg: str) -> None:
    logging.info(msg)


# --------------------------------------------------------------------------------------------
# does this call fit?
# --------------------------------------------------------------------------------------------
def unfit_reason(tensors: Tensors, control: Any = None, patches: Optional[Mapping[str, Any]] = None,
                 streamed: bool = False, kwargs: Optional[Mapping] = None, other_wrappers: int = 0,
                 require_cuda: bool = True) -> Optional[tuple[str, str]]:
    """``None`` when the call can take the fast path, else ``(code, why)``.

    ``code`` is a short stable tag (used to log each kind of fallback once), ``why`` a sentence.
    ``tensors`` is (x, timesteps, context, y); ``patches`` maps where each non-empty table of
    per-call patches sits (attention and block patches: IP-Adapter, PAG, FreeU ...) to its patch
    names; ``streamed`` says the host pages the weights in per layer during the forward;
    ``other_wrappers`` counts the diffusion-model wrappers other than the fast path's own (they
    would run Python per call).
    """
    x = tensors[0]
    if not isinstance(x, torch.Tensor) or not isinstance(tensors[1], torch.Tensor):
        return "args", "the call has no latent or timestep tensor"
    if require_cuda and x.device.type != "cuda":
        return "cpu", f"the latent is on {x.device}, not a CUDA device"
    for name, t in zip(ARG_NAMES, tensors):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            return "args", f"{name} is a {type(t).__name__}, not a tensor"
        if t.device != x.device:
            return "devices", f"{name} is on {t.device} but the latent is on {x.device}"
    if control is not None:
        return "control", "a ControlNet/T2I adapter adds residuals to this call"
    for where, names in (patches or {}).items():
        if names:
            return "patches", f"the model carries {where} patches ({', '.join(map(str, names))})"
    if streamed:
        return "streamed", ("ComfyUI streams this model's weights in per layer (dynamic VRAM); start ComfyUI with "
                            "--highvram (or --disable-dynamic-vram) to keep them resident")
    if kwargs:
        return "kwargs", f"the call passes arguments the fast path does not know ({', '.join(sorted(kwargs))})"
    if other_wrappers:
        return "wrappers", f"{other_wrappers} other diffusion-model wrapper(s) run around the forward"
    if torch.is_grad_enabled():  # training, or a caller outside no_grad/inference_mode (ComfyUI nodes run inside)
        return "grad", "autograd is on (training?); the fast path is for inference under torch.no_grad/inference_mode"
    return None


def call_key(tensors: Tensors) -> tuple:
    """What a captured graph is specific to: shape, dtype and device of each tensor (None for an
    absent one), and whether inference mode is on (static buffers made in inference mode cannot
    be written outside it)."""
    sig = tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in tensors)
    return sig + (torch.is_inference_mode_enabled(),)


def describe_key(key: tuple) -> str:
    """'x 1x4x64x64 float16, timesteps 1 float32, ...' for log lines."""
    parts = []
    for name, sig in zip(ARG_NAMES, key):
        if sig is not None:
            parts.append(f"{name} {'x'.join(map(str, sig[0])) or 'scalar'} {str(sig[1]).removeprefix('torch.')}")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# weights: a captured graph reads them at fixed addresses
# --------------------------------------------------------------------------------------------
class WeightWatch:
    """Notices when a module's weights move (a load, an offload, a LoRA swapped in by replacing
    tensors) and whether they all sit on one device.

    A CUDA graph bakes in the address of every weight it reads; values changed in place (ComfyUI's
    in-place patching, weight hooks) are read fresh on replay and need nothing. The check is one
    data_ptr per parameter/buffer from slots collected once per module: ~0.1 ms for an SD1.5 UNet's
    686 tensors on a slow CPU (walking ``module.parameters()`` each call costs ~10x more).
    """

    def __init__(self) -> None:
        self._module: Optional[torch.nn.Module] = None
        self._slots: list[tuple[dict, str]] = []
        self._fingerprint: Optional[tuple] = None
        self.device: Optional[torch.device] = None  # the one device holding every tensor, else None
        self.problem: Optional[str] = None           # why the weights cannot be captured, else None

    def _collect(self, module: torch.nn.Module) -> None:
        # nn.Module keeps each module's parameters/buffers in these dicts for its whole life, so a
        # tensor replaced by set_attr/register_parameter shows up here without walking the tree.
        self._slots = [(m._parameters, n) for m in module.modules() for n in m._parameters]
        self._slots += [(m._buffers, n) for m in module.modules() for n in m._buffers]
        self._module = module
        self._fingerprint = None

    def check(self, module: torch.nn.Module) -> bool:
        """Refresh; True when the weights moved (or the module changed) since the last check."""
        if module is not self._module:
            self._collect(module)
        try:
            fingerprint = tuple([None if (t := d.get(n)) is None else t.data_ptr() for d, n in self._slots])
        except RuntimeError:  # a tensor subclass without plain storage (e.g. quantized weights)
            fingerprint = ("no-storage", tuple(id(d.get(n)) for d, n in self._slots))
        if fingerprint == self._fingerprint:
            return False
        self._fingerprint = fingerprint
        self._assess()
        return True

    def _assess(self) -> None:
        tensors = [t for d, n in self._slots if (t := d.get(n)) is not None]
        devices = {t.device for t in tensors}
        self.device = devices.pop() if len(devices) == 1 else None
        self.problem = None
        if self._fingerprint and self._fingerprint[0] == "no-storage":
            kinds = sorted({type(t).__name__ for t in tensors if type(t) not in (torch.Tensor, torch.nn.Parameter)})
            self.problem = f"weights of type {', '.join(kinds) or 'unknown'} have no plain storage to capture"
        elif self.device is None:
            where = ", ".join(sorted(str(d) for d in {t.device for t in tensors}))
            self.problem = (f"the weights are split across {where} (ComfyUI loaded the model partially, low-VRAM "
                            "mode); free VRAM or start ComfyUI with --highvram to keep them on the GPU")


# --------------------------------------------------------------------------------------------
# capturers
# --------------------------------------------------------------------------------------------
def cuda_graph_capturer(warmup: int = 2) -> Capturer:
    """Capture ``fn(*inputs)`` into a CUDA graph (the inputs are the static buffers).

    Warm-up runs on a side stream first (cuDNN/cuBLAS pick their kernels and allocate workspaces
    outside the capture, as the CUDA-graphs recipe in PyTorch's docs asks). Capturing records
    kernels without running them: the caller replays once to get this call's output.
    """
    def capture(fn, inputs: Tensors) -> tuple[Replay, torch.Tensor]:
        device = next(t.device for t in inputs if t is not None)
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (the prompt server, a training job running
            # alongside) go on uncaptured instead of failing; this thread's unsafe calls still fail
            # the capture, which then falls back. Upstream ComfyUI's own per-layer graphs do the same.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                output = fn(*inputs)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"the forward returned a {type(output).__name__}, not one tensor")
        return graph.replay, output

    return capture


def recompute_capturer(fn, inputs: Tensors) -> tuple[Replay, torch.Tensor]:
    """A stand-in capturer for tests and CPUs: replay recomputes ``fn`` on the static buffers.

    It behaves like a graph where it matters for correctness (the output buffer is overwritten by
    each replay; inputs reach the forward only through the static buffers), so the buffer
    handling is exercised without a GPU.
    """
    output = fn(*inputs)

    def replay() -> None:
        output.copy_(fn(*inputs))

    return replay, output


# --------------------------------------------------------------------------------------------
# runners
# --------------------------------------------------------------------------------------------
class _FastPath:
    """Fit check, fallback logging and counters shared by both runners."""

    kind = "fast path"

    def __init__(self, max_entries: int = 4, require_cuda: bool = True, log: Callable[[str], None] = _log_info):
        if int(max_entries) < 1:
            raise ValueError(f"max_entries is {max_entries}: keep at least 1 call signature.")
        self.max_entries = int(max_entries)
        self.require_cuda = require_cuda
        self.log = log
        self.stats: Counter = Counter()
        self._told: set[str] = set()

    def fallback(self, code: str, why: str, eager: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run the exact eager call; say why once per kind of reason."""
        self.stats["eager"] += 1
        self.stats[f"eager:{code}"] += 1
        if code not in self._told:
            self._told.add(code)
            self.log(f"ADD fast path ({self.kind}): running this call eagerly because {why}.")
        return eager()

    def __call__(self, module: torch.nn.Module, tensors: Tensors, eager: Callable[[], torch.Tensor], forward: Forward,
                 control: Any = None, patches: Optional[Mapping[str, Any]] = None, streamed: bool = False,
                 kwargs: Optional[Mapping] = None, other_wrappers: int = 0) -> torch.Tensor:
        reason = unfit_reason(tensors, control, patches, streamed, kwargs, other_wrappers, self.require_cuda)
        if reason is not None:
            return self.fallback(*reason, eager)
        return self._run(module, tuple(tensors), eager, forward)

    def _run(self, module, tensors: Tensors, eager, forward) -> torch.Tensor:
        raise NotImplementedError

    def clear(self) -> None:
        """Drop everything specific to the loaded weights (called when ComfyUI unloads the model)."""


@dataclass
class _Graph:
    inputs: Tensors          # static input buffers (None where the call has no such tensor)
    output: torch.Tensor     # static output buffer, overwritten by every replay
    replay: Replay


class GraphRunner(_FastPath):
    """CUDA-graph replay per call signature, at most ``max_entries`` graphs (each holds its own
    activation memory); a signature past that, or one whose capture failed, runs eagerly."""

    kind = "cuda_graph"

    def __init__(self, capture: Optional[Capturer] = None, max_entries: int = 4, require_cuda: bool = True,
                 log: Callable[[str], None] = _log_info):
        super().__init__(max_entries, require_cuda, log)
        self.capture = capture if capture is not None else cuda_graph_capturer()
        self.graphs: dict[tuple, _Graph] = {}
        self.failed: dict[tuple, str] = {}
        self.weights = WeightWatch()

    def clear(self) -> None:
        self.graphs.clear()
        self.failed.clear()

    def _run(self, module, tensors, eager, forward):
        if self.weights.check(module) and (self.graphs or self.failed):
            self.stats["weights_moved"] += 1  # graphs read the old addresses: capture again
            self.clear()
        if self.weights.problem is not None:
            return self.fallback("weights", self.weights.problem, eager)
        x = tensors[0]
        if self.weights.device is not None and self.weights.device != x.device:
            why = f"the weights are on {self.weights.device} but the latent is on {x.device}"
            return self.fallback("weights", why, eager)
        key = call_key(tensors)
        graph = self.graphs.get(key)
        if graph is None:
            if key in self.failed:
                why = f"capturing {describe_key(key)} failed earlier ({self.failed[key]})"
                return self.fallback("capture", why, eager)
            if len(self.graphs) >= self.max_entries:
                why = (f"{describe_key(key)} is a new call signature and the cache already holds {self.max_entries} "
                       "graphs (raise cache_size to keep more)")
                return self.fallback("cache", why, eager)
            graph = self._capture(module, key, tensors, forward)
            if graph is None:
                return self.fallback("capture", f"capturing {describe_key(key)} failed ({self.failed[key]})", eager)
        for buf, t in zip(graph.inputs, tensors):
            if buf is not None:
                buf.copy_(t)
        graph.replay()
        self.stats["replays"] += 1
        return graph.output.clone()  # the next replay overwrites the static output

    def _capture(self, module, key, tensors, forward) -> Optional[_Graph]:
        inputs = tuple(None if t is None else torch.empty_like(t) for t in tensors)
        for buf, t in zip(inputs, tensors):
            if buf is not None:
                buf.copy_(t)
        try:
            replay, output = self.capture(lambda *a: forward(module, *a), inputs)
        except Exception as e:  # noqa: BLE001 -- any capture failure means: this signature stays eager (logged)
            self.failed[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            self.stats["capture_failed"] += 1
            if torch.cuda.is_available() and tensors[0].device.type == "cuda":
                torch.cuda.synchronize(tensors[0].device)  # let a broken capture's stream settle
            return None
        graph = _Graph(inputs, output, replay)
        self.graphs[key] = graph
        self.stats["captures"] += 1
        self.log(f"ADD fast path (cuda_graph): captured {describe_key(key)} "
                 f"({len(self.graphs)}/{self.max_entries} graphs).")
        return graph


def default_compile(mode: str) -> Callable[[torch.nn.Module], Callable]:
    """torch.compile (inductor) of the module's forward in ``mode``, static shapes (each signature
    is its own graph). The bound forward, not the module: its hooks already ran on the outer call."""
    def compile_module(module: torch.nn.Module) -> Callable:
        return torch.compile(module.forward, mode=None if mode == "default" else mode, dynamic=False)

    return compile_module


CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


class CompiledRunner(_FastPath):
    """Runs a compiled twin of the module for at most ``max_entries`` call signatures.

    The first call of a signature compiles; if that raises, the signature runs eagerly from then on
    (logged). Later errors are real errors and propagate. In modes that use CUDA graphs inside
    inductor, the output is cloned: the next call reuses its memory.
    """

    kind = "torch_compile"

    def __init__(self, compile: Optional[Callable[[torch.nn.Module], Callable]] = None, mode: str = "default",
                 max_entries: int = 4, require_cuda: bool = True, log: Callable[[str], None] = _log_info):
        super().__init__(max_entries, require_cuda, log)
        self.mode = mode
        self.compile = compile if compile is not None else default_compile(mode)
        self.compiled: dict[int, tuple[torch.nn.Module, Callable]] = {}
        self.keys: set[tuple] = set()
        self.failed: dict[tuple, str] = {}

    def _run(self, module, tensors, eager, forward):
        key = call_key(tensors)
        if key in self.failed:
            return self.fallback("compile", f"compiling {describe_key(key)} failed earlier ({self.failed[key]})", eager)
        first = key not in self.keys
        if first and len(self.keys) >= self.max_entries:
            return self.fallback("cache", f"{describe_key(key)} is a new call signature and {self.max_entries} are "
                                          "compiled already (raise cache_size to allow more)", eager)
        entry = self.compiled.get(id(module))
        if entry is None or entry[0] is not module:
            entry = self.compiled[id(module)] = (module, self.compile(module))
        cudagraphs = self.mode in CUDAGRAPH_COMPILE_MODES
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        if not first:
            out = forward(entry[1], *tensors)
        else:
            try:
                out = forward(entry[1], *tensors)
            except Exception as e:  # noqa: BLE001 -- a compile failure: this signature stays eager (logged)
                self.failed[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                self.stats["compile_failed"] += 1
                return self.fallback("compile", f"compiling {describe_key(key)} failed ({self.failed[key]})", eager)
            self.keys.add(key)
            self.stats["compiles"] += 1
            self.log(f"ADD fast path (torch_compile, mode {self.mode}): compiled {describe_key(key)}.")
        self.stats["compiled_calls"] += 1
        return out.clone() if cudagraphs else out

"""Stream nodes: ADD Stream Batch (video frames / live input through StreamDiffusion's ideas) and
ADD Load Frames (a folder of images as an IMAGE batch).

The math (stream batch, residual CFG, similarity filter) is core/stream.py; reading the frames'
folder is nodes/stream_frames.py (over training/image_folder.py). This module adapts the math
to ComfyUI: every model call goes through a guider's ``sample`` (model management, conditioning,
ModelPatcher patches and wrappers, every family's extra conds), with one sigma per batch row, and
the stream's state between queue runs lives in one module-level registry here (``_STATES``; the
plugin's other state that outlives a prompt is listed in its __init__.py).

State across queue runs (mode = live): keyed by (workflow, node id, stream_id). The workflow is the
front end's workflow id (``extra_pnginfo``), or, for API prompts without one, a hash of the
prompt's graph (node types and links, not widget values), so two workflows never share a state
and editing a prompt text keeps it. A state holds the prompt embeddings on the model's device
(refreshed, alone, when the conditioning changes), the frames in flight, the similarity filter's
last frame, the last output and a frame counter. It is dropped when its model is garbage-collected
(at once) or no longer loaded by ComfyUI's model management (unloaded, /free; checked when any
stream node runs), when the latent size / schedule / guidance type / noise mode changes, and beyond
the 16 most recently used states.
"""
from __future__ import annotations

import hashlib
import json
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import torch

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import latent_preview
from comfy_api.latest import io

from ..adapters import comfy_internals as internals
from ..core import stream as core
from ..core.errors import ADDError
from ..training import image_folder as image_files
from . import sampling as add_nodes
from .stream_frames import frame_files, load_frames

CATEGORY = "ADD/stream"
MODES = ("batch", "live")
MAX_STATES = 16


# ------------------------------------------------------------------------------------------
# state across queue runs
# ------------------------------------------------------------------------------------------
@dataclass
class StreamState:
    """What one stream node keeps between queue runs (see the module docstring)."""

    key: tuple
    model_ref: "weakref.ref"
    signature: tuple = ()
    stream: Optional[core.StreamBatch] = None
    filter: Optional[core.SimilarityFilter] = None
    next_frame: int = 0
    last_output: Optional[torch.Tensor] = None
    embeddings: dict = field(default_factory=dict)  # name -> (source CONDITIONING, on-device copy)
    embedding_refreshes: int = 0
    runs: int = 0


_STATES: "OrderedDict[tuple, StreamState]" = OrderedDict()
_LOCK = threading.Lock()


def workflow_key(prompt, extra_pnginfo) -> str:
    """The workflow's identity: the front end's workflow id, else a hash of the graph's shape."""
    wf = extra_pnginfo.get("workflow") if isinstance(extra_pnginfo, dict) else None
    if isinstance(wf, dict) and wf.get("id"):
        return f"workflow:{wf['id']}"
    shape = []
    for nid, node in sorted((prompt or {}).items()):
        if isinstance(node, dict):
            links = sorted((k, v) for k, v in node.get("inputs", {}).items() if isinstance(v, list))
            shape.append([str(nid), node.get("class_type"), links])
    return "graph:" + hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _is_loaded(base) -> bool:
    """Whether ComfyUI's model management holds ``base`` (a BaseModel) as loaded."""
    loaded = internals.loaded_base_models()
    if loaded is None:  # a host without the list: rely on garbage collection alone
        return True
    return any(m is base for m in loaded)


def prune_states() -> list[tuple]:
    """Drop the states whose model is gone or unloaded; returns their keys."""
    with _LOCK:
        gone = [k for k, st in _STATES.items() if st.model_ref() is None or not _is_loaded(st.model_ref())]
        for k in gone:
            del _STATES[k]
    return gone


def _drop_dead(key) -> None:
    with _LOCK:
        st = _STATES.get(key)
        if st is not None and st.model_ref() is None:
            del _STATES[key]


def get_state(key: tuple, base) -> StreamState:
    """The state under ``key`` for model ``base``; a new one if none, or if it was for another model."""
    prune_states()
    with _LOCK:
        st = _STATES.get(key)
        if st is None or st.model_ref() is not base:
            st = StreamState(key, weakref.ref(base))
            weakref.finalize(base, _drop_dead, key)
            _STATES[key] = st
        _STATES.move_to_end(key)
        while len(_STATES) > MAX_STATES:
            _STATES.popitem(last=False)
    return st


def states() -> dict:
    """A snapshot of the registry (for tests and diagnostics)."""
    with _LOCK:
        return dict(_STATES)


def _equal(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b.to(a.device)))
    try:
        return bool(a == b)
    except Exception:  # objects without a usable == (hooks, control nets): only identity counts
        return False


def _same_conditioning(a, b) -> bool:
    if a is b:
        return True
    if not isinstance(a, list) or not isinstance(b, list) or len(a) != len(b):
        return False
    for (ta, da), (tb, db) in zip(a, b):
        if not _equal(ta, tb) or set(da) != set(db) or not all(_equal(da[k], db[k]) for k in da):
            return False
    return True


def _on_device(cond, device):
    return [[t.to(device), {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}] for t, d in cond]


def embeddings(state: StreamState, name: str, cond, device):
    """The conditioning on ``device``, reused from the state unless it changed (then refreshed)."""
    kept = state.embeddings.get(name)
    if kept is not None and _same_conditioning(kept[0], cond):
        return kept[1]
    moved = _on_device(cond, device)
    state.embeddings[name] = (cond, moved)
    state.embedding_refreshes += 1
    return moved


# ------------------------------------------------------------------------------------------
# the sampler function: one guider.sample per chunk of frames
# ------------------------------------------------------------------------------------------
def _stream_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, ctx=None):
    """KSAMPLER function: push this chunk's frames (x, states at sigmas[0]) through ctx['stream'].

    Emitted x0s go to ctx['out'] (after the model's inverse noise scaling); x is returned unchanged
    because the frames that leave a chunk are not those that entered it.
    """
    extra_args = {} if extra_args is None else extra_args
    ms = internals.sampler_model_sampling(model)
    stream: core.StreamBatch = ctx["stream"]
    stream.renoise = lambda s, n, x0: ms.noise_scaling(s, n, x0)
    emitted = core.run_frames(
        stream, x, ctx["frames"], lambda xr, sr: model(xr, sr, **extra_args), ctx["noise_fn"],
        frames_per_call=ctx["frames_per_call"], flush=ctx["flush"], batched=ctx["batched"],
        uncond=add_nodes.negative_fn(model, extra_args), on_call=ctx["on_call"])
    ctx["out"] += [(f, ms.inverse_noise_scaling(sigmas[-1], x0)) for f, x0 in emitted]
    return x


def _progress(model, total: int):
    """on_call for run_frames: ComfyUI's progress bar + latent preview, one tick per model call."""
    cb = latent_preview.prepare_callback(model, max(total, 1))
    count = [0]

    def on_call(rows):
        if rows:
            cb(min(count[0], total - 1), rows[-1].x0, None, max(total, 1))
        count[0] += 1

    return on_call


@dataclass(frozen=True)
class StreamOptions:
    """The stream node's settings, checked (built by the node, passed down)."""

    seed: int = 0
    noise: str = "fixed"
    frames_per_call: int = 1
    live: bool = False
    batched: bool = True
    rcfg: core.RCFG = core.RCFG()
    similarity_filter: bool = False
    similarity_threshold: float = 0.98
    max_skip_frames: int = 10


def run_stream(model, positive, latent: dict, sigmas: torch.Tensor, opts: StreamOptions, key: tuple,
               negative=None) -> tuple[dict, str, StreamState]:
    """Frames in (LATENT batch) -> frames out, in order; returns (LATENT, report, state)."""
    samples = add_nodes.check_latent(model, latent, "latent_image")
    if getattr(samples, "is_nested", False) or samples.ndim != 4:
        raise ADDError(f"latent_image has shape {tuple(samples.shape)}: the stream takes image latents "
                             "(frames, channels, height, width), e.g. from VAE Encode / ADD TinyVAE Encode of the frames.")
    if latent.get("noise_mask", None) is not None:
        raise ADDError("latent_image carries a noise mask (inpainting), which the stream does not apply: remove "
                             "Set Latent Noise Mask before ADD Stream Batch.")
    if opts.rcfg.needs_negative and negative is None:
        raise ADDError(f"cfg_type={opts.rcfg.cfg_type} evaluates a negative prompt, but 'negative' is not "
                             "connected: connect a CONDITIONING, or use cfg_type self.")
    samples = comfy.sample.fix_empty_latent_channels(model, samples)
    n_frames = samples.shape[0]
    state = get_state(key, model.model)
    signature = (tuple(samples.shape[1:]), tuple(round(float(s), 5) for s in sigmas.tolist()), opts.rcfg.cfg_type,
                 opts.noise, opts.live, opts.batched)
    if not opts.live or state.signature != signature or state.stream is None:
        state.signature = signature
        state.stream = core.StreamBatch(sigmas, opts.rcfg if opts.rcfg.residual else core.RCFG())
        state.filter, state.last_output = None, None
    else:
        state.stream.rcfg = opts.rcfg if opts.rcfg.residual else core.RCFG()
    stream = state.stream
    state.runs += 1

    first = state.next_frame if opts.live else 0
    frame_ids = list(range(first, first + n_frames))
    if opts.live:
        state.next_frame += n_frames
    kept = list(range(n_frames))
    if opts.similarity_filter:
        if state.filter is None or not opts.live:
            state.filter = core.SimilarityFilter(opts.similarity_threshold, opts.max_skip_frames, opts.seed)
        filt = state.filter
        filt.threshold, filt.max_skip_frames, filt.seed = opts.similarity_threshold, opts.max_skip_frames, opts.seed
        kept = [i for i in range(n_frames) if not filt.decide(samples[i], frame_ids[i])]
    skipped = n_frames - len(kept)

    shape = (1,) + tuple(samples.shape[1:])
    noise_fn = lambda f, k: core.frame_noise(opts.seed, f, k, shape, opts.noise)  # noqa: E731
    device = model.load_device
    pos = embeddings(state, "positive", positive, device)
    neg = embeddings(state, "negative", negative, device) if negative is not None and opts.rcfg.needs_negative else None
    if opts.rcfg.cfg_type == "full" and neg is not None:
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(pos, neg)
        guider.set_cfg(opts.rcfg.guidance_scale)
    else:
        guider = add_nodes.RCFGGuider(model)
        guider.set_conds(pos, neg if opts.rcfg.cfg_type == "initialize" else None)

    calls0, rows0 = stream.calls, stream.rows
    total = core.calls_needed(len(kept), stream.n, opts.frames_per_call, flush=not opts.live, batched=opts.batched,
                              in_flight_steps=stream.steps)
    ctx = {"stream": stream, "noise_fn": noise_fn, "frames_per_call": opts.frames_per_call, "batched": opts.batched,
           "on_call": _progress(model, total), "out": []}
    # One guider.sample per chunk of n * frame_buffer_size frames: ComfyUI sizes its memory estimate
    # by the latent batch it is given, which should be one call's rows, not the whole clip.
    chunk = stream.n * opts.frames_per_call
    starts = list(range(0, len(kept), chunk))
    for c, s in enumerate(starts):
        idx = kept[s:s + chunk]
        ctx["frames"] = [frame_ids[i] for i in idx]
        ctx["flush"] = (not opts.live) and c == len(starts) - 1
        noise = torch.cat([noise_fn(frame_ids[i], 0) for i in idx])
        guider.sample(noise, samples[idx], comfy.samplers.KSAMPLER(_stream_sampler, extra_options={"ctx": ctx}), sigmas,
                      disable_pbar=True, seed=opts.seed)

    out_dev = mm.intermediate_device()
    emitted = [(f, model.model.process_latent_out(x0.float()).to(out_dev)) for f, x0 in ctx["out"]]
    by_frame = dict(emitted)
    queue = iter(emitted)
    last = state.last_output if opts.live else None
    rows = []
    kept_set = set(kept)
    for i in range(n_frames):
        if i in kept_set:
            last = next(queue)[1] if opts.live else by_frame[frame_ids[i]]
        rows.append(last)
    state.last_output = last if opts.live else None
    result = latent.copy()
    result.pop("noise_mask", None)
    result["samples"] = torch.cat(rows)
    calls, model_rows = stream.calls - calls0, stream.rows - rows0
    per = f"{calls / len(kept):.2f}" if kept else "-"
    report = (f"{n_frames} frames in, {n_frames} out ({'live' if opts.live else 'batch'}, "
              f"{'stream batch' if opts.batched else 'per-frame'}, {stream.n} steps): {calls} model calls "
              f"({per} per processed frame), {model_rows} rows; similarity filter skipped {skipped} of {n_frames} frames; "
              f"{stream.in_flight} frames in flight; run {state.runs} of this stream, embeddings refreshed "
              f"{state.embedding_refreshes}x")
    return result, report, state


# ------------------------------------------------------------------------------------------
# nodes
# ------------------------------------------------------------------------------------------
def _stream_schedule_inputs() -> list:
    defaults = {"steps": 2, "schedule": "stream_t_index", "custom": "32,45"}
    inputs = add_nodes.schedule_inputs()
    for i in inputs:
        i.default = defaults.get(i.id, i.default)
    return inputs


class ADDStreamBatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADDStreamBatch", display_name="ADD Stream Batch", category=CATEGORY,
            description=("StreamDiffusion's ideas on ComfyUI's sampler: the denoising steps of consecutive frames run as "
                         "one batched model call (an n-step schedule costs one call per frame instead of n), optional "
                         "residual CFG and a stochastic similarity filter; frames come out in order. mode=live keeps the "
                         "stream between queue runs (Auto Queue, webcam-like input). Takes any MODEL (LoRAs, patches, "
                         "fast-path models)."),
            inputs=[
                io.Model.Input("model", tooltip="A 1-4 step model (SD-Turbo, SDXL-Turbo, ADD- or LCM-LoRA-merged), "
                                                "with any patches; SD1.5, SD2.x and SDXL families."),
                io.Conditioning.Input("positive", tooltip="The prompt for every frame."),
                io.Latent.Input("latent_image", tooltip="The frames as a latent batch (ADD TinyVAE Encode of an IMAGE "
                                                        "batch, e.g. ADD Load Frames), or an empty latent batch for a "
                                                        "txt2img stream."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="Seed of the noise (see 'noise') and of the similarity filter's draws."),
                *_stream_schedule_inputs(),
                io.Combo.Input("noise", options=list(core.NOISE_MODES), default="fixed", tooltip=
                    "fixed: the same noise for every frame at a step (StreamDiffusion; steady video). per_frame: new "
                    "noise for every frame (txt2img streams, where fixed noise would repeat one image)."),
                io.Int.Input("frame_buffer_size", default=1, min=1, max=16, tooltip=
                    "Frames entering the stream per model call (StreamDiffusion's frame_buffer_size): each call then "
                    "evaluates steps x this many rows. Raise it for throughput on a GPU."),
                io.Combo.Input("mode", options=list(MODES), default="batch", tooltip=
                    "batch: the frames of this run are processed completely (the pipeline is flushed; output i = frame "
                    "i). live: the stream continues across queue runs (Auto Queue): frames in flight stay, each frame "
                    "in gives one frame out, n-1 frames behind (during warm-up: the first frame at fewer steps)."),
                io.Boolean.Input("denoising_batch", default=True, tooltip=
                    "On: stream batch (one batched call advances every frame in flight). Off: each frame runs its steps "
                    "one call after another (plain per-frame ADD sampling with the same noise, for comparison)."),
                *add_nodes.rcfg_inputs("none"),
                io.Boolean.Input("similarity_filter", default=False, tooltip=
                    "Skip the model for a frame nearly equal to the last processed one and repeat the previous output."),
                io.Float.Input("similarity_threshold", default=0.98, min=0.0, max=1.0, step=0.001, tooltip=
                    "Cosine similarity (of the input latents) above which skipping starts; the skip probability rises "
                    "to 1 at identical frames. 1.0 = skip only identical frames."),
                io.Int.Input("max_skip_frames", default=10, min=0, max=1000, tooltip=
                    "At most this many frames in a row are skipped; the next one is processed."),
                io.String.Input("stream_id", default="", tooltip=
                    "Name of the stream's state (live mode). Two nodes or workflows never share a state; a new name "
                    "starts a new stream."),
                add_nodes.negative_input(),
            ],
            outputs=[
                io.Latent.Output(display_name="frames", tooltip="One output latent per input frame, in order."),
                io.String.Output(display_name="report", tooltip="Model calls, rows evaluated, frames skipped by the "
                                                                "similarity filter, state of the stream."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt, io.Hidden.extra_pnginfo],
        )

    @classmethod
    def fingerprint_inputs(cls, mode="batch", **_):
        # live: run on every queue (the stream advances even when its inputs did not change)
        return float("nan") if mode == "live" else ""

    @classmethod
    def execute(cls, model, positive, latent_image, seed, steps, schedule, custom, denoise, noise, frame_buffer_size,
                mode, denoising_batch, cfg_type, guidance_scale, delta, similarity_filter, similarity_threshold,
                max_skip_frames, stream_id, negative=None) -> io.NodeOutput:
        if mode not in MODES:
            raise ADDError(f"mode={mode!r} is unknown; choose batch or live.")
        rcfg = add_nodes.check_rcfg(cfg_type, guidance_scale, delta, negative)
        opts = StreamOptions(int(seed), noise, int(frame_buffer_size), mode == "live", bool(denoising_batch), rcfg,
                             bool(similarity_filter), float(similarity_threshold), int(max_skip_frames))
        # checked before any model call: a bad setting is a StreamError (an ADDError) naming the input
        core.frame_noise(0, 0, 0, (1,), opts.noise)
        core.SimilarityFilter(opts.similarity_threshold, opts.max_skip_frames)
        sigmas = add_nodes.build_sigmas(model, schedule, steps, denoise, custom)
        hidden = cls.hidden  # set by ComfyUI for each run; None when the node is called outside a prompt
        prompt, extra_pnginfo, unique_id = ((hidden.prompt, hidden.extra_pnginfo, hidden.unique_id)
                                            if hidden is not None else (None, None, None))
        key = (workflow_key(prompt, extra_pnginfo), str(unique_id), str(stream_id))
        latent, report, _ = run_stream(model, positive, latent_image, sigmas, opts, key, negative)
        return io.NodeOutput(latent, report, ui={"text": [report]})


class ADDLoadFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADDLoadFrames", display_name="ADD Load Frames", category=CATEGORY,
            description=("Loads a folder of images from ComfyUI's input folder as one IMAGE batch (video frames), in "
                         "natural file-name order. For a video file, core Load Video + Get Video Components give the "
                         "same IMAGE batch."),
            inputs=[
                io.String.Input("folder", default="add_stream_frames", tooltip=
                    "A folder inside ComfyUI's input folder holding the frames (png/jpg/webp/bmp/tif), sub-folders "
                    "with '/'; symbolic links in it are followed. add_stream_frames is a short example clip that comes "
                    "with the plugin: it is copied there on first use if that folder does not exist (an existing one "
                    "is never touched)."),
                io.Int.Input("start", default=0, min=0, max=1_000_000, tooltip="Index of the first frame to load."),
                io.Int.Input("every_nth", default=1, min=1, max=1000, tooltip="Load every n-th frame (1 = all)."),
                io.Int.Input("max_frames", default=0, min=0, max=100_000, tooltip="At most this many frames (0 = all)."),
                io.Int.Input("width", default=0, min=0, max=8192, step=8, tooltip=
                    "Resize (cover and centre-crop) every frame to width x height; 0 keeps the size (all frames must "
                    "match). The batch takes frames x width x height x 12 bytes of memory; a batch larger than the "
                    "free memory is refused before loading."),
                io.Int.Input("height", default=0, min=0, max=8192, step=8, tooltip="See width; both must be set to resize."),
            ],
            outputs=[io.Image.Output(display_name="frames", tooltip="The frames, in order."),
                     io.Int.Output(display_name="frame_count", tooltip="How many frames were loaded.")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, start=0, every_nth=1, max_frames=0, **_):
        try:
            root, names = frame_files(folder, start, every_nth, max_frames)
        except ADDError:
            return ""  # execute() raises the error with its message
        return image_files.files_signature(root, names)

    @classmethod
    def execute(cls, folder, start, every_nth, max_frames, width, height) -> io.NodeOutput:
        if bool(width) != bool(height):
            raise ADDError(f"width={width}, height={height}: set both to resize the frames, or both to 0 to keep their size.")
        root, names = frame_files(folder, start, every_nth, max_frames, place_examples=True)
        free = int(mm.get_free_memory(torch.device("cpu")))  # system memory, as ComfyUI's model management sees it
        frames = load_frames(root, names, width, height, label=f"folder {str(folder).strip()!r}", available=free)
        return io.NodeOutput(frames, int(frames.shape[0]))


NODES = [ADDStreamBatch, ADDLoadFrames]

"""Every GPU figure of the README from one command that fits a short GPU slot (a budget of 8 minutes, one GPU).

    python -m benchmarks.gpu_suite                      # on a GPU machine (scripts/gpu_run.sh runs this)
    python -m benchmarks.gpu_suite --dry-run            # the same code at tiny sizes on a CPU (~2 minutes)
    python -m benchmarks.gpu_suite --parts streams,compile --budget 300

Writes ``<out>/<date>-<gpu>.json`` (every row: figure, baseline, ratio, goal, verdict; the device and
software; each part's status and seconds), ``<out>/<date>-<gpu>.md`` (the tables, ready to paste into
the README), ``.events.jsonl`` and ``.log`` beside them. ``<out>``: ``--out``, else ``$OUT/gpu_suite``
when the environment variable OUT is set, else ``out/gpu_suite``.

Parts, in the order they run (each part measures its baseline in the same process, side by side):

* ``streams``     SD1.5-shaped UNet, 512² img2img, 1 and 2 steps, TinyVAE encode + decode of every frame:
                  frames/s of per-frame ADD sampling, stream batch (``frame_buffer_size`` 1 and 4), and both
                  on the fast path (``cuda_graph``); UNet-only frames/s; max |eager - fast path| of the latents.
* ``train_sd15``  one ADD iteration (``bench_train``'s ADD case, LoRA sharing the teacher) against one core
                  ``TrainLoraNode`` step: SD1.5-shaped, 512², batch 4, bf16 — peak memory, it/s.
* ``train_sdxl``  the same, SDXL-shaped, 1024², batch 1, gradient checkpointing.
* ``sampler``     ADD KSampler against bare UNet forwards and core SamplerCustom (``bench_sampling.measure``):
                  SD1.5-shaped 512² at 1 and 4 steps, SD2-v-shaped 768² and SDXL-shaped 1024² at 1 step.
* ``tiny_vae``    ADD TinyVAE against core VAE Decode/Encode with the full SD VAE, 512², batch 1 and 8.
* ``latency``     a real ComfyUI server: the shipped 1-step workflow's latency with no job and with an ADD Train
                  job in polite mode (``bench_train``'s latency blocks).
* ``digits``      the digits proof at the reduced size, teacher and students trained on the GPU, with its time.
* ``distributed`` headless training (``scripts/train_add.py`` under torchrun) on 1 and 2 GPUs, SD1.5-shaped
                  512², batch 4 per GPU; only with 2 or more GPUs.
* ``compile``     the streams with ``torch_compile`` (the first call at each shape compiles for a minute or more).

Every part has a time cap; the whole run has a budget (``--budget``, default 480 s). The parts run in
one worker process (ComfyUI is imported once) that the driver watches: a part past its cap, or one that
crashes, is stopped and the rest go on in a fresh worker. The JSON and the markdown are rewritten after
every row, so a slot that ends early still leaves numbers. Rows that were not measured stay in the tables
with the reason.

Models are ComfyUI's own classes at real size with seeded random weights (``benchmarks.unets``; speed
and memory do not depend on the values; nothing is downloaded). ``--dry-run`` runs every part's code at
tiny sizes on the CPU, with the fast path's CPU stand-ins (a capturer that recomputes, an identity
"compiler"): its rows are marked dry run and are not figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCHEMA = 1
STREAMDIFFUSION = "91–106 frames/s: StreamDiffusion's paper (arXiv 2312.12491), RTX 4090, TensorRT, 1 step"
DIGIT_ROWS = {"teacher 1", "teacher 25", "ADD", "ADD without pairs"}  # the reduced proof: ADD with and without pairs


# ============================================================================================
# sizes: the GPU run and the dry run differ only here
# ============================================================================================
@dataclass(frozen=True)
class Plan:
    dry: bool
    tiny: bool               # tiny UNets of each family instead of real-size ones
    width: int               # streams image side in pixels
    vae_width: int           # TinyVAE vs full VAE image side in pixels
    frames: int              # frames per stream clip
    rounds: int              # alternating timing rounds
    repeats: int             # sampler repeats
    sampler_cases: tuple     # (family, side px, steps)
    vae_repeats: tuple       # (full VAE, TinyVAE)
    train: dict              # part -> (bench_train kind, side, batch, dtype, gradient checkpointing, goal GB)
    train_iters: int
    latency_prompts: int
    fg_size: int
    dist: dict               # headless training: side, batch, steps, data_steps
    unet_calls: int          # timed UNet-only calls
    budget_s: float
    caps: dict               # part -> seconds


PARTS = ("streams", "train_sd15", "train_sdxl", "sampler", "tiny_vae", "latency", "digits", "distributed", "compile")

GPU = Plan(
    dry=False, tiny=False, width=512, vae_width=512, frames=16, rounds=3, repeats=5,
    sampler_cases=(("sd15", 512, 1), ("sd15", 512, 4), ("sd2v", 768, 1), ("sdxl", 1024, 1)),
    vae_repeats=(3, 10),
    train={"train_sd15": ("sd15", 512, 4, "bf16", False, 16.0), "train_sdxl": ("sdxl", 1024, 1, "bf16", True, 24.0)},
    train_iters=3, latency_prompts=4, fg_size=512,
    dist={"size": 512, "batch": 4, "steps": 6, "data_steps": 4},
    unet_calls=30, budget_s=480,
    caps={"streams": 120, "train_sd15": 75, "train_sdxl": 100, "sampler": 75, "tiny_vae": 45, "latency": 100,
          "digits": 100, "distributed": 200, "compile": 240},
)
DRY = Plan(
    dry=True, tiny=True, width=64, vae_width=32, frames=3, rounds=1, repeats=1,
    sampler_cases=(("sd15", 64, 1), ("sd15", 64, 4), ("sd2v", 64, 1), ("sdxl", 64, 1)),
    vae_repeats=(1, 1),
    train={"train_sd15": ("tiny_sd15", 64, 2, "fp32", False, 16.0),
           "train_sdxl": ("tiny_sdxl", 64, 1, "fp32", True, 24.0)},
    train_iters=1, latency_prompts=1, fg_size=64,
    dist={"size": 64, "batch": 2, "steps": 4, "data_steps": 2},
    unet_calls=2, budget_s=600,
    caps={p: 240 for p in PARTS},
)
MIN_PART_S = 20  # a part with less time than this left is not started


# ============================================================================================
# the row catalogue: every row the tables show, measured or not
# ============================================================================================
@dataclass(frozen=True)
class Goal:
    text: str
    check: Callable[[float], bool]
    on: str = "ratio"  # which figure the goal is about: 'ratio' or 'value'


def at_most(x: float, on: str = "ratio") -> Goal:
    return Goal(f"≤ {x:g}", lambda v: v <= x, on)


def at_least(x: float, on: str = "ratio") -> Goal:
    return Goal(f"≥ {x:g}", lambda v: v >= x, on)


@dataclass(frozen=True)
class Row:
    id: str
    section: str
    label: str
    goal: Goal | None = None

    @property
    def part(self) -> str:
        return self.id.split("/")[0]


SECTIONS = {
    "sampler": "ADD sampling overhead (ADD KSampler vs bare UNet forwards and core SamplerCustom, batch 1)",
    "tiny_vae": "TinyVAE vs the full SD VAE (512², seconds a batch; ratio = full ÷ TinyVAE)",
    "streams": "Streams: SD1.5-shaped 512² img2img with TinyVAE encode + decode of every frame (frames/s)",
    "training": "Training: one ADD iteration vs one core TrainLoraNode step (peak CUDA memory allocated)",
    "digits": "Digits proof on the GPU (reduced size; ratios of Fréchet distances)",
    "distributed": "Headless training, 1 vs 2 GPUs (torchrun, SD1.5-shaped 512², batch 4 per GPU)",
}


def catalogue(plan: Plan) -> list[Row]:
    rows: list[Row] = []
    for fam, side, steps in plan.sampler_cases:
        tag = f"{fam}/{side}/{steps}"
        what = f"{fam} {side}², {steps} step{'s' if steps > 1 else ''}"
        rows.append(Row(f"sampler/{tag}/overhead", "sampler", f"{what}: ADD KSampler ÷ (steps × bare forward)",
                        at_most(1.05)))
        rows.append(Row(f"sampler/{tag}/vs_core", "sampler", f"{what}: ADD KSampler ÷ core SamplerCustom "
                        "(SDTurboScheduler + euler_ancestral, cfg 1)", at_most(1.0)))
    for op in ("decode", "encode"):
        for b in (1, 8):
            rows.append(Row(f"tiny_vae/{op}/{b}", "tiny_vae", f"{op}, batch {b}: TinyVAE (full VAE as baseline)"))
    for steps in (1, 2):
        s = f"{steps} step{'s' if steps > 1 else ''}"
        rows += [
            Row(f"streams/{steps}/per_frame", "streams", f"{s}: per-frame ADD sampling"),
            Row(f"streams/{steps}/stream_x1", "streams", f"{s}: stream batch, frame_buffer_size 1 (vs per-frame)"),
            Row(f"streams/{steps}/stream_x4", "streams", f"{s}: stream batch, frame_buffer_size 4 (vs per-frame)",
                at_least(1.5) if steps == 2 else None),
            Row(f"streams/{steps}/per_frame+cuda_graph", "streams", f"{s}: per-frame + cuda_graph (vs eager)",
                at_least(1.3)),
            Row(f"streams/{steps}/stream_x1+cuda_graph", "streams", f"{s}: stream batch ×1 + cuda_graph (vs eager)",
                at_least(1.3)),
            Row(f"streams/{steps}/stream_x4+cuda_graph", "streams", f"{s}: stream batch ×4 + cuda_graph (vs eager)"),
        ]
    rows += [
        Row("streams/unet_only/1", "streams", "UNet only, batch 1 (1 frame a call at 1 step): eager"),
        Row("streams/unet_only/1+cuda_graph", "streams", "UNet only, batch 1: CUDA graph (vs eager)"),
        Row("streams/unet_only/4", "streams", "UNet only, batch 4 (stream batch ×4 at 1 step): eager"),
        Row("streams/best_1step", "streams", "1-step img2img with TinyVAE, best contender (goal on an H100)",
            at_least(60, "value")),
        Row("streams/streamdiffusion", "streams", "beside StreamDiffusion's reported figure"),
        Row("streams/exact/cuda_graph", "streams", "max abs difference eager vs cuda_graph, output latents (ratio: "
            "÷ max abs eager)",
            Goal("= 0 (bit-identical)", lambda v: v == 0.0, "value")),
    ]
    for steps, kinds in ((1, ("per_frame", "stream_x1")), (2, ("stream_x1",))):
        for k in kinds:
            name = "per-frame" if k == "per_frame" else "stream batch ×1"
            rows.append(Row(f"compile/{steps}/{k}+torch_compile", "streams",
                            f"{steps} step{'s' if steps > 1 else ''}: {name} + torch_compile (vs eager)", at_least(1.3)))
    rows.append(Row("compile/exact/torch_compile", "streams",
                    "max abs difference eager vs torch_compile, output latents (ratio: ÷ max abs eager)",
                    at_most(1e-2)))
    for part, (_k, side, batch, dtype, ckpt, goal_gb) in plan.train.items():
        fam = "SD1.5" if part == "train_sd15" else "SDXL"
        what = f"{fam}-shaped {side}², batch {batch}, {dtype}" + (", gradient checkpointing" if ckpt else "")
        rows += [
            Row(f"{part}/add", "training", f"{what}: one ADD iteration, peak GB (it/s in the note)",
                at_most(goal_gb, "value")),
            Row(f"{part}/core", "training", f"{what}: one core TrainLoraNode step, peak GB"),
            Row(f"{part}/ratio", "training", f"{what}: peak ADD ÷ core", at_most(1.3)),
        ]
    rows.append(Row("latency/polite", "training", "foreground 1-step prompt while an ADD Train job runs polite "
                    "(÷ no job)", at_most(1.2)))
    rows += [
        Row("digits/add_vs_teacher", "digits", "ADD 1 step FD ÷ teacher 1 step FD (at its data's CFG)", at_most(0.75)),
        Row("digits/pairs_gain", "digits", "ADD without pairs FD ÷ ADD FD (1 step; > 1: the small_data "
            "settings, pairs and distribution matching, beat the paper's two terms)", Goal("> 1", lambda v: v > 1.0)),
        Row("digits/time", "digits", "whole reduced proof on the GPU, seconds (teacher + students + scoring)"),
        Row("distributed/1gpu", "distributed", "1 GPU, batch 4: images/s"),
        Row("distributed/2gpu", "distributed", "2 GPUs, batch 4 each: images/s; ratio = scaling efficiency",
            at_least(0.85)),
    ]
    return rows


# ============================================================================================
# outputs
# ============================================================================================
def _fmt(v, unit: str = "") -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if v == 0:
        text = "0"
    elif abs(v) >= 100:
        text = f"{v:.0f}"
    elif abs(v) >= 1:
        text = f"{v:.2f}"
    elif abs(v) >= 1e-3:
        text = f"{v:.3f}"
    else:
        text = f"{v:.1e}"
    return f"{text} {unit}".strip()


def cell(text) -> str:
    """Markdown table cell text: a '|' would end the cell."""
    return str(text).replace("|", "\\|")


def verdict(row: Row, res: dict | None, dry: bool, part_status: dict) -> str:
    if res is None:
        st = part_status.get(row.part, {})
        why = st.get("note") or st.get("status") or "not run"
        return f"not measured ({why})"
    if res.get("skipped"):
        return f"not measured ({res['skipped']})"
    if dry:
        return "dry run"
    if row.goal is None:
        return ""
    fig = res.get(row.goal.on)
    if fig is None:
        return "no figure"
    return "met" if row.goal.check(fig) else "MISSED"


class Report:
    """The run's state; rewrites the JSON and the markdown whenever it changes."""

    def __init__(self, plan: Plan, out_dir: Path, stem: str, meta: dict):
        self.plan, self.rows = plan, catalogue(plan)
        self.json_path, self.md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
        self.meta = meta
        self.results: dict[str, dict] = {}
        self.parts: dict[str, dict] = {p: {"status": "pending"} for p in meta["parts"]}

    def data(self) -> dict:
        dry = self.plan.dry
        rows = []
        for r in self.rows:
            res = self.results.get(r.id)
            rows.append({"id": r.id, "section": r.section, "label": r.label, "goal": r.goal.text if r.goal else None,
                         "goal_on": r.goal.on if r.goal else None, "dry_run": dry,
                         "verdict": verdict(r, res, dry, self.parts), **({"result": res} if res else {})})
        return {"schema": SCHEMA, **self.meta, "dry_run": dry, "parts": self.parts, "rows": rows,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def markdown(self) -> str:
        d = self.data()
        m = self.meta
        dev = m.get("device", {})
        head = (f"## GPU suite, {m['date']}: {dev.get('name', m['gpu'])}" + (f" × {dev['count']}" if dev.get("count", 1) > 1
                                                                         else ""))
        lines = [head, ""]
        if d["dry_run"]:
            lines += ["**DRY RUN on a CPU at tiny sizes: the code path, not figures. Every row says `dry run`.**", ""]
        soft = ", ".join(f"{k} {v}" for k, v in dev.items() if k not in ("name", "count") and v)
        lines += [f"{soft}; commit {m.get('commit', 'unknown')}; command `{m['command']}`; budget {m['budget_s']:.0f} s"
                  + (f", took {m['total_s']:.0f} s" if m.get("total_s") else "") + ".", ""]
        for sec, title in SECTIONS.items():
            rows = [r for r in d["rows"] if r["section"] == sec]
            lines += [f"**{title}**", "", "| row | figure | baseline | ratio | goal | verdict | note |",
                      "|---|---:|---|---:|---|---|---|"]
            for r in rows:
                res = r.get("result", {})
                cells = [r["label"], _fmt(res.get("value"), res.get("unit", "")), res.get("baseline", ""),
                         _fmt(res.get("ratio")), r["goal"] or "", "**MISSED**" if r["verdict"] == "MISSED" else r["verdict"],
                         res.get("note", "")]
                lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
            lines.append("")
        lines += ["**Parts**", "", "| part | status | seconds | cap s | note |", "|---|---|---:|---:|---|"]
        for p, st in d["parts"].items():
            lines.append(f"| {p} | {st['status']} | {_fmt(st.get('seconds'))} | {_fmt(st.get('cap_s'))} | "
                         f"{cell(st.get('note', ''))} |")
        return "\n".join(lines) + "\n"

    def row_line(self, row_id: str) -> str:
        """'label: figure (ratio x; baseline) goal verdict' for the console."""
        r = next(x for x in self.rows if x.id == row_id)
        res = self.results[row_id]
        if res.get("skipped"):
            return f"{r.label}: not measured ({res['skipped']})"
        ratio = f" ratio {_fmt(res['ratio'])}" if res.get("ratio") is not None else ""
        base = f" vs {res['baseline']}" if res.get("baseline") else ""
        goal = f"; goal {r.goal.text}: {verdict(r, res, self.plan.dry, self.parts)}" if r.goal else ""
        return f"{r.label}: {_fmt(res.get('value'), res.get('unit', ''))}{ratio}{base}{goal}"

    def write(self) -> None:
        for path, text in ((self.json_path, json.dumps(self.data(), indent=1, ensure_ascii=False)),
                           (self.md_path, self.markdown())):
            tmp = path.with_name(path.name + ".partial")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)


# ============================================================================================
# the worker: runs parts in this process and reports events
# ============================================================================================
class Ctx:
    def __init__(self, plan: Plan, events: Path, out_dir: Path, nproc: int):
        self.plan, self.events, self.out_dir, self.nproc = plan, events, out_dir, nproc
        import torch

        self.cuda = (not plan.dry) and torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"

    def emit(self, event: str, **data) -> None:
        with open(self.events, "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": event, "t": time.time(), **data}, default=float) + "\n")

    def row(self, row_id: str, **data) -> None:
        self.emit("row", id=row_id, result=data)

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def _free() -> None:
    import torch

    import comfy.model_management as mm

    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fast_model(ctx: Ctx, model, mode: str):
    """``model`` with the ADD fast path ``mode`` (the node's own ``apply_fast_path`` on CUDA). In a dry
    run, the same wrapper and runner with the CPU stand-ins the tests use: a capturer that recomputes
    on the static buffers, and an identity 'compiler'."""
    from scripts.comfy_host import plugin_module

    fp = plugin_module("nodes.fast_path")
    if ctx.cuda:
        return fp.apply_fast_path(model, mode, "default", 8)
    core = plugin_module("core.fast_path")
    if mode == "cuda_graph":
        runner = core.GraphRunner(capture=core.recompute_capturer, max_entries=8, require_cuda=False)
    else:
        runner = core.CompiledRunner(compile=lambda m: m.forward, max_entries=8, require_cuda=False)
    return fp.attach(model, runner)


def _runner_note(fp, m) -> tuple[str, int]:
    runner = fp.runner_of(m)
    if runner is None:
        return "no fast path attached", 1
    st = runner.stats
    used = st["replays"] + st["compiled_calls"]
    reasons = ", ".join(f"{k[6:]} {v}" for k, v in st.items() if k.startswith("eager:"))
    return f"{used} fast calls, {st['eager']} eager" + (f" ({reasons})" if reasons else ""), st["eager"]


def _stream_setup(ctx: Ctx):
    import torch

    from benchmarks import unets
    from benchmarks.bench_fast_path import _positive, _tiny_vae
    from benchmarks.bench_stream import _clip
    from scripts.comfy_host import plugin_module
    from scripts.tiny_models import build_all

    tv = plugin_module("nodes.tiny_vae")
    model = unets.build("sd15", tiny=ctx.plan.tiny)
    paths = build_all()  # the TAESD pair of the tiny-model cache (real TAESD shape)
    vae = _tiny_vae(str(paths["taesd_decoder"]), tv)
    w = ctx.plan.width
    positive = _positive(model, (w, w))
    with torch.inference_mode():
        # plausible frames: the TAESD decode of a slowly drifting latent clip
        pixels = tv.tiny_decode(vae, _clip(ctx.plan.frames, w // 8)).float().clamp(0, 1)
    return model, vae, positive, pixels


T_INDEX = {1: "45", 2: "32,45"}


def _stream_rows(ctx: Ctx, mode: str, cases: dict) -> dict:
    """Times the stream contenders eager and on fast path ``mode`` at each step count in ``cases``
    ({steps: [kinds]}, kinds 'per_frame', 'stream_x1', 'stream_x4'); emits rows as each step count ends.
    Returns {'fps': {steps: {name: median}}, 'diff': max abs diff, 'scale': max abs eager}."""
    import torch

    from benchmarks.bench_stream import count_calls, per_frame_run, stream_run, time_rounds
    from scripts.comfy_host import plugin_module

    ns, fp = plugin_module("nodes.sampling"), plugin_module("nodes.fast_path")
    plan = ctx.plan
    model, vae, positive, pixels = _stream_setup(ctx)
    fast = fast_model(ctx, model, mode)
    lat0 = torch.zeros(plan.frames, 4, plan.width // 8, plan.width // 8)  # ignored: frames come as pixels
    tag = "+" + mode
    out = {"fps": {}, "diff": 0.0, "scale": 0.0, "first_s": {}}
    with torch.inference_mode():
        for steps, kinds in cases.items():
            sigmas = ns.build_sigmas(model, "stream_t_index", steps, 1.0, T_INDEX[steps])

            def make(kind, m):
                if kind == "per_frame":
                    return per_frame_run(m, positive, lat0, sigmas, vae, pixels=pixels)
                return stream_run(m, positive, lat0, sigmas, vae, int(kind[-1]), key="gpu_suite", pixels=pixels)

            runs, calls = {}, {}
            for kind in kinds:
                runs[kind], runs[kind + tag] = make(kind, model), make(kind, fast)
                calls[kind] = count_calls(lambda m, k=kind: make(k, m), model)
            # the fast path's first call at each shape captures / compiles: time it apart
            for kind in kinds:
                ctx.sync()
                t0 = time.perf_counter()
                got, _ = runs[kind + tag]()
                ctx.sync()
                out["first_s"][f"{steps}/{kind}"] = time.perf_counter() - t0
                want, _ = runs[kind]()
                out["diff"] = max(out["diff"], float((got.float() - want.float()).abs().max()))
                out["scale"] = max(out["scale"], float(want.float().abs().max()))
            runner = fp.runner_of(fast)
            if runner is not None:
                runner.stats.clear()  # the counters cover the timed runs only
            fps = {k: statistics.median(v) for k, v in time_rounds(runs, plan.frames, plan.rounds, ctx.sync).items()}
            out["fps"][steps] = fps
            note, fell_back = _runner_note(fp, fast)
            for kind in kinds:
                per_call = calls[kind] / plan.frames
                row_prefix = "streams" if mode == "cuda_graph" else "compile"
                if mode == "cuda_graph":
                    base = fps["per_frame"]
                    ctx.row(f"streams/{steps}/{kind}", value=fps[kind], unit="frames/s",
                            baseline="" if kind == "per_frame" else f"per-frame {base:.2f} frames/s",
                            ratio=None if kind == "per_frame" else fps[kind] / base,
                            note=f"{per_call:.2f} model calls a frame ({plan.frames}-frame clip)")
                first = out["first_s"][f"{steps}/{kind}"]
                ctx.row(f"{row_prefix}/{steps}/{kind}{tag}", value=fps[kind + tag], unit="frames/s",
                        baseline=f"eager {fps[kind]:.2f} frames/s", ratio=fps[kind + tag] / fps[kind],
                        note=f"{note}; first run {first:.1f} s" + ("; SOME CALLS FELL BACK" if fell_back else ""))
    ctx.emit("info", key=f"stream_{mode}", value=out)
    return out


def part_streams(ctx: Ctx) -> None:
    import torch

    from scripts.comfy_host import plugin_module

    core = plugin_module("core.fast_path")
    res = _stream_rows(ctx, "cuda_graph", {1: ["per_frame", "stream_x1", "stream_x4"],
                                           2: ["per_frame", "stream_x1", "stream_x4"]})
    scale = res["scale"] or 1.0
    ctx.row("streams/exact/cuda_graph", value=res["diff"], unit="", ratio=res["diff"] / scale,
            note=f"over every contender's latents at 1 and 2 steps; max abs eager {scale:.3g}")
    best_name, best = max(res["fps"][1].items(), key=lambda kv: kv[1])
    card = torch.cuda.get_device_name() if ctx.cuda else "CPU (dry run)"
    ctx.row("streams/best_1step", value=best, unit="frames/s", note=f"{best_name}, {card}")
    ctx.row("streams/streamdiffusion", value=best, unit="frames/s", baseline=STREAMDIFFUSION,
            note=f"ours: {best_name} on {card}, ComfyUI's PyTorch path (no TensorRT), TinyVAE encode + decode included")

    # UNet only: the diffusion model called directly with the inputs a 1-step frame gives it
    from benchmarks import unets
    from benchmarks.bench_fast_path import _positive
    from scripts.comfy_host import plugin_module as pm

    ns = pm("nodes.sampling")
    _free()
    model = unets.build("sd15", tiny=ctx.plan.tiny)
    w = ctx.plan.width
    positive = _positive(model, (w, w))
    unet = model.model.diffusion_model
    seen = {}

    def grab(_m, args, kwargs):
        seen.setdefault("x", args[0].clone())
        seen.setdefault("t", args[1].clone())
        seen.setdefault("context", kwargs.get("context"))
    with torch.inference_mode():
        sigmas = ns.build_sigmas(model, "stream_t_index", 1, 1.0, T_INDEX[1])
        h = unet.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            ns.add_sample(model, positive, {"samples": torch.zeros(1, 4, w // 8, w // 8)}, 0, sigmas)
        finally:
            h.remove()
        fps = {}
        for batch in (1, 4):
            x = seen["x"].repeat(batch, 1, 1, 1)
            t = seen["t"].repeat(batch)
            c = seen["context"].repeat(batch, 1, 1)
            fn = (lambda x_, t_, c_: unet(x_, t_, context=c_))
            cases = {"eager": lambda: fn(x, t, c)}
            if batch == 1:
                capture = core.cuda_graph_capturer() if ctx.cuda else core.recompute_capturer
                replay, _out = capture(fn, (x, t, c))
                cases["graph"] = replay
            for name, call in cases.items():
                call()
                ctx.sync()
                t0 = time.perf_counter()
                for _ in range(ctx.plan.unet_calls):
                    call()
                ctx.sync()
                fps[(batch, name)] = batch * ctx.plan.unet_calls / (time.perf_counter() - t0)
    ms = lambda b, n: 1e3 * b / fps[(b, n)]  # noqa: E731
    ctx.row("streams/unet_only/1", value=fps[(1, "eager")], unit="frames/s", note=f"{ms(1, 'eager'):.2f} ms a call")
    ctx.row("streams/unet_only/1+cuda_graph", value=fps[(1, "graph")], unit="frames/s",
            baseline=f"eager {fps[(1, 'eager')]:.1f} frames/s", ratio=fps[(1, "graph")] / fps[(1, "eager")],
            note=f"{ms(1, 'graph'):.2f} ms a call" + ("" if ctx.cuda else "; dry run: recompute stand-in"))
    ctx.row("streams/unet_only/4", value=fps[(4, "eager")], unit="frames/s",
            note=f"{ms(4, 'eager'):.2f} ms a call of 4 rows")


def part_compile(ctx: Ctx) -> None:
    res = _stream_rows(ctx, "torch_compile", {1: ["per_frame", "stream_x1"], 2: ["stream_x1"]})
    scale = res["scale"] or 1.0
    ctx.row("compile/exact/torch_compile", value=res["diff"], unit="", ratio=res["diff"] / scale,
            note=f"max abs eager {scale:.3g}; inductor fuses kernels, so fp16 rounding may differ")


def part_sampler(ctx: Ctx) -> None:
    import torch

    from benchmarks import unets
    from benchmarks.bench_fast_path import _positive
    from benchmarks.bench_sampling import measure

    for fam, side, steps in ctx.plan.sampler_cases:
        model = unets.build(fam, tiny=ctx.plan.tiny)
        positive = _positive(model, (side, side))
        negative = [[torch.zeros_like(positive[0][0]), {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else v)
                                                        for k, v in positive[0][1].items()}]]
        latent = {"samples": torch.zeros(1, 4, side // 8, side // 8)}
        with torch.inference_mode():
            r = measure(model, positive, negative, latent, steps, ctx.plan.repeats, ctx.cuda)
        s = r["seconds"]
        tag = f"sampler/{fam}/{side}/{steps}"
        note = f"{unets.label(fam, ctx.plan.tiny)}, {str(model.model_dtype()).removeprefix('torch.')}"
        ctx.row(f"{tag}/overhead", value=s["ADD KSampler"] * 1e3, unit="ms",
                baseline=f"{steps} × bare forward {s['bare forward'] * 1e3:.1f} ms", ratio=r["overhead"], note=note)
        ctx.row(f"{tag}/vs_core", value=s["ADD KSampler"] * 1e3, unit="ms",
                baseline=f"core SamplerCustom {s['core SamplerCustom'] * 1e3:.1f} ms", ratio=r["vs_core"],
                note=f"model rows per image ÷ core KSampler at cfg 7: {r['evals']:.2f}")
        del model
        _free()


def part_tiny_vae(ctx: Ctx) -> None:
    from benchmarks.bench_tiny_vae import worker

    kl_rep, tiny_rep = ctx.plan.vae_repeats
    for op in ("decode", "encode"):
        for b in (1, 8):
            kl = worker("kl", b, ctx.plan.vae_width, kl_rep, ctx.device, op)
            _free()
            tiny = worker("tiny", b, ctx.plan.vae_width, tiny_rep, ctx.device, op)
            _free()
            mb = lambda r: r["peak_bytes"] / 2**20  # noqa: E731
            unit = "MB allocated" if ctx.cuda else "MB RSS"
            ctx.row(f"tiny_vae/{op}/{b}", value=tiny["seconds"], unit="s", baseline=f"full VAE {kl['seconds']:.4g} s",
                    ratio=kl["seconds"] / tiny["seconds"],
                    note=f"peak {mb(kl):.0f} vs {mb(tiny):.0f} {unit} (full ÷ TinyVAE {mb(kl) / max(mb(tiny), 1e-9):.1f}×)")


def _train_part(ctx: Ctx, part: str) -> None:
    from benchmarks import bench_train

    kind, side, batch, dtype, ckpt, goal_gb = ctx.plan.train[part]
    args = dict(kind=kind, size=side, batch=batch, dtype=dtype, ckpt=ckpt, rank=16, iters=ctx.plan.train_iters,
                device=ctx.device)
    gb = lambda r: r["peak_all"] / 2**30  # noqa: E731
    res = {}
    for case in ("add_shared", "core"):
        res[case] = bench_train.worker(argparse.Namespace(case=case, **args))
        _free()
        r = res[case]
        s_it = statistics.median(r["times"][1:]) if len(r["times"]) > 1 else r["times"][0]
        note = (f"{1 / s_it:.2f} it/s ({s_it:.2f} s an iteration, median of {max(1, len(r['times']) - 1)}); "
                f"{r['params_m']:.0f} M parameters; iterations alone {r['peak_iter'] / 2**30:.2f} GB")
        if case == "add_shared":
            ctx.row(f"{part}/add", value=gb(r), unit="GB", baseline=f"goal {goal_gb:g} GB", note=note)
        else:
            ctx.row(f"{part}/core", value=gb(r), unit="GB", note=note)
    ctx.row(f"{part}/ratio", value=None, ratio=gb(res["add_shared"]) / gb(res["core"]),
            baseline=f"core {gb(res['core']):.2f} GB",
            note=f"time ADD ÷ core {statistics.median(res['add_shared']['times'][1:] or res['add_shared']['times']) / statistics.median(res['core']['times'][1:] or res['core']['times']):.2f}")


def part_train_sd15(ctx: Ctx) -> None:
    _train_part(ctx, "train_sd15")


def part_train_sdxl(ctx: Ctx) -> None:
    _train_part(ctx, "train_sdxl")


def part_latency(ctx: Ctx) -> None:
    from benchmarks import bench_train

    # the dry run's job generates its data in 2 teacher steps instead of the node's default (not a figure)
    a = argparse.Namespace(quick=True, fg_size=ctx.plan.fg_size, device=ctx.device,
                           job_inputs={"data_steps": 2} if ctx.plan.dry else None)
    srv = bench_train._Server(ctx.device)
    try:
        t, info = bench_train._latency_blocks(a, srv, ctx.plan.latency_prompts, 1, keys=["polite/teacher"])
    except BaseException:
        print(srv.tail(), file=sys.stderr)
        raise
    finally:
        srv.stop()
    idle, polite = statistics.median(t["idle"]), statistics.median(t["polite/teacher"])
    job = info["polite/teacher"][0]
    ctx.row("latency/polite", value=polite, unit="s", baseline=f"no job {idle:.3f} s", ratio=polite / idle,
            note=f"{ctx.plan.fg_size}² prompt, tiny SD1.5 stand-in; job {job['steps']} iterations during the block; "
                 f"{ctx.plan.latency_prompts} prompts a block")


def part_digits(ctx: Ctx) -> None:
    from benchmarks import bench_digits
    from benchmarks import digits as D

    size = D.REDUCED if not ctx.plan.dry else dataclasses.replace(
        D.REDUCED, name="dry", teacher_iters=4, clf_epochs=1, data_steps=2, add_steps=2, add_batch=4, per_class=13)
    # the dry run leaves out the 25-step teacher rows (500 of its 600 model calls; no row of this part uses them)
    wanted = DIGIT_ROWS - ({"teacher 25"} if ctx.plan.dry else set())
    result = bench_digits.run(size, ctx.out_dir / "digits", rows_wanted=wanted, device=ctx.device, cache=False)
    rows = result["rows"]
    fd = lambda r: bench_digits._mean(r, "fd")  # noqa: E731  (one seed: the value itself)
    t1 = rows[bench_digits.teacher_row(1, size.teacher_cfg)]
    add1, plain1 = rows["ADD 1 step"], rows["ADD without pairs 1 step"]
    ctx.row("digits/add_vs_teacher", value=fd(add1), unit="FD", baseline=f"teacher 1 step, cfg {size.teacher_cfg:g}: "
            f"FD {fd(t1):.2f}", ratio=fd(add1) / fd(t1),
            note=f"ADD 1-step accuracy {bench_digits._mean(add1, 'acc'):.1%}")
    ctx.row("digits/pairs_gain", value=fd(plain1), unit="FD", baseline=f"ADD FD {fd(add1):.2f}",
            ratio=fd(plain1) / fd(add1))
    t25 = next((v for k, v in rows.items() if k.startswith("teacher 25")), None)
    target = f"; teacher 25 steps: FD {fd(t25):.2f}, accuracy {bench_digits._mean(t25, 'acc'):.1%}" if t25 else ""
    ctx.row("digits/time", value=result["seconds"], unit="s",
            note=f"teacher + classifier {result['teacher_s']:.0f} s; ADD training {add1['train_s']:.0f} s "
                 f"({size.add_steps} steps, batch {size.add_batch}); classifier {result['test_acc']:.1%} on the "
                 f"test split{target}")


def part_distributed(ctx: Ctx) -> None:
    import tempfile

    from benchmarks import bench_distributed, unets

    if ctx.nproc < 2:
        why = "needs 2 or more GPUs" + (f"; this machine has {ctx.nproc}" if ctx.cuda else "; dry run on a CPU")
        for rid in ("distributed/1gpu", "distributed/2gpu"):
            ctx.row(rid, skipped=why)
        return
    d = ctx.plan.dist
    with tempfile.TemporaryDirectory(prefix="gpu_suite_dist_") as tmp:
        if ctx.plan.tiny:
            from scripts.tiny_models import build_all

            model_path = str(build_all()["tiny_sd15"])
        else:
            model_path = str(unets.write_checkpoint("sd15", Path(tmp) / "sd15_shaped.safetensors"))
        a = argparse.Namespace(model=model_path, size=d["size"], batch=d["batch"], steps=d["steps"],
                               data_steps=d["data_steps"], device=ctx.device, nproc=2)
        one = bench_distributed.run_case(1, d["batch"], a, Path(tmp), 1)
        ctx.row("distributed/1gpu", value=one["images_per_s"], unit="images/s", note=f"{one['s_per_step']:.2f} s a step")
        two = bench_distributed.run_case(2, d["batch"], a, Path(tmp), 1)
        ctx.row("distributed/2gpu", value=two["images_per_s"], unit="images/s",
                baseline=f"1 GPU {one['images_per_s']:.2f} images/s", ratio=two["images_per_s"] / (2 * one["images_per_s"]),
                note=f"global batch {two['global_batch']}, {two['s_per_step']:.2f} s a step")


PART_FNS = {"streams": part_streams, "train_sd15": part_train_sd15, "train_sdxl": part_train_sdxl,
            "sampler": part_sampler, "tiny_vae": part_tiny_vae, "latency": part_latency, "digits": part_digits,
            "distributed": part_distributed, "compile": part_compile}


def _device_info(cuda: bool) -> dict:
    import torch

    info = {"torch": torch.__version__, "python": sys.version.split()[0]}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(name=torch.cuda.get_device_name(0), count=torch.cuda.device_count(), cuda=torch.version.cuda,
                    memory_gb=round(props.total_memory / 2**30, 1))
    else:
        info.update(name="CPU (dry run)", count=0, threads=torch.get_num_threads())
    try:
        from scripts.comfy_host import host_path

        import comfyui_version  # noqa: F401  (ComfyUI's own version file, on its path after import_comfy)

        info["comfyui"] = comfyui_version.__version__
        info["comfyui_path"] = str(host_path())
    except ImportError:
        pass
    return info


def run_worker(a) -> int:
    plan = DRY if a.dry_run else GPU
    if not plan.dry:
        os.environ["COMFYUI_ADD_DEVICE"] = "cuda"
    from scripts.comfy_host import import_comfy

    import torch

    import_comfy(cpu=plan.dry)
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    ctx = Ctx(plan, Path(a.events), Path(a.out), torch.cuda.device_count() if not plan.dry else 0)
    if not plan.dry and not ctx.cuda:
        ctx.emit("fatal", error="torch sees no CUDA device: run with --dry-run on a CPU")
        return 2
    ctx.emit("device", info=_device_info(ctx.cuda))
    for name in a.parts.split(","):
        ctx.emit("part_start", part=name)
        t0 = time.perf_counter()
        try:
            PART_FNS[name](ctx)
        except Exception as exc:  # noqa: BLE001 -- the part failed: recorded, and the rest run in a fresh process
            traceback.print_exc()
            ctx.emit("part_end", part=name, status="failed", seconds=time.perf_counter() - t0,
                     note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
            return 3
        ctx.emit("part_end", part=name, status="done", seconds=time.perf_counter() - t0)
        _free()
    return 0


# ============================================================================================
# the driver: one worker at a time, caps, budget, outputs after every event
# ============================================================================================
def _gpu_name() -> tuple[str, int]:
    """(name, count) from nvidia-smi, without touching CUDA in this process."""
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                           timeout=20)
        names = [n.strip() for n in p.stdout.splitlines() if n.strip()]
        if p.returncode == 0 and names:
            return names[0], len(names)
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "gpu", 0


def _commit() -> str:
    """The working tree's commit (+ '-dirty' with local changes), or 'unknown' where there is no git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=20)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def default_out() -> Path:
    return Path(os.environ["OUT"]) / "gpu_suite" if os.environ.get("OUT") else ROOT / "out" / "gpu_suite"


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and whatever it started (servers, torchrun)
    except ProcessLookupError:
        pass
    proc.wait()


def drive(a) -> int:
    plan = DRY if a.dry_run else GPU
    if a.budget:
        plan = dataclasses.replace(plan, budget_s=float(a.budget))
    caps = dict(plan.caps)
    for item in a.cap:
        part, _, secs = item.partition("=")
        if part not in PARTS or not secs.replace(".", "", 1).isdigit():
            print(f"--cap {item!r}: write PART=SECONDS with a part from {', '.join(PARTS)}", file=sys.stderr)
            return 2
        caps[part] = float(secs)
    plan = dataclasses.replace(plan, caps=caps)
    parts = [p for p in PARTS if p in (a.parts.split(",") if a.parts else PARTS)]
    unknown = set(a.parts.split(",")) - set(PARTS) if a.parts else set()
    if unknown:
        print(f"unknown parts {sorted(unknown)}; pick from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    out_dir = Path(a.out) if a.out else default_out()
    out_dir.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%d")
    name, count = ("cpu-dry-run", 0) if plan.dry else _gpu_name()
    stem = f"{date}-{_slug(name)}"
    events, log = out_dir / f"{stem}.events.jsonl", out_dir / f"{stem}.log"
    events.write_text("")
    cmd = "python -m benchmarks.gpu_suite" + (" --dry-run" if plan.dry else "") + \
        (f" --parts {a.parts}" if a.parts else "") + (f" --budget {a.budget:g}" if a.budget else "")
    meta = {"date": date, "gpu": name, "gpu_count": count, "command": a.command or cmd, "budget_s": plan.budget_s,
            "parts_order": parts, "parts": parts, "device": {}, "commit": _commit()}
    report = Report(plan, out_dir, stem, meta)
    for p in parts:
        report.parts[p]["cap_s"] = plan.caps[p]
    pending = list(parts)
    for item in a.skip:
        part, _, why = item.partition("=")
        if part not in PARTS:
            print(f"--skip {item!r}: unknown part; pick from {', '.join(PARTS)}", file=sys.stderr)
            return 2
        if part in pending:
            pending.remove(part)
            report.parts[part].update(status="skipped", note=why or "skipped on the command line")
    report.write()
    print(f"[gpu_suite] {'dry run' if plan.dry else name}: {len(parts)} parts, budget {plan.budget_s:.0f} s; "
          f"writing {report.json_path} and {report.md_path}", flush=True)
    t_start = time.time()
    deadline = t_start + plan.budget_s
    offset = 0

    def read_events() -> list[dict]:
        nonlocal offset
        with open(events, encoding="utf-8") as f:
            f.seek(offset)
            chunk = f.read()
        complete = chunk[:chunk.rfind("\n") + 1]
        offset += len(complete.encode("utf-8"))
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    with open(log, "a", encoding="utf-8") as logf:
        while pending:
            left = deadline - time.time()
            if left < MIN_PART_S:
                for p in pending:
                    report.parts[p].update(status="skipped", note=f"the budget of {plan.budget_s:.0f} s was spent")
                break
            wcmd = [sys.executable, "-m", "benchmarks.gpu_suite", "--worker", "--parts", ",".join(pending),
                    "--events", str(events), "--out", str(out_dir)] + (["--dry-run"] if plan.dry else [])
            env = dict(os.environ)
            if plan.dry:  # tiny ops on a CPU: one thread each beats threads spinning for the cores (and the
                env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # server and torchrun inherit it)
            proc = subprocess.Popen(wcmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=env)
            current, part_t0, started = None, None, time.time()
            killed = None
            while True:
                exited = proc.poll() is not None  # read after this: every event of an exited worker is in
                for ev in read_events():
                    kind = ev["event"]
                    if kind == "device":
                        report.meta["device"] = ev["info"]
                    elif kind == "part_start":
                        current, part_t0 = ev["part"], time.time()
                        report.parts[current].update(status="running")
                        print(f"[gpu_suite] {current} (cap {min(plan.caps[current], deadline - part_t0):.0f} s)",
                              flush=True)
                    elif kind == "row":
                        report.results[ev["id"]] = ev["result"]
                        print(f"[gpu_suite]   {report.row_line(ev['id'])}", flush=True)
                    elif kind == "part_end":
                        report.parts[ev["part"]].update(status=ev["status"], seconds=round(ev["seconds"], 1),
                                                        **({"note": ev["note"]} if ev.get("note") else {}))
                        print(f"[gpu_suite] {ev['part']}: {ev['status']} in {ev['seconds']:.0f} s"
                              + (f" ({ev['note']})" if ev.get("note") else ""), flush=True)
                        pending.remove(ev["part"])
                        current = None
                    elif kind == "fatal":
                        print(f"[gpu_suite] {ev['error']}", file=sys.stderr)
                    report.write()
                if exited:
                    break
                now = time.time()
                if current is not None and now - part_t0 > min(plan.caps[current], deadline - part_t0):
                    killed = (current, f"stopped at its cap of {min(plan.caps[current], deadline - part_t0):.0f} s")
                elif current is None and now > max(deadline, started + 240):
                    killed = (None, "the worker did not start a part")
                if killed:
                    _kill(proc)
                    break
                time.sleep(0.25)
            if killed:
                part, why = killed
                if part is None:
                    for p in pending:
                        report.parts[p].update(status="failed", note=why)
                    pending.clear()
                else:
                    report.parts[part].update(status="timeout", seconds=round(time.time() - part_t0, 1), note=why)
                    pending.remove(part)
                    print(f"[gpu_suite] {part}: {why}", flush=True)
            elif proc.returncode not in (0, 3):
                # a crash outside a part's own error handling (segfault, OOM kill) or a fatal start
                if current is not None:
                    report.parts[current].update(status="failed", note=f"worker exited with {proc.returncode}; see "
                                                 f"{log.name}")
                    pending.remove(current)
                else:
                    for p in pending:
                        report.parts[p].update(status="failed", note=f"the worker exited with {proc.returncode} before "
                                               f"a part started; see {log.name}")
                    pending.clear()
            report.write()
    report.meta["total_s"] = round(time.time() - t_start, 1)
    report.write()
    print(report.markdown())
    print(f"[gpu_suite] wrote {report.json_path} and {report.md_path} in {report.meta['total_s']:.0f} s", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="every part at tiny sizes on the CPU (checks the code path)")
    ap.add_argument("--parts", default="", help=f"comma list of parts to run (default all: {','.join(PARTS)})")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 480; 600 dry)")
    ap.add_argument("--out", default=None, help="output folder (default $OUT/gpu_suite or out/gpu_suite)")
    ap.add_argument("--command", default=None, help="the command line to record in the results (for scripts)")
    ap.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS",
                    help="change a part's time cap (e.g. --cap compile=400 when the slot is long)")
    ap.add_argument("--skip", action="append", default=[], metavar="PART=REASON",
                    help="do not run PART; the tables say REASON (scripts/gpu_run.sh: a missing package)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--events", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return run_worker(a)
    return drive(a)


if __name__ == "__main__":
    raise SystemExit(main())

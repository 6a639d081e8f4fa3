"""Streams: model calls per frame and frames per second of stream batch vs per-frame ADD sampling.

A clip of ``--frames`` latent frames (a seeded random "video": one base latent drifting a little
per frame) goes through img2img at an n-step schedule (StreamDiffusion's ``t_index_list``:
``32,45`` for 2 steps, ``0,16,32,45`` for 4 -- the ADD Stream Batch node's schedule) and every
output frame through ADD TinyVAE Decode. Contenders, side by side on the same model:

* per-frame      ADD KSampler's sampling, one frame at a time: n sequential model calls per frame
* stream batch   ADD Stream Batch's engine (``nodes.stream.run_stream``, mode batch, flushed):
                 one batched call per frame (frame i at step k with frame i+1 at step k-1 ...),
                 plus n - 1 calls of warm-up/flush per clip
* stream batch ×B  the same with ``--frame-buffer B`` frames entering per call (when B > 1)
* ... + fast path  (CUDA only) each of the above on an ADD Fast Path (cuda_graph) model

Rounds alternate the contenders (A B C A B C ...); medians of frames/s, ratios to per-frame.
Model calls are counted by a UNet wrapper in a separate, untimed pass. A CPU's time grows with the
rows of a call, so on a CPU the stream batch saves the per-call overhead only: read the ratio as
such. Last, the similarity filter on a static clip (identical frames; and the same with faint
sensor noise) reports the share of frames it skipped.

    .venv/bin/python -m benchmarks.bench_stream                        # CPU, tiny SD1.5, 64^2
    .venv/bin/python -m benchmarks.bench_stream --width 512 --frames 6 --rounds 2
    COMFYUI_ADD_DEVICE=cuda .venv/bin/python -m benchmarks.bench_stream --device cuda [--model FILE] --steps 1,2 --frame-buffer 4
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

T_INDEX = {1: "45", 2: "32,45", 3: "16,32,45", 4: "0,16,32,45"}


def _parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--model", default=None, help="checkpoint or diffusion-model .safetensors (default: an SD1.5-shaped "
                                                  "UNet with random weights on cuda, the tiny SD1.5 on cpu)")
    ap.add_argument("--taesd", default=None, help="TAESD decoder .safetensors (default: the tiny-model cache's taesd)")
    ap.add_argument("--width", type=int, default=None, help="pixels (default 512 on cuda, 64 on cpu)")
    ap.add_argument("--steps", default=None, help="comma list of step counts 1-4 (default 2,4 on cpu; 1,2 on cuda)")
    ap.add_argument("--frames", type=int, default=None, help="frames per clip (default 8 cpu, 32 cuda)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians)")
    ap.add_argument("--frame-buffer", type=int, default=1, help="also run stream batch with this many frames per call")
    ap.add_argument("--static-frames", type=int, default=30, help="frames of the static clip for the similarity filter")
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    a.width = a.width or (512 if cuda else 64)
    a.frames = a.frames or (32 if cuda else 8)
    a.steps = [int(s) for s in (a.steps or ("1,2" if cuda else "2,4")).split(",")]
    from scripts.plugin_package import load

    load()
    from comfyui_add.core.images import check_size

    try:
        check_size(a.width, "--width", lo=8, hi=8192)
    except ValueError as e:
        ap.error(str(e))
    if any(s not in T_INDEX for s in a.steps) or a.frames < 1 or a.frame_buffer < 1:
        ap.error("--steps from 1-4, --frames >= 1, --frame-buffer >= 1")
    return a


def _clip(frames: int, hw: int, seed: int = 0, drift: float = 0.05) -> torch.Tensor:
    """A seeded latent 'video': a base latent plus a slow random walk (4 channels, hw x hw)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 4, hw, hw, generator=g)
    steps = torch.randn(frames, 4, hw, hw, generator=g) * drift
    return base + torch.cumsum(steps, dim=0)


def per_frame_run(m, positive, clip: torch.Tensor, sigmas, vae, pixels: torch.Tensor | None = None):
    """A callable: per-frame ADD sampling of the clip (n sequential model calls per frame), every
    output TinyVAE-decoded; with ``pixels`` (frames, H, W, 3) each frame is TinyVAE-encoded first
    (then ``clip`` is ignored). Returns the latents and images."""
    from scripts.comfy_host import plugin_module

    ns, tv = plugin_module("nodes.sampling"), plugin_module("nodes.tiny_vae")
    n = clip.shape[0] if pixels is None else pixels.shape[0]

    def run():
        outs, imgs = [], []
        for i in range(n):
            lat = clip[i:i + 1] if pixels is None else tv.tiny_encode(vae, pixels[i:i + 1])
            outs.append(ns.add_sample(m, positive, {"samples": lat}, 0, sigmas)["samples"])
            imgs.append(tv.tiny_decode(vae, outs[-1]))
        return torch.cat(outs), imgs
    return run


def stream_run(m, positive, clip: torch.Tensor, sigmas, vae, fb: int, key: str = "bench",
               pixels: torch.Tensor | None = None):
    """A callable: ADD Stream Batch's engine over the clip (mode batch, flushed, ``fb`` new frames per
    call, fixed noise), every output TinyVAE-decoded; with ``pixels`` every frame is TinyVAE-encoded
    first, one at a time as frames arrive. Returns the latents and images."""
    from scripts.comfy_host import plugin_module

    st, tv = plugin_module("nodes.stream"), plugin_module("nodes.tiny_vae")
    opts = st.StreamOptions(seed=0, noise="fixed", frames_per_call=fb, live=False, batched=True)

    def run():
        lat = clip if pixels is None else torch.cat([tv.tiny_encode(vae, pixels[i:i + 1])
                                                     for i in range(pixels.shape[0])])
        out, _report, _state = st.run_stream(m, positive, {"samples": lat}, sigmas, opts, (key, str(fb), ""))
        return out["samples"], [tv.tiny_decode(vae, out["samples"][i:i + 1]) for i in range(lat.shape[0])]
    return run


def count_calls(make_run, m) -> int:
    """Diffusion-model calls one run of ``make_run(model)`` makes (a UNet wrapper counts; untimed)."""
    counted = m.clone()
    n = [0]

    def wrapper(apply_model, args):
        n[0] += 1
        return apply_model(args["input"], args["timestep"], **args["c"])
    counted.set_model_unet_function_wrapper(wrapper)
    make_run(counted)()
    return n[0]


def time_rounds(runs: dict, frames: int, rounds: int, sync) -> dict:
    """{name: [frames/s per round]}: one warm-up run each (graph capture, compilation), then rounds
    that alternate the contenders (A B C A B C ...)."""
    for run in runs.values():
        run()
    fps = {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            fps[k].append(frames / (time.perf_counter() - t0))
    return fps


def main(argv=None) -> int:
    a = _parse(argv)
    from scripts.comfy_host import import_comfy, plugin_module

    import_comfy(cpu=(a.device == "cpu"))
    import comfy.utils

    from benchmarks.bench_fast_path import _load_model, _positive, _tiny_vae

    comfy.utils.PROGRESS_BAR_ENABLED = False
    st = plugin_module("nodes.stream")
    ns = plugin_module("nodes.sampling")
    tv = plugin_module("nodes.tiny_vae")
    fp = plugin_module("nodes.fast_path")
    files = plugin_module("core.files")

    cuda = a.device == "cuda" and torch.cuda.is_available()
    model, label = _load_model(a.model, realistic=cuda, files=files)
    vae = _tiny_vae(a.taesd, tv)
    hw = a.width // 8
    positive = _positive(model, (a.width, a.width))
    clip = _clip(a.frames, hw)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    models = {"": model}
    if cuda:
        models[" + fast path"] = fp.apply_fast_path(model, "cuda_graph", "default", 4)

    def per_frame(m, sigmas):
        return per_frame_run(m, positive, clip, sigmas, vae)

    def stream(m, sigmas, fb):
        return stream_run(m, positive, clip, sigmas, vae, fb)

    dev = model.load_device
    print(f"\nADD stream benchmark: {label}, {a.width}x{a.width} img2img, {a.frames} frames per clip + TinyVAE decode "
          f"each, device {dev}, {a.rounds} alternating rounds, medians")
    if cuda:
        print(f"  {torch.cuda.get_device_name(dev)}, UNet dtype {model.model_dtype()}, torch {torch.__version__}")
    print(f"| {'steps':>5} | {'contender':<32} | {'calls / frame':>13} | {'rows / call':>11} | {'frames/s':>9} | "
          f"{'vs per-frame':>12} |")
    print(f"|{'-' * 7}|{'-' * 34}|{'-' * 15}|{'-' * 13}|{'-' * 11}|{'-' * 14}|")
    with torch.inference_mode():
        for steps in a.steps:
            sigmas = ns.build_sigmas(model, "stream_t_index", steps, 1.0, T_INDEX[steps])
            contenders = {}
            for suffix, m in models.items():
                contenders["per-frame" + suffix] = (per_frame, m, None)
                contenders["stream batch" + suffix] = (stream, m, 1)
                if a.frame_buffer > 1:
                    contenders[f"stream batch x{a.frame_buffer}" + suffix] = (stream, m, a.frame_buffer)
            runs = {k: (f(m, sigmas) if fb is None else f(m, sigmas, fb)) for k, (f, m, fb) in contenders.items()}
            calls = {}
            for k, (f, m, fb) in contenders.items():
                calls[k] = count_calls(lambda mm: (f(mm, sigmas) if fb is None else f(mm, sigmas, fb)), m)
            fps = time_rounds(runs, a.frames, a.rounds, sync)
            base = statistics.median(fps["per-frame"])
            for k in runs:
                rows = (a.frames * steps) / calls[k]
                med = statistics.median(fps[k])
                print(f"| {steps:>5} | {k:<32} | {calls[k] / a.frames:13.2f} | {rows:11.2f} | {med:9.2f} | "
                      f"{med / base:12.3f} |")

        # Similarity filter on a static clip: identical frames, then the same with faint sensor noise.
        sigmas = ns.build_sigmas(model, "stream_t_index", 2, 1.0, T_INDEX[2])
        g = torch.Generator().manual_seed(1)
        still = _clip(1, hw).repeat(a.static_frames, 1, 1, 1)
        noisy = still + 0.01 * torch.randn(still.shape, generator=g)
        print(f"\nSimilarity filter (threshold 0.98, max_skip_frames 10), static clip of {a.static_frames} frames, "
              f"2 steps:")
        for name, frames in (("identical frames", still), ("static + faint noise (std 0.01)", noisy)):
            opts = st.StreamOptions(seed=0, live=False, batched=True, similarity_filter=True,
                                    similarity_threshold=0.98, max_skip_frames=10)
            _out, report, _state = st.run_stream(model, positive, {"samples": frames}, sigmas, opts, ("bench-filter", name, ""))
            skipped = int(report.split("skipped ")[1].split(" of")[0])
            print(f"  {name:<34} skipped {skipped} of {a.static_frames} ({skipped / a.static_frames:.0%}); the model ran "
                  f"for {a.static_frames - skipped}")
        changed = torch.randn((a.static_frames, 4, hw, hw), generator=g)  # every frame a new scene
        opts = st.StreamOptions(seed=0, live=False, batched=True, similarity_filter=True, similarity_threshold=0.98,
                                max_skip_frames=10)
        _out, report, _state = st.run_stream(model, positive, {"samples": changed}, sigmas, opts, ("bench-filter", "moving", ""))
        print(f"  {'a changing clip (every frame new)':<34} skipped {report.split('skipped ')[1].split(' frames')[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

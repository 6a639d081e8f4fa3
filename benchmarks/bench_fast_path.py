"""ADD Fast Path: frames per second of ADD sampling + TinyVAE decode, eager vs CUDA graph vs torch.compile.

One frame = ADD KSampler's sampling (``--steps``, default 1, batch ``--batch``) + ADD TinyVAE Decode,
synchronised, the way a real-time img/txt2img loop runs. Contenders, each a MODEL from
``apply_fast_path`` (the ADD Fast Path node's function) around the same loaded model:
* eager          the model as loaded
* cuda_graph     the UNet call replayed from a CUDA graph
* torch_compile  the UNet compiled by inductor (``--compile-mode``)
Warm-up frames first (graph capture, compilation, kernel selection; the first frame's time is
printed), then rounds that alternate the contenders (A B C A B C ...), ``--frames`` frames each;
medians of frames/s and the ratio to eager (goal >= 1.3 for a fast path at 512^2, 1 step,
SD1.5-shaped UNet). The fast-path counters (replays, eager fallbacks by reason) are printed so a
ratio is never read off a fast path that fell back. Everything runs under torch.inference_mode.

Models: ``--model FILE`` (a checkpoint, or a diffusion-model-only file; SD1.x/2.x/XL); otherwise an
SD1.5 UNet of the real config with seeded random weights on CUDA (speed does not depend on the
values; see bench_sampling.py), the tiny SD1.5 on a CPU. TinyVAE: ``--taesd FILE`` (a TAESD
decoder) or the tiny-model cache's real-shape TAESD. On a CPU both fast paths are off (the model
comes back unchanged), so every row is eager: ratios ~1 are the sanity check, and the run exits 0.

    .venv/bin/python -m benchmarks.bench_fast_path                      # CPU sanity run (tiny model, 64^2)
    COMFYUI_ADD_DEVICE=cuda .venv/bin/python -m benchmarks.bench_fast_path --device cuda --model FILE --width 512
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

CONTENDERS = ("eager", "cuda_graph", "torch_compile")


def _parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--model", default=None, help="checkpoint or diffusion-model .safetensors (default: see above)")
    ap.add_argument("--taesd", default=None, help="TAESD decoder .safetensors (default: the tiny-model cache's taesd)")
    ap.add_argument("--width", type=int, default=None, help="image width in pixels (default 512 on cuda, 64 on cpu)")
    ap.add_argument("--height", type=int, default=None, help="image height (default: width)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1, help="ADD steps, 1-4")
    ap.add_argument("--frames", type=int, default=None, help="frames per contender per round (default 20 cuda, 8 cpu)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 5 on both)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed frames per contender first (capture/compile)")
    ap.add_argument("--compile-mode", default="default", help="torch_compile mode (see the node's compile_mode)")
    ap.add_argument("--only", default=",".join(CONTENDERS), help="comma list of contenders to run")
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    a.width = a.width or (512 if cuda else 64)
    a.height = a.height or a.width
    a.frames = a.frames or (20 if cuda else 8)
    a.rounds = a.rounds or 5
    a.only = [c.strip() for c in a.only.split(",") if c.strip()]
    if "eager" not in a.only:
        a.only.insert(0, "eager")
    bad = [c for c in a.only if c not in CONTENDERS]
    from scripts.plugin_package import load

    load()
    from comfyui_add.core.images import check_size

    try:
        check_size(a.width, "--width", lo=8, hi=8192)
        check_size(a.height, "--height", lo=8, hi=8192)
    except ValueError as e:
        ap.error(str(e))
    if bad or not 1 <= a.steps <= 4 or a.batch < 1:
        ap.error(f"check --only ({bad}), --steps 1-4, --batch >= 1")
    return a


def _load_model(path: str | None, realistic: bool, files):
    import comfy.sd

    if path is None:
        from benchmarks.bench_sampling import _load_model as load_builtin

        return load_builtin(realistic), ("SD1.5-shaped UNet (real config, random weights)" if realistic
                                         else "tiny SD1.5 UNet")
    header = files.safetensors_header(path, os.path.basename(path))
    if any(k.startswith("model.diffusion_model.") for k in header):
        model = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)[0]
    else:
        model = comfy.sd.load_diffusion_model(path)
    return model, os.path.basename(path)


def _tiny_vae(path: str | None, tiny_vae):
    import folder_paths

    if path is None:
        from scripts.tiny_models import build_all

        path = str(build_all()["taesd_decoder"])
    folder_paths.add_model_folder_path("vae_approx", str(Path(path).resolve().parent))
    return tiny_vae.load_tiny_vae(Path(path).name)


def _positive(model, batch_hw):
    """A random prompt embedding of the model's width (and SDXL's pooled vector and size)."""
    g = torch.Generator().manual_seed(0)
    ctx_dim = int(model.model.model_config.unet_config.get("context_dim") or 768)
    extra = {}
    if getattr(model.model, "adm_channels", 0):
        h, w = batch_hw
        extra = {"pooled_output": torch.randn(1, 1280, generator=g), "width": w, "height": h}
    return [[torch.randn(1, 77, ctx_dim, generator=g) * 0.5, extra]]


def main(argv=None) -> int:
    a = _parse(argv)
    from scripts.comfy_host import import_comfy, plugin_module

    import_comfy(cpu=(a.device == "cpu"))
    import comfy.model_management
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    fp = plugin_module("nodes.fast_path")
    ns = plugin_module("nodes.sampling")
    tv = plugin_module("nodes.tiny_vae")
    files = plugin_module("core.files")

    cuda = a.device == "cuda" and torch.cuda.is_available()
    model, label = _load_model(a.model, realistic=cuda, files=files)
    vae = _tiny_vae(a.taesd, tv)
    positive = _positive(model, (a.height, a.width))
    latent = {"samples": torch.zeros(a.batch, 4, a.height // 8, a.width // 8)}
    sigmas = ns.build_sigmas(model, "add_trailing", a.steps, 1.0, "")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    models = {}
    for name in a.only:
        models[name] = model if name == "eager" else fp.apply_fast_path(model, name, a.compile_mode, 4)

    def frame(m):
        out = ns.add_sample(m, positive, latent, 0, sigmas)
        return tv.tiny_decode(vae, out["samples"])

    first, fps = {}, {k: [] for k in models}
    with torch.inference_mode():
        for name, m in models.items():
            sync()
            t0 = time.perf_counter()
            frame(m)
            sync()
            first[name] = time.perf_counter() - t0
            for _ in range(a.warmup - 1):
                frame(m)
        for name, m in models.items():  # counters from here on cover the timed frames only
            runner = fp.runner_of(m)
            if runner is not None:
                runner.stats.clear()
        for _ in range(a.rounds):
            for name, m in models.items():
                sync()
                t0 = time.perf_counter()
                for _ in range(a.frames):
                    frame(m)
                sync()
                fps[name].append(a.frames / (time.perf_counter() - t0))

    dev = model.load_device
    med = {k: statistics.median(v) for k, v in fps.items()}
    print(f"\nADD fast path benchmark: {label}, {a.width}x{a.height}, batch {a.batch}, {a.steps} step(s) + TinyVAE "
          f"decode, device {dev}, {a.rounds} rounds x {a.frames} frames, medians")
    if cuda:
        print(f"  {torch.cuda.get_device_name(dev)}, UNet dtype {model.model_dtype()}, torch {torch.__version__}, "
              f"compile mode {a.compile_mode}")
    print(f"| {'contender':<34} | {'frames/s':>9} | {'vs eager':>8} | {'goal':>6} | {'first frame s':>13} | "
          f"{'fast-path calls':<34} |")
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 10}|{'-' * 8}|{'-' * 15}|{'-' * 36}|")
    fell_back = False
    for name, m in models.items():
        runner = fp.runner_of(m)
        if name == "eager":
            row, goal, calls = "eager", "", "-"
        elif runner is None:
            row, goal, calls = f"{name} (off on {dev.type}: eager)", "~1", "none: model unchanged"
        else:
            row, goal = name, ">= 1.3"
            st = runner.stats
            used = st["replays"] + st["compiled_calls"]
            reasons = ", ".join(f"{k[6:]} {v}" for k, v in st.items() if k.startswith("eager:"))
            calls = f"{used} fast, {st['eager']} eager" + (f" ({reasons})" if reasons else "")
            fell_back = fell_back or st["eager"] > 0
        print(f"| {row:<34} | {med[name]:9.2f} | {med[name] / med['eager']:8.3f} | {goal:>6} | {first[name]:13.2f} | "
              f"{calls:<34} |")
    if not cuda:
        print("  The fast path is CUDA-only: on this device both fast contenders are the eager model (sanity rows: "
              "the same model three times, so any spread from 1 is timing noise of this machine).")
    if fell_back:
        print("  Some timed calls ran eagerly (reasons above; the log says why): those ratios understate the "
              "fast path.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

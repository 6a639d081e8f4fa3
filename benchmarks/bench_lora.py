"""ADD LoRA Merge (eager fuse into a new model) vs ComfyUI's own patch application.

Both apply the same rank-64 LCM-shaped LoRA (kohya names with diffusers paths, convs included,
like the public LCM-LoRA for SD1.5) to the same UNet:

* ``fuse``:  ADD LoRA Merge -> a new model holding W + ΔW (the input model stays untouched);
* ``comfy``: ``load_lora_for_models`` + ``model_management.load_models_gpu(force_patch_weights=True)``
  (ComfyUI patches the shared weights in place and keeps a backup of each patched weight).

Models: the tiny SD1.5 UNet (real width, one level) and, with ``--wide``, a realistic SD1.5 UNet
(ComfyUI's UNetModel with the real SD1.5 config, 860 M params, seeded random weights), each in
fp32 and fp16. Every (model, dtype, method) runs in its own subprocess; peak memory there is the
RSS high-water mark (VmHWM, reset through /proc/self/clear_refs once the model and the LoRA file
are loaded), reported as ``1 + (peak - rss_before) / model_bytes``: the model itself counts once,
so a fused copy is ~2.0 (goal <= 2.1). Sampling speed after the fuse: the mean time of one UNet
call of the fused model over that of the same model without any LoRA (goal <= 1.02).

    .venv/bin/python -m benchmarks.bench_lora [--device cpu|cuda] [--quick] [--wide]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SD15_REAL_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


_SCRATCH: list = []


def _scratch(prefix: str) -> str:
    """A temporary folder removed when this process exits."""
    _SCRATCH.append(tempfile.TemporaryDirectory(prefix=prefix))
    return _SCRATCH[-1].name


def _reset_peak_rss() -> None:
    """Hand freed heap back (malloc_trim) and reset VmHWM (Linux)."""
    import ctypes
    import ctypes.util

    libc = ctypes.util.find_library("c")
    if libc and hasattr(ctypes.CDLL(libc), "malloc_trim"):
        ctypes.CDLL(libc).malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}: this benchmark measures memory on Linux only")


def _import_comfy(device: str):
    from scripts import comfy_host

    comfy_host.import_comfy(base_directory=_scratch("bench_lora_home_"), cpu=(device == "cpu"))
    return comfy_host


def _build(model_kind: str, dtype_name: str):
    """(ModelPatcher, lora state dict): the UNet and an LCM-shaped rank-64 LoRA for it."""
    import torch

    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    from scripts import tiny_models as tm

    dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype_name]
    cfg = dict(tm.SD15_UNET_CONFIG if model_kind == "tiny" else SD15_REAL_CONFIG)
    mc = comfy.supported_models.SD15(cfg)
    mc.set_inference_dtype(dtype, None if dtype == torch.float32 else torch.float32)
    model = mc.get_model({})
    tm.init_module_(model.diffusion_model, seed=0)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    sd = model.diffusion_model.state_dict()
    shapes = {m: tuple(sd[m + ".weight"].shape) for m in tm.lora_targets(sd.keys())}
    to_diff = {v[: -len(".weight")]: k[: -len(".weight")]
               for k, v in comfy.utils.unet_to_diffusers(cfg).items() if k.endswith(".weight")}
    lora = {}
    for m, (down, up, alpha) in tm.make_lora_factors(shapes, rank=64, seed=12, scale=0.3).items():
        if m in to_diff:
            base = "lora_unet_" + to_diff[m].replace(".", "_")
            lora[base + ".lora_down.weight"] = down.half()
            lora[base + ".lora_up.weight"] = up.half()
            lora[base + ".alpha"] = torch.tensor(alpha)
    return patcher, lora


def _time_calls(patcher, repeats: int, size: int) -> float:
    import torch

    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    dev = patcher.load_device
    g = torch.Generator().manual_seed(1)
    x = torch.randn((1, 4, size, size), generator=g).to(dev)
    ctx = torch.randn((1, 77, 768), generator=g).to(dev)
    sigma = torch.tensor([1.0], device=dev)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            patcher.model.apply_model(x, sigma, c_crossattn=ctx)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def worker(model_kind: str, dtype_name: str, method: str, device: str, repeats: int, size: int) -> dict:
    import gc

    import torch

    comfy_host = _import_comfy(device)
    import comfy.model_management
    import comfy.sd

    patcher, lora = _build(model_kind, dtype_name)
    model_bytes = sum(p.numel() * p.element_size() for p in patcher.model.diffusion_model.parameters())
    lora_bytes = sum(v.numel() * v.element_size() for v in lora.values())
    _time_calls(patcher, 1, size)  # warm-up: kernels chosen, weights resident
    comfy.model_management.unload_all_models()
    gc.collect()
    lora_merge = comfy_host.plugin_module("nodes.lora_merge")
    _reset_peak_rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        gpu0 = torch.cuda.memory_allocated()
    rss0 = _status("VmRSS")
    t = time.perf_counter()
    if method == "fuse":
        out, _, report = lora_merge.fuse_lora(patcher, None, lora, {}, "bench_lcm_lora.safetensors", 1.0, 1.0, "none")
        assert "WARNING" not in report, report
    else:
        out = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)[0]
        comfy.model_management.load_models_gpu([out], force_patch_weights=True)
    if device == "cuda":
        torch.cuda.synchronize()
    t_apply = time.perf_counter() - t
    peak = _status("VmHWM")
    gpu_peak = (torch.cuda.max_memory_allocated() - gpu0) if device == "cuda" else 0
    # interleaved rounds, so load drift on a shared machine hits both sides alike
    t_after, t_plain = [], []
    for _ in range(3):
        t_after.append(_time_calls(out, repeats, size))
        t_plain.append(_time_calls(patcher, repeats, size))
    t_after, t_plain = statistics.median(t_after), statistics.median(t_plain)
    return {"model": model_kind, "dtype": dtype_name, "method": method, "apply_s": t_apply,
            "model_mb": model_bytes / 2**20, "lora_mb": lora_bytes / 2**20,
            "peak_x_model": 1 + (peak - rss0) / model_bytes, "gpu_peak_x_model": gpu_peak / model_bytes,
            "call_ratio": t_after / t_plain, "call_s": t_after}


def _run(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_lora", "--worker", *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark worker {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="fewer timed calls, smaller latents")
    ap.add_argument("--wide", action="store_true", help="also the realistic-width SD1.5 UNet (860 M params)")
    ap.add_argument("--dtypes", default="fp32,fp16", help="weight dtypes to run (default: %(default)s)")
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "DTYPE", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(worker(*a.worker, a.device, a.repeats, a.size)), flush=True)
        return
    models = ["tiny"] + (["wide"] if a.wide else [])
    rows = []
    for model in models:
        repeats = (3 if a.quick else 10) if model == "tiny" else (2 if a.quick else 5)
        size = 8 if model == "tiny" else (16 if a.quick else 32)
        for dtype in a.dtypes.split(","):
            res = {m: _run([model, dtype, m, "--device", a.device, "--repeats", str(repeats), "--size", str(size)])
                   for m in ("fuse", "comfy")}
            rows.append((model, dtype, res))
    print(f"\nADD LoRA Merge vs ComfyUI patch application (rank-64 LCM-shaped LoRA, device {a.device})")
    hdr = (f"{'model':5} {'dtype':5} {'model MB':>9} {'LoRA MB':>8} | {'fuse s':>7} {'comfy s':>7} {'time x':>7} | "
           f"{'fuse peak':>9} {'comfy peak':>10} | {'call after fuse / no LoRA':>25} {'after comfy':>11}")
    print(hdr)
    print("-" * len(hdr))
    for model, dtype, r in rows:
        f, c = r["fuse"], r["comfy"]
        print(f"{model:5} {dtype:5} {f['model_mb']:9.1f} {f['lora_mb']:8.1f} | {f['apply_s']:7.2f} {c['apply_s']:7.2f} "
              f"{f['apply_s'] / c['apply_s']:7.2f} | {f['peak_x_model']:8.2f}x {c['peak_x_model']:9.2f}x | "
              f"{f['call_ratio']:25.3f} {c['call_ratio']:11.3f}")
    print("peak = 1 + (RSS high-water mark during the operation - RSS before) / model bytes (the model counts once); "
          "goal for the fuse <= 2.1x. call ratios: median UNet call time over the same model without LoRA "
          "(goal <= 1.02).")
    if a.device == "cuda":
        for model, dtype, r in rows:
            print(f"{model} {dtype}: GPU peak during apply / model bytes: fuse {r['fuse']['gpu_peak_x_model']:.2f}, "
                  f"comfy {r['comfy']['gpu_peak_x_model']:.2f}")


if __name__ == "__main__":
    main()

"""TinyVAE decode vs core VAEDecode with the full SD KL VAE: time and peak-memory ratios.

Both decode the same latent to 512x512 (256x256 with --quick) at batch 1 and 8 (1 and 2 with
--quick). The KL VAE is ComfyUI's AutoencoderKL with the real SD config (83.7 M params), built by
``comfy.sd.VAE`` from a state dict in the real SD key layout (seeded random values: speed and
memory do not depend on them); the TAESD is the tiny-model cache's real-shape taesd pair, loaded by
ADD TinyVAE Loader and decoded by ADD TinyVAE Decode. Each (decoder, batch) runs in its own
subprocess so peak memory is per run: on CPU the RSS high-water mark (VmHWM, reset through
/proc/self/clear_refs after loading) minus the RSS before decoding; on CUDA
torch.cuda.max_memory_allocated minus what was allocated before.

    .venv/bin/python -m benchmarks.bench_tiny_vae [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SD_VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                 "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


_SCRATCH: list = []


def _scratch(prefix: str) -> str:
    """A temporary folder removed when this process exits."""
    _SCRATCH.append(tempfile.TemporaryDirectory(prefix=prefix))
    return _SCRATCH[-1].name


def _rss_now() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is not possible.

    Freed heap is handed back first (glibc malloc_trim): otherwise memory freed after loading stays
    resident, counts in the baseline, and a decode that reuses it looks free.
    """
    import ctypes
    import ctypes.util

    libc = ctypes.util.find_library("c")
    if libc:
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)
        if trim is not None:
            trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: the CPU memory column needs Linux")


@functools.lru_cache(maxsize=1)
def _kl_state_dict() -> dict:
    """The SD KL VAE's state dict in the real key layout, seeded values (made once per process: the GPU
    suite measures several batches in one process)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    from scripts.tiny_models import init_module_

    kl = init_module_(AutoencoderKL(ddconfig=SD_VAE_CONFIG, embed_dim=4), seed=7)
    return {k: v.detach().clone() for k, v in kl.state_dict().items()}


def _build_kl_vae(device):
    """comfy.sd.VAE detecting the SD KL VAE from a real-layout state dict (seeded values)."""
    import comfy.sd

    return comfy.sd.VAE(sd=dict(_kl_state_dict()), device=device)


def _build_tiny_vae(tiny: dict):
    """ADD TinyVAE Loader on a vae_approx folder holding the cached real-shape taesd pair."""
    import folder_paths

    from scripts.comfy_host import plugin_module

    d = Path(_scratch("bench_vae_approx_"))
    for key in ("taesd_encoder", "taesd_decoder"):
        shutil.copy(tiny[key], d / f"{key}.safetensors")
    folder_paths.add_model_folder_path("vae_approx", str(d), is_default=True)
    tv = plugin_module("nodes.tiny_vae")
    (vae,) = tv.ADDTinyVAELoader.execute("taesd_decoder.safetensors", "auto")
    return vae, tv


def worker(kind: str, batch: int, size: int, repeats: int, device: str, op: str = "decode") -> dict:
    """One (VAE, batch, decode or encode) measurement in this process; returns seconds, peak bytes, params."""
    import torch

    from scripts.comfy_host import import_comfy
    from scripts.tiny_models import build_all

    nodes = import_comfy(base_directory=_scratch("bench_home_"), cpu=(device == "cpu"))
    import comfy.model_management as mm

    tiny = build_all()
    dev = torch.device(device)
    if kind == "kl":
        vae = _build_kl_vae(dev)
        decode = lambda z: nodes.VAEDecode().decode(vae, {"samples": z})[0]  # noqa: E731
        encode = lambda px: nodes.VAEEncode().encode(vae, px)[0]["samples"]  # noqa: E731
    else:
        vae, tv = _build_tiny_vae(tiny)
        dec_node, enc_node = tv.ADDTinyVAEDecode, tv.ADDTinyVAEEncode
        decode = lambda z: dec_node.execute({"samples": z}, vae, 8, "auto")[0]  # noqa: E731
        encode = lambda px: enc_node.execute(px, vae, 8, "auto")[0]["samples"]  # noqa: E731
    params = sum(p.numel() for p in vae.first_stage_model.parameters())
    g = torch.Generator().manual_seed(0)
    if op == "encode":
        fn, x, warm = encode, torch.rand(batch, size, size, 3, generator=g), torch.rand(1, 64, 64, 3, generator=g)
        want = (batch, 4, size // 8, size // 8)
    else:
        fn, x, warm = decode, torch.randn(batch, 4, size // 8, size // 8, generator=g), torch.randn(1, 4, 8, 8)
        want = (batch, size, size, 3)
    with torch.inference_mode():
        fn(warm)  # warm-up: weights onto the device, kernels chosen
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            if not _reset_peak_rss():
                raise RuntimeError("cannot reset the RSS high-water mark (/proc/self/clear_refs); run on Linux")
            base = _rss_now()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        assert tuple(out.shape) == want, (tuple(out.shape), want)
        peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else _peak_rss()) - base
    mm.soft_empty_cache()
    return {"seconds": statistics.median(times), "peak_bytes": max(peak, 0), "params": params}


def _run(kind, batch, size, repeats, device) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_tiny_vae", "--worker", kind, "--batch", str(batch),
           "--size", str(size), "--repeats", str(repeats), "--device", device]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"worker {kind} batch {batch} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="256x256, batches 1 and 2, one timed run each")
    ap.add_argument("--worker", choices=["kl", "tiny"], help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=512, help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        if a.device == "cpu":
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
        print("RESULT " + json.dumps(worker(a.worker, a.batch, a.size, a.repeats, a.device)), flush=True)
        return

    size, batches = (256, (1, 2)) if a.quick else (512, (1, 8))
    # The KL decode is the slow side (~30 s per 512^2 image on 2 CPU cores): time it once.
    kl_repeats, tiny_repeats = (1, 3) if a.device == "cpu" else (3, 10)
    mem = "peak RSS" if a.device == "cpu" else "peak CUDA alloc"
    print(f"TinyVAE (ADD TinyVAE Decode, taesd) vs core VAEDecode (SD KL VAE), {size}x{size}, device={a.device}")
    rows = []
    for b in batches:
        kl = _run("kl", b, size, kl_repeats, a.device)
        tiny = _run("tiny", b, size, tiny_repeats, a.device)
        rows.append((b, kl, tiny))
    print(f"decoder params: KL {rows[0][1]['params'] / 1e6:.1f} M, TAESD {rows[0][2]['params'] / 1e6:.2f} M (enc+dec)")
    hdr = f"| batch | KL s | TAESD s | speed-up (KL/TAESD) | KL {mem} MB | TAESD {mem} MB | memory ratio (KL/TAESD) |"
    print(hdr)
    print("|" + "|".join("---" for _ in range(7)) + "|")
    for b, kl, tiny in rows:
        mb = lambda r: r["peak_bytes"] / 2**20  # noqa: E731
        ratio = mb(kl) / mb(tiny) if mb(tiny) > 0 else float("inf")
        print(f"| {b} | {kl['seconds']:.2f} | {tiny['seconds']:.3f} | {kl['seconds'] / tiny['seconds']:.1f}x | "
              f"{mb(kl):.0f} | {mb(tiny):.0f} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()

"""ADD training node: memory and time of one iteration, and what a running job costs foreground prompts.

1. **One iteration, side by side, same model / batch / size / rank / latents:**
   * ``add_shared``  — one ADD iteration (D + G) the way ADD Train runs it: the job's frozen copy of
     the base weights, LoRA student sharing it with the teacher (adapters off = teacher), teacher-
     feature discriminator; data = fixed latents (teacher data generation is NOT counted here);
   * ``add_separate`` — the same, but the teacher (and its discriminator features) run on a SECOND
     frozen copy: what sharing saves;
   * ``core_lora``   — one step of ComfyUI's own ``TrainLoraNode`` (plain LoRA fine-tuning, MSE, no
     teacher, no discriminator; all its layers get a LoRA), fp32 like ours on a CPU.
   Each case runs in a fresh subprocess. Peak memory = RSS high-water mark (VmHWM) minus RSS after the
   input model is loaded (so the input model is not counted; ADD's own copy of the weights is) on a
   CPU; ``torch.cuda.max_memory_allocated`` growth on a GPU. Time = median seconds per iteration
   after one warm-up (core: (time of 3 steps - time of 1 step) / 2, its set-up excluded).
2. **Foreground latency**: a real ComfyUI server with the plugin and the tiny models; a 1-step ADD
   KSampler prompt at 512² (new seed each time) timed with no job, with an ADD Train job running
   ``polite`` (pauses between steps while the queue has work) and ``alongside``. Goal: polite ≤ 1.2×.

    .venv/bin/python -m benchmarks.bench_train [--quick] [--realistic] [--device cpu|cuda] [--skip-latency]

``--realistic``: ComfyUI's UNetModel with SD1.5's real config (860 M parameters, seeded random
weights), 256² batch 1 on a CPU (512² batch 4 bf16 on a GPU). ``--device cuda`` adds the GPU rows
the training issue asks for (SD1.5-shaped 512² batch 4; SDXL-shaped 1024² batch 1 with gradient
checkpointing): peak memory and it/s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from benchmarks.bench_lora import SD15_REAL_CONFIG, _import_comfy, _reset_peak_rss, _scratch, _status  # noqa: E402

SDXL_REAL_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


# --------------------------------------------------------------------------------------------
# one case, in its own process
# --------------------------------------------------------------------------------------------
def _model(kind: str, dtype):
    """A ModelPatcher: the tiny SD1.5 checkpoint, or seeded SD1.5/SDXL-shaped UNets."""
    import torch

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    if kind == "tiny":
        from scripts.tiny_models import build_all
        return comfy.sd.load_checkpoint_guess_config(str(build_all()["tiny_sd15"]))[0]
    cfg = dict(SD15_REAL_CONFIG if kind == "sd15" else SDXL_REAL_CONFIG)
    mc = (comfy.supported_models.SD15 if kind == "sd15" else comfy.supported_models.SDXL)(cfg)
    mc.set_inference_dtype(dtype, None)
    with torch.inference_mode(False):
        model = mc.get_model({}, device=mm.get_torch_device() if dtype != torch.float32 else None)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.diffusion_model.named_parameters():
                if p.ndim >= 2:
                    p.copy_((torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5).to(p.dtype))
                else:
                    p.fill_(1.0 if "norm" in name else 0.0)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def _inputs(model, batch: int, size: int, device):
    """Fixed latents, context and pooled vectors of the model's widths (no CLIP needed)."""
    import torch

    g = torch.Generator().manual_seed(1)
    unet = model.model.diffusion_model
    ctx_dim = model.model.model_config.unet_config["context_dim"]
    lat = torch.randn(batch, 4, size // 8, size // 8, generator=g)
    ctx = torch.randn(batch, 77, ctx_dim, generator=g)
    pooled = torch.randn(batch, 1280 if ctx_dim == 2048 else 768, generator=g)
    y = None
    if getattr(model.model, "adm_channels", 0):
        y = torch.cat([model.model.encode_adm(pooled_output=pooled[i:i + 1], width=size, height=size)
                       for i in range(batch)]).float()
    del unet
    return lat, ctx, pooled, y


def _mem_start(device) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    _reset_peak_rss()
    return _status("VmRSS")


def _mem_peak(device) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status("VmHWM")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(case: str, kind: str, batch: int, size: int, rank: int, iters: int, dtype_name: str,
             checkpointing: bool, device_name: str) -> dict:
    import torch

    _import_comfy(device_name)
    import comfy.model_management as mm

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    device = mm.get_torch_device()
    model = _model(kind, dtype)
    lat, ctx, pooled, y = _inputs(model, batch, size, device)
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    if case == "core_lora":
        mm.load_models_gpu([model])
    base = _mem_start(device)
    if case == "core_lora":
        secs = _core_step_seconds(model, lat, ctx, pooled, batch, rank, dtype_name, checkpointing)
    else:
        secs = _add_seconds(case, model, lat, ctx, pooled, y, batch, rank, iters, checkpointing, device)
    peak = _mem_peak(device)
    return {"case": case, "peak_mb": (peak - base) / 2**20, "s_per_it": secs, "params_m": params / 1e6}


def _add_seconds(case, model, lat, ctx, pooled, y, batch, rank, iters, checkpointing, device) -> float:
    import torch

    from scripts.comfy_host import plugin_module

    adapter = plugin_module("nodes.train_adapter")
    ADDConfig = plugin_module("training.config").ADDConfig
    LatentDataset = plugin_module("training.data").LatentDataset
    disc = plugin_module("training.discriminator")
    run_mod = plugin_module("training.run")
    DiscreteSchedule = plugin_module("training.schedule").DiscreteSchedule

    with torch.inference_mode():  # as node execution runs
        network = adapter.frozen_copy(model, device)
    cond = {"context": ctx.to(device), "y": y.to(device) if y is not None else None}
    data = LatentDataset(lat.to(device), cond=cond, pooled=pooled.to(device))
    cfg = ADDConfig(batch_size=batch, lora_rank=rank, lora_alpha=float(rank), max_steps=10**6, save_every=0,
                    preview_every=0)
    spec = run_mod.RunSpec(cfg=cfg, network=network, denoise=adapter.comfy_denoise, data=data,
                   schedule=DiscreteSchedule(adapter.schedule_sigmas(model)), lora_path=_scratch("bt_") + "/x.safetensors",
                   device=device, feature_modules=adapter.feature_modules(network),
                   target_modules=adapter.lora_targets(network),
                   checkpoint_modules=adapter.checkpoint_modules(network) if checkpointing else (), c_dim=pooled.shape[1])
    run = run_mod.ADDRun(spec)
    run.build()
    if case == "add_separate":  # the teacher and its features on a second frozen copy
        with torch.inference_mode():
            teacher_net = adapter.frozen_copy(model, device)
        student = run.models.student

        def teacher(x, sigma, c):
            return adapter.comfy_denoise(teacher_net, x, sigma, c)
        student.teacher = teacher
        hooks = disc.HookedActivations(teacher_net, spec.feature_modules)
        run.models.discriminator.features = disc.TeacherFeatures(lambda x, s, c: hooks(lambda: teacher(x, s, c)),
                                                            spec.schedule, cfg.disc_timestep_range)
    trainer = run.trainer
    trainer.train_step()  # warm-up
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        trainer.train_step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _core_step_seconds(model, lat, ctx, pooled, batch, rank, dtype_name, checkpointing) -> float:
    from comfy_extras.nodes_train import TrainLoraNode, adapter_maps

    def run(steps):
        t0 = time.perf_counter()
        # An INPUT_IS_LIST node: every input comes as a list.
        inputs = dict(model=model, latents={"samples": lat}, positive=[[ctx[:1], {"pooled_output": pooled[:1]}]],
                      batch_size=batch, grad_accumulation_steps=1, steps=steps, learning_rate=1e-4, rank=rank,
                      optimizer="AdamW", loss_function="MSE", seed=0,
                      training_dtype="fp32" if dtype_name == "fp32" else "bf16",
                      lora_dtype="fp32" if dtype_name == "fp32" else "bf16",
                      algorithm=list(adapter_maps.keys())[0], gradient_checkpointing=checkpointing,
                      existing_lora="[None]")
        args = {k: [v] for k, v in inputs.items()}
        # One latent per sample: 0.3.75's single-tensor path leaves a variable unset (multi_res).
        # (At batch 1 the one sample is listed twice, so the list path is still taken.)
        args["latents"] = [{"samples": lat[i:i + 1]} for i in range(lat.shape[0])] * (2 if lat.shape[0] == 1 else 1)
        TrainLoraNode.execute(**args)
        return time.perf_counter() - t0
    one = run(1)
    three = run(3)
    return (three - one) / 2


def _subprocess_case(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_train", "--case", *args], cwd=ROOT,
                         capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        raise RuntimeError(f"case {args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


# --------------------------------------------------------------------------------------------
# foreground latency with a job running
# --------------------------------------------------------------------------------------------
def latency_rows(repeats: int) -> list[tuple[str, float, float]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from server_harness import ComfyServer, link_models
    from scripts.tiny_models import build_all
    from test_train_server import sample_prompt, train_prompt

    home = Path(_scratch("bt_home_"))
    link_models(home, build_all())
    srv = ComfyServer(home, home / "server.log")
    seed = [100]

    def one_prompt() -> float:
        seed[0] += 1
        p = sample_prompt(None, steps=1, size=512)
        p["5"]["inputs"]["seed"] = seed[0]
        t0 = time.perf_counter()
        h = srv.run(p)
        assert h["status"]["status_str"] == "success", h["status"]
        return time.perf_counter() - t0

    def with_job(mode: str) -> list[float]:
        srv.run(train_prompt(f"bench_{mode}", max_steps=10**6, run_mode=mode, preview_every=0, save_every=0))
        job = [j for j in srv.get("/add/jobs")["jobs"] if j["name"] == f"bench_{mode}"][-1]
        while srv.get(f"/add/jobs/{job['id']}")["step"] < 2:
            time.sleep(0.2)
        times = []
        for _ in range(repeats):
            times.append(one_prompt())
            time.sleep(1.0)  # let the job take its turn between prompts, as between a user's clicks
        srv.post(f"/add/jobs/{job['id']}/cancel", {})
        while srv.get(f"/add/jobs/{job['id']}")["state"] not in ("cancelled", "done", "failed"):
            time.sleep(0.2)
        return times

    try:
        srv.wait_ready(srv.proc, timeout=180)
        one_prompt()  # warm-up: load the models
        base = [one_prompt() for _ in range(repeats)]
        polite = with_job("polite")
        alongside = with_job("alongside")
        base += [one_prompt() for _ in range(repeats)]
    finally:
        srv.stop()
    b = statistics.median(base)
    return [("no job", b, 1.0), ("job running, polite", statistics.median(polite), statistics.median(polite) / b),
            ("job running, alongside", statistics.median(alongside), statistics.median(alongside) / b)]


# --------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="fewer iterations / repeats")
    ap.add_argument("--realistic", action="store_true", help="SD1.5's real UNet config instead of the tiny model")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--skip-latency", action="store_true")
    a = ap.parse_args(argv)
    if a.case is not None:  # one case, in this (fresh) process
        case, kind, batch, size, rank, iters, dtype_name, ckpt, device = a.case
        res = run_case(case, kind, int(batch), int(size), int(rank), int(iters), dtype_name, ckpt == "1", device)
        print("RESULT " + json.dumps(res))
        return

    iters = 2 if a.quick else 4
    if a.device == "cuda":
        settings = [("sd15", 4, 512, "bf16", "0"), ("sdxl", 1, 1024, "bf16", "1")]
    elif a.realistic:
        settings = [("sd15", 1, 256, "fp32", "0")]
    else:
        settings = [("tiny", 2, 64, "fp32", "0"), ("tiny", 4, 128, "fp32", "0")]
    print(f"# ADD Train benchmark ({a.device}); LoRA rank 16; times are medians of {iters} iterations")
    print("| model | batch, size | dtype | ckpt | case | peak MB (growth) | s / it | it/s |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for kind, batch, size, dtype_name, ckpt in settings:
        rows = {}
        cases = ("add_shared", "add_separate", "core_lora") if a.device == "cpu" or kind == "sd15" else ("add_shared",)
        for case in cases:
            r = _subprocess_case([case, kind, str(batch), str(size), "16", str(iters), dtype_name, ckpt, a.device])
            rows[case] = r
            print(f"| {kind} ({r['params_m']:.0f} M) | {batch}, {size}² | {dtype_name} | {ckpt} | {case} | "
                  f"{r['peak_mb']:.0f} | {r['s_per_it']:.3f} | {1 / max(r['s_per_it'], 1e-9):.2f} |", flush=True)
        if "core_lora" in rows:
            ratios.append((kind, batch, size, rows["add_shared"]["peak_mb"] / max(rows["core_lora"]["peak_mb"], 1e-9),
                           rows["add_shared"]["peak_mb"] / max(rows["add_separate"]["peak_mb"], 1e-9),
                           rows["add_shared"]["s_per_it"] / max(rows["core_lora"]["s_per_it"], 1e-9)))
    if ratios:
        print("\n| model | batch, size | peak: ADD ÷ core LoRA step (goal ≤ 1.3) | peak: shared ÷ separate teacher | "
              "time: ADD iteration ÷ core LoRA step |")
        print("|---|---|---|---|---|")
        for kind, batch, size, r1, r2, r3 in ratios:
            print(f"| {kind} | {batch}, {size}² | {r1:.2f} | {r2:.2f} | {r3:.2f} |")
    if not a.skip_latency and a.device == "cpu":
        print("\n# foreground 1-step ADD KSampler prompt (tiny SD1.5, 512²) while an ADD Train job runs (64², batch 2)")
        print("| situation | median s / prompt | ÷ no job (goal polite ≤ 1.2) |")
        print("|---|---|---|")
        for name, s, ratio in latency_rows(3 if a.quick else 5):
            print(f"| {name} | {s:.2f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""Headless ADD training on 1 vs N processes (torchrun, gloo on CPUs, NCCL on GPUs): images per second.

Every case is one ``torchrun --standalone --nproc_per_node N scripts/train_add.py config`` run of
the same settings (the node's default data: the teacher generates each batch from the prompts),
fresh output each time. Throughput is read from the run's own ``train_log.jsonl`` (one line per
step, written by rank 0 with a wall-clock time): global images over the steps after the first two
(warm-up: optimiser state, kernel choice) divided by their wall time, so model loading and process
start are not counted.

Cases (per-rank batch B):
* ``1 process, batch B``      the baseline
* ``1 process, batch N*B``    the same global batch on one process
* ``N processes, batch B``    data parallel: global batch N*B, gradients all-reduced every step
Scaling efficiency = images/s of N processes / (N x images/s of 1 process at batch B): 1.0 is linear.
On a CPU the processes share the cores (each gets cores/N threads; one process gets them all), so
expect little gain there: the CPU rows check the machinery and report the overhead honestly. The
goal (>= 0.85 per added GPU for LoRA training at 512², batch 4 per GPU) is for GPUs.

    .venv/bin/python -m benchmarks.bench_distributed [--nproc 2] [--steps 8] [--size 64] [--batch 2]
                                                     [--device cpu|cuda] [--model FILE.safetensors]

Default model: the tiny SD1.5 the tests build (26 M parameters); ``--model`` takes a real checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "train_add.py"
WARMUP = 2


def run_case(nproc: int, batch: int, a, out_dir: Path, threads: int) -> dict:
    name = f"n{nproc}_b{batch}"
    output = out_dir / f"{name}.safetensors"
    cfg = dict(model=a.model, output=str(output), prompts=["a red fox", "a blue car", "a green tree", "a city at night"],
               width=a.size, height=a.size, data_cfg=3.0, data_steps=a.data_steps, batch_size=batch,
               max_steps=a.steps, save_every=0, preview_every=0, seed=0, device=a.device, lora_rank=16,
               lora_alpha=16.0)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(SCRIPT),
           str(path)]
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if res.returncode != 0:
        raise SystemExit(f"{name} failed:\n{res.stderr[-4000:]}")
    log = output.with_suffix(".add-state") / "train_log.jsonl"
    rows = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if r["step"] > WARMUP]
    if len(rows) < 2:
        raise SystemExit(f"{name}: too few steps after warm-up; raise --steps")
    steps = rows[-1]["step"] - rows[0]["step"]
    secs = rows[-1]["time"] - rows[0]["time"]
    global_batch = rows[-1]["global_batch"]
    step_times = [b["time"] - a_["time"] for a_, b in zip(rows, rows[1:])]
    return {"case": f"{nproc} process{'es' if nproc > 1 else ''}, batch {batch}" + (" each" if nproc > 1 else ""),
            "nproc": nproc, "batch": batch, "global_batch": global_batch, "images_per_s": steps * global_batch / secs,
            "s_per_step": statistics.median(step_times), "wall_s": wall, "threads": threads}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--data-steps", type=int, default=4, help="teacher steps per generated training image")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="", help="checkpoint to train on (default: the tests' tiny SD1.5)")
    a = p.parse_args(argv)
    if not a.model:
        sys.path.insert(0, str(ROOT))
        from scripts.tiny_models import build_all

        a.model = str(build_all()["tiny_sd15"])
    cores = os.cpu_count() or 1
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="add_bench_dist_") as tmp:
        out = Path(tmp)
        cases = [(1, a.batch), (1, a.batch * a.nproc), (a.nproc, a.batch)]
        rows = []
        for nproc, batch in cases:
            threads = max(1, cores // nproc) if a.device == "cpu" else 1
            r = run_case(nproc, batch, a, out, threads)
            print(f"[distributed] {r['case']}: {r['images_per_s']:.3f} img/s, {r['s_per_step']:.2f} s/step "
                  f"(global batch {r['global_batch']}, {threads} thread(s)/process, {r['wall_s']:.0f} s in all)",
                  flush=True)
            rows.append(r)
    base, same_global, multi = rows
    eff = multi["images_per_s"] / (a.nproc * base["images_per_s"])
    print(f"\n{a.device}, {os.path.basename(a.model)}, {a.size}x{a.size}, {a.steps} steps ({WARMUP} warm-up), "
          f"data_steps {a.data_steps}, {cores} cores")
    print("| case | global batch | images/s | s/step |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['global_batch']} | {r['images_per_s']:.3f} | {r['s_per_step']:.2f} |")
    print(f"\nscaling efficiency, {a.nproc} processes vs 1 at batch {a.batch}: {eff:.2f} "
          f"(goal on GPUs: >= 0.85); vs 1 process at the same global batch: "
          f"{multi['images_per_s'] / same_global['images_per_s']:.2f}x")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()

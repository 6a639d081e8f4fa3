"""ADD training: one iteration against ComfyUI's core LoRA step, and what a running job costs the foreground.

Part 1 -- one iteration, peak memory and time, same model / batch / size / LoRA rank:

* ``ADD, shared``   one ADD iteration (D + G: ``training.loop.Trainer.train_step``) built the way
                    ADD Train builds it (``nodes/train.py: start_training``): the job's frozen copy
                    (``adapters.model.frozen_copy``), prompts encoded once (``PromptBank``), an
                    ``ADDRun`` from a ``RunSpec`` (LoRA on the node's target layers, teacher-feature
                    discriminator). The LoRA student SHARES the frozen copy with the teacher
                    (teacher = same network, adapters off). Data: a ``LatentDataset`` of fixed random
                    latents (the image-latent path), so teacher data generation is NOT counted.
* ``ADD, separate`` the same, except that the teacher runs on a SECOND frozen copy: the LoRA student's
                    hooks sit on copy B, the teacher pass, the distillation target and the
                    discriminator's teacher features run on copy A (``training_mode='full'`` would
                    instead train a full copy; this isolates what sharing the weights saves).
* ``core LoRA``     ComfyUI's own ``TrainLoraNode`` (``comfy_extras/nodes_train.py``, V3 node, its own
                    TrainSampler, MSE, LoRA on every weight, diffs on norms/biases), driven in-process
                    under inference mode like the prompt thread, same latents, conditioning and rank.

Every case runs in a fresh subprocess. Peak memory on a CPU: RSS high-water mark (VmHWM, reset through
/proc/self/clear_refs) minus the RSS with the input model loaded and the prompt encoded, over set-up
plus all iterations ("set-up + iterations"), and over the iterations alone ("iterations only", minus the
RSS just before them).
On a CPU ComfyUI's weights already live in RAM: the core node trains on them in place, ADD makes its
own copy (counted in "set-up + iterations"). On CUDA: torch.cuda.max_memory_allocated over the same
span, from an empty GPU (ComfyUI loads models lazily; the CLIP is unloaded after encoding), so both
sides count one copy of the weights there.
Seconds per iteration: median of the iterations after the first (the first creates the optimiser
state and picks kernels); the core node runs ``steps = 1 + iters`` in one call and is timed per loop
iteration (its set-up excluded). Cases run in rounds (A B C A B C ...) and medians are taken.

Part 2 -- foreground latency while a job runs: a real ComfyUI server (``main.py``, this plugin, the
tiny models standing in for the shipped workflows' files) runs the shipped 1-step workflow
``workflows/sd_turbo_txt2img_1step.json`` (ADD KSampler, TinyVAE Decode, Save Image; converted with
``scripts/workflow_api.py``; a new seed each time) with no job, and while an ADD Train job (started
through POST /prompt, node defaults but 64x64 batch 2, cancelled through POST /add/jobs/{id}/cancel
after its block) trains in ``polite`` mode (it waits between iterations while the queue has work)
and in ``alongside`` mode -- with the node's default data (the teacher generates each batch) and,
without --quick, also on one image encoded once (no generation in the iteration). An idle block
precedes every job block; prompts are spaced by the same seeded random gaps in every block, so they
arrive at random points of the job's iterations. Latency = POST /prompt until /history shows it done
(polled every 10 ms); medians. Goal: polite <= 1.2x idle.

Sizes: --quick = tiny model, 64x64 batch 2 (part 1), 3 prompts per block (under 3 minutes on 2 CPU
cores); default = tiny at 64x64 batch 2 and 128x128 batch 4, more iterations, rounds and prompts;
--realistic = part 1 with an SD1.5-shaped UNet at 512x512 batch 1 (about 10 minutes on 2 cores).
--device cuda (not run on the machine that wrote this): SD1.5-shaped UNet at 512x512 batch 4 in bf16,
and SDXL-shaped at 1024x1024 batch 1 with gradient checkpointing; the server runs on the GPU too.
The end line says how much CPU other processes took meanwhile (timings are not reliable above 10 %).

    .venv/bin/python -m benchmarks.bench_train [--quick] [--realistic] [--device cpu|cuda]
                                               [--only iteration|latency] [--size N] [--batch N] [--rank N]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_lora import _reset_peak_rss, _scratch, _status  # noqa: E402

CASES = ("add_shared", "add_separate", "core")
CASE_LABEL = {"add_shared": "ADD, LoRA shares teacher", "add_separate": "ADD, separate teacher copy",
              "core": "core TrainLoraNode"}
PROMPT = "a cinematic photo of a red fox in the snow"


# ============================================================================================
# Part 1: one case in its own process
# ============================================================================================
def _load(kind: str, dtype_name: str):
    """(ModelPatcher, CLIP or None): the tiny SD1.5 checkpoint, or SD1.5/SDXL-shaped UNets of real width
    and depth (``benchmarks.unets``: ComfyUI's own classes, seeded random weights; time and memory do not
    depend on values), or ``tiny_sd15`` / ``tiny_sdxl`` (those paths at test size). The SD1.5-shaped UNets
    get the tiny checkpoint's CLIP (the complete CLIP-L); SDXL gets none."""
    import torch

    import comfy.sd
    from scripts.tiny_models import build_all

    tiny = str(build_all()["tiny_sd15"])
    if kind == "tiny":
        model, clip = comfy.sd.load_checkpoint_guess_config(tiny, output_vae=False)[:2]
        return model, clip
    from benchmarks import unets

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    family, tiny_unet = {"sd15": ("sd15", False), "sdxl": ("sdxl", False), "tiny_sd15": ("sd15", True),
                         "tiny_sdxl": ("sdxl", True)}[kind]
    # random values drawn on the GPU when there is one (SDXL's 2.6 G take a minute on a CPU core)
    patcher = unets.build(family, dtype=dtype, tiny=tiny_unet)
    clip = None
    if family == "sd15":
        clip = comfy.sd.load_checkpoint_guess_config(tiny, output_vae=False, output_model=False)[1]
    return patcher, clip


def _conditioning(model, clip, rows: int, size: int, device):
    """Both sides' conditioning of one prompt: ADD's (PromptBank rows: cond dict, pooled, uncond, c_dim)
    and the core node's (a CONDITIONING list as CLIPTextEncode makes it). Without a CLIP (SDXL-shaped
    UNet), random tensors of SDXL's widths stand in (context 2048, pooled 1280, ADM y 2816)."""
    import torch

    from scripts.comfy_host import plugin_module

    adapter = plugin_module("adapters.model")
    with torch.inference_mode():  # as on the prompt thread
        if clip is not None:
            bank = adapter.PromptBank(clip, [PROMPT], model.model, size, size)
            core_pos = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
            with torch.inference_mode(False):
                cond, pooled = bank.encode([PROMPT] * rows, device)
                return cond, pooled, bank.uncond_on(device), bank.c_dim, core_pos
    with torch.inference_mode(False):
        g = torch.Generator().manual_seed(3)
        ctx, pooled = torch.randn(1, 77, 2048, generator=g), torch.randn(1, 1280, generator=g)
        y = model.model.encode_adm(pooled_output=pooled, width=size, height=size, crop_w=0, crop_h=0,
                                   target_width=size, target_height=size).float()
        cond = {"context": ctx.expand(rows, -1, -1).to(device), "y": y.expand(rows, -1).to(device)}
        core_pos = [[ctx.clone(), {"pooled_output": pooled.clone()}]]
        return cond, pooled.expand(rows, -1).to(device), None, 1280, core_pos


class _Mem:
    """Peak memory over a span: CPU RSS high-water mark, or CUDA max_memory_allocated."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def start(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        _reset_peak_rss()
        return _status("VmRSS")

    def peak(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _status("VmHWM")


def _separate_teacher_student(model, device, step_mod):
    """A LoRAStudent whose adapters sit on a second frozen copy (B) while the teacher is the RunSpec's
    network (A): build_models wires the discriminator's teacher features and the distillation target
    to ``teacher_network()`` / ``teacher()``, i.e. to copy A."""
    import torch
    import torch.utils.checkpoint

    from scripts.comfy_host import plugin_module

    adapter = plugin_module("adapters.model")

    class SeparateTeacherLoRAStudent(step_mod.LoRAStudent):
        def __init__(self, network, denoise, rank, alpha, generator, target_modules=None):
            self.teacher_net = network  # copy A: the teacher
            with torch.inference_mode():  # as the node makes its copy, on the prompt thread
                student_net = adapter.frozen_copy(model, device)  # copy B: the student's base
            super().__init__(student_net, denoise, rank, alpha, generator, target_modules=target_modules)

        def teacher(self, x, sigma, cond):
            return self.denoise(self.teacher_net, x, sigma, cond)

        def teacher_network(self):
            return self.teacher_net

        def teacher_params(self):
            return list(self.teacher_net.parameters())

        def enable_gradient_checkpointing(self, module_names):
            super().enable_gradient_checkpointing(module_names)  # copy B
            mods = dict(self.teacher_net.named_modules())  # and the same units of copy A
            for name in module_names:
                forward = mods[name].forward

                def checkpointed(*args, _forward=forward, **kwargs):
                    if not torch.is_grad_enabled():
                        return _forward(*args, **kwargs)
                    return torch.utils.checkpoint.checkpoint(lambda *a: _forward(*a, **kwargs), *args,
                                                             use_reentrant=False)
                mods[name].forward = checkpointed

    return SeparateTeacherLoRAStudent


def _add_case(case, model, cond, pooled, uncond, c_dim, lat, a, device, mem, rss0) -> dict:
    import torch

    from scripts.comfy_host import plugin_module

    adapter = plugin_module("adapters.model")
    ADDConfig = plugin_module("training.config").ADDConfig
    LatentDataset = plugin_module("training.data").LatentDataset
    step_mod = plugin_module("training.add_step")  # build_models makes the LoRAStudent
    run_mod = plugin_module("training.run")
    DiscreteSchedule = plugin_module("training.schedule").DiscreteSchedule

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    with torch.inference_mode():  # what start_training does on the prompt thread
        network = adapter.frozen_copy(model, device)
        t_max = len(adapter.schedule_sigmas(model)) - 1
        cfg = ADDConfig(num_train_timesteps=t_max + 1, lora_rank=a.rank, lora_alpha=float(a.rank), batch_size=a.batch,
                        max_steps=10**6, save_every=0, preview_every=0, teacher_timestep_range=(1, t_max),
                        disc_timestep_range=(0, t_max))
        schedule = DiscreteSchedule(adapter.schedule_sigmas(model))
    # The job's thread (no inference mode) from here on.
    data = LatentDataset(lat.to(device), cond=cond, pooled=pooled, uncond=uncond)
    spec = run_mod.RunSpec(
        cfg=cfg, network=network, denoise=adapter.comfy_denoise, data=data, schedule=schedule,
        lora_path=os.path.join(_scratch("bench_train_run_"), "bench.safetensors"), device=device,
        feature_modules=adapter.feature_modules(network, cfg.disc_features), target_modules=adapter.lora_targets(network),
        checkpoint_modules=adapter.checkpoint_modules(network) if a.ckpt else (), c_dim=c_dim)
    run = run_mod.ADDRun(spec)
    original = step_mod.LoRAStudent
    if case == "add_separate":
        step_mod.LoRAStudent = _separate_teacher_student(model, device, step_mod)
    try:
        run.build()
    finally:
        step_mod.LoRAStudent = original
    student = run.models.student
    assert (student.teacher_network() is student.network) == (case == "add_shared")
    sync()
    setup_s = time.perf_counter() - t0
    peak_setup = mem.peak()
    base_it = mem.start()
    times = []
    for _ in range(1 + a.iters):
        t = time.perf_counter()
        run.trainer.train_step()
        sync()
        times.append(time.perf_counter() - t)
    peak_it = mem.peak()
    lora = sum(p.numel() for p in student.trainable_parameters())
    return {"setup_s": setup_s, "times": times, "peak_all": max(peak_setup, peak_it) - rss0,
            "peak_iter": peak_it - base_it, "trainable_m": lora / 1e6}


def _node_defaults(node) -> dict:
    """{parameter of the V3 node's execute(): its schema default}, for the parameters that have one."""
    import inspect

    params = inspect.signature(node.execute).parameters
    return {i.id: i.default for i in node.define_schema().inputs
            if i.id in params and getattr(i, "default", None) is not None}


def _core_case(model, core_pos, lat, a, device, mem, rss0) -> dict:
    import torch

    import comfy.model_management as mm
    from comfy_extras import nodes_train

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    marks: dict = {"starts": [], "trainable": 0}
    orig_sample, orig_fwd_bwd = nodes_train.TrainSampler.sample, nodes_train.TrainSampler.fwd_bwd

    def sample(self, *args, **kwargs):  # the training loop: set-up is over when it is entered
        sync()
        marks["peak_setup"] = mem.peak()
        marks["base_it"] = mem.start()
        marks["trainable"] = sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])
        out = orig_sample(self, *args, **kwargs)
        sync()
        marks["end"] = time.perf_counter()
        return out

    def fwd_bwd(self, *args, **kwargs):  # called once per loop iteration (grad_acc 1, one resolution)
        sync()
        marks["starts"].append(time.perf_counter())
        return orig_fwd_bwd(self, *args, **kwargs)

    nodes_train.TrainSampler.sample, nodes_train.TrainSampler.fwd_bwd = sample, fwd_bwd
    dt = "fp32" if a.dtype == "fp32" else "bf16"
    # An is_input_list node: every input is a list. Latents as a list of one-sample LATENTs: 0.3.75's
    # single-LATENT path leaves a variable unset (multi_res) and fails.
    args = {"model": [model], "latents": [{"samples": lat[i:i + 1].clone()} for i in range(lat.shape[0])],
            "positive": [core_pos], "batch_size": [a.batch], "grad_accumulation_steps": [1],
            "steps": [1 + a.iters], "learning_rate": [1e-4], "rank": [a.rank], "optimizer": ["AdamW"],
            "loss_function": ["MSE"], "seed": [0], "training_dtype": [dt], "lora_dtype": [dt],
            "algorithm": ["LoRA"], "gradient_checkpointing": [bool(a.ckpt)], "existing_lora": ["[None]"]}
    # Inputs later ComfyUIs added (0.33: quantized_backward, checkpoint_depth, offloading, bucket_mode,
    # bypass_mode) are required parameters of execute(): give them the node's own defaults.
    args.update({k: [v] for k, v in _node_defaults(nodes_train.TrainLoraNode).items() if k not in args})
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():  # ComfyUI executes nodes under inference mode
            out = nodes_train.TrainLoraNode.execute(**args)
    finally:
        nodes_train.TrainSampler.sample, nodes_train.TrainSampler.fwd_bwd = orig_sample, orig_fwd_bwd
    peak_it = mem.peak()
    edges = marks["starts"] + [marks["end"]]
    times = [b - a_ for a_, b in zip(edges, edges[1:])]
    assert len(times) == 1 + a.iters, (len(times), a.iters)
    del out
    mm.unload_all_models()
    return {"setup_s": marks["starts"][0] - t0, "times": times, "peak_all": max(marks["peak_setup"], peak_it) - rss0,
            "peak_iter": peak_it - marks["base_it"], "trainable_m": marks["trainable"] / 1e6}


def worker(a) -> dict:
    import torch

    from scripts import comfy_host

    comfy_host.import_comfy(base_directory=_scratch("bench_train_home_"), cpu=(a.device == "cpu"))
    import comfy.model_management as mm
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    device = mm.get_torch_device()
    model, clip = _load(a.kind, a.dtype)
    # A dataset of max(2, batch) latents (the core node's single-LATENT path is broken, see _core_case).
    rows = max(2, a.batch)
    cond, pooled, uncond, c_dim, core_pos = _conditioning(model, clip, rows, a.size, device)
    with torch.inference_mode(False):
        lat = torch.randn(rows, 4, a.size // 8, a.size // 8, generator=torch.Generator().manual_seed(1))
    params = list(model.model.diffusion_model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    mm.unload_all_models()  # CLIP off the GPU: both sides start from an empty one
    mem = _Mem(device)
    rss0 = mem.start()
    if a.case == "core":
        res = _core_case(model, core_pos, lat, a, device, mem, rss0)
    else:
        res = _add_case(a.case, model, cond, pooled, uncond, c_dim, lat, a, device, mem, rss0)
    res.update(case=a.case, weights_mb=weights / 2**20, params_m=sum(p.numel() for p in params) / 1e6,
               device=str(device))
    return res


def _run_case(a, case: str, kind: str, size: int, batch: int, dtype: str, ckpt: bool, iters: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case, "--kind", kind, "--size", str(size),
           "--batch", str(batch), "--dtype", dtype, "--rank", str(a.rank), "--iters", str(iters), "--device", a.device]
    if ckpt:
        cmd.append("--ckpt")
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark worker {case} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")


def part_iteration(a) -> None:
    if a.device == "cuda":
        settings = [("sd15", "SD1.5-shaped UNet (860 M)", a.size or 512, a.batch or 4, "bf16", False),
                    ("sdxl", "SDXL-shaped UNet (2.6 G)", 1024, 1, "bf16", True)]
    elif a.realistic:
        settings = [("sd15", "SD1.5-shaped UNet (860 M)", a.size or 512, a.batch or 1, "fp32", False)]
    elif a.quick or a.size or a.batch:
        settings = [("tiny", "tiny SD1.5 (checkpoint)", a.size or 64, a.batch or 2, "fp32", False)]
    else:
        settings = [("tiny", "tiny SD1.5 (checkpoint)", 64, 2, "fp32", False),
                    ("tiny", "tiny SD1.5 (checkpoint)", 128, 4, "fp32", False)]
    iters = a.iters or (2 if a.realistic else 3 if a.quick else 4)
    rounds = a.rounds or (1 if a.quick or a.realistic else 2)
    unit = "MB allocated" if a.device == "cuda" else "MB RSS"
    for kind, label, size, batch, dtype, ckpt in settings:
        print(f"\n## One training iteration: {label}, {size}x{size} (latent {size // 8}x{size // 8}), batch {batch}, "
              f"{dtype}, LoRA rank {a.rank}, gradient checkpointing {'on' if ckpt else 'off'}, device {a.device}; "
              f"{iters} timed iterations after 1 warm-up per case, {rounds} round(s)", flush=True)
        res: dict[str, list] = {c: [] for c in CASES}
        for _ in range(rounds):
            for case in CASES:
                res[case].append(_run_case(a, case, kind, size, batch, dtype, ckpt, iters))
        med = {}
        for case in CASES:
            rs = res[case]
            med[case] = {
                "s": statistics.median(t for r in rs for t in r["times"][1:]),
                "first": statistics.median(r["times"][0] for r in rs),
                "setup": statistics.median(r["setup_s"] for r in rs),
                "all": statistics.median(r["peak_all"] for r in rs) / 2**20,
                "iter": statistics.median(r["peak_iter"] for r in rs) / 2**20,
                "trainable": rs[0]["trainable_m"]}
        w = res["core"][0]["weights_mb"]
        print(f"UNet weights: {res['core'][0]['params_m']:.0f} M parameters, {w:.0f} MB; data: fixed random latents "
              "(ADD: LatentDataset, no teacher data generation)")
        hdr = (f"| {'case':<27} | {'peak ' + unit + ', set-up + iterations':>34} | {'peak, iterations only':>21} | "
               f"{'s / iteration':>13} | {'it/s':>6} | {'first it. s':>11} | {'set-up s':>8} | {'trained M':>9} |")
        print(hdr)
        print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
        for case in CASES:
            m = med[case]
            print(f"| {CASE_LABEL[case]:<27} | {m['all']:34.0f} | {m['iter']:21.0f} | {m['s']:13.3f} | "
                  f"{1 / m['s']:6.3f} | {m['first']:11.2f} | {m['setup']:8.2f} | {m['trainable']:9.2f} |")
        sh, se, co = med["add_shared"], med["add_separate"], med["core"]
        print(f"| {'ratio':<52} | {'set-up + iterations':>19} | {'iterations only':>15} | {'time':>6} |")
        print(f"|{'-' * 54}|{'-' * 21}|{'-' * 17}|{'-' * 8}|")
        for name, x, y in (("ADD (shared) ÷ core LoRA step  (goal: memory <= 1.3)", sh, co),
                           ("ADD shared ÷ ADD separate teacher", sh, se)):
            print(f"| {name:<52} | {x['all'] / y['all']:19.2f} | {x['iter'] / y['iter']:15.2f} | "
                  f"{x['s'] / y['s']:6.2f} |")
        if a.device == "cpu":
            print("peak = RSS high-water mark minus RSS with ComfyUI's model loaded and the prompt encoded. On a CPU "
                  "the core node trains ComfyUI's weights in place; ADD's 'set-up + iterations' includes the job's "
                  f"own frozen copy ({w:.0f} MB; two for the separate teacher).")
        else:
            print("peak = torch.cuda.max_memory_allocated growth from an empty GPU; both sides include one copy of the "
                  "weights (the core node loads ComfyUI's model, ADD its frozen copy; the separate teacher two).")


# ============================================================================================
# Part 2: foreground latency with a job running
# ============================================================================================
class _Server:
    """``main.py`` on a free loopback port with this plugin, the tiny models and the stand-ins the
    shipped workflows name, in a throw-away base directory."""

    def __init__(self, device: str):
        from scripts.comfy_client import ComfyClient
        from scripts.comfy_host import PLUGIN_LINK_NAME, free_port, host_path
        from scripts.demo_models import prepare
        from scripts.tiny_models import CACHE, build_all

        self.home = Path(_scratch("bench_train_server_"))
        for name, path in build_all().items():
            dst = self.home / "models" / Path(path).relative_to(CACHE)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(path)
        prepare([], self.home / "models", self.home / "input")
        (self.home / "custom_nodes").mkdir(parents=True, exist_ok=True)
        (self.home / "custom_nodes" / PLUGIN_LINK_NAME).symlink_to(ROOT)
        port = free_port()
        self.client = ComfyClient(f"http://127.0.0.1:{port}")
        cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(self.home), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
        if device == "cpu":
            cmd.append("--cpu")
        self.log_path = self.home / "server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=host_path(), stdout=self._log, stderr=subprocess.STDOUT)
        self.client.wait_ready(self.proc, timeout=300, log_tail=self.tail)

    def tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _timed_prompt(client, prompt: dict) -> float:
    """Seconds from POST /prompt until its history entry says success (polled every 10 ms)."""
    t0 = time.perf_counter()
    ans = client.queue(prompt)
    if "prompt_id" not in ans:
        raise RuntimeError(f"prompt refused: {json.dumps(ans)[:2000]}")
    pid = ans["prompt_id"]
    while True:
        hist = client.get(f"/history/{pid}").get(pid)
        status = (hist or {}).get("status", {}).get("status_str")
        if status == "success":
            return time.perf_counter() - t0
        if status == "error":
            raise RuntimeError(f"foreground prompt failed: {json.dumps(hist['status'])[:3000]}")
        if time.perf_counter() - t0 > 600:
            raise TimeoutError("foreground prompt did not finish in 600 s")
        time.sleep(0.01)


JOB_SIZE, JOB_BATCH = 64, 2


def _train_prompt(client, name: str, mode: str, data: str = "teacher", overrides: dict | None = None) -> dict:
    """API prompt: CheckpointLoaderSimple (-> LoadImage) -> ADD Train with the node's defaults (read from
    /object_info: its prompts, rank, timesteps, teacher-data settings, ...) except small images and batch,
    many steps and the run mode. ``data``: 'teacher' = no dataset, the teacher generates the training
    latents each iteration (the node's default path); 'images' = one image encoded once (no generation)."""
    info = client.get("/object_info/ADDTrain")["ADDTrain"]["input"]
    inputs = {k: v[1]["default"] for k, v in info["required"].items()
              if len(v) > 1 and isinstance(v[1], dict) and "default" in v[1]}
    inputs.update(model=["1", 0], clip=["1", 1], name=name, max_steps=1_000_000, batch_size=JOB_BATCH, width=JOB_SIZE,
                  height=JOB_SIZE, discriminator="teacher", run_mode=mode)
    inputs.update(overrides or {})
    p = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
         "2": {"class_type": "ADDTrain", "inputs": inputs}}
    if data == "images":
        p["3"] = {"class_type": "LoadImage", "inputs": {"image": "example.png"}}
        inputs.update(images=["3", 0], vae=["1", 2])
    return p


def part_latency(a) -> None:
    n = a.prompts or (3 if a.quick else 5)
    rounds = a.rounds or (1 if a.quick else 2)
    srv = _Server(a.device)
    try:
        t, info = _latency_blocks(a, srv, n, rounds)
    except BaseException:
        print(srv.tail(), file=sys.stderr)
        raise
    finally:
        srv.stop()
    base = statistics.median(t["idle"])
    hdr = (f"| {'situation':<40} | {'median s / prompt':>17} | {'÷ no job':>8} | {'goal':>6} | "
           f"{'job s / iteration alone':>23} | {'job iterations during the block':>31} |")
    print(hdr)
    print("|" + "|".join("-" * len(c) for c in hdr.split("|")[1:-1]) + "|")
    print(f"| {'no job':<40} | {base:17.3f} | {1.0:8.2f} | {'':>6} | {'':>23} | {'':>31} |")
    for key in info:
        mode, data = key.split("/")
        m = statistics.median(t[key])
        it_s = [i["it_s"] for i in info[key] if i["it_s"]]
        s_it = f"{1 / statistics.median(it_s):.2f}" if it_s else "-"
        steps = sum(i["steps"] for i in info[key])
        span = sum(i["span"] for i in info[key])
        label = f"job running, {mode}, {'teacher data' if data == 'teacher' else 'image data'}"
        print(f"| {label:<40} | {m:17.3f} | {m / base:8.2f} | {'<= 1.2' if mode == 'polite' else '':>6} | {s_it:>23} | "
              f"{f'{steps} in {span:.0f} s':>31} |")
    print("every prompt, s: " + "; ".join(f"{k} " + " ".join(f"{x:.2f}" for x in v) for k, v in t.items()))
    print("polite: the job trains while the queue is empty and waits between iterations while it is not, so a prompt "
          "shares the device with at most the rest of one iteration; alongside: the job never waits.")


def _latency_blocks(a, srv, n: int, rounds: int, keys: list[str] | None = None) -> tuple[dict, dict]:
    """Prompt latencies with no job and with a job per ``keys`` entry ('mode/data'; default by --quick)."""
    from scripts.workflow_api import load, to_api

    client = srv.client
    job_defaults = _train_prompt(client, "x", "polite", overrides=getattr(a, "job_inputs", None))["2"]["inputs"]
    print(f"\n## Foreground latency: workflows/sd_turbo_txt2img_1step.json (tiny SD1.5 stand-in, 1-step ADD KSampler, "
          f"{a.fg_size}x{a.fg_size}, TinyVAE decode, Save Image; a new seed each time) while an ADD Train job trains "
          f"the tiny SD1.5 (node defaults but {JOB_SIZE}x{JOB_SIZE}, batch {JOB_BATCH}: rank "
          f"{job_defaults['lora_rank']}, teacher-generated data, {job_defaults['data_steps']} DDIM steps at CFG "
          f"{job_defaults['data_cfg']:g}{'' if a.quick else ', or one image encoded once'}; started with POST "
          f"/prompt); device {a.device}; {n} prompts per block, {rounds} round(s), an idle block before each job "
          "block", flush=True)
    rng = random.Random(0)
    gaps = [rng.uniform(0.2, 1.2) for _ in range(n)]  # the same gaps in every block
    seed = [1000]
    wf = to_api(load(ROOT / "workflows" / "sd_turbo_txt2img_1step.json"), client.get("/object_info"))
    sampler_id = next(k for k, v in wf.items() if v["class_type"] == "ADDKSampler")
    latent_id = next(k for k, v in wf.items() if v["class_type"] == "EmptyLatentImage")
    wf[latent_id]["inputs"].update(width=a.fg_size, height=a.fg_size)

    def prompt() -> float:
        seed[0] += 1
        wf[sampler_id]["inputs"]["seed"] = seed[0]  # a new seed: sampler, decode and save run again
        return _timed_prompt(client, wf)

    def block() -> list[float]:
        out = []
        for g in gaps:
            time.sleep(g)
            out.append(prompt())
        return out

    def job(job_id: str) -> dict:
        return client.get(f"/add/jobs/{job_id}")

    def job_block(mode: str, data: str, k: int) -> tuple[list[float], dict]:
        name = f"bench_{mode}_{data}_{k}"
        hist = client.run(_train_prompt(client, name, mode, data, getattr(a, "job_inputs", None)), timeout=600)
        if hist["status"]["status_str"] != "success":
            raise RuntimeError(f"ADD Train prompt failed: {json.dumps(hist['status'])[:3000]}")
        job_id = next(j["id"] for j in client.get("/add/jobs")["jobs"] if j["name"] == name)
        t_end = time.time() + 600
        while job(job_id)["step"] < 2:  # past its set-up and first iteration
            state = job(job_id)
            if time.time() > t_end or state["state"] == "failed":
                raise RuntimeError(f"job {name} did not train: {json.dumps(state)[:2000]}")
            time.sleep(0.1)
        before, t0 = job(job_id), time.time()
        times = block()
        after, span = job(job_id), time.time() - t0
        client.post(f"/add/jobs/{job_id}/cancel", {})
        while job(job_id)["state"] not in ("cancelled", "done", "failed"):
            time.sleep(0.1)
        return times, {"it_s": before["it_s"], "steps": after["step"] - before["step"], "span": span}

    if keys is None:
        keys = ["polite/teacher", "alongside/teacher"] + ([] if a.quick else ["polite/images"])
    t: dict[str, list] = {"idle": [], **{k: [] for k in keys}}
    info: dict[str, list] = {k: [] for k in keys}
    prompt()  # warm-up: loads the checkpoint, CLIP and the TinyVAE
    for k in range(rounds):
        for key in keys:  # an idle block before each job block: drift of the machine hits both alike
            t["idle"] += block()
            times, inf = job_block(*key.split("/"), k)
            t[key] += times
            info[key].append(inf)
    return t, info


# ============================================================================================
def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU-seconds of the whole machine, CPU-seconds of this process and its finished children)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    return busy, own


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny model, fewer iterations, rounds and prompts")
    ap.add_argument("--realistic", action="store_true", help="part 1 with an SD1.5-shaped UNet of real width and depth "
                    "(CPU: 512x512 batch 1 unless --size/--batch say otherwise)")
    ap.add_argument("--only", choices=("iteration", "latency"), help="run one part only")
    ap.add_argument("--skip-latency", action="store_true", help="same as --only iteration")
    ap.add_argument("--size", type=int, default=None, help="part 1 image side in pixels")
    ap.add_argument("--batch", type=int, default=None, help="part 1 batch size")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank, both sides (default %(default)s)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per case after the warm-up")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of all cases / latency blocks")
    ap.add_argument("--prompts", type=int, default=None, help="foreground prompts per latency block")
    ap.add_argument("--fg-size", type=int, default=512, help="foreground image side (default %(default)s)")
    # worker (one case in a fresh process)
    ap.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    ap.add_argument("--kind", default="tiny", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        a.case = a.worker
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return
    if a.skip_latency:
        a.only = "iteration"
    if a.device == "cuda":
        os.environ["COMFYUI_ADD_DEVICE"] = "cuda"
    print(f"# ADD training benchmark ({time.strftime('%Y-%m-%d %H:%M')}, device {a.device}, {os.cpu_count()} CPUs, "
          f"load average at start {os.getloadavg()[0]:.2f})", flush=True)
    t0, (busy0, own0) = time.time(), _cpu_seconds()
    if a.only in (None, "iteration"):
        part_iteration(a)
    if a.only in (None, "latency"):
        part_latency(a)
    wall = time.time() - t0
    busy1, own1 = _cpu_seconds()
    other = max(0.0, (busy1 - busy0) - (own1 - own0))
    share = other / (wall * (os.cpu_count() or 1))
    print(f"\n(total {wall:.0f} s; other processes used {other:.0f} CPU-s meanwhile, {100 * share:.0f} % of the machine"
          + ("; TIMINGS ARE NOT RELIABLE: run it on a quiet machine)" if share > 0.1 else ")"))


if __name__ == "__main__":
    main()

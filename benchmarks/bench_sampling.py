"""ADD KSampler overhead and speed against core sampling, measured side by side in one run.

Rows (ratios; lower is better):
* overhead   = ADD KSampler wall time / (steps x one bare diffusion-model forward at the same shape)
               -- what the sampling stack adds on top of the UNet (goal <= 1.05 at 512^2, realistic UNet).
* vs core    = ADD KSampler / core SamplerCustom + SDTurboScheduler + euler_ancestral at cfg 1, same steps
               (goal <= 1.0).
* evals      = diffusion-model rows evaluated per image: ADD KSampler / core KSampler at cfg 7
               (cfg > 1 runs cond + uncond: expected 0.5).
Timings alternate between the contenders (A B C A B C ...) and report medians, so a slow moment of
the machine hits all of them alike. Everything runs under torch.inference_mode, as ComfyUI nodes do.

Models: the tiny SD1.5 checkpoint from the fixture cache (narrow depth, real width), or with
--realistic an SD1.5 UNet of the real config (model_channels 320, channel_mult [1,2,4,4],
num_res_blocks 2, transformer depth 1, context 768; ComfyUI's own UNetModel, seeded random weights:
speed does not depend on the values), loaded through comfy.sd.load_diffusion_model_state_dict.

    .venv/bin/python -m benchmarks.bench_sampling [--device cpu|cuda] [--quick] [--size 512|64]
                                                  [--realistic] [--steps N] [--repeats N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

SD15_REAL = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def _parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="64^2, 2 steps, 2 repeats (a smoke run)")
    ap.add_argument("--size", type=int, choices=(512, 64), default=None, help="image side in pixels (latent = size / 8)")
    ap.add_argument("--realistic", action="store_true", help="SD1.5-width-and-depth UNet instead of the tiny one")
    ap.add_argument("--steps", type=int, default=None, help="ADD steps, 1-4 (default 4; 2 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per contender (default 5; 2 with --quick)")
    a = ap.parse_args(argv)
    a.size = a.size or (64 if a.quick else 512)
    a.steps = a.steps or (2 if a.quick else 4)
    a.repeats = a.repeats or (2 if a.quick else 5)
    return a


def _load_model(realistic: bool):
    import comfy.sd

    if realistic:
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
        import comfy.ops
        from scripts.tiny_models import init_module_

        with torch.inference_mode(False):
            unet = init_module_(UNetModel(**SD15_REAL, operations=comfy.ops.disable_weight_init), seed=0)
        sd = unet.state_dict()
        del unet
        return comfy.sd.load_diffusion_model_state_dict(sd)
    from scripts.tiny_models import build_all

    return comfy.sd.load_checkpoint_guess_config(str(build_all()["tiny_sd15"]))[0]


def measure(model, positive, negative, latent: dict, steps: int, repeats: int, cuda: bool) -> dict:
    """The three contenders timed in alternating rounds (after one warm-up each), medians in seconds,
    the ratios and the model rows per image. The bare forward replays the diffusion model's call with
    exactly the inputs ADD KSampler gave it (latent, timestep, context and, for SDXL, the ADM vector),
    so any UNet family works. Run under torch.inference_mode."""
    import comfy.model_management
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustom, SDTurboScheduler
    from scripts.comfy_host import import_comfy, plugin_module

    comfy_nodes = import_comfy()
    ns = plugin_module("nodes.sampling")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    unet = model.model.diffusion_model

    def add_ks():
        return ns.ADDKSampler.execute(model, positive, latent, 0, steps, "add_trailing", "", 1.0)

    seen = {}

    def grab(_module, args, kwargs):
        if not seen:
            seen.update(x=args[0].clone(), t=args[1].clone(), context=kwargs.get("context"), y=kwargs.get("y"))
    h = unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        add_ks()
    finally:
        h.remove()
    extra = {"y": seen["y"]} if seen["y"] is not None else {}

    def bare():
        comfy.model_management.load_models_gpu([model])
        unet(seen["x"], seen["t"], context=seen["context"], **extra)

    def core_sc():
        sig = SDTurboScheduler.execute(model, steps, 1.0)
        sig = (sig.result if hasattr(sig, "result") else sig)[0]
        SamplerCustom.execute(model, True, 0, 1.0, positive, negative, comfy.samplers.sampler_object("euler_ancestral"),
                              sig, latent)

    contenders = {"bare forward": bare, "ADD KSampler": add_ks, "core SamplerCustom": core_sc}
    times = {k: [] for k in contenders}
    for fn in contenders.values():  # warm-up (allocations, kernel selection)
        fn()
    sync()
    for _ in range(repeats):
        for name, fn in contenders.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)

    # model rows evaluated per image
    rows = {"add": [], "core": []}
    for key, run in (("add", add_ks),
                     ("core", lambda: comfy_nodes.common_ksampler(model, 0, steps, 7.0, "euler_ancestral", "simple",
                                                                  positive, negative, latent))):
        h = unet.register_forward_pre_hook(lambda m, args, k=key: rows[k].append(int(args[0].shape[0])))
        try:
            run()
        finally:
            h.remove()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": med, "overhead": med["ADD KSampler"] / (steps * med["bare forward"]),
            "vs_core": med["ADD KSampler"] / med["core SamplerCustom"], "evals": sum(rows["add"]) / sum(rows["core"]),
            "rows": rows}


def main(argv=None) -> None:
    a = _parse(argv)
    from scripts.comfy_host import import_comfy

    import_comfy(cpu=(a.device == "cpu"))
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False  # console tqdm off for every contender alike
    model = _load_model(a.realistic)
    lat_side = a.size // 8
    gen = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 77, 768, generator=gen) * 0.5, {}]]
    negative = [[torch.zeros(1, 77, 768), {}]]
    latent = {"samples": torch.zeros(1, 4, lat_side, lat_side)}
    cuda = a.device == "cuda" and torch.cuda.is_available()
    with torch.inference_mode():
        res = measure(model, positive, negative, latent, a.steps, a.repeats, cuda)
    med, overhead, vs_core, evals, rows = res["seconds"], res["overhead"], res["vs_core"], res["evals"], res["rows"]
    dev = model.load_device
    kind = "realistic SD1.5 UNet" if a.realistic else "tiny SD1.5 UNet"
    print(f"\nADD sampling benchmark: {kind}, {a.size}x{a.size} (latent {lat_side}x{lat_side}), batch 1, "
          f"{a.steps} steps, device {dev}, {a.repeats} repeats, medians")
    print(f"  bare forward {med['bare forward'] * 1e3:.1f} ms | ADD KSampler {med['ADD KSampler'] * 1e3:.1f} ms | "
          f"core SamplerCustom+SDTurbo+euler_a cfg1 {med['core SamplerCustom'] * 1e3:.1f} ms")
    print(f"| {'ratio':<58} | {'value':>7} | {'goal':>7} |")
    print(f"|{'-' * 60}|{'-' * 9}|{'-' * 9}|")
    print(f"| {'overhead: ADD KSampler / (steps x bare forward)':<58} | {overhead:7.3f} | {'<= 1.05':>7} |")
    print(f"| {'vs core: ADD KSampler / SamplerCustom+SDTurbo+euler_a cfg1':<58} | {vs_core:7.3f} | {'<= 1.0':>7} |")
    print(f"| {'evals per image: ADD / core KSampler cfg 7':<58} | {evals:7.3f} | {'0.5':>7} |")
    print(f"  (model rows: ADD {rows['add']}, core KSampler cfg 7 {rows['core']})")


if __name__ == "__main__":
    main()

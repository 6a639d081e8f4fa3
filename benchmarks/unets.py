"""UNets of the SD1.5, SD2 (v-prediction) and SDXL shapes with seeded random weights, as ComfyUI ModelPatchers.

Speed and memory do not depend on the weights' values, so the benchmarks build these instead of
downloading checkpoints: ComfyUI's own model classes (``comfy.supported_models``) with the real
configs (SD1.5 860 M, SD2 865 M, SDXL 2.6 G parameters), or with ``tiny=True`` the same families at
test size (the dry runs). The module is created on the CPU like a freshly loaded checkpoint (ComfyUI
moves it to the GPU when it samples); the random values may be drawn on a GPU (``init_device``):
a CPU core draws ~40 M values a second, so SDXL alone would take a minute there.

    from benchmarks import unets
    model = unets.build("sdxl")                      # dtype as ComfyUI would pick it for that file
    model = unets.build("sd15", dtype=torch.bfloat16, init_device="cuda")
"""
from __future__ import annotations

import torch

from benchmarks.bench_lora import SD15_REAL_CONFIG
from scripts.tiny_models import init_module_

SDXL_REAL_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "num_heads": -1, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
# SD2.x (768-v): SD1.5's layout with OpenCLIP-H's 1024-wide context, 64-channel heads, linear projections.
SD2_REAL_CONFIG = dict(SD15_REAL_CONFIG, context_dim=1024, use_linear_in_transformer=True, num_heads=-1,
                       num_head_channels=64)

# the same families at test size (one level, narrow): what the dry runs build
_TINY_SD15 = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 64, "num_res_blocks": [1], "transformer_depth": [1],
    "channel_mult": [1], "transformer_depth_middle": 1, "transformer_depth_output": [1, 1],
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 4, "num_head_channels": -1,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
_TINY_SDXL = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 64,
    "num_res_blocks": [1, 1], "transformer_depth": [0, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 1, 1], "use_linear_in_transformer": True, "context_dim": 2048,
    "num_head_channels": 64, "num_heads": -1, "use_temporal_resblock": False, "use_temporal_attention": False,
}
_TINY_SD2 = dict(_TINY_SD15, context_dim=1024, use_linear_in_transformer=True, num_heads=-1, num_head_channels=32)

# family -> (real config, tiny config, comfy.supported_models class name, v-prediction, label, native side px)
FAMILIES = {
    "sd15": (SD15_REAL_CONFIG, _TINY_SD15, "SD15", False, "SD1.5-shaped UNet (860 M)", 512),
    "sd2v": (SD2_REAL_CONFIG, _TINY_SD2, "SD20", True, "SD2-v-shaped UNet (865 M, v-prediction)", 768),
    "sdxl": (SDXL_REAL_CONFIG, _TINY_SDXL, "SDXL", False, "SDXL-shaped UNet (2.6 G)", 1024),
}


def label(family: str, tiny: bool = False) -> str:
    """'SD1.5-shaped UNet (860 M)' etc.; tiny models say so."""
    text = FAMILIES[family][4]
    return f"tiny {family} UNet (test size)" if tiny else text


def build(family: str, dtype: torch.dtype | None = None, seed: int = 0, tiny: bool = False,
          init_device: str | torch.device | None = None):
    """A ModelPatcher of ``family`` ('sd15', 'sd2v', 'sdxl') with seeded random weights.

    ``dtype`` None: what ComfyUI picks for such a file on this device (``unet_dtype`` of the family's
    supported dtypes, with manual casting where needed). The module sits on the CPU (ComfyUI's offload
    device), as after loading a checkpoint. ``init_device``: where the random values are drawn
    (default: the GPU when ComfyUI runs on one, else the CPU)."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    real, small, cls_name, vpred, _label, _side = FAMILIES[family]
    mc = getattr(comfy.supported_models, cls_name)(dict(small if tiny else real))
    load_device = mm.get_torch_device()
    if dtype is None:
        dtype = mm.unet_dtype(supported_dtypes=mc.supported_inference_dtypes)
    mc.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, mc.supported_inference_dtypes))
    with torch.inference_mode(False):
        if vpred:
            model = comfy.model_base.BaseModel(mc, model_type=comfy.model_base.ModelType.V_PREDICTION)
        else:
            model = mc.get_model({})
        if init_device is None:
            init_device = load_device if torch.device(load_device).type == "cuda" else "cpu"
        init_module_(model.diffusion_model, seed, device=init_device)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())
    # How to build this model again: ComfyUI >= 0.33 reloads a model through it where it needs a private
    # copy (core TrainLoraNode's clone(force_deepcopy=True)); its loaders set it, in-memory models must too.
    patcher.cached_patcher_init = (_rebuild, (family, dtype, seed, tiny, init_device))
    return patcher


def _rebuild(family, dtype, seed, tiny, init_device, disable_dynamic=False):
    """``build`` again with the same arguments (the factory ComfyUI calls; this patcher is never dynamic)."""
    return build(family, dtype=dtype, seed=seed, tiny=tiny, init_device=init_device)



def write_checkpoint(family: str, path, dtype: torch.dtype = torch.float16, seed: int = 0):
    """A single-file checkpoint ComfyUI's loader detects as ``family`` (SD1.5 only for now): the real-size
    UNet with seeded random weights, plus the tiny-model cache's complete CLIP-L and TAESD (the files the
    headless trainer needs besides the UNet). Returns the path."""
    from pathlib import Path

    from safetensors.torch import load_file

    from scripts.tiny_models import _atomic_save, build_all

    if family != "sd15":
        raise ValueError(f"write_checkpoint builds SD1.5-shaped files only, not {family!r}")
    patcher = build(family, dtype=dtype, seed=seed)
    sd = {k: v for k, v in load_file(str(build_all()["tiny_sd15"])).items() if not k.startswith("model.diffusion_model.")}
    sd.update({"model.diffusion_model." + k: v.to(dtype) for k, v in patcher.model.diffusion_model.state_dict().items()})
    _atomic_save(sd, Path(path), {"modelspec.title": f"{family}-shaped UNet with random weights (benchmarks)"})
    return Path(path)

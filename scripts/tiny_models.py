"""Tiny models with the real key layouts and shapes, for tests, benchmarks and the demo.

Everything here is built from seeded random weights (no download, ever), deterministically, and
cached on disk so later runs only read files. The layouts are the ones users' files have:

* ``tiny_sd15.safetensors``: an SD1.5-architecture checkpoint that ComfyUI's
  ``CheckpointLoaderSimple`` detects as SD1.5 -- a narrow-depth UNet with the real width
  (model_channels 320, context_dim 768: detection reads both), the complete 12-layer CLIP-L text
  encoder detection requires (stored fp16), and a TAESD as its VAE (``first_stage_model.taesd_*``).
* ``taesd_encoder/decoder.safetensors`` (madebyollin's layout, ``0.weight`` ...), the same weights
  in diffusers' ``AutoencoderTiny`` layout (``encoder.layers.N...``), and 16-channel
  ``taesd3``-shaped ones.
* LoRA files for the tiny SD1.5 UNet in kohya (LDM names), kohya-with-diffusers-names
  (the layout of the public LCM-LoRA for SD1.5, rank 64), ComfyUI-native ``diffusion_model.`` and
  PEFT/diffusers ``unet....lora_A/lora_B`` formats.
* In memory only (detection pins real depths, or the format has no single-file marker): a tiny SDXL
  model and a tiny v-prediction SD2-style model, as ComfyUI ModelPatchers.
* Distilled UNet layouts ComfyUI loads (:func:`without_middle_block`, :func:`distilled_model_patcher`):
  BK-SDM / Segmind small-tiny SD (no middle block), SSD-1B and Vega (other transformer depths per
  level), KOALA (one ResBlock per level, no middle block); built from state dicts whose layout
  ComfyUI's own ``detect_unet_config`` reads.

Import ComfyUI first (``scripts.comfy_host.import_comfy``): the UNet and TAESD modules are
ComfyUI's own classes, so key names are exactly what its loaders expect.

CLI: ``python -m scripts.tiny_models [--out DIR]`` builds the cache and prints the file paths.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# Bump when any builder below changes what it writes: caches of an older version are rebuilt.
BUILD_VERSION = 3
CACHE = ROOT / ".cache" / "tiny_models" / f"v{BUILD_VERSION}"

SD15_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1],
    "transformer_depth": [1],
    "channel_mult": [1],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1],
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    "num_head_channels": -1,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}


# --------------------------------------------------------------------------------------------
# deterministic initialisation
# --------------------------------------------------------------------------------------------
def init_module_(module: torch.nn.Module, seed: int, gain: float = 1.0,
                 device: str | torch.device | None = None) -> torch.nn.Module:
    """Seeded init of every parameter, in place (ComfyUI's ops leave weights uninitialised).

    Norm weights 1 and biases 0 (so activations keep a sane scale); other weights
    N(0, gain / sqrt(fan_in)); other biases small. Only a local generator is used, on ``device``
    (default the CPU; a GPU draws the values of a real-size UNet much faster), and the values are
    copied in parameter by parameter (peak extra memory: one parameter).
    """
    dev = torch.device(device if device is not None else "cpu")
    g = torch.Generator(device=dev).manual_seed(seed)
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    with torch.no_grad():
        for mod in module.modules():
            for name, p in mod.named_parameters(recurse=False):
                if isinstance(mod, norm_types):
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif p.ndim >= 2:
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=g, device=dev) * (gain / fan_in**0.5))
                else:
                    p.copy_(torch.randn(p.shape, generator=g, device=dev) * 0.02)
    return module


def _atomic_save(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """The plugin's atomic writer: a temporary name of this process's own, so parallel test workers
    building the cache at once never write into each other's file."""
    from scripts.plugin_package import load

    load()
    from comfyui_add.core.files import atomic_write_safetensors

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_safetensors({k: v.contiguous() for k, v in tensors.items()}, path, metadata)


# --------------------------------------------------------------------------------------------
# builders (ComfyUI must be importable)
# --------------------------------------------------------------------------------------------
def build_sd15_unet(seed: int = 0) -> torch.nn.Module:
    """The tiny SD1.5 UNet as ComfyUI's own ``UNetModel`` (LDM key names)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.ops

    unet = UNetModel(**SD15_UNET_CONFIG, operations=comfy.ops.disable_weight_init)
    return init_module_(unet, seed)


def build_clip_l(seed: int = 1) -> dict[str, torch.Tensor]:
    """A complete CLIP-L text encoder state dict (``text_model.*``), 123.6 M params."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=768,
    )
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    model = model.to_empty(device="cpu")
    init_module_(model, seed, gain=0.5)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    # transformers 5 dropped the ``text_model.`` level from CLIPTextModel; checkpoints keep it.
    sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}
    with torch.no_grad():
        sd["text_model.embeddings.token_embedding.weight"].mul_(0.05 * 768**0.5)
        sd["text_model.embeddings.position_embedding.weight"].mul_(0.02 * 768**0.5)
    return sd


def build_taesd(latent_channels: int = 4, seed: int = 2) -> tuple[dict, dict]:
    """TAESD encoder and decoder state dicts in madebyollin's layout (``0.weight`` ...)."""
    from comfy.taesd.taesd import Decoder, Encoder

    enc = init_module_(Encoder(latent_channels=latent_channels), seed)
    dec = init_module_(Decoder(latent_channels=latent_channels), seed + 1)
    return enc.state_dict(), dec.state_dict()


def taesd_to_diffusers_layout(enc_sd: dict, dec_sd: dict, latent_channels: int = 4) -> dict:
    """The same weights in diffusers' ``AutoencoderTiny`` layout (``encoder.layers.N...``).

    Independent of any key-renaming rule: both implementations register their parameters in
    the same order with the same shapes, so the tensors are matched by position (and the shapes
    checked), which is what makes this a fair fixture for a converter under test.
    """
    from diffusers import AutoencoderTiny

    ref = AutoencoderTiny(latent_channels=latent_channels).state_dict()
    out = {}
    for prefix, src in (("encoder.", enc_sd), ("decoder.", dec_sd)):
        dst_keys = [k for k in ref if k.startswith(prefix)]
        src_items = list(src.items())
        if len(dst_keys) != len(src_items):
            raise RuntimeError(f"{prefix}: {len(dst_keys)} diffusers tensors vs {len(src_items)} TAESD tensors")
        for dk, (sk, v) in zip(dst_keys, src_items):
            if ref[dk].shape != v.shape:
                raise RuntimeError(f"layout mismatch: {dk} {tuple(ref[dk].shape)} vs {sk} {tuple(v.shape)}")
            out[dk] = v.clone()
    return out


def lora_targets(unet_sd_keys, include_conv: bool = True) -> list[str]:
    """LDM module names (no ``.weight``) that LoRAs for SD UNets touch: attention, FF, proj,
    and (LCM-LoRA style) the resnet convs and time-embedding projections."""
    out = []
    for k in unet_sd_keys:
        if not k.endswith(".weight"):
            continue
        m = k[: -len(".weight")]
        leaf = m.split(".")
        if any(s in m for s in (".attn1.to_", ".attn2.to_", ".ff.net.")) or leaf[-1] in ("proj_in", "proj_out"):
            out.append(m)
        elif include_conv and (m.endswith("in_layers.2") or m.endswith("out_layers.3") or m.endswith("emb_layers.1")):
            out.append(m)
    return out


def make_lora_factors(shapes: dict[str, tuple], rank: int, seed: int, scale: float = 0.5) -> dict:
    """{module: (down, up, alpha)} with non-zero up (a real trained LoRA is not zero)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, shape in shapes.items():
        out_f, in_f = shape[0], shape[1]
        kernel = tuple(shape[2:])
        down = torch.randn((rank, in_f) + kernel, generator=g) / (in_f * max(1, int(torch.tensor(kernel).prod()) if kernel else 1)) ** 0.5
        up = torch.randn((out_f, rank) + tuple(1 for _ in kernel), generator=g) * (scale / rank**0.5)
        out[m] = (down, up, float(rank))
    return out


def sd15_ldm_to_diffusers_names() -> dict[str, str]:
    """{ldm module name: diffusers module name} for the tiny SD1.5 UNet (ComfyUI's map)."""
    import comfy.utils

    m = comfy.utils.unet_to_diffusers(SD15_UNET_CONFIG)
    return {v[: -len(".weight")]: k[: -len(".weight")] for k, v in m.items() if k.endswith(".weight")}


def write_sd15_loras(unet: torch.nn.Module, out_dir: Path) -> dict[str, Path]:
    """The same LoRA deltas written in the four key formats users' files come in."""
    sd = unet.state_dict()
    shapes = {m: tuple(sd[m + ".weight"].shape) for m in lora_targets(sd.keys())}
    factors = make_lora_factors(shapes, rank=8, seed=11)
    to_diff = sd15_ldm_to_diffusers_names()
    paths = {}

    def _write(name, keyfn, down_s, up_s, with_alpha=True, metadata=None, fac=factors):
        t = {}
        for m, (down, up, alpha) in fac.items():
            base = keyfn(m)
            if base is None:
                continue
            t[f"{base}{down_s}"] = down.to(torch.float16)
            t[f"{base}{up_s}"] = up.to(torch.float16)
            if with_alpha:
                t[f"{base}.alpha"] = torch.tensor(alpha)
        p = out_dir / "loras" / name
        _atomic_save(t, p, metadata)
        paths[name] = p

    _write("tiny_sd15_kohya.safetensors", lambda m: "lora_unet_" + m.replace(".", "_"), ".lora_down.weight", ".lora_up.weight",
           metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"})
    _write("tiny_sd15_comfy.safetensors", lambda m: "diffusion_model." + m, ".lora_down.weight", ".lora_up.weight")
    _write("tiny_sd15_peft.safetensors", lambda m: ("unet." + to_diff[m]) if m in to_diff else None, ".lora_A.weight", ".lora_B.weight",
           with_alpha=False)
    # Shaped like the public LCM-LoRA for SD1.5: kohya prefix with diffusers names, rank 64,
    # convs included, alpha stored.
    lcm = make_lora_factors(shapes, rank=64, seed=12, scale=0.3)
    _write("tiny_lcm_lora_sd15.safetensors", lambda m: ("lora_unet_" + to_diff[m].replace(".", "_")) if m in to_diff else None,
           ".lora_down.weight", ".lora_up.weight", fac=lcm)
    return paths


def build_all(out: Path = CACHE) -> dict[str, Path]:
    """Build (or reuse) every on-disk tiny model; returns {name: path}."""
    out = Path(out)
    manifest = out / "manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        paths = {k: out / v for k, v in data.items()}
        if all(p.is_file() for p in paths.values()):
            return paths

    from scripts.comfy_host import import_comfy

    import_comfy(load_plugin=False)  # the builders use ComfyUI's own module classes
    paths: dict[str, Path] = {}
    unet = build_sd15_unet()
    enc, dec = build_taesd(4)
    ckpt = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    ckpt.update({"cond_stage_model.transformer." + k: v.to(torch.float16) for k, v in build_clip_l().items()})
    ckpt.update({"first_stage_model.taesd_encoder." + k: v for k, v in enc.items()})
    ckpt.update({"first_stage_model.taesd_decoder." + k: v for k, v in dec.items()})
    ckpt["first_stage_model.vae_scale"] = torch.tensor(0.18215)
    ckpt["first_stage_model.vae_shift"] = torch.tensor(0.0)
    p = out / "checkpoints" / "tiny_sd15.safetensors"
    _atomic_save(ckpt, p, {"modelspec.title": "tiny SD1.5 (random weights, for tests)"})
    paths["tiny_sd15"] = p

    for name, lc in (("taesd", 4), ("taesd3", 16)):
        e, d = (enc, dec) if lc == 4 else build_taesd(lc, seed=5)
        for part, sd in (("encoder", e), ("decoder", d)):
            pp = out / "vae_approx" / f"{name}_{part}.safetensors"
            _atomic_save(sd, pp)
            paths[f"{name}_{part}"] = pp
        pp = out / "vae_approx" / "diffusers" / f"{name}_autoencoder_tiny.safetensors"
        _atomic_save(taesd_to_diffusers_layout(e, d, lc), pp)
        paths[f"{name}_diffusers"] = pp

    for name, pp in write_sd15_loras(unet, out).items():
        paths[name.removesuffix(".safetensors")] = pp

    manifest.write_text(json.dumps({k: str(v.relative_to(out)) for k, v in paths.items()}, indent=1))
    return paths


# --------------------------------------------------------------------------------------------
# in-memory models (ModelPatchers)
# --------------------------------------------------------------------------------------------
def sdxl_model_patcher(seed: int = 3, model_channels: int = 64):
    """A tiny SDXL (ADM-conditioned, context 2048, 2816-wide ``y``) as a ModelPatcher."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    cfg = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": model_channels, "num_res_blocks": [1, 1], "transformer_depth": [0, 1],
        "channel_mult": [1, 2], "transformer_depth_middle": 1, "transformer_depth_output": [0, 0, 1, 1],
        "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
        "num_heads": -1, "use_temporal_resblock": False, "use_temporal_attention": False,
    }
    model_config = comfy.supported_models.SDXL(cfg)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    init_module_(model.diffusion_model, seed)
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=comfy.model_management.unet_offload_device())


def sd2_vpred_model_patcher(seed: int = 4):
    """A tiny SD2-style (context 1024, linear proj) v-prediction model as a ModelPatcher."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    cfg = dict(SD15_UNET_CONFIG, context_dim=1024, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64)
    model_config = comfy.supported_models.SD20(cfg)
    model_config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(model_config, model_type=comfy.model_base.ModelType.V_PREDICTION)
    init_module_(model.diffusion_model, seed)
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=comfy.model_management.unet_offload_device())


# --------------------------------------------------------------------------------------------
# distilled UNet layouts (BK-SDM, SSD-1B, Vega, KOALA)
# --------------------------------------------------------------------------------------------
UNET_PREFIX = "model.diffusion_model."


def without_middle_block(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """A copy of checkpoint ``src`` without the UNet's middle block: the BK-SDM / Segmind small-tiny
    SD layout, which ComfyUI's detection loads as a UNet whose ``middle_block`` is None."""
    from safetensors.torch import load_file

    sd = {k: v for k, v in load_file(str(src)).items() if not k.startswith(UNET_PREFIX + "middle_block.")}
    dst = Path(dst)
    _atomic_save(sd, dst, {"modelspec.title": "tiny BK-SDM-like SD1.5 without a middle block (random weights)"})
    return dst


# name -> SDXL-family UNet config of a distilled layout at tiny width (the real per-level depths)
_SDXL_BASE = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 32, "num_heads": -1, "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
DISTILLED_LAYOUTS = {
    # SSD-1B: SDXL's levels with transformer depths 0/2/4 (SDXL: 0/2/10), uneven output depths
    "ssd1b": dict(num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 4, 4],
                  transformer_depth_middle=1, transformer_depth_output=[0, 0, 0, 1, 1, 2, 2, 4, 4]),
    # Segmind Vega: depths 0/1/2; here with a middle block of ResBlocks only (no attention)
    "vega": dict(num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 1, 1, 2, 2],
                 transformer_depth_middle=-1, transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2]),
    # KOALA: one ResBlock per level, depths 0/2/5, no middle block
    "koala": dict(num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 4], transformer_depth=[0, 2, 5],
                  transformer_depth_middle=-2, transformer_depth_output=[0, 0, 2, 2, 5, 5]),
}


def distilled_model_patcher(layout: str, seed: int = 6, model_channels: int = 32):
    """A tiny SDXL-family model of a distilled layout as a ModelPatcher.

    The UNet is built, its state dict is read back by ComfyUI's ``detect_unet_config`` (the layout
    must be recognised from the keys alone), and the model class ComfyUI uses for that family
    (SSD1B, Segmind_Vega, KOALA_700M; only their real widths differ) is built from the detected
    config and loads the weights strictly."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops
    import comfy.supported_models

    cfg = {**_SDXL_BASE, **DISTILLED_LAYOUTS[layout], "model_channels": model_channels}
    unet = init_module_(UNetModel(**cfg, operations=comfy.ops.disable_weight_init), seed)
    sd = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    detected = comfy.model_detection.detect_unet_config(sd, UNET_PREFIX)
    for key in ("num_res_blocks", "transformer_depth", "transformer_depth_output", "transformer_depth_middle",
                "channel_mult"):
        if detected[key] != cfg[key]:
            raise RuntimeError(f"{layout}: ComfyUI detects {key}={detected[key]}, built {cfg[key]}")
    cls = {"ssd1b": comfy.supported_models.SSD1B, "vega": comfy.supported_models.Segmind_Vega,
           "koala": comfy.supported_models.KOALA_700M}[layout]
    model_config = cls(detected)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    model.diffusion_model.load_state_dict(unet.state_dict(), strict=True)
    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=comfy.model_management.unet_offload_device())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(CACHE), help="cache folder (default: %(default)s)")
    a = ap.parse_args(argv)
    from scripts.comfy_host import import_comfy

    import_comfy(load_plugin=False)
    for k, v in build_all(Path(a.out)).items():
        print(f"{k}\t{v}")


if __name__ == "__main__":
    main()

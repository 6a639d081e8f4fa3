"""ComfyUI models -> the pure-torch training core (``training/``).

The one place that knows how a ComfyUI diffusion model is driven for training; the training node,
the headless trainer and the digits proof all build their runs through it:

- :func:`check_trainable` — which model families a run can train (UNet families: SD1.x, SD2.x
  eps/v, SDXL), with an error naming the family otherwise;
- :func:`frozen_copy` — the job's own copy of the base weights (any patches the input MODEL carries
  fused in), made outside inference mode so autograd may save them; foreground prompts patch
  ComfyUI's shared module in place and its weights are inference tensors, so training never
  touches it;
- :func:`trainable_copy` — the fp32 student of a full fine-tune (``training_mode='full'``);
- :func:`comfy_denoise` — ``(network, x_ve, sigma, cond) -> x0`` through the model's own
  ``apply_model`` (its ``model_sampling`` handles eps / v-prediction and the sigma conventions);
- :func:`feature_modules`, :func:`lora_targets`, :func:`checkpoint_modules` — module names of a
  ComfyUI ``UNetModel`` for the discriminator features (LADD: encoder levels + middle block), the
  LoRA (attention, feed-forward, ResBlock convolutions: the LCM-LoRA set), and gradient
  checkpointing (every UNet block);
- :class:`PromptBank` — prompts encoded once by CLIP on the prompt thread (context, pooled, SDXL's
  ``y``), gathered per batch on the training thread without touching CLIP again.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

import comfy.model_management as mm

from ..core.errors import ADDError
from ..training.inputs import estimate_memory as estimate_run_memory
from . import comfy_internals as internals
from . import patched_weights

# Families a run can train: BaseModel subclasses whose diffusion model is ComfyUI's UNetModel
# and whose conditioning we can build (cross-attention context, plus SDXL's ADM vector).
_TRAINABLE = {"BaseModel": "SD1.x / SD2.x", "SDXL": "SDXL"}


def check_trainable(model) -> str:
    """The family name of a ModelPatcher's model, or ValueError naming what it is and what works."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    base = model.model
    kind = type(base).__name__
    config = type(getattr(base, "model_config", None)).__name__
    if kind not in _TRAINABLE or not isinstance(getattr(base, "diffusion_model", None), UNetModel):
        raise ADDError(
            f"ADD training cannot train this model: it is a {kind} ({config}); supported are UNet models of the "
            f"families {', '.join(_TRAINABLE.values())} (e.g. SD 1.5, SD 2.1, SDXL and their fine-tunes). "
            "Load one of those with Load Checkpoint.")
    _check_plain_weights(base.diffusion_model, config)
    return _TRAINABLE[kind]


def _check_plain_weights(unet, config: str) -> None:
    """Quantized / scaled-fp8 weights cannot be trained here: their ops hold scales or packed tensors
    a plain torch layer cannot use (training would read wrong weights)."""
    for name, m in unet.named_modules():
        if internals.is_quantized_layer(m):
            raise ADDError(
                f"ADD training cannot train quantized weights ({config}: layer {name} is stored as {type(m).__name__}, "
                "fp8/scaled or packed). Load an fp16/bf16/fp32 version of the checkpoint (Load Checkpoint with a "
                "regular .safetensors, or Load Diffusion Model with weight_dtype 'default').")


# Every ComfyUI op of a PRIVATE copy as its torch base class (see comfy_internals.plain_torch_modules_:
# ComfyUI's ops clear the global interrupt flag in every forward).
plain_torch_modules_ = internals.plain_torch_modules_


def frozen_copy(model, device: torch.device) -> torch.nn.Module:
    """The job's own frozen BaseModel: base weights with the MODEL's patches fused, on ``device``.

    Built on the prompt thread (ComfyUI's weights must not change while they are read) outside
    inference mode, so every tensor of the copy is an ordinary tensor autograd can save.
    """
    with torch.inference_mode(False):
        copy = patched_weights.fused_module(model)
        # Plain torch modules (see plain_torch_modules_), weights in the dtype the model computes in
        # (ComfyUI's ops would have cast them on the fly).
        compute = internals.compute_dtype(copy)
        plain_torch_modules_(copy)
        for m in copy.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_floating_point() and p.dtype != compute:
                    m._parameters[name] = torch.nn.Parameter(p.detach().to(compute), requires_grad=False)
        copy = copy.to(device)
        copy.requires_grad_(False).eval()
        if hasattr(copy, "device"):
            copy.device = device
    return copy


def trainable_copy(network: torch.nn.Module) -> torch.nn.Module:
    """``training_mode='full'``: the student's own copy of the job's frozen network, fp32 master weights.

    The frozen network holds the weights in the dtype the model computes in (fp16/bf16 on most
    GPUs); AdamW updates of ~lr = 1e-6 vanish when added to half-precision weights, so the trained
    copy is fp32 and runs in fp32 (``apply_model`` casts its inputs to the dtype the BaseModel
    reports: the diffusion model's ``dtype`` and ``manual_cast_dtype``, set here). Memory: see
    :func:`estimate_memory`.
    """
    import copy as copy_mod

    with torch.inference_mode(False):
        cfg = getattr(network, "model_config", None)  # shared, not copied: 0.33's __getattr__ breaks deepcopy
        student = copy_mod.deepcopy(network, {id(cfg): cfg} if cfg is not None else None)
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in student.parameters()):
            student.float()
            internals.set_compute_dtype_(student, torch.float32)
    return student


def comfy_denoise(network, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
    """x0 = network.apply_model(x, sigma, ...) for VE-form x (B, C, h, w), sigma (B,).

    ``cond``: {'context': (B or 1, L, D), 'y': (B or 1, adm) or None}; a batch of 1 is broadcast.
    The UNet runs in the dtype ComfyUI loaded the model in (bf16/fp16 on GPUs, fp32 on CPU);
    ``apply_model`` returns x0 in fp32, and adapters, heads and losses stay fp32.
    """
    b = x.shape[0]
    ctx = cond["context"].to(x.device)
    if ctx.shape[0] != b:
        ctx = ctx.expand(b, *ctx.shape[1:])
    kwargs = {}
    y = cond.get("y")
    if y is not None:
        y = y.to(x.device)
        kwargs["y"] = y.expand(b, *y.shape[1:]) if y.shape[0] != b else y
    # A fresh transformer_options per call: 0.3.75's default is one shared dict the UNet writes to.
    return network.apply_model(x, sigma, c_crossattn=ctx, transformer_options={}, **kwargs)


def _unet(network):
    return network.diffusion_model


def _layers(block) -> list:
    """The layers of a UNet block; none for a block the model does not have (``middle_block`` is
    None in BK-SDM / Segmind small-tiny SD and KOALA, which ComfyUI loads and samples)."""
    return list(block) if block is not None else []


def feature_modules(network, which: str = "encoder") -> list[str]:
    """LADD discriminator features as names under ``network``: ``which`` = 'encoder' (the output of
    the last input block of every resolution level and of the middle block: the teacher's encoder),
    'input+encoder' (also the input convolution, whose output is a linear map of the latent, so the
    heads can see pixel-level noise), 'all' (input + encoder + middle + the last output block of
    every decoder level).

    ComfyUI's UNet runs a block by iterating its layers (``forward_timestep_embed``), never by
    calling the block, so the hooks go on each block's LAST layer. A UNet without a middle block
    (BK-SDM-style) simply has no middle feature."""
    unet = _unet(network)
    blocks = [_layers(b) for b in unet.input_blocks]
    names = [f"diffusion_model.input_blocks.0.{len(blocks[0]) - 1}"] if which in ("input+encoder", "all") else []
    for i in range(1, len(blocks)):
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        ends_level = nxt is None or any(type(m).__name__ == "Downsample" for m in nxt)
        if ends_level and not any(type(m).__name__ == "Downsample" for m in blocks[i]):
            names.append(f"diffusion_model.input_blocks.{i}.{len(blocks[i]) - 1}")
    middle = _layers(getattr(unet, "middle_block", None))
    if middle:
        names.append(f"diffusion_model.middle_block.{len(middle) - 1}")
    if which == "all":
        out = [_layers(b) for b in unet.output_blocks]
        for i, block in enumerate(out):
            # a decoder level ends at a block that upsamples, or at the last block
            if i == len(out) - 1 or any(type(m).__name__ == "Upsample" for m in block):
                last = next((j for j in range(len(block) - 1, -1, -1) if type(block[j]).__name__ != "Upsample"), 0)
                names.append(f"diffusion_model.output_blocks.{i}.{last}")
    if not names:
        raise ADDError(
            f"ADD training cannot use discriminator 'teacher' on this UNet: it has {len(blocks)} input block(s) and no "
            "middle block, so there is no encoder feature to judge real from generated images. Use discriminator "
            "'dinov2' (with the VAE and dinov2_file), or another checkpoint.")
    return names


# LCM-LoRA's set: attention projections, feed-forward, transformer in/out, ResBlock convolutions,
# time-embedding projections, skips, down/up-sampling convolutions.
LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection", "op", "conv",
)


def lora_targets(network) -> list[str]:
    """Name suffixes of the layers that get adapters (all that exist in this UNet)."""
    return list(LORA_TARGETS)


def checkpoint_modules(network) -> list[str]:
    """Every ResBlock / SpatialTransformer / resampler of the UNet (the layers ComfyUI calls one by
    one): the units recomputed in backward with gradient checkpointing."""
    unet = _unet(network)
    names = []
    for group in ("input_blocks", "output_blocks"):
        for i, block in enumerate(getattr(unet, group)):
            names += [f"diffusion_model.{group}.{i}.{j}" for j in range(len(_layers(block)))]
    names += [f"diffusion_model.middle_block.{j}" for j in range(len(_layers(getattr(unet, "middle_block", None))))]
    return names


def latent_channels(model) -> int:
    return int(model.get_model_object("latent_format").latent_channels)


def schedule_sigmas(model) -> torch.Tensor:
    """The model's discrete sigma table (T,), float64, t = 0 least noisy."""
    return model.get_model_object("model_sampling").sigmas.detach().double().cpu()


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------
def _repeat_to(ctx: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat a (1, L, D) context along L to ``length`` (a multiple of L), like ComfyUI's
    cross-attention batching of prompts of different lengths."""
    return ctx.repeat(1, length // ctx.shape[1], 1)


class PromptBank:
    """Prompts encoded once: context (N, L, D), pooled (N, P) or None, y (N, adm) or None, and the
    empty prompt's conditioning (for CFG). All ordinary (non-inference) CPU tensors."""

    def __init__(self, clip, prompts: Sequence[str], network, width: int, height: int) -> None:
        if clip is None:
            raise ADDError("ADD training needs the CLIP of the checkpoint to encode the prompts: connect "
                             "Load Checkpoint's CLIP output to the 'clip' input.")
        self.prompts = list(prompts)
        enc = [self._encode(clip, p, network, width, height) for p in self.prompts + [""]]
        length = math.lcm(*[c.shape[1] for c, _, _ in enc])
        with torch.inference_mode(False):
            ctx = torch.cat([_repeat_to(c, length) for c, _, _ in enc]).clone()
            pooled = torch.cat([p for _, p, _ in enc]).clone() if all(p is not None for _, p, _ in enc) else None
            ys = torch.cat([y for _, _, y in enc]).clone() if all(y is not None for _, _, y in enc) else None
        n = len(self.prompts)
        self.context, self.pooled, self.y = ctx[:n], (pooled[:n] if pooled is not None else None), \
            (ys[:n] if ys is not None else None)
        self.uncond = {"context": ctx[n:], "y": ys[n:] if ys is not None else None}
        self.index = {p: i for i, p in enumerate(self.prompts)}

    @staticmethod
    def _encode(clip, prompt: str, network, width: int, height: int):
        tokens = clip.tokenize(prompt)
        out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        ctx = out["cond"].detach().float().cpu()
        pooled = out.get("pooled_output")
        pooled = pooled.detach().float().cpu() if pooled is not None else None
        y = None
        if getattr(network, "adm_channels", 0):
            if pooled is None:
                raise ADDError("This model needs a pooled text embedding (SDXL): use the checkpoint's own CLIP.")
            y = network.encode_adm(pooled_output=pooled, width=width, height=height, crop_w=0, crop_h=0,
                                   target_width=width, target_height=height, prompt_type="positive")
            y = y.detach().float().cpu()
        return ctx, pooled, y

    @property
    def c_dim(self) -> int:
        return int(self.pooled.shape[1]) if self.pooled is not None else 0

    def rows(self, idx: Sequence[int], device) -> tuple[dict, torch.Tensor | None]:
        """(cond dict, pooled) of prompts ``idx`` on ``device``."""
        i = torch.as_tensor(list(idx), dtype=torch.long)
        cond = {"context": self.context[i].to(device), "y": self.y[i].to(device) if self.y is not None else None}
        return cond, (self.pooled[i].to(device) if self.pooled is not None else None)

    def encode(self, prompts: Sequence[str], device) -> tuple[dict, torch.Tensor | None]:
        return self.rows([self.index[p] for p in prompts], device)

    def uncond_on(self, device) -> dict:
        return {k: (v.to(device) if v is not None else None) for k, v in self.uncond.items()}


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------
def estimate_memory(network, batch_size: int, latent_hw: tuple[int, int], rank: int,
                    gradient_checkpointing: bool, training_mode: str = "lora", ema: bool = False,
                    paired: int = 0, dmd: bool = False) -> dict[str, int]:
    """Rough bytes a run needs on its device (training/inputs.py, from the UNet's parameter shapes and
    base width): {'weights', 'trainable', 'activations', 'total'}; ``training_mode='full'`` counts a
    whole fp32 copy of the weights as trainable (see :func:`trainable_copy`)."""
    unet = _unet(network)
    shapes = [(tuple(p.shape), p.element_size()) for p in unet.parameters()]
    return estimate_run_memory(shapes, int(getattr(unet, "model_channels", 320)), batch_size, latent_hw, rank,
                               gradient_checkpointing, training_mode, ema, paired, dmd)


def free_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device`` as ComfyUI's model management sees it (device + torch cache)."""
    return int(mm.get_free_memory(device))

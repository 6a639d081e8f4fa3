"""TinyVAE nodes: load any TAESD-family file as a ComfyUI VAE, decode/encode in bounded chunks.

The model itself is ComfyUI's (``comfy.taesd.taesd.TAESD`` built by ``comfy.sd.VAE`` from
``taesd_encoder.* / taesd_decoder.* / vae_scale / vae_shift`` keys, as core ``VAELoader`` does);
file layouts, variants and checks live in ``core.taesd``.

State: none at module level. A decode/encode in another dtype than the VAE's, or on the CPU
(channels-last), makes a converted copy of the TAESD once and keeps it on the VAE object
(``_add_tiny_runners``), so it lives as long as that VAE.
"""
from __future__ import annotations

import copy
import logging
import os

import torch

import comfy.model_management as mm
import comfy.sd
import comfy.utils
import folder_paths
from comfy.taesd.taesd import TAESD
from comfy_api.latest import io

from ..adapters import comfy_internals as internals
from ..core import files
from ..core import taesd as core
from ..core.errors import ADDError

FOLDER = "vae_approx"
VARIANT_CHOICES = ["auto", *core.VARIANTS]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TinyVAE(comfy.sd.VAE):
    """A ``comfy.sd.VAE`` holding a TAESD that knows its variant and files, and refuses to encode
    (instead of returning garbage) when its file had no encoder."""

    def __init__(self, sd: dict, variant: str, decoder_file: str, encoder_file: str | None):
        super().__init__(sd=sd)
        self.tiny_variant = variant
        self.tiny_files = (decoder_file, encoder_file)

    def require_encoder(self) -> None:
        """Raise unless this TAESD came with encoder weights."""
        if self.tiny_files[1] is None:
            dec = self.tiny_files[0]
            stem = os.path.basename(dec).replace("decoder", "encoder")
            raise core.TAESDError(
                f"{dec} is a decoder-only TAESD, so it cannot encode images. Put the matching encoder "
                f"({stem}, from madebyollin/taesd) next to it in models/vae_approx and reload, or encode with the full VAE.")

    def encode(self, pixel_samples):
        self.require_encoder()
        return super().encode(pixel_samples)

    def encode_tiled(self, pixel_samples, *args, **kwargs):
        self.require_encoder()
        return super().encode_tiled(pixel_samples, *args, **kwargs)


def _video_tae_prefixes() -> tuple[str, ...]:
    """ComfyUI's own video TAEs (taehv, lighttae...), read from this ComfyUI's VAELoader."""
    import nodes as comfy_nodes

    return tuple(getattr(comfy_nodes.VAELoader, "video_taes", ()))


def _read(name: str) -> dict:
    """A vae_approx file's tensors, through the plugin's one checked reader (never unpickled)."""
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise core.TAESDError(f"tae_name {str(name)[:120]!r} is not a file in models/vae_approx: put the TAESD file "
                              "there (press 'r' in the browser to refresh the list) and select it.")
    return files.read_safetensors(path, f"vae_approx/{name}",
                                  "Re-download it (madebyollin/taesd, the .safetensors files) into models/vae_approx.")[0]


def load_tiny_vae(name: str, variant: str = "auto") -> TinyVAE:
    """Load ``name`` from vae_approx (pairing ``*_encoder`` with ``*_decoder``) as a TinyVAE."""
    names = folder_paths.get_filename_list(FOLDER)
    weights = core.split_state_dict(_read(name), name)
    if weights.decoder is None:
        raise core.TAESDError(f"{name} holds only a TAESD encoder; select the matching *_decoder file.")
    enc_file = name if weights.encoder is not None else core.pair_files(names).get(name)
    if enc_file is not None and enc_file != name:
        weights = core.merge(weights, core.split_state_dict(_read(enc_file), enc_file), (name, enc_file))
    chosen = core.resolve_variant(name, weights.latent_channels, variant, weights.scale_shift)
    vae = TinyVAE(core.comfy_state_dict(weights, chosen), chosen.name, name, enc_file)
    logging.info("ADD TinyVAE: %s as %s (%s), %d latent channels, %s layout, encoder: %s",
                 name, chosen.name, chosen.family, weights.latent_channels, weights.layout, enc_file or "none")
    return vae


def _taesd_of(vae) -> tuple[TAESD, str | None]:
    """The TAESD inside a VAE and its variant (from our loader, or from its scale/shift)."""
    model = getattr(vae, "first_stage_model", None)
    if not isinstance(model, TAESD):
        raise core.TAESDError(f"this node needs a TAESD VAE (ADD TinyVAE Loader), got {type(model).__name__}; "
                              "decode full VAEs with core VAE Decode.")
    variant = getattr(vae, "tiny_variant", None) or core.variant_from_scale(
        model.vae_scale.item(), model.vae_shift.item(), int(vae.latent_channels))
    return model, variant


def check_model_fits(vae, model) -> None:
    """Raise when the TAESD does not decode ``model``'s latent format (no-op when model is None)."""
    if model is None:
        return
    taesd, variant = _taesd_of(vae)
    try:
        fmt = model.get_model_object("latent_format")
    except AttributeError:
        fmt = model.model.latent_format
    core.check_fits(vae_channels=int(vae.latent_channels), vae_variant=variant,
                    vae_scale=taesd.vae_scale.item(), vae_shift=taesd.vae_shift.item(),
                    fmt_name=type(fmt).__name__, fmt_channels=int(fmt.latent_channels),
                    fmt_scale=float(fmt.scale_factor), fmt_shift=float(getattr(fmt, "shift_factor", 0.0) or 0.0),
                    fmt_taesd=getattr(fmt, "taesd_decoder_name", None))


def working_dtype(choice: str, vae) -> torch.dtype:
    """auto: fp32 on CPU (half is slow there); on accelerators the dtype ComfyUI loaded the VAE in
    (fp16/bf16 where the device supports it), so no converted copy is needed."""
    if choice == "auto":
        return torch.float32 if vae.device.type == "cpu" else vae.vae_dtype
    if choice not in DTYPES:  # a comfy_api combo: not every host checks the value before the node runs
        raise ADDError(f"dtype {choice!r} is not one of auto, {', '.join(DTYPES)}: pick one from the list.")
    return DTYPES[choice]


def _runner(vae, dtype: torch.dtype, memory: int) -> tuple[TAESD, torch.device, torch.memory_format]:
    """The TAESD on its device in ``dtype``: the loaded one, or a private copy (the VAE is shared).

    On CPU the copy is channels-last with in-place ReLUs: oneDNN's 64-channel 3x3 convs run ~1.5x
    faster in that layout, and the ReLUs stop writing a second full-resolution tensor.
    """
    mm.load_models_gpu([vae.patcher], memory_required=memory, force_full_load=True)
    model = vae.first_stage_model
    on_cpu = vae.device.type == "cpu"
    fmt = torch.channels_last if on_cpu else torch.contiguous_format
    if dtype != vae.vae_dtype or on_cpu:
        # The copy is kept on the VAE object (keyed by device/dtype/layout): making it costs more
        # than a whole TAESD decode on a GPU, and TAESD weights are never patched.
        cache = internals.plugin_state(vae, "_add_tiny_runners")
        key = (str(vae.device), dtype, fmt)
        if key not in cache:
            private = copy.deepcopy(model).to(device=vae.device, dtype=dtype, memory_format=fmt)
            for m in private.modules():
                if isinstance(m, torch.nn.ReLU):
                    m.inplace = True
            cache[key] = private
        model = cache[key]
    return model, vae.device, fmt


def run_chunked(fn, x: torch.Tensor, chunk: int, out_device) -> torch.Tensor:
    """``fn`` over ``x`` in batch chunks, results gathered on ``out_device``; a progress bar per chunk."""
    starts = range(0, x.shape[0], chunk)
    pbar = comfy.utils.ProgressBar(len(starts))
    out = None
    for s in starts:
        y = fn(x[s:s + chunk]).to(out_device)
        if out is None:
            out = torch.empty((x.shape[0],) + tuple(y.shape[1:]), dtype=y.dtype, device=out_device)
        out[s:s + y.shape[0]] = y
        pbar.update(1)
    return out


def tiny_decode(vae, latent: torch.Tensor, chunk: int = 8, dtype: str = "auto") -> torch.Tensor:
    """(B, C, h, w) latent → (B, 8h, 8w, 3) image in [0, 1], ``chunk`` latents at a time."""
    _, variant = _taesd_of(vae)
    core.check_latent(latent, int(vae.latent_channels), variant)
    dt = working_dtype(dtype, vae)
    memory = core.decode_bytes(min(chunk, latent.shape[0]), latent.shape[2], latent.shape[3], mm.dtype_size(dt))
    model, device, fmt = _runner(vae, dt, memory)

    def step(z):
        with torch.inference_mode():
            img = model.decode(z.to(device=device, dtype=dt).contiguous(memory_format=fmt)).float()
            return vae.process_output(img).movedim(1, -1)  # in inference mode: in place from 0.33 (add_, clamp_)

    return run_chunked(step, latent, chunk, mm.intermediate_device())


def tiny_encode(vae, pixels: torch.Tensor, chunk: int = 8, dtype: str = "auto") -> torch.Tensor:
    """(B, H, W, C) image in [0, 1] → (B, c, H/8, W/8) latent, ``chunk`` images at a time."""
    _, variant = _taesd_of(vae)
    if isinstance(vae, TinyVAE):
        vae.require_encoder()
    core.check_pixels(pixels)
    pixels = core.crop_to_multiple(pixels[..., :3], 8)
    dt = working_dtype(dtype, vae)
    memory = core.decode_bytes(min(chunk, pixels.shape[0]), pixels.shape[1] // 8, pixels.shape[2] // 8, mm.dtype_size(dt))
    model, device, fmt = _runner(vae, dt, memory)

    def step(img):
        with torch.inference_mode():
            x = vae.process_input(img.movedim(-1, 1).to(device=device, dtype=dt)).contiguous(memory_format=fmt)
            return model.encode(x).float()

    return run_chunked(step, pixels, chunk, mm.intermediate_device())


def _chunk_input() -> io.Int.Input:
    return io.Int.Input("batch_chunk", default=8, min=1, max=4096, tooltip=
        "How many images go through the TAESD at once; lower it to bound memory for big batches or video frames.")


def _dtype_input() -> io.Combo.Input:
    return io.Combo.Input("dtype", options=["auto", "fp32", "fp16", "bf16"], default="auto", tooltip=
        "Compute precision. auto: on a GPU the dtype ComfyUI loaded the VAE in (fp16/bf16), fp32 on CPU.")


def _model_input() -> io.Model.Input:
    return io.Model.Input("model", optional=True, tooltip=
        "Optional: the model that made (or will take) the latent; a TAESD for a different latent space is then an "
        "error naming the file to use.")


class ADDTinyVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        names = list(core.pair_files(folder_paths.get_filename_list(FOLDER), _video_tae_prefixes()))
        return io.Schema(
            node_id="ADDTinyVAELoader", display_name="ADD TinyVAE Loader", category="ADD/vae",
            description=("Loads a TAESD-family tiny autoencoder (taesd, taesdxl, taesd3, taef1), in madebyollin's or "
                         "diffusers' layout, decoder alone or with its encoder: ~50x less decode work than the full VAE."),
            inputs=[
                io.Combo.Input("tae_name", options=names, tooltip=
                    "A TAESD file in models/vae_approx: a *_decoder file (its *_encoder sibling is paired "
                    "automatically) or a diffusers AutoencoderTiny file."),
                io.Combo.Input("variant", options=VARIANT_CHOICES, default="auto", tooltip=
                    "Which latent space the file is for. auto: 4 vs 16 channels from the weights, sd/sdxl and sd3/f1 "
                    "from the file name."),
            ],
            outputs=[io.Vae.Output(tooltip="A standard VAE (works with core VAE Decode/Encode too); decoder-only files "
                                           "cannot encode.")],
        )

    @classmethod
    def execute(cls, tae_name, variant) -> io.NodeOutput:
        return io.NodeOutput(load_tiny_vae(tae_name, variant))


class ADDTinyVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADDTinyVAEDecode", display_name="ADD TinyVAE Decode", category="ADD/vae",
            description="Decodes latents with a TAESD in bounded chunks; checks the TAESD fits the latent (and the model).",
            inputs=[
                io.Latent.Input("samples", tooltip="The latent to decode."),
                io.Vae.Input("vae", tooltip="A TAESD from ADD TinyVAE Loader."),
                _chunk_input(),
                _dtype_input(),
                _model_input(),
            ],
            outputs=[io.Image.Output(tooltip="The decoded images.")],
        )

    @classmethod
    def execute(cls, samples, vae, batch_chunk, dtype, model=None) -> io.NodeOutput:
        check_model_fits(vae, model)
        return io.NodeOutput(tiny_decode(vae, samples["samples"], batch_chunk, dtype))


class ADDTinyVAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ADDTinyVAEEncode", display_name="ADD TinyVAE Encode", category="ADD/vae",
            description="Encodes images with a TAESD encoder in bounded chunks (fast img2img input).",
            inputs=[
                io.Image.Input("pixels", tooltip="Images to encode (cropped to multiples of 8)."),
                io.Vae.Input("vae", tooltip="A TAESD with an encoder, from ADD TinyVAE Loader."),
                _chunk_input(),
                _dtype_input(),
                _model_input(),
            ],
            outputs=[io.Latent.Output(tooltip="The latent, for img2img.")],
        )

    @classmethod
    def execute(cls, pixels, vae, batch_chunk, dtype, model=None) -> io.NodeOutput:
        check_model_fits(vae, model)
        return io.NodeOutput({"samples": tiny_encode(vae, pixels, batch_chunk, dtype)})


NODES = [ADDTinyVAELoader, ADDTinyVAEDecode, ADDTinyVAEEncode]

"""TAESD-family tiny autoencoders: key layouts, variants, scale/shift (pure torch, no ComfyUI).

TAESD (madebyollin/taesd) is a 1.22 M-parameter decoder (+ a same-size encoder) that maps the
latent space of SD1.x/2.x, SDXL, SD3 or Flux.1 to pixels in one cheap pass. Files in the wild
come in two key layouts:

* madebyollin's: one file per half, ``<variant>_decoder.*`` with keys ``1.weight`` ... ``19.bias``
  (index 0 of the decoder ``nn.Sequential`` is a parameter-free Clamp) and ``<variant>_encoder.*``
  with ``0.weight`` ... ``14.bias``; possibly prefixed ``taesd_decoder.`` / ``taesd_encoder.``
  (ComfyUI's in-checkpoint form, optionally under ``first_stage_model.``).
* diffusers' ``AutoencoderTiny``: both halves in one file, ``encoder.layers.N...`` (same indices as
  madebyollin's encoder) and ``decoder.layers.N...`` (index N is madebyollin's N + 1: diffusers
  applies the clamp outside its ``layers``).

Everything here works on ``{key: tensor}`` dicts and plain numbers so the node layer can feed it
ComfyUI objects and tests can run it with ComfyUI absent.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from .errors import TAESDError

__all__ = [
    "TAESDError", "Variant", "VARIANTS", "TAESDWeights", "expected_shapes", "split_state_dict",
    "variant_from_name", "resolve_variant", "comfy_state_dict", "pair_files", "check_fits",
    "variants_for_channels", "variant_from_scale", "crop_to_multiple", "decode_bytes", "merge", "check_latent", "check_pixels",
]




@dataclass(frozen=True)
class Variant:
    """One TAESD variant: the latent space it decodes and how to map that latent to its input."""

    name: str
    latent_channels: int
    scale: float  # decoder input = (latent - shift) * scale (ComfyUI's latent_format numbers)
    shift: float
    family: str  # human name of the model family, for messages
    decoder_file: str  # madebyollin's file stem, also ComfyUI's latent_format.taesd_decoder_name


# ComfyUI's latent_formats.py holds the same numbers (scale_factor / shift_factor).
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("taesd", 4, 0.18215, 0.0, "SD1.x / SD2.x (incl. SD-Turbo)", "taesd_decoder"),
        Variant("taesdxl", 4, 0.13025, 0.0, "SDXL (incl. SDXL-Turbo)", "taesdxl_decoder"),
        Variant("taesd3", 16, 1.5305, 0.0609, "SD3 / SD3.5", "taesd3_decoder"),
        Variant("taef1", 16, 0.3611, 0.1159, "Flux.1", "taef1_decoder"),
    )
}

# Name hints, most specific first ("taesd3" and "taesdxl" both contain "taesd").
_NAME_HINTS: tuple[tuple[str, str], ...] = (
    (r"taef1|flux", "taef1"),
    (r"taesd3|sd3", "taesd3"),
    (r"taesdxl|sdxl|xl", "taesdxl"),
    (r"taesd|sd1|sd15|sd2|sd21|turbo", "taesd"),
)

_WIDTH = 64  # every TAESD conv is 64 channels wide
_ENC_BLOCKS = (1, 3, 4, 5, 7, 8, 9, 11, 12, 13)
_ENC_STRIDED = (2, 6, 10)  # stride-2 convs, no bias
_DEC_BLOCKS = (3, 4, 5, 8, 9, 10, 13, 14, 15, 18)
_DEC_UPCONVS = (7, 12, 17)  # convs after each Upsample, no bias


def expected_shapes(part: str, latent_channels: int) -> dict[str, tuple[int, ...]]:
    """Every key of madebyollin's ``part`` ("encoder" | "decoder") and its shape."""
    w = _WIDTH
    out: dict[str, tuple[int, ...]] = {}
    blocks, plain = (_ENC_BLOCKS, _ENC_STRIDED) if part == "encoder" else (_DEC_BLOCKS, _DEC_UPCONVS)
    for i in blocks:
        for j in (0, 2, 4):
            out[f"{i}.conv.{j}.weight"] = (w, w, 3, 3)
            out[f"{i}.conv.{j}.bias"] = (w,)
    for i in plain:
        out[f"{i}.weight"] = (w, w, 3, 3)
    if part == "encoder":
        out.update({"0.weight": (w, 3, 3, 3), "0.bias": (w,),
                    "14.weight": (latent_channels, w, 3, 3), "14.bias": (latent_channels,)})
    else:
        out.update({"1.weight": (w, latent_channels, 3, 3), "1.bias": (w,),
                    "19.weight": (3, w, 3, 3), "19.bias": (3,)})
    return out


def _mismatches(sd: Mapping[str, torch.Tensor], part: str, latent_channels: int) -> list[str]:
    """Human-readable differences between ``sd`` and madebyollin's ``part`` layout ([] if none)."""
    want = expected_shapes(part, latent_channels)
    problems = [f"missing {k}" for k in want if k not in sd]
    problems += [f"unexpected {k}" for k in sd if k not in want]
    problems += [f"{k}: shape {tuple(sd[k].shape)}, expected {want[k]}"
                 for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    return problems


@dataclass(frozen=True)
class TAESDWeights:
    """Encoder/decoder state dicts in madebyollin's layout (either may be None) and what was found."""

    encoder: dict | None
    decoder: dict | None
    latent_channels: int
    layout: str  # "madebyollin" | "comfy-prefixed" | "diffusers"
    scale_shift: tuple[float, float] | None = None  # from vae_scale/vae_shift keys, if present


def _latent_channels(part: str, sd: Mapping[str, torch.Tensor]) -> int:
    """Latent channels read from the first decoder conv / last encoder conv."""
    return int(sd["1.weight"].shape[1]) if part == "decoder" else int(sd["14.weight"].shape[0])


def _validated(part: str, sd: dict, source: str) -> dict:
    """``sd`` if it is a complete madebyollin ``part``; else a TAESDError naming the keys."""
    problems = _mismatches(sd, part, _latent_channels(part, sd))
    if problems:
        shown = "; ".join(problems[:4]) + (f"; ... ({len(problems)} problems)" if len(problems) > 4 else "")
        raise TAESDError(f"{source}: not a complete TAESD {part}: {shown}. "
                         "Use an unmodified taesd*/taef1 file from madebyollin/taesd or a diffusers AutoencoderTiny.")
    return sd


def _bare_part(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Which half a madebyollin-layout dict is, judged by its first/last conv shapes."""
    if "19.weight" in sd and "1.weight" in sd and tuple(sd["19.weight"].shape[:2]) == (3, _WIDTH):
        return "decoder"
    if "0.weight" in sd and "14.weight" in sd and tuple(sd["0.weight"].shape[:2]) == (_WIDTH, 3):
        return "encoder"
    return None


def _from_diffusers(sd: Mapping[str, torch.Tensor], source: str) -> tuple[dict | None, dict | None]:
    """diffusers AutoencoderTiny → madebyollin halves; the decoder offset is checked by shapes."""
    halves: dict[str, dict] = {"encoder": {}, "decoder": {}}
    pat = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)$")
    for k, v in sd.items():
        m = pat.match(k)
        if m is None:
            raise TAESDError(f"{source}: key {k!r} is not part of a diffusers AutoencoderTiny "
                             "(expected encoder.layers.N... / decoder.layers.N...).")
        halves[m.group(1)][(int(m.group(2)), m.group(3))] = v
    enc = {f"{i}.{rest}": v for (i, rest), v in halves["encoder"].items()} or None
    dec = None
    if halves["decoder"]:
        # madebyollin's Decoder has Clamp() at index 0, diffusers' does not: offset 1 normally;
        # offset 0 accepted too for files converted without it, whichever matches the shapes.
        for offset in (1, 0):
            cand = {f"{i + offset}.{rest}": v for (i, rest), v in halves["decoder"].items()}
            if "1.weight" in cand and not _mismatches(cand, "decoder", _latent_channels("decoder", cand)):
                dec = cand
                break
        if dec is None:
            dec = {f"{i + 1}.{rest}": v for (i, rest), v in halves["decoder"].items()}
    return enc, dec


def split_state_dict(sd: Mapping[str, torch.Tensor], source: str = "file") -> TAESDWeights:
    """Any supported TAESD file's dict → validated madebyollin-layout halves.

    ``source`` names the file in error messages.
    """
    if not sd:
        raise TAESDError(f"{source}: the file holds no tensors. Re-download it (madebyollin/taesd).")
    keys = list(sd)
    scale_shift = None
    if "vae_scale" in sd and "vae_shift" in sd:
        scale_shift = (float(sd["vae_scale"]), float(sd["vae_shift"]))
    marker = next((k for k in keys if "taesd_decoder." in k or "taesd_encoder." in k), None)
    if marker is not None:
        layout = "comfy-prefixed"
        enc: dict | None = {}
        dec: dict | None = {}
        for k, v in sd.items():
            for tag, dst in (("taesd_encoder.", enc), ("taesd_decoder.", dec)):
                if tag in k:
                    dst[k.split(tag, 1)[1]] = v
        enc, dec = enc or None, dec or None
    elif any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in keys):
        layout = "diffusers"
        enc, dec = _from_diffusers(sd, source)
    else:
        layout = "madebyollin"
        part = _bare_part(sd)
        if part is None:
            sample = ", ".join(keys[:3])
            raise TAESDError(
                f"{source}: not a TAESD file (keys start {sample} ...). Expected madebyollin's "
                "taesd*_decoder / taesd*_encoder (keys 0.weight ... 19.bias) or a diffusers AutoencoderTiny "
                "(encoder.layers.N / decoder.layers.N). Put TAESD files in models/vae_approx.")
        enc, dec = (dict(sd), None) if part == "encoder" else (None, dict(sd))
    if dec is not None:
        _validated("decoder", dec, source)
    if enc is not None:
        _validated("encoder", enc, source)
    if dec is None and enc is None:
        raise TAESDError(f"{source}: found no TAESD encoder or decoder tensors.")
    channels = {_latent_channels(p, d) for p, d in (("decoder", dec), ("encoder", enc)) if d is not None}
    if len(channels) != 1:
        raise TAESDError(f"{source}: encoder and decoder disagree on latent channels {sorted(channels)}; "
                         "pair files of the same variant (e.g. taesd_encoder with taesd_decoder).")
    return TAESDWeights(enc, dec, channels.pop(), layout, scale_shift)


def merge(decoder: TAESDWeights, encoder: TAESDWeights, names: tuple[str, str]) -> TAESDWeights:
    """The decoder file's weights plus the encoder half from a sibling file (``names``: dec, enc)."""
    if decoder.encoder is not None:
        return decoder
    if encoder.encoder is None:
        raise TAESDError(f"{names[1]} is named like an encoder but holds no TAESD encoder weights; "
                         "replace it with the matching *_encoder file from madebyollin/taesd.")
    if encoder.latent_channels != decoder.latent_channels:
        raise TAESDError(f"{names[1]} has {encoder.latent_channels} latent channels but {names[0]} has "
                         f"{decoder.latent_channels}: they are different variants. Rename or remove the stray file.")
    return TAESDWeights(encoder.encoder, decoder.decoder, decoder.latent_channels, decoder.layout,
                        decoder.scale_shift or encoder.scale_shift)


def variants_for_channels(latent_channels: int) -> list[str]:
    """Variant names whose latent has ``latent_channels`` channels."""
    return [v.name for v in VARIANTS.values() if v.latent_channels == latent_channels]


def variant_from_name(name: str) -> str | None:
    """Variant hinted by a file name or path ("models/taesdxl_decoder.pth" → "taesdxl"), or None."""
    base = name.lower().replace("\\", "/")
    for pattern, variant in _NAME_HINTS:
        if re.search(pattern, base):
            return variant
    return None


def variant_from_scale(scale: float, shift: float, latent_channels: int | None = None) -> str | None:
    """Variant whose scale/shift (and channels, if given) match, or None."""
    for v in VARIANTS.values():
        if abs(v.scale - scale) < 1e-4 and abs(v.shift - shift) < 1e-4 and latent_channels in (None, v.latent_channels):
            return v.name
    return None


def resolve_variant(name: str, latent_channels: int, override: str = "auto",
                    scale_shift: tuple[float, float] | None = None) -> Variant:
    """The variant of a file: channels from the weights decide 4 vs 16, the name (or stored
    vae_scale/vae_shift) decides sd vs sdxl and sd3 vs f1; ``override`` wins if it fits the weights."""
    fitting = variants_for_channels(latent_channels)
    if not fitting:
        raise TAESDError(f"{name}: {latent_channels} latent channels; no TAESD variant this node knows has that "
                         f"(known: {', '.join(f'{v.name}={v.latent_channels}' for v in VARIANTS.values())}). "
                         "Load it with ComfyUI's Load VAE node if your ComfyUI supports it.")
    if override != "auto":
        if override not in VARIANTS:
            raise TAESDError(f"variant {override!r} is unknown; choose auto or one of {', '.join(VARIANTS)}.")
        if override not in fitting:
            raise TAESDError(f"{name} has {latent_channels} latent channels but variant {override} needs "
                             f"{VARIANTS[override].latent_channels}; choose one of {', '.join(fitting)} (or auto).")
        return VARIANTS[override]
    if scale_shift is not None:
        stored = variant_from_scale(*scale_shift, latent_channels)
        if stored is not None:
            return VARIANTS[stored]
    hinted = variant_from_name(name)
    if hinted in fitting:
        return VARIANTS[hinted]
    if len(fitting) == 1:
        return VARIANTS[fitting[0]]
    if latent_channels == 4:  # plain SD latents are the common case; SDXL files say "xl"
        return VARIANTS["taesd"]
    raise TAESDError(f"{name}: {latent_channels}-channel TAESD, but the name does not say which of "
                     f"{' / '.join(fitting)} it is; set the variant widget "
                     f"({', '.join(f'{n} for {VARIANTS[n].family}' for n in fitting)}).")


def comfy_state_dict(weights: TAESDWeights, variant: Variant) -> dict[str, torch.Tensor]:
    """The dict ComfyUI's ``comfy.sd.VAE`` turns into its own TAESD (see nodes.VAELoader.load_taesd).

    A missing encoder is filled with zeros (not left to uninitialised memory); the node layer
    refuses to encode with it.
    """
    sd: dict[str, torch.Tensor] = {}
    enc = weights.encoder
    if enc is None:
        enc = {k: torch.zeros(s) for k, s in expected_shapes("encoder", weights.latent_channels).items()}
    for prefix, half in (("taesd_encoder.", enc), ("taesd_decoder.", weights.decoder)):
        sd.update({prefix + k: v for k, v in half.items()})
    sd["vae_scale"] = torch.tensor(variant.scale)
    sd["vae_shift"] = torch.tensor(variant.shift)
    return sd


_PART = re.compile(r"^(?P<stem>.*?)[_.-](?P<part>encoder|decoder)(?P<ext>\.[^/]+)$", re.IGNORECASE)


def pair_files(names: list[str], skip_prefixes: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Loadable entries of a vae_approx listing → the encoder file paired with each (or None).

    Keys are decoder files (``taesd_decoder.safetensors``) and single-file models (diffusers
    ``AutoencoderTiny``); encoder-only files are paired, never listed. Names starting with any of
    ``skip_prefixes`` (e.g. ComfyUI's video TAEs) are left out.
    """
    by_stem: dict[tuple[str, str], str] = {}
    for n in names:
        m = _PART.match(n)
        if m and m.group("part").lower() == "encoder":
            by_stem.setdefault((m.group("stem").lower(), m.group("ext").lower()), n)
            by_stem.setdefault((m.group("stem").lower(), ""), n)
    out: dict[str, str | None] = {}
    for n in sorted(names):
        if n.replace("\\", "/").rsplit("/", 1)[-1].startswith(skip_prefixes):
            continue
        m = _PART.match(n)
        if m is None:
            out[n] = None
        elif m.group("part").lower() == "decoder":
            stem = m.group("stem").lower()
            out[n] = by_stem.get((stem, m.group("ext").lower())) or by_stem.get((stem, ""))
    return out


def check_fits(*, vae_channels: int, vae_variant: str | None, vae_scale: float, vae_shift: float,
               fmt_name: str, fmt_channels: int, fmt_scale: float, fmt_shift: float,
               fmt_taesd: str | None) -> None:
    """Raise a TAESDError when the TAESD does not decode the model's latent format.

    ``fmt_*`` come from the model's ``latent_format`` (class name, latent_channels, scale_factor,
    shift_factor, taesd_decoder_name — ComfyUI's own choice of TAESD for its previews).
    """
    what = vae_variant or f"TAESD (scale {vae_scale:g}, shift {vae_shift:g})"
    use = f"{fmt_taesd}.safetensors" if fmt_taesd else None
    fix = (f"load {use} (from madebyollin/taesd) into models/vae_approx and select it"
           if use else "this model's latent format has no TAESD; decode with its full VAE (core VAE Decode)")
    if vae_channels != fmt_channels:
        raise TAESDError(f"{what} decodes {vae_channels}-channel latents but the model ({fmt_name}) makes "
                         f"{fmt_channels}-channel ones: {fix}.")
    if fmt_taesd is not None and vae_variant is not None:
        fits = VARIANTS[vae_variant].decoder_file == fmt_taesd
    else:
        fits = abs(vae_scale - fmt_scale) < 1e-4 and abs(vae_shift - fmt_shift) < 1e-4
    if not fits:
        raise TAESDError(f"{what} is for a different latent space than the model ({fmt_name}, scale "
                         f"{fmt_scale:g}, shift {fmt_shift:g}): {fix}.")


def check_latent(latent: torch.Tensor, vae_channels: int, vae_variant: str | None) -> None:
    """Raise a TAESDError unless ``latent`` is (B, C, H, W) with the decoder's C."""
    if latent.ndim != 4:
        raise TAESDError(f"expected an image latent (batch, channels, height, width), got shape {tuple(latent.shape)}; "
                         "video latents of image models come batched as (frames, C, H, W).")
    if latent.shape[0] == 0 or latent.shape[2] == 0 or latent.shape[3] == 0:
        raise TAESDError(f"samples is empty (shape {tuple(latent.shape)}): set batch_size (and width/height) to at least "
                         "1 in the node that made the latent.")
    c = latent.shape[1]
    if c != vae_channels:
        fitting = variants_for_channels(c)
        hint = (f"use {' or '.join(VARIANTS[n].decoder_file + '.safetensors' for n in fitting)}"
                if fitting else "no TAESD variant decodes that; use the model's full VAE")
        raise TAESDError(f"the latent has {c} channels but {vae_variant or 'this TAESD'} decodes {vae_channels}: {hint}.")
    if latent.is_floating_point() and not bool(torch.isfinite(latent).all()):
        raise TAESDError("samples holds NaN or infinite values, which decode to a black or garbage image: the node that "
                         "made the latent failed (e.g. a sampler whose model or LoRA holds NaN weights). Fix that node's "
                         "inputs and queue again.")


def check_pixels(pixels: torch.Tensor) -> None:
    """Raise a TAESDError unless ``pixels`` is a non-empty, finite (B, H, W, C) image batch."""
    if pixels.ndim != 4 or pixels.shape[0] == 0 or pixels.shape[-1] < 3:
        raise TAESDError(f"pixels has shape {tuple(pixels.shape)}; expected a non-empty image batch (batch, height, "
                         "width, 3): connect a Load Image or a decoder's IMAGE output.")
    if pixels.is_floating_point() and not bool(torch.isfinite(pixels).all()):
        raise TAESDError("pixels holds NaN or infinite values: the node that made the image failed; fix its inputs "
                         "and queue again.")


def crop_to_multiple(pixels: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Centre-crop (B, H, W, C) images so H and W are multiples of ``multiple`` (as ComfyUI does)."""
    for dim in (1, 2):
        size = pixels.shape[dim]
        keep = (size // multiple) * multiple
        if keep == 0:
            raise TAESDError(f"image is {pixels.shape[1]}x{pixels.shape[2]}; TAESD needs at least {multiple}x{multiple}.")
        if keep != size:
            pixels = pixels.narrow(dim, (size % multiple) // 2, keep)
    return pixels


def decode_bytes(batch: int, height: int, width: int, dtype_size: int) -> int:
    """Rough peak activation bytes of a TAESD decode of (batch, C, height, width) latents.

    The last stage runs 64 channels at 8x the latent size; ~4 such tensors are alive at once.
    """
    return int(batch * _WIDTH * (8 * height) * (8 * width) * dtype_size * 4)

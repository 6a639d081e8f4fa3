"""LoRA key formats: detect them, normalise the ones ComfyUI's key map lacks, guess the target.

Pure string/shape logic (no ComfyUI import) shared by the LoRA merge node and the tests.

A LoRA file is a flat ``{key: tensor}`` dict. Each *module* (one target weight) owns a few keys:
``<module><suffix>`` where the suffix names the factor (``.lora_up.weight``, ``.lora_B.weight``,
``.alpha`` ...). The module name says which weight it targets, in one of these layouts:

=================  ====================================================================
kohya-ldm          ``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``
kohya-diffusers    ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``
                   (the public LCM-LoRA layout)
kohya-te           ``lora_te_`` / ``lora_te1_`` / ``lora_te2_text_model_encoder_layers_0_...``
comfy-native       ``diffusion_model.input_blocks.1.1...`` / ``text_encoders.clip_l...``
diffusers-old      ``unet.down_blocks.0...attn1.processor.to_q_lora.up.weight``
peft               ``unet.down_blocks.0...attn1.to_q.lora_A.weight`` (new diffusers / PEFT),
                   also ``text_encoder.`` / ``text_encoder_2.`` / ``base_model.model.`` prefixes
=================  ====================================================================

ComfyUI (0.3.x .. 0.8.x) maps every layout above except PEFT attention projections:
``unet.X.attn1.to_q`` is only known as ``unet.X.attn1.processor.to_q``. ``normalise_keys``
rewrites PEFT UNet modules into the kohya-diffusers form (``lora_unet_<diffusers name with _>``,
``.lora_down/.lora_up``), which ComfyUI maps for every diffusers UNet weight.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# Factor suffixes, longest first so ``.lora_A.default.weight`` wins over ``.weight``.
_SUFFIXES: tuple[str, ...] = tuple(sorted((
    ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight",
    ".lora_A.weight", ".lora_B.weight", ".lora_A.default.weight", ".lora_B.default.weight",
    "_lora.up.weight", "_lora.down.weight", ".lora.up.weight", ".lora.down.weight",
    ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight",
    ".lora_A", ".lora_B",
    ".alpha", ".dora_scale", ".reshape_weight",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
    ".oft_blocks", ".oft_diag", ".rescale",
    ".diff", ".diff_b", ".w_norm", ".b_norm", ".set_weight",
), key=len, reverse=True))

# PEFT factor suffix -> kohya factor suffix.
_PEFT_TO_KOHYA = {
    ".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight",
    ".lora_A.default.weight": ".lora_down.weight", ".lora_B.default.weight": ".lora_up.weight",
    ".alpha": ".alpha", ".dora_scale": ".dora_scale",
}

_UNET_DIFFUSERS_MARKERS = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding",
                           "add_embedding", "conv_norm_out")
_UNET_LDM_MARKERS = ("input_blocks", "output_blocks", "middle_block", "time_embed", "label_emb", "out_")

# modelspec.architecture / ss_base_model_version values -> family.
_ARCH_FROM_METADATA = (
    ("stable-diffusion-xl", "sdxl"), ("sdxl", "sdxl"),
    ("stable-diffusion-v2", "sd2"), ("sd_v2", "sd2"),
    ("stable-diffusion-v1", "sd1"), ("sd_v1", "sd1"),
)
# cross-attention context width (in-features of attn2.to_k) -> family.
CONTEXT_DIM_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "unknown": "unknown"}


def split_key(key: str) -> tuple[str, str]:
    """``'lora_unet_x.lora_up.weight'`` -> ``('lora_unet_x', '.lora_up.weight')``."""
    for s in _SUFFIXES:
        if key.endswith(s) and len(key) > len(s):
            return key[: -len(s)], s
    head, _, tail = key.rpartition(".")
    return (head, "." + tail) if head else (key, "")


def group_modules(keys) -> dict[str, list[str]]:
    """{module name: [its keys]} in file order."""
    out: dict[str, list[str]] = {}
    for k in keys:
        out.setdefault(split_key(k)[0], []).append(k)
    return out


def classify_module(module: str, suffixes=()) -> tuple[str, str]:
    """(format, component) of one module name; component is ``unet``, ``clip`` or ``other``."""
    peft = any(s in (".lora_A.weight", ".lora_B.weight", ".lora_A.default.weight", ".lora_B.default.weight",
                     ".lora_A", ".lora_B") for s in suffixes)
    if module.startswith("lora_unet_"):
        body = module[len("lora_unet_"):]
        if body.startswith(_UNET_DIFFUSERS_MARKERS):
            return "kohya-diffusers", "unet"
        if body.startswith(_UNET_LDM_MARKERS):
            return "kohya-ldm", "unet"
        return "kohya", "unet"
    if re.match(r"lora_te\d?_", module):
        return "kohya-te", "clip"
    if module.startswith("diffusion_model."):
        return "comfy-native", "unet"
    if module.startswith("text_encoders."):
        return "comfy-native", "clip"
    if module.startswith("lycoris_"):
        return "lycoris", "unet"
    for prefix, comp in (("unet.", "unet"), ("text_encoder.", "clip"), ("text_encoder_2.", "clip"),
                         ("base_model.model.", "unet")):
        if module.startswith(prefix):
            if ".processor." in module or any(s.startswith("_lora.") for s in suffixes):
                return "diffusers-old", comp
            if peft:
                return "peft", comp
            return "diffusers", comp
    if module.startswith(_UNET_DIFFUSERS_MARKERS):
        return ("peft" if peft else "diffusers"), "unet"
    return "unknown", "other"


def _peft_unet_body(module: str) -> str | None:
    """The diffusers UNet path of a PEFT module name, or None when it is not a UNet module."""
    for prefix in ("unet.base_model.model.", "base_model.model.", "unet."):
        if module.startswith(prefix):
            body = module[len(prefix):]
            return body if body.startswith(_UNET_DIFFUSERS_MARKERS) else None
    return None


def normalise_keys(sd: dict) -> tuple[dict, dict[str, str]]:
    """Rewrite PEFT UNet modules into kohya-diffusers names ComfyUI's key map knows.

    ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`` ->
    ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight``.
    Returns (new dict holding the same tensor objects, {old module: new module}). Other keys pass
    through unchanged (ComfyUI maps them, text-encoder PEFT keys included).
    """
    out: dict = {}
    renamed: dict[str, str] = {}
    for module, keys in group_modules(sd.keys()).items():
        suffixes = [split_key(k)[1] for k in keys]
        fmt, comp = classify_module(module, suffixes)
        body = _peft_unet_body(module) if fmt == "peft" and comp == "unet" else None
        if body is None or not all(s in _PEFT_TO_KOHYA for s in suffixes):
            for k in keys:
                out[k] = sd[k]
            continue
        new_module = "lora_unet_" + body.replace(".", "_")
        renamed[module] = new_module
        for k, s in zip(keys, suffixes):
            out[new_module + _PEFT_TO_KOHYA[s]] = sd[k]
    return out, renamed


def context_dim_from_shapes(shapes: dict) -> int | None:
    """Cross-attention context width from an ``attn2 to_k`` down factor's in-features."""
    for k, shape in shapes.items():
        module, suffix = split_key(k)
        m = module.replace(".", "_")
        if m.endswith("attn2_to_k") or m.endswith("attn2_processor_to_k"):
            if suffix in (".lora_down.weight", ".lora_A.weight", ".lora_A.default.weight", "_lora.down.weight",
                          ".lora.down.weight", ".lora_A") and len(shape) >= 2:
                return int(shape[1])
    return None


def guess_architecture(keys, shapes: dict | None = None, metadata: dict | None = None) -> tuple[str, str]:
    """(family, reason): family in ``sd1|sd2|sdxl|unknown``; shapes beat metadata beat key names."""
    ctx = context_dim_from_shapes(shapes or {})
    if ctx in CONTEXT_DIM_FAMILY:
        return CONTEXT_DIM_FAMILY[ctx], f"cross-attention context width {ctx} (attn2.to_k)"
    md = metadata or {}
    for mkey in ("modelspec.architecture", "ss_base_model_version"):
        val = str(md.get(mkey, "")).lower()
        for needle, fam in _ARCH_FROM_METADATA:
            if needle in val:
                return fam, f"metadata {mkey}={md[mkey]!r}"
    keys = list(keys)
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys):
        return "sdxl", "second text encoder keys (lora_te2_/text_encoder_2.)"
    return "unknown", "no attn2.to_k factor, no architecture metadata"


_LCM_TOKEN = re.compile(r"(^|[^a-z0-9])lcm([^a-z]|$)")


_LCM_NAME_FORMATS = ("kohya-diffusers", "peft", "diffusers", "diffusers-old")  # layouts the published LCM-LoRAs ship in


def detect_lcm(metadata: dict | None, filename: str = "") -> tuple[bool, str]:
    """(is_lcm, reason) from metadata values (titles, training comments) or the file name."""
    for k, v in (metadata or {}).items():
        text = f"{k}={v}".lower()
        if k.startswith("ss_tag_frequency") or k == "ss_dataset_dirs":
            continue  # dataset captions are not a statement about the LoRA
        if "latent consistency" in text or _LCM_TOKEN.search(str(v).lower()):
            return True, f"metadata {k}"
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].lower()
    if _LCM_TOKEN.search(name.rsplit(".", 1)[0]):
        return True, f"file name {name!r}"
    return False, "no LCM marker in metadata or file name"


@dataclass(frozen=True)
class LoraInfo:
    """What a LoRA file is: formats, components, family, LCM-ness, rank."""
    n_modules: int
    formats: dict = field(default_factory=dict)     # {format: modules}
    components: dict = field(default_factory=dict)  # {unet|clip|other: modules}
    family: str = "unknown"
    family_reason: str = ""
    is_lcm: bool = False
    lcm_reason: str = ""
    rank: int | None = None

    @property
    def format(self) -> str:
        """The dominant format, ``a+b`` when a file mixes several."""
        if not self.formats:
            return "empty"
        return "+".join(sorted(self.formats, key=lambda f: -self.formats[f]))


def describe(sd_shapes: dict, metadata: dict | None = None, filename: str = "") -> LoraInfo:
    """LoraInfo of a LoRA given {key: shape} (tensors' ``.shape`` work), its metadata and name."""
    formats: dict[str, int] = {}
    comps: dict[str, int] = {}
    ranks: dict[int, int] = {}
    for module, keys in group_modules(sd_shapes.keys()).items():
        suffixes = [split_key(k)[1] for k in keys]
        fmt, comp = classify_module(module, suffixes)
        formats[fmt] = formats.get(fmt, 0) + 1
        comps[comp] = comps.get(comp, 0) + 1
        for k, s in zip(keys, suffixes):
            if s in (".lora_down.weight", ".lora_A.weight", ".lora_A.default.weight", "_lora.down.weight"):
                r = int(sd_shapes[k][0])
                ranks[r] = ranks.get(r, 0) + 1
    fam, why = guess_architecture(sd_shapes.keys(), sd_shapes, metadata)
    lcm, lwhy = detect_lcm(metadata, filename)
    dominant = max(formats, key=formats.get) if formats else ""
    if lcm and lwhy.startswith("file name") and (any(k.startswith("ss_") for k in (metadata or {}))
                                                 or dominant not in _LCM_NAME_FORMATS):
        # The public LCM-LoRAs are diffusers exports without trainer metadata; a kohya-trained LoRA
        # whose name merely contains "lcm" is an ordinary LoRA and keeps the model's sampling.
        lcm, lwhy = False, (f"{lwhy} mentions LCM, but the file is an ordinary trained LoRA ({dominant} layout"
                            + (", trainer metadata" if any(k.startswith("ss_") for k in (metadata or {})) else "")
                            + "); set sampling to 'lcm' if it is an LCM-LoRA")
    rank = max(ranks, key=ranks.get) if ranks else None
    return LoraInfo(len(group_modules(sd_shapes.keys())), formats, comps, fam, why, lcm, lwhy, rank)

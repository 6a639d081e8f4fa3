"""The ranges of a training run's inputs, shared by the ADD Train node and the headless trainer.

The node's widgets enforce these ranges in the browser, but an API prompt or a config file reaches the
run without them (NaN passes ComfyUI's min/max check, a config file has no widgets): both call
:func:`check_run_inputs`, so the same values are refused with the same words. Also here: the rough
memory a run needs (:func:`estimate_memory`), from parameter shapes alone, so the headless
``--check`` can estimate it from a checkpoint's header without loading it.

No ComfyUI import: the headless trainer uses it before ComfyUI is imported.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from ..core.errors import ADDError
from ..core.images import check_size

# name -> (type, lowest, highest, multiple of (ints), hint). Names are the headless config keys (ADDConfig
# fields and run keys); the node shows its widget names instead (``names`` of check_run_inputs).
RULES: dict[str, tuple[type, float, float, int, str]] = {
    "width": (int, 64, 4096, 8, "pixels, a multiple of 8 (512 for SD1.x/2.x, 1024 for SDXL)"),
    "height": (int, 64, 4096, 8, "pixels, a multiple of 8"),
    "batch_size": (int, 1, 256, 1, "samples per iteration; >= 4 recommended"),
    "data_cfg": (float, 1.0, 30.0, 0, "the teacher's CFG scale for training images; 7 is typical"),
    "data_steps": (int, 1, 200, 1, "teacher sampling steps per training image; 25 is typical"),
    "teacher_cfg_scale": (float, 0.0, 30.0, 0, "CFG of the distillation target; 1 = no CFG"),
    "lora_rank": (int, 1, 1024, 1, "16 is typical; full mode exports at this rank"),
    "lora_alpha": (float, 0.01, 1024.0, 0, "usually equal to the rank"),
    "lr_lora": (float, 1e-7, 0.1, 0, "1e-4 is typical"),
    "lr_disc": (float, 1e-7, 0.1, 0, "1e-4 is typical"),
    "lr_full": (float, 1e-9, 0.1, 0, "1e-6 is typical (the whole network)"),
    "distill_weight": (float, 0.0, 100.0, 0, "the paper's 2.5"),
    "paired_weight": (float, 0.0, 1000.0, 0, "0 = off; the small_data preset's 100"),
    "max_steps": (int, 1, 1_000_000, 1, "training iterations"),
    "save_every": (int, 0, 1_000_000, 1, "0 = only at the end"),
    "preview_every": (int, 0, 1_000_000, 1, "0 = never"),
}


def _number(value: Any, kind: type) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if kind is int and not (isinstance(value, int) or (math.isfinite(value) and float(value).is_integer())):
        return None
    return float(value)


def check_run_inputs(values: Mapping[str, Any], names: Mapping[str, str] | None = None, where: str = "") -> None:
    """ADDError naming the first input of ``values`` outside :data:`RULES` (keys without a rule are skipped).

    ``names`` maps a rule's name to the one the user typed (the node's widget names); ``where`` starts
    the message (e.g. the config file)."""
    names = names or {}
    for key, value in values.items():
        if key not in RULES:
            continue
        kind, lo, hi, multiple, hint = RULES[key]
        shown = names.get(key, key)
        if multiple > 1:
            check_size(value, shown, lo, hi, multiple, hint, where)
            continue
        x = _number(value, kind)
        what = "a whole number" if kind is int else "a number"
        if x is None or not math.isfinite(x) or not lo <= x <= hi:
            raise ADDError(f"{where}{shown} is {value!r}: type {what} from {lo:g} to {hi:g} ({hint}).")


# Bytes of activations kept for backward per (sample x latent pixel x UNet base channel x element
# byte) in one graph-holding UNet pass; an ADD iteration holds two (student, teacher features on
# the generator step). A rough constant for SD-family UNets with attention through SDPA; gradient
# checkpointing keeps about a quarter.
ACT_FACTOR = 400
CKPT_SAVING = 4


def estimate_memory(weight_shapes: Iterable[tuple[tuple[int, ...], int]], model_channels: int, batch_size: int,
                    latent_hw: tuple[int, int], rank: int, gradient_checkpointing: bool, training_mode: str = "lora",
                    ema: bool = False, paired: int = 0, dmd: bool = False) -> dict[str, int]:
    """Rough bytes a run needs on its device: {'weights', 'trainable', 'activations', 'total'}.

    ``weight_shapes``: (shape, bytes per element) of every UNet parameter (from a module or a
    safetensors header); tensors of 2 or more dimensions are the layers that get adapters.
    'weights': the job's frozen copy of the base (the teacher). 'trainable': what is trained, in fp32
    with its gradient and two AdamW moments (and the EMA's copy when ``ema``): the LoRA adapters, or
    for ``training_mode='full'`` a whole fp32 copy of the weights. ``paired`` (``ADDConfig.paired_passes``):
    the graph-holding passes the pairs add to the generator step (the paired student pass, and with
    paired_metric 'features' the feature network on its output); ``dmd`` (distill_loss 'dmd'): the
    fake score's LoRA with its gradient and AdamW moments."""
    weights, n_lin, n_all, elt = 0, 0, 0, None
    for shape, size in weight_shapes:
        numel = math.prod(shape)
        weights += numel * size
        n_all += numel
        elt = elt or size
        if len(shape) >= 2:
            n_lin += shape[0] + numel // shape[0]
    n_trained = n_all if training_mode == "full" else n_lin * rank
    trainable = n_trained * 4 * (4 + int(bool(ema)))  # fp32 param, grad, two AdamW moments (+ EMA)
    if dmd:
        trainable += n_lin * rank * 4 * 4
    h, w = latent_hw
    act = (2 + int(paired)) * batch_size * ACT_FACTOR * model_channels * h * w * (elt or 4)
    if gradient_checkpointing:
        act //= CKPT_SAVING
    return {"weights": weights, "trainable": trainable, "activations": act, "total": weights + trainable + act}


def memory_error(need: Mapping[str, int], free: int, device: str, where: str = "", training_mode: str = "lora"
                 ) -> ADDError:
    """The refusal when ``need['total'] > free``: the numbers and what to lower."""
    gb = lambda b: f"{b / 2**30:.1f} GB"  # noqa: E731
    full = training_mode == "full"
    return ADDError(
        f"{where}ADD training needs about {gb(need['total'])} on {device} (weights copy {gb(need['weights'])}, "
        + ("full fp32 student copy" if full else "adapters")
        + f" and optimiser {gb(need['trainable'])}, activations {gb(need['activations'])}) but about {gb(free)} is "
        "free. Lower batch_size or width/height, turn on gradient_checkpointing"
        + (", use training_mode lora" if full else "") + ", or close other work and try again.")

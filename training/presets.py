"""Named sets of ADD settings (the ``preset`` input of ADD Train and key of the headless config).

A preset names ``ADDConfig`` fields and their values; what it does not name keeps the value the user
gave (or ADDConfig's default). ``none`` uses the inputs exactly as set. What each preset holds, and
why, is measured in ``benchmarks/README_digits.md``:

- ``paper``: the spec's starting hyperparameters for SD-class models (ADD paper and open code: LoRA
  lr 1e-4, discriminator lr 1e-4 with betas (0, 0.999), lambda 2.5, t-hat over the whole schedule).
- ``small_data``: what the digits proof found for a small model on little data (a 1 M-parameter UNet,
  1,347 images): higher learning rates, the discriminator at low noise only, per-sample head norm,
  cosine decay, the input convolution among the discriminator's features (so pixel-level noise is
  visible to it), an EMA of the student's weights, and the noise-paired regression (``paired_weight`` 100:
  the 1-step student from the noise each teacher sample started from, regressed onto that sample, measured
  as latent MSE plus a feature distance, ``paired_metric`` 'mse+features'; dropped when the run trains on
  given images, which have no noise to pair with), and distribution matching in place of the paper's
  distillation regression (``distill_loss`` 'dmd', ``distill_weight`` 25: beside the pairs it made the 2-
  and 4-step students better under both distances, recall and diversity on digits and stopped the 4-step
  student's decline with longer training; on given images, without the pairs it was measured with, the
  user's values stay).
"""

from __future__ import annotations

from typing import Any, Mapping

from ..core.errors import ADDError

PRESET_NAMES = ("none", "paper", "small_data")

_PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "paper": {"lr_lora": 1e-4, "lr_disc": 1e-4, "distill_weight": 2.5, "disc_betas": (0.0, 0.999),
              "disc_norm": "batch_local", "lr_schedule": "constant", "disc_features": "encoder", "ema_decay": None},
    "small_data": {"lr_lora": 1e-3, "lr_disc": 1e-3, "disc_timestep_range": (0, 50), "disc_norm": "sample",
                   "lr_schedule": "cosine", "disc_features": "input+encoder", "ema_decay": 0.99, "paired_weight": 100.0,
                   "paired_metric": "mse+features", "distill_loss": "dmd", "distill_weight": 25.0},
}

# A preset's settings that were measured only together with its pairs: a run on given images, which drops the
# preset's pairs, keeps the user's values of these instead (training/setup.py).
WITH_PAIRS_ONLY = ("distill_loss", "distill_weight")


def preset_fields(name: str, t_max: int = 999) -> dict[str, Any]:
    """The ADDConfig fields preset ``name`` sets, with timestep ranges clipped to a schedule whose last
    index is ``t_max``. Unknown names raise ValueError listing the known ones."""
    if name not in _PRESETS:
        raise ADDError(f"preset {name!r} is not known; choose one of {PRESET_NAMES}.")
    out = dict(_PRESETS[name])
    for key in ("disc_timestep_range", "teacher_timestep_range"):
        if key in out:
            lo, hi = out[key]
            out[key] = (min(lo, t_max), min(hi, t_max))
    return out


def fields_on_run(name: str, images: bool = False, t_max: int = 999) -> dict[str, Any]:
    """What preset ``name`` sets on a run: :func:`preset_fields`, less (on given images) its pairs and the
    settings measured only beside them (``WITH_PAIRS_ONLY``), which ``training.setup.RunRequest.config``
    leaves to the user there."""
    out = preset_fields(name, t_max)
    if images and "paired_weight" in out:
        for key in ("paired_weight", *WITH_PAIRS_ONLY):
            out.pop(key, None)
    return out


def apply_preset(name: str, fields: Mapping[str, Any], explicit: frozenset[str] | set[str] = frozenset(),
                 t_max: int = 999) -> tuple[dict[str, Any], dict[str, Any]]:
    """``fields`` with preset ``name`` applied -> (fields, what the preset changed).

    The preset wins over ``fields`` except for the keys in ``explicit`` (settings the user gave on
    purpose, e.g. keys written in a headless config file)."""
    preset = preset_fields(name, t_max)
    out = dict(fields)
    changed = {}
    for key, value in preset.items():
        if key in explicit:
            continue
        if out.get(key, _MISSING) != value:
            changed[key] = value
        out[key] = value
    return out, changed


_MISSING = object()

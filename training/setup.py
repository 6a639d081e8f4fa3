"""One way in to a training run: the user's settings -> a checked :class:`RunRequest` -> ``ADDConfig``.

The ADD Train node (widgets) and the headless trainer (a config file) both describe a run as a
:class:`RunRequest` and get its ``ADDConfig`` from :meth:`RunRequest.config`, so equal settings give
equal configs and either can resume the other's run. What needs ComfyUI objects (the model's copy,
the prompts' encodings, the data) is assembled from a request in ``adapters/run_setup.py``.

- :func:`parse_timesteps`, :func:`parse_prompts` — the two text inputs, read one way everywhere;
- :func:`config_for_model` — the schedule-derived fields (length, timestep ranges) from the model;
- :func:`run_summary` — what ``run.json`` records of the data and what a resume must match;
- :func:`describe_change` / :func:`config_error` — messages in the words the user typed (the node's
  widget names, or the config file's keys).

No ComfyUI import (the headless trainer validates a config before ComfyUI is imported).
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ..core.errors import ADDError
from .config import ADDConfig
from .inputs import RULES, check_run_inputs
from .presets import PRESET_NAMES, WITH_PAIRS_ONLY, apply_preset, preset_fields

RUN_MODES = ("polite", "alongside")
MAX_STUDENT_STEPS = 8

# ADDConfig fields whose ADD Train widget has another name (the node's messages use the widget's)
WIDGET_NAMES = {"seed": "training_seed", "teacher_cfg_scale": "distill_cfg", "disc_timestep_range": "disc_max_timestep",
                "num_train_timesteps": "the model's schedule length",
                "teacher_timestep_range": "the model's schedule (distillation timesteps)"}


# --------------------------------------------------------------------------------------------
# text inputs
# --------------------------------------------------------------------------------------------
def _whole(p) -> int:
    if isinstance(p, str):
        return int(p)
    if isinstance(p, bool) or not isinstance(p, int):
        raise TypeError(p)
    return p


def parse_timesteps(text: str | Iterable[int], t_max: int = 999, name: str = "student_timesteps") -> tuple[int, ...]:
    """'999,749,499,249' (or a list of ints) -> (999, 749, 499, 249), sorted from the noisiest.

    ADDError naming the input unless it is 1-8 distinct whole numbers from 0 to ``t_max``."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
    else:
        parts = list(text)
    try:
        ts = tuple(_whole(p) for p in parts)
    except (TypeError, ValueError):
        ts = ()
    shown = text if isinstance(text, str) else ",".join(map(str, parts))
    if (not ts or len(ts) != len(parts) or len(ts) > MAX_STUDENT_STEPS or len(set(ts)) != len(ts)
            or any(not 0 <= t <= t_max for t in ts)):
        raise ADDError(f"{name} {str(shown)[:60]!r} is not valid: type 1-{MAX_STUDENT_STEPS} distinct whole numbers "
                       f"from 0 to {t_max}, separated by commas, e.g. 999,749,499,249 (the ADD paper's 4 steps) or "
                       "999 (1 step).")
    return tuple(sorted(ts, reverse=True))


def parse_prompts(text: str | Iterable[str]) -> list[str]:
    """One prompt per non-empty line (or list item); lines starting with '#' are comments."""
    lines = str(text).splitlines() if isinstance(text, str) else [str(p) for p in text]
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


# --------------------------------------------------------------------------------------------
# config and run summary
# --------------------------------------------------------------------------------------------
def config_for_model(t_max: int, **fields) -> ADDConfig:
    """ADDConfig for a model whose schedule has ``t_max + 1`` timesteps: the schedule-derived fields
    (length, teacher and discriminator timestep ranges) from the model, the rest from ``fields`` or
    ADDConfig's defaults."""
    base = {"num_train_timesteps": t_max + 1, "teacher_timestep_range": (1, t_max), "disc_timestep_range": (0, t_max)}
    base.update(fields)
    return ADDConfig(**base)


def run_summary(width: int, height: int, prompt_list: list[str], data_cfg: float, data_steps: int,
                n_images: int | None = None, images_for: str = "training") -> dict:
    """What run.json records of a run's data, and what a resume must match (training.resume.RUN_INFO_COMPARED):
    size, and the prompts (count and hash), data_cfg and data_steps of teacher data, or the image count
    (``images_for`` 'discriminator': 'teacher+images', the teacher's samples of the images' captions: the image
    count, data_cfg and data_steps)."""
    info = {"width": int(width), "height": int(height)}
    if n_images is not None and images_for == "training":
        return {**info, "data": "images", "images": int(n_images)}
    if n_images is not None:  # the teacher's samples of the images' captions, the images the discriminator's
        return {**info, "data": "teacher+images", "images": int(n_images), "data_cfg": float(data_cfg),
                "data_steps": int(data_steps)}
    texts = sorted(set(prompt_list))
    digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()[:16]
    return {**info, "data": "teacher", "prompts": len(texts), "prompts_sha256": digest, "data_cfg": float(data_cfg),
            "data_steps": int(data_steps)}


def _shown(name: str, value) -> str:
    if name == "disc_timestep_range" and isinstance(value, (list, tuple)) and value:
        return repr(value[-1])  # the widget sets only the upper end
    if name == "student_timesteps" and isinstance(value, (list, tuple)):
        return repr(",".join(map(str, value)))
    return repr(value)


def describe_change(name: str, old, new, then: str = "saved") -> str:
    """One changed setting in the node's words: 'distill_cfg: saved 1.0, now 2.0' (widget names, not
    ADDConfig fields; disc_max_timestep shows the upper end it sets)."""
    return f"{WIDGET_NAMES.get(name, name)}: {then} {_shown(name, old)}, now {_shown(name, new)}"


def config_error(exc: ValueError, where: str = "ADD Train: ", names: Mapping[str, str] = WIDGET_NAMES) -> ADDError:
    """ADDConfig's 'ADDConfig.teacher_cfg_scale=nan is invalid: expected ...' in the user's words."""
    text = str(exc)
    m = re.match(r"ADDConfig\.(\w+)=(.*?) is invalid: expected (.*?)\.?$", text, re.S)
    if m is None:
        return ADDError(f"{where}{text}")
    key, value, expected = m.groups()
    if key == "disc_timestep_range" and names.get(key) == "disc_max_timestep":
        return ADDError(f"disc_max_timestep is {value}: type a whole number from 0 to the model's last timestep.")
    return ADDError(f"{where}{names.get(key, key)} is {value}: expected {expected}.")


# --------------------------------------------------------------------------------------------
# the request
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunRequest:
    """A training run as the user asked for it, before any model is loaded.

    ``train`` holds ADDConfig fields (``student_timesteps`` as text or a list); ``explicit`` names the
    ones a preset must not override (keys written in a config file; the node's widgets always lose
    to a preset it names). ``disc_max_timestep`` is the node's single widget for the upper end of
    ``disc_timestep_range`` (clipped to the model's schedule). ``names`` maps ADDConfig fields to the
    user's names in messages; ``where`` starts every message (e.g. the config file)."""

    lora_path: str
    prompts: tuple[str, ...]
    width: int
    height: int
    data_cfg: float = 7.0
    data_steps: int = 25
    gradient_checkpointing: bool = False
    train: Mapping[str, Any] = field(default_factory=dict)
    preset: str = "none"
    explicit: frozenset[str] = frozenset()
    disc_max_timestep: int | None = None
    dinov2_path: str | None = None
    names: Mapping[str, str] = field(default_factory=dict)
    where: str = ""

    def check(self, has_images: bool = False) -> "RunRequest":
        """The inputs' ranges (the node's widget ranges, for API prompts and config files alike), the
        preset, the data; ADDError naming the input. Returns self."""
        check_run_inputs({"width": self.width, "height": self.height, "data_cfg": self.data_cfg,
                          "data_steps": self.data_steps, **self.train}, names=self.names, where=self.where)
        if self.preset not in PRESET_NAMES:
            raise ADDError(f"{self.where}preset {self.preset!r} is not known; choose one of {PRESET_NAMES}.")
        if self.disc_max_timestep is not None and not (isinstance(self.disc_max_timestep, int)
                                                       and 0 <= self.disc_max_timestep <= 999):
            raise ADDError(f"{self.where}disc_max_timestep is {self.disc_max_timestep!r}: type a whole number from 0 "
                           "to 999 (999 = the full range; 50 for small data).")
        unknown = sorted(set(self.train) - {f.name for f in dataclasses.fields(ADDConfig)})
        if unknown:
            raise ADDError(f"{self.where}unknown training settings {unknown}.")
        if self.images_for == "discriminator" and not has_images:
            raise ADDError(f"{self.where}images_for is 'discriminator' but no images are given: connect 'images' or "
                           "set image_folder (the images the discriminator learns as real), or set images_for to "
                           "'training'.")
        if not self.prompts and not has_images:
            raise ADDError(f"{self.where}prompts is empty and no images are given: type at least one prompt per line "
                           "(the teacher then generates the training images), or give images to train on (connect "
                           "'images' or set image_folder).")
        return self

    @property
    def images_for(self) -> str:
        """What given images are for (ADDConfig.images_for): 'training' unless the request says otherwise."""
        return str(self.train.get("images_for", "training"))

    def config(self, t_max: int = 999, images: bool = False) -> ADDConfig:
        """The run's ADDConfig for a model whose schedule's last timestep is ``t_max`` (999 for SD-class
        models: what a config file is checked with before its model is loaded). ``images``: the run
        trains on given images, which have no noise to pair with, so a preset's ``paired_weight`` is
        dropped there (with the settings it was measured beside, ``presets.WITH_PAIRS_ONLY``: the user's
        values stay), and one the user set is refused; with ``images_for`` 'discriminator' the student trains on the
        teacher's samples and the images only feed the discriminator, so the pairs stay. A preset's feature distance
        for the pairs falls back to 'mse' with the pixel discriminator (its features are the latent itself)."""
        adv = self.train.get("adv_weight", 1.0)  # a non-number is ADDConfig's to refuse, by its rule
        adv_off = isinstance(adv, (int, float)) and not isinstance(adv, bool) and adv <= 0
        if self.images_for == "discriminator" and adv_off:
            raise ADDError(f"{self.where}images_for is 'discriminator' but adv_weight is 0: the images feed only the "
                           "discriminator, which adv_weight 0 turns off. Set adv_weight above 0, or images_for to "
                           "'training' to train on the images.")
        images = images and self.images_for == "training"
        fields = {k: (RULES[k][0](v) if k in RULES else v) for k, v in self.train.items()}  # checked: numbers
        if "student_timesteps" in fields:
            fields["student_timesteps"] = parse_timesteps(fields["student_timesteps"], t_max,
                                                          self.names.get("student_timesteps", "student_timesteps"))
        if self.disc_max_timestep is not None:
            fields["disc_timestep_range"] = (0, min(int(self.disc_max_timestep), t_max))
        before = dict(fields)
        fields, _ = apply_preset(self.preset, fields, explicit=self.explicit, t_max=t_max)
        if images and float(fields.get("paired_weight", 0.0) or 0.0) > 0:
            from_preset = "paired_weight" in preset_fields(self.preset) and "paired_weight" not in self.explicit
            if not from_preset:
                raise ADDError(f"{self.where}paired_weight is {fields['paired_weight']}, but this run trains on images, "
                               "which carry no noise to pair with (the noise-paired regression needs the teacher's own "
                               "samples). Set paired_weight to 0, train from prompts, or set images_for to "
                               "'discriminator' (the teacher's samples train the student, the images the "
                               "discriminator).")
            fields["paired_weight"] = 0.0  # the preset's, on data it cannot use
        if images and "paired_weight" in preset_fields(self.preset):
            for key in WITH_PAIRS_ONLY:  # the preset's settings measured only beside its pairs: the user's stay
                if key in preset_fields(self.preset) and key not in self.explicit:
                    if key in before:
                        fields[key] = before[key]
                    else:
                        fields.pop(key, None)
        if (fields.get("discriminator") == "pixel" and "features" in str(fields.get("paired_metric", ""))
                and "paired_metric" in preset_fields(self.preset) and "paired_metric" not in self.explicit):
            fields["paired_metric"] = "mse"  # the preset's feature distance needs a discriminator with features
        try:
            return config_for_model(t_max, **fields)
        except (TypeError, ValueError) as exc:  # name the input, not ADDConfig's field
            raise config_error(exc, self.where or "ADD Train: ", self.names) from None

    def run_info(self, n_images: int | None = None) -> dict:
        """run.json's record of the data (see :func:`run_summary`)."""
        return run_summary(self.width, self.height, list(self.prompts), self.data_cfg, self.data_steps, n_images,
                           self.images_for)

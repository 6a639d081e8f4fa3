"""One frozen, validated configuration for ADD training (arXiv 2311.17042, Sec. 3 and the spec).

The node layer builds an :class:`ADDConfig` from its widgets and passes it down; nothing in
``training/`` reads globals or argument bags. Defaults are the spec's starting hyperparameters
(open code where the paper gives none).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..core.errors import ADDError

DISTILL_WEIGHTINGS = ("exponential", "sds")
DISTILL_LOSSES = ("regression", "dmd")
PAIRED_METRICS = ("mse", "features", "mse+features")
IMAGES_FOR = ("training", "discriminator")
DISCRIMINATOR_TYPES = ("teacher", "dinov2", "pixel")
DISC_FEATURES = ("encoder", "input+encoder", "all")
TRAINING_MODES = ("lora", "full")
DISC_NORMS = ("batch_local", "sample")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class ADDConfig:
    """Every hyperparameter of one ADD run. Validated in ``__post_init__``.

    Timesteps are discrete indices ``0 .. num_train_timesteps-1`` of the model's schedule
    (999 is the noisiest for SD-class models).
    """

    # --- student (Sec. 3.1): s ~ Uniform(T_student); tau_N = top timestep gets pure noise ---
    student_timesteps: tuple[int, ...] = (999, 749, 499, 249)
    num_train_timesteps: int = 1000
    pure_noise_at_top: bool = True  # zero-terminal SNR at tau_N (spec step 2)
    training_mode: str = "lora"  # 'lora' (shares the teacher's weights) | 'full' (deep copy)
    lora_rank: int = 16
    lora_alpha: float = 16.0

    # --- losses: L_G = L_adv + lambda * L_distill (Eq. 5), R1 gamma on the D side ---
    distill_weight: float = 2.5  # lambda
    adv_weight: float = 1.0  # 0 = distillation-only ablation (no discriminator is trained)
    # > 0: the adversarial gradient on x_hat is rescaled to this multiple of the distillation gradient's norm
    # at every step (an adaptive weight, VQGAN-style); 0 = off (the paper's fixed weights)
    adv_grad_balance: float = 0.0
    distill_weighting: str = "exponential"  # c(t) = alpha_t ('exponential') | SDS weighting
    # the distillation term: 'regression' (the paper's Eq. 4: x_hat onto the teacher's denoising of x_hat
    # re-noised) | 'dmd' (distribution matching, DMD/DMD2: x_hat moved along teacher score - fake score, the fake
    # score a second LoRA on the teacher trained on the student's samples; training/fake_score.py)
    distill_loss: str = "regression"
    # > 0: the noise-paired regression (Luhman & Luhman 2021; DMD's regression loss) with this weight: the 1-step
    # student from the noise a teacher-generated x0 started from (batch['noise']) is regressed onto that x0.
    # Needs teacher-generated training data (SyntheticTeacherData); 0 = off (the paper's ADD)
    paired_weight: float = 0.0
    # DMD2's backward simulation: inputs below the top student timestep come from the student's own earlier steps
    # (no gradient) instead of the training image re-noised, so the multi-step student trains on its own inputs
    backward_simulation: bool = False
    # the pairs' distance: 'mse' (latent space) | 'features' (LPIPS-like, in the discriminator's feature network) |
    # 'mse+features' (their sum)
    paired_metric: str = "mse"
    # what given images are for: 'training' (the student learns from them; no pairs) | 'discriminator' (the
    # student, the distillation term and the pairs use the teacher's samples of the images' captions; the images
    # are what the discriminator learns as real: the paper's ADD). Data assembly only (adapters/run_setup.py,
    # batch['real'])
    images_for: str = "training"
    r1_gamma: float = 1e-5
    teacher_cfg_scale: float = 1.0  # 1.0 = one conditional teacher pass, no CFG
    teacher_timestep_range: tuple[int, int] = (1, 999)  # t for re-noising the student output
    disc_timestep_range: tuple[int, int] = (0, 999)  # t-hat for the teacher-feature D (LADD)

    # --- discriminator ---
    discriminator: str = "teacher"  # 'teacher' (LADD features, latent space) | 'dinov2' | 'pixel' (sanity baseline)
    # which teacher activations the heads read: 'encoder' (end of every encoder level + middle block, LADD),
    # 'input+encoder' (also the input convolution: the latent itself, so pixel noise is visible), 'all'
    # (input + encoder + middle + the end of every decoder level)
    disc_features: str = "encoder"
    disc_head_channels: int = 0  # 0 = keep each feature's own width
    disc_norm: str = "batch_local"  # heads' norm: 'batch_local' (StyleGAN-T) | 'sample' (per-sample GroupNorm)
    disc_spectral_norm: bool = True  # spectral norm on the heads' convolutions (StyleGAN-T)
    disc_updates: int = 1  # critic (discriminator heads, and the fake score of 'dmd') updates per student update (DMD2's two time-scale rule: 5), fresh batches

    # --- optimisation (AdamW; open code) ---
    lr_lora: float = 1e-4
    lr_full: float = 1e-6
    lr_disc: float = 1e-4
    lr_warmup_steps: int = 0
    lr_schedule: str = "constant"  # after warm-up: 'constant' | 'cosine' (to 0 at max_steps, both G and D)
    gen_betas: tuple[float, float] = (0.9, 0.999)
    disc_betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    batch_size: int = 4
    ema_decay: float | None = None  # None disables the EMA of the student

    # --- run control ---
    seed: int = 0
    max_steps: int = 2000
    save_every: int = 500  # 0 = only at the end
    preview_every: int = 100  # 0 = never
    max_nonfinite_steps: int = 10  # consecutive non-finite iterations before stopping

    def __post_init__(self) -> None:
        # JSON gives lists; normalise to tuples so the dataclass stays hashable and comparable.
        for name in ("student_timesteps", "teacher_timestep_range", "disc_timestep_range",
                     "gen_betas", "disc_betas"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        for name, (check, allowed) in _RULES.items():
            value = getattr(self, name)
            ok = False
            try:
                ok = bool(check(value, self))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ADDError(f"ADDConfig.{name}={value!r} is invalid: expected {allowed}.")

    @property
    def lr_student(self) -> float:
        """Student learning rate for the chosen training mode (LoRA 1e-4 / full 1e-6 by default)."""
        return self.lr_lora if self.training_mode == "lora" else self.lr_full

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ADDConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise so typos are not silently ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ADDError(f"ADDConfig.from_dict: unknown keys {unknown}; known keys are {sorted(known)}.")
        return cls(**dict(data))

    @property
    def paired_passes(self) -> int:
        """Extra graph-holding passes the pairs add to a generator step: 0 (off), 1 (the student's paired
        pass, 'mse'), 2 (and the feature network on its output, 'features'); for the memory estimate."""
        return 0 if self.paired_weight <= 0 else (2 if "features" in self.paired_metric else 1)

    def replace(self, **changes: Any) -> "ADDConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _t_range(v: Any, c: ADDConfig) -> bool:
    return (isinstance(v, tuple) and len(v) == 2 and all(_int(t) for t in v)
            and 0 <= v[0] <= v[1] <= c.num_train_timesteps - 1)


def _betas(v: Any, c: ADDConfig) -> bool:
    return isinstance(v, tuple) and len(v) == 2 and all(_finite(b) and 0.0 <= b < 1.0 for b in v)


# field -> (predicate(value, config), human-readable allowed range for the error message)
_RULES: dict[str, tuple[Callable[[Any, ADDConfig], bool], str]] = {
    "num_train_timesteps": (lambda v, c: _int(v) and 2 <= v <= 100_000, "an int in [2, 100000]"),
    "student_timesteps": (
        lambda v, c: isinstance(v, tuple) and len(v) >= 1 and all(_int(t) and 0 <= t < c.num_train_timesteps for t in v)
        and len(set(v)) == len(v),
        "a non-empty tuple of distinct ints in [0, num_train_timesteps-1], e.g. (999, 749, 499, 249)"),
    "pure_noise_at_top": (lambda v, c: isinstance(v, bool), "True or False"),
    "training_mode": (lambda v, c: v in TRAINING_MODES, f"one of {TRAINING_MODES}"),
    "lora_rank": (lambda v, c: _int(v) and 1 <= v <= 1024, "an int in [1, 1024]"),
    "lora_alpha": (lambda v, c: _finite(v) and v > 0, "a float > 0 (usually equal to lora_rank)"),
    "distill_weight": (lambda v, c: _finite(v) and v >= 0 and (v > 0 or c.adv_weight > 0 or c.paired_weight > 0),
                       "a float >= 0 (paper: 2.5), not 0 together with adv_weight=0 (unless paired_weight > 0)"),
    "adv_weight": (lambda v, c: _finite(v) and v >= 0, "a float >= 0 (1.0 = paper; 0 = distillation only)"),
    "adv_grad_balance": (lambda v, c: _finite(v) and 0 <= v <= 100, "a float in [0, 100] (0 = off; 1 = equal pull)"),
    "distill_weighting": (lambda v, c: v in DISTILL_WEIGHTINGS, f"one of {DISTILL_WEIGHTINGS}"),
    "paired_weight": (lambda v, c: _finite(v) and 0 <= v <= 1000, "a float in [0, 1000] (0 = off)"),
    "paired_metric": (lambda v, c: v in PAIRED_METRICS and not ("features" in v and c.discriminator == "pixel"),
                      f"one of {PAIRED_METRICS}; no 'features' with discriminator 'pixel' (its features are the "
                      "latent itself, which the metric's per-position normalisation reduces to its direction)"),
    "backward_simulation": (lambda v, c: isinstance(v, bool), "True or False"),
    "images_for": (lambda v, c: v in IMAGES_FOR and (v == "training" or c.adv_weight > 0),
                   f"one of {IMAGES_FOR} ('discriminator' needs adv_weight > 0: the images feed the discriminator only)"),
    "distill_loss": (lambda v, c: v in DISTILL_LOSSES and (v == "regression" or c.distill_weight > 0),
                     f"one of {DISTILL_LOSSES} ('dmd' needs distill_weight > 0)"),
    "r1_gamma": (lambda v, c: _finite(v) and v >= 0, "a float >= 0 (paper: 1e-5)"),
    "teacher_cfg_scale": (lambda v, c: _finite(v) and 0 <= v <= 50, "a float in [0, 50] (1.0 = no CFG)"),
    "teacher_timestep_range": (_t_range, "(lo, hi) ints with 0 <= lo <= hi <= num_train_timesteps-1"),
    "disc_timestep_range": (_t_range, "(lo, hi) ints with 0 <= lo <= hi <= num_train_timesteps-1"),
    "discriminator": (lambda v, c: v in DISCRIMINATOR_TYPES, f"one of {DISCRIMINATOR_TYPES}"),
    "disc_features": (lambda v, c: v in DISC_FEATURES, f"one of {DISC_FEATURES}"),
    "disc_spectral_norm": (lambda v, c: isinstance(v, bool), "True or False"),
    "disc_norm": (lambda v, c: v in DISC_NORMS, f"one of {DISC_NORMS}"),
    "disc_updates": (lambda v, c: _int(v) and 1 <= v <= 16, "an int in [1, 16] (1 = the paper's alternation)"),
    "disc_head_channels": (lambda v, c: _int(v) and 0 <= v <= 4096, "an int in [0, 4096] (0 = feature width)"),
    "lr_lora": (lambda v, c: _finite(v) and 0 < v <= 1, "a float in (0, 1] (default 1e-4)"),
    "lr_full": (lambda v, c: _finite(v) and 0 < v <= 1, "a float in (0, 1] (default 1e-6)"),
    "lr_disc": (lambda v, c: _finite(v) and 0 < v <= 1, "a float in (0, 1]"),
    "lr_schedule": (lambda v, c: v in LR_SCHEDULES, f"one of {LR_SCHEDULES}"),
    "lr_warmup_steps": (lambda v, c: _int(v) and v >= 0, "an int >= 0"),
    "gen_betas": (_betas, "two floats in [0, 1)"),
    "disc_betas": (_betas, "two floats in [0, 1) (default (0, 0.999))"),
    "weight_decay": (lambda v, c: _finite(v) and 0 <= v <= 1, "a float in [0, 1]"),
    "grad_clip": (lambda v, c: _finite(v) and v > 0, "a float > 0"),
    "batch_size": (lambda v, c: _int(v) and 1 <= v <= 4096, "an int in [1, 4096] (>= 4 recommended with hinge loss)"),
    "ema_decay": (lambda v, c: v is None or (_finite(v) and 0 < v < 1), "None (off) or a float in (0, 1)"),
    "seed": (lambda v, c: _int(v) and 0 <= v < 2**63, "an int in [0, 2**63)"),
    "max_steps": (lambda v, c: _int(v) and v >= 1, "an int >= 1"),
    "save_every": (lambda v, c: _int(v) and v >= 0, "an int >= 0 (0 = save only at the end)"),
    "preview_every": (lambda v, c: _int(v) and v >= 0, "an int >= 0 (0 = no previews)"),
    "max_nonfinite_steps": (lambda v, c: _int(v) and v >= 1, "an int >= 1"),
}

_missing = {f.name for f in dataclasses.fields(ADDConfig)} - set(_RULES)
assert not _missing, f"ADDConfig fields without a validation rule: {_missing}"

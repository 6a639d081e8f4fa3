"""Timestep schedules for few-step ADD sampling (pure torch + diffusers; never imports comfy).

Timesteps use the DDPM convention of SD-family models: integers in [0, 999], 999 = pure noise.
The sampler itself works in ComfyUI's sigma space: x = x0 + sigma * eps with
sigma_t = sqrt((1 - abar_t) / abar_t), alpha_t = sqrt(abar_t) = 1 / sqrt(1 + sigma_t**2).
A schedule is a strictly decreasing list of timesteps; ``sigmas_from_timesteps`` turns it into the
SIGMAS tensor ComfyUI samplers take (one sigma per step plus a final 0).

Presets (``timesteps_for``):
* ``add_trailing``  diffusers' "trailing" spacing, t_i = round(1000 - i * 1000 / n) - 1:
                    n=4 -> 999, 749, 499, 249 (ADD, arXiv 2311.17042, and SD-Turbo's training set);
                    n=2 -> 999, 499; n=1 -> 999.
* ``sdturbo_grid``  ComfyUI's SDTurboScheduler: the fixed grid 999, 899, ..., 99, first n points.
* ``custom``        a list typed by the user, e.g. "999,499".
* ``stream_t_index`` StreamDiffusion's ``t_index_list``: indices into the 50-step LCMScheduler
                    schedule (diffusers, ``set_timesteps(50, original_inference_steps=50)``),
                    e.g. [32, 45] -> 359, 99 (img2img), [0, 16, 32, 45] -> 999, 679, 359, 99.

How ``denoise`` (img2img strength, 0 < d <= 1) maps onto each preset -- it always sets where
sampling starts (t < d * 1000), like core KSampler / SDTurboScheduler:
* ``add_trailing``: the trailing spacing is laid over [0, d * 1000) instead of [0, 1000):
                    t_i = round(d * 1000 * (1 - i / n)) - 1. Always n steps; d = 0.5, n = 2 gives
                    499, 249 (still on the ADD training set).
* ``sdturbo_grid``: exactly SDTurboScheduler: start at grid index 10 - int(10 * d), take n points
                    (fewer when the grid runs out).
* ``custom`` / ``stream_t_index``: the user's timesteps are kept as typed, those with t >= d * 1000
                    are dropped (an error when none is left).
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Callable, Sequence

import torch

from .errors import ScheduleError

NUM_TRAIN_TIMESTEPS = 1000
MIN_STEPS, MAX_STEPS = 1, 4
LCM_NUM_INFERENCE_STEPS = 50  # StreamDiffusion's default num_inference_steps

PRESETS = ("add_trailing", "sdturbo_grid", "custom", "stream_t_index")




# ------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------
def check_steps(steps: int, field: str = "steps") -> int:
    """Steps must be an int in [MIN_STEPS, MAX_STEPS] (ADD is a 1-4 step method)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not MIN_STEPS <= steps <= MAX_STEPS:
        raise ScheduleError(
            f"{field}={steps!r} is outside {MIN_STEPS}-{MAX_STEPS}: ADD models are distilled for "
            f"1-4 steps. Set {field} to 1, 2, 3 or 4, or use the 'custom' preset with an explicit list."
        )
    return steps


def check_denoise(denoise: float, field: str = "denoise") -> float:
    d = float(denoise)
    if not (0.0 < d <= 1.0) or math.isnan(d):
        raise ScheduleError(f"{field}={denoise!r} must be in (0, 1]: 1 = txt2img, lower = img2img strength.")
    return d


def add_trailing_timesteps(steps: int, denoise: float = 1.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """diffusers "trailing" spacing over [0, denoise * T): 4 steps -> [999, 749, 499, 249]."""
    check_steps(steps)
    return trailing_timesteps(steps, denoise, num_train_timesteps)


def trailing_timesteps(steps: int, denoise: float = 1.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The ``add_trailing`` formula without the 1-4 step limit (any steps in 1..T), e.g. for the
    schedule a saved checkpoint recommends: 3 steps -> [999, 666, 332]."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_train_timesteps:
        raise ScheduleError(f"steps={steps!r} must be an integer from 1 to {num_train_timesteps}.")
    span = check_denoise(denoise) * num_train_timesteps
    out = [int(round(span * (1.0 - i / steps))) - 1 for i in range(steps)]
    return validate_timesteps(out, field="denoise", t_max=num_train_timesteps - 1)


def sdturbo_grid_timesteps(steps: int, denoise: float = 1.0) -> list[int]:
    """ComfyUI's SDTurboScheduler: grid 999, 899, ..., 99; start at 10 - int(10 * denoise)."""
    check_steps(steps)
    d = check_denoise(denoise)
    grid = [1000 - 100 * i - 1 for i in range(10)]  # 999 ... 99
    start = 10 - int(10 * d)
    out = grid[start:start + steps]
    if not out:
        raise ScheduleError(f"denoise={denoise} keeps no timestep of the SD-Turbo grid (999..99): use denoise >= 0.1.")
    return out


MAX_LIST = 64  # longest timestep / t_index list accepted (ADD samples in 1-4 steps)


def _shown(value, limit: int = 60) -> str:
    """A value for an error message, cut to ``limit`` characters (a pasted list can be huge)."""
    text = value if isinstance(value, str) else ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return repr(text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)")


def parse_timesteps(text: str, field: str = "custom") -> list[int]:
    """"999, 499" or "[32, 45]" -> [999, 499]; integers only, separated by commas/spaces."""
    if not isinstance(text, str) or not text.strip():
        raise ScheduleError(f"{field} is empty: type a comma-separated list of integers, e.g. \"999,499\".")
    body = text.strip().strip("[]()").strip()
    parts = [p for p in re.split(r"[,\s;]+", body) if p]
    if len(parts) > MAX_LIST:
        raise ScheduleError(f"{field}={_shown(text)} has {len(parts)} entries; ADD samples in 1-4 steps (at most "
                            f"{MAX_LIST} entries here): type a short list, e.g. \"999,499\".")
    out = []
    for p in parts:
        if not re.fullmatch(r"[+-]?\d+", p):
            raise ScheduleError(f"{field}={_shown(text)}: {p[:20]!r} is not an integer. Use a comma-separated list of integers, e.g. \"999,499\".")
        out.append(int(p))
    if not out:
        raise ScheduleError(f"{field}={_shown(text)} holds no number: type e.g. \"999,499\".")
    return out


def validate_timesteps(ts: Sequence[int], field: str = "custom", t_max: int = NUM_TRAIN_TIMESTEPS - 1) -> list[int]:
    """Non-empty, integers in [0, t_max], strictly decreasing (sampling goes from noise to data)."""
    ts = [int(t) for t in ts]
    if not ts:
        raise ScheduleError(f"{field}: the timestep list is empty; give at least one timestep, e.g. \"999\".")
    bad = [t for t in ts if not 0 <= t <= t_max]
    if bad:
        raise ScheduleError(f"{field}: timesteps {_shown(bad)} are outside the model's range 0-{t_max}; use values in 0-{t_max} (999 = pure noise).")
    for a, b in zip(ts, ts[1:]):
        if not b < a:
            raise ScheduleError(
                f"{field}: timesteps {_shown(ts)} are not strictly decreasing ({a} then {b}); list them from noisy to clean, "
                f"e.g. \"{', '.join(str(t) for t in sorted(set(ts), reverse=True))}\"."
            )
    return ts


@lru_cache(maxsize=8)
def lcm_timesteps(num_inference_steps: int = LCM_NUM_INFERENCE_STEPS, original_inference_steps: int = 50) -> tuple[int, ...]:
    """The timesteps diffusers' LCMScheduler uses (what StreamDiffusion indexes with t_index_list).

    StreamDiffusion builds ``LCMScheduler.from_config(pipe.scheduler.config)`` and calls
    ``set_timesteps(num_inference_steps)``; the SD schedulers' configs carry no
    ``original_inference_steps``, so LCMScheduler's default 50 applies. Made explicit here.
    """
    from diffusers import LCMScheduler  # lazy: importing diffusers costs seconds

    sched = LCMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS)
    sched.set_timesteps(num_inference_steps, original_inference_steps=original_inference_steps)
    return tuple(int(t) for t in sched.timesteps.tolist())


def t_index_timesteps(indices: Sequence[int], num_inference_steps: int = LCM_NUM_INFERENCE_STEPS, field: str = "custom") -> list[int]:
    """StreamDiffusion ``t_index_list`` -> timesteps, e.g. [32, 45] -> [359, 99]."""
    table = lcm_timesteps(num_inference_steps)
    bad = [i for i in indices if not 0 <= int(i) < len(table)]
    if bad:
        raise ScheduleError(
            f"{field}: t_index values {bad} are outside 0-{len(table) - 1} (indices into the {num_inference_steps}-step "
            f"LCM schedule); StreamDiffusion uses e.g. \"32,45\" (img2img) or \"0,16,32,45\" (txt2img)."
        )
    for a, b in zip(indices, indices[1:]):
        if not int(b) > int(a):
            raise ScheduleError(f"{field}: t_index_list {list(indices)} must be strictly increasing (noisy to clean), e.g. \"32,45\".")
    return [table[int(i)] for i in indices]


def keep_below_denoise(ts: Sequence[int], denoise: float, field: str = "custom") -> list[int]:
    """Drop timesteps with t >= denoise * 1000 (img2img starts below them)."""
    d = check_denoise(denoise)
    limit = round(d * NUM_TRAIN_TIMESTEPS, 6)
    kept = [t for t in ts if t + 1 <= limit]
    if not kept:
        raise ScheduleError(
            f"denoise={denoise} keeps none of the {field} timesteps {list(ts)} (only t < {limit:g} are kept): "
            f"raise denoise, or add a lower timestep to the list."
        )
    return kept


def timesteps_for(preset: str, steps: int = 1, denoise: float = 1.0, custom: str = "", t_max: int = NUM_TRAIN_TIMESTEPS - 1) -> list[int]:
    """The timestep list of a preset (see the module docstring for how denoise applies)."""
    builders: dict[str, Callable[[], list[int]]] = {
        "add_trailing": lambda: add_trailing_timesteps(steps, denoise),
        "sdturbo_grid": lambda: sdturbo_grid_timesteps(steps, denoise),
        "custom": lambda: keep_below_denoise(validate_timesteps(parse_timesteps(custom, "custom"), "custom", t_max), denoise),
        "stream_t_index": lambda: keep_below_denoise(t_index_timesteps(parse_timesteps(custom, "custom"), field="custom"), denoise, "t_index"),
    }
    if preset not in builders:
        raise ScheduleError(f"schedule={preset!r} is unknown; choose one of {', '.join(PRESETS)}.")
    return validate_timesteps(builders[preset](), field=preset, t_max=t_max)


# ------------------------------------------------------------------------------------------
# sigma space
# ------------------------------------------------------------------------------------------
def sigmas_from_timesteps(ts: Sequence[int], sigma_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """[t_0 > ... > t_{n-1}] -> sigmas (n + 1,) float32: sigma_fn(t_i), then a final 0.

    ``sigma_fn`` is the model's own ``model_sampling.sigma`` (so eps, v-prediction and every
    family's noise schedule are respected) or ``sigma_from_table`` in pure-torch code.
    """
    s = sigma_fn(torch.tensor(list(ts), dtype=torch.float32)).float().cpu()
    return torch.cat([s, s.new_zeros([1])])


def sd_sigma_table(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """SD's "scaled_linear" DDPM schedule as sigmas (T,): sqrt((1 - abar) / abar)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, dim=0)
    return ((1.0 - abar) / abar).sqrt().float()


def sigma_from_table(t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """sigma at (possibly fractional) timesteps t: log-linear interpolation in a sigma table."""
    t = t.float().clamp(0, len(table) - 1)
    lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
    log_t = table.float().log()
    return ((1 - w) * log_t[lo] + w * log_t[hi]).exp()


def alpha_sigma_vp(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI sigma -> (alpha, sigma_vp) of x_t = alpha * x0 + sigma_vp * eps: alpha = 1/sqrt(1+s^2)."""
    alpha = (1.0 + sigma**2).rsqrt()
    return alpha, sigma * alpha

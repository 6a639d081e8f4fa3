"""Image sizes, one helper per job.

- :func:`check_size`: a width or height typed by a user (a widget, a config key, a benchmark
  option) must be a multiple of 8 (the latent factor) within a range; the refusal says the
  nearest size that works.

Pure Python: no ComfyUI import.
"""
from __future__ import annotations

import math
from typing import Any

from .errors import ADDError


def check_size(value: Any, name: str, lo: int = 64, hi: int = 4096, multiple: int = 8, hint: str = "",
               where: str = "") -> int:
    """``value`` as an int when it is a whole number, a multiple of ``multiple`` from ``lo`` to ``hi``;
    ADDError otherwise, naming ``name`` (``where`` starts the message, ``hint`` follows the range)
    and, for a number off the grid or out of range, the nearest size that works."""
    extra = f" ({hint})" if hint else ""
    x = None
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        if isinstance(value, int) or (math.isfinite(value) and float(value).is_integer()):
            x = int(value)
    if x is None:
        raise ADDError(f"{where}{name} is {value!r}: type a whole number from {lo:g} to {hi:g}{extra}.")
    if x % multiple or not lo <= x <= hi:
        near = int(min(hi, max(lo, round(x / multiple) * multiple)))
        raise ADDError(f"{where}{name} {value!r} must be a multiple of {multiple} from {lo:g} to {hi:g}{extra}; "
                       f"try {near}.")
    return x

"""Image sizes and pictures of IMAGE batches, one helper per job.

- :func:`check_size`: a width or height typed by a user (a widget, a config key, a benchmark
  option) must be a multiple of 8 (the latent factor) within a range; the refusal says the
  nearest size that works.
- :func:`image_grid` / :func:`png_bytes` / :func:`to_image`: images (H, W, 3) in [0, 1] laid out
  in a grid, optionally with a header line above each column (the training previews, ADD
  Compare's grid, the headless trainer's sample sheets).

Pure Python + torch (+ Pillow, imported when a picture is made): no ComfyUI import.
"""
from __future__ import annotations

import io
import math
from typing import Any, Sequence

import torch

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


def _uint8(image: torch.Tensor):
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def image_grid(images: torch.Tensor | Sequence[torch.Tensor], columns: int | None = None,
               headers: Sequence[str] = (), header_height: int = 28,
               background: tuple[int, int, int] = (0, 0, 0)):
    """Images (N, H, W, 3) in [0, 1] (a batch or a list of equal-size images) as one RGB PIL image:
    ``columns`` per row (None: all in one row), row by row; empty cells show ``background``.
    ``headers``: a text line above each column, in a band of ``header_height`` pixels."""
    from PIL import Image, ImageDraw

    n = len(images)
    if n == 0:
        raise ValueError("image_grid: no images")
    h, w = images[0].shape[:2]
    cols = n if columns is None else max(1, min(int(columns), n))
    if headers:
        cols = max(cols, len(headers))
    rows = (n + cols - 1) // cols
    pad = header_height if headers else 0
    canvas = Image.new("RGB", (cols * w, pad + rows * h), tuple(background))
    if headers:
        draw = ImageDraw.Draw(canvas)
        for j, text in enumerate(headers):
            draw.text((j * w + 4, 4), text, fill=(235, 235, 235))
    for i in range(n):
        canvas.paste(Image.fromarray(_uint8(images[i])), ((i % cols) * w, pad + (i // cols) * h))
    return canvas


def to_image(picture) -> torch.Tensor:
    """An RGB PIL image as an IMAGE batch (1, H, W, 3) float32 in [0, 1]."""
    out = torch.frombuffer(bytearray(picture.convert("RGB").tobytes()), dtype=torch.uint8)
    return (out.reshape(picture.height, picture.width, 3).float() / 255.0)[None]


def png_bytes(images: torch.Tensor | Sequence[torch.Tensor], columns: int | None = None, **grid) -> bytes:
    """PNG file bytes of :func:`image_grid` (default: the images side by side in one row)."""
    buf = io.BytesIO()
    image_grid(images, columns, **grid).save(buf, format="PNG")
    return buf.getvalue()

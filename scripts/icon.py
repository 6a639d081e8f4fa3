"""Draw the plugin's icon (docs/icon.png, the Comfy Registry's [tool.comfy] Icon).

"ADD" above one step from noise (a grid of random dots) to an image (a sun): what the plugin does.
Deterministic; only Pillow and its bundled font. Run: ``python -m scripts.icon``.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
ICON = ROOT / "docs" / "icon.png"
SIZE = 400  # the registry shows icons up to 800 x 400; a square fits its cards


def draw(size: int = SIZE) -> Image.Image:
    s = size / 400
    top, bottom = (30, 27, 75), (67, 56, 202)
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    grad = Image.new("RGB", (size, size))
    gd = ImageDraw.Draw(grad)
    for y in range(size):
        t = y / (size - 1)
        gd.line([(0, y), (size, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rounded_rectangle([0, 0, size - 1, size - 1], radius=round(64 * s), fill=255)
    img.paste(grad, (0, 0), mask)
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=round(150 * s))
    d.text((size / 2, 150 * s), "ADD", font=font, fill=(255, 255, 255), anchor="mm")
    rng = random.Random(0)
    cell = 18 * s
    x0, y0 = 52 * s, 252 * s
    for i in range(5):
        for j in range(5):
            v = rng.randint(60, 255)
            cx, cy = x0 + (j + 0.5) * cell, y0 + (i + 0.5) * cell
            r = cell * 0.38
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(v, v, v))
    ay = y0 + 2.5 * cell
    d.line([(160 * s, ay), (236 * s, ay)], fill=(255, 255, 255), width=round(10 * s))
    d.polygon([(232 * s, ay - 20 * s), (262 * s, ay), (232 * s, ay + 20 * s)], fill=(255, 255, 255))
    cx, r = 310 * s, 40 * s
    d.ellipse([cx - r, ay - r, cx + r, ay + r], fill=(251, 191, 36))
    return img


def main() -> None:
    ICON.parent.mkdir(parents=True, exist_ok=True)
    tmp = ICON.with_name(ICON.name + ".partial")
    draw().save(tmp, format="PNG", optimize=True)
    os.replace(tmp, ICON)
    print(ICON)


if __name__ == "__main__":
    main()

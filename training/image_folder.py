"""Reading a folder of images: ADD Train's ``image_folder``, ADD Load Frames and the headless trainer.

One extension list, one order (natural: ``frame_2`` before ``frame_10``), one rule for paths:

- :func:`input_subfolder` turns a typed folder name into a folder inside ComfyUI's input folder,
  through core/files.py's one "path stays inside that folder" check (:func:`~..core.files.resolve_inside`:
  '..', absolute paths, drive letters, NUL are refused).
- :func:`select_frames` lists a folder's images and picks start / every n-th / at most n of them.
- Symbolic links inside the folder, to folders and to files alike, are followed wherever they
  point, as ComfyUI's own loaders do: whoever can place a link there already owns the machine's
  files, and a link is the usual way to use a dataset kept on another disk. A link whose target
  is missing is an error naming it (never a silently skipped image).
- Every error is an :class:`~..core.errors.ADDError` naming the input and the file: unreadable images,
  images too large to open safely (Pillow's decompression-bomb limit), captions that are not
  UTF-8, and batches that would not fit in memory (estimated from the image headers before any
  pixel is decoded).

Pure Python + Pillow + torch: no ComfyUI import (see ARCHITECTURE.md).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from typing import Optional, Sequence

import torch

from ..core import files
from ..core.errors import ADDError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_FLOAT_RGB = 3 * 4  # bytes per pixel of an IMAGE batch (float32 RGB)
# What Pillow raises for a file it cannot decode; DecompressionBombError is handled on its own.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


def natural_key(name: str) -> list:
    """Sort key: ``frame_2`` before ``frame_10``, case-insensitive."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


# ADD Train's dinov2_file check (nodes/train.py) still calls it by this name


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def input_subfolder(base: str, name, what: str, fix: str) -> str:
    """The folder ``base/<name>`` for a name typed relative to ``base`` (ComfyUI's input folder;
    links inside it followed); ADDError naming ``what`` otherwise. ``fix`` says what to do when it does not exist."""
    base = os.path.abspath(base)
    path = files.resolve_inside(base, name, what, where=f"ComfyUI's input/ folder ({base})", kind="folder",
                                example="my_dataset")
    shown = repr(str(name).strip()[:120])
    if os.path.islink(path) and not os.path.exists(path):
        raise ADDError(f"{what} {shown} is a symbolic link to {os.readlink(path)}, which does not exist: fix or remove the "
                       "link, or type another folder.")
    if not os.path.isdir(path):
        try:
            have = sorted(d for d in os.listdir(base) if not d.startswith(".") and os.path.isdir(os.path.join(base, d)))
        except OSError:
            have = []
        listed = ", ".join(have[:12]) + (", ..." if len(have) > 12 else "") if have else "(no sub-folders yet)"
        raise ADDError(f"{what} {shown} does not exist: there is no such folder in ComfyUI's input folder ({base}). "
                       f"{fix} Folders there now: {listed}.")
    return path


def list_images(folder: str, label: str) -> list[str]:
    """Names of the image files in ``folder`` (hidden ones skipped) in natural order; ``label``
    names the input in messages. Links are followed; a link whose target is missing is an error."""
    try:
        entries = os.listdir(folder)
    except OSError as exc:
        raise ADDError(f"{label}: the folder {folder} cannot be listed ({exc.strerror or exc}); check its "
                       "permissions.") from None
    names = []
    for n in entries:
        if n.startswith(".") or not n.lower().endswith(IMAGE_EXTS):
            continue
        path = os.path.join(folder, n)
        if os.path.islink(path) and not os.path.exists(path):
            raise ADDError(f"{label}: {n} is a symbolic link to {os.readlink(path)}, which does not exist: fix the link "
                           "or remove it.")
        if os.path.isfile(path):
            names.append(n)
    return sorted(names, key=natural_key)


def select_frames(folder: str, name: str, start: int = 0, every_nth: int = 1, max_frames: int = 0) -> list[str]:
    """The image names of ``folder`` in natural order from index ``start``, every ``every_nth``-th, at most
    ``max_frames`` (0 = all); ADDError when none. ``name`` is the folder as typed (messages: ``folder <name>``)."""
    names = list_images(folder, f"folder {name!r}")
    if not names:
        raise ADDError(f"folder {name!r} ({folder}) holds no image files ({', '.join(IMAGE_EXTS)}): put the frames "
                       "there, named so that they sort in order (frame_0001.png, frame_0002.png, ...).")
    chosen = names[int(start)::int(every_nth)]
    if max_frames:
        chosen = chosen[:int(max_frames)]
    if not chosen:
        raise ADDError(f"start={start} is past the last of the {len(names)} frames in {name!r}: lower start.")
    return chosen


def files_signature(folder: str, names: Sequence[str]) -> str:
    """A hash of the files' names, sizes and modification times (changes when any of them changes)."""
    h = hashlib.sha256()
    for n in names:
        st = os.stat(os.path.join(folder, n))
        h.update(f"{n}|{st.st_size}|{st.st_mtime_ns};".encode())
    return h.hexdigest()


def _bomb(label: str, name: str, exc: Exception) -> ADDError:
    from PIL import Image

    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return ADDError(f"{label}: {name} is too large to open safely ({exc}). Pillow refuses images of more than "
                    f"{limit / 1e6:.0f} megapixels, because a small file that decodes to such an image (a "
                    "'decompression bomb') can exhaust the memory. Shrink the image, or remove it from the folder.")


def image_size(path: str, label: str) -> tuple[int, int]:
    """(width, height) of an image as it will be shown (EXIF rotation applied), from its header only."""
    from PIL import Image

    name = os.path.basename(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Image.DecompressionBombError as exc:
        raise _bomb(label, name, exc) from None
    except _DECODE_ERRORS as exc:
        raise ADDError(f"{label}: {name} cannot be read as an image ({exc}); replace or remove that file.") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def read_rgb(path: str, label: str):
    """The image at ``path`` as an RGB PIL image (EXIF rotation applied); ADDError naming it otherwise."""
    from PIL import Image, ImageOps

    name = os.path.basename(path)
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except Image.DecompressionBombError as exc:
        raise _bomb(label, name, exc) from None
    except _DECODE_ERRORS as exc:
        raise ADDError(f"{label}: {name} cannot be read as an image ({exc}); replace or remove that file.") from None


def read_caption(path: str, label: str) -> str:
    """The text of a caption file (UTF-8, a BOM allowed), stripped; ADDError naming it otherwise."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ADDError(f"{label}: the caption {os.path.basename(path)} is not UTF-8 text (byte 0x{raw[exc.start]:02x} "
                       f"on line {line}; saved in another encoding such as Windows-1252 or Latin-1?). Save it as UTF-8 "
                       "(most editors: 'Save with encoding' -> UTF-8), then queue again.") from None


def batch_bytes(sizes: Sequence[tuple[int, int]], size: Optional[tuple[int, int]]) -> int:
    """Peak memory to load images of ``sizes`` into one float32 batch of ``size`` (or their own size):
    the batch, plus the largest image decoded (RGB) and its resized copy."""
    w, h = size if size is not None else sizes[0]
    largest = max(sw * sh for sw, sh in sizes)
    return len(sizes) * w * h * _FLOAT_RGB + largest * 3 * 2 + w * h * 3


def load_images(folder: str, names: Sequence[str], label: str, size: Optional[tuple[int, int]] = None,
                available: Optional[int] = None, fix_memory: str = "") -> torch.Tensor:
    """The images as one batch (N, H, W, 3) float32 in [0, 1].

    ``size`` = (width, height): each image is resized to cover it and centre-cropped; None: all
    images must share one size. ``available``: bytes of memory free; a batch estimated larger is
    refused (``fix_memory`` says what to lower) before any pixel is decoded.
    """
    import numpy as np
    from PIL import Image, ImageOps

    sizes = [image_size(os.path.join(folder, n), label) for n in names]
    if size is None:
        for n, s in zip(names, sizes):
            if s != sizes[0]:
                raise ADDError(f"{label}: {n} is {s[0]}x{s[1]} but {names[0]} is {sizes[0][0]}x{sizes[0][1]}: frames of "
                               "a batch must share one size. Set width and height to resize them all.")
    w, h = size if size is not None else sizes[0]
    need = batch_bytes(sizes, size)
    if available is not None and need > available:
        raise ADDError(f"{label}: {len(names)} images at {w}x{h} need about {gib(need)} of memory as one batch "
                       f"({len(names)} x {w} x {h} x 3 values x 4 bytes), but about {gib(available)} is free. "
                       f"{fix_memory}".rstrip())
    out = torch.empty((len(names), h, w, 3), dtype=torch.float32)
    for i, n in enumerate(names):
        img = read_rgb(os.path.join(folder, n), label)
        if size is not None:
            img = ImageOps.fit(img, (w, h), method=Image.Resampling.LANCZOS)
        out[i] = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    return out


def read_captioned_folder(folder: str, width: int, height: int, label: str,
                          available: Optional[int] = None) -> tuple[torch.Tensor, list[str]]:
    """Images of ``folder`` resized and centre-cropped to width x height -> (N, H, W, 3), and their
    captions (the same-name .txt file's text; '' where there is none)."""
    names = list_images(folder, label)
    if not names:
        raise ADDError(f"{label} ({folder}) holds no images ({', '.join(IMAGE_EXTS)}); add some, or clear the input.")
    images = load_images(folder, names, label, (int(width), int(height)), available,
                         "Lower width/height, or train on fewer images.")
    captions = []
    for n in names:
        cap = os.path.join(folder, os.path.splitext(n)[0] + ".txt")
        captions.append(read_caption(cap, label) if os.path.isfile(cap) else "")
    return images, captions


def place_example(src: str, dst: str) -> bool:
    """Copy the example folder ``src`` (shipped with the plugin) to ``dst`` if nothing is there.

    Never overwrites: when ``dst`` exists in any form (a folder, even an empty one, a file, a
    link) nothing is written. The copy is made under a temporary hidden name beside ``dst`` and
    renamed into place, so the folder appears whole or not at all. Returns whether it was placed.
    """
    if os.path.lexists(dst) or not os.path.isdir(src):
        return False
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".add-{os.getpid()}-{uuid.uuid4().hex[:12]}.partial")
    try:
        shutil.copytree(src, tmp)
        try:
            os.rename(tmp, dst)  # fails if dst appeared meanwhile (a non-empty folder or a file)
        except OSError:
            if os.path.lexists(dst):
                return False
            raise
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp)
    return True

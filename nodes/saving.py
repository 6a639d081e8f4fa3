"""Where the plugin's saving nodes write, and under which name.

ComfyUI's own savers (SaveImage, CheckpointSave, ...) take a ``filename_prefix`` and write
``<prefix>_00001_.<ext>``, the next free number on every run, so a workflow queued again never
fails on an existing file and never replaces one. The plugin's savers do exactly the same, through
ComfyUI's own ``folder_paths.get_save_image_path`` (the same numbering and sub-folders). ``exact_name_overwrite`` writes ``<prefix>.safetensors`` instead and
replaces an existing file of that name, atomically, for those who want one stable name.

Old workflows kept working: the savers' widgets were ``filename`` (STRING) and ``overwrite``
(BOOLEAN) in the same places, and the front end restores widget values by position, so an old
``filename`` becomes the prefix and an old ``overwrite`` the exact-name switch (on: the same file
replaced, as before; off: numbered files instead of an error on the second run).
"""
from __future__ import annotations

import itertools
import os
from typing import Mapping

import torch

import folder_paths
from comfy_api.latest import io

from ..core import files
from ..core.errors import ADDError

EXT = ".safetensors"


def prefix_input(default: str, where: str) -> io.String.Input:
    """The ``filename_prefix`` widget of a saver writing into ``where`` (for the tooltip)."""
    return io.String.Input("filename_prefix", default=default, tooltip=(
        f"Name of the file in {where}, without '.safetensors'; sub-folders with '/'. Saved as "
        "<prefix>_00001_.safetensors, then _00002_ and so on (the next free number, as ComfyUI's own savers "
        "do), so queueing again never fails and never replaces a file."))


def exact_input() -> io.Boolean.Input:
    """The ``exact_name_overwrite`` widget."""
    return io.Boolean.Input("exact_name_overwrite", default=False, tooltip=(
        "Off (default): numbered files, nothing is ever replaced. On: write exactly <prefix>.safetensors and "
        "replace an existing file of that name (atomically: until the new file is complete the old one stays)."))


def check_prefix(prefix, folder: str, exact: bool = False) -> str:
    """The typed prefix, checked like every file name the plugin writes (no '..', no absolute path,
    nothing a file system refuses, short enough for the file name it becomes); '.safetensors' removed."""
    return files.check_name(prefix, "filename_prefix", EXT, subfolders=True,
                            suffixes=() if exact else ("_00001_" + EXT,), folder=folder, example="my_turbo_model")


def _numbered(folder: str, filename: str, counter: int):
    for n in itertools.count(counter):
        yield os.path.join(folder, f"{filename}_{n:05}_{EXT}")


def save_safetensors(folder: str, prefix, exact: bool, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> str:
    """Write ``tensors`` under ``folder`` as ``prefix`` says; returns the path written.

    ``exact`` False: ``<prefix>_<n>_.safetensors`` with n the next free number (ComfyUI's
    counter; a name taken meanwhile by another save is skipped, never replaced). True:
    ``<prefix>.safetensors``, replacing an existing file atomically.
    """
    root = os.path.abspath(folder)
    text = check_prefix(prefix, root, exact)
    sub = os.path.dirname(os.path.normpath(text))
    if sub:  # before ComfyUI's own check, which from 0.33 resolves links too but raises a bare Exception
        files.resolve_inside(root, os.path.join(sub, "name"), "filename_prefix", example="my_turbo_model",
                             contain_links=True)
    _out_dir, filename, counter, subfolder, _ = folder_paths.get_save_image_path(text, root)
    if not filename:
        raise ADDError(f"filename_prefix {str(prefix)[:80]!r} has no file name after its variables are "
                             "filled in: type a name, e.g. my_turbo_model.")
    # A symlinked sub-folder must not lead out of the folder (ComfyUI's own check is lexical).
    real_dir = os.path.dirname(files.resolve_inside(root, os.path.join(subfolder, filename), "filename_prefix",
                                                    example="my_turbo_model", contain_links=True))
    write = lambda f: files.write_safetensors_to(f, tensors, metadata)  # noqa: E731
    if exact:
        return files.atomic_write(os.path.join(real_dir, filename + EXT), write, overwrite=True)
    return files.atomic_write_first_free(_numbered(real_dir, filename, counter), write)

"""Scratch folders that give their disk back.

The tiny models keep the real layouts, so a saved checkpoint is ~360 MB (ComfyUI writes the whole
CLIP-L it builds). A suite that kept every file it wrote until the end needed ~11 GB of free disk;
these helpers keep what is in use at once to about one module's files.
"""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def model_folder(tmp_path_factory, kind: str, name: str, *, first: bool = True):
    """A fresh folder registered in ComfyUI's ``kind`` paths (first, so saves land there), taken
    out of the paths and deleted when the block ends."""
    import folder_paths

    d = tmp_path_factory.mktemp(name)
    folder_paths.add_model_folder_path(kind, str(d), is_default=first)
    folder_paths.filename_list_cache.pop(kind, None)
    try:
        yield d
    finally:
        folder_paths.folder_names_and_paths[kind][0].remove(str(d))
        folder_paths.filename_list_cache.pop(kind, None)
        shutil.rmtree(d)


def new_large_files(root: Path, since: float, min_bytes: int) -> list[Path]:
    """Files under any ``output`` folder below ``root`` written at or after ``since`` and at least
    ``min_bytes`` long."""
    found = []
    # pytest also links each folder as '<name>current': walk the real ones only
    for out in (d / "output" for d in root.iterdir() if d.is_dir() and not d.is_symlink()):
        if not out.is_dir():
            continue
        for p in out.rglob("*"):
            if p.is_file() and not p.is_symlink():
                st = p.stat()
                if st.st_mtime >= since and st.st_size >= min_bytes:
                    found.append(p)
    return found

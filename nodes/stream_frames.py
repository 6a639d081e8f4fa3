"""ADD Load Frames' folder handling: a typed folder in ComfyUI's input folder -> selected frames -> a batch.

The reading itself (one extension list, natural order, links, memory check) is
training/image_folder.py; this module adds what needs ComfyUI: the input folder, the shipped
example clip, and the free memory as ComfyUI's model management sees it.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

import folder_paths

from ..training import image_folder as image_files

# Example clips shipped with the plugin (input/<name>/ in the repository), placed into ComfyUI's input
# folder the first time a workflow reads that folder and it is missing there (never overwriting).
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "input")
EXAMPLE_FOLDERS = ("add_stream_frames",)


def frame_files(folder: str, start: int = 0, every_nth: int = 1, max_frames: int = 0,
                place_examples: bool = False) -> tuple[str, list[str]]:
    """(folder path, selected image names in natural order) of a folder in ComfyUI's input dir.

    ``place_examples``: first copy a shipped example clip into place if ``folder`` names one and
    the input folder has nothing of that name.
    """
    base = folder_paths.get_input_directory()
    name = str(folder).strip()
    if place_examples and name in EXAMPLE_FOLDERS:
        image_files.place_example(os.path.join(EXAMPLES, name), os.path.join(base, name))
    root = image_files.input_subfolder(base, folder, "folder", "Put the frames there, or type one of the folders "
                                       "below.")
    return root, image_files.select_frames(root, name, start, every_nth, max_frames)


def load_frames(root: str, names: list[str], width: int = 0, height: int = 0, label: str = "folder",
                available: Optional[int] = None) -> torch.Tensor:
    """The images as an IMAGE batch (F, H, W, 3) in [0, 1]; resized (cover + centre crop) when width/height > 0.
    ``available``: bytes free; a batch estimated larger is refused before any frame is decoded."""
    size = (int(width), int(height)) if width and height else None
    return image_files.load_images(root, names, label, size, available,
                                   "Lower width/height or max_frames, or raise every_nth.")

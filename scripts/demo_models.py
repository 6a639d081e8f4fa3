"""Stand-ins for the model files the shipped workflows name, when the real ones are absent.

Every file a workflow in workflows/ names (``sd_turbo.safetensors``, ``taesd_decoder.safetensors``,
``lcm-lora-sdv1-5.safetensors``, ``example.png``, ...) that is not in the real model folders gets a
link to a tiny random-weight model of the same kind, in a separate placeholder folder that ComfyUI
reads through an extra-model-paths file. The real folders are never written to, so a real file put
there later simply wins (and its placeholder is dropped on the next run).

Images made from placeholders are noise: ``prepare`` returns what it stood in for, so the caller
can say so plainly.
"""
from __future__ import annotations

import os
from pathlib import Path

from scripts.tiny_models import build_all
from scripts.workflow_api import load, referenced_files

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp")


def kind_of(file_name: str) -> tuple[str, str]:
    """(ComfyUI model folder, tiny model name) that stands in for ``file_name``.

    Rules, by name: TAESD-family files → vae_approx (encoder/decoder by name); LoRA files
    ("lora" in the name) → loras, the LCM-shaped one for LCM names; images → input/;
    anything else → checkpoints (the tiny SD1.5 checkpoint).
    """
    n = file_name.lower()
    if n.endswith(IMAGE_EXT):
        return "input", ""
    if "taesd" in n or "taef" in n:
        part = "encoder" if "encoder" in n else "decoder"
        return "vae_approx", f"taesd_{part}"
    if "lora" in n:
        return "loras", "tiny_lcm_lora_sd15" if "lcm" in n else "tiny_sd15_kohya"
    return "checkpoints", "tiny_sd15"


def needed_files(workflow_dir: Path = WORKFLOWS, extra: tuple[Path, ...] = ()) -> dict[str, tuple[str, str]]:
    """{file name: (folder, tiny name)} over every shipped workflow (and ``extra`` ones)."""
    out = {}
    for wf in sorted(Path(workflow_dir).glob("*.json")) + [Path(p) for p in extra]:
        for _node, name in referenced_files(load(wf)):
            out[name] = kind_of(name)
            if out[name][0] == "vae_approx" and "_decoder" in name:
                # TinyVAE loaders pair a decoder with the same-named encoder (img2img encodes).
                partner = name.replace("_decoder", "_encoder")
                out.setdefault(partner, kind_of(partner))
    return out


def frame_folders(workflow_dir: Path = WORKFLOWS, extra: tuple[Path, ...] = ()) -> list[str]:
    """Input folders the workflows' ADD Load Frames nodes read (their first widget)."""
    out = []
    for wf in sorted(Path(workflow_dir).glob("*.json")) + [Path(p) for p in extra]:
        for node in load(wf).get("nodes", []):
            vals = node.get("widgets_values") or []
            if node.get("type") == "ADDLoadFrames" and vals and isinstance(vals[0], str) and vals[0] not in out:
                out.append(vals[0])
    return out


def example_frames(folder: Path, count: int = 8, size: int = 256) -> None:
    """A short generated clip (a disc moving over a gradient), frame_0001.png ..., written atomically.

    The plugin's shipped example clip input/add_stream_frames/ was made with the defaults; ADD Load
    Frames puts it into ComfyUI's input folder on first use (nodes/stream_frames.py)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(count):
        cx, cy = 0.3 + 0.4 * i / max(count - 1, 1), 0.5
        disc = ((x - cx) ** 2 + (y - cy) ** 2 < 0.04).astype(np.float32)
        rgb = np.stack([x * (1 - disc) + disc, y * (1 - disc) + 0.2 * disc, (x + y) / 2 * (1 - disc)], axis=-1)
        path = folder / f"frame_{i + 1:04d}.png"
        tmp = path.with_name(path.name + ".partial.png")
        Image.fromarray((rgb * 255).astype(np.uint8)).save(tmp)
        os.replace(tmp, path)


def _example_image(path: Path, size: int = 512) -> None:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] * (512 / size)
    rgb = np.stack([x / 2, y / 2, (x + y) / 4], axis=-1).astype(np.uint8)
    tmp = path.with_name(path.name + ".partial.png")
    Image.fromarray(rgb).save(tmp)
    os.replace(tmp, path)


def prepare(real_models: list[Path], placeholder_root: Path, input_dir: Path, workflow_dir: Path = WORKFLOWS,
            extra: tuple[Path, ...] = (), image_size: int = 512) -> list[str]:
    """Link stand-ins for the files no real model folder has; returns the names stood in for.

    ``real_models``: model roots to look in first (each with checkpoints/, loras/, ...).
    ``placeholder_root``: where the links go (one sub-folder per model folder).
    ``input_dir``: ComfyUI's input folder (example images are generated there if missing; the
    frame folders of ADD Load Frames are not: the node places the plugin's shipped example clip).
    ``image_size``: the side of those generated images (the tests use small ones: CPU time).
    """
    tiny = None
    stood_in = []
    for name, (folder, tiny_name) in needed_files(workflow_dir, extra).items():
        if folder == "input":
            dst = Path(input_dir) / name
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                _example_image(dst, image_size)
            continue
        link = placeholder_root / folder / name
        if any((Path(r) / folder / name).exists() for r in real_models):
            if link.is_symlink():
                link.unlink()
            continue
        if tiny is None:
            tiny = build_all()
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and Path(os.readlink(link)) != tiny[tiny_name]:
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(tiny[tiny_name])
        stood_in.append(f"{folder}/{name}")
    return stood_in


def extra_paths_yaml(placeholder_root: Path, path: Path) -> Path:
    """Write an extra_model_paths file that adds the placeholder folders (after the real ones)."""
    folders = sorted(p.name for p in placeholder_root.iterdir() if p.is_dir()) if placeholder_root.is_dir() else []
    lines = ["comfyui_add_placeholders:", f"    base_path: {placeholder_root}"]
    lines += [f"    {f}: {f}/" for f in folders]
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path

"""Resumable ADD checkpoints: safetensors + JSON, never pickle, written atomically.

Layout under a root directory::

    root/step_00000500/state.add-ckpt      all tensors (student, heads, optimisers, EMA, RNG), in
                                           safetensors format; the extension is not one ComfyUI
                                           lists, so a state kept beside a LoRA never shows up as one
    root/step_00000500/meta.json           scalars: step, counters, config, optimiser groups, version,
                                           data_streams (how the per-step data streams continue)
    root/latest.json                       {"checkpoint": "step_00000500", "step": 500}

A checkpoint directory is written under a temporary name, every file fsync'ed, then renamed into
place; ``latest.json`` is replaced last (write temp, fsync, os.replace). A crash at any point
leaves the previous checkpoint and manifest intact; leftover temporaries are ignored and removed by
the next save. Resuming never trusts ``latest.json`` alone: when it is missing, unreadable or names a
folder that is gone or broken, :func:`find_checkpoint` takes the newest whole ``step_*`` folder and says
which files it skipped; pruning only ever removes checkpoints older than the one just written. Python's ``random`` and numpy are not used by the training core, so only torch RNG
state is stored: the trainer's generator, the CPU default generator and CUDA generators if present.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from ..core.errors import ADDError
from ..core.files import (atomic_write_bytes, atomic_write_json, read_safetensors, safetensors_header,
                    write_safetensors_to)
from .config import ADDConfig

__all__ = ["atomic_write_bytes", "atomic_write_json", "save_checkpoint", "load_checkpoint", "read_meta",
           "resolve_checkpoint", "find_checkpoint", "checkpoint_problem", "list_checkpoints"]

FORMAT_VERSION = 1
STATE_FILE = "state.add-ckpt"  # safetensors bytes; see the module docstring for the name
# Fields that may differ between the saved run and the resuming one (run control only).
_RESUMABLE_CHANGES = {"max_steps", "save_every", "preview_every", "max_nonfinite_steps"}


def plugin_version() -> str:
    """Version from the repository's pyproject.toml, or 'unknown' when it has none."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.MULTILINE)
        if match:
            return match.group(1)
    return "unknown"


# --------------------------------------------------------------------------------------------
# optimiser state <-> flat tensors + JSON
# --------------------------------------------------------------------------------------------
def _flatten_optimizer(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.state.{idx}.{key}"] = value.detach().clone().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    head = prefix + ".state."
    for name, value in tensors.items():
        if name.startswith(head):
            idx, key = name[len(head):].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


# --------------------------------------------------------------------------------------------
# atomic file helpers
# --------------------------------------------------------------------------------------------
def _fsync_path(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Separate function so tests can simulate a writer that fails half-way."""
    with open(path, "xb") as f:
        write_safetensors_to(f, tensors, metadata)
        f.flush()
        os.fsync(f.fileno())


def _write_json(obj: Any, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------
def _collect(trainer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    for k, v in trainer.models.student.trainable_state_dict().items():
        tensors[f"student.{k}"] = v.clone().contiguous().cpu()
    disc = trainer.models.discriminator
    if disc is not None:
        for k, v in disc.heads.state_dict().items():
            tensors[f"disc.{k}"] = v.detach().clone().contiguous().cpu()
    if trainer.models.fake_score is not None:
        for k, v in trainer.models.fake_score.trainable_state_dict().items():
            tensors[f"fake.{k}"] = v.clone().contiguous().cpu()
    meta: dict[str, Any] = {}
    t, meta["opt_g"] = _flatten_optimizer(trainer.opt_g, "opt_g")
    tensors.update(t)
    for name in ("opt_d", "opt_f"):
        if getattr(trainer, name) is not None:
            t, meta[name] = _flatten_optimizer(getattr(trainer, name), name)
            tensors.update(t)
    if trainer.ema is not None:
        for i, s in enumerate(trainer.ema.shadow):
            tensors[f"ema.{i}"] = s.clone().contiguous().cpu()
    tensors["rng.generator"] = trainer.generator.get_state().clone()
    tensors["rng.torch_cpu"] = torch.get_rng_state().clone()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s.clone()
    meta.update(format=FORMAT_VERSION, plugin_version=plugin_version(), step=trainer.step,
                nonfinite_total=trainer.nonfinite_total, nonfinite_consecutive=trainer.nonfinite_consecutive,
                config=trainer.cfg.to_dict(), generator_device=str(trainer.generator.device),
                data_streams=int(getattr(trainer, "data_streams", 1)))
    return tensors, meta


def checkpoint_path(root: str | os.PathLike, step: int) -> str:
    """Where :func:`save_checkpoint` puts the checkpoint of ``step`` under ``root``."""
    return os.path.join(os.fspath(root), f"step_{step:08d}")


def save_checkpoint(trainer: Any, root: str | os.PathLike, keep_last: int | None = None) -> str:
    """Write the full resumable state of ``trainer`` to ``root/step_XXXXXXXX`` atomically.

    Returns the checkpoint directory. ``keep_last`` prunes older checkpoints after the manifest
    points at the new one.
    """
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    _remove_stale_temporaries(root)
    final = checkpoint_path(root, trainer.step)
    name = os.path.basename(final)
    tensors, meta = _collect(trainer)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root)
    try:
        state_path = os.path.join(tmp, STATE_FILE)
        _write_safetensors(tensors, state_path, metadata={"format": "add-checkpoint", "step": str(trainer.step)})
        _fsync_path(state_path)
        _write_json(meta, os.path.join(tmp, "meta.json"))
        _fsync_path(tmp)
        if os.path.exists(final):  # re-saving the same step: move the old one aside first
            old = tempfile.mkdtemp(prefix=f".tmp-old-{name}-", dir=root)
            os.replace(final, os.path.join(old, name))
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json({"checkpoint": name, "step": trainer.step}, os.path.join(root, "latest.json"))
    trainer.saved_step = trainer.step
    if keep_last is not None and keep_last > 0:
        # Only checkpoints older than this one rotate out: a folder of a later step (left by a run that
        # resumed from an earlier one because that later one is unreadable) is never counted as kept.
        older = [c for c in list_checkpoints(root) if int(c[len("step_"):]) < trainer.step]
        for old_name in older[: max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(os.path.join(root, old_name))
    return final


def _remove_stale_temporaries(root: str) -> None:
    for entry in os.listdir(root):
        if entry.startswith(".tmp-"):
            path = os.path.join(root, entry)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def list_checkpoints(root: str | os.PathLike) -> list[str]:
    """Committed checkpoint directory names under ``root``, oldest first."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return []
    return sorted(e for e in os.listdir(root) if re.fullmatch(r"step_\d{8}", e)
                  and os.path.isfile(os.path.join(root, e, "meta.json")))


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed (None when it looks whole): a missing or
    unparsable meta.json, or a missing, cut-short or corrupt state file (header checked, nothing loaded)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return "the folder does not exist"
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or not isinstance(meta.get("config"), dict):
            return "meta.json lacks its step or config"
    except FileNotFoundError:
        return "meta.json is missing"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"meta.json is not valid JSON ({str(exc)[:100]})"
    try:
        safetensors_header(os.path.join(path, STATE_FILE), STATE_FILE)
    except ADDError as exc:
        return str(exc).split(". ")[0]
    return None


def find_checkpoint(root: str | os.PathLike) -> tuple[str | None, list[str]]:
    """The checkpoint to resume under ``root`` -> (folder or None, notes on every state file skipped).

    ``latest.json`` names it; when that file is missing, unreadable, or names a folder that is gone or
    broken, the newest ``step_*`` folder that looks whole is taken instead, and the notes say why.
    Nothing is deleted or rewritten here."""
    root = os.fspath(root)
    notes: list[str] = []
    manifest = os.path.join(root, "latest.json")
    named = None
    if os.path.isfile(manifest):
        try:
            with open(manifest, encoding="utf-8") as f:
                data = json.load(f)
            named = data.get("checkpoint") if isinstance(data, dict) else None
            if not isinstance(named, str) or not re.fullmatch(r"step_\d{8}", named):
                notes.append("latest.json does not name a step_* folder")
                named = None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            notes.append(f"latest.json is not valid JSON ({str(exc)[:100]})")
    if named is not None:
        problem = checkpoint_problem(os.path.join(root, named))
        if problem is None:
            return os.path.join(root, named), notes
        notes.append(f"latest.json names {named}, but {problem}")
    folders = sorted((e for e in os.listdir(root) if re.fullmatch(r"step_\d{8}", e)
                      and os.path.isdir(os.path.join(root, e))), reverse=True) if os.path.isdir(root) else []
    for name in folders:
        if name == named:
            continue
        problem = checkpoint_problem(os.path.join(root, name))
        if problem is None:
            return os.path.join(root, name), notes
        notes.append(f"{name}: {problem}")
    return None, notes


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """A checkpoint directory, or a root (see :func:`find_checkpoint`) -> the checkpoint directory."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "meta.json")) and os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    found, notes = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"No ADD checkpoint at {path!r}: expected {STATE_FILE} and meta.json there, "
                                "or a step_* folder holding them" + (f" ({'; '.join(notes)})" if notes else "") + ".")
    return found


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    with open(os.path.join(resolve_checkpoint(path), "meta.json"), encoding="utf-8") as f:
        return json.load(f)


def load_checkpoint(trainer: Any, path: str | os.PathLike, restore_global_rng: bool = True) -> str:
    """Restore everything :func:`save_checkpoint` wrote into an identically built ``trainer``.

    Raises ValueError when the saved config differs in anything but run-control fields.
    """
    ckpt = resolve_checkpoint(path)
    with open(os.path.join(ckpt, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    saved = ADDConfig.from_dict(meta["config"]).to_dict()
    current = trainer.cfg.to_dict()
    diff = sorted(k for k in saved if saved[k] != current[k] and k not in _RESUMABLE_CHANGES)
    if diff:
        raise ADDError(f"Checkpoint {ckpt!r} was trained with a different config ({diff}: saved "
                         f"{[saved[k] for k in diff]}, now {[current[k] for k in diff]}). Resume with the saved "
                         "values, or start a new run.")
    tensors, _ = read_safetensors(os.path.join(ckpt, STATE_FILE), f"the training state {os.path.join(ckpt, STATE_FILE)}",
                                  "Delete that step_* folder to resume from the one before it, or start a new run.")
    sub = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    trainer.models.student.load_trainable_state_dict(sub("student."))
    if trainer.models.discriminator is not None:
        trainer.models.discriminator.heads.load_state_dict(sub("disc."), strict=True)
    if trainer.models.fake_score is not None:
        trainer.models.fake_score.load_trainable_state_dict(sub("fake."))
    for name in ("opt_g", "opt_d", "opt_f"):
        if getattr(trainer, name) is not None:
            _unflatten_optimizer(getattr(trainer, name), name, tensors, meta[name])
    if trainer.ema is not None:
        with torch.no_grad():
            for i, s in enumerate(trainer.ema.shadow):
                s.copy_(tensors[f"ema.{i}"])
    trainer.generator.set_state(tensors["rng.generator"])
    if restore_global_rng:
        torch.set_rng_state(tensors["rng.torch_cpu"])
        cuda = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    trainer.step = int(meta["step"])
    trainer.nonfinite_total = int(meta["nonfinite_total"])
    trainer.nonfinite_consecutive = int(meta["nonfinite_consecutive"])
    trainer.last_checkpoint = ckpt
    trainer.saved_step = trainer.step
    return ckpt

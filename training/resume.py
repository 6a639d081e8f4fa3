"""Starting or resuming a run by name: what a previous run of that name left beside its LoRA, and
whether it can continue with the new settings (a user's own file is never taken over).

Pure Python (no ComfyUI, no torch model): training/run.py's :class:`~.run.ADDRun` runs what
:func:`check_start` allowed; the node and the headless trainer call it first.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

from ..core.errors import ADDError, ResumeConflict
from ..core.files import safetensors_metadata
from .checkpoint import _RESUMABLE_CHANGES, find_checkpoint
from .config import ADDConfig

LORA_FORMAT = "comfyui-add-lora"  # value of the 'add.format' metadata key of every LoRA we write
STATE_SUFFIX = ".add-state"



def state_dir_for(lora_path: str | os.PathLike) -> str:
    """``.../NAME.safetensors`` -> ``.../NAME.add-state``."""
    base = os.fspath(lora_path)
    if base.endswith(".safetensors"):
        base = base[: -len(".safetensors")]
    return base + STATE_SUFFIX


def lora_file_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors header metadata of a file ({} when it has none)."""
    return safetensors_metadata(path, os.path.basename(os.fspath(path)))


def read_run_json(state_dir: str | os.PathLike) -> dict[str, Any]:
    """``run.json`` of a state folder ({} when there is none); ADDError naming it when it is unreadable."""
    path = os.path.join(os.fspath(state_dir), "run.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
        if not isinstance(run, dict):
            raise ValueError(f"it holds a {type(run).__name__}, not an object")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ADDError(
            f"{path} is not valid JSON ({str(exc)[:120]}). It records the base model and data the run was started "
            "with, to check a resume against. Restore it from a backup, or delete it to resume without those checks "
            "(it is written again); the checkpoints are untouched.") from None
    return run


def existing_run(lora_path: str | os.PathLike) -> dict[str, Any] | None:
    """What a previous run of this name left, or None when there is none:
    {'step', 'config', 'run', 'checkpoint' (folder or None), 'note' (state files skipped, '' if none)}.

    A broken ``latest.json`` or step folder is skipped for the newest whole checkpoint (the note says
    so); when step folders exist but none can be resumed, ADDError: starting again from step 0 would
    overwrite the LoRA, so the user decides."""
    sdir = state_dir_for(lora_path)
    if not os.path.isdir(sdir):
        return None
    run = read_run_json(sdir)
    ckpt, notes = find_checkpoint(sdir)
    if ckpt is None:
        if notes:
            raise ADDError(
                f"The training state {sdir} has no checkpoint that can be resumed ({'; '.join(notes)}). Nothing was "
                "changed. To start this run again from step 0, move that folder away (or delete it); to keep it, "
                "choose another name.")
        return {"step": 0, "config": None, "run": run, "checkpoint": None, "note": ""}  # killed before its first save
    with open(os.path.join(ckpt, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    note = ""
    if notes:
        note = (f"resuming from {os.path.basename(ckpt)} (step {int(meta['step'])}), the newest whole checkpoint: "
                + "; ".join(notes))
    return {"step": int(meta["step"]), "config": meta["config"], "run": run, "checkpoint": ckpt, "note": note}


def _plain(field_name: str, saved: Any, now: Any) -> str:
    return f"{field_name}: saved {saved!r}, now {now!r}"


Describe = Callable[[str, Any, Any], str]  # (setting, saved value, new value) -> 'name: saved X, now Y'


def resume_conflicts(saved_config: Mapping[str, Any], cfg: ADDConfig, describe: Describe | None = None) -> list[str]:
    """``['lora_rank: saved 16, now 8', ...]`` for every setting that cannot change on resume."""
    describe = describe or _plain
    saved = ADDConfig.from_dict(saved_config).to_dict()
    now = cfg.to_dict()
    return [describe(k, saved[k], now[k]) for k in sorted(saved)
            if saved[k] != now[k] and k not in _RESUMABLE_CHANGES]


# run.json entries a resume must match (the data the run trains on); compared where both runs record them
RUN_INFO_COMPARED = ("width", "height", "data", "prompts", "prompts_sha256", "images", "data_cfg", "data_steps")


def run_info_conflicts(saved_run: Mapping[str, Any], run_info: Mapping[str, Any],
                       describe: Describe | None = None) -> list[str]:
    """Data settings that differ between a saved ``run.json`` and a new run's ``run_info``."""
    describe = describe or _plain
    out = []
    differs = lambda k: k in saved_run and k in run_info and saved_run[k] != run_info[k]  # noqa: E731
    for k in RUN_INFO_COMPARED:
        if k in ("prompts", "prompts_sha256"):
            if k == "prompts" and (differs("prompts") or differs("prompts_sha256")):
                out.append(f"prompts: the prompt lines differ from the saved run's ({saved_run['prompts']} saved, "
                           f"{run_info['prompts']} now)")
        elif differs(k):
            out.append(describe(k, saved_run[k], run_info[k]))
    return out


def check_start(lora_path: str | os.PathLike, cfg: ADDConfig, base_fingerprint: str,
                run_info: Mapping[str, Any] | None = None, describe: Describe | None = None) -> int:
    """Validate starting (or resuming) the run whose LoRA goes to ``lora_path``; -> start step.

    Raises FileExistsError when a LoRA of that name exists that no ADD run of ours made (a user's
    file is never overwritten), ResumeConflict when the existing run cannot continue with ``cfg`` and
    ``run_info`` (the data: size, prompts, data_cfg, ...), ADDError when its state cannot be read.
    ``describe(setting, saved, now)`` words each difference (the node names its inputs).
    """
    lora_path = os.fspath(lora_path)
    prev = existing_run(lora_path)
    if prev is None:
        if os.path.exists(lora_path):
            try:
                ours = lora_file_metadata(lora_path).get("add.format") == LORA_FORMAT
            except ADDError as exc:  # an unreadable file is simply "not ours"; say why below
                ours, why = False, f" ({exc})"
            else:
                why = ""
            raise FileExistsError(
                f"{os.path.basename(lora_path)} already exists in the LoRA folder and "
                + ("its training state folder is gone, so it cannot be resumed" if ours
                   else f"was not made by an ADD training run{why}")
                + ": choose another name (the file is left untouched).")
        return 0
    problems = []
    saved_fp = prev["run"].get("base_fingerprint")
    if saved_fp and saved_fp != base_fingerprint:
        problems.append(f"base model: saved fingerprint {saved_fp}, now {base_fingerprint} (another checkpoint "
                        "or other LoRAs applied to it)")
    if prev["config"] is not None:
        problems += resume_conflicts(prev["config"], cfg, describe)
    if run_info is not None:
        problems += run_info_conflicts(prev["run"], run_info, describe)
    if problems:
        raise ResumeConflict(
            f"A training run named {os.path.basename(state_dir_for(lora_path))[: -len(STATE_SUFFIX)]!r} exists "
            f"(step {prev['step']}) and these settings differ, so it cannot be resumed: " + "; ".join(problems)
            + ". Set them back to continue it, or choose a new name to start another run.")
    return prev["step"]

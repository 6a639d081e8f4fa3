"""One ADD training run tied to its files: a ComfyUI-format LoRA and a resumable state beside it.

Pure PyTorch (no ComfyUI import): the node layer and a headless trainer hand in the network, its
denoiser, the data and a few callbacks; this module builds the student and discriminator, resumes,
runs :class:`.loop.Trainer`, and writes the files.

Files, for a LoRA at ``.../loras/NAME.safetensors``::

    NAME.safetensors              the LoRA (ComfyUI key format, ``diffusion_model.<module>.lora_up``
                                  etc.), written atomically at every save and at the end
    NAME.add-state/               the resumable state (see ``checkpoint.py``), where the user sees it
        run.json                  what the run was started with (base fingerprint, data summary)
        latest.json, step_XXXXXXXX/

Nothing in the state folder has an extension ComfyUI lists as a model, so it never shows up in
a LoRA list. Starting a name whose state exists resumes it; whether it may (and which settings
cannot change) is training/resume.py's ``check_start``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from ..core.errors import ADDError, TrainingFailed
from ..core.files import nonfinite_keys, read_safetensors
from .checkpoint import (atomic_write_bytes, atomic_write_json, checkpoint_problem, list_checkpoints, load_checkpoint,
                         plugin_version, read_meta)
from .config import ADDConfig
from .distributed import Dist, resolve_streams
from .loop import TrainResult, Trainer
from .add_step import ADDModels, DataFn, build_models
from .schedule import DiscreteSchedule
from .lora_extract import ExtractReport
from .resume import LORA_FORMAT, existing_run, state_dir_for
from .student import DenoiseFn, FullStudent, LoRAStudent

# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def verify_lora(path: str | os.PathLike) -> None:
    """The written LoRA exists, reads back through the checked reader and holds only finite values;
    TrainingFailed naming the file otherwise (a run reports 'done' only after this)."""
    path = os.fspath(path)
    try:
        tensors, _ = read_safetensors(path, path, "Queue the same name again to resume from the last checkpoint.")
    except ADDError as exc:
        raise TrainingFailed(f"the run ended but its LoRA does not check out: {exc}") from None
    bad = nonfinite_keys(tensors)
    if bad:
        raise TrainingFailed(f"the run ended but its LoRA {path} holds NaN or infinite values in {len(bad)} tensors "
                             f"(e.g. {bad[0]}); it is not usable.")
    if not tensors:
        raise TrainingFailed(f"the run ended but its LoRA {path} holds no tensors.")


def lora_metadata(cfg: ADDConfig, step: int, base: Mapping[str, str]) -> dict[str, str]:
    """Safetensors metadata of a trained LoRA: what a user (and our nodes) need to sample with it."""
    md = {
        "add.format": LORA_FORMAT,
        "add.plugin_version": plugin_version(),
        "add.steps_trained": str(step),
        "add.max_steps": str(cfg.max_steps),
        "add.student_timesteps": json.dumps(list(cfg.student_timesteps)),
        "add.recommended_timesteps": json.dumps(list(cfg.student_timesteps)),
        "add.recommended_cfg": "1",
        "add.distill_weight": f"{cfg.distill_weight:g}",
        "add.discriminator": cfg.discriminator,
        "add.lora_rank": str(cfg.lora_rank),
        "add.lora_alpha": f"{cfg.lora_alpha:g}",
        "add.config": json.dumps(cfg.to_dict(), sort_keys=True),
        "ss_network_dim": str(cfg.lora_rank),  # what LoRA managers read for rank / alpha
        "ss_network_alpha": f"{cfg.lora_alpha:g}",
    }
    md.update({f"add.{k}": str(v) for k, v in base.items()})
    return md


def save_lora(student: LoRAStudent, path: str | os.PathLike, metadata: Mapping[str, str], prefix: str = "",
              dtype: torch.dtype = torch.float16) -> None:
    """The student's adapters as a ComfyUI LoRA file, atomically (temp file, fsync, rename)."""
    tensors = student.lora_state_dict(prefix=prefix, dtype=dtype)
    atomic_write_bytes(safetensors_bytes(tensors, metadata=dict(metadata)), path)


def save_full_as_lora(student: FullStudent, path: str | os.PathLike, cfg: ADDConfig, step: int,
                      base: Mapping[str, str], prefix: str = "", ema: Any = None,
                      dtype: torch.dtype = torch.float16) -> ExtractReport:
    """A full fine-tune exported as a ComfyUI LoRA: student - teacher made rank-``cfg.lora_rank``
    per layer (truncated SVD, training/lora_extract.py), written atomically; the EMA's weights when
    ``ema`` is given. The reconstruction error goes into the file's metadata and is returned."""
    sd, report = student.lora_state_dict(cfg.lora_rank, prefix=prefix, dtype=dtype,
                                         weights=ema.shadow if ema is not None else None)
    # Before any update (a stop at step 0) the student equals the teacher: the file then holds no
    # tensors, which every loader applies as "no change", as the zero-initialised LoRA of lora mode.
    md = lora_metadata(cfg, step, base)
    md.update(report.metadata())
    md.update({"add.training_mode": "full", "add.lora_rank": str(report.rank), "add.lora_alpha": str(report.rank),
               "ss_network_dim": str(report.rank), "ss_network_alpha": str(report.rank),
               "add.export": "LoRA extracted from the full fine-tune (student - teacher, truncated SVD per layer)"})
    atomic_write_bytes(safetensors_bytes(sd, metadata=md), path)
    return report


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """Everything one run needs; built by the node layer (or a headless trainer)."""

    cfg: ADDConfig
    network: nn.Module  # the frozen host network (teacher), on the training device
    denoise: DenoiseFn  # (network, x_ve, sigma (B,), cond) -> x0
    data: DataFn | None  # (generator, batch_size) -> batch; or None with data_factory
    schedule: DiscreteSchedule
    lora_path: str
    device: torch.device
    feature_modules: Sequence[str] | None = None  # teacher-feature discriminator
    feature_fn: Callable | None = None  # e.g. DinoV2Features, for discriminator='dinov2'
    target_modules: Sequence[str] | None = None  # LoRA targets (name suffixes)
    checkpoint_modules: Sequence[str] = ()  # gradient checkpointing units ('' = off)
    c_dim: int = 0  # pooled-conditioning width for projection heads (0 = unconditioned heads)
    lora_prefix: str = ""  # key prefix so that '{prefix}{module}' is ComfyUI's weight name
    base_info: Mapping[str, str] = field(default_factory=dict)  # base model name, fingerprint, ...
    run_info: Mapping[str, Any] = field(default_factory=dict)  # data summary, size (run.json)
    preview_cond: Any = None  # conditioning of the fixed preview prompts (batch P)
    preview_shape: Sequence[int] | None = None  # (P, C, h, w) latents of the previews
    keep_last: int = 2  # resumable states kept
    # teacher -> data, for data made by the teacher (LADD): it must run with the adapters OFF, so
    # the run builds it with the student's teacher pass once the student exists.
    data_factory: Callable[[Callable[[Tensor, Tensor, Any], Tensor]], DataFn] | None = None
    # training_mode='full': network -> the trainable copy (None = a deep copy; see FullStudent)
    full_copy: Callable[[nn.Module], nn.Module] | None = None


@dataclass
class RunHooks:
    """Callbacks of a run; all optional, all called on the training thread."""

    progress: Callable[[dict], None] | None = None  # after each step: see ADDRun._stats
    preview: Callable[[int, Tensor], None] | None = None  # (step, x0 latents (P, C, h, w) of the 1-step student)
    saved: Callable[[int, str], None] | None = None  # (step, lora path) after the LoRA is written
    wait_if_busy: Callable[[], float] | None = None  # blocks while the host wants the device; -> seconds waited


class ADDRun:
    """Builds the models, resumes from the state folder, trains, writes the LoRA."""

    def __init__(self, spec: RunSpec, dist: Dist | None = None, data_streams: int | None = None) -> None:
        """``dist``: this process's place in a data-parallel group (None = one process).
        ``data_streams``: global data streams per step (None = keep the saved count, or one per rank;
        see distributed.resolve_streams)."""
        self.spec = spec
        self.dist = dist or Dist()
        self.requested_streams = data_streams
        self.stream_note = ""  # set by build() when a resume had to change the global batch
        self.resume_note = ""  # set by build() when broken state files were skipped to resume
        self.state_dir = state_dir_for(spec.lora_path)
        self.models: ADDModels | None = None
        self.trainer: Trainer | None = None
        self.start_step = 0
        self._t_last: float | None = None
        self._step_time: float | None = None  # smoothed seconds per step, pauses excluded
        self.export_report: ExtractReport | None = None  # full mode: the last LoRA extraction's errors

    def build(self) -> int:
        """Student + discriminator + trainer; resumes the latest state if there is one. -> start step."""
        s = self.spec
        if (s.data is None) == (s.data_factory is None):
            raise ValueError("RunSpec: give exactly one of data and data_factory.")
        # Before the student exists the network is the plain teacher.
        data = s.data if s.data is not None else s.data_factory(lambda x, sig, c: s.denoise(s.network, x, sig, c))
        probe = data(torch.Generator(device=s.device).manual_seed(s.cfg.seed), min(2, s.cfg.batch_size))
        self.models = build_models(s.network, s.denoise, s.cfg, s.schedule, feature_modules=s.feature_modules,
                                   feature_fn=s.feature_fn, probe_batch=probe, c_dim=s.c_dim,
                                   target_modules=s.target_modules, full_copy=s.full_copy)
        if s.data_factory is not None:
            data = s.data_factory(self.models.student.teacher)
        if s.checkpoint_modules:  # both student kinds
            self.models.student.enable_gradient_checkpointing(s.checkpoint_modules)
        self.trainer = Trainer(self.models, s.cfg, data, device=s.device, dist=self.dist)
        prev = existing_run(s.lora_path)
        saved_streams = None
        run_json = os.path.join(self.state_dir, "run.json")
        if prev is not None and prev["checkpoint"] is not None:
            ckpt = self._resume(prev["checkpoint"])
            self.resume_note = "; ".join(n for n in (prev["note"], self.resume_note) if n)
            saved_streams = int(read_meta(ckpt).get("data_streams", 1))
        if self.dist.is_main and (prev is None or prev["checkpoint"] is None or not os.path.isfile(run_json)):
            os.makedirs(self.state_dir, exist_ok=True)
            atomic_write_json({"base": dict(s.base_info), **dict(s.run_info),
                               "base_fingerprint": s.base_info.get("base_fingerprint", ""),
                               "created": time.strftime("%Y-%m-%d %H:%M:%S")}, run_json)
        count, self.stream_note = resolve_streams(saved_streams, self.requested_streams, self.dist.world_size)
        self.trainer.set_data_streams(count)
        # Identical replicas: every rank starts from rank 0's trainable tensors and buffers.
        self.dist.broadcast_(self.trainer.student_params + self.trainer.disc_params + self.trainer.fake_params
                             + (list(self.models.discriminator.heads.buffers()) if self.models.discriminator else [])
                             + (self.trainer.ema.shadow if self.trainer.ema is not None else []))
        self.dist.barrier()
        self.start_step = self.trainer.step
        return self.start_step

    def _resume(self, first: str) -> str:
        """Load checkpoint folder ``first``; when its state cannot be read, the next older whole one
        (``resume_note`` says which were skipped). -> the folder loaded."""
        assert self.trainer is not None
        step_of = lambda path: int(os.path.basename(path)[len("step_"):])  # noqa: E731
        older = [os.path.join(self.state_dir, c) for c in reversed(list_checkpoints(self.state_dir))]
        candidates = [first] + [c for c in older if step_of(c) < step_of(first)]
        skipped = []
        for ckpt in candidates:
            if ckpt != first:
                problem = checkpoint_problem(ckpt)
                if problem is not None:
                    skipped.append(f"{os.path.basename(ckpt)}: {problem}")
                    continue
            try:
                load_checkpoint(self.trainer, ckpt, restore_global_rng=False)
            except ADDError as exc:
                skipped.append(f"{os.path.basename(ckpt)}: {str(exc)[:200]}")
                continue
            if skipped:
                self.resume_note = (f"resuming from {os.path.basename(ckpt)} (step {self.trainer.step}): "
                                    + "; ".join(skipped))
            return ckpt
        raise ADDError(f"The training state {self.state_dir} has no checkpoint that can be read ({'; '.join(skipped)}). "
                       "Nothing was changed. To start this run again from step 0, move that folder away (or delete "
                       "it); to keep it, choose another name.")

    # ---- files -------------------------------------------------------------------------
    def write_lora(self) -> None:
        """Export the current adapters (EMA weights when the EMA is on) to the LoRA file."""
        assert self.trainer is not None and self.models is not None
        student = self.models.student
        if isinstance(student, FullStudent):
            self.export_report = save_full_as_lora(student, self.spec.lora_path, self.spec.cfg, self.trainer.step,
                                                   self.spec.base_info, prefix=self.spec.lora_prefix,
                                                   ema=self.trainer.ema)
            return
        md = lora_metadata(self.spec.cfg, self.trainer.step, self.spec.base_info)
        if self.trainer.ema is not None:
            with self.trainer.ema.swapped_in():
                save_lora(student, self.spec.lora_path, md, prefix=self.spec.lora_prefix)
        else:
            save_lora(student, self.spec.lora_path, md, prefix=self.spec.lora_prefix)

    # ---- previews ----------------------------------------------------------------------
    @torch.no_grad()
    def preview_latents(self) -> Tensor | None:
        """1-step student samples from fixed seeds (same noise every time, so previews compare)."""
        s = self.spec
        if s.preview_shape is None or self.models is None:
            return None
        gen = torch.Generator(device="cpu").manual_seed(s.cfg.seed + 12345)
        t_top = max(s.cfg.student_timesteps)
        n = s.preview_shape[0]
        sigma = s.schedule.sigma(torch.full((n,), t_top), device=s.device)
        eps = torch.randn(tuple(s.preview_shape), generator=gen).to(s.device)
        x = eps * (1.0 + sigma * sigma).sqrt().reshape(-1, *([1] * (eps.ndim - 1)))
        return self.models.student.student(x, sigma, s.preview_cond).float()

    # ---- progress ----------------------------------------------------------------------
    def _stats(self, step: int, logs: dict, waited: float) -> dict:
        now = time.perf_counter()
        if self._t_last is not None:
            dt = max(1e-9, now - self._t_last - waited)
            self._step_time = dt if self._step_time is None else 0.8 * self._step_time + 0.2 * dt
        self._t_last = now
        it_s = 1.0 / self._step_time if self._step_time else None
        remaining = self.spec.cfg.max_steps - step
        return {"step": step, "max_steps": self.spec.cfg.max_steps, "logs": dict(logs),
                "it_s": it_s, "eta_s": remaining / it_s if it_s else None}

    def train(self, stop_event: threading.Event | None = None, hooks: RunHooks | None = None) -> TrainResult:
        """Run to ``max_steps`` or until ``stop_event``; the state and the LoRA are saved every
        ``save_every`` steps and at the end (a stop saves at the stop step)."""
        if self.trainer is None:
            self.build()
        assert self.trainer is not None
        hooks = hooks or RunHooks()
        waited = [0.0]

        def progress(step: int, logs: dict) -> None:
            stats = self._stats(step, logs, waited[0])
            if hooks.progress is not None:
                hooks.progress(stats)
            # Between steps: give the device to the host's foreground work (polite mode).
            waited[0] = hooks.wait_if_busy() if hooks.wait_if_busy is not None else 0.0

        def preview(step: int, _trainer: Trainer) -> None:
            if hooks.preview is not None and self.dist.is_main:
                lat = self.preview_latents()
                if lat is not None:
                    hooks.preview(step, lat)

        def on_save(trainer: Trainer, _ckpt: str) -> None:
            self.write_lora()
            if hooks.saved is not None:
                hooks.saved(trainer.step, self.spec.lora_path)

        self._t_last = time.perf_counter()
        result = self.trainer.run(stop_event=stop_event, progress=progress, preview=preview,
                                  checkpoint_dir=self.state_dir, keep_last=self.spec.keep_last, on_save=on_save)
        if not result.stopped:
            self.check_finished(result)
        return result

    def check_finished(self, result: TrainResult) -> None:
        """A run that reached max_steps is done only with a saved, readable, finite LoRA of its last step;
        TrainingFailed with the reason otherwise (the last good checkpoint and LoRA stay as they are)."""
        assert self.trainer is not None
        bad = self.trainer.nonfinite_consecutive
        if bad:
            saved = self.trainer.saved_step
            kept = (f"the LoRA and the resumable state of step {saved} are kept" if saved
                    else "no LoRA was written")
            raise TrainingFailed(
                f"the last {bad} of {result.step} steps had a non-finite loss or gradient (NaN/inf), so they were not "
                f"saved; {kept}. Check the data and the base model for NaN/inf (images, data_cfg), or lower the "
                "learning rates, then queue the same name again.")
        if self.dist.is_main:
            verify_lora(self.spec.lora_path)

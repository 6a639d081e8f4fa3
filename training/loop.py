"""The ADD training loop: :class:`Trainer` runs training/add_step.py's :func:`~.add_step.step` (the losses of
one iteration, arXiv 2311.17042 Sec. 3) and owns the optimisers, the EMA of the student, the RNG
streams, gradient accumulation over data streams, non-finite bookkeeping, saving, the stop event and
the callbacks.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..core.errors import NonFiniteTrainingError
from .config import ADDConfig
from .distributed import Dist, local_streams, stream_seed
from .add_step import ADDModels, DataFn, step, student_forward

# --------------------------------------------------------------------------------------------
# helpers: EMA, lr schedule
# --------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of the student's trainable tensors (DiT's update_ema)."""

    def __init__(self, params: Sequence[nn.Parameter], decay: float) -> None:
        self.params, self.decay = list(params), decay
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the student (for previews / export)."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)


def get_lr(step: int, base_lr: float, warmup_steps: int, schedule: str = "constant", max_steps: int = 1) -> float:
    """Linear warm-up, then constant or cosine decay to 0 at ``max_steps``; a pure function of the
    step (nanoGPT style), so a resumed run gets the same rates."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _buffers(module: nn.Module | None) -> list[Tensor]:
    return [b.detach().clone() for b in module.buffers()] if module is not None else []


@torch.no_grad()
def _restore(module: nn.Module | None, saved: list[Tensor]) -> None:
    if module is not None:
        for b, s in zip(module.buffers(), saved):
            b.copy_(s)


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    step: int
    stopped: bool  # True when the stop event ended the run early
    nonfinite_total: int
    last_logs: dict[str, float] = field(default_factory=dict)
    last_checkpoint: str | None = None


class Trainer:
    """Owns the optimisers, EMA, RNG and counters of one run; :meth:`run` is the loop.

    ``data(generator, batch_size) -> batch`` draws batches from the trainer's generator, so a
    checkpoint (which stores that generator's state) resumes the data stream as well.
    """

    def __init__(self, models: ADDModels, cfg: ADDConfig, data: DataFn, device: str | torch.device = "cpu",
                 dist: Dist | None = None, data_streams: int | None = None) -> None:
        self.models, self.cfg, self.data = models, cfg, data
        self.device = torch.device(device)
        self.dist = dist or Dist()
        # Re-seeded at every step from (seed, step, stream): see distributed.py.
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.set_data_streams(data_streams or self.dist.world_size)  # default: one stream per rank
        self.student_params = models.student.trainable_parameters()
        self.opt_g = torch.optim.AdamW(self.student_params, lr=cfg.lr_student, betas=cfg.gen_betas,
                                       weight_decay=cfg.weight_decay)
        self.disc_params = list(models.discriminator.heads.parameters()) if models.discriminator is not None else []
        self.opt_d = (torch.optim.AdamW(self.disc_params, lr=cfg.lr_disc, betas=cfg.disc_betas,
                                        weight_decay=cfg.weight_decay) if self.disc_params else None)
        # distill_loss 'dmd': the fake score (a LoRA on the teacher) learns the student's samples at the critic's rate
        self.fake_params = models.fake_score.trainable_parameters() if models.fake_score is not None else []
        self.opt_f = (torch.optim.AdamW(self.fake_params, lr=cfg.lr_disc, betas=cfg.gen_betas,
                                        weight_decay=cfg.weight_decay) if self.fake_params else None)
        self.ema = EMA(self.student_params, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_consecutive = 0
        self.last_checkpoint: str | None = None
        self.saved_step: int | None = None  # step of the last checkpoint written or loaded

    def set_data_streams(self, data_streams: int) -> None:
        """Global number of data streams per step; this rank runs its share of them (distributed.py)."""
        self.streams = local_streams(data_streams, self.dist.rank, self.dist.world_size)
        self.data_streams = data_streams

    def _backward(self, loss: Tensor, params: list, scale: float = 1.0) -> None:
        """Accumulate the gradient of ``scale * loss``; a non-finite loss poisons the gradients with NaN
        instead, so that the update is skipped on every rank after the reduction (no rank waits alone)."""
        if bool(torch.isfinite(loss.detach())):
            (loss * scale if scale != 1.0 else loss).backward()
        else:
            for p in params:
                p.grad = torch.full_like(p, float("nan"))

    def _finish(self, params: list, opt: torch.optim.Optimizer) -> bool:
        """Average over ranks, clip, step; False (and no update) if any gradient is not finite."""
        self.dist.average_grads_(params)
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip) if grads else torch.zeros(())
        if not bool(torch.isfinite(norm)) or not _all_finite(grads):
            opt.zero_grad(set_to_none=True)
            return False
        opt.step()
        opt.zero_grad(set_to_none=True)
        return True

    def _apply(self, loss: Tensor, params: list, opt: torch.optim.Optimizer) -> bool:
        """backward, (average over ranks), clip, step; False (and no update) if the loss or any gradient is not finite."""
        self._backward(loss, params)
        return self._finish(params, opt)

    def _seed(self, stream: int) -> torch.Generator:
        self.generator.manual_seed(stream_seed(self.cfg.seed, self.step, stream))
        return self.generator

    def _extra_critic_updates(self) -> bool:
        """``disc_updates - 1`` critic updates (discriminator heads; the fake score of 'dmd') before the
        usual iteration, each on fresh batches of every local stream (DMD2's two time-scale rule: the
        critics keep up with the generator). Seeded apart from the main batch's streams, so a resumed
        run draws the same batches."""
        cfg, models, ok = self.cfg, self.models, True
        if (self.opt_d is None and self.opt_f is None) or cfg.disc_updates <= 1:
            return ok
        n = len(self.streams)
        for k in range(1, cfg.disc_updates):
            self._zero_critics()
            buffers = _buffers(models.discriminator) if n > 1 else []
            for r in self.streams:
                if n > 1:  # every stream starts from the same spectral-norm vectors, as on its own rank
                    _restore(models.discriminator, buffers)
                gen = self.generator.manual_seed(stream_seed(self.cfg.seed, self.step, r + 1_000_003 * k))
                batch = self.data(gen, cfg.batch_size)
                with torch.no_grad():
                    fake = student_forward(batch, models, cfg, gen)
                self._critic_backward(batch, fake, gen, 1.0 / n)
            ok &= self._finish_critics()
        return ok

    def _zero_critics(self) -> None:
        for opt in (self.opt_d, self.opt_f):
            if opt is not None:
                opt.zero_grad(set_to_none=True)

    def _finish_critics(self) -> bool:
        """Step the discriminator heads and the fake score on their accumulated gradients (see _finish)."""
        ok = True
        if self.opt_d is not None:
            ok &= self._finish(self.disc_params, self.opt_d)
        if self.opt_f is not None:
            ok &= self._finish(self.fake_params, self.opt_f)
        return ok

    def _critic_backward(self, batch: dict, fake: Tensor, gen: torch.Generator, scale: float) -> dict[str, float]:
        """Accumulate the critics' gradients on one batch: the discriminator's (phase D), then the fake
        score's (phase F, forward and backward with its adapters on). -> their logs."""
        logs: dict[str, float] = {}
        if self.opt_d is not None:
            d_losses, d_logs = step(batch, self.models, self.cfg, "D", generator=gen, fake=fake)
            self._backward(d_losses["total"], self.disc_params, scale)
            logs.update(d_logs)
        if self.opt_f is not None:
            with self.models.fake_score.active():
                f_losses, f_logs = step(batch, self.models, self.cfg, "F", generator=gen, fake=fake)
                self._backward(f_losses["total"], self.fake_params, scale)
            logs.update(f_logs)
        return logs

    def train_step(self) -> dict[str, float]:
        """One iteration: D step then G step on the same x_hat_theta, over this rank's data streams. Returns logs."""
        cfg, models = self.cfg, self.models
        for opt, base in ((self.opt_g, cfg.lr_student), (self.opt_d, cfg.lr_disc), (self.opt_f, cfg.lr_disc)):
            for group in (opt.param_groups if opt is not None else []):
                group["lr"] = get_lr(self.step, base, cfg.lr_warmup_steps, cfg.lr_schedule, cfg.max_steps)
        if models.discriminator is not None:
            models.discriminator.train(True)
        extra_ok = self._extra_critic_updates()
        if len(self.streams) == 1:
            ok, g_ok, logs = self._step_one(self.streams[0])
        else:
            ok, g_ok, logs = self._step_accumulated(self.streams)
        ok &= extra_ok
        if g_ok and self.ema is not None:
            self.ema.update()
        ok &= g_ok
        logs = self.dist.mean_logs(logs)
        self.step += 1
        if ok:
            self.nonfinite_consecutive = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_consecutive += 1
        logs.update(step=self.step, nonfinite=self.nonfinite_total, skipped=float(not ok))
        return logs

    def _step_one(self, stream: int) -> tuple[bool, bool, dict[str, float]]:
        cfg, models = self.cfg, self.models
        gen = self._seed(stream)
        batch = self.data(gen, cfg.batch_size)
        fake = student_forward(batch, models, cfg, gen)  # keeps the graph for phase G
        ok = True
        self._zero_critics()
        logs = self._critic_backward(batch, fake.detach(), gen, 1.0)
        ok &= self._finish_critics()
        self.opt_g.zero_grad(set_to_none=True)
        g_losses, g_logs = step(batch, models, cfg, "G", generator=gen, fake=fake)
        g_ok = self._apply(g_losses["total"], self.student_params, self.opt_g)
        logs.update(g_logs)
        return ok, g_ok, logs

    def _step_accumulated(self, streams: Sequence[int]) -> tuple[bool, bool, dict[str, float]]:
        """Several streams on this rank: the same update as one stream per rank, by gradient accumulation.

        Each stream's phase starts from the same discriminator buffers (spectral-norm power-iteration
        vectors), as it would on its own rank; the student output of phase G is recomputed from the
        stream's saved generator state, so it equals the one phase D saw (no graph kept per stream)."""
        cfg, models, n = self.cfg, self.models, len(streams)
        disc = models.discriminator
        batches, after_data, after_d = [], [], []
        sums: dict[str, float] = {}

        def add(d: dict[str, float]) -> None:
            for k, v in d.items():
                sums[k] = sums.get(k, 0.0) + float(v) / n

        ok = True
        buffers = _buffers(disc)
        self._zero_critics()
        for r in streams:
            gen = self._seed(r)
            batches.append(self.data(gen, cfg.batch_size))
            after_data.append(gen.get_state())
            with torch.no_grad():
                fake = student_forward(batches[-1], models, cfg, gen)
            _restore(disc, buffers)
            add(self._critic_backward(batches[-1], fake, gen, 1.0 / n))
            after_d.append(gen.get_state())
        ok &= self._finish_critics()
        buffers = _buffers(disc)
        self.opt_g.zero_grad(set_to_none=True)
        for i, batch in enumerate(batches):
            self.generator.set_state(after_data[i])
            fake = student_forward(batch, models, cfg, self.generator)
            self.generator.set_state(after_d[i])
            _restore(disc, buffers)
            g_losses, g_logs = step(batch, models, cfg, "G", generator=self.generator, fake=fake)
            self._backward(g_losses["total"], self.student_params, 1.0 / n)
            add(g_logs)
        g_ok = self._finish(self.student_params, self.opt_g)
        return ok, g_ok, sums

    def _save(self, checkpoint_dir: str, keep_last: int | None,
              on_save: Callable[["Trainer", str], None] | None) -> None:
        from .checkpoint import checkpoint_path, save_checkpoint  # local import: checkpoint imports this module

        if self.dist.is_main:  # rank 0 alone writes; the others wait until the files are in place
            self.last_checkpoint = save_checkpoint(self, checkpoint_dir, keep_last=keep_last)
            if on_save is not None:
                on_save(self, self.last_checkpoint)
        else:
            self.last_checkpoint, self.saved_step = checkpoint_path(checkpoint_dir, self.step), self.step
        self.dist.barrier()

    def run(self, stop_event: threading.Event | None = None,
            progress: Callable[[int, dict], None] | None = None,
            preview: Callable[[int, "Trainer"], None] | None = None,
            checkpoint_dir: str | None = None, keep_last: int | None = None,
            on_save: Callable[["Trainer", str], None] | None = None) -> TrainResult:
        """Train until ``cfg.max_steps`` or until ``stop_event`` is set (checked between steps).

        Saves to ``checkpoint_dir`` every ``save_every`` steps, only after a finite iteration, and
        at the end (also when stopped early); ``keep_last`` prunes older checkpoints; ``on_save``
        is called after each save (e.g. to export the LoRA of that step). After
        ``max_nonfinite_steps`` consecutive skipped iterations raises
        :class:`NonFiniteTrainingError`; the last good checkpoint is left untouched.
        """
        cfg, logs, stopped = self.cfg, {}, False
        while self.step < cfg.max_steps:
            if stop_event is not None and stop_event.is_set():
                stopped = True
                break
            logs = self.train_step()
            if self.nonfinite_consecutive >= cfg.max_nonfinite_steps:
                raise NonFiniteTrainingError(
                    f"Stopped at step {self.step}: {self.nonfinite_consecutive} consecutive steps had a non-finite "
                    f"loss or gradient. Last good checkpoint: {self.last_checkpoint or 'none saved'}. Lower the "
                    "learning rates, check the data for NaN/inf, or keep the VAE/heads in fp32.")
            if progress is not None:
                progress(self.step, logs)
            if preview is not None and cfg.preview_every and self.step % cfg.preview_every == 0:
                preview(self.step, self)
            if (checkpoint_dir and cfg.save_every and self.step % cfg.save_every == 0
                    and self.nonfinite_consecutive == 0):
                self._save(checkpoint_dir, keep_last, on_save)
        if checkpoint_dir and self.nonfinite_consecutive == 0 and self.saved_step != self.step:
            self._save(checkpoint_dir, keep_last, on_save)
        return TrainResult(step=self.step, stopped=stopped, nonfinite_total=self.nonfinite_total,
                           last_logs=logs, last_checkpoint=self.last_checkpoint)

"""ADD training step and loop (arXiv 2311.17042, Sec. 3 / Fig. 2; spec steps 1-6).

One iteration: x0 -> student input x_s at s ~ U(T_student) -> x_hat_theta = student(x_s, s, c) ->
phase 'D' on sg(x_hat_theta) (hinge + gamma R1) -> phase 'G' (hinge adv + lambda * c(t) distill).
Losses are computed by :func:`step` (pure: no optimiser in it); :class:`Trainer` owns optimisers,
EMA, RNG, non-finite bookkeeping, stop event and callbacks.

Noise form: every x handed to a denoiser here is VE form, x = x0 + sigma * eps (ComfyUI's).
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..core.errors import NonFiniteTrainingError
from .config import ADDConfig
from .distributed import Dist, local_streams, stream_seed
from .discriminator import (Discriminator, HookedActivations, PixelFeatures, TeacherFeatures, check_frozen,
                            probe_feature_channels)
from .losses import DistillationLoss, HingeDLoss, HingeGLoss, R1Penalty
from .schedule import DiscreteSchedule, add_noise_ve, broadcast_like
from .student import DenoiseFn, FullStudent, LoRAStudent

Batch = Mapping[str, Any]  # {"x0": (B, ...) latents, "cond": any, "uncond": any?, "pooled": (B, c)?}
DataFn = Callable[[torch.Generator, int], Batch]  # (generator, batch_size) -> batch; deterministic



@dataclass
class ADDModels:
    """Everything :func:`step` needs. ``student`` is a LoRAStudent or FullStudent."""

    student: LoRAStudent | FullStudent
    discriminator: Discriminator | None  # None when adv_weight == 0 (distillation-only ablation)
    schedule: DiscreteSchedule


def build_models(network: nn.Module, denoise: DenoiseFn, cfg: ADDConfig, schedule: DiscreteSchedule,
                 *, feature_modules: Sequence[str] | None = None,
                 feature_fn: Callable[[Tensor, Any, torch.Generator], list] | None = None,
                 probe_batch: Batch | None = None, c_dim: int = 0,
                 target_modules: Sequence[str] | None = None,
                 full_copy: Callable[[nn.Module], nn.Module] | None = None) -> ADDModels:
    """Build student + discriminator around one host network.

    - ``denoise(network, x_ve, sigma, cond) -> x0`` runs the network (ComfyUI adapter or toy).
    - 'teacher' discriminator: pass ``feature_modules`` (names of submodules of ``network`` whose
      outputs are the features; read with forward hooks on the frozen teacher, adapters off).
    - 'dinov2' (or any custom) discriminator: pass ``feature_fn(x0, cond, generator) -> list``,
      e.g. a :class:`training.discriminator.DinoV2Features`.
    ``probe_batch`` (one batch) is used once to read the feature widths. ``c_dim > 0`` makes the
    heads projection-conditioned on ``batch['pooled']``. ``full_copy(network)`` builds the trainable
    copy of ``training_mode='full'`` (default: a deep copy; see FullStudent).
    """
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)  # init-only generator, separate from training's
    if cfg.training_mode == "lora":
        student: LoRAStudent | FullStudent = LoRAStudent(network, denoise, cfg.lora_rank, cfg.lora_alpha, gen,
                                                         target_modules=target_modules)
    else:
        student = FullStudent(network, denoise, make_copy=full_copy)
    check_frozen(student.teacher_params(), "teacher")
    disc = None
    if cfg.adv_weight > 0:
        head_channels = cfg.disc_head_channels
        if feature_fn is None and cfg.discriminator == "pixel":
            feature_fn = PixelFeatures(schedule, cfg.disc_timestep_range)
            head_channels = head_channels or 64  # a latent has too few channels to be a head's width
        if feature_fn is None:
            if cfg.discriminator != "teacher" or not feature_modules:
                raise ValueError("build_models: discriminator='teacher' needs feature_modules (submodule names of "
                                 "the network); discriminator='dinov2' needs feature_fn=DinoV2Features(...).")
            hooks = HookedActivations(student.teacher_network(), feature_modules)

            def teacher_features(x: Tensor, sigma: Tensor, cond: Any) -> list:
                return hooks(lambda: student.teacher(x, sigma, cond))

            feature_fn = TeacherFeatures(teacher_features, schedule, cfg.disc_timestep_range,
                                         frozen_params=student.teacher_params())
        if probe_batch is None:
            raise ValueError("build_models: pass probe_batch (one batch from your data) to size the heads.")
        probe_gen = torch.Generator(device=_gen_device(probe_batch["x0"])).manual_seed(cfg.seed)
        channels = probe_feature_channels(feature_fn, probe_batch["x0"], probe_batch.get("cond"), probe_gen)
        disc = Discriminator(feature_fn, channels, c_dim=c_dim, head_channels=head_channels,
                             norm=cfg.disc_norm, spectral=cfg.disc_spectral_norm, generator=gen)
        disc.to(probe_batch["x0"].device)
    return ADDModels(student=student, discriminator=disc, schedule=schedule)


def _gen_device(x: Tensor) -> str:
    return "cuda" if x.is_cuda else "cpu"


# --------------------------------------------------------------------------------------------
# the step
# --------------------------------------------------------------------------------------------
def student_input(x0: Tensor, models: ADDModels, cfg: ADDConfig, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Spec step 2: s ~ U(T_student), x = x0 + sigma_s * eps (VE).

    At the top timestep tau_N (index T-1) with ``pure_noise_at_top`` the input is pure noise,
    x = eps / alpha_top (= ComfyUI's full-denoise noise scaling eps * sqrt(1+sigma^2)): zero
    terminal SNR without ever dividing by alpha = 0, since alpha_top is the table's finite value.
    Returns (x_ve (B,...), sigma (B,), t (B,) long).
    """
    b = x0.shape[0]
    ts = torch.tensor(cfg.student_timesteps, dtype=torch.long)
    idx = torch.randint(0, len(ts), (b,), generator=generator, device=generator.device).cpu()
    t = ts[idx]
    sigma = models.schedule.sigma(t, dtype=x0.dtype, device=x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
    x = add_noise_ve(x0, sigma, eps)
    if cfg.pure_noise_at_top:
        top = (t == models.schedule.num_timesteps - 1).to(x0.device)
        if bool(top.any()):
            pure = eps * broadcast_like((1.0 + sigma * sigma).sqrt(), x0)
            x = torch.where(broadcast_like(top, x0).bool(), pure, x)
    return x, sigma, t


def student_forward(batch: Batch, models: ADDModels, cfg: ADDConfig, generator: torch.Generator) -> Tensor:
    """Spec step 3: x_hat_theta = student(x_s, s, c), one evaluation, predicting x0 (B, ...)."""
    x, sigma, _ = student_input(batch["x0"], models, cfg, generator)
    return models.student.student(x, sigma, batch.get("cond"))


def teacher_x0(models: ADDModels, x: Tensor, sigma: Tensor, batch: Batch, cfg_scale: float) -> Tensor:
    """One teacher denoising step (adapters off), with classifier-free guidance when
    ``cfg_scale != 1`` and ``batch['uncond']`` is given: x0 = u + w (c - u). Caller decides grad."""
    cond = models.student.teacher(x, sigma, batch.get("cond"))
    if cfg_scale == 1.0 or batch.get("uncond") is None:
        return cond
    uncond = models.student.teacher(x, sigma, batch["uncond"])
    return uncond + cfg_scale * (cond - uncond)


_HINGE_D, _HINGE_G = HingeDLoss(), HingeGLoss()


def step(batch: Batch, models: ADDModels, cfg: ADDConfig, phase: str, *, generator: torch.Generator,
         fake: Tensor | None = None) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Losses of one phase. ``fake`` = x_hat_theta (computed here when None).

    phase 'D' (spec step 4): L_D = hinge(real, sg(fake)) + gamma * R1(real head inputs).
    phase 'G' (spec step 5): L_G = adv_weight * L_adv + lambda * c(t) * ||x_hat - x_hat_psi||^2.
    Returns ({'total': scalar to backward, parts...}, {name: float for logging}).
    """
    if phase not in ("D", "G"):
        raise ValueError(f"step: phase must be 'D' or 'G', got {phase!r}.")
    x0, cond, pooled = batch["x0"], batch.get("cond"), batch.get("pooled")
    disc = models.discriminator
    if phase == "D":
        if disc is None:
            raise ValueError("step(phase='D') needs a discriminator; cfg.adv_weight is 0.")
        if fake is None:
            with torch.no_grad():
                fake = student_forward(batch, models, cfg, generator)
        fake = fake.detach()  # sg(x_hat_theta): no gradient to the student in the D phase
        real_logits, real_inputs = disc(x0, cond, pooled, generator=generator, grad_through_features=False,
                                        return_inputs=True)
        fake_logits = disc(fake, cond, pooled, generator=generator, grad_through_features=False)
        hinge = _HINGE_D(real_logits, fake_logits)
        r1 = R1Penalty(cfg.r1_gamma)(real_logits, real_inputs)
        total = hinge + r1
        with torch.no_grad():
            real_mean = torch.stack([r.mean() for r in real_logits]).mean()
            fake_mean = torch.stack([f.mean() for f in fake_logits]).mean()
        losses = {"total": total, "d_hinge": hinge, "r1": r1}
        logs = {"d_loss": float(total.detach()), "r1": float(r1.detach()),
                "d_real": float(real_mean), "d_fake": float(fake_mean)}
        return losses, logs

    if fake is None:
        fake = student_forward(batch, models, cfg, generator)
    zero = fake.new_zeros((), dtype=torch.float32)
    adv = zero
    if disc is not None and cfg.adv_weight > 0:
        with _frozen_heads(disc):  # heads are not optimised in phase G; only x_hat gets gradient
            fake_logits = disc(fake, cond, pooled, generator=generator, grad_through_features=True)
        adv = _HINGE_G(fake_logits)
    distill = zero
    if cfg.distill_weight > 0:
        b = fake.shape[0]
        lo, hi = cfg.teacher_timestep_range
        t = torch.randint(lo, hi + 1, (b,), generator=generator, device=generator.device).cpu()
        sigma_t = models.schedule.sigma(t, dtype=fake.dtype, device=fake.device)
        eps = torch.randn(fake.shape, generator=generator, device=generator.device, dtype=fake.dtype).to(fake.device)
        # Re-noise the STUDENT's output (not x0): x_hat_theta,t = x_hat_theta + sigma_t * eps' (VE form).
        with torch.no_grad():  # the teacher target x_hat_psi never carries gradient
            target = teacher_x0(models, add_noise_ve(fake.detach(), sigma_t, eps), sigma_t, batch,
                                cfg.teacher_cfg_scale)
        distill = DistillationLoss(cfg.distill_weighting)(fake, target, sigma_t)
    total = cfg.adv_weight * adv + cfg.distill_weight * distill
    losses = {"total": total, "adv": adv, "distill": distill}
    logs = {"g_loss": float(total.detach()), "adv": float(adv.detach()), "distill": float(distill.detach())}
    if fake.requires_grad and torch.is_grad_enabled():
        _gradient_shares(fake, cfg.distill_weight * distill if cfg.distill_weight > 0 else None, logs,
                         cfg.adv_grad_balance if disc is not None and cfg.adv_weight > 0 else 0.0)
    return losses, logs


def _gradient_shares(fake: Tensor, weighted_distill: Tensor | None, logs: dict[str, float],
                     balance: float = 0.0) -> None:
    """How hard each term pulls on x_hat, and (``balance`` > 0) the adversarial pull rescaled.

    ``grad_distill`` = ||d(lambda L_distill)/d x_hat|| is computed now (cheap: the target is detached);
    ``grad_adv`` = the rest of the gradient that reaches x_hat in the backward pass is measured there by
    a hook, which writes it into ``logs`` (the caller reads logs after backward). With ``balance`` > 0
    the hook rescales that adversarial part to ``balance`` x the distillation part's norm before it
    flows on into the student (an adaptive weight like VQGAN's, taken at the generator's output: the
    teacher-feature discriminator's gradient can be ~50x the distillation's and would drown it)."""
    g_d = (torch.autograd.grad(weighted_distill, fake, retain_graph=True)[0]
           if weighted_distill is not None else torch.zeros_like(fake))
    d_norm = g_d.float().norm()
    logs["grad_distill"] = float(d_norm)
    logs["grad_adv"] = 0.0  # until the backward pass reaches x_hat

    def hook(g: Tensor) -> Tensor | None:
        g_adv = g - g_d.to(g.dtype)
        a_norm = g_adv.float().norm()
        logs["grad_adv"] = float(a_norm)
        if balance > 0 and float(d_norm) > 0 and float(a_norm) > 0:
            return g_d.to(g.dtype) + g_adv * (balance * d_norm / a_norm).to(g.dtype)
        return None

    fake.register_hook(hook)


@contextlib.contextmanager
def _frozen_heads(disc: Discriminator) -> Iterator[None]:
    flags = [p.requires_grad for p in disc.heads.parameters()]
    disc.heads.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(disc.heads.parameters(), flags):
            p.requires_grad_(f)


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
        """``disc_updates - 1`` discriminator updates before the usual D/G pair, each on fresh batches
        of every local stream (DMD2's two time-scale rule: the critic keeps up with the generator).
        Seeded apart from the main batch's streams, so a resumed run draws the same batches."""
        cfg, models, ok = self.cfg, self.models, True
        if self.opt_d is None or cfg.disc_updates <= 1:
            return ok
        n = len(self.streams)
        for k in range(1, cfg.disc_updates):
            self.opt_d.zero_grad(set_to_none=True)
            buffers = _buffers(models.discriminator) if n > 1 else []
            for r in self.streams:
                if n > 1:  # every stream starts from the same spectral-norm vectors, as on its own rank
                    _restore(models.discriminator, buffers)
                gen = self.generator.manual_seed(stream_seed(self.cfg.seed, self.step, r + 1_000_003 * k))
                batch = self.data(gen, cfg.batch_size)
                with torch.no_grad():
                    fake = student_forward(batch, models, cfg, gen)
                d_losses, _ = step(batch, models, cfg, "D", generator=gen, fake=fake)
                self._backward(d_losses["total"], self.disc_params, 1.0 / n)
            ok &= self._finish(self.disc_params, self.opt_d)
        return ok

    def train_step(self) -> dict[str, float]:
        """One iteration: D step then G step on the same x_hat_theta, over this rank's data streams. Returns logs."""
        cfg, models = self.cfg, self.models
        for opt, base in ((self.opt_g, cfg.lr_student), (self.opt_d, cfg.lr_disc)):
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
        logs: dict[str, float] = {}
        ok = True
        if self.opt_d is not None:
            self.opt_d.zero_grad(set_to_none=True)
            d_losses, d_logs = step(batch, models, cfg, "D", generator=gen, fake=fake.detach())
            ok &= self._apply(d_losses["total"], self.disc_params, self.opt_d)
            logs.update(d_logs)
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
        if self.opt_d is not None:
            self.opt_d.zero_grad(set_to_none=True)
        for r in streams:
            gen = self._seed(r)
            batches.append(self.data(gen, cfg.batch_size))
            after_data.append(gen.get_state())
            with torch.no_grad():
                fake = student_forward(batches[-1], models, cfg, gen)
            if self.opt_d is not None:
                _restore(disc, buffers)
                d_losses, d_logs = step(batches[-1], models, cfg, "D", generator=gen, fake=fake)
                self._backward(d_losses["total"], self.disc_params, 1.0 / n)
                add(d_logs)
            after_d.append(gen.get_state())
        if self.opt_d is not None:
            ok &= self._finish(self.disc_params, self.opt_d)
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

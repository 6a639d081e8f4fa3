"""The ADD training step (arXiv 2311.17042, Sec. 3 / Fig. 2; spec steps 1-6): the models it needs and
the losses of one iteration, with no optimiser in it.

x0 -> student input x_s at s ~ U(T_student) -> x_hat_theta = student(x_s, s, c) -> phase 'D' on
sg(x_hat_theta) (hinge + gamma R1) -> phase 'G' (hinge adv + lambda * c(t) distill). With
``distill_loss='dmd'`` a phase 'F' (the fake score denoises sg(x_hat_theta)) comes before 'G', and 'G''s
distillation term is distribution matching (training/fake_score.py). training/loop.py's
:class:`~.loop.Trainer` runs it (optimisers, EMA, RNG streams, non-finite bookkeeping).

Noise form: every x handed to a denoiser here is VE form, x = x0 + sigma * eps (ComfyUI's).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..core.errors import ADDError
from .config import ADDConfig
from .fake_score import FakeScore
import torch.nn.functional as F

from .discriminator import (Discriminator, HookedActivations, PixelFeatures, TeacherFeatures, check_frozen,
                            probe_feature_channels, to_tokens)
from .losses import DistillationLoss, HingeDLoss, HingeGLoss, R1Penalty
from .schedule import DiscreteSchedule, add_noise_ve, broadcast_like
from .student import DenoiseFn, FullStudent, LoRAStudent

Batch = Mapping[str, Any]  # {"x0": (B, ...) latents, "cond": any, "uncond": any?, "pooled": (B, c)?,
#                            "noise": (B, ...)? (the pairs), "real": {"x0", "cond"?, "pooled"?}? (D's real side)}
DataFn = Callable[[torch.Generator, int], Batch]  # (generator, batch_size) -> batch; deterministic


@dataclass
class ADDModels:
    """Everything :func:`step` needs. ``student`` is a LoRAStudent or FullStudent."""

    student: LoRAStudent | FullStudent
    discriminator: Discriminator | None  # None when adv_weight == 0 (distillation-only ablation)
    schedule: DiscreteSchedule
    fake_score: FakeScore | None = None  # distill_loss == 'dmd' only
    # paired_metric 'features' / 'mse+features' with pairs on: the feature network the pairs are compared in (D's own)
    pair_features: Callable[[Tensor, Any, torch.Generator], list] | None = None


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
    fake_score = None
    if cfg.distill_loss == "dmd":
        fake_score = FakeScore(student.teacher_network(), student.teacher, cfg.lora_rank, cfg.lora_alpha, gen,
                               target_modules=target_modules)
    disc, head_channels = None, cfg.disc_head_channels
    pair_features = cfg.paired_weight > 0 and "features" in cfg.paired_metric
    if cfg.adv_weight > 0 or pair_features:
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
    if cfg.adv_weight > 0:
        if probe_batch is None:
            raise ValueError("build_models: pass probe_batch (one batch from your data) to size the heads.")
        probe_gen = torch.Generator(device=_gen_device(probe_batch["x0"])).manual_seed(cfg.seed)
        channels = probe_feature_channels(feature_fn, probe_batch["x0"], probe_batch.get("cond"), probe_gen)
        disc = Discriminator(feature_fn, channels, c_dim=c_dim, head_channels=head_channels,
                             norm=cfg.disc_norm, spectral=cfg.disc_spectral_norm, generator=gen)
        disc.to(probe_batch["x0"].device)
    return ADDModels(student=student, discriminator=disc, schedule=schedule, fake_score=fake_score,
                     pair_features=feature_fn if pair_features else None)


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
    """Spec step 3: x_hat_theta = student(x_s, s, c), one evaluation, predicting x0 (B, ...). With
    ``cfg.backward_simulation`` the inputs below the top timestep are the student's own (:func:`simulated_input`)."""
    x, sigma, t = student_input(batch["x0"], models, cfg, generator)
    if cfg.backward_simulation:
        x = simulated_input(x, t, batch.get("cond"), models, cfg, generator)
    return models.student.student(x, sigma, batch.get("cond"))


def simulated_input(x: Tensor, t: Tensor, cond: Any, models: ADDModels, cfg: ADDConfig,
                    generator: torch.Generator) -> Tensor:
    """DMD2's backward simulation (arXiv 2405.14867): a sample drawn at a lower student timestep gets the
    input the multi-step sampler would give it, not the training image re-noised: pure noise at the top
    timestep, then the student's own steps (predict x0, re-noise with fresh noise to the next timestep,
    VE form), without gradient, down to its timestep. The multi-step student then trains on its own
    inputs. Samples at the top keep ``x``. Costs (number of student timesteps - 1) extra student passes
    without a graph."""
    levels = sorted(set(int(v) for v in cfg.student_timesteps), reverse=True)
    t_cpu = t.cpu()  # the checks below on the host: no device sync per level
    if len(levels) == 1 or bool((t_cpu == levels[0]).all()):
        return x
    b = x.shape[0]

    def sigma_at(level: int) -> Tensor:
        return models.schedule.sigma(torch.full((b,), level, dtype=torch.long), dtype=x.dtype, device=x.device)

    # the sampler's first input, as student_input gives it: pure noise (eps / alpha_top) from the last timestep
    # with pure_noise_at_top, else sigma * eps (ComfyUI's noise scaling below sigma_max)
    s_top = sigma_at(levels[0])
    pure = levels[0] == models.schedule.num_timesteps - 1 and cfg.pure_noise_at_top
    eps = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    cur = eps * broadcast_like((1.0 + s_top * s_top).sqrt() if pure else s_top, x)
    t = t.to(x.device)
    with torch.no_grad():
        for k in range(len(levels) - 1):
            if not bool((t_cpu < levels[k]).any()):
                break
            active = broadcast_like(t < levels[k], x).bool()
            x0_hat = models.student.student(cur, sigma_at(levels[k]), cond)
            fresh = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
            cur = torch.where(active, add_noise_ve(x0_hat.to(x.dtype), sigma_at(levels[k + 1]), fresh), cur)
    return torch.where(broadcast_like(t == levels[0], x).bool(), x, cur)


def teacher_x0(models: ADDModels, x: Tensor, sigma: Tensor, batch: Batch, cfg_scale: float) -> Tensor:
    """One teacher denoising step (adapters off), with classifier-free guidance when
    ``cfg_scale != 1`` and ``batch['uncond']`` is given: x0 = u + w (c - u). Caller decides grad."""
    cond = models.student.teacher(x, sigma, batch.get("cond"))
    if cfg_scale == 1.0 or batch.get("uncond") is None:
        return cond
    uncond = models.student.teacher(x, sigma, batch["uncond"])
    return uncond + cfg_scale * (cond - uncond)


_HINGE_D, _HINGE_G = HingeDLoss(), HingeGLoss()
DMD_TRIM = 0.02  # distribution matching and the fake score use t in [0.02 T, 0.98 T] (DMD2's min/max step)


def step(batch: Batch, models: ADDModels, cfg: ADDConfig, phase: str, *, generator: torch.Generator,
         fake: Tensor | None = None) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Losses of one phase. ``fake`` = x_hat_theta (computed here when None).

    phase 'D' (spec step 4): L_D = hinge(real, sg(fake)) + gamma * R1(real head inputs).
    phase 'G' (spec step 5): L_G = adv_weight * L_adv + lambda * c(t) * ||x_hat - x_hat_psi||^2
    (``distill_loss='dmd'``: lambda * the distribution-matching loss, :func:`dmd_loss`).
    phase 'F' (``distill_loss='dmd'``): the fake score's denoising loss on sg(x_hat), :func:`fake_score_loss`;
    run it and its backward inside ``models.fake_score.active()``.
    Returns ({'total': scalar to backward, parts...}, {name: float for logging}).
    """
    if phase not in ("D", "G", "F"):
        raise ValueError(f"step: phase must be 'D', 'G' or 'F', got {phase!r}.")
    if phase == "F":
        if fake is None:
            with torch.no_grad(), models.fake_score.adapters_enabled(False):  # the student's pass, not the fake's
                fake = student_forward(batch, models, cfg, generator)
        loss = fake_score_loss(batch, models, cfg, fake.detach(), generator)
        return {"total": loss}, {"fake_loss": float(loss.detach())}
    x0, cond, pooled = batch["x0"], batch.get("cond"), batch.get("pooled")
    disc = models.discriminator
    if phase == "D":
        if disc is None:
            raise ValueError("step(phase='D') needs a discriminator; cfg.adv_weight is 0.")
        if fake is None:
            with torch.no_grad():
                fake = student_forward(batch, models, cfg, generator)
        fake = fake.detach()  # sg(x_hat_theta): no gradient to the student in the D phase
        # what D calls real: the batch's own x0, or a second set of images beside it (``batch['real']``:
        # e.g. the user's images while the pairs and the student's inputs come from the teacher)
        real = batch.get("real") or {"x0": x0, "cond": cond, "pooled": pooled}
        real_logits, real_inputs = disc(real["x0"], real.get("cond"), real.get("pooled"), generator=generator,
                                        grad_through_features=False, return_inputs=True)
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
    if cfg.distill_weight > 0 and cfg.distill_loss == "dmd":
        distill = dmd_loss(batch, models, cfg, fake, generator)
    elif cfg.distill_weight > 0:
        # Re-noise the STUDENT's output (not x0): x_hat_theta,t = x_hat_theta + sigma_t * eps' (VE form).
        x_t, sigma_t = _noised(fake.detach(), models, cfg, generator)
        with torch.no_grad():  # the teacher target x_hat_psi never carries gradient
            target = teacher_x0(models, x_t, sigma_t, batch, cfg.teacher_cfg_scale)
        distill = DistillationLoss(cfg.distill_weighting)(fake, target, sigma_t)
    total = cfg.adv_weight * adv + cfg.distill_weight * distill
    losses = {"total": total, "adv": adv, "distill": distill}
    if cfg.paired_weight > 0:
        losses["paired"] = paired_loss(batch, models, cfg.paired_metric, generator)
        total = total + cfg.paired_weight * losses["paired"]
        losses["total"] = total
    logs = {"g_loss": float(total.detach()), "adv": float(adv.detach()), "distill": float(distill.detach())}
    if "paired" in losses:
        logs["paired"] = float(losses["paired"].detach())
    if fake.requires_grad and torch.is_grad_enabled():
        _gradient_shares(fake, cfg.distill_weight * distill if cfg.distill_weight > 0 else None, logs,
                         cfg.adv_grad_balance if disc is not None and cfg.adv_weight > 0 else 0.0)
    return losses, logs


def _noised(x: Tensor, models: ADDModels, cfg: ADDConfig, generator: torch.Generator,
            trim: float = 0.0) -> tuple[Tensor, Tensor]:
    """x re-noised at t ~ U{teacher_timestep_range}: (x_t VE form, sigma_t (B,)). ``trim`` > 0 keeps t
    inside [trim * T, (1 - trim) * T] as well (DMD2's 0.02: the score difference is ill-conditioned at the
    ends of the schedule)."""
    lo, hi = cfg.teacher_timestep_range
    if trim > 0:
        top = cfg.num_train_timesteps - 1
        lo, hi = max(lo, round(trim * top)), min(hi, round((1.0 - trim) * top))
        lo = min(lo, hi)
    t = torch.randint(lo, hi + 1, (x.shape[0],), generator=generator, device=generator.device).cpu()
    sigma = models.schedule.sigma(t, dtype=x.dtype, device=x.device)
    eps = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    return add_noise_ve(x, sigma, eps), sigma


def dmd_loss(batch: Batch, models: ADDModels, cfg: ADDConfig, fake: Tensor, generator: torch.Generator) -> Tensor:
    """Distribution matching (DMD, arXiv 2311.18828, Eq. 7-8; DMD2's normalisation): at t ~ U{teacher range},
    x_t = x_hat + sigma_t eps, the per-sample gradient g = (x0_fake(x_t) - x0_teacher(x_t)) / mean|x_hat -
    x0_teacher(x_t)| (the teacher with CFG ``teacher_cfg_scale``); loss = 0.5 * mean((x_hat - sg(x_hat - g))^2),
    whose gradient on x_hat is g / numel: samples move from where the student puts too much mass (fake
    score) toward the teacher's distribution. Averaged over elements like the regression term."""
    if models.fake_score is None:
        raise ValueError("dmd_loss: models.fake_score is None; build the models with cfg.distill_loss='dmd'.")
    x_t, sigma = _noised(fake.detach(), models, cfg, generator, trim=DMD_TRIM)
    with torch.no_grad():
        real = teacher_x0(models, x_t, sigma, batch, cfg.teacher_cfg_scale).float()
        fake_x0 = models.fake_score.x0(x_t, sigma, batch.get("cond")).float()
        x = fake.detach().float()
        dims = tuple(range(1, x.ndim))
        scale = (x - real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-6)
        g = torch.nan_to_num((fake_x0 - real) / scale)
    return 0.5 * F.mse_loss(fake.float(), x - g)


def fake_score_loss(batch: Batch, models: ADDModels, cfg: ADDConfig, fake: Tensor, generator: torch.Generator) -> Tensor:
    """The fake score learns to denoise the student's samples (detached): at t ~ U{teacher range},
    (1 + 1/sigma^2) * ||x0_fake(x_hat + sigma eps) - x_hat||^2, averaged (the v-prediction loss's
    weighting in x0 terms: bounded at high noise, the usual epsilon-like emphasis at low noise)."""
    if models.fake_score is None:
        raise ValueError("fake_score_loss: models.fake_score is None; build the models with cfg.distill_loss='dmd'.")
    x = fake.detach()
    x_t, sigma = _noised(x, models, cfg, generator, trim=DMD_TRIM)
    pred = models.fake_score.x0(x_t, sigma, batch.get("cond"))
    per_sample = (pred.float() - x.float()).pow(2).reshape(x.shape[0], -1).mean(dim=1)
    weight = 1.0 + 1.0 / sigma.float().pow(2).to(per_sample.device)
    return (weight * per_sample).mean()


def paired_loss(batch: Batch, models: ADDModels, metric: str = "mse",
                generator: torch.Generator | None = None) -> Tensor:
    """Noise-paired regression (Luhman & Luhman 2021; the regression term of DMD, arXiv 2311.18828): the
    student's single step from the pure noise a teacher-generated x0 started from, x = noise * sqrt(1 +
    sigma_top^2) at the top timestep (what the 1-step sampler feeds it), regressed onto that x0. It pins
    WHICH image each noise becomes (the teacher's ODE map), which neither ADD's terms nor distribution
    matching do.

    ``metric`` 'mse': mean ||student(x, sigma_top, c) - x0||^2 in latent space. 'features': an LPIPS-like
    distance in the discriminator's feature network (``models.pair_features``; the teacher's activations
    at t-hat, the same t-hat and noise for both sides): per layer, the squared distance of the
    channel-normalised feature vectors summed over channels and averaged over positions, then averaged
    over layers (latent MSE is known to blur at SD scale; DMD pairs with LPIPS). 'mse+features': their sum
    (the latent term keeps pixel-level noise in view, which the feature distance lets through)."""
    noise = batch.get("noise")
    if noise is None:
        raise ADDError("paired_weight > 0 needs teacher-generated training data (each x0 with the noise it was "
                       "sampled from); this run's data has none (images or latents given). Set paired_weight "
                       "to 0, or train on the teacher's own samples.")
    x0 = batch["x0"]
    top = torch.full((x0.shape[0],), models.schedule.num_timesteps - 1, dtype=torch.long)
    sigma = models.schedule.sigma(top, dtype=x0.dtype, device=x0.device)
    x = noise.to(x0) * broadcast_like((1.0 + sigma * sigma).sqrt(), x0)
    pred = models.student.student(x, sigma, batch.get("cond"))
    mse = (pred.float() - x0.float()).pow(2).mean()
    if metric == "mse":
        return mse
    if metric not in ("features", "mse+features") or models.pair_features is None or generator is None:
        raise ValueError(f"paired_loss: metric {metric!r} needs models.pair_features (build_models with "
                         "paired_metric='features' or 'mse+features') and a generator; or use metric='mse'.")
    state = generator.get_state()
    with torch.no_grad():
        target = [to_tokens(f).float() for f in models.pair_features(x0, batch.get("cond"), generator)]
    generator.set_state(state)  # the same t-hat and noise for the student's side
    got = [to_tokens(f).float() for f in models.pair_features(pred, batch.get("cond"), generator)]
    feat = torch.stack([_unit_channels(a).sub(_unit_channels(b)).pow(2).sum(1).mean()
                        for a, b in zip(got, target)]).mean()
    return feat + mse if metric == "mse+features" else feat


def _unit_channels(f: Tensor, eps: float = 1e-10) -> Tensor:
    """Tokens (B, C, L) scaled to unit length along C at every position (LPIPS' normalisation)."""
    return f / (f.pow(2).sum(dim=1, keepdim=True) + eps).sqrt()


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

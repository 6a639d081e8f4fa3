"""Toy-scale proof of ADD (spec "A small-scale check"): 8 Gaussians on a ring in 2-D.

Teacher: a small MLP epsilon-prediction diffusion model on SD's scaled-linear schedule (so the
same sigma table, top timestep 999 and pure-noise handling as the real models). Student: ADD,
1 step, initialised from the teacher, trained with :mod:`training.loop`; discriminator heads on the
frozen teacher's hidden activations at re-noised t-hat (LADD). Pure torch, seeded, CPU-sized.
Shared by ``benchmarks/toy_add.py`` and the tests.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor

from .config import ADDConfig
from .data import teacher_sample
from .discriminator import init_from_generator_
from .loop import Trainer
from .add_step import build_models
from .schedule import DiscreteSchedule

RING_MODES = 8


def ring_centers(radius: float = 2.0, modes: int = RING_MODES) -> Tensor:
    angles = torch.arange(modes, dtype=torch.float32) * (2 * math.pi / modes)
    return radius * torch.stack([angles.cos(), angles.sin()], dim=1)  # (modes, 2)


def sample_ring(n: int, generator: torch.Generator, radius: float = 2.0, std: float = 0.05) -> Tensor:
    """n points (n, 2) from the mixture of 8 isotropic Gaussians (std) on a ring (radius)."""
    centers = ring_centers(radius)
    k = torch.randint(0, RING_MODES, (n,), generator=generator)
    return centers[k] + std * torch.randn(n, 2, generator=generator)


class ToyEpsMLP(nn.Module):
    """epsilon-prediction MLP: (alpha-form x (B,2), log sigma (B,)) -> eps_hat (B,2).

    Activations ``acts.i`` (SiLU modules, (B, width)) are the discriminator's teacher features.
    """

    def __init__(self, width: int = 256, depth: int = 4, n_freq: int = 16) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(200.0), n_freq)), persistent=False)
        self.inp = nn.Linear(2 + 2 * n_freq, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.acts = nn.ModuleList(nn.SiLU() for _ in range(depth))
        self.out = nn.Linear(width, 2)

    def hidden(self, x_alpha: Tensor, log_sigma: Tensor) -> Tensor:
        """Last hidden activation (B, width), before the epsilon output layer."""
        ang = (log_sigma.float()[:, None] / 4.0) * self.freqs[None, :]  # EDM-like c_noise = log(sigma)/4
        h = self.acts[0](self.inp(torch.cat([x_alpha, ang.sin(), ang.cos()], dim=1)))
        for layer, act in zip(self.layers, self.acts[1:]):
            h = act(layer(h)) + h
        return h

    def forward(self, x_alpha: Tensor, log_sigma: Tensor) -> Tensor:
        return self.out(self.hidden(x_alpha, log_sigma))


class ToyStudentNet(nn.Module):
    """The ADD student's network: the teacher's epsilon MLP plus a zero-initialised x0 head on its
    last hidden layer (c_skip/c_out-style preconditioning for the student only):

        x0 = x - sigma * eps_hat(h) + x0_head(h).

    At initialisation x0_head is 0, so the student IS the teacher. What the student learns through
    the x0 head reaches x0 with gain 1 instead of sigma (~14.6 at the top timestep), where the
    epsilon parametrisation multiplies every output error by sigma. The teacher stays pure eps-pred.
    """

    def __init__(self, eps: ToyEpsMLP) -> None:
        super().__init__()
        self.eps = eps
        width = eps.out.in_features
        self.x0_head = nn.Linear(width, 2)
        with torch.no_grad():
            self.x0_head.weight.zero_()
            self.x0_head.bias.zero_()

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        alpha = (1.0 + sigma * sigma).rsqrt()[:, None]
        h = self.eps.hidden(x * alpha, sigma.log())
        return x - sigma[:, None] * self.eps.out(h) + self.x0_head(h)


def toy_student_denoise(net: nn.Module, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
    """Denoiser for :class:`ToyStudentNet` (frozen teacher = same net with a zero x0 head)."""
    return net(x, sigma)


def toy_denoise(net: nn.Module, x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
    """VE x (B,2), sigma (B,) -> x0 = x - sigma * eps_hat(alpha * x, log sigma). Finite at the top
    timestep: sigma_999 ~ 14.6 is the table's finite value (no division by alpha)."""
    alpha = (1.0 + sigma * sigma).rsqrt()[:, None]
    return x - sigma[:, None] * net(x * alpha, sigma.log())


TOY_FEATURES = ("acts.0", "acts.1", "acts.2", "acts.3")


def train_teacher(steps: int = 3000, batch: int = 512, lr: float = 2e-3, seed: int = 0,
                  schedule: DiscreteSchedule | None = None, width: int = 256) -> ToyEpsMLP:
    """Train the epsilon-prediction teacher: E ||eps - eps_hat(x_t, t)||^2, t ~ U{0..999}."""
    schedule = schedule or DiscreteSchedule.scaled_linear()
    gen = torch.Generator().manual_seed(seed)
    net = init_from_generator_(ToyEpsMLP(width=width), gen)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    for _ in range(steps):
        x0 = sample_ring(batch, gen)
        t = torch.randint(0, schedule.num_timesteps, (batch,), generator=gen)
        sigma = schedule.sigma(t)
        eps = torch.randn(batch, 2, generator=gen)
        x = x0 + sigma[:, None] * eps
        alpha = (1.0 + sigma * sigma).rsqrt()[:, None]
        loss = (net(x * alpha, sigma.log()) - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
def sliced_wasserstein(a: Tensor, b: Tensor, generator: torch.Generator, n_proj: int = 256) -> float:
    """Mean over random unit directions of the 1-D W1 distance between projections (equal sizes)."""
    n = min(a.shape[0], b.shape[0])
    d = torch.randn(a.shape[1], n_proj, generator=generator)
    d = d / d.norm(dim=0, keepdim=True)
    pa, _ = (a[:n] @ d).sort(dim=0)
    pb, _ = (b[:n] @ d).sort(dim=0)
    return float((pa - pb).abs().mean())


def mmd_rbf(a: Tensor, b: Tensor, bandwidths: tuple[float, ...] = (0.05, 0.2, 1.0)) -> float:
    """Biased MMD^2 with a sum of RBF kernels (multi-scale: mode sharpness and placement)."""
    def k(x: Tensor, y: Tensor) -> Tensor:
        d2 = torch.cdist(x, y).pow(2)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)
    return float(k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean())


def mode_stats(x: Tensor, radius: float = 2.0, std: float = 0.05, n_std: float = 3.0,
               min_share: float = 0.25) -> tuple[int, float]:
    """(modes covered, high-quality fraction). A sample is high-quality when within n_std*std of its
    nearest centre; a mode is covered when it holds >= min_share of its fair share (N/8) of them."""
    centers = ring_centers(radius)
    dist = torch.cdist(x, centers)  # (N, 8)
    d, k = dist.min(dim=1)
    hq = d < n_std * std
    counts = torch.bincount(k[hq], minlength=RING_MODES)
    covered = int((counts >= min_share * x.shape[0] / RING_MODES).sum())
    return covered, float(hq.float().mean())


@dataclass
class ToyResult:
    name: str
    swd: float
    mmd: float
    modes: int
    hq: float


def evaluate(name: str, samples: Tensor, seed: int = 123) -> ToyResult:
    gen = torch.Generator().manual_seed(seed)
    ref = sample_ring(samples.shape[0], gen)
    modes, hq = mode_stats(samples)
    return ToyResult(name, sliced_wasserstein(samples, ref, gen), mmd_rbf(samples, ref), modes, hq)


# --------------------------------------------------------------------------------------------
# ADD on the toy
# --------------------------------------------------------------------------------------------
def toy_add_config(**overrides: Any) -> ADDConfig:
    """Defaults tuned for the toy (see benchmarks/toy_add.py for what was tried)."""
    base = dict(student_timesteps=(999,), training_mode="full", lr_full=3e-4, lr_disc=2e-3, batch_size=128,
                lr_schedule="cosine", ema_decay=0.99, disc_norm="sample", disc_timestep_range=(0, 10),
                teacher_timestep_range=(1, 50), max_steps=2400, save_every=0, preview_every=0,
                disc_head_channels=64, weight_decay=0.0)
    base.update(overrides)
    return ADDConfig(**base)


def train_toy_student(teacher: nn.Module, cfg: ADDConfig, schedule: DiscreteSchedule | None = None,
                      progress: Callable[[int, dict], None] | None = None, x0_head: bool = False) -> tuple[Callable[[Tensor, Tensor], Tensor], Trainer]:
    """ADD-train a 1-step student from a copy of ``teacher``; returns (student x0 fn, trainer).
    ``x0_head=True`` trains a :class:`ToyStudentNet` (teacher + zero-init x0 head) instead of the
    plain eps-pred copy; measured over 5 seeds it did not beat the plain copy (see the benchmark)."""
    schedule = schedule or DiscreteSchedule.scaled_linear()
    network: nn.Module = copy.deepcopy(teacher)
    denoise, features = toy_denoise, TOY_FEATURES
    if x0_head:
        network = ToyStudentNet(network)
        denoise, features = toy_student_denoise, tuple("eps." + f for f in TOY_FEATURES)
    data_gen_seed = cfg.seed + 7

    def data(generator: torch.Generator, batch_size: int) -> dict:
        return {"x0": sample_ring(batch_size, generator)}

    probe = data(torch.Generator().manual_seed(data_gen_seed), cfg.batch_size)
    models = build_models(network, denoise, cfg, schedule, feature_modules=features, probe_batch=probe)
    trainer = Trainer(models, cfg, data)
    trainer.run(progress=progress)
    if trainer.ema is not None:
        for p, s in zip(trainer.ema.params, trainer.ema.shadow):
            p.data.copy_(s)
    return (lambda x, sigma: models.student.student(x, sigma, None)), trainer


@torch.no_grad()
def one_step_samples(denoise: Callable[[Tensor, Tensor], Tensor], n: int, seed: int = 99,
                     schedule: DiscreteSchedule | None = None) -> Tensor:
    """The 1-step sampler: x = eps * sqrt(1+sigma_999^2) (pure noise), x0 = model(x, sigma_999)."""
    schedule = schedule or DiscreteSchedule.scaled_linear()
    gen = torch.Generator().manual_seed(seed)
    sig = schedule.sigma(schedule.num_timesteps - 1).expand(n)
    x = torch.randn(n, 2, generator=gen) * (1.0 + sig[:, None] ** 2).sqrt()
    return denoise(x, sig)


@torch.no_grad()
def teacher_samples(teacher: nn.Module, n: int, steps: int, seed: int = 99,
                    schedule: DiscreteSchedule | None = None) -> Tensor:
    schedule = schedule or DiscreteSchedule.scaled_linear()
    gen = torch.Generator().manual_seed(seed)
    return teacher_sample(lambda x, s, c: toy_denoise(teacher, x, s), (n, 2), schedule, gen, steps=steps)


def run_suite(teacher_steps: int, steps: int, batch: int, samples: int = 4000,
              log: Callable[[str], None] | None = None, x0_head: bool = False,
              **overrides: Any) -> dict[str, ToyResult]:
    """Teacher 1/50 steps and the three ADD variants (full, distillation only, adversarial only) on
    one teacher with one budget. ``overrides`` go to :func:`toy_add_config` for every variant."""
    import time

    t0 = time.time()
    teacher = train_teacher(steps=teacher_steps, width=128)
    if log:
        log(f"teacher: {teacher_steps} steps in {time.time() - t0:.0f} s")
    out = {"teacher_1": evaluate("teacher, 1 step", teacher_samples(teacher, samples, 1)),
           "teacher_50": evaluate("teacher, 50 steps", teacher_samples(teacher, samples, 50))}
    variants = {"add": ("ADD, 1 step", {}), "distill_only": ("distillation only, 1 step", {"adv_weight": 0.0}),
                "adv_only": ("adversarial only, 1 step", {"distill_weight": 0.0})}
    for key, (name, extra) in variants.items():
        t1 = time.time()
        cfg = toy_add_config(max_steps=steps, batch_size=batch, **{**overrides, **extra})
        student, _ = train_toy_student(teacher, cfg, x0_head=x0_head)
        out[key] = evaluate(name, one_step_samples(student, samples))
        if log:
            log(f"{name}: {steps} steps in {time.time() - t1:.0f} s")
    return out

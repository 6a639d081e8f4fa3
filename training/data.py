"""Batches for ADD training (spec step 1): real latents, or synthetic x0 from the teacher (LADD).

A data source is a callable ``(generator, batch_size) -> batch`` drawing all randomness from the
trainer's generator, so resuming a checkpoint resumes the data stream. A batch is a dict:
``x0`` (B, ...) latents, ``cond`` (conditioning passed to the denoiser), optional ``uncond``
(for teacher CFG) and ``pooled`` (B, c_dim) for projection-conditioned heads.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..core.errors import ADDError
from .schedule import DiscreteSchedule, add_noise_ve

Encoder = Callable[[list], tuple[Any, Tensor | None]]  # prompts -> (cond, pooled (B, c) or None)


def _rows(c: Any) -> int:
    """Leading size of a tensor, or of every tensor in a dict (they must agree)."""
    if isinstance(c, dict):
        sizes = {_rows(v) for v in c.values() if v is not None}
        if len(sizes) != 1:
            raise ValueError(f"conditioning dict with inconsistent leading sizes {sorted(sizes)}.")
        return sizes.pop()
    return int(c.shape[0])


def take_rows(c: Any, idx: Tensor) -> Any:
    """Rows ``idx`` of a tensor, or of every tensor in a dict (host conditioning such as
    ``{"context": (N, L, D), "y": (N, adm)}``)."""
    if c is None:
        return None
    if isinstance(c, dict):
        return {k: take_rows(v, idx) for k, v in c.items()}
    return c[idx.to(c.device)]


class LatentDataset:
    """Pre-encoded latents (N, ...) with optional per-sample ``cond`` (a tensor or a dict of
    tensors, N rows each) and ``pooled`` (N, c), and a shared ``uncond`` passed as is (the
    denoiser broadcasts a batch of 1). Samples with replacement."""

    def __init__(self, latents: Tensor, cond: Any = None, pooled: Tensor | None = None,
                 uncond: Any = None, noise: Tensor | None = None) -> None:
        n = latents.shape[0]
        for name, t in (("cond", cond), ("pooled", pooled), ("noise", noise)):
            if t is not None and _rows(t) != n:
                raise ValueError(f"LatentDataset: {name} has {_rows(t)} rows for {n} latents; one per latent expected.")
        if n == 0:
            raise ValueError("LatentDataset: no latents given; encode at least one image first.")
        if noise is not None and noise.shape != latents.shape:
            raise ValueError(f"LatentDataset: noise has shape {tuple(noise.shape)}, the latents {tuple(latents.shape)}.")
        self.latents, self.cond, self.pooled, self.uncond = latents, cond, pooled, uncond
        self.noise = noise  # teacher-generated latents: the pure noise each one was sampled from (paired_weight)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __call__(self, generator: torch.Generator, batch_size: int) -> dict[str, Any]:
        idx = torch.randint(0, len(self), (batch_size,), generator=generator, device=generator.device).cpu()
        batch: dict[str, Any] = {"x0": self.latents[idx.to(self.latents.device)]}
        if self.noise is not None:
            batch["noise"] = self.noise[idx.to(self.noise.device)]
        if self.cond is not None:
            batch["cond"] = take_rows(self.cond, idx)
        if self.pooled is not None:
            batch["pooled"] = take_rows(self.pooled, idx)
        if self.uncond is not None:
            batch["uncond"] = (self.uncond.expand(batch_size, *self.uncond.shape[1:])
                               if torch.is_tensor(self.uncond) else self.uncond)
        return batch


@torch.no_grad()
def teacher_sample(teacher: Callable[[Tensor, Tensor, Any], Tensor], shape: Sequence[int], schedule: DiscreteSchedule,
                   generator: torch.Generator, steps: int = 50, cond: Any = None, uncond: Any = None,
                   cfg_scale: float = 1.0, device: str | torch.device = "cpu",
                   return_noise: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Deterministic DDIM (eta=0) from pure noise, VE form: x_{n+1} = x0_hat + sigma_{n+1} * eps_hat,
    eps_hat = (x - x0_hat) / sigma_n; CFG x0 = u + w (c - u) when ``uncond`` is given. -> x0 (shape), or
    (x0, eps) with ``return_noise``: eps ~ N(0, 1) is the noise it started from, x = eps * sqrt(1 + sigma_top^2)
    (the same input the 1-step student gets at the top timestep)."""
    ts = torch.linspace(schedule.num_timesteps - 1, 0, steps).round().long()
    sig = schedule.sigma(ts, dtype=torch.float32, device=device)
    b = shape[0]
    eps = torch.randn(tuple(shape), generator=generator, device=generator.device).to(device)
    x = eps * (1.0 + sig[0] ** 2).sqrt()  # pure noise, ComfyUI's full-denoise scaling
    x0 = x
    for n in range(steps):
        s = sig[n].expand(b)
        x0 = teacher(x, s, cond)
        if uncond is not None and cfg_scale != 1.0:
            u = teacher(x, s, uncond)
            x0 = u + cfg_scale * (x0 - u)
        if n + 1 < steps:
            eps_hat = (x - x0) / sig[n]
            x = x0 + sig[n + 1] * eps_hat
    return (x0, eps) if return_noise else x0


class SyntheticTeacherData:
    """LADD-style data without a dataset: x0 generated by the teacher with CFG from a prompt list.

    ``encode(prompts) -> (cond, pooled)``; ``uncond`` is the empty-prompt conditioning for CFG.
    Costs ``steps`` (x2 with CFG) teacher calls per batch. Each batch carries the noise every x0 started
    from (``"noise"``: the noise-paired regression, ``ADDConfig.paired_weight``).
    """

    def __init__(self, teacher: Callable[[Tensor, Tensor, Any], Tensor], prompts: Sequence[str], encode: Encoder,
                 latent_shape: Sequence[int], schedule: DiscreteSchedule, steps: int = 25, cfg_scale: float = 7.0,
                 uncond: Any = None, device: str | torch.device = "cpu") -> None:
        if not prompts:
            raise ADDError("SyntheticTeacherData: the prompt list is empty; give at least one prompt.")
        self.teacher, self.prompts, self.encode = teacher, list(prompts), encode
        self.latent_shape, self.schedule, self.steps = tuple(latent_shape), schedule, steps
        self.cfg_scale, self.uncond, self.device = cfg_scale, uncond, device

    def __call__(self, generator: torch.Generator, batch_size: int) -> dict[str, Any]:
        idx = torch.randint(0, len(self.prompts), (batch_size,), generator=generator, device=generator.device).tolist()
        cond, pooled = self.encode([self.prompts[i] for i in idx])
        x0, noise = teacher_sample(self.teacher, (batch_size, *self.latent_shape), self.schedule, generator,
                                   self.steps, cond=cond, uncond=self.uncond, cfg_scale=self.cfg_scale,
                                   device=self.device, return_noise=True)
        batch: dict[str, Any] = {"x0": x0, "cond": cond, "noise": noise}
        if pooled is not None:
            batch["pooled"] = pooled
        if self.uncond is not None:
            batch["uncond"] = self.uncond
        return batch


def noised(x0: Tensor, sigma: Tensor, generator: torch.Generator) -> Tensor:
    """x0 + sigma * eps (VE) with eps from ``generator`` -- small helper for previews."""
    eps = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
    return add_noise_ve(x0, sigma, eps)


class WithRealImages:
    """Teacher-generated batches with the discriminator's real side drawn from real images (the paper's ADD: D
    learns the data, not the teacher). ``data`` gives the student's inputs, the distillation term and the pairs
    (``"noise"``); ``real`` (e.g. a :class:`LatentDataset` of the user's images, with their own conditioning) gives
    ``batch["real"]``, what ``add_step.step`` hands the discriminator as real in place of ``x0``."""

    def __init__(self, data: Callable[[torch.Generator, int], dict[str, Any]],
                 real: Callable[[torch.Generator, int], dict[str, Any]]) -> None:
        self.data, self.real = data, real

    def __call__(self, generator: torch.Generator, batch_size: int) -> dict[str, Any]:
        batch = self.data(generator, batch_size)
        r = self.real(generator, batch_size)
        for key in ("cond", "pooled"):  # a conditional D must see both sides conditioned, or it learns the difference
            if (batch.get(key) is None) != (r.get(key) is None):
                raise ADDError(f"WithRealImages: the training batches {'have' if batch.get(key) is not None else 'lack'} "
                               f"'{key}' and the real images {'have' if r.get(key) is not None else 'lack'} it; give "
                               "both the same kind of conditioning.")
        batch["real"] = {k: r[k] for k in ("x0", "cond", "pooled") if r.get(k) is not None}
        return batch

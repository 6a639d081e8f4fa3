"""Discrete sigma schedule and the two noise forms the training core uses.

Self-contained on purpose (core/ belongs to the sampling code); pure torch.

Forms, used explicitly in every function name/docstring of ``training/``:
- VE form (ComfyUI sampler state, k-diffusion):  x = x0 + sigma * eps,  sigma in (0, inf).
- alpha form (DDPM/VP, the paper's notation):    x_s = alpha * x0 + sigma_vp * eps,
  with alpha = 1/sqrt(1+sigma^2), sigma_vp = sigma/sqrt(1+sigma^2), so x_s = alpha * x.
Denoisers used by the core take VE-form x and return x0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class DiscreteSchedule:
    """``sigmas[t]`` for the discrete timesteps t = 0..T-1 (increasing), VE convention.

    A zero-terminal-SNR table (alphas_cumprod[-1] == 0, sigma = inf) is accepted by
    :meth:`from_alphas_cumprod`, which caps the last sigma at the previous finite one times
    ``terminal_cap_ratio`` and records ``zero_terminal_snr=True``; the top timestep then feeds
    pure noise (spec step 2) and no conversion ever divides by alpha = 0.
    """

    sigmas: Tensor  # (T,) float64, strictly positive, finite, non-decreasing
    zero_terminal_snr: bool = False

    def __post_init__(self) -> None:
        s = self.sigmas
        if s.ndim != 1 or s.numel() < 2:
            raise ValueError(f"DiscreteSchedule.sigmas must be a 1-D table of >= 2 values, got shape {tuple(s.shape)}.")
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise ValueError("DiscreteSchedule.sigmas must be finite and > 0; build zero-terminal-SNR schedules "
                             "with DiscreteSchedule.from_alphas_cumprod, which caps the infinite last sigma.")
        if not bool((s[1:] >= s[:-1]).all()):
            raise ValueError("DiscreteSchedule.sigmas must be non-decreasing in t (t=0 least noisy).")

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor, terminal_cap_ratio: float = 1.0) -> "DiscreteSchedule":
        """sigma_t = sqrt((1 - abar_t) / abar_t); an abar of 0 (zero terminal SNR) is capped."""
        ac = alphas_cumprod.to(torch.float64)
        zero_terminal = bool((ac <= 0).any())
        sig = ((1 - ac) / ac.clamp_min(1e-300)).sqrt()
        if zero_terminal:
            finite = sig[ac > 0]
            if finite.numel() == 0:
                raise ValueError("alphas_cumprod has no positive entry; cannot build a schedule.")
            sig = torch.where(ac > 0, sig, finite.max() * terminal_cap_ratio)
        return cls(sig, zero_terminal_snr=zero_terminal)

    @classmethod
    def scaled_linear(cls, num_timesteps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> "DiscreteSchedule":
        """Stable Diffusion's 'scaled_linear' betas (sqrt-linear), sigma_999 ~ 14.6."""
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
        return cls.from_alphas_cumprod(torch.cumprod(1.0 - betas, dim=0))

    # ---- conversions --------------------------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        return int(self.sigmas.numel())

    def sigma(self, t: Tensor | int, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> Tensor:
        """Discrete timestep index(es) -> VE sigma(s), shape of ``t``."""
        t = torch.as_tensor(t, dtype=torch.long)
        if bool((t < 0).any()) or bool((t >= self.num_timesteps).any()):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}], got {t.tolist()}.")
        return self.sigmas[t.cpu()].to(device=device if device is not None else t.device, dtype=dtype)

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        """VE sigma -> nearest discrete timestep (in log-sigma), long tensor of the same shape."""
        log_s = self.sigmas.log().to(sigma.device)
        d = (sigma.double().log().unsqueeze(-1) - log_s).abs()
        return d.argmin(dim=-1)

    @staticmethod
    def alpha(sigma: Tensor) -> Tensor:
        """VE sigma -> alpha = 1/sqrt(1+sigma^2) (the paper's alpha_t; c(t) 'exponential')."""
        return (1.0 + sigma * sigma).rsqrt()

    @staticmethod
    def sigma_vp(sigma: Tensor) -> Tensor:
        """VE sigma -> sigma_vp = sigma/sqrt(1+sigma^2) (alpha form's noise scale)."""
        return sigma * (1.0 + sigma * sigma).rsqrt()


def broadcast_like(v: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) matching x's rank, for per-sample scalars."""
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1))).to(dtype=x.dtype, device=x.device)


def add_noise_ve(x0: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    """VE form: x = x0 + sigma * eps. sigma is (B,), x0/noise (B, ...)."""
    return x0 + broadcast_like(sigma, x0) * noise

"""The ADD sampler: predict x0, re-noise to the next sigma (pure torch; never imports comfy).

ADD inference (Sauer et al., arXiv 2311.17042, Sec. 3 / App.): for steps n = 1..N,
x0 = model(x, tau_n); unless last, x = alpha_{tau_{n+1}} x0 + sigma_{tau_{n+1}} eps with FRESH eps.
In k-diffusion's sigma space (what ComfyUI samplers see) that re-noising is x = x0 + sigma * eps:
the VP sample divided by alpha. It is the same update as LCM's multistep sampler
(``sample_lcm`` in k-diffusion / ComfyUI), with an option to keep part of the model's own
noise estimate (``noise_strength`` < 1), like DDIM's eta.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import trange

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Renoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def default_noise_sampler(x: torch.Tensor, seed: Optional[int] = None) -> NoiseSampler:
    """k-diffusion's seeded convention: one generator on x's device, seeded once, N(0, I) per call.

    Same draws as ``comfy.k_diffusion.sampling.default_noise_sampler`` for the same seed, so a seed
    reproduces an image, and ``sample_add`` equals ComfyUI's ``lcm`` sampler at noise_strength 1.
    """
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)


def add_noise(sigma: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """x = x0 + sigma * noise (the eps / v-prediction state in sigma space)."""
    return x0 + sigma * noise


@torch.no_grad()
def sample_add(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_strength=1.0,
               noise_sampler: Optional[NoiseSampler] = None, renoise: Optional[Renoise] = None):
    """ADD / SD-Turbo sampling, k-diffusion signature: one model evaluation per sigma step.

    model(x, sigma * s_in, **extra_args) -> x0 (guidance, if any, already applied).
    x: (B, C, ...) noisy latent at sigmas[0]; sigmas: (n + 1,) decreasing, last usually 0.
    noise_strength eta in [0, 1]: the noise put back at the next sigma is
        eps' = eta * z + sqrt(1 - eta^2) * eps_hat,   z ~ N(0, I) fresh,
    eps_hat = (x - x0) / sigma the model's own noise estimate; unit variance is kept for any eta.
    eta = 1 is ADD / LCM (fresh noise only); eta = 0 is deterministic (DDIM, eta = 0).
    renoise(sigma, noise, x0) -> x builds the state at a sigma; default x0 + sigma * noise. A host
    whose models use another parameterisation (e.g. rectified flow) passes its own.
    """
    if not 0.0 <= float(noise_strength) <= 1.0:
        raise ValueError(f"noise_strength={noise_strength} must be in [0, 1]: 1 = fresh noise each step (ADD), 0 = none.")
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed", None)) if noise_sampler is None else noise_sampler
    renoise = add_noise if renoise is None else renoise
    eta = float(noise_strength)
    keep = (1.0 - eta * eta) ** 0.5
    s_in = x.new_ones([x.shape[0]])
    # Branch on Python floats read once: comparing device tensors would make the host wait for
    # each step's model evaluation before it can queue the next one.
    last = [float(s) <= 0 for s in sigmas.tolist()[1:]]
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if last[i]:
            x = denoised
            continue
        noise = noise_sampler(sigma, sigma_next)
        if keep > 0.0:
            # renoise is affine in the noise with slope sigma: invert it for the model's eps estimate.
            eps_hat = (x - renoise(sigma, torch.zeros_like(x), denoised)) / sigma
            noise = eta * noise + keep * eps_hat
        x = renoise(sigma_next, noise, denoised)
    return x

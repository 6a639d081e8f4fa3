"""ADD discriminator: a FROZEN feature network F and small trainable heads D_k (arXiv 2311.17042,
Sec. 3.2; heads after StyleGAN-T, arXiv 2301.09515; teacher features after LADD, arXiv 2403.12015).

Feature networks (selected by ``ADDConfig.discriminator``):
- 'teacher' (default, LADD): activations of the frozen teacher on latents re-noised to t-hat.
  Generic: any callable ``fn(x_ve, sigma, cond) -> list[Tensor]``; :class:`HookedActivations`
  builds one from named submodules of any ``nn.Module`` (e.g. a UNet's input/middle blocks).
- 'dinov2' (paper): DINOv2 ViT-S/14 from a LOCAL safetensors file on decoded images at 224 px.

"Frozen" is not "no_grad": on the generator step gradients flow through F into x_hat_theta, but no
parameter of F ever receives a gradient (its parameters have requires_grad=False, it is kept in
eval mode, and it is never a registered submodule, so it is never optimised or saved).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .schedule import DiscreteSchedule, add_noise_ve

FeatureFn = Callable[[Tensor, Tensor, Any], list]  # (x_ve (B,...), sigma (B,), cond) -> [features]


# --------------------------------------------------------------------------------------------
# deterministic init (module constructors draw from the global RNG; we re-draw from a Generator)
# --------------------------------------------------------------------------------------------
def init_from_generator_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-initialise Linear/Conv weights like PyTorch's defaults, but from ``generator``."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            w = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            with torch.no_grad():
                nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
                if m.bias is not None:
                    fan_in = w[0].numel()
                    bound = 1.0 / math.sqrt(fan_in)
                    nn.init.uniform_(m.bias, -bound, bound, generator=generator)
            if hasattr(m, "parametrizations"):
                sn = m.parametrizations.weight[0]
                with torch.no_grad():  # power-iteration vectors of spectral norm
                    for name in ("_u", "_v"):
                        buf = getattr(sn, name)
                        buf.copy_(F.normalize(torch.randn(buf.shape, generator=generator), dim=0, eps=sn.eps))
    return module


def freeze_(module: nn.Module) -> nn.Module:
    """DiT-style helper: eval mode and no parameter requires grad."""
    return module.eval().requires_grad_(False)


class FrozenModule(nn.Module):
    """Wraps a feature network so it can never be unfrozen: eval() forever, requires_grad_(True) raises."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = freeze_(module)

    def train(self, mode: bool = True) -> "FrozenModule":  # noqa: D102 - stays in eval on purpose
        super().train(False)
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "FrozenModule":
        if requires_grad:
            raise RuntimeError("This feature network is frozen by design (ADD Sec. 3.2); only the "
                               "discriminator heads are trainable.")
        return super().requires_grad_(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# heads
# --------------------------------------------------------------------------------------------
class BatchNormLocal(nn.Module):
    """StyleGAN-T's batch norm over groups of ``virtual_bs`` samples (no running stats), on (B, C, L)."""

    def __init__(self, channels: int, virtual_bs: int = 8, eps: float = 1e-5) -> None:
        super().__init__()
        self.virtual_bs, self.eps = virtual_bs, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        groups = max(1, math.ceil(b / self.virtual_bs))
        while b % groups:  # groups must divide the batch; fall back to fewer, larger groups
            groups -= 1
        xg = x.reshape(groups, b // groups, *x.shape[1:])  # (G, B/G, C, L)
        mean = xg.mean(dim=(1, 3), keepdim=True)
        var = xg.var(dim=(1, 3), keepdim=True, unbiased=False)
        xg = (xg - mean) * torch.rsqrt(var + self.eps)
        return xg.reshape(x.shape) * self.weight[None, :, None] + self.bias[None, :, None]


class _SNConv1d(nn.Module):
    """Conv1d, spectrally normalised unless ``spectral=False``; circular padding when the sequence is long enough, else zeros
    (a 2-D toy or a pooled feature has L=1, where a k=9 kernel degenerates to its centre tap)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, spectral: bool = True) -> None:
        super().__init__()
        self.pad = kernel_size // 2
        conv = nn.Conv1d(c_in, c_out, kernel_size, padding=0)
        self.conv = nn.utils.parametrizations.spectral_norm(conv) if spectral else conv

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] == 1:
            # L=1 (pooled / 2-D toy features): with zero padding only the centre tap sees data, so
            # the conv is a linear map; same result, and much faster than a CPU conv kernel.
            return F.linear(x[..., 0], self.conv.weight[:, :, self.pad], self.conv.bias)[..., None]
        if self.pad:
            mode = "circular" if x.shape[-1] > self.pad else "constant"
            x = F.pad(x, (self.pad, self.pad), mode=mode)
        return self.conv(x)


class SampleNorm(nn.GroupNorm):
    """Per-sample normalisation over (C, L) (GroupNorm with one group): no statistics shared across
    the batch, so each sample is judged on its own. Preferable to BatchNormLocal when features have
    L=1 (pooled vectors, low-dimensional data), where batch statistics would erase absolute position."""

    def __init__(self, channels: int) -> None:
        super().__init__(1, channels)


# name -> norm constructor (ADDConfig.disc_norm)
HEAD_NORMS: dict[str, Callable[[int], nn.Module]] = {"batch_local": BatchNormLocal, "sample": SampleNorm}


class _Block(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel_size: int, norm: str = "batch_local", spectral: bool = True) -> None:
        super().__init__(_SNConv1d(c_in, c_out, kernel_size, spectral), HEAD_NORMS[norm](c_out), nn.LeakyReLU(0.2))


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return (x + self.fn(x)) / math.sqrt(2.0)  # variance-preserving residual (StyleGAN-T)


class DiscHead(nn.Module):
    """One head D_k: 1x1 conv -> norm -> LeakyReLU(0.2) -> residual k=9 block -> projection.

    Input (B, C_in, L) tokens; output logits (B, 1, L). With ``c_dim > 0`` the output is
    projection-conditioned on a pooled condition vector c (B, c_dim) (Miyato & Koyama 2018):
    logit = <cls(h), cmap(c)> / sqrt(cmap_dim).
    """

    def __init__(self, c_in: int, channels: int, c_dim: int = 0, cmap_dim: int = 64, kernel_size: int = 9,
                 norm: str = "batch_local", spectral: bool = True) -> None:
        super().__init__()
        self.c_dim, self.cmap_dim = c_dim, cmap_dim
        self.main = nn.Sequential(_Block(c_in, channels, 1, norm, spectral),
                                  _Residual(_Block(channels, channels, kernel_size, norm, spectral)))
        self.cls = _SNConv1d(channels, cmap_dim if c_dim > 0 else 1, 1, spectral)
        self.cmapper = nn.Linear(c_dim, cmap_dim) if c_dim > 0 else None

    def forward(self, h: Tensor, c: Tensor | None = None) -> Tensor:
        out = self.cls(self.main(h))  # (B, cmap_dim or 1, L)
        if self.cmapper is None:
            return out
        if c is None:
            raise ValueError("This discriminator head is conditioned (c_dim > 0); pass batch['pooled'] (B, c_dim).")
        cmap = self.cmapper(c.float()).unsqueeze(-1)  # (B, cmap_dim, 1)
        return (out * cmap).sum(dim=1, keepdim=True) / math.sqrt(self.cmap_dim)


def to_tokens(f: Tensor) -> Tensor:
    """Feature map -> (B, C, L): (B,C,H,W) flattens space, (B,C) gets L=1, (B,C,L) passes."""
    if f.ndim == 4:
        return f.flatten(2)
    if f.ndim == 2:
        return f.unsqueeze(-1)
    if f.ndim == 3:
        return f
    raise ValueError(f"Unsupported feature shape {tuple(f.shape)}; expected (B,C), (B,C,L) or (B,C,H,W).")


# --------------------------------------------------------------------------------------------
# feature networks
# --------------------------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised by the last hook to skip the rest of a forward whose output is not needed."""


class HookedActivations:
    """Collects the outputs of named submodules of ``module`` during one call of ``run``.

    ``stop_early`` aborts the forward once every named output is captured (saves the decoder half
    of a UNet). Tuple outputs contribute their first tensor. Returned in ``names`` order.
    """

    def __init__(self, module: nn.Module, names: Sequence[str], stop_early: bool = True) -> None:
        available = dict(module.named_modules())
        missing = [n for n in names if n not in available]
        if missing:
            sample = [n for n in available if n][:20]
            raise ValueError(f"HookedActivations: no submodule named {missing}; some available names: {sample}.")
        self.module, self.names, self.stop_early = module, list(names), stop_early
        self._targets = [available[n] for n in self.names]

    def __call__(self, run: Callable[[], Any]) -> list[Tensor]:
        captured: dict[int, Tensor] = {}

        def make_hook(i: int):
            def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
                captured.setdefault(i, out[0] if isinstance(out, (tuple, list)) else out)
                if self.stop_early and len(captured) == len(self.names):
                    raise _StopForward()
            return hook

        handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(self._targets)]
        try:
            run()
        except _StopForward:
            # expected: every requested activation was captured, the rest of the forward is skipped
            assert len(captured) == len(self.names)
        finally:
            for h in handles:
                h.remove()
        if len(captured) != len(self.names):
            never = [self.names[i] for i in range(len(self.names)) if i not in captured]
            raise RuntimeError(f"HookedActivations: modules {never} were not called during the forward pass.")
        return [captured[i] for i in range(len(self.names))]


class TeacherFeatures:
    """LADD feature network: F(x0) = teacher activations at x0 re-noised to t-hat (VE form).

    ``fn(x_ve, sigma, cond) -> list[Tensor]`` must run the teacher with its weights frozen (and,
    for a LoRA student, with adapters disabled). t-hat ~ Uniform{t_range}; eps ~ N(0, I).
    """

    def __init__(self, fn: FeatureFn, schedule: DiscreteSchedule, t_range: tuple[int, int],
                 frozen_params: Sequence[nn.Parameter] = ()) -> None:
        self.fn, self.schedule, self.t_range = fn, schedule, t_range
        self.frozen_params = list(frozen_params)
        check_frozen(self.frozen_params, "teacher feature network")

    def __call__(self, x0: Tensor, cond: Any, generator: torch.Generator) -> list[Tensor]:
        b = x0.shape[0]
        t_hat = torch.randint(self.t_range[0], self.t_range[1] + 1, (b,), generator=generator, device=generator.device)
        sigma = self.schedule.sigma(t_hat.cpu(), dtype=x0.dtype, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
        return list(self.fn(add_noise_ve(x0, sigma, noise), sigma, cond))


class PixelFeatures:
    """A sanity baseline: the latent itself (re-noised to t-hat like the teacher's features) and a 2x
    average-pooled copy, as two feature maps. No frozen network: the heads see exactly the pixels."""

    def __init__(self, schedule: DiscreteSchedule, t_range: tuple[int, int]) -> None:
        self.schedule, self.t_range = schedule, t_range

    def __call__(self, x0: Tensor, cond: Any, generator: torch.Generator) -> list[Tensor]:
        b = x0.shape[0]
        t_hat = torch.randint(self.t_range[0], self.t_range[1] + 1, (b,), generator=generator, device=generator.device)
        sigma = self.schedule.sigma(t_hat.cpu(), dtype=x0.dtype, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
        x = add_noise_ve(x0, sigma, noise) / (1.0 + sigma * sigma).sqrt().reshape(-1, *([1] * (x0.ndim - 1)))
        feats = [x]
        if x.ndim == 4 and min(x.shape[-2:]) >= 2:
            feats.append(F.avg_pool2d(x, 2))
        return feats


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoV2Features:
    """DINOv2 features (paper's discriminator): decode latents -> [0,1] images -> 224 px ->
    ImageNet-normalise -> tokens of the patch embedding and of ``blocks`` as (B, C, 1+N).

    ``decode(latents) -> images (B, 3, H, W) in [0, 1]`` must be differentiable (frozen VAE,
    fp32) so the generator step gets gradient through it.
    """

    def __init__(self, model: nn.Module, decode: Callable[[Tensor], Tensor],
                 blocks: Sequence[int] = (2, 5, 8, 11), resolution: int = 224) -> None:
        self.model = model if isinstance(model, FrozenModule) else FrozenModule(model)
        n_layers = self.model.module.config.num_hidden_layers
        bad = [b for b in blocks if not 0 <= b < n_layers]
        if bad:
            raise ValueError(f"DinoV2Features: blocks {bad} out of range for a {n_layers}-layer model.")
        self.decode, self.blocks, self.resolution = decode, tuple(blocks), resolution

    def __call__(self, x0: Tensor, cond: Any, generator: torch.Generator) -> list[Tensor]:
        img = self.decode(x0).float()
        img = F.interpolate(img, size=(self.resolution, self.resolution), mode="bilinear",
                            align_corners=False, antialias=True)
        mean = img.new_tensor(_IMAGENET_MEAN)[None, :, None, None]
        std = img.new_tensor(_IMAGENET_STD)[None, :, None, None]
        out = self.model(pixel_values=(img.clamp(0, 1) - mean) / std, output_hidden_states=True)
        hs = out.hidden_states  # [embeddings, block0, ..., blockL-1], each (B, 1+N, C)
        picked = [hs[0]] + [hs[b + 1] for b in self.blocks]
        return [h.transpose(1, 2) for h in picked]


def dinov2_vits14_config() -> Any:
    """DINOv2 ViT-S/14 architecture, built in code (no hub access)."""
    from transformers import Dinov2Config
    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                        patch_size=14, image_size=518, layerscale_value=1.0, mlp_ratio=4)


def load_dinov2(weights_path: str | os.PathLike, config: Any = None) -> FrozenModule:
    """Load DINOv2 (transformers ``Dinov2Model``) from a LOCAL .safetensors file; never downloads.

    ``config`` defaults to ViT-S/14. Keys may carry a ``dinov2.`` or ``model.`` prefix.
    """
    from ..core.errors import ADDError
    from ..core.files import read_safetensors

    path = os.fspath(weights_path)
    label = f"dinov2_file {os.path.basename(path)}"
    fix = "Put an intact DINOv2 ViT-S/14 model.safetensors (facebook/dinov2-small) there, or use discriminator 'teacher'."
    if not os.path.isfile(path):
        raise ADDError(f"{label} does not exist (looked for {path}). {fix}")
    if not path.endswith(".safetensors"):
        raise ADDError(f"{label} is not a .safetensors file (this plugin never loads pickles: .pt/.pth/.bin/.ckpt). "
                       f"{fix}")
    state, _ = read_safetensors(path, label, fix)
    try:
        from transformers import Dinov2Model
    except ImportError as exc:
        raise ImportError("discriminator='dinov2' needs the 'transformers' package: pip install transformers; "
                          "or use discriminator='teacher'.") from exc

    for prefix in ("dinov2.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    model = Dinov2Model(config if config is not None else dinov2_vits14_config())
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of the right name with the wrong shape (another ViT size)
        raise ADDError(f"{label} holds tensors of other shapes than DINOv2 ViT-S/14 "
                       f"({str(exc).splitlines()[-1].strip()[:200]}). {fix}") from None
    if result.missing_keys:
        expected = len(model.state_dict())
        raise ADDError(f"{label} does not hold DINOv2 ViT-S/14 weights: {len(result.missing_keys)} of {expected} "
                       f"tensors are missing (e.g. {result.missing_keys[:3]}; the file has e.g. "
                       f"{sorted(state)[:3]}). {fix}")
    return FrozenModule(model.float())


def check_frozen(params: Sequence[nn.Parameter], what: str) -> None:
    """Raise if any of ``params`` would receive gradient."""
    if any(p.requires_grad for p in params):
        raise RuntimeError(f"The {what} has parameters with requires_grad=True; it must be frozen "
                           "(call .requires_grad_(False) on it, or build the student with build_models).")


# --------------------------------------------------------------------------------------------
# discriminator
# --------------------------------------------------------------------------------------------
class Discriminator(nn.Module):
    """Trainable heads over a frozen feature network.

    ``features(x0, cond, generator) -> list of K tensors``; ``feature_channels[k]`` is the channel
    width of feature k. The feature network is stored as a plain attribute (not a submodule):
    ``parameters()``/``state_dict()`` hold the heads only.
    """

    def __init__(self, features: Callable[[Tensor, Any, torch.Generator], list], feature_channels: Sequence[int],
                 c_dim: int = 0, head_channels: int = 0, cmap_dim: int = 64, norm: str = "batch_local",
                 spectral: bool = True, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if norm not in HEAD_NORMS:
            raise ValueError(f"Discriminator: norm={norm!r}; expected one of {sorted(HEAD_NORMS)}.")
        object.__setattr__(self, "features", features)
        self.heads = nn.ModuleList(
            DiscHead(c, head_channels or c, c_dim=c_dim, cmap_dim=cmap_dim, norm=norm, spectral=spectral)
            for c in feature_channels)
        if generator is not None:
            init_from_generator_(self.heads, generator)

    def train(self, mode: bool = True) -> "Discriminator":
        """Only the heads switch mode; a feature module stays in eval (StyleGAN-T)."""
        self.training = mode
        self.heads.train(mode)
        return self

    def forward(self, x0: Tensor, cond: Any = None, pooled: Tensor | None = None,
                generator: torch.Generator | None = None, grad_through_features: bool = True,
                return_inputs: bool = False) -> Any:
        """Logits per head (list of (B, 1, L) fp32 tensors).

        grad_through_features=False computes features without a graph (discriminator step).
        return_inputs=True also returns the heads' inputs, marked requires_grad for R1.
        """
        if generator is None:
            raise ValueError("Discriminator.forward needs a torch.Generator (noise levels t-hat, determinism).")
        with torch.set_grad_enabled(grad_through_features and torch.is_grad_enabled()):
            feats = self.features(x0, cond, generator)
        if len(feats) != len(self.heads):
            raise RuntimeError(f"Feature network returned {len(feats)} features for {len(self.heads)} heads.")
        inputs = [to_tokens(f).float() for f in feats]  # heads run in fp32 (spec step 6)
        if return_inputs:
            inputs = [h.detach().requires_grad_(True) for h in inputs]
        logits = [head(h, pooled) for head, h in zip(self.heads, inputs)]
        return (logits, inputs) if return_inputs else logits


@torch.no_grad()
def probe_feature_channels(features: Callable[[Tensor, Any, torch.Generator], list], x0: Tensor, cond: Any,
                           generator: torch.Generator) -> list[int]:
    """Channel widths of the feature network's outputs, by one no-grad call on a sample batch."""
    return [to_tokens(f).shape[1] for f in features(x0, cond, generator)]

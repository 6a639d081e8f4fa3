"""The ADD student (arXiv 2311.17042, Sec. 3.1): initialised from the teacher's weights.

Two forms:
- :class:`LoRAStudent` (default): low-rank adapters on the teacher's own network, so teacher and
  student share ONE copy of the weights; the teacher pass is the same network with adapters off.
- :class:`FullStudent`: a deep copy of the network is trained; the original stays the frozen teacher.

Why a small LoRA of our own instead of peft: (1) peft draws the adapters' initial weights from the
global RNG, and this core must be seeded through ``torch.Generator`` objects only (bit-exact
resume, no global seeding); (2) peft's ``inject_adapter_in_model`` replaces submodules, which
changes the host network's ``state_dict`` keys and module tree -- the host here is ComfyUI's live
UNet, which other code (model patches, key maps) addresses by those names; forward hooks leave the
network untouched and are removed cleanly; (3) switching adapters off without a ``PeftModel``
wrapper goes through peft-internal layer APIs; (4) ComfyUI's LoRA key format is written directly.
The adapters compute in fp32 whatever the host dtype (losses and optimisers stay fp32).
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch import Tensor

from .lora_extract import ExtractReport, extract_lora

DenoiseFn = Callable[[nn.Module, Tensor, Tensor, Any], Tensor]  # (network, x_ve, sigma (B,), cond) -> x0

_LORA_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


class LoRAAdapter(nn.Module):
    """delta(x) = up(down(x)) * alpha / rank for one Linear/Conv layer; ``up`` starts at zero so the
    student starts exactly at the teacher (Hu et al. 2021)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, (nn.Conv1d, nn.Conv2d)):
            if base.groups != 1 or base.padding_mode != "zeros":
                raise ValueError(f"LoRA on grouped or non-zero-padded convolutions is not supported ({base}).")
            conv = nn.Conv1d if isinstance(base, nn.Conv1d) else nn.Conv2d
            self.down = conv(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                             bias=False)
            self.up = conv(rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA supports {[t.__name__ for t in _LORA_TYPES]}, got {type(base).__name__}.")
        self.rank, self.alpha = rank, float(alpha)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.up.weight)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))) * self.scale


def find_lora_targets(network: nn.Module, target_modules: Sequence[str] | None) -> list[str]:
    """Names of Linear/Conv submodules to adapt: all of them (``None``), or those whose name equals
    or ends with ``.<entry>`` for an entry of ``target_modules`` (e.g. 'to_q', 'proj_in')."""
    names = []
    for name, mod in network.named_modules():
        if not name or not isinstance(mod, _LORA_TYPES):
            continue
        if target_modules is None or any(name == t or name.endswith("." + t) for t in target_modules):
            names.append(name)
    if not names:
        raise ValueError(f"No Linear/Conv submodule matches target_modules={list(target_modules or [])}; "
                         "pass names or name suffixes of layers in the network.")
    return names


class HookedAdapters:
    """LoRA adapters on the Linear/Conv layers of a host network, added to each layer's output by a
    forward hook while switched on; the host's modules and state_dict stay untouched, and
    :meth:`remove_hooks` leaves it exactly as it was. Several sets may sit on one network (the
    student's and the fake score's): each adds its own while on."""

    def __init__(self, network: nn.Module, rank: int, alpha: float, generator: torch.Generator,
                 target_modules: Sequence[str] | None, enabled: bool) -> None:
        self.names = find_lora_targets(network, target_modules)
        modules = dict(network.named_modules())
        device = next(network.parameters()).device
        self.adapters = nn.ModuleDict(
            {_key(n): LoRAAdapter(modules[n], rank, alpha, generator) for n in self.names}).to(device)
        self._enabled = enabled
        self._handles = [modules[n].register_forward_hook(self._make_hook(_key(n))) for n in self.names]

    def _make_hook(self, key: str):
        def hook(_mod: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
            if not self._enabled:
                return None  # the host layer's output is used unchanged
            return out + self.adapters[key](args[0]).to(out.dtype)
        return hook

    @contextlib.contextmanager
    def adapters_enabled(self, flag: bool) -> Iterator[None]:
        previous, self._enabled = self._enabled, flag
        try:
            yield
        finally:
            self._enabled = previous

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.adapters.parameters())

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.adapters.state_dict().items()}

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.adapters.load_state_dict(dict(state), strict=True)

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class LoRAStudent(HookedAdapters):
    """Student = teacher network + LoRA adapters applied through forward hooks.

    ``denoise(network, x_ve, sigma, cond) -> x0`` runs the host network. ``student(...)`` runs it
    with adapters on; ``teacher(...)`` with adapters off (same weights, nothing copied). The host
    network is frozen (``requires_grad_(False)``, eval) -- it IS the teacher.
    """

    def __init__(self, network: nn.Module, denoise: DenoiseFn, rank: int, alpha: float,
                 generator: torch.Generator, target_modules: Sequence[str] | None = None) -> None:
        self.network = network.eval().requires_grad_(False)
        self.denoise = denoise
        super().__init__(network, rank, alpha, generator, target_modules, enabled=True)
        self._checkpointed: list[tuple[nn.Module, Callable]] = []

    # ---- the two networks ---------------------------------------------------------------
    def student(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        """x0 prediction of the student (adapters on). VE-form x."""
        with self.adapters_enabled(True):
            return self.denoise(self.network, x, sigma, cond)

    def teacher(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        """x0 prediction of the frozen teacher (adapters off). Not wrapped in no_grad: the
        teacher-feature discriminator needs gradient through it w.r.t. x."""
        with self.adapters_enabled(False):
            return self.denoise(self.network, x, sigma, cond)

    def teacher_network(self) -> nn.Module:
        return self.network

    def teacher_params(self) -> list[nn.Parameter]:
        return list(self.network.parameters())

    # ---- ComfyUI LoRA format ------------------------------------------------------------
    def lora_state_dict(self, prefix: str = "diffusion_model.", dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """``{prefix}<module>.lora_up.weight`` (out, r[,1,1]), ``.lora_down.weight`` (r, in[,k,k]),
        ``.alpha`` (scalar) -- the key format ComfyUI's LoRA loader reads."""
        out: dict[str, Tensor] = {}
        for name in self.names:
            a = self.adapters[_key(name)]
            out[f"{prefix}{name}.lora_up.weight"] = a.up.weight.detach().to(dtype).contiguous().cpu()
            out[f"{prefix}{name}.lora_down.weight"] = a.down.weight.detach().to(dtype).contiguous().cpu()
            out[f"{prefix}{name}.alpha"] = torch.tensor(a.alpha, dtype=dtype)
        return out

    def load_lora_state_dict(self, state: Mapping[str, Tensor], prefix: str = "diffusion_model.") -> None:
        """Inverse of :meth:`lora_state_dict`; every adapter must be present with matching shapes."""
        missing = [n for n in self.names if f"{prefix}{n}.lora_up.weight" not in state]
        if missing:
            raise KeyError(f"LoRA file lacks {len(missing)} modules with prefix {prefix!r}, e.g. {missing[:3]}; "
                           "was it trained for this network and saved with the same prefix?")
        with torch.no_grad():
            for name in self.names:
                a = self.adapters[_key(name)]
                a.up.weight.copy_(state[f"{prefix}{name}.lora_up.weight"])
                a.down.weight.copy_(state[f"{prefix}{name}.lora_down.weight"])
                alpha_key = f"{prefix}{name}.alpha"
                if alpha_key in state:
                    a.alpha = float(state[alpha_key])

    def remove(self) -> None:
        """Detach the hooks: the host network is exactly the teacher again."""
        self.remove_hooks()
        for module, forward in self._checkpointed:
            module.forward = forward
        self._checkpointed = []

    def enable_gradient_checkpointing(self, module_names: Sequence[str]) -> None:
        """Recompute the named submodules' activations in the backward pass instead of storing
        them (torch.utils.checkpoint, non-reentrant): less memory, ~1 extra forward of time.

        The recomputation runs with the adapters switched the way they were in the original
        forward (a teacher pass on the generator step gets gradient w.r.t. its input with the
        adapters OFF; recomputing it with them on would give wrong gradients). Forward hooks on
        the named modules themselves (feature capture) are not re-run.
        """
        def around() -> Callable[[], Any]:
            flag = self._enabled  # as in the original forward
            return lambda: self.adapters_enabled(flag)

        self._checkpointed += checkpoint_forwards(self.network, module_names, around=around)


class FullStudent:
    """Full fine-tune (the ADD paper's setting): the student is a copy of the whole network, every
    weight trained; the original stays the frozen teacher. Memory: the copy plus its gradients and
    two AdamW moments, on top of the teacher.

    ``make_copy(network) -> module`` builds the trainable copy (default ``copy.deepcopy``); the
    node layer passes one that keeps fp32 master weights for a half-precision host, since AdamW
    steps of ~lr = 1e-6 vanish in fp16/bf16 weights. It exports as a LoRA extracted from
    student - teacher (:meth:`lora_state_dict`), so every LoRA loader can use it.
    """

    def __init__(self, network: nn.Module, denoise: DenoiseFn,
                 make_copy: Callable[[nn.Module], nn.Module] | None = None) -> None:
        self.network = network.eval().requires_grad_(False)
        self.copy = (make_copy or copy.deepcopy)(network).requires_grad_(True)
        self.denoise = denoise
        self._checkpointed: list[tuple[nn.Module, Callable]] = []

    def student(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        return self.denoise(self.copy, x, sigma, cond)

    def teacher(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        return self.denoise(self.network, x, sigma, cond)

    @contextlib.contextmanager
    def adapters_enabled(self, flag: bool) -> Iterator[None]:
        yield  # two separate networks: nothing to switch

    def teacher_network(self) -> nn.Module:
        return self.network

    def teacher_params(self) -> list[nn.Parameter]:
        return list(self.network.parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.copy.parameters())

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.copy.state_dict().items()}

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.copy.load_state_dict(dict(state), strict=True)

    def model_state_dict(self, prefix: str = "diffusion_model.") -> dict[str, Tensor]:
        """The fine-tuned weights with ``prefix`` (for saving a full checkpoint)."""
        return {f"{prefix}{k}": v.detach().contiguous().cpu() for k, v in self.copy.state_dict().items()}

    def weight_pairs(self, weights: Sequence[Tensor] | None = None) -> Iterator[tuple[str, Tensor, Tensor]]:
        """(parameter name, student weight, teacher weight) for every parameter, lazily. ``weights``
        replaces the student's own (e.g. the EMA's tensors), in ``trainable_parameters()`` order."""
        teacher = dict(self.network.named_parameters())
        named = list(self.copy.named_parameters())
        if weights is not None and len(weights) != len(named):
            raise ValueError(f"weight_pairs: {len(weights)} weights given for {len(named)} parameters.")
        for i, (name, p) in enumerate(named):
            yield name, (p if weights is None else weights[i]).detach(), teacher[name].detach()

    def lora_state_dict(self, rank: int, prefix: str = "", dtype: torch.dtype = torch.float16,
                        weights: Sequence[Tensor] | None = None) -> tuple[dict[str, Tensor], ExtractReport]:
        """(ComfyUI LoRA state dict, :class:`~training.lora_extract.ExtractReport`): student - teacher
        made rank-``rank`` per layer by truncated SVD (1-D differences exact); keys ``{prefix}<name>``.
        One layer at a time: no second copy of the network is made."""
        pairs = ((prefix + name, s, t) for name, s, t in self.weight_pairs(weights))
        return extract_lora(pairs, rank, dtype)

    def enable_gradient_checkpointing(self, module_names: Sequence[str]) -> None:
        """Recompute the named submodules' activations in backward, in the student copy and in the
        teacher (the teacher-feature discriminator back-propagates through it to its input)."""
        for network in (self.copy, self.network):
            self._checkpointed += checkpoint_forwards(network, module_names)

    def remove(self) -> None:
        """Undo gradient checkpointing (the copy is dropped with the student)."""
        for module, forward in self._checkpointed:
            module.forward = forward
        self._checkpointed = []


def checkpoint_forwards(network: nn.Module, module_names: Sequence[str],
                        around: Callable[[], Any] | None = None) -> list[tuple[nn.Module, Callable]]:
    """Wrap the named submodules' forwards in non-reentrant ``torch.utils.checkpoint`` (activations
    recomputed in backward); -> the (module, original forward) pairs to restore.

    ``around()`` is called at forward time and returns a maker of the context manager that the
    forward and its recomputation each run inside (the LoRA student: the adapters switched as they
    were in the original forward)."""
    modules = dict(network.named_modules())
    missing = [n for n in module_names if n not in modules]
    if missing:
        raise ValueError(f"gradient checkpointing: no submodule named {missing[:3]} in the network.")
    done = []
    for name in module_names:
        module = modules[name]
        forward = module.forward

        def checkpointed(*args: Any, _forward=forward, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            make = around() if around is not None else contextlib.nullcontext

            def run(*a: Any) -> Any:
                with make():
                    return _forward(*a, **kwargs)
            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

        module.forward = checkpointed
        done.append((module, forward))
    return done


def _key(module_name: str) -> str:
    # ModuleDict keys cannot contain '.'; '.' never occurs in a single module name.
    return module_name.replace(".", "__")

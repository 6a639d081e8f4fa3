"""The fake score of distribution matching (DMD, Yin et al. 2023, arXiv 2311.18828; DMD2, arXiv 2405.14867):
a diffusion model of the STUDENT's current samples, trained online beside the student.

ADD's distillation term (Eq. 4) regresses each student sample onto the teacher's denoising of that
sample re-noised: a pointwise target, mode-seeking (the digits study, ``benchmarks/README_digits.md``).
Distribution matching instead moves the student's samples along the difference of two scores at a
random noise level, the teacher's ("real") and that of a model of the student's own outputs ("fake"):
where the student over-produces, the fake score points away; where it under-produces, the real one
pulls. The fake score starts as the teacher and follows the student by denoising its samples.

Here the fake score is the teacher's own network with a second set of LoRA adapters (forward hooks,
like :class:`~.student.LoRAStudent`): nothing is copied, and with its adapters off the network is the
teacher again. A run with ``distill_loss='dmd'`` holds one :class:`FakeScore`.
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .student import HookedAdapters


class FakeScore(HookedAdapters):
    """LoRA adapters on ``network`` (the frozen teacher), switched on only inside :meth:`active`.

    ``teacher(x, sigma, cond) -> x0`` runs the teacher network with the student's own adapters off
    (``LoRAStudent.teacher`` / ``FullStudent.teacher``); inside :meth:`active` the same call is the fake
    score. Run a fake-score forward AND its backward inside :meth:`active`: a gradient-checkpointed
    network recomputes its activations in the backward pass, and they must be the fake score's.
    """

    def __init__(self, network: nn.Module, teacher: Callable[[Tensor, Tensor, Any], Tensor], rank: int,
                 alpha: float, generator: torch.Generator, target_modules: Sequence[str] | None = None) -> None:
        super().__init__(network, rank, alpha, generator, target_modules, enabled=False)
        self._teacher = teacher

    def active(self) -> ContextManager[None]:
        return self.adapters_enabled(True)

    def x0(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        """The fake score's x0 prediction (VE-form x)."""
        with self.active():
            return self._teacher(x, sigma, cond)

"""ADD losses as small callables (Sauer et al., arXiv 2311.17042, Sec. 3.2 / Eq. 2-5).

All losses are computed in fp32. Discriminator outputs are lists over heads k; each logit tensor
is (B, ...) and is averaged per head ("mean" in the spec's formulas), then summed over heads.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .schedule import DiscreteSchedule


class HingeDLoss:
    """Discriminator hinge loss (Eq. 3 of the paper, StyleGAN-T form):
    L_D = sum_k mean(relu(1 - D_k(F_k(x0)))) + sum_k mean(relu(1 + D_k(F_k(sg(x_hat))))).
    """

    def __call__(self, real_logits: Sequence[Tensor], fake_logits: Sequence[Tensor]) -> Tensor:
        real = sum(F.relu(1.0 - r.float()).mean() for r in real_logits)  # push real logits above +1
        fake = sum(F.relu(1.0 + f.float()).mean() for f in fake_logits)  # push fake logits below -1
        return real + fake


class HingeGLoss:
    """Generator side of the hinge game (Eq. 2): L_adv = -sum_k mean(D_k(F_k(x_hat_theta)))."""

    def __call__(self, fake_logits: Sequence[Tensor]) -> Tensor:
        return -sum(f.float().mean() for f in fake_logits)


class R1Penalty:
    """R1 gradient penalty on REAL samples w.r.t. the heads' INPUTS h_k = F_k(x0) (Sec. 3.2):
    gamma * R1,  R1 = mean_b sum_k ||d sum(D_k) / d h_k||^2,  create_graph=True so the penalty
    itself is differentiated w.r.t. the head parameters. Not w.r.t. pixels or head parameters.
    ``head_inputs`` must require grad and be the tensors the heads consumed.
    """

    def __init__(self, gamma: float) -> None:
        self.gamma = float(gamma)

    def __call__(self, real_logits: Sequence[Tensor], head_inputs: Sequence[Tensor]) -> Tensor:
        if self.gamma == 0.0:
            return real_logits[0].new_zeros(()).float()
        for h in head_inputs:
            if not h.requires_grad:
                raise ValueError("R1Penalty: head inputs must require grad; call "
                                 "Discriminator(..., return_inputs=True) which marks them.")
        outputs = sum(r.float().sum() for r in real_logits)
        grads = torch.autograd.grad(outputs=outputs, inputs=list(head_inputs), create_graph=True)
        batch = head_inputs[0].shape[0]
        per_sample = sum(g.float().pow(2).reshape(batch, -1).sum(dim=1) for g in grads)  # (B,)
        return self.gamma * per_sample.mean()


class DistillationLoss:
    """Score-distillation term (Eq. 4): c(t) * ||x_hat_theta - x_hat_psi||^2.

    ``x_student`` (B, ...) keeps its graph; ``x_teacher`` is the teacher's x0 on the re-noised
    student output and is detached here as well (the target never carries gradient).
    The squared norm is averaged over non-batch elements (scale independent of resolution),
    then weighted per sample by c(t) and averaged over the batch.

    Weightings, with sigma the VE sigma of t:
    - 'exponential': c(t) = alpha_t = 1/sqrt(1+sigma^2)    (paper's default, best FID)
    - 'sds':         c(t) = alpha_t / (2 sigma_vp,t) * w(t), w(t) = 1 -> 1/(2 sigma)
    """

    def __init__(self, weighting: str = "exponential") -> None:
        if weighting not in _WEIGHTINGS:
            raise ValueError(f"DistillationLoss: weighting={weighting!r}; expected one of {sorted(_WEIGHTINGS)}.")
        self.weighting = weighting

    def weight(self, sigma: Tensor) -> Tensor:
        """c(t) evaluated at VE sigma (B,) -> (B,)."""
        return _WEIGHTINGS[self.weighting](sigma.float())

    def __call__(self, x_student: Tensor, x_teacher: Tensor, sigma: Tensor) -> Tensor:
        diff = (x_student.float() - x_teacher.detach().float()).pow(2)
        per_sample = diff.reshape(diff.shape[0], -1).mean(dim=1)  # (B,)
        return (self.weight(sigma).to(per_sample.device) * per_sample).mean()


def _c_exponential(sigma: Tensor) -> Tensor:
    return DiscreteSchedule.alpha(sigma)


def _c_sds(sigma: Tensor) -> Tensor:
    # alpha / (2 sigma_vp) = 1 / (2 sigma_ve): no division by zero since schedule sigmas are > 0.
    return DiscreteSchedule.alpha(sigma) / (2.0 * DiscreteSchedule.sigma_vp(sigma))


_WEIGHTINGS = {"exponential": _c_exponential, "sds": _c_sds}

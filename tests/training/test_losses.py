"""Loss callables against hand-computed values and finite differences (ADD Eq. 2-5)."""

from __future__ import annotations

import math

import pytest
import torch

from training_helpers import single_thread  # noqa: F401  (repo root on sys.path; autouse fixture)
from comfyui_add.training.losses import DistillationLoss, HingeDLoss, HingeGLoss, R1Penalty
from comfyui_add.training.schedule import DiscreteSchedule


def test_hinge_d_at_known_logits():
    real = [torch.tensor([2.0, 0.5, -1.0]), torch.tensor([[0.0]])]
    fake = [torch.tensor([-2.0, 0.0, 1.0]), torch.tensor([[-0.5]])]
    # head 1: real relu(1-r) = [0, .5, 2] mean 5/6; fake relu(1+f) = [0, 1, 2] mean 1
    # head 2: real relu(1-0)=1; fake relu(1-0.5)=0.5
    expected = 5 / 6 + 1.0 + 1.0 + 0.5
    assert HingeDLoss()(real, fake).item() == pytest.approx(expected, rel=1e-6)


def test_hinge_d_is_zero_when_margins_are_met():
    assert HingeDLoss()([torch.full((4,), 1.5)], [torch.full((4,), -3.0)]).item() == 0.0


def test_hinge_g_is_negative_mean_fake_logit():
    fake = [torch.tensor([1.0, 3.0]), torch.tensor([[-1.0, -1.0]])]
    assert HingeGLoss()(fake).item() == pytest.approx(-(2.0 - 1.0))


def test_r1_matches_finite_differences():
    gen = torch.Generator().manual_seed(0)
    w1 = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, generator=gen, dtype=torch.float64)

    def heads(h1, h2):  # two nonlinear "heads", outputs (B,)
        return [torch.tanh(h1 @ w1).sum(1) ** 2, torch.sin(h2 * w2).sum(1)]

    h1 = torch.randn(2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    h2 = torch.randn(2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    gamma = 0.3
    r1 = R1Penalty(gamma)(heads(h1, h2), [h1, h2])

    # finite-difference gradient of sum over heads/batch w.r.t. each input element
    def total(a, b):
        return sum(o.sum() for o in heads(a, b))
    fd_sq = torch.zeros(2, dtype=torch.float64)
    eps = 1e-6
    for h, other_first in ((h1, True), (h2, False)):
        for idx in range(h.numel()):
            d = torch.zeros_like(h).view(-1)
            d[idx] = eps
            d = d.view_as(h)
            with torch.no_grad():
                if other_first:
                    g = (total(h1 + d, h2) - total(h1 - d, h2)) / (2 * eps)
                else:
                    g = (total(h1, h2 + d) - total(h1, h2 - d)) / (2 * eps)
            fd_sq[idx // h.shape[1]] += g ** 2
    assert r1.item() == pytest.approx(gamma * fd_sq.mean().item(), rel=1e-6)
    # create_graph=True: the penalty is differentiable (it trains the heads)
    (g,) = torch.autograd.grad(r1, [w1])
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_r1_requires_head_inputs_with_grad():
    with pytest.raises(ValueError, match="require grad"):
        R1Penalty(1.0)([torch.ones(2)], [torch.ones(2, 3)])


def test_exponential_weight_is_alpha_in_sigma_space():
    schedule = DiscreteSchedule.scaled_linear()
    sigma = schedule.sigma(torch.tensor([1, 100, 500, 999]))
    w = DistillationLoss("exponential").weight(sigma)
    assert torch.allclose(w, 1.0 / torch.sqrt(1.0 + sigma ** 2))
    # and alpha^2 equals the schedule's alphas_cumprod (alpha-form x_s = alpha x0 + sigma_vp eps)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)[torch.tensor([1, 100, 500, 999])]
    assert torch.allclose(w.double() ** 2, ac, rtol=1e-5)


def test_sds_weight_is_alpha_over_two_sigma_vp():
    schedule = DiscreteSchedule.scaled_linear()
    sigma = schedule.sigma(torch.tensor([10, 999]))
    w = DistillationLoss("sds").weight(sigma)
    alpha = 1 / torch.sqrt(1 + sigma ** 2)
    sigma_vp = sigma * alpha
    assert torch.allclose(w, alpha / (2 * sigma_vp))


def test_distillation_value_and_detached_target():
    student = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 0.0], [1.0, 1.0]], requires_grad=True)
    sigma = torch.tensor([0.0, 3.0])
    loss = DistillationLoss("exponential")(student, teacher, sigma)
    expected = (1.0 * (1 + 4) / 2 + (1 / math.sqrt(10.0)) * (1 + 1) / 2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert student.grad is not None and teacher.grad is None


def test_unknown_weighting_names_choices():
    with pytest.raises(ValueError, match="exponential"):
        DistillationLoss("nope")


def test_zero_terminal_snr_schedule_is_finite():
    ac = torch.linspace(0.99, 0.0, 1000, dtype=torch.float64)  # last abar = 0: sigma would be inf
    sched = DiscreteSchedule.from_alphas_cumprod(ac)
    assert sched.zero_terminal_snr
    assert torch.isfinite(sched.sigmas).all()
    top = sched.sigma(999)
    assert torch.isfinite(DiscreteSchedule.alpha(top)) and DiscreteSchedule.alpha(top) > 0
    assert torch.isfinite(DistillationLoss("sds").weight(top))

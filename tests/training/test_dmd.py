"""distill_loss='dmd': the fake score (a second LoRA on the teacher), its denoising phase, the
distribution-matching gradient on x_hat, and a resumed run that equals a straight one."""

from __future__ import annotations

import pytest
import torch

from training_helpers import single_thread, ring_data, straight_and_resumed, tiny_config, tiny_models  # noqa: F401 (autouse)
from comfyui_add.core.errors import ADDError
from comfyui_add.training import add_step
from comfyui_add.training.add_step import step
from comfyui_add.training.loop import Trainer


def _batch(cfg):
    return ring_data(torch.Generator().manual_seed(1), cfg.batch_size)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_the_fake_score_starts_as_the_teacher_and_its_adapters_touch_nothing_else(mode):
    cfg = tiny_config(distill_loss="dmd", training_mode=mode)
    models = tiny_models(cfg)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((8,), 2.0)
    teacher = models.student.teacher(x, sigma, None)
    assert torch.equal(models.fake_score.x0(x, sigma, None), teacher)  # zero-initialised up-projections
    with torch.no_grad():
        for p in models.fake_score.trainable_parameters():
            p.add_(0.1)
    student = models.student.student(x, sigma, None)
    assert not torch.allclose(models.fake_score.x0(x, sigma, None), teacher)
    assert torch.equal(models.student.teacher(x, sigma, None), teacher)  # adapters off outside active()
    assert torch.equal(models.student.student(x, sigma, None), student)


def test_dmd_gradient_is_zero_while_the_fake_score_equals_the_teacher_and_points_from_fake_to_real():
    cfg = tiny_config(distill_loss="dmd", adv_weight=0.0)
    models = tiny_models(cfg)
    batch = _batch(cfg)
    fake = add_step.student_forward(batch, models, cfg, torch.Generator().manual_seed(2)).detach().requires_grad_(True)
    loss = add_step.dmd_loss(batch, models, cfg, fake, torch.Generator().manual_seed(3))
    (g,) = torch.autograd.grad(loss, fake)
    assert torch.count_nonzero(g) == 0  # same scores: the student's distribution already matches

    shift = torch.tensor([0.5, -0.25])
    teacher_x0 = models.fake_score.x0
    models.fake_score.x0 = lambda x, s, c: teacher_x0(x, s, c) + shift  # the fake score sees mass shifted by +shift
    loss = add_step.dmd_loss(batch, models, cfg, fake, torch.Generator().manual_seed(3))
    (g,) = torch.autograd.grad(loss, fake)
    # gradient descent moves every sample by -g: against the shift, toward the teacher's distribution
    assert torch.all(torch.sign(g) == torch.sign(shift))
    assert torch.allclose(g[:, 0] / g[:, 1], torch.full((8,), -2.0), rtol=1e-4)


def test_phase_F_trains_the_fake_score_toward_the_students_samples():
    cfg = tiny_config(distill_loss="dmd", lr_disc=1e-2)
    models = tiny_models(cfg)
    batch = _batch(cfg)
    fake = add_step.student_forward(batch, models, cfg, torch.Generator().manual_seed(2)).detach()
    opt = torch.optim.Adam(models.fake_score.trainable_parameters(), lr=1e-2)
    teacher_params = [p.detach().clone() for p in models.student.teacher_params()]
    losses = []
    for i in range(30):
        gen = torch.Generator().manual_seed(100)  # the same noise every time: the loss itself must fall
        with models.fake_score.active():
            out, logs = step(batch, models, cfg, "F", generator=gen, fake=fake)
            out["total"].backward()
        opt.step()
        opt.zero_grad()
        losses.append(logs["fake_loss"])
    assert losses[-1] < 0.7 * losses[0]
    assert all(torch.equal(a, b) for a, b in zip(teacher_params, models.student.teacher_params()))


def test_a_dmd_run_updates_the_fake_score_every_iteration_and_resumes_bit_exactly(tmp_path):
    cfg = tiny_config(distill_loss="dmd", max_steps=4, disc_updates=2)
    trainer = Trainer(tiny_models(cfg), cfg, ring_data)
    before = [p.detach().clone() for p in trainer.fake_params]
    calls = []
    original = trainer.opt_f.step
    trainer.opt_f.step = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    logs = trainer.train_step()
    assert len(calls) == 2 and "fake_loss" in logs  # disc_updates = 2: one extra critic update, then the usual
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.fake_params))

    straight, resumed = straight_and_resumed(cfg, tmp_path)
    for a, b in zip(straight.student_params + straight.fake_params, resumed.student_params + resumed.fake_params):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(before, straight.fake_params))


def test_dmd_is_validated():
    with pytest.raises(ADDError, match="distill_loss"):
        tiny_config(distill_loss="l2")
    with pytest.raises(ADDError, match="distill_loss"):
        tiny_config(distill_loss="dmd", distill_weight=0.0)
    assert tiny_config().distill_loss == "regression"


def test_phase_F_draws_the_students_samples_without_the_fake_adapters():
    cfg = tiny_config(distill_loss="dmd")
    models = tiny_models(cfg)
    with torch.no_grad():
        for p in models.fake_score.trainable_parameters():
            p.add_(0.2)  # a fake score far from the teacher: its adapters would change the student's samples
    batch = _batch(cfg)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        fake = add_step.student_forward(batch, models, cfg, gen)
    expected, _ = step(batch, models, cfg, "F", generator=gen, fake=fake)
    with models.fake_score.active():
        got, _ = step(batch, models, cfg, "F", generator=torch.Generator().manual_seed(4))
    assert torch.equal(got["total"], expected["total"])

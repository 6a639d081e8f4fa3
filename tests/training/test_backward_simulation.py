"""backward_simulation (DMD2): the multi-step student's inputs below the top timestep come from its own
earlier steps, not from the training image re-noised."""

from __future__ import annotations

import pytest
import torch

from training_helpers import (single_thread, noisy_ring_data, ring_data, straight_and_resumed, tiny_config,  # noqa: F401
                              tiny_models)
from comfyui_add.core.errors import ADDError
from comfyui_add.training.add_step import simulated_input, student_input
from comfyui_add.training.loop import Trainer


def test_backward_simulation_gives_lower_timesteps_the_students_own_input_not_the_renoised_image():
    cfg = tiny_config(student_timesteps=(999, 499), backward_simulation=True)
    models = tiny_models(cfg)
    with torch.no_grad():  # the student off the teacher, so the chain is seen to run the student
        for p in models.student.trainable_parameters():
            p.add_(0.05)
    x0 = ring_data(torch.Generator().manual_seed(0), 8)["x0"]
    x, sigma, t = student_input(x0, models, cfg, torch.Generator().manual_seed(3))
    assert set(t.tolist()) == {999, 499}
    gen = torch.Generator().manual_seed(4)
    got = simulated_input(x, t, None, models, cfg, gen)
    top = t == 999
    assert torch.equal(got[top], x[top])  # the top timestep's input is already the sampler's: kept
    # below it: the ADD sampler's second input, from noise, whatever the training image was
    again = torch.Generator().manual_seed(4)
    sched = models.schedule
    s_top, s_499 = (sched.sigma(torch.full((8,), v)).float() for v in (999, 499))
    noise = torch.randn(x.shape, generator=again) * (1 + s_top[:, None] ** 2).sqrt()
    x0_hat = models.student.student(noise, s_top, None)
    expected = x0_hat + s_499[:, None] * torch.randn(x.shape, generator=again)
    assert torch.allclose(got[~top], expected[~top].detach(), atol=1e-6)
    assert not torch.allclose(got[~top], x[~top])
    assert not got.requires_grad  # simulated without a graph
    other = simulated_input(x + 5.0, t, None, models, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(other[~top], got[~top])  # the image no longer enters below the top


def _student_calls(cfg) -> int:
    models = tiny_models(cfg)
    calls = []
    own = models.student.student

    def counted(x, sigma, cond):
        calls.append(x.shape[0])
        return own(x, sigma, cond)

    models.student.student = counted
    Trainer(models, cfg, ring_data).run()
    return len(calls)


def test_a_run_with_backward_simulation_runs_the_students_earlier_steps_and_the_flag_is_checked():
    plain = tiny_config(student_timesteps=(999, 749, 499, 249), max_steps=2)
    simulated = _student_calls(plain.replace(backward_simulation=True))
    # every student forward (phases D and G) may add up to three simulation passes
    assert _student_calls(plain) < simulated <= 4 * _student_calls(plain)
    with pytest.raises(ADDError, match="backward_simulation"):
        tiny_config(backward_simulation="yes")


def test_below_sigma_max_the_simulation_starts_from_sigma_times_noise_like_the_sampler():
    cfg = tiny_config(student_timesteps=(749, 249), backward_simulation=True)
    models = tiny_models(cfg)
    x0 = ring_data(torch.Generator().manual_seed(0), 8)["x0"]
    x, _, t = student_input(x0, models, cfg, torch.Generator().manual_seed(3))
    got = simulated_input(x, t, None, models, cfg, torch.Generator().manual_seed(4))
    again = torch.Generator().manual_seed(4)
    sched = models.schedule
    s_749, s_249 = (sched.sigma(torch.full((8,), v)).float() for v in (749, 249))
    start = torch.randn(x.shape, generator=again) * s_749[:, None]  # not eps * sqrt(1 + sigma^2)
    expected = models.student.student(start, s_749, None) + s_249[:, None] * torch.randn(x.shape, generator=again)
    low = t == 249
    assert bool(low.any())
    assert torch.allclose(got[low], expected[low].detach(), atol=1e-6)


def test_a_run_with_simulation_and_feature_pairs_resumes_bit_exactly(tmp_path):
    cfg = tiny_config(student_timesteps=(999, 749, 499, 249), backward_simulation=True, paired_weight=1.0,
                      paired_metric="features", max_steps=4)
    straight, resumed = straight_and_resumed(cfg, tmp_path, data=noisy_ring_data)
    for a, b in zip(straight.student_params, resumed.student_params):
        assert torch.equal(a, b)

"""core.schedules and core.sampling without ComfyUI: presets, denoise mapping, errors, sigma math."""
from __future__ import annotations


import pytest
import torch

from comfyui_add.core import sampling, schedules
from comfyui_add.core.schedules import ScheduleError

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent



def test_add_preset_is_the_documented_add_timesteps():
    # ADD paper / ADD_SPEC: T_student = {999, 749, 499, 249}.
    assert schedules.timesteps_for("add_trailing", 4) == [999, 749, 499, 249]


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_add_preset_matches_diffusers_trailing_spacing(steps):
    from diffusers import EulerDiscreteScheduler

    ref = EulerDiscreteScheduler(timestep_spacing="trailing")
    ref.set_timesteps(steps)
    assert schedules.add_trailing_timesteps(steps) == [int(round(float(t))) for t in ref.timesteps]


@pytest.mark.parametrize("steps", [1, 3, 5, 8, 16, 50])
def test_trailing_formula_past_four_steps_is_still_diffusers_trailing(steps):
    """``trailing_timesteps`` is the add_trailing formula without the 1-4 limit (a saved checkpoint
    may recommend up to 50 steps); within 1-4 it is add_trailing itself."""
    from diffusers import EulerDiscreteScheduler

    ref = EulerDiscreteScheduler(timestep_spacing="trailing")
    ref.set_timesteps(steps)
    assert schedules.trailing_timesteps(steps) == [int(round(float(t))) for t in ref.timesteps]
    if steps <= 4:
        assert schedules.trailing_timesteps(steps) == schedules.add_trailing_timesteps(steps)


def _streamdiffusion_timesteps(t_index_list):
    """StreamDiffusion's own path: LCMScheduler.from_config(<SD pipeline scheduler config>), set_timesteps(50)."""
    from diffusers import EulerDiscreteScheduler, LCMScheduler

    sd_turbo_like = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                           timestep_spacing="trailing")
    lcm = LCMScheduler.from_config(sd_turbo_like.config)
    lcm.set_timesteps(50, "cpu")
    return [int(lcm.timesteps[t]) for t in t_index_list]


@pytest.mark.parametrize("t_index_list", [[32, 45], [0, 16, 32, 45], [0], [10, 20, 30, 40], [49]])
def test_t_index_list_matches_streamdiffusions_lcm_scheduler(t_index_list):
    custom = ",".join(str(i) for i in t_index_list)
    assert schedules.timesteps_for("stream_t_index", custom=custom) == _streamdiffusion_timesteps(t_index_list)


@pytest.mark.parametrize("denoise", [1.0, 0.95, 0.75, 0.5, 0.31, 0.1])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_sdturbo_grid_is_sdturbo_scheduler(steps, denoise):
    # ComfyUI's SDTurboScheduler formula (comfy_extras/nodes_custom_sampler.py), restated.
    start = 10 - int(10 * denoise)
    ref = torch.flip(torch.arange(1, 11) * 100 - 1, (0,))[start:start + steps].tolist()
    assert schedules.timesteps_for("sdturbo_grid", steps, denoise) == ref


@pytest.mark.parametrize("denoise", [1.0, 0.8, 0.5, 0.3, 0.05])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_add_preset_denoise_keeps_steps_and_starts_below_denoise(steps, denoise):
    ts = schedules.timesteps_for("add_trailing", steps, denoise)
    assert len(ts) == steps
    assert ts[0] < denoise * 1000 <= ts[0] + 1.5
    # the trailing spacing (1000 * (1 - i / n)), scaled into [0, denoise * 1000), rounded
    assert [t + 1 for t in ts] == pytest.approx([denoise * 1000 * (1 - i / steps) for i in range(steps)], abs=0.5 + 1e-9)


def test_add_preset_half_denoise_stays_on_the_add_training_set():
    assert set(schedules.timesteps_for("add_trailing", 2, 0.5)) <= set(schedules.timesteps_for("add_trailing", 4))


@pytest.mark.parametrize("denoise", [1.0, 0.6, 0.5, 0.36])
def test_custom_and_stream_lists_drop_timesteps_above_denoise(denoise):
    full = schedules.timesteps_for("custom", custom="999, 749, 499, 249")
    kept = schedules.timesteps_for("custom", custom="999, 749, 499, 249", denoise=denoise)
    assert kept == [t for t in full if t < denoise * 1000]
    s_full = schedules.timesteps_for("stream_t_index", custom="0,16,32,45")
    s_kept = schedules.timesteps_for("stream_t_index", custom="0,16,32,45", denoise=denoise)
    assert s_kept == [t for t in s_full if t < denoise * 1000]


@pytest.mark.parametrize("text", ["999,499", "[999, 499]", " 999 499 ", "999;499"])
def test_custom_list_parsing(text):
    assert schedules.timesteps_for("custom", custom=text) == [999, 499]


@pytest.mark.parametrize("kwargs, words", [
    (dict(preset="custom", custom=""), ["custom", "empty", "999,499"]),
    (dict(preset="custom", custom="999,abc"), ["custom", "'abc'", "integer"]),
    (dict(preset="custom", custom="499,999"), ["custom", "strictly decreasing", "999, 499"]),
    (dict(preset="custom", custom="999,999"), ["custom", "strictly decreasing"]),
    (dict(preset="custom", custom="1000,499"), ["custom", "0-999", "1000"]),
    (dict(preset="custom", custom="999,-1"), ["custom", "0-999"]),
    (dict(preset="stream_t_index", custom="32,50"), ["custom", "0-49", "32,45"]),
    (dict(preset="stream_t_index", custom="45,32"), ["custom", "increasing"]),
    (dict(preset="add_trailing", steps=0), ["steps", "1-4"]),
    (dict(preset="add_trailing", steps=5), ["steps", "1-4"]),
    (dict(preset="sdturbo_grid", steps=7), ["steps", "1-4"]),
    (dict(preset="add_trailing", denoise=0.0), ["denoise", "(0, 1]"]),
    (dict(preset="custom", custom="999,749", denoise=0.5), ["denoise", "raise denoise"]),
    (dict(preset="nope"), ["schedule", "add_trailing"]),
])
def test_bad_input_names_the_field_and_the_fix(kwargs, words):
    with pytest.raises(ScheduleError) as e:
        schedules.timesteps_for(**kwargs)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_model_range_is_enforced():
    with pytest.raises(ScheduleError, match="0-499"):
        schedules.timesteps_for("custom", custom="999,250", t_max=499)


def test_sigma_table_math():
    table = schedules.sd_sigma_table()
    # ComfyUI's own numbers for SD at t=999 (COMFY_NOTES): sigma 14.6146, alpha 0.06826.
    assert float(table[999]) == pytest.approx(14.6146, abs=1e-3)
    alpha, sigma_vp = schedules.alpha_sigma_vp(table[999])
    assert float(alpha) == pytest.approx(0.06826, abs=1e-4)
    assert float(alpha**2 + sigma_vp**2) == pytest.approx(1.0, abs=1e-6)
    ts = [999, 749, 499, 249]
    sig = schedules.sigmas_from_timesteps(ts, lambda t: schedules.sigma_from_table(t, table))
    assert sig.shape == (5,) and float(sig[-1]) == 0.0
    torch.testing.assert_close(sig[:-1], table[ts])
    mid = schedules.sigma_from_table(torch.tensor([499.5]), table)
    assert float(table[499]) < float(mid) < float(table[500])


# ------------------------------------------------------------------------------------------
# sample_add on an analytic denoiser (pure math, no model)
# ------------------------------------------------------------------------------------------
def _gaussian_denoiser(x, sigma, **kw):
    """Exact E[x0 | x] for x0 ~ N(0, I), x = x0 + sigma * eps."""
    return x / (1.0 + sigma.view(-1, 1, 1, 1) ** 2)


def _sigmas(ts=(999, 749, 499, 249)):
    table = schedules.sd_sigma_table()
    return schedules.sigmas_from_timesteps(list(ts), lambda t: schedules.sigma_from_table(t, table))


def test_sample_add_matches_the_add_update_written_out():
    sig = _sigmas()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sig[0]
    out = sampling.sample_add(_gaussian_denoiser, x, sig, extra_args={"seed": 7}, disable=True)
    g = torch.Generator().manual_seed(7)
    ref = x
    for i in range(len(sig) - 1):
        x0 = ref / (1 + sig[i] ** 2)
        ref = x0 + sig[i + 1] * torch.randn(x.shape, generator=g) if sig[i + 1] > 0 else x0
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.7, 1.0])
def test_noise_strength_keeps_unit_noise_variance(eta):
    # x0 predicted 0 -> eps_hat = x / sigma; the re-noised state divided by sigma_next must stay N(0, 1).
    sig = torch.tensor([10.0, 3.0, 0.0])
    x = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(1)) * sig[0]
    seen = []

    def zero_model(x, sigma, **kw):
        seen.append(x / sigma.view(-1, 1, 1, 1))
        return torch.zeros_like(x)

    sampling.sample_add(zero_model, x, sig, extra_args={"seed": 3}, noise_strength=eta, disable=True)
    renoised = seen[1]
    assert float(renoised.std()) == pytest.approx(1.0, abs=0.02)
    corr = float((renoised * seen[0]).mean())
    assert corr == pytest.approx((1 - eta**2) ** 0.5, abs=0.02)


def test_sample_add_is_seeded():
    sig = _sigmas((999, 499))
    x = torch.randn(1, 4, 8, 8)
    a = sampling.sample_add(_gaussian_denoiser, x, sig, extra_args={"seed": 5}, disable=True)
    b = sampling.sample_add(_gaussian_denoiser, x, sig, extra_args={"seed": 5}, disable=True)
    c = sampling.sample_add(_gaussian_denoiser, x, sig, extra_args={"seed": 6}, disable=True)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_noise_strength_out_of_range_raises():
    with pytest.raises(ValueError, match="noise_strength"):
        sampling.sample_add(_gaussian_denoiser, torch.zeros(1, 4, 2, 2), _sigmas((999,)), noise_strength=1.5)

"""ADD sampling nodes inside a real ComfyUI, on the tiny SD1.5 / SD2-v / SDXL models (CPU, 8x8 latents)."""
from __future__ import annotations


import pytest
import torch

from comfyui_add.core import schedules as pure_schedules
from model_probes import count_unet_calls

H = W = 8  # latent size (64x64 images)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nodes_mod(plugin):
    return plugin("nodes.sampling")




def _latent(batch=1, seed=None, channels=4):
    if seed is None:
        return {"samples": torch.zeros(batch, channels, H, W)}
    return {"samples": torch.randn(batch, channels, H, W, generator=torch.Generator().manual_seed(seed))}


def _ksample(nodes_mod, model, positive, latent, seed=0, steps=1, schedule="add_trailing", custom="999,499", denoise=1.0):
    return nodes_mod.ADDKSampler.execute(model, positive, latent, seed, steps, schedule, custom, denoise)[0]["samples"]


# ------------------------------------------------------------------------------------------
# one model evaluation per step, never an uncond pass
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_one_model_evaluation_per_step_and_no_uncond(nodes_mod, sd15, steps):
    model, positive = _family_from(sd15, 768)
    with count_unet_calls(model) as calls:
        _ksample(nodes_mod, model, positive, _latent(batch=2), steps=steps)
    assert calls == [2] * steps  # one call per step, batch 2 = the images only (no uncond half)


def test_cfg1_optimization_disabled_by_a_patch_still_runs_once(nodes_mod, sd15):
    model, positive = _family_from(sd15, 768)
    patched = model.clone()
    patched.set_model_sampler_cfg_function(lambda args: args["cond"], disable_cfg1_optimization=True)
    with count_unet_calls(model) as calls:
        out = _ksample(nodes_mod, patched, positive, _latent(batch=2), steps=2)
    assert calls == [2, 2]
    ref = _ksample(nodes_mod, model, positive, _latent(batch=2), steps=2)
    torch.testing.assert_close(out, ref)


def test_core_ksampler_at_cfg_above_1_evaluates_twice_as_much(host_nodes, sd15, nodes_mod):
    model, positive = _family_from(sd15, 768)
    negative = [[torch.zeros_like(positive[0][0]), {}]]
    with count_unet_calls(model) as core_calls:
        host_nodes.common_ksampler(model, 0, 2, 2.0, "euler_ancestral", "simple", positive, negative, _latent(batch=1))
    with count_unet_calls(model) as add_calls:
        _ksample(nodes_mod, model, positive, _latent(batch=1), steps=2)
    assert sum(core_calls) == 2 * sum(add_calls)


# ------------------------------------------------------------------------------------------
# the update against an independent reference on the raw diffusion model
# ------------------------------------------------------------------------------------------
def _family_from(fixture_value, ctx_dim, pooled=False):
    model = fixture_value[0] if isinstance(fixture_value, tuple) else fixture_value
    g = torch.Generator().manual_seed(11)
    extra = {"pooled_output": torch.randn(1, 1280, generator=g), "width": 64, "height": 64} if pooled else {}
    return model, [[torch.randn(1, 77, ctx_dim, generator=g) * 0.5, extra]]


FAMILIES = {"sd15": (768, False), "sd2v": (1024, False), "sdxl": (2048, True)}


def _reference(model, positive, latent, seed, timesteps, v_pred):
    """ADD inference written out on the bare UNet (VP form, ADD_SPEC "Inference"):
    x0 = from the model output at (x_t, t); x_{t'} = alpha_t' x0 + sigma_t' eps (fresh, seeded)."""
    abar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0).float()
    unet = model.model.diffusion_model
    scale = model.model.latent_format.scale_factor
    ctx = positive[0][0]
    y = None
    if "pooled_output" in positive[0][1]:
        y = model.model.encode_adm(pooled_output=positive[0][1]["pooled_output"], width=64, height=64)
    b = latent.shape[0]
    init = torch.randn(latent.shape, generator=torch.manual_seed(seed))  # comfy.sample.prepare_noise convention
    # the host's k-diffusion default_noise_sampler (ComfyUI >= 0.33 seeds it with seed + 1 on the CPU, so
    # that its draws differ from prepare_noise's)
    import comfy.k_diffusion.sampling

    step_noise = comfy.k_diffusion.sampling.default_noise_sampler(torch.zeros(latent.shape), seed=seed)
    img = latent * scale
    a0, s0 = abar[timesteps[0]].sqrt(), (1 - abar[timesteps[0]]).sqrt()
    x = init if timesteps[0] == 999 and not latent.any() else a0 * img + s0 * init
    if timesteps[0] == 999 and latent.any():
        # KSAMPLER's max_denoise scaling at sigma_max: x = (latent + sqrt(1 + s^2) n) / sqrt(1 + s^2)
        x = a0 * img + init
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            a, s = abar[t].sqrt(), (1 - abar[t]).sqrt()
            out = unet(x, torch.full((b,), float(t)), context=ctx.expand(b, -1, -1), y=None if y is None else y.expand(b, -1))
            x0 = a * x - s * out if v_pred else (x - s * out) / a
            if i + 1 < len(timesteps):
                tn = timesteps[i + 1]
                x = abar[tn].sqrt() * x0 + (1 - abar[tn]).sqrt() * step_noise(None, None)
            else:
                x = x0
    return x / scale


_TXT4 = dict(steps=4, schedule="add_trailing", denoise=1.0, img=False)
_TXT1 = dict(steps=1, schedule="add_trailing", denoise=1.0, img=False)
_IMG_HALF = dict(steps=2, schedule="add_trailing", denoise=0.5, img=True)
_IMG_08 = dict(steps=3, schedule="add_trailing", denoise=0.8, img=True)
_STREAM = dict(steps=4, schedule="stream_t_index", custom="32,45", denoise=1.0, img=True)
_CUSTOM = dict(steps=2, schedule="custom", custom="999,749,499", denoise=0.6, img=True)


@pytest.mark.parametrize("family, case", [
    ("sd15", _TXT4), ("sd15", _TXT1), ("sd15", _IMG_HALF), ("sd15", _IMG_08), ("sd15", _STREAM), ("sd15", _CUSTOM),
    ("sd2v", _TXT4), ("sd2v", _IMG_HALF), ("sd2v", _STREAM),
    ("sdxl", _TXT4), ("sdxl", _IMG_08), ("sdxl", _STREAM),
])
def test_update_matches_independent_reference(request, nodes_mod, family, case):
    ctx_dim, pooled = FAMILIES[family]
    model, positive = _family_from(request.getfixturevalue(family), ctx_dim, pooled)
    latent = _latent(batch=2, seed=5 if case["img"] else None)
    custom = case.get("custom", "999,499")
    out = _ksample(nodes_mod, model, positive, latent, seed=42, steps=case["steps"], schedule=case["schedule"],
                   custom=custom, denoise=case["denoise"])
    ts = pure_schedules.timesteps_for(case["schedule"], case["steps"], case["denoise"], custom)
    ref = _reference(model, positive, latent["samples"], 42, ts, v_pred=(family == "sd2v"))
    assert out.shape == ref.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)


def test_vprediction_family_is_really_v(sd2v):
    import comfy.model_sampling

    assert isinstance(sd2v.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)


# ------------------------------------------------------------------------------------------
# seeds and composition with core nodes
# ------------------------------------------------------------------------------------------
def test_same_seed_same_output_other_seed_differs(nodes_mod, sd15):
    model, positive = _family_from(sd15, 768)
    a = _ksample(nodes_mod, model, positive, _latent(2), seed=3, steps=2)
    b = _ksample(nodes_mod, model, positive, _latent(2), seed=3, steps=2)
    c = _ksample(nodes_mod, model, positive, _latent(2), seed=4, steps=2)
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("schedule, steps, denoise", [("add_trailing", 4, 1.0), ("add_trailing", 2, 0.5), ("stream_t_index", 1, 1.0)])
def test_add_sampler_in_core_sampler_custom_equals_add_ksampler(comfy, nodes_mod, sd15, schedule, steps, denoise):
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    model, positive = _family_from(sd15, 768)
    latent = _latent(2, seed=9 if denoise < 1 else None)
    sigmas = nodes_mod.ADDScheduler.execute(model, steps, schedule, "32,45", denoise)[0]
    sampler = nodes_mod.ADDSampler.execute(1.0)[0]
    core = SamplerCustom.execute(model, True, 77, 1.0, positive, positive, sampler, sigmas, latent)
    core_out = (core.result if hasattr(core, "result") else core)[0]["samples"]
    ours = _ksample(nodes_mod, model, positive, latent, seed=77, steps=steps, schedule=schedule, custom="32,45", denoise=denoise)
    torch.testing.assert_close(core_out, ours, rtol=0, atol=1e-6)


def test_add_sampler_equals_core_lcm_sampler_at_full_noise_strength(comfy, nodes_mod, sd15):
    """Two implementations of predict-x0 / re-noise: ours and ComfyUI's sample_lcm."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    model, positive = _family_from(sd15, 768)
    sigmas = nodes_mod.ADDScheduler.execute(model, 4, "add_trailing", "", 1.0)[0]
    outs = []
    for sampler in (nodes_mod.ADDSampler.execute(1.0)[0], comfy.samplers.sampler_object("lcm")):
        r = SamplerCustom.execute(model, True, 5, 1.0, positive, positive, sampler, sigmas, _latent(1))
        outs.append((r.result if hasattr(r, "result") else r)[0]["samples"])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)


def test_noise_strength_changes_the_result_but_not_the_first_step(comfy, nodes_mod, sd15):
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    model, positive = _family_from(sd15, 768)
    outs = []
    for eta, steps in ((1.0, 2), (0.0, 2), (1.0, 1), (0.0, 1)):
        sigmas = nodes_mod.ADDScheduler.execute(model, steps, "add_trailing", "", 1.0)[0]
        r = SamplerCustom.execute(model, True, 5, 1.0, positive, positive, nodes_mod.ADDSampler.execute(eta)[0], sigmas, _latent(1))
        outs.append((r.result if hasattr(r, "result") else r)[0]["samples"])
    assert not torch.allclose(outs[0], outs[1])
    torch.testing.assert_close(outs[2], outs[3])


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("denoise", [1.0, 0.75, 0.5, 0.2])
def test_sdturbo_grid_equals_core_sdturbo_scheduler(comfy, nodes_mod, sd15, steps, denoise):
    from comfy_extras.nodes_custom_sampler import SDTurboScheduler

    model = sd15[0]
    core = SDTurboScheduler.execute(model, steps, denoise)
    core = (core.result if hasattr(core, "result") else core)[0]
    ours = nodes_mod.ADDScheduler.execute(model, steps, "sdturbo_grid", "", denoise)[0]
    torch.testing.assert_close(ours, core.float().cpu())


def test_img2img_starts_at_the_lower_sigma(nodes_mod, sd15):
    model, positive = _family_from(sd15, 768)
    seen = []
    h = model.model.diffusion_model.register_forward_pre_hook(lambda m, args, kw=None: seen.append(float(args[1][0])))
    try:
        _ksample(nodes_mod, model, positive, _latent(1, seed=1), steps=2, denoise=0.5)
    finally:
        h.remove()
    assert seen == pytest.approx([499, 249], abs=0.5)


# ------------------------------------------------------------------------------------------
# progress, preview callback, cancel
# ------------------------------------------------------------------------------------------
def test_progress_hook_each_step_and_cancel_stops_sampling(nodes_mod, sd15, monkeypatch):
    import comfy.model_management
    import comfy.utils

    model, positive = _family_from(sd15, 768)
    # Newer ComfyUI's ProgressBar drops a preview-less update that comes sooner than this after the
    # last one sent (first and last always go through); the test asks for an update per step.
    monkeypatch.setattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL", 0.0, raising=False)
    updates = []
    old = comfy.utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, node_id=None):
        updates.append((value, total))
        comfy.model_management.throw_exception_if_processing_interrupted()

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        _ksample(nodes_mod, model, positive, _latent(1), steps=3)
        assert updates == [(1, 3), (2, 3), (3, 3)]
        updates.clear()
        comfy.model_management.interrupt_current_processing(True)
        with count_unet_calls(model) as calls, pytest.raises(comfy.model_management.InterruptProcessingException):
            _ksample(nodes_mod, model, positive, _latent(1), steps=4)
        assert calls == [1]  # stopped after the first step's progress update
    finally:
        comfy.model_management.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(old)


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------
def test_latent_channel_mismatch_names_both_and_the_fix(nodes_mod, sd15):
    model, positive = _family_from(sd15, 768)
    with pytest.raises(ValueError) as e:
        _ksample(nodes_mod, model, positive, _latent(1, seed=2, channels=16))
    msg = str(e.value)
    assert "16 channels" in msg and "expects 4" in msg and "VAE" in msg and "latent_image" in msg


def test_empty_latent_of_another_size_is_resized_like_core(nodes_mod, sd15):
    model, positive = _family_from(sd15, 768)
    out = _ksample(nodes_mod, model, positive, _latent(1, channels=16))
    assert out.shape == (1, 4, H, W)


@pytest.mark.parametrize("schedule, custom, steps, field", [
    ("custom", "", 1, "custom"), ("custom", "999,x", 1, "custom"), ("custom", "499,999", 1, "custom"),
    ("custom", "1200", 1, "0-999"), ("stream_t_index", "32,60", 1, "custom"), ("add_trailing", "", 6, "steps"),
])
def test_scheduler_node_errors_name_the_field(nodes_mod, sd15, schedule, custom, steps, field):
    with pytest.raises(ValueError, match=field):
        nodes_mod.ADDScheduler.execute(sd15[0], steps, schedule, custom, 1.0)


def test_nodes_are_registered_with_tooltips(host_nodes):
    for node_id in ("ADDScheduler", "ADDSampler", "ADDKSampler"):
        cls = host_nodes.NODE_CLASS_MAPPINGS[node_id]
        assert cls.CATEGORY == "ADD/sampling" and cls.DESCRIPTION and cls.OUTPUT_TOOLTIPS
        for spec in cls.INPUT_TYPES()["required"].values():
            assert spec[1].get("tooltip")
    spec = host_nodes.NODE_CLASS_MAPPINGS["ADDKSampler"].INPUT_TYPES()["required"]
    assert "negative" not in spec and spec["steps"][1]["max"] == 4

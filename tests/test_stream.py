"""Streams: core/stream.py on a toy denoiser (no ComfyUI), then the stream nodes inside ComfyUI on
the tiny SD1.5 / SD2 v-prediction / SDXL models (CPU, 8x8 latents)."""
from __future__ import annotations


import pytest
import torch

from comfyui_add.core import sampling as core_sampling
from comfyui_add.core import stream as st
from model_probes import count_unet_calls

SIG3 = torch.tensor([14.6146, 2.5, 0.6, 0.0])  # 3 steps, sigma space, last 0


# ------------------------------------------------------------------------------------------
# toy denoiser: a fixed non-linear function of (x, sigma) that mixes channels (not per-row maths)
# ------------------------------------------------------------------------------------------
class Toy:
    def __init__(self, seed=0, channels=4):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(channels, channels, generator=g) * 0.4
        self.calls, self.rows = 0, []

    def __call__(self, x, sigma, **_):
        self.calls += 1
        self.rows.append(int(x.shape[0]))
        s = sigma.reshape(-1, 1, 1, 1) if sigma.ndim else sigma
        return torch.tanh(torch.einsum("ij,bjhw->bihw", self.w, x)) / (1 + s**2).sqrt() + 0.1 * x / (1 + s)


def _frames(n, seed=1, shape=(4, 3, 3)):
    return torch.randn((n,) + shape, generator=torch.Generator().manual_seed(seed))


def _noise_fn(seed=7, mode="per_frame", shape=(1, 4, 3, 3)):
    return lambda f, k: st.frame_noise(seed, f, k, shape, mode)


def _start(frames, sigmas, noise_fn):
    """States at sigmas[0] (img2img): x = x0 + sigma * noise(frame, 0)."""
    return torch.cat([frames[f:f + 1] + sigmas[0] * noise_fn(f, 0) for f in range(frames.shape[0])])


def _sequential_reference(model, x_start, sigmas, noise_fn, rcfg=None):
    """Per-frame ADD sampling (core.sampling.sample_add, or sample_add_rcfg) with the stream's noises."""
    out = []
    for f in range(x_start.shape[0]):
        draws = iter([noise_fn(f, k) for k in range(1, len(sigmas))])
        ns = lambda s, sn: next(draws)  # noqa: E731
        if rcfg is None:
            out.append(core_sampling.sample_add(model, x_start[f:f + 1], sigmas, noise_sampler=ns))
        else:
            out.append(st.sample_add_rcfg(model, x_start[f:f + 1], sigmas, rcfg=rcfg, init_noise=noise_fn(f, 0),
                                          noise_sampler=ns, uncond=Toy(seed=5)))
    return torch.cat(out)


# ------------------------------------------------------------------------------------------
# stream batch
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("per_call", [1, 2])
@pytest.mark.parametrize("mode", ["fixed", "per_frame"])
def test_stream_batch_equals_sequential_add_sampling(steps, per_call, mode):
    sigmas = torch.cat([SIG3[:steps], SIG3[-1:]])
    frames, noise_fn = _frames(5), _noise_fn(mode=mode)
    x = _start(frames, sigmas, noise_fn)
    model = Toy()
    stream = st.StreamBatch(sigmas)
    out = st.run_frames(stream, x, list(range(5)), model, noise_fn, frames_per_call=per_call)
    assert [f for f, _ in out] == [0, 1, 2, 3, 4]  # in order, every frame once
    ref = _sequential_reference(Toy(), x, sigmas, noise_fn)
    torch.testing.assert_close(torch.cat([y for _, y in out]), ref, rtol=0, atol=1e-5)
    # one batched call per frame group (plus the n - 1 calls that flush the pipeline)
    groups = -(-5 // per_call)
    assert stream.calls == groups + steps - 1 == st.calls_needed(5, steps, per_call)
    assert stream.rows == 5 * steps == sum(model.rows)
    assert stream.in_flight == 0


def test_per_frame_mode_is_sequential_and_costs_n_calls_per_frame():
    frames, noise_fn = _frames(4), _noise_fn()
    x = _start(frames, SIG3, noise_fn)
    model = Toy()
    stream = st.StreamBatch(SIG3)
    out = st.run_frames(stream, x, list(range(4)), model, noise_fn, batched=False)
    assert model.rows == [1] * 12 and stream.calls == 12 == st.calls_needed(4, 3, batched=False)
    torch.testing.assert_close(torch.cat([y for _, y in out]), _sequential_reference(Toy(), x, SIG3, noise_fn), rtol=0, atol=0)


def test_fixed_noise_repeats_per_step_and_per_frame_noise_does_not():
    a, b = st.frame_noise(3, 0, 1, (1, 4, 2, 2), "fixed"), st.frame_noise(3, 9, 1, (1, 4, 2, 2), "fixed")
    assert torch.equal(a, b) and not torch.equal(a, st.frame_noise(3, 0, 2, (1, 4, 2, 2), "fixed"))
    c, d = st.frame_noise(3, 0, 1, (1, 4, 2, 2), "per_frame"), st.frame_noise(3, 1, 1, (1, 4, 2, 2), "per_frame")
    assert not torch.equal(c, d) and torch.equal(c, st.frame_noise(3, 0, 1, (1, 4, 2, 2), "per_frame"))
    with pytest.raises(st.StreamError, match="noise="):
        st.frame_noise(0, 0, 0, (1,), "sometimes")


def test_live_mode_warms_up_then_lags_and_splitting_runs_changes_nothing():
    frames, noise_fn = _frames(6), _noise_fn()
    x = _start(frames, SIG3, noise_fn)
    whole = st.StreamBatch(SIG3)
    out = st.run_frames(whole, x, list(range(6)), Toy(), noise_fn, flush=False)
    # warm-up: frame 0 at 1 and 2 steps, then finished frames 0..3, two frames still in flight
    assert [f for f, _ in out] == [0, 0, 0, 1, 2, 3] and whole.in_flight == 2 and whole.steps == [1, 2]
    finished = _sequential_reference(Toy(), x, SIG3, noise_fn)
    torch.testing.assert_close(torch.cat([y for _, y in out[2:]]), finished[:4], rtol=0, atol=1e-5)
    assert not torch.allclose(out[0][1], finished[0])  # the warm-up frame is less denoised
    # the same frames over two queue runs (state kept in the StreamBatch) give the same outputs
    split = st.StreamBatch(SIG3)
    first = st.run_frames(split, x[:2], [0, 1], Toy(), noise_fn, flush=False)
    second = st.run_frames(split, x[2:], [2, 3, 4, 5], Toy(), noise_fn, flush=False)
    torch.testing.assert_close(torch.cat([y for _, y in first + second]), torch.cat([y for _, y in out]), rtol=0, atol=0)


def test_bad_schedules_are_refused():
    with pytest.raises(st.StreamError, match="no step"):
        st.StreamBatch(torch.tensor([1.0]))
    with pytest.raises(st.StreamError, match="decrease"):
        st.StreamBatch(torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(st.StreamError, match="frame_buffer_size"):
        st.run_frames(st.StreamBatch(SIG3), _frames(1), [0], Toy(), _noise_fn(), frames_per_call=0)


# ------------------------------------------------------------------------------------------
# residual CFG
# ------------------------------------------------------------------------------------------
def _streamdiffusion_rcfg_step(x_vp, alpha, beta, alpha_next, beta_next, eps_cond, stock, g, delta, init_noise_next):
    """StreamDiffusion's unet_step for cfg_type self, written in its own VP terms (c_skip 0, c_out 1):
    guided eps, x0, and the stock noise carried to the next step."""
    eps_uncond = stock * delta
    eps = eps_uncond + g * (eps_cond - eps_uncond)
    x0 = (x_vp - beta * eps) / alpha
    delta_x = (beta * stock - beta * eps) / alpha
    return x0, init_noise_next + alpha_next * delta_x / beta_next


def test_rcfg_math_matches_streamdiffusions_vp_formulation():
    g = torch.Generator().manual_seed(0)
    x0_true, stock, eps_cond, n_next = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(4))
    sigma, sigma_next = torch.tensor(4.0), torch.tensor(1.3)
    alpha, beta = 1 / (1 + sigma**2).sqrt(), sigma / (1 + sigma**2).sqrt()
    alpha_n, beta_n = 1 / (1 + sigma_next**2).sqrt(), sigma_next / (1 + sigma_next**2).sqrt()
    x_vp = alpha * x0_true + beta * torch.randn(2, 4, 3, 3, generator=g)
    ref_x0, ref_stock = _streamdiffusion_rcfg_step(x_vp, alpha, beta, alpha_n, beta_n, eps_cond, stock, 1.4, 0.8, n_next)
    # ours, in sigma space: x = x_vp / alpha, the model's x0 for eps_cond
    x = x_vp / alpha
    rc = st.RCFG("self", 1.4, 0.8)
    x0 = st.rcfg_guide(x, sigma, x - sigma * eps_cond, stock, rc, st._add_noise)
    new_stock = st.rcfg_next_stock(stock, x, x0, sigma, sigma_next, n_next, st._add_noise)
    torch.testing.assert_close(x0, ref_x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_stock, ref_stock, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg_type", ["self", "initialize"])
def test_rcfg_stream_equals_sequential_rcfg(cfg_type):
    frames, noise_fn = _frames(4), _noise_fn(mode="fixed")
    x = _start(frames, SIG3, noise_fn)
    rc = st.RCFG(cfg_type, 1.5, 0.9)
    model, uncond = Toy(), Toy(seed=5)
    stream = st.StreamBatch(SIG3, rc)
    out = st.run_frames(stream, x, list(range(4)), model, noise_fn, uncond=uncond)
    ref = _sequential_reference(Toy(), x, SIG3, noise_fn, rcfg=rc)
    torch.testing.assert_close(torch.cat([y for _, y in out]), ref, rtol=0, atol=1e-5)
    # self: no extra evaluation at all; initialize: one negative row per frame, at its first step
    assert stream.rows == 4 * 3 and sum(model.rows) == 12
    assert stream.negative_rows == (4 if cfg_type == "initialize" else 0) == sum(uncond.rows)
    plain = _sequential_reference(Toy(), x, SIG3, noise_fn)
    assert (torch.cat([y for _, y in out]) - plain).abs().max() > 1e-3  # guidance changed the frames


@pytest.mark.parametrize("cfg_type", ["self", "initialize"])
def test_sequential_rcfg_evaluation_counts(cfg_type):
    model, uncond = Toy(), Toy(seed=5)
    x = _frames(2) * 14.6
    st.sample_add_rcfg(model, x, SIG3, rcfg=st.RCFG(cfg_type, 1.3), init_noise=_frames(2, seed=3), uncond=uncond,
                       noise_sampler=lambda s, sn: torch.zeros_like(x))
    assert model.rows == [2, 2, 2]  # one evaluation per step, never a negative batch beside it
    assert uncond.rows == ([2] if cfg_type == "initialize" else [])  # initialize: one in total


def test_rcfg_at_guidance_1_is_the_plain_sampler():
    frames, noise_fn = _frames(3), _noise_fn()
    x = _start(frames, SIG3, noise_fn)
    plain = st.run_frames(st.StreamBatch(SIG3), x, [0, 1, 2], Toy(), noise_fn)
    selfg1 = st.run_frames(st.StreamBatch(SIG3, st.RCFG("self", 1.0)), x, [0, 1, 2], Toy(), noise_fn)
    for (fa, a), (fb, b) in zip(plain, selfg1):
        assert fa == fb and torch.equal(a, b)


def test_rcfg_options_are_checked():
    for kwargs, field in ((dict(cfg_type="half"), "cfg_type"), (dict(guidance_scale=0.5), "guidance_scale"),
                          (dict(guidance_scale=float("nan")), "guidance_scale"), (dict(delta=-1.0), "delta")):
        with pytest.raises(st.StreamError, match=field):
            st.RCFG(**{"cfg_type": "self", **kwargs})
    assert st.RCFG("initialize", 1.2).needs_negative and not st.RCFG("initialize", 1.0).needs_negative
    assert st.RCFG("full", 2.0).needs_negative and not st.RCFG("self", 2.0).needs_negative


# ------------------------------------------------------------------------------------------
# similarity filter
# ------------------------------------------------------------------------------------------
def test_filter_skips_identical_frames_and_never_changed_ones_at_threshold_1():
    frame = _frames(1)[0]
    for threshold in (0.98, 1.0):
        filt = st.SimilarityFilter(threshold, max_skip_frames=100, seed=0)
        decisions = [filt.decide(frame, i) for i in range(8)]
        assert decisions == [False] + [True] * 7 and filt.skipped == 7
    filt = st.SimilarityFilter(1.0, max_skip_frames=100, seed=0)
    nearly = [frame + 1e-4 * i for i in range(20)]  # cosine similarity > 0.9999999, still changed
    assert not any(filt.decide(f, i) for i, f in enumerate(nearly))


def test_filter_respects_max_skip_frames_and_is_seeded():
    frame = _frames(1)[0]
    filt = st.SimilarityFilter(0.9, max_skip_frames=3, seed=0)
    assert [filt.decide(frame, i) for i in range(9)] == [False, True, True, True, False, True, True, True, False]

    def run(seed):
        f = st.SimilarityFilter(0.5, max_skip_frames=1000, seed=seed)
        g = torch.Generator().manual_seed(4)
        base = torch.randn(256, generator=g)
        return [f.decide(base + 0.9 * torch.randn(256, generator=g), i) for i in range(300)]

    a = run(1)
    assert a == run(1) and a != run(2)
    # P(skip) = (SC - 0.5) / 0.5 with SC ~ 1/sqrt(1 + 0.81 * 2) ~ 0.62 (drifting reference): clearly in (0, 1)
    assert 0.05 < sum(a) / len(a) < 0.6


def test_skip_probability_formula():
    assert st.skip_probability(0.99, 0.98) == pytest.approx(0.5)
    assert st.skip_probability(0.9, 0.98) == 0.0 and st.skip_probability(1.0, 0.98) == 1.0
    assert st.skip_probability(0.999999, 1.0) == 0.0 and st.skip_probability(0.5, 1.0, identical=True) == 1.0
    with pytest.raises(st.StreamError, match="similarity_threshold"):
        st.SimilarityFilter(1.5)


# ==========================================================================================
# inside ComfyUI
# ==========================================================================================
H = W = 8
FAMILIES = {"sd15": (768, False), "sd2v": (1024, False), "sdxl": (2048, True)}


@pytest.fixture(scope="module")
def sn(plugin):
    return plugin("nodes.stream")


@pytest.fixture(scope="module")
def sa(plugin):
    return plugin("nodes.sampling")


@pytest.fixture(scope="module")
def cs(plugin):
    return plugin("core.stream")




def _family(fixture_value, ctx_dim, pooled, seed=11):
    model = fixture_value[0] if isinstance(fixture_value, tuple) else fixture_value
    g = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, 1280, generator=g), "width": 64, "height": 64} if pooled else {}
    return model, [[torch.randn(1, 77, ctx_dim, generator=g) * 0.5, extra]]


def _latent(n, seed=5):
    return {"samples": torch.randn(n, 4, H, W, generator=torch.Generator().manual_seed(seed))}


def _sequential_comfy(sa, cs, model, positive, latent, sigmas, seed, mode):
    """Per-frame ADD sampling through the ADD sampler (KSAMPLER + core.sample_add) with the stream's noise."""
    import comfy.samplers

    out = []
    shape = (1, 4, H, W)
    for f in range(latent.shape[0]):
        draws = iter([cs.frame_noise(seed, f, k, shape, mode) for k in range(1, len(sigmas))])
        guider = sa.PositiveOnlyGuider(model)
        guider.set_conds(positive)
        sampler = comfy.samplers.KSAMPLER(sa._sample_add_comfy, extra_options={"noise_sampler": lambda s, sn: next(draws)})
        out.append(guider.sample(cs.frame_noise(seed, f, 0, shape, mode), latent[f:f + 1], sampler, sigmas, seed=seed))
    return torch.cat(out)


def _opts(sn, cs, **kw):
    return sn.StreamOptions(**{"seed": 3, "noise": "per_frame", **kw})


@pytest.mark.parametrize("family", ["sd15", "sd2v", "sdxl"])
def test_stream_node_equals_per_frame_add_sampling(request, sn, sa, cs, family):
    model, positive = _family(request.getfixturevalue(family), *FAMILIES[family])
    lat = _latent(3)
    sigmas = sa.build_sigmas(model, "add_trailing", 2, 0.75, "")
    with torch.inference_mode():
        with count_unet_calls(model) as calls:
            out, report, _ = sn.run_stream(model, positive, lat, sigmas, _opts(sn, cs), ("t", family, ""))
        ref = _sequential_comfy(sa, cs, model, positive, lat["samples"], sigmas, 3, "per_frame")
    assert calls == [1, 2, 2, 1]  # frames enter one per call; the last call flushes the pipeline
    assert "4 model calls" in report and "6 rows" in report
    torch.testing.assert_close(out["samples"], ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ref[0], ref[1])  # the frames differ: order is checked, not just values


def test_stream_node_rcfg_self_matches_its_per_frame_mode_and_changes_the_frames(sn, sa, cs, sd15):
    model, positive = _family(sd15, 768, False)
    lat = _latent(3)
    sigmas = sa.build_sigmas(model, "stream_t_index", 1, 1.0, "32,45")
    rc = cs.RCFG("self", 1.6, 1.0)
    with torch.inference_mode():
        batched = sn.run_stream(model, positive, lat, sigmas, _opts(sn, cs, rcfg=rc), ("r", "b", ""))[0]["samples"]
        with count_unet_calls(model) as calls:
            seq = sn.run_stream(model, positive, lat, sigmas, _opts(sn, cs, rcfg=rc, batched=False), ("r", "s", ""))[0]["samples"]
        plain = sn.run_stream(model, positive, lat, sigmas, _opts(sn, cs), ("r", "p", ""))[0]["samples"]
    assert calls == [1] * 6  # per-frame: n calls per frame, no negative pass
    torch.testing.assert_close(batched, seq, rtol=1e-4, atol=1e-4)
    assert (batched - plain).abs().max() > 1e-3


def test_stream_node_initialize_and_full_evaluate_the_negative(sn, sa, cs, sd15):
    model, positive = _family(sd15, 768, False)
    negative = [[torch.zeros_like(positive[0][0]), {}]]
    sigmas = sa.build_sigmas(model, "add_trailing", 2, 0.5, "")
    with torch.inference_mode():
        with count_unet_calls(model) as init_calls:
            sn.run_stream(model, positive, _latent(2), sigmas, _opts(sn, cs, rcfg=cs.RCFG("initialize", 1.5)), ("i", "", ""), negative)
        with count_unet_calls(model) as full_calls:
            sn.run_stream(model, positive, _latent(2), sigmas, _opts(sn, cs, rcfg=cs.RCFG("full", 1.5)), ("f", "", ""), negative)
    # initialize: the stream rows plus one negative row per frame (at the frame's first step)
    assert sorted(init_calls) == sorted([1, 1, 2, 1, 1]) and sum(init_calls) == 2 * 2 + 2
    assert full_calls == [2, 4, 2]  # ordinary CFG: cond + uncond rows in one call
    with pytest.raises(ValueError, match="negative"):
        sn.ADDStreamBatch.execute(model, positive, _latent(1), 0, 2, "add_trailing", "", 0.5, "fixed", 1, "batch", True,
                                  "full", 1.5, 1.0, False, 0.98, 10, "")


def test_add_ksampler_rcfg_none_is_the_plain_sampler_and_self_costs_nothing_extra(sa, sd15):
    model, positive = _family(sd15, 768, False)
    negative = [[torch.zeros_like(positive[0][0]), {}]]
    ks = sa.ADDKSampler
    lat = _latent(2)
    with torch.inference_mode():
        base = ks.execute(model, positive, lat, 4, 2, "add_trailing", "", 0.6)[0]["samples"]
        none = ks.execute(model, positive, lat, 4, 2, "add_trailing", "", 0.6, "none", 3.0, 0.5, negative)[0]["samples"]
        with count_unet_calls(model) as self_calls:
            selfg = ks.execute(model, positive, lat, 4, 2, "add_trailing", "", 0.6, "self", 1.5, 1.0)[0]["samples"]
        with count_unet_calls(model) as init_calls:
            ks.execute(model, positive, lat, 4, 2, "add_trailing", "", 0.6, "initialize", 1.5, 1.0, negative)
        with count_unet_calls(model) as full_calls:
            ks.execute(model, positive, lat, 4, 2, "add_trailing", "", 0.6, "full", 1.5, 1.0, negative)
        self1 = ks.execute(model, positive, lat, 4, 2, "add_trailing", "", 0.6, "self", 1.0, 1.0)[0]["samples"]
    assert torch.equal(base, none)
    assert self_calls == [2, 2] and init_calls == [2, 2, 2] and full_calls == [4, 4]
    assert (selfg - base).abs().max() > 1e-3
    torch.testing.assert_close(self1, base, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="negative"):
        ks.execute(model, positive, lat, 4, 2, "add_trailing", "", 0.6, "initialize", 1.5, 1.0)


def test_old_add_ksampler_widgets_still_convert():
    """Saved workflows list the six old widget values; the new ones are optional and come after."""
    import json
    from pathlib import Path

    from scripts.workflow_api import to_api

    wf = json.loads((Path(__file__).parent.parent / "workflows" / "sd_turbo_txt2img_1step.json").read_text())
    info = {"ADDKSampler": {"input": {"required": {"model": ["MODEL", {}], "positive": ["CONDITIONING", {}],
                                                   "latent_image": ["LATENT", {}],
                                                   "seed": ["INT", {"control_after_generate": True}], "steps": ["INT", {}],
                                                   "schedule": [["add_trailing"], {}], "custom": ["STRING", {}],
                                                   "denoise": ["FLOAT", {}]},
                                      "optional": {"cfg_type": [["none", "self"], {}], "guidance_scale": ["FLOAT", {}],
                                                   "delta": ["FLOAT", {}], "negative": ["CONDITIONING", {}]}}}}
    wf["nodes"] = [dict(n, inputs=[]) for n in wf["nodes"] if n["type"] == "ADDKSampler"]
    wf["links"] = []
    api = to_api(wf, info)
    (node,) = api.values()
    assert node["inputs"]["denoise"] == 1.0 and "cfg_type" not in node["inputs"]  # defaults apply


# ------------------------------------------------------------------------------------------
# state across queue runs
# ------------------------------------------------------------------------------------------
def _live_call(sn, model, positive, lat, unique_id="7", workflow="wf-a", **kw):
    args = dict(seed=3, steps=3, schedule="add_trailing", custom="", denoise=0.75, noise="fixed", frame_buffer_size=1,
                mode="live", denoising_batch=True, cfg_type="none", guidance_scale=1.2, delta=1.0, similarity_filter=False,
                similarity_threshold=0.98, max_skip_frames=10, stream_id="")
    args.update(kw)
    from comfy_api.latest import io

    # the hidden inputs as ComfyUI hands them to a node in a prompt: on a copy of the class, per run
    # (its PREPARE_CLASS_CLONE, whose argument differs between hosts: 0.33 takes the executor's v3_data)
    hidden = io.HiddenHolder.from_dict({io.Hidden.unique_id: unique_id, io.Hidden.prompt: {},
                                        io.Hidden.extra_pnginfo: {"workflow": {"id": workflow}}})
    node = type("ADDStreamBatchInAPrompt", (sn.ADDStreamBatch,), {"hidden": hidden})
    res = node.execute(model, positive, lat, **args)
    assert res.ui == {"text": [res[1]]}
    return res[0]["samples"], res[1]


def test_live_state_persists_across_runs_and_prompt_change_refreshes_only_embeddings(sn, sd15):
    import comfy.model_management

    model, positive = _family(sd15, 768, False)
    lat = _latent(4)
    with torch.inference_mode():
        whole, _ = _live_call(sn, model, positive, lat, workflow="whole")
        a, rep1 = _live_call(sn, model, positive, {"samples": lat["samples"][:2]})
        key = ("workflow:wf-a", "7", "")
        state = sn.states()[key]
        stream = state.stream
        assert state.runs == 1 and stream.in_flight == 2 and state.embedding_refreshes == 1
        b, rep2 = _live_call(sn, model, positive, {"samples": lat["samples"][2:]})
        assert sn.states()[key] is state and state.runs == 2 and state.stream is stream and state.next_frame == 4
        assert state.embedding_refreshes == 1 and "run 2 of this stream" in rep2
        # two runs of 2 frames = one run of 4 frames (the pipeline carried over)
        torch.testing.assert_close(torch.cat([a, b]), whole, rtol=1e-4, atol=1e-4)
        # another workflow or node never shares the state
        _live_call(sn, model, positive, {"samples": lat["samples"][:1]}, workflow="wf-b")
        _live_call(sn, model, positive, {"samples": lat["samples"][:1]}, unique_id="8")
        assert sn.states()[key].runs == 2
        # a new prompt: embeddings refreshed, frames in flight kept
        in_flight = stream.frames
        other = [[positive[0][0] + 1.0, {}]]
        _live_call(sn, model, other, {"samples": lat["samples"][:1]})
        assert state.embedding_refreshes == 2 and state.stream is stream and stream.frames == [4] + in_flight[:-1]
        assert torch.equal(state.embeddings["positive"][1][0][0].cpu(), other[0][0])
        # the model is unloaded: the state goes with it
        comfy.model_management.unload_all_models()
        sn.prune_states()
        assert key not in sn.states()
        _live_call(sn, model, positive, {"samples": lat["samples"][:1]})
        assert sn.states()[key] is not state and sn.states()[key].runs == 1


def test_state_is_dropped_when_the_model_is_garbage_collected(sn):
    import gc

    module = torch.nn.Linear(1, 1)  # stands in for a BaseModel: only its lifetime matters here
    key = ("gc-test", "1", "")
    sn.get_state(key, module)
    assert key in sn.states()
    del module
    gc.collect()
    assert key not in sn.states()


def test_workflow_key_uses_the_workflow_id_else_the_graph_shape(sn):
    p1 = {"1": {"class_type": "A", "inputs": {"text": "cat"}}, "2": {"class_type": "B", "inputs": {"x": ["1", 0]}}}
    p2 = {"1": {"class_type": "A", "inputs": {"text": "dog"}}, "2": {"class_type": "B", "inputs": {"x": ["1", 0]}}}
    p3 = {"1": {"class_type": "A", "inputs": {"text": "cat"}}, "2": {"class_type": "C", "inputs": {"x": ["1", 0]}}}
    assert sn.workflow_key(p1, None) == sn.workflow_key(p2, None) != sn.workflow_key(p3, None)
    assert sn.workflow_key(p1, {"workflow": {"id": "abc"}}) == "workflow:abc"


def test_fingerprint_reruns_live_streams_only(sn):
    live = sn.ADDStreamBatch.fingerprint_inputs(mode="live")
    assert live != live  # NaN: never equal, so ComfyUI runs the node on every queue
    assert sn.ADDStreamBatch.fingerprint_inputs(mode="batch") == sn.ADDStreamBatch.fingerprint_inputs(mode="batch")


# ------------------------------------------------------------------------------------------
# similarity filter in the node
# ------------------------------------------------------------------------------------------
def test_node_filter_skips_a_static_clip_and_reuses_the_output(sn, sa, cs, sd15):
    model, positive = _family(sd15, 768, False)
    frame = _latent(1)["samples"]
    static = {"samples": frame.repeat(5, 1, 1, 1)}
    sigmas = sa.build_sigmas(model, "add_trailing", 2, 0.5, "")
    opts = _opts(sn, cs, similarity_filter=True, similarity_threshold=0.98, max_skip_frames=10)
    with torch.inference_mode(), count_unet_calls(model) as calls:
        out, report, _ = sn.run_stream(model, positive, static, sigmas, opts, ("s", "", ""))
    assert "skipped 4 of 5" in report and calls == [1, 1]
    for i in range(1, 5):
        assert torch.equal(out["samples"][i], out["samples"][0])
    moving = {"samples": frame + 0.01 * torch.arange(5).view(5, 1, 1, 1)}
    opts1 = _opts(sn, cs, similarity_filter=True, similarity_threshold=1.0)
    with torch.inference_mode():
        _, report, _ = sn.run_stream(model, positive, moving, sigmas, opts1, ("s", "1", ""))
    assert "skipped 0 of 5" in report


# ------------------------------------------------------------------------------------------
# ADD Load Frames
# ------------------------------------------------------------------------------------------
def _write_frames(folder, names, size=(24, 16)):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        Image.new("RGB", size, (10 * i, 0, 0)).save(folder / n)


def test_load_frames_in_natural_order_with_selection_and_resize(sn, comfy):
    import folder_paths

    root = __import__("pathlib").Path(folder_paths.get_input_directory()) / "stream_test" / "clip"
    _write_frames(root, ["f10.png", "f2.png", "f1.png", "notes.txt"][:3])
    (root / "notes.txt").write_text("not a frame")
    node = sn.ADDLoadFrames
    frames, count = node.execute("stream_test/clip", 0, 1, 0, 0, 0)
    assert count == 3 and frames.shape == (3, 16, 24, 3)
    assert [round(float(frames[i, 0, 0, 0]) * 255) for i in range(3)] == [20, 10, 0]  # f1, f2, f10
    frames, count = node.execute("stream_test/clip", 1, 1, 1, 32, 8)
    assert count == 1 and frames.shape == (1, 8, 32, 3)
    assert node.fingerprint_inputs("stream_test/clip") == node.fingerprint_inputs("stream_test/clip")


@pytest.mark.parametrize("folder, match", [
    ("stream_test/missing", "does not exist"), ("../outside", r"'\.\.'|\.\."), ("/etc", "absolute"),
    ("stream_test/empty", "no image files"), ("stream_test/mixed", "share one size"),
])
def test_load_frames_errors_name_the_problem(sn, comfy, folder, match):
    import folder_paths
    from pathlib import Path

    base = Path(folder_paths.get_input_directory()) / "stream_test"
    (base / "empty").mkdir(parents=True, exist_ok=True)
    _write_frames(base / "mixed", ["a1.png"], (16, 16))
    _write_frames(base / "mixed", ["a2.png"], (24, 16))
    with pytest.raises(ValueError, match=match):
        sn.ADDLoadFrames.execute(folder, 0, 1, 0, 0, 0)


def test_nodes_are_registered_with_tooltips(host_nodes):
    for node_id in ("ADDStreamBatch", "ADDLoadFrames"):
        cls = host_nodes.NODE_CLASS_MAPPINGS[node_id]
        assert cls.DESCRIPTION and cls.OUTPUT_TOOLTIPS
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, s in spec.get(section, {}).items():
                assert s[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    ks = host_nodes.NODE_CLASS_MAPPINGS["ADDKSampler"].INPUT_TYPES()
    assert list(ks["optional"]) == ["cfg_type", "guidance_scale", "delta", "negative"]
    assert all(s[1].get("tooltip") for s in ks["optional"].values())


# ------------------------------------------------------------------------------------------
# a live stream queued twice on a real server (fingerprint_inputs re-runs it; the state carries over)
# ------------------------------------------------------------------------------------------
@pytest.mark.server
def test_live_stream_reruns_on_the_server_and_keeps_its_state(comfy_server):
    api = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_turbo.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "ADDStreamBatch", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "latent_image": ["3", 0], "seed": 0, "steps": 2,
            "schedule": "add_trailing", "custom": "", "denoise": 1.0, "noise": "per_frame", "frame_buffer_size": 1,
            "mode": "live", "denoising_batch": True, "cfg_type": "none", "guidance_scale": 1.2, "delta": 1.0,
            "similarity_filter": False, "similarity_threshold": 0.98, "max_skip_frames": 10, "stream_id": "server"}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "stream_live"}},
    }
    reports = []
    for _ in range(2):
        hist = comfy_server.run(api)
        assert hist["status"]["status_str"] == "success", str(hist["status"])[:2000]
        reports.append(hist["outputs"]["4"]["text"][0])
    assert "run 1 of this stream" in reports[0] and "1 frames in flight" in reports[0]
    assert "run 2 of this stream" in reports[1]
    # Two nodes with the same stream_id in one workflow keep two states: the host hands each its own
    # unique_id (a hidden input); without it they would share one stream.
    two = dict(api, **{nid: {**api["4"], "inputs": {**api["4"]["inputs"], "stream_id": "twin"}} for nid in ("4", "6")})
    two["7"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "stream_twin"}}
    hist = comfy_server.run(two)
    assert hist["status"]["status_str"] == "success", str(hist["status"])[:2000]
    assert all("run 1 of this stream" in hist["outputs"][nid]["text"][0] for nid in ("4", "6")), hist["outputs"]

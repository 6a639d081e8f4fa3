"""ADD Fast Path: the pure keying/fallback logic (toy modules), the ComfyUI plumbing on the tiny
models (CPU: the eager fallback and a recomputing stand-in for the capture), and CUDA equivalence
(fast path == eager within fp tolerance), which runs only where a CUDA GPU is present. Over HTTP:
the node in a prompt on a CPU server (passed through, logged), and on a GPU server (a replayed
graph) when the server runs on CUDA (``COMFYUI_ADD_DEVICE=cuda``).
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from comfyui_add.core import fast_path as fp

H = W = 8  # latent side (64x64 images)
NO_CUDA = not torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(NO_CUDA, reason="no CUDA GPU here: CUDA graphs and the compiled UNet need one "
                                                "(the CPU path is tested above)")


# ------------------------------------------------------------------------------------------
# toy module with the UNet's call signature
# ------------------------------------------------------------------------------------------
class ToyUNet(torch.nn.Module):
    """forward(x, timesteps, context, y, control, transformer_options) like ComfyUI's UNetModel."""

    def __init__(self, channels=4, ctx=8, adm=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.ctx = torch.nn.Linear(ctx, channels)
        self.adm = torch.nn.Linear(adm, channels) if adm else None
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3
        self.calls = 0

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}):
        self.calls += 1
        h = self.conv(x) * (timesteps[:, None, None, None] / 1000.0)
        h = h + self.ctx(context.mean(1))[:, :, None, None]
        if y is not None:
            h = h + self.adm(y)[:, :, None, None]
        return torch.tanh(h)


def _call(batch=1, side=4, ctx_len=5, seed=0, adm=None):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, adm, generator=g) if adm else None
    return (torch.randn(batch, 4, side, side, generator=g), torch.full((batch,), 999.0),
            torch.randn(batch, ctx_len, 8, generator=g), y)


def _forward(target, x, t, c, y):
    fn = target.forward if isinstance(target, torch.nn.Module) else target
    return fn(x, t, c, y, None, {})


def _run(runner, module, tensors, **kw):
    return runner(module, tensors, lambda: module(*tensors), _forward, **kw)


class Log(list):
    def __call__(self, msg):
        self.append(msg)


def _graph_runner(**kw):
    log = Log()
    return fp.GraphRunner(capture=kw.pop("capture", fp.recompute_capturer), require_cuda=False, log=log, **kw), log


# ------------------------------------------------------------------------------------------
# core: does this call fit?
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, code", [
    (dict(control={"input": [torch.zeros(1)]}), "control"),
    (dict(patches={"transformer_options['patches']": ["attn2_patch"]}), "patches"),
    (dict(patches={"transformer_options['patches_replace']": ["attn1"]}), "patches"),
    (dict(streamed=True), "streamed"),
    (dict(kwargs={"num_video_frames": 14}), "kwargs"),
    (dict(other_wrappers=1), "wrappers"),
])
def test_unfit_calls_name_their_reason(case, code):
    tensors = _call()
    with torch.no_grad():
        reason = fp.unfit_reason(tensors, require_cuda=False, **case)
        assert reason is not None and reason[0] == code and reason[1]
        # the same call without the offending part fits
        assert fp.unfit_reason(tensors, require_cuda=False, patches={"transformer_options['patches']": []}) is None


def test_cpu_tensors_grad_and_devices_do_not_fit():
    tensors = _call()
    with torch.no_grad():
        assert fp.unfit_reason(tensors)[0] == "cpu"  # require_cuda is the default
        meta = (tensors[0], tensors[1], tensors[2].to("meta"), None)
        assert fp.unfit_reason(meta, require_cuda=False)[0] == "devices"
        assert fp.unfit_reason((None,) + tensors[1:], require_cuda=False)[0] == "args"
    assert torch.is_grad_enabled()
    assert fp.unfit_reason(tensors, require_cuda=False)[0] == "grad"  # training calls stay eager
    with torch.inference_mode():
        assert fp.unfit_reason(tensors, require_cuda=False) is None


def test_call_key_is_the_signature_not_the_values():
    with torch.no_grad():
        a, b = fp.call_key(_call(seed=0)), fp.call_key(_call(seed=1))
        assert a == b
        assert fp.call_key(_call(batch=2)) != a
        assert fp.call_key(_call(side=8)) != a
        assert fp.call_key(_call(ctx_len=7)) != a  # a longer prompt is another graph
        assert fp.call_key(_call(adm=6)) != a
        half = tuple(None if t is None else t.half() for t in _call())
        assert fp.call_key(half) != a
    with torch.inference_mode():
        assert fp.call_key(_call()) != a  # static buffers made in inference mode are another key
    assert "x 1x4x4x4 float32" in fp.describe_key(a) and "y" not in fp.describe_key(a)


# ------------------------------------------------------------------------------------------
# core: graph runner (capture replaced by a recomputing stand-in on the CPU)
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def test_replay_reads_fresh_inputs_and_returns_an_unaliased_output():
    module = ToyUNet(adm=6)
    runner, log = _graph_runner()
    outs = []
    for seed in range(3):
        tensors = _call(seed=seed, adm=6)
        got = _run(runner, module, tensors)
        assert torch.equal(got, module(*tensors))  # bit-identical to eager, with this call's values
        outs.append(got)
    assert not torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], _run(runner, module, _call(seed=0, adm=6)))  # earlier outputs kept their values
    assert runner.stats["captures"] == 1 and runner.stats["replays"] == 4 and runner.stats["eager"] == 0
    assert len(log) == 1 and "captured x 1x4x4x4" in log[0]


@torch.no_grad()
def test_new_signature_captures_until_the_cache_is_full_then_runs_eagerly():
    module = ToyUNet()
    runner, log = _graph_runner(max_entries=2)
    for side in (4, 6, 8, 8, 4, 10, 12):
        tensors = _call(side=side)
        assert torch.equal(_run(runner, module, tensors), module(*tensors))
    assert runner.stats["captures"] == 2 and len(runner.graphs) == 2
    assert runner.stats["eager:cache"] == 4  # 8, 8, 10, 12
    said = [m for m in log if "cache" in m]
    assert len(said) == 1 and "raise cache_size" in said[0]  # one line per reason, not per call


@torch.no_grad()
def test_capture_failure_falls_back_once_and_is_not_retried():
    tries = []

    def broken(fn, inputs):
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    module = ToyUNet()
    runner, log = _graph_runner(capture=broken)
    for seed in range(3):
        tensors = _call(seed=seed)
        assert torch.equal(_run(runner, module, tensors), module(*tensors))
    assert len(tries) == 1 and runner.stats["capture_failed"] == 1 and runner.stats["eager:capture"] == 3
    assert len(log) == 1 and "not permitted" in log[0]
    runner.clear()  # a model reload forgets the failure: the next call tries again
    _run(runner, module, _call())
    assert len(tries) == 2


@torch.no_grad()
def test_unfit_call_is_exactly_the_eager_call():
    module = ToyUNet()
    runner, log = _graph_runner()
    sentinel = torch.zeros(1)
    got = runner(module, _call(), lambda: sentinel, _forward, control={"output": []})
    assert got is sentinel and not runner.graphs
    assert runner.stats["eager:control"] == 1 and "ControlNet" in log[0]


@torch.no_grad()
def test_weights_replaced_drop_the_graphs_weights_changed_in_place_do_not():
    module = ToyUNet()
    runner, _ = _graph_runner()
    tensors = _call()
    _run(runner, module, tensors)
    module.conv.weight.mul_(0.5)  # in place: same address, a graph reads the new values
    assert torch.equal(_run(runner, module, tensors), module(*tensors))
    assert runner.stats["captures"] == 1 and runner.stats["weights_moved"] == 0
    module.conv.weight = torch.nn.Parameter(module.conv.weight * 2)  # a new tensor: new address
    assert torch.equal(_run(runner, module, tensors), module(*tensors))
    assert runner.stats["weights_moved"] == 1 and runner.stats["captures"] == 2


@torch.no_grad()
def test_weights_split_across_devices_run_eagerly():
    module = ToyUNet()
    module.ctx.weight = torch.nn.Parameter(torch.empty(4, 8, device="meta"))  # stands in for an offloaded layer
    watch = fp.WeightWatch()
    assert watch.check(module) and watch.device is None and "low-VRAM" in watch.problem
    assert not watch.check(module)  # nothing moved since
    runner, log = _graph_runner()
    sentinel = torch.ones(1)
    assert runner(module, _call(), lambda: sentinel, _forward) is sentinel
    assert runner.stats["eager:weights"] == 1 and "--highvram" in log[0]


def test_runner_rejects_an_empty_cache():
    with pytest.raises(ValueError, match="max_entries"):
        fp.GraphRunner(max_entries=0)


# ------------------------------------------------------------------------------------------
# core: compiled runner (compile replaced by a counting stand-in)
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def test_compiled_runner_uses_the_compiled_forward_and_bounds_signatures():
    made = []

    def fake_compile(module):
        made.append(module)
        return lambda *a: module.forward(*a) + 0.0  # a distinct callable computing the same

    module = ToyUNet()
    log = Log()
    runner = fp.CompiledRunner(compile=fake_compile, max_entries=2, require_cuda=False, log=log)
    for side in (4, 4, 6, 8):
        tensors = _call(side=side)
        assert torch.equal(runner(module, tensors, lambda: module(*tensors), _forward), module(*tensors))
    assert len(made) == 1  # compiled once per module
    assert runner.stats["compiles"] == 2 and runner.stats["compiled_calls"] == 3 and runner.stats["eager:cache"] == 1


@torch.no_grad()
def test_compile_failure_falls_back_for_that_signature():
    def failing(module):
        def run(*a):
            raise RuntimeError("BackendCompilerFailed: no C++ compiler")
        return run

    module = ToyUNet()
    log = Log()
    runner = fp.CompiledRunner(compile=failing, require_cuda=False, log=log)
    for _ in range(2):
        tensors = _call()
        assert torch.equal(runner(module, tensors, lambda: module(*tensors), _forward), module(*tensors))
    assert runner.stats["compile_failed"] == 1 and runner.stats["eager:compile"] == 2 and len(log) == 1


# ------------------------------------------------------------------------------------------
# ComfyUI: the node and its model, on the tiny models
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def F(plugin):
    return plugin("nodes.fast_path")


@pytest.fixture(scope="module")
def S(plugin):
    return plugin("nodes.sampling")


@pytest.fixture(scope="module")
def CF(plugin):
    return plugin("core.fast_path")


def _positive(ctx_dim=768, pooled=False, seed=11):
    g = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, 1280, generator=g), "width": 64, "height": 64} if pooled else {}
    return [[torch.randn(1, 77, ctx_dim, generator=g) * 0.5, extra]]


def _sample(S, model, positive, batch=2, steps=1, seed=5):
    latent = {"samples": torch.zeros(batch, 4, H, W)}
    return S.ADDKSampler.execute(model, positive, latent, seed, steps, "add_trailing", "", 1.0)[0]["samples"]


def _on_cpu(model) -> bool:
    return torch.device(model.load_device).type == "cpu"


def _stand_in_runner(CF):
    """The real graph runner with capture replaced by recomputation, allowed on CPU tensors."""
    return CF.GraphRunner(capture=CF.recompute_capturer, require_cuda=False, log=Log())


def test_node_is_registered_with_tooltips(host_nodes):
    cls = host_nodes.NODE_CLASS_MAPPINGS["ADDFastPath"]
    assert host_nodes.NODE_DISPLAY_NAME_MAPPINGS["ADDFastPath"] == "ADD Fast Path"
    assert cls.RETURN_TYPES == ["MODEL"] and cls.DESCRIPTION and cls.OUTPUT_TOOLTIPS
    spec = cls.INPUT_TYPES()["required"]
    assert set(spec["mode"][1]["options"]) == {"off", "cuda_graph", "torch_compile"}
    for _, options in spec.values():
        assert options.get("tooltip")
    assert "CPU" in spec["mode"][1]["tooltip"]


@pytest.mark.parametrize("mode", ["off", "cuda_graph", "torch_compile"])
def test_off_and_cpu_give_the_model_back_unchanged_and_bit_identical(F, S, sd15, mode):
    model = sd15[0]
    if not _on_cpu(model) and mode != "off":
        pytest.skip("ComfyUI runs on a GPU in this session: the CPU pass-through does not apply")
    positive = _positive()
    ref = _sample(S, model, positive, steps=2)
    out_model = F.ADDFastPath.execute(model, mode, "default", 4)[0]
    assert out_model is model and not F.has_fast_path(out_model)
    assert torch.equal(_sample(S, out_model, positive, steps=2), ref)


def test_cpu_fallback_through_comfy_is_bit_identical(F, S, CF, sd15):
    """The real CUDA-graph runner attached on a CPU model: every call takes the eager fallback."""
    model = sd15[0]
    if not _on_cpu(model):
        pytest.skip("ComfyUI runs on a GPU in this session: the per-call CPU fallback does not apply")
    runner = CF.GraphRunner(log=Log())
    fast = F.attach(model, runner)
    positive = _positive()
    for steps in (1, 4):
        assert torch.equal(_sample(S, fast, positive, steps=steps), _sample(S, model, positive, steps=steps))
    assert runner.stats["eager:cpu"] == 5 and not runner.graphs
    assert len(runner.log) == 1 and "not a CUDA device" in runner.log[0]


@pytest.mark.parametrize("steps", [1, 4])
def test_replay_plumbing_through_comfy_is_bit_identical(F, S, CF, sd15, steps):
    """Static buffers, the wrapper signature and the bare forward, on ComfyUI's own sampling stack."""
    model = sd15[0]
    positive = _positive()
    runner = _stand_in_runner(CF)
    fast = F.attach(model, runner)
    assert F.has_fast_path(fast) and not F.has_fast_path(model) and F.runner_of(fast) is runner
    assert torch.equal(_sample(S, fast, positive, steps=steps), _sample(S, model, positive, steps=steps))
    assert runner.stats["replays"] == steps and runner.stats["eager"] == 0
    assert runner.stats["captures"] == 1  # one signature for every step of the fixed-shape loop


def test_sdxl_with_adm_through_the_fast_path(F, S, CF, sdxl):
    positive = _positive(2048, pooled=True)
    runner = _stand_in_runner(CF)
    fast = F.attach(sdxl, runner)
    assert torch.equal(_sample(S, fast, positive, steps=2), _sample(S, sdxl, positive, steps=2))
    assert runner.stats["replays"] == 2
    key = next(iter(runner.graphs))
    assert key[3][0] == (2, 2816)  # y (ADM) is part of the signature and went through a static buffer


@pytest.mark.parametrize("order", ["lora_then_fast", "fast_then_lora"])
def test_lora_before_or_after_the_node(F, S, CF, sd15, tiny, order):
    import comfy.sd
    import comfy.utils

    model = sd15[0]
    lora_sd = comfy.utils.load_torch_file(str(tiny["tiny_sd15_comfy"]), safe_load=True)

    def lora(m):
        return comfy.sd.load_lora_for_models(m, None, lora_sd, 0.8, 0.0)[0]

    positive = _positive()
    runner = _stand_in_runner(CF)
    if order == "lora_then_fast":
        fast_lora = F.attach(lora(model), runner)
    else:
        fast = F.attach(model, runner)
        fast_lora = lora(fast)
        assert F.runner_of(fast_lora) is runner  # the clone keeps the wrapper
    plain, with_lora = _sample(S, model, positive, steps=2), _sample(S, lora(model), positive, steps=2)
    assert not torch.equal(plain, with_lora)  # the LoRA matters at this strength
    assert torch.equal(_sample(S, fast_lora, positive, steps=2), with_lora)
    if order == "fast_then_lora":  # back to the model without the LoRA: its weights, not the LoRA's
        assert torch.equal(_sample(S, fast, positive, steps=2), plain)
    assert runner.stats["replays"] >= 2 and runner.stats["eager"] == 0


def test_attention_patch_runs_eagerly_and_identically(F, S, CF, sd15):
    model = sd15[0]
    patched = model.clone()
    patched.set_model_attn2_patch(lambda q, k, v, extra_options: (q, k * 1.5, v))
    runner = _stand_in_runner(CF)
    fast = F.attach(patched, runner)
    positive = _positive()
    ref = _sample(S, patched, positive, steps=2)
    assert not torch.equal(ref, _sample(S, model, positive, steps=2))
    assert torch.equal(_sample(S, fast, positive, steps=2), ref)
    assert runner.stats["eager:patches"] == 2 and not runner.graphs and "attn2_patch" in runner.log[0]


def test_unloading_the_model_drops_its_graphs(F, S, CF, sd15):
    import comfy.model_management

    runner = _stand_in_runner(CF)
    fast = F.attach(sd15[0], runner)
    _sample(S, fast, _positive())
    assert runner.graphs
    _sample(S, sd15[0], _positive())  # ComfyUI swaps in another clone of the same weights: graphs stay valid
    _sample(S, fast, _positive())
    assert runner.stats["captures"] == 1 and runner.stats["replays"] == 2
    comfy.model_management.unload_all_models()
    assert not runner.graphs  # ON_DETACH: the graphs' memory goes with the model
    assert torch.equal(_sample(S, fast, _positive()), _sample(S, sd15[0], _positive()))


def test_off_removes_a_fast_path_and_reapplying_replaces_it(F, CF, sd15):
    model = sd15[0]
    a = F.attach(model, _stand_in_runner(CF))
    b = F.attach(a, _stand_in_runner(CF))
    assert len(b.get_wrappers("diffusion_model", F.KEY)) == 1 and F.runner_of(b) is not F.runner_of(a)
    off = F.apply_fast_path(b, "off")
    assert not F.has_fast_path(off) and F.has_fast_path(b)  # the input model keeps its own


@pytest.mark.parametrize("args, field", [
    (("fast", "default", 4), "mode"),
    (("cuda_graph", "turbo", 4), "compile_mode"),
    (("cuda_graph", "default", 0), "cache_size"),
    (("cuda_graph", "default", 99), "cache_size"),
    (("cuda_graph", "default", 2.5), "cache_size"),
])
def test_bad_widgets_name_the_input(F, plugin, sd15, args, field):
    with pytest.raises(plugin("core.errors").ADDError, match=field):
        F.apply_fast_path(sd15[0], *args)


def test_non_unet_model_is_refused_with_the_fix(F, plugin):
    class NotAUNetPatcher:
        def add_wrapper_with_key(self, *a):
            raise AssertionError("must not attach")

        def get_model_object(self, name):
            return torch.nn.Linear(2, 2)

    with pytest.raises(plugin("core.errors").ADDError, match="supports UNet models.*mode to off"):
        F.apply_fast_path(NotAUNetPatcher(), "cuda_graph")
    with pytest.raises(plugin("core.errors").ADDError, match="not a ComfyUI MODEL"):
        F.apply_fast_path(object(), "cuda_graph")


# ------------------------------------------------------------------------------------------
# CUDA: fast path == eager within fp tolerance (skipped without a GPU)
# ------------------------------------------------------------------------------------------
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-3), torch.float16: dict(atol=3e-3, rtol=1e-2)}


def _cuda_unet(model, dtype):
    with torch.inference_mode():
        return copy.deepcopy(model.model.diffusion_model).to(device="cuda", dtype=dtype).eval()


def _cuda_inputs(model, dtype, batch=1, side=H, ctx_dim=768, pooled=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, side, side, generator=g)
    t = torch.full((batch,), 999.0)
    ctx = torch.randn(batch, 77, ctx_dim, generator=g) * 0.5
    y = None
    if pooled:
        y = model.model.encode_adm(pooled_output=torch.randn(batch, 1280, generator=g), width=side * 8,
                                   height=side * 8)
    return tuple(None if v is None else v.to("cuda", dtype if v is not t else torch.float32) for v in (x, t, ctx, y))


def _through_wrapper(F, unet, runner, inputs, control=None, patches=None):
    """unet.forward with the fast-path wrapper registered the way a ModelPatcher registers it."""
    import comfy.patcher_extension as pe

    opts = {}
    pe.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, F.KEY, F.make_wrapper(runner), opts)
    if patches:
        opts["patches"] = patches
    x, t, ctx, y = inputs
    return unet(x, t, context=ctx, y=y, control=control, transformer_options=opts)


@needs_cuda
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_equals_eager(request, F, CF, family, dtype):
    model = request.getfixturevalue(family)
    model = model[0] if isinstance(model, tuple) else model
    unet = _cuda_unet(model, dtype)
    ctx_dim, pooled = (768, False) if family == "sd15" else (2048, True)
    runner = CF.GraphRunner(max_entries=2, log=Log())
    with torch.inference_mode():
        for seed in range(3):
            inputs = _cuda_inputs(model, dtype, ctx_dim=ctx_dim, pooled=pooled, seed=seed)
            want = unet(*inputs[:2], context=inputs[2], y=inputs[3])
            got = _through_wrapper(F, unet, runner, inputs)
            torch.testing.assert_close(got, want, **TOL[dtype])
    assert runner.stats["captures"] == 1 and runner.stats["replays"] == 3, (dict(runner.stats), runner.failed)


@needs_cuda
def test_cuda_graph_recaptures_on_a_new_shape_and_weights(F, CF, sd15):
    unet = _cuda_unet(sd15[0], torch.float16)
    runner = CF.GraphRunner(max_entries=2, log=Log())
    with torch.inference_mode():
        for side, batch in ((H, 1), (2 * H, 1), (H, 2), (H, 1)):
            inputs = _cuda_inputs(sd15[0], torch.float16, batch=batch, side=side)
            got = _through_wrapper(F, unet, runner, inputs)
            torch.testing.assert_close(got, unet(*inputs[:2], context=inputs[2]), **TOL[torch.float16])
        assert runner.stats["captures"] == 2 and runner.stats["eager:cache"] == 1 and runner.stats["replays"] == 3
        # a weight replaced by a new tensor (what a model reload does): the old graph must not be replayed
        conv = unet.out[2]
        conv.weight = torch.nn.Parameter(conv.weight * -1.0, requires_grad=False)
        inputs = _cuda_inputs(sd15[0], torch.float16)
        got = _through_wrapper(F, unet, runner, inputs)
        torch.testing.assert_close(got, unet(*inputs[:2], context=inputs[2]), **TOL[torch.float16])
    assert runner.stats["weights_moved"] == 1 and runner.stats["captures"] == 3


@needs_cuda
def test_cuda_unsupported_calls_fall_back_exactly(F, CF, sd15):
    unet = _cuda_unet(sd15[0], torch.float16)
    runner = CF.GraphRunner(log=Log())
    inputs = _cuda_inputs(sd15[0], torch.float16)
    with torch.inference_mode():
        double = {"attn2_patch": [lambda q, k, v, extra_options: (q, k * 2, v)]}
        want = unet(*inputs[:2], context=inputs[2], transformer_options={"patches": double})
        got = _through_wrapper(F, unet, runner, inputs, patches=double)
        assert torch.equal(got, want)
    assert runner.stats["eager:patches"] == 1 and not runner.graphs


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_compile_equals_eager(F, CF, sd15, dtype):
    unet = _cuda_unet(sd15[0], dtype)
    runner = CF.CompiledRunner(mode="default", log=Log())
    with torch.inference_mode():
        for seed in range(2):
            inputs = _cuda_inputs(sd15[0], dtype, seed=seed)
            got = _through_wrapper(F, unet, runner, inputs)
            torch.testing.assert_close(got, unet(*inputs[:2], context=inputs[2]), atol=2e-3 if dtype == torch.float32
                                       else 1e-2, rtol=1e-2)
    assert runner.stats["compiles"] == 1 and runner.stats["compiled_calls"] == 2, (dict(runner.stats), runner.failed)


@needs_cuda
@pytest.mark.parametrize("mode", ["cuda_graph", "torch_compile"])
def test_cuda_node_on_comfy_sampling_equals_eager(F, S, sd15, mode):
    model = sd15[0]
    if _on_cpu(model):
        pytest.skip("ComfyUI runs on the CPU in this session; run with COMFYUI_ADD_DEVICE=cuda for the full GPU path")
    positive = _positive()
    fast = F.apply_fast_path(model, mode)
    runner = F.runner_of(fast)
    assert runner is not None
    for steps in (1, 4):
        want = _sample(S, model, positive, steps=steps)
        torch.testing.assert_close(_sample(S, fast, positive, steps=steps), want, atol=5e-3, rtol=1e-2)
    used = runner.stats["replays"] + runner.stats["compiled_calls"]
    assert used == 5 and runner.stats["eager"] == 0, dict(runner.stats)


# ------------------------------------------------------------------------------------------
# a real ComfyUI server: the node in a prompt (on the CPU: passed through, in words; on a GPU
# server, COMFYUI_ADD_DEVICE=cuda: a captured graph giving the plain prompt's image)
# ------------------------------------------------------------------------------------------
def _server_prompt(fast: bool, prefix: str) -> dict:
    p = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "ADDKSampler", "inputs": {"model": ["4", 0] if fast else ["1", 0], "positive": ["2", 0],
              "latent_image": ["3", 0], "seed": 7, "steps": 2, "schedule": "add_trailing", "custom": "999,499",
              "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
    if fast:
        p["4"] = {"class_type": "ADDFastPath", "inputs": {"model": ["1", 0], "mode": "cuda_graph",
                                                          "compile_mode": "default", "cache_size": 4}}
    return p


def _server_images(server, prefix: str):
    """(image with the fast path, image without) from the same prompt on ``server``, as uint8 arrays."""
    import numpy as np
    from PIL import Image

    pixels = []
    for fast in (True, False):
        hist = server.run(_server_prompt(fast, f"{prefix}_{fast}"))
        assert hist["status"]["status_str"] == "success", hist["status"]
        img = hist["outputs"]["7"]["images"][0]
        path = Path(server.home) / "output" / img["subfolder"] / img["filename"]
        pixels.append(np.asarray(Image.open(path).convert("RGB")))
    assert pixels[0].shape == pixels[1].shape == (64, 64, 3)
    return pixels


@pytest.mark.server
def test_node_in_a_prompt_on_a_cpu_server_passes_the_model_through(comfy_server):
    """On a CPU server the node gives the model back unchanged and says so in the log (CUDA only)."""
    import numpy as np

    if not comfy_server.cpu:
        pytest.skip("the test server runs on a GPU in this session: the CPU pass-through does not apply")
    fast, plain = _server_images(comfy_server, "fast_path_cpu")
    assert np.array_equal(fast, plain)
    log = comfy_server.log()
    assert "ADD fast path: cuda_graph is off on cpu (CUDA only); the model runs unchanged." in log
    assert "ADD fast path (cuda_graph): captured" not in log


@needs_cuda
@pytest.mark.server
def test_node_in_a_prompt_on_a_cuda_server_replays_a_graph_with_the_same_image(comfy_server):
    import numpy as np

    if comfy_server.cpu:
        pytest.skip("the test server runs with --cpu; run with COMFYUI_ADD_DEVICE=cuda to start it on the GPU")
    before = len(comfy_server.log())
    fast, plain = _server_images(comfy_server, "fast_path_cuda")
    assert "ADD fast path (cuda_graph): captured" in comfy_server.log()[before:]  # the graph path ran
    assert np.abs(fast.astype(np.int16) - plain.astype(np.int16)).max() <= 2  # fp tolerance, in 8-bit pixels

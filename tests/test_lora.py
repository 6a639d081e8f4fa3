"""LoRA merge / save / extract nodes against ComfyUI's own lazy LoRA path (tiny SD1.5, CPU)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from scratch import model_folder


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_merge(plugin):
    return plugin("nodes.lora_merge")


@pytest.fixture(scope="module")
def turbo_ckpt(plugin):
    return plugin("nodes.turbo_checkpoint")


@pytest.fixture(scope="module")
def lora_extract(plugin):
    return plugin("nodes.lora_extract")


@pytest.fixture(scope="module")
def loras_dir(comfy, tiny, tmp_path_factory):
    """A tmp folder registered as a 'loras' folder, holding the tiny LoRA files."""
    with model_folder(tmp_path_factory, "loras", "loras", first=False) as d:
        for name in ("tiny_sd15_kohya", "tiny_sd15_comfy", "tiny_sd15_peft", "tiny_lcm_lora_sd15"):
            shutil.copy(tiny[name], d / f"{name}.safetensors")
        yield d


def _load(path):
    import comfy.utils

    return comfy.utils.load_torch_file(str(path), safe_load=True)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 4, 8, 8), generator=g)
    ctx = torch.randn((1, 77, 768), generator=g) * 0.5
    return x, ctx


def run(patcher, seed=0, sigma=1.5):
    """The diffusion model's denoised output at one sigma, loaded the way sampling loads it."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    x, ctx = _inputs(seed)
    with torch.no_grad():
        return patcher.model.apply_model(x, torch.tensor([sigma]), c_crossattn=ctx).float().clone()


def lazy(model, sd, strength=1.0):
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, None, sd, strength, 0.0)[0]


@torch.no_grad()
def unet_weights(patcher):
    """{key: fp32 weight} as the model would compute with (patches applied), for weight checks."""
    import comfy.lora

    out = {}
    for k, v in patcher.get_key_patches("diffusion_model.").items():
        w = v[0][0].float().clone()
        if k in patcher.patches:
            w = comfy.lora.calculate_weight(patcher.patches[k], w, k)
        out[k] = w
    return out


def merge(lora_merge, model, name, strength=1.0, sampling="none", clip=None, strength_clip=1.0):
    res = lora_merge.ADDLoraMerge.execute(model, name, strength, strength_clip, sampling, clip=clip)
    assert res.ui["text"][0] == res[2]
    return tuple(res)


def _close(a, b, tol=1e-5):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


# --------------------------------------------------------------------------------------------
# core.lora_keys (no ComfyUI needed, but the tiny files come from it)
# --------------------------------------------------------------------------------------------
def test_formats_detected(plugin, tiny):
    lk = plugin("core.lora_keys")
    want = {"tiny_sd15_kohya": "kohya-ldm", "tiny_sd15_comfy": "comfy-native", "tiny_sd15_peft": "peft",
            "tiny_lcm_lora_sd15": "kohya-diffusers"}
    for name, fmt in want.items():
        f = safe_open(str(tiny[name]), "pt")
        info = lk.describe({k: f.get_slice(k).get_shape() for k in f.keys()}, f.metadata(), name + ".safetensors")
        assert info.format == fmt, name
        assert info.family == "sd1"
        assert info.is_lcm == (name == "tiny_lcm_lora_sd15")
    assert lk.detect_lcm({"modelspec.title": "LCM LoRA SDXL"}, "x.safetensors")[0]
    assert not lk.detect_lcm({}, "calcium.safetensors")[0]
    sd = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": 1,
          "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": 2,
          "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": 3}
    out, renamed = lk.normalise_keys(sd)
    assert out["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"] == 1
    assert out["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"] == 2
    assert out["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] == 3
    assert len(renamed) == 1


# --------------------------------------------------------------------------------------------
# merge == lazily patched
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny_sd15_kohya", "tiny_sd15_comfy", "tiny_lcm_lora_sd15"])
def test_fused_equals_lazy(lora_merge, sd15, loras_dir, name):
    model = sd15[0]
    before = run(model)
    fused, _, report = merge(lora_merge, model, name + ".safetensors", strength=0.8)
    ref = lazy(model, _load(loras_dir / f"{name}.safetensors"), 0.8)
    assert fused.model is not model.model and not fused.patches
    out_f, out_l = run(fused), run(ref)
    assert not _close(out_f, before, 1e-3), "the LoRA changed nothing"
    assert _close(out_f, out_l), float((out_f - out_l).abs().max())
    assert "unet: 63/63" in report and "WARNING" not in report
    assert _close(run(model), before, 0), "the input model changed"
    # no tensor of the fused model is shared with the input model
    orig = {t.data_ptr() for t in model.model.state_dict().values()}
    assert not orig & {t.data_ptr() for t in fused.model.state_dict().values()}


def test_peft_fused_matches_direct_math_and_core_partial_load_is_reported(lora_merge, sd15, loras_dir, plugin):
    model = sd15[0]
    fused, _, report = merge(lora_merge, model, "tiny_sd15_peft.safetensors")
    peft = _load(loras_dir / "tiny_sd15_peft.safetensors")
    to_diff = __import__("scripts.tiny_models", fromlist=["x"]).sd15_ldm_to_diffusers_names()
    base, got = unet_weights(model), unet_weights(fused)
    n = 0
    for ldm, diff in to_diff.items():
        a = peft.get(f"unet.{diff}.lora_A.weight")
        if a is None:
            continue
        b = peft[f"unet.{diff}.lora_B.weight"]
        key = f"diffusion_model.{ldm}.weight"
        want = base[key] + (b.float().flatten(1) @ a.float().flatten(1)).reshape(base[key].shape)
        assert _close(got[key], want), key
        n += 1
    assert n == 63
    core = lazy(model, peft)
    core_n = len(core.patches)
    assert 0 < core_n < 63, "core should load the PEFT file only partially"
    assert f"ComfyUI's LoraLoader would skip {63 - core_n} " in report
    # and the fused PEFT model equals the same deltas in ComfyUI-native keys, lazily patched
    assert _close(run(fused), run(lazy(model, _load(loras_dir / "tiny_sd15_comfy.safetensors"))))
    assert not _close(run(core), run(fused), 1e-4)


def test_strength_is_linear_and_merges_add(lora_merge, sd15, loras_dir):
    model = sd15[0]
    w0 = unet_weights(model)
    half = unet_weights(merge(lora_merge, model, "tiny_sd15_kohya.safetensors", 0.5)[0])
    full = unet_weights(merge(lora_merge, model, "tiny_sd15_kohya.safetensors", 1.0)[0])
    changed = [k for k in w0 if not torch.equal(w0[k], full[k])]
    assert len(changed) == 63
    for k in changed:
        d = full[k] - w0[k]
        assert _close(half[k] - w0[k], 0.5 * d, 1e-5)
    # two merges in a row == both LoRAs lazily applied
    a = merge(lora_merge, model, "tiny_sd15_kohya.safetensors", 1.0)[0]
    ab, _, _ = merge(lora_merge, a, "tiny_lcm_lora_sd15.safetensors", 0.5)
    ref = lazy(lazy(model, _load(loras_dir / "tiny_sd15_kohya.safetensors"), 1.0),
               _load(loras_dir / "tiny_lcm_lora_sd15.safetensors"), 0.5)
    assert _close(run(ab), run(ref))
    loras = ab.model_options[lora_merge.MERGE_INFO_KEY]["loras"]
    assert [l["name"] for l in loras] == ["tiny_sd15_kohya.safetensors", "tiny_lcm_lora_sd15.safetensors"]


def test_merge_into_lazily_patched_model_fuses_its_patches(lora_merge, sd15, loras_dir):
    """A model already carrying lazy patches (e.g. core LoraLoader) keeps them, now fused."""
    model = sd15[0]
    pre = lazy(model, _load(loras_dir / "tiny_sd15_comfy.safetensors"), 0.3)
    run(pre)  # leaves the shared module patched in place: the merge must read the originals
    fused = merge(lora_merge, pre, "tiny_sd15_kohya.safetensors", 0.7)[0]
    ref = lazy(pre, _load(loras_dir / "tiny_sd15_kohya.safetensors"), 0.7)
    assert _close(run(fused), run(ref))


def test_lcm_sampling_auto_and_override(lora_merge, sd15, loras_dir):
    model = sd15[0]
    auto = merge(lora_merge, model, "tiny_lcm_lora_sd15.safetensors", sampling="auto")
    assert "LCM: yes" in auto[2]
    ms = auto[0].get_model_object("model_sampling")
    assert type(ms).__mro__[1].__name__ == "ModelSamplingDiscreteDistilled"
    none = merge(lora_merge, model, "tiny_lcm_lora_sd15.safetensors", sampling="none")[0]
    assert type(none.get_model_object("model_sampling")) is type(model.get_model_object("model_sampling"))
    k = merge(lora_merge, model, "tiny_sd15_kohya.safetensors", sampling="auto")[0]
    assert type(k.get_model_object("model_sampling")) is type(model.get_model_object("model_sampling"))
    forced = merge(lora_merge, model, "tiny_sd15_kohya.safetensors", sampling="lcm")[0]
    assert type(forced.get_model_object("model_sampling")).__mro__[1].__name__ == "ModelSamplingDiscreteDistilled"


def test_clip_part_is_fused_into_a_new_clip(lora_merge, sd15, loras_dir, comfy):
    import comfy.sd

    model, clip, _ = sd15
    ksd = _load(loras_dir / "tiny_sd15_kohya.safetensors")
    g = torch.Generator().manual_seed(5)
    for i in range(2):
        for m, dim in (("self_attn_q_proj", 768), ("mlp_fc1", 768)):
            out = 3072 if m == "mlp_fc1" else 768
            ksd[f"lora_te_text_model_encoder_layers_{i}_{m}.lora_down.weight"] = torch.randn((4, dim), generator=g) * 0.05
            ksd[f"lora_te_text_model_encoder_layers_{i}_{m}.lora_up.weight"] = torch.randn((out, 4), generator=g) * 0.05
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ksd.items()}, str(loras_dir / "tiny_te.safetensors"))
    tokens = clip.tokenize("a photo of a cat")
    before = clip.encode_from_tokens(tokens)
    fm, fc, report = merge(lora_merge, model, "tiny_te.safetensors", 1.0, clip=clip, strength_clip=0.7)
    assert "clip: 4/4" in report and "unet: 63/63" in report
    _, ref_clip = comfy.sd.load_lora_for_models(model, clip, ksd, 1.0, 0.7)
    got, want = fc.encode_from_tokens(tokens), ref_clip.encode_from_tokens(tokens)
    assert fc.cond_stage_model is not clip.cond_stage_model
    assert not _close(got, before, 1e-4)
    assert _close(got, want, 1e-4)
    assert _close(clip.encode_from_tokens(tokens), before, 0)


# --------------------------------------------------------------------------------------------
# refusing what does not fit
# --------------------------------------------------------------------------------------------
def _save_lora(loras_dir, name, sd):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(loras_dir / name))
    return name


def test_sdxl_lora_on_sd15_is_a_clear_error(lora_merge, sd15, sdxl, loras_dir):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in sdxl.model.diffusion_model.state_dict().items():
        if k.endswith(".weight") and (".attn1.to_" in k or ".attn2.to_" in k) and v.ndim == 2:
            base = "lora_unet_" + k[: -len(".weight")].replace(".", "_")
            sd[base + ".lora_down.weight"] = torch.randn((4, v.shape[1]), generator=g)
            sd[base + ".lora_up.weight"] = torch.randn((v.shape[0], 4), generator=g)
    name = _save_lora(loras_dir, "tiny_sdxl_lora.safetensors", sd)
    with pytest.raises(ValueError) as e:
        merge(lora_merge, sd15[0], name)
    msg = str(e.value)
    assert "SDXL" in msg and "SD1.x" in msg
    assert "Expected module names like: lora_unet_" in msg


def test_partial_match_warns_and_no_match_errors(lora_merge, sd15, loras_dir):
    sd = _load(loras_dir / "tiny_sd15_kohya.safetensors")
    sd["lora_unet_not_a_block_0.lora_down.weight"] = torch.zeros((8, 320))
    sd["lora_unet_not_a_block_0.lora_up.weight"] = torch.zeros((320, 8))
    _, _, report = merge(lora_merge, sd15[0], _save_lora(loras_dir, "tiny_partial.safetensors", sd))
    assert "WARNING: partial match: 1 " in report and "lora_unet_not_a_block_0" in report
    bogus = {"lora_unet_nothing_here.lora_down.weight": torch.zeros((8, 320)),
             "lora_unet_nothing_here.lora_up.weight": torch.zeros((320, 8))}
    with pytest.raises(ValueError, match="No key of this LoRA matches"):
        merge(lora_merge, sd15[0], _save_lora(loras_dir, "tiny_nomatch.safetensors", bogus))


def test_shape_mismatch_names_key_and_shapes(lora_merge, sd15, loras_dir):
    sd = _load(loras_dir / "tiny_sd15_kohya.safetensors")
    k = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight"
    sd[k] = torch.zeros((640, 8))
    with pytest.raises(ValueError) as e:
        merge(lora_merge, sd15[0], _save_lora(loras_dir, "tiny_badshape.safetensors", sd))
    msg = str(e.value)
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in msg
    assert "(320, 320)" in msg and "(640, 8)" in msg


# --------------------------------------------------------------------------------------------
# save turbo checkpoint
# --------------------------------------------------------------------------------------------
def test_save_reload_same_output_and_metadata(lora_merge, turbo_ckpt, sd15, loras_dir, comfy):
    import comfy.sd
    import folder_paths

    model, clip, vae = sd15
    fused = merge(lora_merge, model, "tiny_lcm_lora_sd15.safetensors", 0.9, sampling="none")[0]
    rep = turbo_ckpt.ADDSaveTurboCheckpoint.execute(fused, clip, vae, "lora_test/turbo_a", True, 4, 1.0,
                                             "v1-5-pruned-emaonly.safetensors")[0]
    path = os.path.join(folder_paths.get_output_directory(), "lora_test", "turbo_a.safetensors")
    assert rep.startswith(f"saved {path}")
    md = safe_open(path, "pt").metadata()
    assert md["modelspec.architecture"] == "stable-diffusion-v1"
    assert md["modelspec.predict_key"] == "epsilon"
    assert "tiny_lcm_lora_sd15.safetensors @ 0.9" in md["modelspec.merged_from"]
    assert md["add.base_model"] == "v1-5-pruned-emaonly.safetensors"
    assert md["add.recommended_cfg"] == "1" and md["add.recommended_steps"] == "4"
    assert md["add.recommended_timesteps"] == "[999, 759, 499, 259]"
    assert md["add.sampling"] == "lcm"
    reloaded = comfy.sd.load_checkpoint_guess_config(path)[0]
    assert _close(run(reloaded), run(fused), 1e-5)
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".partial")]


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_saved_timesteps_are_what_add_scheduler_samples(turbo_ckpt, plugin, sd15, comfy, steps):
    """The turbo checkpoint recommends the ADD Scheduler's own timesteps (core.schedules), e.g.
    999, 666, 332 for 3 steps (a re-derived int(999 - i * 1000 / 3) gave 999, 665, 332)."""
    import folder_paths

    model, clip, vae = sd15
    turbo_ckpt.ADDSaveTurboCheckpoint.execute(model, clip, vae, f"lora_steps/turbo_{steps}", True, steps, 1.0, "")
    path = os.path.join(folder_paths.get_output_directory(), "lora_steps", f"turbo_{steps}.safetensors")
    md = safe_open(path, "pt").metadata()
    assert md["add.sampling"] == "eps" and md["add.recommended_steps"] == str(steps)
    sigmas = plugin("nodes.sampling").ADDScheduler.execute(model, steps, "add_trailing", "", 1.0)[0]
    sampled = [int(round(float(t))) for t in model.get_model_object("model_sampling").timestep(sigmas[:-1])]
    assert json.loads(md["add.recommended_timesteps"]) == sampled
    if steps == 3:
        assert sampled == [999, 666, 332]


def _state(path):
    """(content, inode, mtime) of a file: any rewrite or replacement changes one of them."""
    st = os.stat(path)
    with open(path, "rb") as f:
        return f.read(), st.st_ino, st.st_mtime_ns


def test_save_numbers_files_and_never_overwrites(turbo_ckpt, sd15, comfy):
    """Queued twice (the default): _00001_ then _00002_, nothing replaced, a same-name file left alone."""
    import folder_paths

    model, clip, vae = sd15
    folder = os.path.join(folder_paths.get_output_directory(), "lora_numbered")
    os.makedirs(folder, exist_ok=True)
    user_file = os.path.join(folder, "turbo.safetensors")
    with open(user_file, "wb") as f:
        f.write(b"the user's own file")
    node = turbo_ckpt.ADDSaveTurboCheckpoint
    first = node.execute(model, clip, vae, "lora_numbered/turbo", False, 4, 1.0, "")[0]
    p1 = os.path.join(folder, "turbo_00001_.safetensors")
    assert first.startswith(f"saved {p1}\n")
    before = _state(p1)
    second = node.execute(model, clip, vae, "lora_numbered/turbo.safetensors", False, 4, 1.0, "")[0]
    p2 = os.path.join(folder, "turbo_00002_.safetensors")
    assert second.startswith(f"saved {p2}\n")
    assert _state(p1) == before and open(user_file, "rb").read() == b"the user's own file"
    assert sorted(os.listdir(folder)) == ["turbo.safetensors", "turbo_00001_.safetensors", "turbo_00002_.safetensors"]
    assert safe_open(p2, "pt").metadata()["modelspec.title"] == "turbo"


def test_save_takes_the_next_number_when_one_is_taken_meanwhile(turbo_ckpt, sd15, monkeypatch, comfy):
    """ComfyUI's counter is read before the weights are gathered; a file that appears under that
    number meanwhile (another save) is skipped, not replaced."""
    import folder_paths

    model, clip, vae = sd15
    folder = os.path.join(folder_paths.get_output_directory(), "lora_race")
    real = folder_paths.get_save_image_path

    def stale_counter(prefix, out_dir, *a):
        got = real(prefix, out_dir, *a)
        with open(os.path.join(got[0], f"{got[1]}_{got[2]:05}_.safetensors"), "wb") as f:
            f.write(b"written by another save")
        return got
    monkeypatch.setattr(turbo_ckpt.saving.folder_paths, "get_save_image_path", stale_counter)
    rep = turbo_ckpt.ADDSaveTurboCheckpoint.execute(model, clip, vae, "lora_race/m", False, 4, 1.0, "")[0]
    assert rep.startswith(f"saved {os.path.join(folder, 'm_00002_.safetensors')}\n")
    assert open(os.path.join(folder, "m_00001_.safetensors"), "rb").read() == b"written by another save"


def test_exact_name_overwrite_replaces_atomically(turbo_ckpt, sd15, monkeypatch, comfy):
    import comfy.sd
    import folder_paths

    model, clip, vae = sd15
    folder = os.path.join(folder_paths.get_output_directory(), "lora_atomic")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "keep.safetensors")
    with open(path, "wb") as f:
        f.write(b"old file")
    node = turbo_ckpt.ADDSaveTurboCheckpoint
    real_writer = turbo_ckpt.files.write_safetensors_to

    def broken_writer(f, tensors, metadata=None):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(turbo_ckpt.files, "write_safetensors_to", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        node.execute(model, clip, vae, "lora_atomic/keep", True, 4, 1.0, "")
    with pytest.raises(OSError, match="disk full"):
        node.execute(model, clip, vae, "lora_atomic/new_one", False, 4, 1.0, "")
    assert open(path, "rb").read() == b"old file"
    assert sorted(os.listdir(folder)) == ["keep.safetensors"]  # no temporary, no numbered half file
    monkeypatch.setattr(turbo_ckpt.files, "write_safetensors_to", real_writer)
    rep = node.execute(model, clip, vae, "lora_atomic/keep", True, 4, 1.0, "")[0]
    assert rep.startswith(f"saved {path}\n") and sorted(os.listdir(folder)) == ["keep.safetensors"]
    assert comfy.sd.load_checkpoint_guess_config(path)[0] is not None  # the old bytes are gone, a checkpoint is there


@pytest.mark.parametrize("bad", ["../escape", "/tmp/abs", "a/../../b", "bad|name", "", "sub/./x", "c:evil", "a\\b"])
@pytest.mark.parametrize("exact", [False, True])
def test_save_rejects_path_escapes(turbo_ckpt, sd15, bad, exact):
    model, clip, vae = sd15
    with pytest.raises(ValueError, match="filename_prefix .*file name"):
        turbo_ckpt.ADDSaveTurboCheckpoint.execute(model, clip, vae, bad, exact, 4, 1.0, "")


def test_save_refuses_a_symlinked_folder_leading_out(turbo_ckpt, sd15, tmp_path, comfy):
    import folder_paths

    model, clip, vae = sd15
    os.makedirs(folder_paths.get_output_directory(), exist_ok=True)  # a fresh home has none yet
    link = os.path.join(folder_paths.get_output_directory(), "lora_link_out")
    if not os.path.islink(link):
        os.symlink(tmp_path, link)
    with pytest.raises(ValueError, match="resolves outside"):
        turbo_ckpt.ADDSaveTurboCheckpoint.execute(model, clip, vae, "lora_link_out/x", False, 4, 1.0, "")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# extract
# --------------------------------------------------------------------------------------------
def test_extract_then_merge_approximates_turbo(lora_merge, lora_extract, sd15, loras_dir):
    import comfy.sd
    import folder_paths

    model = sd15[0]
    turbo = merge(lora_merge, model, "tiny_lcm_lora_sd15.safetensors", 1.0)[0]
    # the delta has rank 64: at rank 64 only fp16 storage error remains
    assert lora_extract.extract_lora_sd(turbo, model, 64)[2] < 5e-3
    name = "extracted_r8"
    report = lora_extract.ADDExtractLoRA.execute(turbo, model, 8, name, True)[0]
    overall = float(report.split("relative error overall: ")[1].split()[0])
    assert overall > 0.1 and "worst: diffusion_model." in report
    path = os.path.join(folder_paths.get_folder_paths("loras")[0], name + ".safetensors")
    back, _, mrep = merge(lora_merge, model, name + ".safetensors", 1.0)
    assert "unet: 63/63" in mrep and "WARNING" not in mrep
    w0, wt, wb = unet_weights(model), unet_weights(turbo), unet_weights(back)
    num = sum(float((wb[k] - wt[k]).norm()) ** 2 for k in w0)
    den = sum(float((wt[k] - w0[k]).norm()) ** 2 for k in w0)
    measured = (num / den) ** 0.5
    # the merged-back model is as far from the turbo model as the node says
    assert abs(measured - overall) <= 0.02 * overall + 2e-3, (measured, overall)
    # the core loader reads the same file, and the result is closer to turbo than the base is
    core = comfy.sd.load_lora_for_models(model, None, _load(path), 1.0, 0.0)[0]
    assert len(core.patches) == 63
    out_b = run(back)
    assert _close(run(core), out_b, 1e-4)
    out_t = run(turbo)
    assert float((out_b - out_t).norm()) < float((run(model) - out_t).norm())
    before = _state(path)
    again = lora_extract.ADDExtractLoRA.execute(turbo, model, 8, name, False)[0]  # the default: numbered
    numbered = os.path.join(os.path.dirname(path), name + "_00001_.safetensors")
    assert again.startswith(f"saved {numbered}\n") and _state(path) == before
    assert _load(numbered).keys() == _load(path).keys()


class _KeysOnly:
    """Just enough of a ModelPatcher for the architecture check: key -> (weight,) patches."""

    def __init__(self, shapes):
        self.kp = {k: [(torch.zeros(s), None)] for k, s in shapes.items()}

    def get_key_patches(self, prefix=""):
        return {k: v for k, v in self.kp.items() if k.startswith(prefix)}


def test_extract_checks_the_architecture_both_ways(lora_extract):
    base = {"diffusion_model.a.weight": (4, 4), "diffusion_model.b.weight": (4, 4)}
    with pytest.raises(ValueError, match="base_model has 1 weights the turbo model lacks"):
        lora_extract.check_same_architecture(_KeysOnly({"diffusion_model.a.weight": (4, 4)}), _KeysOnly(base))
    with pytest.raises(ValueError, match="turbo_model has 1 weights the base lacks"):
        lora_extract.check_same_architecture(_KeysOnly({**base, "diffusion_model.c.weight": (2,)}), _KeysOnly(base))
    with pytest.raises(ValueError, match=r"diffusion_model.b.weight: turbo_model \(4, 2\) vs base_model \(4, 4\)"):
        lora_extract.check_same_architecture(_KeysOnly({**base, "diffusion_model.b.weight": (4, 2)}), _KeysOnly(base))
    lora_extract.check_same_architecture(_KeysOnly(base), _KeysOnly(base))


def test_extract_checks_the_name_before_any_work(lora_extract, sd15, monkeypatch, comfy):
    model = sd15[0]
    monkeypatch.setattr(lora_extract, "extract_lora_sd", lambda *a, **k: pytest.fail("the SVD ran before the name check"))
    with pytest.raises(ValueError, match="filename_prefix 'sub/../x'"):
        lora_extract.ADDExtractLoRA.execute(model, model, 4, "sub/../x", False)

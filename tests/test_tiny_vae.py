"""TinyVAE: our loader/decode/encode against ComfyUI's own TAESD path, layouts, chunking, errors."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from comfyui_add.core import taesd as pure


# --------------------------------------------------------------------------------------------
# core/ alone (no ComfyUI)
# --------------------------------------------------------------------------------------------
def test_shape_table_counts_the_real_decoder_params():
    n = sum(torch.Size(s).numel() for s in pure.expected_shapes("decoder", 4).values())
    assert n == 1222531  # madebyollin's taesd_decoder


def test_diffusers_layout_converts_to_madebyollin_halves(tiny):
    dec = load_file(tiny["taesd_decoder"])
    enc = load_file(tiny["taesd_encoder"])
    w = pure.split_state_dict(load_file(tiny["taesd_diffusers"]), "diffusers file")
    assert w.layout == "diffusers" and w.latent_channels == 4
    assert w.decoder.keys() == dec.keys() and w.encoder.keys() == enc.keys()
    assert all(torch.equal(w.decoder[k], dec[k]) for k in dec)
    assert all(torch.equal(w.encoder[k], enc[k]) for k in enc)


def test_prefixed_layout_and_stored_scale_pick_the_variant(tiny):
    dec = load_file(tiny["taesd_decoder"])
    sd = {"first_stage_model.taesd_decoder." + k: v for k, v in dec.items()}
    sd.update(vae_scale=torch.tensor(0.13025), vae_shift=torch.tensor(0.0))
    w = pure.split_state_dict(sd, "ckpt")
    assert w.layout == "comfy-prefixed" and w.encoder is None
    assert pure.resolve_variant("some_vae.safetensors", w.latent_channels, "auto", w.scale_shift).name == "taesdxl"


@pytest.mark.parametrize("name,channels,override,expected", [
    ("taesd_decoder.safetensors", 4, "auto", "taesd"),
    ("taesdxl_decoder.pth", 4, "auto", "taesdxl"),
    ("vae_approx/taesd3_decoder.safetensors", 16, "auto", "taesd3"),
    ("taef1_decoder.safetensors", 16, "auto", "taef1"),
    ("taesd_decoder.safetensors", 4, "taesdxl", "taesdxl"),
    ("my_tae.safetensors", 16, "taef1", "taef1"),
])
def test_variant_resolution(name, channels, override, expected):
    assert pure.resolve_variant(name, channels, override).name == expected


@pytest.mark.parametrize("name,channels,override,match", [
    ("my_tae.safetensors", 16, "auto", "set the variant widget"),  # 16 ch, name says neither
    ("taesd_decoder.safetensors", 4, "taef1", "needs 16"),  # override contradicts the weights
    ("odd.safetensors", 8, "auto", "8 latent channels"),
])
def test_variant_resolution_errors(name, channels, override, match):
    with pytest.raises(pure.TAESDError, match=match):
        pure.resolve_variant(name, channels, override)


def test_pairing_lists_decoders_and_single_files_only():
    names = ["taesd_decoder.safetensors", "taesd_encoder.safetensors", "taesdxl_decoder.pth",
             "taesd3_encoder.safetensors", "sub/taef1_decoder.pth", "sub/taef1_encoder.pth",
             "diffusers/taesd_autoencoder_tiny.safetensors", "taehv.safetensors"]
    got = pure.pair_files(names, skip_prefixes=("taehv",))
    assert got == {"taesd_decoder.safetensors": "taesd_encoder.safetensors", "taesdxl_decoder.pth": None,
                   "sub/taef1_decoder.pth": "sub/taef1_encoder.pth",
                   "diffusers/taesd_autoencoder_tiny.safetensors": None}


# --------------------------------------------------------------------------------------------
# node layer, in a real ComfyUI
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def approx(comfy, tiny, tmp_path_factory):
    """A vae_approx folder registered with folder_paths: the tiny TAESDs plus broken files."""
    import folder_paths

    d = tmp_path_factory.mktemp("vae_approx")
    for key in ("taesd_encoder", "taesd_decoder", "taesd3_encoder", "taesd3_decoder"):
        shutil.copy(tiny[key], d / f"{key}.safetensors")
    (d / "diffusers").mkdir()
    shutil.copy(tiny["taesd_diffusers"], d / "diffusers" / "taesd_autoencoder_tiny.safetensors")
    shutil.copy(tiny["taesd_decoder"], d / "solo_decoder.safetensors")  # no encoder sibling
    shutil.copy(tiny["taesd_decoder"], d / "taesdxl_decoder.safetensors")  # named for SDXL
    shutil.copy(tiny["tiny_sd15_kohya"], d / "lora_decoder.safetensors")  # a LoRA, not a TAESD
    (d / "empty_decoder.safetensors").write_bytes(b"")
    (d / "corrupt_decoder.safetensors").write_bytes(tiny["taesd_decoder"].read_bytes()[:5000])
    folder_paths.add_model_folder_path("vae_approx", str(d), is_default=True)
    folder_paths.filename_list_cache.pop("vae_approx", None)
    yield d
    folder_paths.folder_names_and_paths["vae_approx"][0].remove(str(d))
    folder_paths.filename_list_cache.pop("vae_approx", None)


@pytest.fixture(scope="module")
def tv(plugin):
    return plugin("nodes.tiny_vae")


@pytest.fixture(scope="module")
def err(plugin):
    return plugin("core.taesd").TAESDError


def _latent(n=2, c=4, seed=0):
    return torch.randn(n, c, 8, 8, generator=torch.Generator().manual_seed(seed))


def _image(n=2, seed=1):
    return torch.rand(n, 64, 64, 3, generator=torch.Generator().manual_seed(seed))


def test_loader_lists_decoders_not_encoders(approx, tv):
    names = tv.ADDTinyVAELoader.INPUT_TYPES()["required"]["tae_name"][1]["options"]
    assert "taesd_decoder.safetensors" in names and "taesd_encoder.safetensors" not in names
    assert "diffusers/taesd_autoencoder_tiny.safetensors" in names


def test_decode_and_encode_match_comfyui_taesd(comfy, approx, tv):
    import comfy.sd as comfy_sd

    ref = comfy_sd.VAE(sd=comfy.VAELoader.load_taesd("taesd"))
    (ours,) = tv.ADDTinyVAELoader.execute("taesd_decoder.safetensors", "auto")
    z = _latent()
    want = ref.decode(z)
    (got,) = tv.ADDTinyVAEDecode.execute({"samples": z}, ours, 8, "fp32")
    assert got.shape == (2, 64, 64, 3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    (core_path,) = comfy.VAEDecode().decode(ours, {"samples": z})  # core node accepts our VAE
    torch.testing.assert_close(core_path, want, atol=1e-5, rtol=0)

    img = _image()
    (lat,) = tv.ADDTinyVAEEncode.execute(img, ours, 8, "fp32")
    torch.testing.assert_close(lat["samples"], ref.encode(img), atol=1e-5, rtol=0)


def test_both_layouts_give_identical_output(approx, tv):
    (a,) = tv.ADDTinyVAELoader.execute("taesd_decoder.safetensors", "auto")
    (b,) = tv.ADDTinyVAELoader.execute("diffusers/taesd_autoencoder_tiny.safetensors", "auto")
    z, img = _latent(), _image()
    assert torch.equal(tv.tiny_decode(a, z), tv.tiny_decode(b, z))
    assert torch.equal(tv.tiny_encode(a, img), tv.tiny_encode(b, img))


def test_chunked_equals_one_shot(approx, tv):
    (vae,) = tv.ADDTinyVAELoader.execute("taesd_decoder.safetensors", "auto")
    z = _latent(5)
    torch.testing.assert_close(tv.tiny_decode(vae, z, chunk=2), tv.tiny_decode(vae, z, chunk=5), atol=1e-5, rtol=1e-5)
    img = _image(5)
    torch.testing.assert_close(tv.tiny_encode(vae, img, chunk=2), tv.tiny_encode(vae, img, chunk=5), atol=1e-5, rtol=1e-5)


def test_a_dtype_outside_the_list_is_an_error_naming_the_input(approx, tv):
    """0.3.75 does not check a comfy_api combo's value before the node runs: the node does."""
    (vae,) = tv.ADDTinyVAELoader.execute("taesd_decoder.safetensors", "auto")
    with pytest.raises(ValueError, match="dtype 'fp64' is not one of auto, fp32, fp16, bf16"):
        tv.ADDTinyVAEDecode.execute({"samples": torch.zeros(1, 4, 8, 8)}, vae, 4, "fp64")


def test_dtype_option_runs_on_a_private_copy(approx, tv):
    """A dtype other than the VAE's decodes in a converted copy kept on the VAE (the decoder itself
    runs in that dtype), and the shared TAESD keeps its weights."""
    (vae,) = tv.ADDTinyVAELoader.execute("taesd_decoder.safetensors", "auto")
    shared = vae.first_stage_model
    assert vae.vae_dtype != torch.bfloat16
    z = _latent()
    full = tv.tiny_decode(vae, z, dtype="fp32")
    half = tv.tiny_decode(vae, z, dtype="bf16")
    copies = [m for (_, dt, _), m in vae._add_tiny_runners.items() if dt == torch.bfloat16]
    assert len(copies) == 1 and copies[0] is not shared
    assert {p.dtype for p in copies[0].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in shared.parameters()} == {vae.vae_dtype}  # shared VAE untouched

    seen = []
    hook = copies[0].taesd_decoder.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    try:
        again = tv.tiny_decode(vae, z, dtype="bf16")
    finally:
        hook.remove()
    assert seen == [(torch.bfloat16, torch.bfloat16)]  # the decode ran in bf16, in the cached copy
    assert torch.equal(again, half) and half.dtype == torch.float32  # IMAGE is fp32 whatever the compute dtype
    diff = (half - full).abs()
    assert 0 < diff.max() < 0.05 and diff.mean() < 2e-3  # bf16 rounding: not the fp32 result, yet the same image


def test_decoder_only_file_decodes_and_refuses_to_encode(comfy, approx, tv, err):
    (solo,) = tv.ADDTinyVAELoader.execute("solo_decoder.safetensors", "auto")
    (pair,) = tv.ADDTinyVAELoader.execute("taesd_decoder.safetensors", "auto")
    z = _latent()
    assert torch.equal(tv.tiny_decode(solo, z), tv.tiny_decode(pair, z))
    with pytest.raises(err, match="decoder-only"):
        tv.ADDTinyVAEEncode.execute(_image(), solo, 8, "auto")
    with pytest.raises(err, match="solo_encoder"):
        comfy.VAEEncode().encode(solo, _image())  # the core node gets the same clear error


@pytest.mark.parametrize("name,match", [
    ("empty_decoder.safetensors", "is 0 bytes"),
    ("corrupt_decoder.safetensors", r"is cut short: the header promises at least \d+ bytes, the file has 5000"),
    ("lora_decoder.safetensors", "not a TAESD file"),
])
def test_bad_files_are_clear_errors(approx, tv, err, name, match):
    with pytest.raises((err, tv.files.ADDError), match=match) as e:
        tv.ADDTinyVAELoader.execute(name, "auto")
    assert name in str(e.value)


def test_channel_mismatch_latent_vs_decoder(approx, tv, err):
    (sd3,) = tv.ADDTinyVAELoader.execute("taesd3_decoder.safetensors", "auto")
    assert sd3.tiny_variant == "taesd3" and sd3.first_stage_model.vae_scale.item() == pytest.approx(1.5305)
    assert tv.tiny_decode(sd3, _latent(c=16)).shape == (2, 64, 64, 3)
    with pytest.raises(err, match=r"4 channels but taesd3 decodes 16.*taesd_decoder\.safetensors"):
        tv.tiny_decode(sd3, _latent(c=4))


def test_variant_override_changes_scale_and_shift(approx, tv, err):
    (f1,) = tv.ADDTinyVAELoader.execute("taesd3_decoder.safetensors", "taef1")
    assert f1.tiny_variant == "taef1"
    assert f1.first_stage_model.vae_shift.item() == pytest.approx(0.1159)
    with pytest.raises(err, match="needs 4"):
        tv.ADDTinyVAELoader.execute("taesd3_decoder.safetensors", "taesd")


def test_wrong_variant_for_the_model(approx, tv, err, sd15, sdxl):
    sd15_model = sd15[0]
    (taesd,) = tv.ADDTinyVAELoader.execute("taesd_decoder.safetensors", "auto")
    (xl,) = tv.ADDTinyVAELoader.execute("taesdxl_decoder.safetensors", "auto")
    (sd3,) = tv.ADDTinyVAELoader.execute("taesd3_decoder.safetensors", "auto")
    z = {"samples": _latent()}
    tv.ADDTinyVAEDecode.execute(z, taesd, 8, "auto", model=sd15_model)  # fits: no error
    tv.ADDTinyVAEDecode.execute(z, xl, 8, "auto", model=sdxl)
    with pytest.raises(err, match=r"taesd .*SDXL.*taesdxl_decoder\.safetensors"):
        tv.ADDTinyVAEDecode.execute(z, taesd, 8, "auto", model=sdxl)
    with pytest.raises(err, match=r"taesdxl .*SD15.*taesd_decoder\.safetensors"):
        tv.ADDTinyVAEEncode.execute(_image(), xl, 8, "auto", model=sd15_model)
    with pytest.raises(err, match=r"16-channel.*SD15.*4-channel.*taesd_decoder\.safetensors"):
        tv.ADDTinyVAEDecode.execute({"samples": _latent(c=16)}, sd3, 8, "auto", model=sd15_model)


def test_decode_node_rejects_a_full_vae(tv, err, sd15):
    class NotTAESD:
        first_stage_model = torch.nn.Identity()

    with pytest.raises(err, match="needs a TAESD"):
        tv.tiny_decode(NotTAESD(), _latent())
    # a TAESD VAE from elsewhere (the checkpoint's own) is accepted and its variant read from its scale
    assert tv.tiny_decode(sd15[2], _latent()).shape == (2, 64, 64, 3)

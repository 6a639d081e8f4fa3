"""The base everything else stands on: a real ComfyUI loads the plugin and the tiny models."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch



def test_tiny_sd15_is_detected_as_sd15_by_comfyui(sd15):
    import comfy.supported_models
    from comfy.taesd.taesd import TAESD

    model, clip, vae = sd15
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert isinstance(vae.first_stage_model, TAESD)
    assert clip is not None


def test_tiny_sd15_encodes_and_samples(host_nodes, sd15):
    model, clip, vae = sd15
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
    assert cond[0][0].shape == (1, 77, 768)
    (out,) = host_nodes.common_ksampler(model, 0, 1, 1.0, "euler", "simple", cond, cond, {"samples": torch.zeros(1, 4, 8, 8)})
    img = vae.decode(out["samples"])
    assert img.shape == (1, 64, 64, 3)
    assert torch.isfinite(img).all() and img.std() > 0


@pytest.mark.parametrize("family", ["sdxl", "sd2v"])
def test_in_memory_families(request, family):
    import comfy.model_base

    mp = request.getfixturevalue(family)
    ms = mp.get_model_object("model_sampling")
    expected = comfy.model_base.ModelType.V_PREDICTION if family == "sd2v" else comfy.model_base.ModelType.EPS
    assert mp.model.model_type == expected
    assert float(ms.sigma_max) > 14


def test_taesd_layouts_hold_the_same_weights(tiny):
    from safetensors.torch import load_file

    dec = load_file(tiny["taesd_decoder"])
    enc = load_file(tiny["taesd_encoder"])
    diff = load_file(tiny["taesd_diffusers"])
    assert dec["1.weight"].shape == (64, 4, 3, 3)
    assert sum(v.numel() for v in dec.values()) == 1222531
    assert len(diff) == len(dec) + len(enc)
    assert torch.equal(diff["decoder.layers.0.weight"], dec["1.weight"])


def test_lora_files_in_every_format(tiny):
    from safetensors.torch import load_file

    prefixes = {
        "tiny_sd15_kohya": "lora_unet_input_blocks_",
        "tiny_sd15_comfy": "diffusion_model.",
        "tiny_sd15_peft": "unet.",
        "tiny_lcm_lora_sd15": "lora_unet_down_blocks_",
    }
    for name, prefix in prefixes.items():
        sd = load_file(tiny[name])
        assert any(k.startswith(prefix) for k in sd), name
    peft = load_file(tiny["tiny_sd15_peft"])
    assert any(k.endswith(".lora_A.weight") for k in peft)
    lcm = load_file(tiny["tiny_lcm_lora_sd15"])
    downs = [v for k, v in lcm.items() if k.endswith("lora_down.weight")]
    assert {d.shape[0] for d in downs} == {64}


@pytest.mark.server
def test_server_loads_plugin_and_lists_nodes_with_tooltips(comfy_server):
    log = comfy_server.log()
    # ComfyUI lists every custom node folder with its import time, "(IMPORT FAILED)" on failure.
    ours = [line for line in log.splitlines() if line.rstrip().endswith("custom_nodes/comfyui-add")]
    assert ours, log[-3000:]
    assert all("IMPORT FAILED" not in line for line in ours), ours
    # (core's audio nodes fail here for lack of torchaudio; that is ComfyUI's, not ours)
    assert not [line for line in log.splitlines() if "Cannot import" in line and "comfyui-add" in line]
    info = comfy_server.get("/object_info")
    from scripts.comfy_host import import_comfy, plugin_module

    import_comfy()
    expected = set(plugin_module("nodes").NODE_CLASSES)
    listed = {name for name, v in info.items() if "comfyui-add" in v.get("python_module", "")}
    assert expected <= listed, expected - listed
    for name in listed:
        for section in ("required", "optional"):
            for inp, spec in info[name]["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                assert opts.get("tooltip"), f"{name}.{inp} has no tooltip"


@pytest.mark.server
def test_server_runs_a_core_workflow_and_writes_a_png(comfy_server):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 1, "steps": 1, "cfg": 1.0,
              "sampler_name": "euler", "scheduler": "simple", "positive": ["2", 0], "negative": ["2", 0],
              "latent_image": ["3", 0], "denoise": 1.0}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "foundation"}},
    }
    hist = comfy_server.run(prompt)
    assert hist["status"]["status_str"] == "success", hist["status"]
    img = hist["outputs"]["6"]["images"][0]
    path = Path(comfy_server.home) / "output" / img["subfolder"] / img["filename"]
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""Bad inputs through a real ComfyUI server: every case gives an error that names the file or input
and says what to do; after each one a valid prompt still runs, and no stray or partial file is left.

One server for this module (its own base folder, so the broken files planted here stay here).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from server_harness import link_models, running_server

pytestmark = pytest.mark.server

CKPT = "tiny_sd15.safetensors"


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny):
    home = tmp_path_factory.mktemp("bad_inputs_home")
    link_models(home, tiny)
    _plant_files(home, tiny)
    with running_server(home) as server:
        yield server
    shutil.rmtree(home)  # its planted and written files: ~2 GB of disk


def _plant_files(home: Path, tiny) -> None:
    """Broken LoRAs, TAESDs and latents a user meets: empty, cut, random, pickles, NaN, odd shapes."""
    loras, approx, inp = home / "models" / "loras", home / "models" / "vae_approx", home / "input"
    inp.mkdir(parents=True, exist_ok=True)
    good = Path(tiny["tiny_sd15_kohya"]).read_bytes()
    (loras / "empty.safetensors").write_bytes(b"")
    (loras / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (loras / "random.safetensors").write_bytes(os.urandom(4096))
    torch.save({"w": torch.zeros(2)}, str(loras / "pickle_renamed.safetensors"))
    torch.save({"w": torch.zeros(2)}, str(loras / "old_style.pt"))
    sd = safetensors.torch.load(good)
    nan = dict(sd)
    k = next(k for k in nan if k.endswith("lora_up.weight"))
    nan[k] = nan[k].clone()
    nan[k][0, 0] = float("nan")
    safetensors.torch.save_file(nan, str(loras / "nan_weights.safetensors"))
    alpha = dict(sd)
    a = next(k for k in alpha if k.endswith(".alpha"))
    alpha[a] = torch.tensor(float("nan"))
    safetensors.torch.save_file(alpha, str(loras / "nan_alpha.safetensors"))
    ranks = dict(sd)
    d = next(k for k in ranks if k.endswith("lora_down.weight"))
    ranks[d] = torch.cat([ranks[d], ranks[d][:1]])  # one more row than its up matrix has columns
    safetensors.torch.save_file(ranks, str(loras / "mismatched_ranks.safetensors"))
    # an ordinary kohya-trained LoRA (trainer metadata) whose name merely contains "lcm"
    shutil.copy(tiny["tiny_sd15_kohya"], loras / "my_lcm_style.safetensors")
    (approx / "empty_decoder.safetensors").write_bytes(b"")
    (approx / "cut_decoder.safetensors").write_bytes(Path(tiny["taesd_decoder"]).read_bytes()[:3000])
    latents = {"batch0": torch.zeros(0, 4, 8, 8), "five_d": torch.zeros(1, 4, 2, 8, 8), "three_d": torch.zeros(8, 8, 8),
               "nan": torch.full((1, 4, 8, 8), float("nan"))}
    for name, t in latents.items():
        safetensors.torch.save_file({"latent_tensor": t}, str(inp / f"{name}.latent"))
    _plant_image_inputs(home)  # image folders, links, a node of another pack: see "Image inputs" below


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------
def _base() -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["1", 1]}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}


def valid_prompt() -> dict:
    """The prompt that must still run after every bad one: ADD KSampler -> TinyVAE decode -> preview."""
    p = _base()
    p["5"] = {"class_type": "ADDKSampler", "inputs": {"model": ["1", 0], "positive": ["3", 0], "latent_image": ["4", 0],
                                                      "seed": 1, "steps": 1, "schedule": "add_trailing", "custom": "999",
                                                      "denoise": 1.0}}
    p["6"] = {"class_type": "ADDTinyVAELoader", "inputs": {"tae_name": "taesd_decoder.safetensors", "variant": "auto"}}
    p["7"] = {"class_type": "ADDTinyVAEDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0], "batch_chunk": 8,
                                                           "dtype": "auto"}}
    p["8"] = {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}}
    return p


def merge(lora: str, strength=1.0, sampling="auto") -> dict:
    p = _base()
    p["2"] = {"class_type": "ADDLoraMerge", "inputs": {"model": ["1", 0], "lora_name": lora, "strength_model": strength,
                                                       "strength_clip": 1.0, "sampling": sampling}}
    return p


def ksampler(latent_file: str | None = None, **over) -> dict:
    p = _base()
    lat = ["4", 0]
    if latent_file:
        p["9"] = {"class_type": "LoadLatent", "inputs": {"latent": latent_file}}
        lat = ["9", 0]
    inputs = {"model": ["1", 0], "positive": ["3", 0], "latent_image": lat, "seed": 1, "steps": 1,
              "schedule": "add_trailing", "custom": "999", "denoise": 1.0}
    inputs.update(over)
    p["5"] = {"class_type": "ADDKSampler", "inputs": inputs}
    p["8"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "latents/bad_inputs"}}
    return p


def tiny_decode(latent_file: str) -> dict:
    return {"9": {"class_type": "LoadLatent", "inputs": {"latent": latent_file}},
            "6": {"class_type": "ADDTinyVAELoader", "inputs": {"tae_name": "taesd_decoder.safetensors", "variant": "auto"}},
            "7": {"class_type": "ADDTinyVAEDecode", "inputs": {"samples": ["9", 0], "vae": ["6", 0], "batch_chunk": 8,
                                                               "dtype": "auto"}},
            "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}}}


def tae_loader(name: str) -> dict:
    p = tiny_decode("batch0.latent")
    p["6"]["inputs"]["tae_name"] = name
    return p


def save_ckpt(prefix: str, exact=False, steps=1) -> dict:
    p = _base()
    p["2"] = {"class_type": "ADDSaveTurboCheckpoint", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                                 "filename_prefix": prefix, "exact_name_overwrite": exact,
                                                                 "steps": steps, "cfg": 1.0, "base_model_name": ""}}
    return p


def extract(prefix: str, rank=4, exact=False) -> dict:
    p = merge("tiny_sd15_kohya.safetensors")
    p["5"] = {"class_type": "ADDExtractLoRA", "inputs": {"turbo_model": ["2", 0], "base_model": ["1", 0], "rank": rank,
                                                         "filename_prefix": prefix, "exact_name_overwrite": exact}}
    return p


def train(**over) -> dict:
    inputs = dict(name="bad_inputs_run", prompts="a red fox", max_steps=1, batch_size=1, width=64, height=64,
                  student_timesteps="999", lora_rank=2, lora_alpha=2.0, lr_lora=1e-3, lr_disc=1e-3, distill_weight=2.5,
                  discriminator="teacher", data_cfg=3.0, data_steps=1, distill_cfg=1.0, save_every=0, preview_every=0,
                  training_seed=0, gradient_checkpointing=False, run_mode="polite", model=["1", 0], clip=["1", 1])
    inputs.update(over)
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
            "2": {"class_type": "ADDTrain", "inputs": inputs}}


def compare(**over) -> dict:
    p = _base()
    inputs = dict(model=["1", 0], clip=["1", 1], vae=["1", 2], lora_name="nothing_yet.safetensors", prompts="a fox",
                  seed=0, teacher_steps=1, teacher_cfg=1.0, teacher_sampler="euler", student_steps=1, width=64, height=64)
    inputs.update(over)
    p["2"] = {"class_type": "ADDCompare", "inputs": inputs}
    p["8"] = {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}
    return p


LONG = "n" * 300
# (case id, prompt, fragments the error must hold: the file or input, what is wrong, what to do)
CASES = [
    ("lora_empty", merge("empty.safetensors"), ["loras/empty.safetensors is 0 bytes", "Re-download"]),
    ("lora_truncated", merge("truncated.safetensors"), ["loras/truncated.safetensors is cut short: the header promises",
                                                        "the file has"]),
    ("lora_random", merge("random.safetensors"), ["loras/random.safetensors is not a safetensors file"]),
    ("lora_pickle_renamed", merge("pickle_renamed.safetensors"), ["loras/pickle_renamed.safetensors is a pickle",
                                                                  "Convert it to .safetensors"]),
    ("lora_pickle_pt", merge("old_style.pt"), ["loras/old_style.pt is a pickle", "Convert it to .safetensors"]),
    ("lora_nan_weights", merge("nan_weights.safetensors"), ["loras/nan_weights.safetensors holds NaN", "intact copy"]),
    ("lora_nan_alpha", merge("nan_alpha.safetensors"), ["loras/nan_alpha.safetensors holds NaN", ".alpha"]),
    ("lora_mismatched_ranks", merge("mismatched_ranks.safetensors"), ["loras/mismatched_ranks.safetensors is corrupt",
                                                                      "disagree on the rank"]),
    ("strength_nan", merge("tiny_sd15_kohya.safetensors", strength=math.nan), ["strength_model is nan",
                                                                               "type a number from -10 to 10"]),
    ("ksampler_batch0", ksampler("batch0.latent"), ["latent_image is empty", "batch_size"]),
    ("ksampler_5d", ksampler("five_d.latent"), ["latent_image has shape (1, 4, 2, 8, 8) (5-D)", "takes 4-D"]),
    ("ksampler_3d", ksampler("three_d.latent"), ["latent_image has shape (8, 8, 8) (3-D)", "takes 4-D"]),
    ("ksampler_nan_latent", ksampler("nan.latent", denoise=0.5), ["latent_image holds NaN", "Re-encode"]),
    ("custom_huge_list", ksampler(schedule="custom", custom=",".join(["999"] * 100000)),
     ["custom=", "has 100000 entries", "type a short list"]),
    ("custom_repeated", ksampler(schedule="custom", custom="999,999"), ["custom: timesteps", "strictly decreasing"]),
    ("custom_out_of_range", ksampler(schedule="custom", custom="1500,999"), ["outside the model's range 0-999"]),
    ("decode_batch0", tiny_decode("batch0.latent"), ["samples is empty", "batch_size"]),
    ("decode_nan", tiny_decode("nan.latent"), ["samples holds NaN", "queue again"]),
    ("decode_3d", tiny_decode("three_d.latent"), ["expected an image latent", "(8, 8, 8)"]),
    ("tae_empty", tae_loader("empty_decoder.safetensors"), ["vae_approx/empty_decoder.safetensors is 0 bytes"]),
    ("tae_cut", tae_loader("cut_decoder.safetensors"), ["vae_approx/cut_decoder.safetensors is cut short"]),
    ("save_dotdot", save_ckpt("../escape"), ["filename_prefix '../escape'", "'..'"]),
    ("save_absolute", save_ckpt("/tmp/abs_model"), ["filename_prefix '/tmp/abs_model' is an absolute path"]),
    ("save_drive", save_ckpt("C:model"), ["drive letter"]),
    ("save_nul", save_ckpt("a\0b"), ["NUL"]),
    ("save_too_long", save_ckpt(LONG), ["is too long", "the file system allows"]),
    ("save_exact_too_long", save_ckpt(LONG, exact=True), ["is too long", "the file system allows"]),
    ("extract_bad_name", extract("sub/../../x"), ["filename_prefix 'sub/../../x'", "'..'"]),
    ("train_name_dotdot", train(name="../x"), ["name '../x'", "path separator", "my_turbo_lora"]),
    ("train_name_absolute", train(name="/etc/x"), ["name '/etc/x' is an absolute path"]),
    ("train_name_nul", train(name="a\0b"), ["NUL"]),
    ("train_name_too_long", train(name=LONG), ["is too long"]),
    ("train_timesteps_repeated", train(student_timesteps="999,999"), ["student_timesteps '999,999' is not valid",
                                                                       "distinct"]),
    ("train_timesteps_range", train(student_timesteps="5000"), ["student_timesteps '5000' is not valid"]),
    ("train_width", train(width=100), ["width 100 must be a multiple of 8", "try 96"]),
    ("train_lr_nan", train(lr_lora=math.nan), ["lr_lora"]),
    ("train_data_cfg_nan", train(data_cfg=math.nan), ["data_cfg is nan", "type a number from 1 to 30"]),
    ("train_image_folder", train(image_folder="../../etc"), ["image_folder '../../etc'", "inside ComfyUI's input/"]),
    ("train_dinov2_escape", train(discriminator="dinov2", dinov2_file="../../x.safetensors", vae=["1", 2]),
     ["dinov2_file '../../x.safetensors'", "with no '..'"]),
    ("train_dinov2_truncated", train(discriminator="dinov2", dinov2_file="loras/truncated.safetensors", vae=["1", 2]),
     ["dinov2_file truncated.safetensors is cut short"]),
    ("compare_name", compare(lora_name="../../x"), ["lora_name '../../x'"]),
    ("compare_width", compare(width=100), ["width 100 must be a multiple of 8"]),
    ("compare_truncated", compare(lora_name="truncated.safetensors"), ["loras/truncated.safetensors is cut short"]),
]


def _error(hist: dict) -> dict:
    assert hist["status"]["status_str"] == "error", f"expected an error, got {hist['status']}"
    return next(m[1] for m in hist["status"]["messages"] if m[0] == "execution_error")


def _stray(home: Path) -> list[str]:
    """Temporary or partial files anywhere under the server's output and models folders."""
    out = []
    for top in ("output", "models"):
        for dirpath, _, names in os.walk(home / top):
            out += [os.path.join(dirpath, n) for n in names if n.endswith((".partial", ".tmp")) or n.startswith(".tmp")]
    return out


@pytest.mark.parametrize("case,prompt,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error_and_the_server_stays_usable(srv, case, prompt, fragments):
    err = _error(srv.run(prompt))
    msg = err["exception_message"]
    for frag in fragments:
        assert frag in msg, f"{case}: {frag!r} not in {msg!r}"
    assert len(msg) < 1500, f"{case}: a {len(msg)}-character message"
    assert "weights_only" not in msg
    assert str(srv.home) not in err["exception_type"] and "/" not in err["exception_type"], err["exception_type"]
    assert _stray(srv.home) == []
    ok = srv.run(valid_prompt())
    assert ok["status"]["status_str"] == "success", ok["status"]


def test_plugin_errors_show_a_short_type(srv):
    err = _error(srv.run(merge("empty.safetensors")))
    assert err["exception_type"] == "comfyui_add.ADDError"


def test_a_lora_named_lcm_keeps_the_model_sampling(srv):
    hist = srv.run(merge("my_lcm_style.safetensors"))
    assert hist["status"]["status_str"] == "success", hist["status"]
    report = hist["outputs"]["2"]["text"][0]
    assert "LCM: no" in report and "sampling: none" in report and "set sampling to 'lcm'" in report


def _state(path: Path) -> tuple:
    st = path.stat()
    return path.read_bytes(), st.st_ino, st.st_mtime_ns


def test_near_limit_prefix_saves_numbered_and_nothing_is_overwritten(srv):
    """The longest prefix whose numbered name fits: saved twice, two files, the first untouched."""
    name = "m" * (255 - len("_00001_.safetensors"))
    hist = srv.run(save_ckpt(name))
    assert hist["status"]["status_str"] == "success", hist["status"]
    first = srv.home / "output" / f"{name}_00001_.safetensors"
    before = _state(first)
    again = save_ckpt(name, steps=2)  # another input: ComfyUI would answer an identical repeat from its cache
    hist = srv.run(again)
    assert hist["status"]["status_str"] == "success", hist["status"]
    assert (srv.home / "output" / f"{name}_00002_.safetensors").is_file()
    assert _state(first) == before and _stray(srv.home) == []
    err = _error(srv.run(save_ckpt(name + "m")))  # one byte more no longer fits the numbered name
    assert "is too long" in err["exception_message"]


def test_exact_name_overwrite_replaces_the_one_file(srv):
    path = srv.home / "output" / "exact" / "model.safetensors"
    for steps in (1, 2):  # steps differ: the second save really runs, and writes its own metadata
        hist = srv.run(save_ckpt("exact/model", exact=True, steps=steps))
        assert hist["status"]["status_str"] == "success", hist["status"]
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata()["add.recommended_steps"] == str(steps)
    assert sorted(os.listdir(path.parent)) == ["model.safetensors"] and _stray(srv.home) == []


def test_extract_over_an_existing_name_writes_the_next_number(srv):
    """The name of an existing LoRA as prefix: the LoRA is kept, the result is numbered beside it."""
    loras = srv.home / "models" / "loras"
    kept = loras / "tiny_sd15_kohya.safetensors"
    before = kept.read_bytes()
    hist = srv.run(extract("tiny_sd15_kohya"))
    assert hist["status"]["status_str"] == "success", hist["status"]
    assert kept.read_bytes() == before and (loras / "tiny_sd15_kohya_00001_.safetensors").is_file()
    listed = srv.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert "tiny_sd15_kohya_00001_.safetensors" in listed  # where LoraLoader finds it


def test_an_api_prompt_with_the_old_widget_names_is_refused_by_name(srv):
    """API-format prompts written for the old savers (``filename`` / ``overwrite``) are refused before
    anything runs, naming the input to add; UI workflows map by position (tests/test_workflows.py)."""
    old = save_ckpt("old_api")
    inputs = old["2"]["inputs"]
    inputs["filename"], inputs["overwrite"] = inputs.pop("filename_prefix"), inputs.pop("exact_name_overwrite")
    ans = srv.queue(old)
    assert "prompt_id" not in ans, ans
    errs = ans["node_errors"]["2"]["errors"]
    assert {e["details"] for e in errs} == {"filename_prefix", "exact_name_overwrite"}
    assert all(e["message"] == "Required input is missing" for e in errs)


def test_extract_above_layer_width_reports_the_rank_it_stored(srv):
    hist = srv.run(extract("wide_rank_extract", rank=1024))
    assert hist["status"]["status_str"] == "success", hist["status"]
    with safe_open(str(srv.home / "models" / "loras" / "wide_rank_extract_00001_.safetensors"), framework="pt") as f:
        md = f.metadata()
    downs = [int(json.loads(md["ss_network_dim"]))]
    assert md["add.requested_rank"] == "1024" and downs[0] < 1024 and md["add.rank"] == md["ss_network_dim"]
    assert f"rank {downs[0]} (requested 1024" in hist["outputs"]["5"]["text"][0]


@pytest.mark.parametrize("path,status", [("/add/jobs/zzzzzzzzzzzz", 404), ("/api/add/jobs/0123456789ab", 404),
                                         ("/add/jobs/0123456789ab/preview.png", 404)])
def test_job_routes_refuse_unknown_ids(srv, path, status):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(srv.url + path, timeout=30)
    assert e.value.code == status
    body = json.loads(e.value.read())
    assert "no ADD training job" in body["error"]



# ============================================================================================
# Image inputs: ADD Train (image_folder, images, dinov2_file), ADD Load Frames, ADD Compare, and
# the headless trainer's image_folder. Files planted by _plant_image_inputs.
# ============================================================================================
BOMB_SIDE = 20000  # 400 megapixels: over Pillow's limit of 2 x 89.5 megapixels (DecompressionBombError)
MANY_FRAMES = 400  # x 8192 x 8192 x 12 bytes = 322 GB as one batch: more than any test machine has free
# An image-producing node of "another pack": returns an IMAGE batch of 0 images.
EMPTY_IMAGES_NODE = """
import torch


class ADDTestEmptyImageBatch:
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def make(self):
        return (torch.zeros(0, 64, 64, 3),)


NODE_CLASS_MAPPINGS = {"ADDTestEmptyImageBatch": ADDTestEmptyImageBatch}
"""


def bomb_png(path: Path, side: int = BOMB_SIDE) -> None:
    """A PNG whose header promises side x side pixels (a few hundred bytes on disk)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.parent.mkdir(parents=True, exist_ok=True)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\0" * (side + 1) * 4)  # a few rows; Pillow judges the header before decoding
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _png(path: Path, size=(16, 16), color=(200, 40, 40)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _plant_image_inputs(home: Path) -> None:
    inp, outside = home / "input", home / "outside_input"
    # ADD Train image_folder / headless image_folder
    _png(inp / "img_bomb" / "a.png")
    bomb_png(inp / "img_bomb" / "b_huge.png")
    _png(inp / "img_caption" / "fox.png")
    (inp / "img_caption" / "fox.txt").write_bytes("a fox in the snow, caf\u00e9 lighting".encode("cp1252"))
    _png(outside / "dataset" / "cat.png")
    (outside / "dataset" / "cat.txt").write_bytes(b"\xff\xfe not utf-8")
    (inp / "img_linked").symlink_to(outside / "dataset", target_is_directory=True)
    _png(inp / "img_dangling" / "a.png")
    (inp / "img_dangling" / "b.png").symlink_to(outside / "gone.png")
    # ADD Load Frames
    bomb_png(inp / "frames_bomb" / "frame_0001.png")
    for i in range(MANY_FRAMES):
        _png(inp / "frames_many" / f"f{i:04d}.png", (1, 1))
    for i in range(3):
        _png(outside / "clip" / f"frame_{i + 1}.png", (24, 16), (40 * i, 0, 0))
    (inp / "frames_linked").symlink_to(outside / "clip", target_is_directory=True)
    _png(inp / "frames_file_links" / "frame_1.png", (24, 16))
    (inp / "frames_file_links" / "frame_2.png").symlink_to(outside / "clip" / "frame_2.png")
    (home / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (home / "custom_nodes" / "add_test_empty_images.py").write_text(EMPTY_IMAGES_NODE)


def load_frames(folder: str, width: int = 0, height: int = 0, max_frames: int = 0) -> dict:
    return {"1": {"class_type": "ADDLoadFrames", "inputs": {"folder": folder, "start": 0, "every_nth": 1,
                                                            "max_frames": max_frames, "width": width, "height": height}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}


def train_on_empty_images() -> dict:
    p = train(images=["9", 0], vae=["1", 2])
    p["9"] = {"class_type": "ADDTestEmptyImageBatch", "inputs": {}}
    return p


NOT_DINOV2 = "loras/tiny_sd15_kohya.safetensors"  # an intact safetensors file holding other tensors
IMAGE_CASES = [
    # ADD Train
    ("train_folder_bomb", train(image_folder="img_bomb", vae=["1", 2]),
     ["image_folder 'img_bomb'", "b_huge.png is too large to open safely", "decompression bomb", "Shrink the image"]),
    ("train_caption_not_utf8", train(image_folder="img_caption", vae=["1", 2]),
     ["image_folder 'img_caption'", "fox.txt is not UTF-8", "byte 0xe9", "Save it as UTF-8"]),
    ("train_folder_nul", train(image_folder="img\0caption", vae=["1", 2]),
     ["image_folder 'img\\x00caption' contains a NUL", "my_dataset"]),
    # a linked folder leading out of input/ is followed (its bad caption is what stops the run)
    ("train_folder_link_followed", train(image_folder="img_linked", vae=["1", 2]),
     ["image_folder 'img_linked'", "cat.txt is not UTF-8"]),
    ("train_folder_dangling_link", train(image_folder="img_dangling", vae=["1", 2]),
     ["image_folder 'img_dangling'", "b.png is a symbolic link to", "which does not exist"]),
    ("train_images_empty_batch", train_on_empty_images(),
     ["images is an empty batch", "produced no image", "disconnect 'images'"]),
    ("train_dinov2_not_dinov2", train(discriminator="dinov2", dinov2_file=NOT_DINOV2, vae=["1", 2]),
     ["dinov2_file tiny_sd15_kohya.safetensors does not hold DINOv2", "tensors are missing", "discriminator 'teacher'"]),
    ("train_dinov2_pickle", train(discriminator="dinov2", dinov2_file="loras/old_style.pt", vae=["1", 2]),
     ["dinov2_file old_style.pt is not a .safetensors file", "never loads pickles"]),
    ("train_dinov2_nul", train(discriminator="dinov2", dinov2_file="dino\0v2.safetensors", vae=["1", 2]),
     ["dinov2_file 'dino\\x00v2.safetensors' contains a NUL"]),
    # ADD Load Frames
    ("frames_bomb", load_frames("frames_bomb"),
     ["folder 'frames_bomb'", "frame_0001.png is too large to open safely", "decompression bomb"]),
    ("frames_nul", load_frames("frames\0bomb"), ["folder 'frames\\x00bomb' contains a NUL"]),
    ("frames_8192_memory", load_frames("frames_many", 8192, 8192),
     [f"folder 'frames_many': {MANY_FRAMES} images at 8192x8192 need about", "of memory as one batch", "is free",
      "Lower width/height or max_frames"]),
    # ADD Compare
    ("compare_teacher_cfg_nan", compare(teacher_cfg=math.nan), ["teacher_cfg is nan", "type a number from 1 to 30"]),
]


class TestImageInputs:
    """Bad image inputs of ADD Train, ADD Load Frames and ADD Compare through the server: the plugin's
    error type, naming the input and the file; the server stays usable."""

    @pytest.mark.parametrize("case,prompt,fragments", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
    def test_bad_image_input_is_a_clear_error(self, srv, case, prompt, fragments):
        err = _error(srv.run(prompt))
        msg = err["exception_message"]
        for frag in fragments:
            assert frag in msg, f"{case}: {frag!r} not in {msg!r}"
        assert err["exception_type"] == "comfyui_add.ADDError", (case, err["exception_type"], msg)
        assert len(msg) < 1500, f"{case}: a {len(msg)}-character message"
        ok = srv.run(valid_prompt())
        assert ok["status"]["status_str"] == "success", ok["status"]

    @pytest.mark.parametrize("folder,count", [("frames_linked", 3), ("frames_file_links", 2)])
    def test_load_frames_follows_links_to_folders_and_files_alike(self, srv, folder, count):
        hist = srv.run(load_frames(folder))
        assert hist["status"]["status_str"] == "success", hist["status"]
        assert len(hist["outputs"]["2"]["images"]) == count

    def test_load_frames_within_memory_still_loads(self, srv):
        """The memory check refuses by size: the same folder loads at a size that fits."""
        hist = srv.run(load_frames("frames_many", 64, 64, max_frames=4))
        assert hist["status"]["status_str"] == "success", hist["status"]
        assert len(hist["outputs"]["2"]["images"]) == 4


class TestHeadlessImageFolder:
    """The headless trainer (scripts/train_add.py, a real process) with a bad image_folder: one
    'error:' line naming the config, the input and the file, exit status 2, no traceback."""

    @staticmethod
    def run_cli(tmp_path: Path, tiny, folder: str) -> subprocess.CompletedProcess:
        from scripts.comfy_host import ROOT

        cfg = tmp_path / "bad_images.json"
        cfg.write_text(json.dumps(dict(model=str(tiny["tiny_sd15"]), output=str(tmp_path / "headless_bad"),
                                       image_folder=folder, width=64, height=64, max_steps=1, batch_size=1,
                                       device="cpu")))
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "train_add.py"), str(cfg)], cwd=ROOT,
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})

    @pytest.mark.parametrize("sub,fragments", [
        ("img_caption", ["fox.txt is not UTF-8", "Save it as UTF-8"]),
        ("img_bomb", ["b_huge.png is too large to open safely", "decompression bomb"]),
    ])
    def test_bad_folder_is_one_error_line(self, srv, tiny, tmp_path, sub, fragments):
        folder = str(srv.home / "input" / sub)
        res = self.run_cli(tmp_path, tiny, folder)
        assert res.returncode == 2, res.stderr[-3000:]
        assert "Traceback" not in res.stderr, res.stderr[-3000:]
        line = next(ln for ln in res.stderr.splitlines() if ln.startswith("error: config"))
        assert f"image_folder {folder!r}" in line, line
        for frag in fragments:
            assert frag in line, line
        assert not (tmp_path / "headless_bad.safetensors").exists()

    def test_nul_in_image_folder_is_refused_by_name(self, tmp_path, tiny):
        from scripts.train_add import ConfigError, check_config

        with pytest.raises(ConfigError, match=r"image_folder 'a\\x00b' contains a NUL"):
            check_config(dict(model=str(tiny["tiny_sd15"]), output=str(tmp_path / "x"), image_folder="a\0b"))


# ============================================================================================
# ADD Train jobs, their state folder, the job routes and the headless trainer (reliability)
# ============================================================================================
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402

NAN_CKPT = "tiny_sd15_nan_out.safetensors"  # the tiny SD1.5 with a NaN in the UNet's last convolution
NAN_KEY = "model.diffusion_model.out.2.bias"


def _strict_json(raw: bytes):
    """json.loads that refuses NaN / Infinity, as a browser's JSON.parse does."""
    def refuse(token):
        raise ValueError(f"invalid JSON token {token}")
    return json.loads(raw, parse_constant=refuse)


def _get_strict(srv, path: str):
    with urllib.request.urlopen(srv.url + path, timeout=30) as r:
        return _strict_json(r.read())


def _train_on(ckpt: str, **over) -> dict:
    p = train(**over)
    p["1"]["inputs"]["ckpt_name"] = ckpt
    return p


def _job_id(hist: dict) -> str:
    assert hist["status"]["status_str"] == "success", hist["status"]
    text = hist["outputs"]["2"]["text"][0]
    m = re.search(r"job ([0-9a-f]{12})", text)
    assert m, text
    return m.group(1)


def _wait_job(srv, job_id: str, timeout: float = 300) -> dict:
    t0 = time.time()
    while True:
        job = _get_strict(srv, f"/add/jobs/{job_id}")
        if job["state"] in ("done", "cancelled", "failed"):
            return job
        assert time.time() - t0 < timeout, f"job {job_id} stuck: {job['state']} at step {job['step']}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def nan_ckpt(srv, tiny, plugin):
    """A checkpoint whose UNet computes NaN (one NaN in its output convolution's bias) and whose base
    fingerprint equals the good one's (the fingerprint samples other tensors): a run resumed on it
    passes the resume checks and then meets only non-finite steps."""
    import comfy.sd

    sd = safetensors.torch.load_file(str(tiny["tiny_sd15"]))
    sd[NAN_KEY] = torch.full_like(sd[NAN_KEY], float("nan"))
    path = srv.home / "models" / "checkpoints" / NAN_CKPT
    safetensors.torch.save_file(sd, str(path))
    fingerprint = plugin("adapters.patched_weights").weights_fingerprint
    good = comfy.sd.load_checkpoint_guess_config(str(tiny["tiny_sd15"]), output_vae=False, output_clip=False)[0]
    bad = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]
    assert fingerprint(good) == fingerprint(bad), "the fingerprint now samples the NaN tensor: pick another NAN_KEY"
    return NAN_CKPT


class TestTrainJobEndings:
    """A job ends 'done' only with a LoRA file that exists, loads and is finite; NaN never reaches JSON."""

    def test_a_run_of_only_nonfinite_steps_fails_writes_no_lora_and_jobs_stay_valid_json(self, srv, nan_ckpt):
        job = _wait_job(srv, _job_id(srv.run(_train_on(nan_ckpt, name="nan_fresh", max_steps=3))))
        assert job["state"] == "failed", job
        assert "the last 3 of 3 steps had a non-finite loss" in job["error"] and "no LoRA was written" in job["error"]
        assert not (srv.home / "models" / "loras" / "nan_fresh.safetensors").exists()
        losses = job["losses"]  # NaN losses are served as null ...
        assert losses["g_loss"] is None and losses["d_loss"] is None and losses["nonfinite"] == 3, losses
        listed = _get_strict(srv, "/add/jobs")  # ... so the panel's JSON.parse accepts every answer
        assert job["id"] in [j["id"] for j in listed["jobs"]]

    def test_nonfinite_steps_in_a_row_fail_the_run_and_keep_the_last_good_checkpoint(self, srv, nan_ckpt):
        loras = srv.home / "models" / "loras"
        good = _wait_job(srv, _job_id(srv.run(train(name="nan_keep", max_steps=2, save_every=1))))
        assert good["state"] == "done", good
        before = (loras / "nan_keep.safetensors").read_bytes()
        job = _wait_job(srv, _job_id(srv.run(_train_on(nan_ckpt, name="nan_keep", max_steps=40, save_every=1))))
        assert job["state"] == "failed" and job["start_step"] == 2 and job["step"] == 12, job
        assert "10 consecutive steps had a non-finite loss" in job["error"]
        assert job["last_checkpoint_step"] == 2 and "resume from step 2" in job["message"]
        assert (loras / "nan_keep.safetensors").read_bytes() == before
        state = loras / "nan_keep.add-state"
        assert json.loads((state / "latest.json").read_text())["checkpoint"] == "step_00000002"
        again = _wait_job(srv, _job_id(srv.run(train(name="nan_keep", max_steps=3, save_every=1))))
        assert again["state"] == "done" and again["start_step"] == 2 and again["step"] == 3, again


@pytest.fixture(scope="module")
def trained_run(srv):
    """A finished 3-step run (save_every 1, so step_00000002 and step_00000003 are kept)."""
    job = _wait_job(srv, _job_id(srv.run(train(name="state_src", max_steps=3, save_every=1))))
    assert job["state"] == "done", job
    return srv.home / "models" / "loras" / "state_src"


def _copy_run(src: Path, name: str) -> Path:
    """The LoRA and state folder of ``src`` under another run name (the state does not hold its name)."""
    dst = src.parent / name
    shutil.copy(src.with_suffix(".safetensors"), dst.with_suffix(".safetensors"))
    shutil.copytree(src.with_suffix(".add-state"), dst.with_suffix(".add-state"))
    return dst


def _tree(run: Path) -> dict[str, bytes]:
    """Every file of a run (LoRA and state folder), by relative path."""
    out = {run.name + ".safetensors": run.with_suffix(".safetensors").read_bytes()}
    for p in sorted(run.with_suffix(".add-state").rglob("*")):
        if p.is_file():
            out[str(p.relative_to(run.parent))] = p.read_bytes()
    return out


class TestTrainStateFolder:
    """No state-file problem deletes a valid checkpoint: the newest whole one is resumed, and the run says so."""

    @pytest.mark.parametrize("case,damage,start,note", [
        ("missing_step", lambda s: shutil.rmtree(s / "step_00000003"), 2,
         "latest.json names step_00000003, but the folder does not exist"),
        ("corrupt_latest", lambda s: (s / "latest.json").write_text("{not json"), 3, "latest.json is not valid JSON"),
        ("cut_state", lambda s: (s / "step_00000003" / "state.add-ckpt").write_bytes(b"\x10" + b"\0" * 20), 2,
         "step_00000003, but state.add-ckpt is cut short"),
    ])
    def test_a_broken_state_file_resumes_from_the_newest_whole_checkpoint(self, srv, trained_run, case, damage,
                                                                          start, note):
        run = _copy_run(trained_run, f"st_{case}")
        damage(run.with_suffix(".add-state"))
        hist = srv.run(train(name=run.name, max_steps=4, save_every=1))
        text = hist["outputs"]["2"]["text"][0]
        assert f"resuming at step {start}" in text and note in text, text
        job = _wait_job(srv, _job_id(hist))
        assert job["state"] == "done" and job["start_step"] == start and job["step"] == 4, job
        assert note in job["message"]  # the final message keeps the note
        assert (run.with_suffix(".add-state") / "step_00000004").is_dir()

    def test_a_corrupt_run_json_is_named_and_nothing_changes(self, srv, trained_run):
        run = _copy_run(trained_run, "st_run_json")
        (run.with_suffix(".add-state") / "run.json").write_text("{")
        before = _tree(run)
        msg = _error(srv.run(train(name=run.name, max_steps=4)))["exception_message"]
        assert "run.json is not valid JSON" in msg and "delete it to resume without those checks" in msg, msg
        assert _tree(run) == before

    def test_no_readable_checkpoint_refuses_instead_of_starting_over(self, srv, trained_run):
        run = _copy_run(trained_run, "st_all_bad")
        for step in ("step_00000002", "step_00000003"):
            (run.with_suffix(".add-state") / step / "state.add-ckpt").write_bytes(b"")
        before = _tree(run)
        msg = _error(srv.run(train(name=run.name, max_steps=4)))["exception_message"]
        assert "has no checkpoint that can be resumed" in msg and "move that folder away" in msg, msg
        assert "state.add-ckpt is 0 bytes" in msg
        assert _tree(run) == before  # the LoRA is not overwritten, no folder pruned


class TestTrainResumeSettings:
    """Changed settings are named with the node's input names; a finished or running run says what it is."""

    def test_resume_with_other_data_settings_is_refused_with_each_input_named(self, srv, trained_run):
        msg = _error(srv.run(train(name="state_src", max_steps=4, save_every=1, width=72, prompts="a blue car",
                                   data_cfg=4.0, distill_cfg=2.0, disc_max_timestep=50)))["exception_message"]
        for frag in ("width: saved 64, now 72", "prompts: the prompt lines differ from the saved run's (1 saved, 1 now)",
                     "data_cfg: saved 3.0, now 4.0", "distill_cfg: saved 1.0, now 2.0",
                     "disc_max_timestep: saved 999, now 50", "Set them back to continue it"):
            assert frag in msg, (frag, msg)
        assert "teacher_cfg_scale" not in msg and "disc_timestep_range" not in msg

    def test_a_finished_run_queued_again_says_done(self, srv, trained_run):
        hist = srv.run(train(name="state_src", max_steps=3, save_every=1))
        text = hist["outputs"]["2"]["text"][0]
        assert ", done (already trained to step 3; raise max_steps" in text and "resuming" not in text, text

    def test_same_name_while_running_with_other_settings_is_refused_and_status_says_not_saved(self, srv):
        settings = dict(name="st_running", max_steps=100_000, save_every=0, run_mode="alongside")
        job_id = _job_id(srv.run(train(**settings)))
        try:
            assert _job_id(srv.run(train(**settings))) == job_id  # the same settings: the same job
            msg = _error(srv.run(train(**dict(settings, lora_rank=4, lr_lora=2e-3))))["exception_message"]
            assert f"is training now (job {job_id}" in msg and "lora_rank: running 2, now 4" in msg, msg
            assert "lr_lora: running 0.001, now 0.002" in msg and "cancel it" in msg
            status = srv.run({"1": {"class_type": "ADDTrainingStatus", "inputs": {"job_id": job_id}}})
            text = status["outputs"]["1"]["text"][0]
            assert "(not saved yet)" in text and "None" not in text, text
        finally:
            srv.post(f"/add/jobs/{job_id}/cancel", {})
        assert _wait_job(srv, job_id)["state"] == "cancelled"


class TestJobRoutes:
    def test_a_long_unknown_id_is_not_echoed_back(self, srv):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(srv.url + "/add/jobs/" + "a" * 6000, timeout=30)
        assert e.value.code == 404
        body = e.value.read()
        assert len(body) < 400 and "6000 characters" in _strict_json(body)["error"]


class TestTrainDistilledUNets:
    def test_the_shipped_training_workflow_trains_a_unet_without_a_middle_block(self, srv, tiny):
        """BK-SDM / Segmind small-tiny SD: no middle block; ComfyUI loads it, so ADD Train must train it."""
        from scripts.tiny_models import without_middle_block
        from scripts.workflow_api import load, to_api

        without_middle_block(tiny["tiny_sd15"], srv.home / "models" / "checkpoints" / "tiny_bk_sdm.safetensors")
        api = to_api(load(Path(__file__).resolve().parent.parent / "workflows" / "add_train_lora.json"),
                     srv.get("/object_info"))
        for node in api.values():
            if node["class_type"] == "CheckpointLoaderSimple":
                node["inputs"]["ckpt_name"] = "tiny_bk_sdm.safetensors"
            if node["class_type"] == "ADDTrain":
                node["inputs"].update(name="bk_sdm_run", width=64, height=64, batch_size=2, max_steps=2, data_steps=1,
                                      save_every=1, preview_every=1, run_mode="alongside")
            if node["class_type"] == "ADDCompare":
                node["inputs"].update(width=64, height=64, teacher_steps=1, lora_name="bk_sdm_run.safetensors")
        hist = srv.run(api)
        assert hist["status"]["status_str"] == "success", hist["status"]
        train_id = next(k for k, v in api.items() if v["class_type"] == "ADDTrain")
        m = re.search(r"job ([0-9a-f]{12})", hist["outputs"][train_id]["text"][0])
        job = _wait_job(srv, m.group(1))
        assert job["state"] == "done" and job["step"] == 2, job
        sd = safetensors.torch.load_file(str(srv.home / "models" / "loras" / "bk_sdm_run.safetensors"))
        assert sd and not any("middle_block" in k for k in sd)


# ---- the headless trainer (scripts/train_add.py): bad configs -------------------------------
ROOT = Path(__file__).resolve().parent.parent


def _headless_config(tmp_path: Path, tiny, **over) -> Path:
    cfg = dict(model=str(tiny["tiny_sd15"]), output=str(tmp_path / "headless_lora"), prompts=["a red fox"], width=64,
               height=64, data_cfg=3.0, data_steps=1, student_timesteps=[999], lora_rank=2, batch_size=1, max_steps=1)
    cfg.update(over)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))  # json.dumps writes NaN for a nan value, which the script's reader accepts
    return path


def _model_file(tmp_path: Path, tiny, kind: str) -> str:
    path = tmp_path / f"{kind}.safetensors"
    good = Path(tiny["tiny_sd15"]).read_bytes()
    data = {"empty": b"", "cut": good[: len(good) // 3], "random": os.urandom(4096),
            "lora": Path(tiny["tiny_sd15_kohya"]).read_bytes()}[kind]
    path.write_bytes(data)
    return str(path)


HEADLESS_CASES = [
    ("data_cfg_negative", lambda t, tiny: dict(data_cfg=-5), ["data_cfg is -5: type a number from 1 to 30"]),
    ("data_cfg_nan", lambda t, tiny: dict(data_cfg=math.nan), ["data_cfg is nan"]),
    ("output_folder", lambda t, tiny: dict(output=str(t) + "/"), ["is a folder", "my_turbo_lora.safetensors"]),
    ("huge_size", lambda t, tiny: dict(width=16384, height=16384, batch_size=256),
     ["width 16384 must be a multiple of 8 from 64 to 4096"]),
    ("memory", lambda t, tiny: dict(width=4096, height=4096, batch_size=256),
     ["ADD training needs about", "GB is free", "Lower batch_size"]),
    ("rank_node_range", lambda t, tiny: dict(lora_rank=2000), ["lora_rank is 2000: type a whole number from 1 to 1024"]),
    ("model_empty", lambda t, tiny: dict(model=_model_file(t, tiny, "empty")), ["empty.safetensors is 0 bytes"]),
    ("model_cut", lambda t, tiny: dict(model=_model_file(t, tiny, "cut")), ["cut.safetensors is cut short"]),
    ("model_random", lambda t, tiny: dict(model=_model_file(t, tiny, "random")),
     ["random.safetensors is not a safetensors file"]),
    ("model_is_a_lora", lambda t, tiny: dict(model=_model_file(t, tiny, "lora")),
     ["lora.safetensors holds no UNet weights", "not an SD1.x/SD2.x/SDXL checkpoint"]),
]


class TestHeadlessConfig:
    """``train_add.py CONFIG [--check]``: the node's rules and the checked reader; one 'error:' line, rc 2."""

    @pytest.mark.parametrize("case,over,fragments", HEADLESS_CASES, ids=[c[0] for c in HEADLESS_CASES])
    def test_bad_config_is_one_error_line_at_rc_2(self, tmp_path, tiny, capsys, case, over, fragments):
        from scripts import train_add

        cfg = _headless_config(tmp_path, tiny, **over(tmp_path, tiny))
        for argv in ([str(cfg), "--check"], [str(cfg)]):  # the same answer with or without --check
            assert train_add.main(argv) == 2, case
            err = capsys.readouterr().err
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: "), err
            for frag in fragments:
                assert frag in err, (frag, err)
        assert not list(tmp_path.glob("*.add-state")) and not (tmp_path.parent / f"{tmp_path.name}.safetensors").exists()

    def test_a_cut_model_file_is_one_line_from_the_command_too(self, tmp_path, tiny):
        cfg = _headless_config(tmp_path, tiny, model=_model_file(tmp_path, tiny, "cut"))
        res = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_add.py"), str(cfg)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert res.stderr.strip().startswith("error: ") and "cut.safetensors is cut short" in res.stderr

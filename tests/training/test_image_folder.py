"""training/image_folder.py without ComfyUI: order, links, captions, the memory check, example placement."""
from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from comfyui_add.core.errors import ADDError
from comfyui_add.training.image_folder import (files_signature, input_subfolder, list_images, load_images, place_example,
                                               read_caption, read_captioned_folder, select_frames)


def _png(path, size=(8, 6), color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_natural_order_one_extension_list_hidden_and_other_files_skipped(tmp_path):
    for n in ("img10.png", "img2.JPG", "Img1.tiff", ".hidden.png", "notes.txt", "img3.webp"):
        _png(tmp_path / n) if not n.endswith(".txt") else (tmp_path / n).write_text("x")
    assert list_images(str(tmp_path), "folder 'x'") == ["Img1.tiff", "img2.JPG", "img3.webp", "img10.png"]


def test_images_load_in_that_order_resized_and_captions_pair_by_name(tmp_path):
    _png(tmp_path / "a10.png", (20, 10), (0, 0, 255))
    _png(tmp_path / "a2.png", (10, 20), (255, 0, 0))
    (tmp_path / "a2.txt").write_bytes("\ufeffa red square\n".encode("utf-8"))  # a BOM, as Notepad writes
    images, captions = read_captioned_folder(str(tmp_path), 8, 8, "image_folder 'x'")
    assert images.shape == (2, 8, 8, 3) and images.dtype == torch.float32
    assert images[0, 0, 0].tolist() == [1.0, 0.0, 0.0] and images[1, 0, 0].tolist() == [0.0, 0.0, 1.0]
    assert captions == ["a red square", ""]


def test_a_caption_in_another_encoding_names_the_file_and_the_byte(tmp_path):
    (tmp_path / "c.txt").write_bytes("line one\ncaf\u00e9".encode("cp1252"))
    with pytest.raises(ADDError, match=r"image_folder 'x': the caption c.txt is not UTF-8 text \(byte 0xe9 on line 2"):
        read_caption(str(tmp_path / "c.txt"), "image_folder 'x'")


def test_a_batch_over_the_free_memory_is_refused_before_decoding(tmp_path):
    for i in range(3):
        _png(tmp_path / f"f{i}.png")
    names = list_images(str(tmp_path), "folder 'x'")
    need = 3 * 64 * 32 * 12
    with pytest.raises(ADDError, match=r"folder 'x': 3 images at 64x32 need about .* Lower it"):
        load_images(str(tmp_path), names, "folder 'x'", (64, 32), available=need, fix_memory="Lower it.")
    assert load_images(str(tmp_path), names, "folder 'x'", (64, 32), available=10 * need).shape == (3, 32, 64, 3)


def test_links_are_followed_and_a_dangling_one_is_named(tmp_path):
    base, outside = tmp_path / "input", tmp_path / "elsewhere"
    _png(outside / "set" / "a.png")
    base.mkdir()
    (base / "linked").symlink_to(outside / "set", target_is_directory=True)
    folder = input_subfolder(str(base), "linked", "image_folder", "")
    assert list_images(folder, "image_folder 'linked'") == ["a.png"]
    (outside / "set" / "b.png").symlink_to(outside / "missing.png")
    with pytest.raises(ADDError, match=r"b.png is a symbolic link to .*missing.png, which does not exist"):
        list_images(folder, "image_folder 'linked'")


@pytest.mark.parametrize("name, match", [("../x", "no '..' or absolute path"), ("/etc", "no '..' or absolute path"),
                                         ("a/../..", "no '..'"), ("a\0b", "contains a NUL"), (".", "no '..'"),
                                         ("missing", r"does not exist: .* Put it there\. Folders there now: have")])
def test_typed_folder_names_stay_inside_the_input_folder(tmp_path, name, match):
    (tmp_path / "have").mkdir()
    with pytest.raises(ADDError, match=match):
        input_subfolder(str(tmp_path), name, "folder", "Put it there.")


def test_the_example_is_placed_whole_and_never_over_anything(tmp_path):
    src = tmp_path / "shipped"
    for i in range(3):
        _png(src / f"frame_{i}.png")
    inp = tmp_path / "input"
    assert place_example(str(src), str(inp / "clip"))
    assert sorted(os.listdir(inp / "clip")) == sorted(os.listdir(src)) and os.listdir(inp) == ["clip"]
    assert not place_example(str(src), str(inp / "clip"))  # there now: untouched
    (inp / "empty").mkdir()
    (inp / "a_file").write_text("mine")
    (inp / "a_link").symlink_to(tmp_path / "nowhere")
    for taken in ("empty", "a_file", "a_link"):
        assert not place_example(str(src), str(inp / taken))
    assert os.listdir(inp / "empty") == [] and (inp / "a_file").read_text() == "mine"
    assert os.path.islink(inp / "a_link") and sorted(os.listdir(inp)) == ["a_file", "a_link", "clip", "empty"]


def test_frames_are_selected_in_natural_order_and_their_signature_follows_the_files(tmp_path):
    for n in ("f10.png", "f2.png", "f1.png", "f3.jpg"):
        _png(tmp_path / n)
    (tmp_path / "notes.txt").write_text("not a frame")
    assert select_frames(str(tmp_path), "clip") == ["f1.png", "f2.png", "f3.jpg", "f10.png"]
    assert select_frames(str(tmp_path), "clip", start=1, every_nth=2) == ["f2.png", "f10.png"]
    assert select_frames(str(tmp_path), "clip", max_frames=2) == ["f1.png", "f2.png"]
    with pytest.raises(ADDError, match=r"start=9 is past the last of the 4 frames in 'clip'"):
        select_frames(str(tmp_path), "clip", start=9)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ADDError, match=r"folder 'e' \(.*empty\) holds no image files \(.png, .jpg"):
        select_frames(str(tmp_path / "empty"), "e")
    names = ["f1.png", "f2.png"]
    sig = files_signature(str(tmp_path), names)
    assert sig == files_signature(str(tmp_path), names) != files_signature(str(tmp_path), names[:1])
    _png(tmp_path / "f2.png", (9, 6))
    assert files_signature(str(tmp_path), names) != sig


def test_image_grid_lays_out_rows_with_headers_and_png_bytes_round_trip():
    import io

    from comfyui_add.core.images import image_grid, png_bytes, to_image

    imgs = torch.stack([torch.full((4, 6, 3), v) for v in (0.0, 0.5, 1.0)])
    grid = image_grid(imgs, columns=2, background=(7, 7, 7))
    assert grid.size == (12, 8)
    assert [grid.getpixel(p) for p in ((0, 0), (6, 0), (0, 4), (6, 4))] == [(0,) * 3, (128,) * 3, (255,) * 3, (7,) * 3]
    labelled = image_grid(list(imgs[:2]), columns=2, headers=["a", "b"], header_height=10)
    assert labelled.size == (12, 14) and labelled.getpixel((0, 10)) == (0, 0, 0)
    row = Image.open(io.BytesIO(png_bytes(imgs)))  # default: side by side
    assert row.size == (18, 4) and row.getpixel((17, 3)) == (255, 255, 255)
    back = to_image(grid)
    assert back.shape == (1, 8, 12, 3) and (back[0, 0, 6] * 255).round().tolist() == [128.0] * 3

"""The suite's disk hygiene (tests/scratch.py): a CI machine with a few GB free must pass it."""
from __future__ import annotations

import os
import time

from scratch import model_folder, new_large_files


def test_a_model_folder_is_registered_first_then_unregistered_and_deleted(comfy, tmp_path_factory):
    import folder_paths

    with model_folder(tmp_path_factory, "loras", "scratch_loras") as d:
        assert folder_paths.get_folder_paths("loras")[0] == str(d)
        (d / "x.safetensors").write_bytes(b"0" * 10)
        assert "x.safetensors" in folder_paths.get_filename_list("loras")
    assert not d.exists()
    assert str(d) not in folder_paths.get_folder_paths("loras")


def test_only_new_large_output_files_are_found_once(tmp_path):
    home = tmp_path / "home0"
    (home / "output" / "sub").mkdir(parents=True)
    old = home / "output" / "old.safetensors"
    old.write_bytes(b"0" * 4096)
    os.utime(old, (time.time() - 100, time.time() - 100))
    since = time.time() - 1
    big, small = home / "output" / "sub" / "big.safetensors", home / "output" / "small.json"
    big.write_bytes(b"0" * 4096)
    small.write_bytes(b"{}")
    (tmp_path / "homecurrent").symlink_to(home)  # pytest's alias of the newest folder
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "big.bin").write_bytes(b"0" * 4096)  # not under output/
    assert new_large_files(tmp_path, since, 1024) == [big]

"""training/files.py: the one checked reader, the one atomic writer, the one name check (pure, no ComfyUI)."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch

from training_helpers import ROOT, single_thread  # noqa: F401  (repo root on sys.path; autouse fixture)
from comfyui_add.training import checkpoint
from comfyui_add.core import files


def _good(tmp_path, name="good.safetensors"):
    path = tmp_path / name
    safetensors.torch.save_file({"w": torch.randn(64, 64), "b": torch.randn(64)}, str(path), metadata={"k": "v"})
    return path


@pytest.mark.parametrize("make,fragment", [
    (lambda good: b"", "is 0 bytes"),
    (lambda good: good[:5], "is cut short: 5 bytes"),
    (lambda good: good[:40], "is cut short: the header promises at least"),
    (lambda good: good[:-100], "is cut short: the header promises"),
    (lambda good: os.urandom(4096), "is not a safetensors file"),
    (lambda good: (20).to_bytes(8, "little") + b"x" * 20 + b"\0" * 64, "its header is not JSON"),
])
def test_broken_files_are_described_in_words(tmp_path, make, fragment):
    good = _good(tmp_path).read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(make(good))
    with pytest.raises(files.ADDError, match=fragment) as e:
        files.read_safetensors(bad, "loras/bad.safetensors", "Re-download it.")
    assert "loras/bad.safetensors" in str(e.value) and "Re-download it." in str(e.value)


def test_cut_short_reports_both_sizes(tmp_path):
    good = _good(tmp_path).read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(good[:-100])
    with pytest.raises(files.ADDError, match=f"promises {len(good)} bytes, the file has {len(good) - 100}"):
        files.safetensors_header(bad)


@pytest.mark.parametrize("name", ["renamed.safetensors", "model.pt", "model.ckpt"])
def test_pickles_are_refused_without_unpickling_or_unsafe_advice(tmp_path, name):
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / name
    torch.save({"x": Boom()}, str(path))
    with pytest.raises(files.ADDError, match="is a pickle checkpoint.*Convert it to .safetensors") as e:
        files.read_safetensors(path, f"loras/{name}")
    assert "weights_only" not in str(e.value) and f"loras/{name}" in str(e.value)
    assert not (tmp_path / "pwned").exists()


def test_good_file_reads_back(tmp_path):
    tensors, md = files.read_safetensors(_good(tmp_path))
    assert set(tensors) == {"w", "b"} and md == {"k": "v"}


def test_streamed_safetensors_load_with_the_library(tmp_path):
    t = {"a": torch.randn(3, 4), "h": torch.randn(5).half(), "bf": torch.randn(2, 2).bfloat16(), "e": torch.zeros(0),
         "i": torch.arange(3), "flag": torch.tensor([True, False]), "strided": torch.randn(4, 3).T}
    buf = io.BytesIO()
    files.write_safetensors_to(buf, t, {"x": "1"})
    back = safetensors.torch.load(buf.getvalue())
    assert all(torch.equal(back[k], v.contiguous()) for k, v in t.items())
    path = tmp_path / "s.safetensors"
    files.atomic_write_safetensors(t, path, {"x": "1"})
    assert files.safetensors_metadata(path) == {"x": "1"}


def test_overwrite_false_never_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "keep.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite"):
        files.atomic_write_bytes(b"new", path, overwrite=False)
    assert path.read_bytes() == b"old"
    files.atomic_write_bytes(b"new", path, overwrite=True)
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["keep.safetensors"]


def _numbered(tmp_path, stem="m"):
    n = 1
    while True:
        yield tmp_path / f"{stem}_{n:05}_.safetensors"
        n += 1


def test_first_free_skips_taken_names_and_a_name_taken_while_writing(tmp_path):
    (tmp_path / "m_00001_.safetensors").write_bytes(b"one")

    def write(f):  # another save takes _00002_ while this one writes
        (tmp_path / "m_00002_.safetensors").write_bytes(b"two")
        f.write(b"mine")
    path = files.atomic_write_first_free(_numbered(tmp_path), write)
    assert path == str(tmp_path / "m_00003_.safetensors") and (tmp_path / "m_00003_.safetensors").read_bytes() == b"mine"
    assert (tmp_path / "m_00001_.safetensors").read_bytes() == b"one"
    assert (tmp_path / "m_00002_.safetensors").read_bytes() == b"two"
    assert sorted(os.listdir(tmp_path)) == [f"m_0000{i}_.safetensors" for i in (1, 2, 3)]  # no temporary left


def test_first_free_failure_leaves_nothing(tmp_path):
    def broken(f):
        f.write(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write_first_free(_numbered(tmp_path), broken)
    assert os.listdir(tmp_path) == []
    taken = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for p in taken:
        p.write_bytes(b"keep")
    with pytest.raises(files.ADDFileExistsError, match="no free file name"):
        files.atomic_write_first_free(iter(taken), lambda f: f.write(b"new"))
    assert [p.read_bytes() for p in taken] == [b"keep", b"keep"] and len(os.listdir(tmp_path)) == 2


def test_near_limit_names_save(tmp_path):
    """The temporary's name is short whatever the final name is (the old one was longer than it)."""
    limit = files.name_max(tmp_path)
    stem = files.check_name("x" * (limit - len(".safetensors")), folder=tmp_path)
    files.atomic_write_bytes(b"ok", tmp_path / (stem + ".safetensors"), overwrite=False)
    assert (tmp_path / (stem + ".safetensors")).read_bytes() == b"ok"
    with pytest.raises(files.ADDError, match="too long"):
        files.check_name("x" * (limit - len(".safetensors") + 1), folder=tmp_path)


def test_checkpoint_reexports_the_one_writer():
    assert checkpoint.atomic_write_bytes is files.atomic_write_bytes
    assert checkpoint.atomic_write_json is files.atomic_write_json


def test_kill_during_write_keeps_old_file_and_next_write_cleans_up(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old model")
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from scripts.plugin_package import load; load(); from comfyui_add.core import files; "
            "files.atomic_write(sys.argv[2], lambda f: (f.write(b'x' * 4096), f.flush(), time.sleep(60)))")
    proc = subprocess.Popen([sys.executable, "-c", code, ROOT, str(path)])
    try:
        end = time.time() + 60
        while not [e for e in os.listdir(tmp_path) if e.endswith(".partial")]:
            assert time.time() < end and proc.poll() is None, "the writer never started"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    temps = [e for e in os.listdir(tmp_path) if e != "model.safetensors"]
    assert len(temps) == 1 and temps[0].startswith(".") and temps[0].endswith(".partial")
    assert path.read_bytes() == b"old model"
    files.atomic_write_bytes(b"other", tmp_path / "other.safetensors")  # any later write there cleans up
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "other.safetensors"]


@pytest.mark.parametrize("name,fragment", [
    ("", "is empty"), ("../up", "path separator"), ("a/../b", "path separator"), ("/abs/x", "absolute path"),
    ("C:evil", "drive letter"), ("a\0b", "NUL"), ("a\\b", "path separator"), ("bad|name", "'|'"),
    (".hidden", "starting with '.'"), ("x" * 300, "too long"),
])
def test_name_check_refuses(name, fragment):
    with pytest.raises(files.ADDError, match=fragment) as e:
        files.check_name(name, "name")
    assert str(e.value).startswith("name ") and "type a plain file name" in str(e.value)


def test_name_check_subfolders_and_extension(tmp_path):
    assert files.check_name("my_lora.safetensors") == "my_lora"
    assert files.check_name("sub/dir/model", subfolders=True) == "sub/dir/model"
    with pytest.raises(files.ADDError, match="'..'"):
        files.check_name("sub/../../x", subfolders=True)
    with pytest.raises(files.ADDError, match="too long"):  # the state folder beside it must fit too
        files.check_name("x" * 244, suffixes=(".add-state-longer-than-ext",))
    assert files.safe_path(tmp_path, "a/b").endswith(os.path.join("a", "b.safetensors"))


def test_nonfinite_keys():
    t = {"ok": torch.ones(2), "nan": torch.tensor([1.0, float("nan")]), "inf": torch.tensor([float("inf")]),
         "int": torch.arange(2)}
    assert sorted(files.nonfinite_keys(t)) == ["inf", "nan"]


@pytest.mark.parametrize("rel,fragment", [
    ("", "is empty"), ("a\0b", "contains a NUL"), ("a\tb", "control character"), ("../x", "no '..'"),
    ("a/../b", "no '..'"), ("a\\..\\..\\x", "no '..'"), ("/etc", "absolute path"), ("C:evil", "absolute path"),
    (".", "no '..'"),
])
def test_resolve_inside_refuses_escapes_as_typed(tmp_path, rel, fragment):
    with pytest.raises(files.ADDError, match=fragment) as e:
        files.resolve_inside(tmp_path, rel, "folder", where="the input folder", kind="folder", example="my_dataset")
    assert str(e.value).startswith("folder ") and ("my_dataset" in str(e.value))


def test_resolve_inside_follows_links_to_read_and_contains_them_to_write(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    (root / "out_link").symlink_to(outside, target_is_directory=True)
    assert files.resolve_inside(root, " sub\\data ", "folder") == str(root / "sub" / "data")  # spaces, '\' as '/'
    assert files.resolve_inside(root, "out_link/x", "folder") == str(root / "out_link" / "x")  # reading: followed
    assert files.resolve_inside(root, "real/x", "name", contain_links=True) == str(root / "real" / "x")
    with pytest.raises(files.ADDError, match=r"name 'out_link/x' resolves outside .*root \(through a symlinked folder\)"):
        files.resolve_inside(root, "out_link/x", "name", contain_links=True)
    (root / "file_link").symlink_to(outside / "y")  # the last name may be a link: a write replaces the link itself
    assert files.resolve_inside(root, "file_link", "name", contain_links=True) == str(root / "file_link")
    with pytest.raises(files.ADDError, match="resolves outside"):  # safe_path goes through it
        files.safe_path(root, "out_link/x")

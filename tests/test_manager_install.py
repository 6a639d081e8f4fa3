"""A Manager-style install into a fresh ComfyUI, the way a new user gets the plugin.

ComfyUI Manager clones the repository into ``custom_nodes/`` and runs ``python -m pip install -r
requirements.txt`` with the interpreter ComfyUI runs on. Here:

1. a fresh host: a copy of the ComfyUI these tests use, in a temporary folder;
2. its environment: a new virtual environment (base interpreter, no pip of its own) whose
   site-packages holds a ``.pth`` line pointing at the test environment's site-packages. Python
   and pip see every package of the real environment as installed, but pip installs into the
   new environment only, and never uninstalls outside it, so the real environment cannot change
   whatever pip decides; an up- or downgrade would show as a different version in the new
   environment (its own site-packages comes first on sys.path);
3. a real ``pip install -r requirements.txt`` there (the package index as configured, as Manager
   uses it), then: no package that was installed before has another version after;
4. the plugin COPIED (its git files, as a clone has them) into the fresh ``custom_nodes/``, the
   user's model files put under the names the templates use (tiny stand-ins), the server started
   on that environment, and: no import error in the log, /object_info lists every node of the
   plugin's nodes (nodes.NODE_CLASSES), the front-end extension is served, and the template that reads
   frames from input/ runs (its example clip ships with the plugin).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from scripts.comfy_client import ComfyClient
from scripts.comfy_host import ROOT, free_port, host_path

pytestmark = [pytest.mark.server, pytest.mark.slow]

DIR_NAME = "ComfyUI-ADD"  # the folder name a clone of the repository gets
# Packages a ComfyUI install pins or builds for its hardware; named in the failure message.
HOST_PINNED = ("torch", "torchvision", "torchaudio", "torchsde", "comfyui-frontend-package",
               "comfyui-workflow-templates", "comfyui-embedded-docs", "transformers", "tokenizers", "safetensors",
               "numpy", "pillow", "aiohttp", "pydantic", "av", "kornia", "spandrel", "sqlalchemy", "alembic")
VERSIONS = ("import importlib.metadata as m, json, re\n"
            "seen = {}\n"
            "for d in m.distributions():  # sys.path order: the first one found is the one imported\n"
            "    name = re.sub(r'[-_.]+', '-', (d.metadata['Name'] or '')).lower()\n"
            "    if name and name not in seen:\n"
            "        seen[name] = d.version\n"
            "print(json.dumps(seen))\n")


def plugin_files() -> list[str]:
    """The plugin's files as a clone has them: tracked ones, plus new ones not yet committed
    (git's ignore rules apply), minus deleted ones."""
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         check=True, capture_output=True).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def make_env(env: Path) -> Path:
    """A new virtual environment that sees the running environment's packages; returns its python."""
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(env)],
                   check=True, timeout=120)
    python = env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    Path(site, "_host_environment.pth").write_text("".join(p + "\n" for p in sorted(ours)))
    return python


def versions(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-c", VERSIONS], check=True, capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """(fresh ComfyUI folder, its python, pip's output, versions before, versions after)."""
    base = tmp_path_factory.mktemp("manager_install")
    comfy = base / "ComfyUI"
    shutil.copytree(host_path(), comfy, symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", ".git", "*.pyc", "user", "temp"))
    for entry in (comfy / "custom_nodes").iterdir():  # a fresh host: no custom node but ComfyUI's own examples
        if entry.is_symlink():
            entry.unlink()
        elif entry.is_dir():
            shutil.rmtree(entry)
    python = make_env(base / "venv")
    target = comfy / "custom_nodes" / DIR_NAME
    for rel in plugin_files():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target / rel)
    before = versions(python)
    pip = subprocess.run([str(python), "-m", "pip", "install", "-r", str(target / "requirements.txt")],
                         cwd=target, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PIP_NO_INPUT": "1", "PYTHONNOUSERSITE": "1"})
    assert pip.returncode == 0, f"pip install -r requirements.txt failed:\n{pip.stdout[-3000:]}\n{pip.stderr[-3000:]}"
    return comfy, python, pip.stdout + pip.stderr, before, versions(python)


def test_the_copy_is_a_copy(fresh):
    comfy = fresh[0]
    target = comfy / "custom_nodes" / DIR_NAME
    assert target.is_dir() and not target.is_symlink()
    assert not any(p.is_symlink() for p in target.rglob("*"))
    assert (target / "__init__.py").is_file() and (target / "requirements.txt").is_file()


def test_pip_install_changes_no_installed_package(fresh):
    _, _, log, before, after = fresh
    changed = {n: (v, after.get(n)) for n, v in before.items() if after.get(n) != v}
    pinned = {n: c for n, c in changed.items() if n in HOST_PINNED}
    assert not pinned, f"installing the plugin changed packages ComfyUI pins: {pinned}\n{log[-3000:]}"
    assert not changed, f"installing the plugin changed installed packages: {changed}\n{log[-3000:]}"
    assert "Not uninstalling" not in log, log[-3000:]  # pip wanted to replace a package of the environment
    for name in HOST_PINNED:
        if name in before:
            assert after[name] == before[name]


@pytest.fixture(scope="module")
def fresh_server(fresh, tiny):
    """The fresh host's server, started on the fresh environment, with the user's own model files
    under the names the shipped templates use (the tiny models, linked; nothing else is placed):
    (client, log path, ComfyUI folder)."""
    from scripts.demo_models import needed_files

    comfy, python = fresh[0], fresh[1]
    for name, (folder, tiny_name) in needed_files().items():
        if folder != "input":
            link = comfy / "models" / folder / name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(tiny[tiny_name])
    port = free_port()
    log_path = comfy / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                 "--database-url", "sqlite:///:memory:", "--disable-auto-launch"],
                                cwd=comfy, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONNOUSERSITE": "1"})
        try:
            client = ComfyClient(f"http://127.0.0.1:{port}")
            client.wait_ready(proc, timeout=240, log_tail=lambda: log_path.read_text(errors="replace")[-4000:])
            yield client, log_path, comfy
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_plugin_loads_and_lists_every_node(fresh_server, plugin):
    client, log_path, _ = fresh_server
    expected = set(plugin("nodes").NODE_CLASSES)
    assert expected, "the plugin registers no node"
    info = client.get("/object_info")
    extensions = client.get("/extensions")
    text = log_path.read_text(errors="replace")
    ours = [ln for ln in text.splitlines() if DIR_NAME in ln]
    assert ours, f"the log never mentions custom_nodes/{DIR_NAME}:\n{text[-3000:]}"
    assert not [ln for ln in ours if "IMPORT FAILED" in ln or "Cannot import" in ln], "\n".join(ours)
    frames = [ln for ln in text.splitlines() if ln.strip().startswith('File "') and f"{DIR_NAME}{os.sep}" in ln]
    assert not frames, "a traceback runs through the plugin:\n" + text[-4000:]
    missing = sorted(expected - set(info))
    assert not missing, f"/object_info lacks {missing}"
    assert {info[n]["python_module"] for n in expected} == {f"custom_nodes.{DIR_NAME}"}
    assert any(e.startswith(f"/extensions/{DIR_NAME}/") and e.endswith(".js") for e in extensions), extensions


def test_every_template_input_ships_with_the_plugin_or_comfyui(fresh_server):
    """What the templates read from input/: images ComfyUI itself ships (example.png), and frame
    folders that ship with the plugin (ADD Load Frames places them on first use)."""
    from scripts.demo_models import frame_folders, needed_files

    comfy = fresh_server[2]
    target = comfy / "custom_nodes" / DIR_NAME
    images = [n for n, (folder, _) in needed_files().items() if folder == "input"]
    assert all((comfy / "input" / n).is_file() for n in images), images
    folders = frame_folders()
    assert folders, "no shipped template reads a frame folder: this test checks nothing"
    for folder in folders:
        shipped = sorted(p.name for p in (target / "input" / folder).iterdir())
        assert shipped and all(n.endswith(".png") for n in shipped), (folder, shipped)
        assert sum((target / "input" / folder / n).stat().st_size for n in shipped) < 100_000


def test_stream_template_runs_on_the_fresh_install_and_keeps_a_users_folder(fresh_server):
    """sd_turbo_stream_img2img_frames, as the front end queues it, on the fresh install: the shipped
    clip appears in input/ and the template runs; a folder of the user's under that name is kept."""
    from scripts.workflow_api import load, to_api

    client, _, comfy = fresh_server
    folder = comfy / "input" / "add_stream_frames"
    shipped = comfy / "custom_nodes" / DIR_NAME / "input" / "add_stream_frames"
    assert not folder.exists(), "a fresh install already has the clip: this test would prove nothing"
    api = to_api(load(ROOT / "workflows" / "sd_turbo_stream_img2img_frames.json"), client.get("/object_info"))
    loader = next(n for n in api.values() if n["class_type"] == "ADDLoadFrames")
    assert loader["inputs"]["folder"] == "add_stream_frames"
    loader["inputs"].update(width=64, height=64, max_frames=3)  # CPU-sized (the template: 512x512, all frames)
    hist = client.run(api)
    assert hist["status"]["status_str"] == "success", str(hist["status"])[:3000]
    saved = [img for out in hist["outputs"].values() for img in out.get("images", []) if img["type"] == "output"]
    assert len(saved) == 3
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in shipped.iterdir())
    assert all((folder / p.name).read_bytes() == p.read_bytes() for p in shipped.iterdir())

    # the user's own clip under that name: used as it is, nothing added or replaced
    from PIL import Image

    for p in folder.iterdir():
        p.unlink()
    Image.new("RGB", (40, 40), (0, 90, 200)).save(folder / "mine_1.png")
    before = (folder / "mine_1.png").read_bytes()
    loader["inputs"]["max_frames"] = 0
    hist = client.run(api)
    assert hist["status"]["status_str"] == "success", str(hist["status"])[:3000]
    assert [p.name for p in folder.iterdir()] == ["mine_1.png"] and (folder / "mine_1.png").read_bytes() == before

"""Shared fixtures.

Two ways to reach a real ComfyUI (see scripts/comfy_host.py for how it is found):
* in-process (fast): ``comfy`` imports ComfyUI on the CPU in this process and loads the plugin
  the way ComfyUI's own loader does; ``plugin`` gives the plugin's submodules as loaded there.
* a real server (``comfy_server`` in tests/server_harness.py): ``main.py --cpu`` on a free
  loopback port, driven over HTTP like a user's browser.

Tests of core/ and training/ need neither: they import those packages with ComfyUI absent.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# One compute thread per process, here and in every server / torchrun process the tests start: the
# models are tiny, scripts/test.sh runs one test worker per core (pytest-xdist), each with its own
# server, and a torch thread pool on a busy core spin-waits.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Appended, not prepended: ComfyUI's root must win for its top-level ``nodes``/``utils``.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from scripts.plugin_package import load as _load_package  # noqa: E402

_load_package()  # core/ and training/ as the package 'comfyui_add', without ComfyUI (scripts/plugin_package.py)

# tests/ has no __init__.py (the repo root is the plugin package, which imports ComfyUI):
# pytest puts tests/ on sys.path, so the harness is a top-level module here.
pytest_plugins = ["server_harness"]

# Files a passing test wrote into a ComfyUI home's output/ that are at least this long are deleted
# when it ends (tests/scratch.py says why); a failing test's stay for a look.
LARGE_OUTPUT = 1 << 20
_OUTCOMES = pytest.StashKey[dict]()  # {'setup' / 'call' / 'teardown': passed} of the running test


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    item.stash.setdefault(_OUTCOMES, {})[report.when] = report.passed
    return report


@pytest.fixture(autouse=True)
def _give_back_output_disk(request, tmp_path_factory):
    from scratch import new_large_files

    start = time.time() - 1.0  # file times can trail the clock by a tick
    yield
    if all(request.node.stash.get(_OUTCOMES, {}).values()):
        for path in new_large_files(tmp_path_factory.getbasetemp(), start, LARGE_OUTPUT):
            path.unlink()


@pytest.fixture(scope="session")
def comfy_home(tmp_path_factory) -> Path:
    """A throw-away ComfyUI base directory (models/, output/, input/, user/)."""
    return tmp_path_factory.mktemp("comfy_home")


@pytest.fixture(scope="session")
def comfy(comfy_home):
    """ComfyUI's ``nodes`` module, imported in this process with the plugin loaded."""
    from scripts.comfy_host import import_comfy

    return import_comfy(base_directory=comfy_home)


@pytest.fixture(scope="session")
def host_nodes(comfy):
    """The same module as ``comfy`` (ComfyUI's ``nodes``), under a name that static checkers of
    ``comfy.*`` references (comfy-import-guard) do not read as the ``comfy`` package."""
    return comfy


@pytest.fixture(scope="session")
def plugin(comfy):
    """``plugin('core.schedules')`` → that submodule of the plugin as ComfyUI loaded it."""
    from scripts.comfy_host import plugin_module

    return plugin_module


@pytest.fixture(scope="session")
def tiny(comfy) -> dict[str, Path]:
    """Paths of the on-disk tiny models (built once, then cached under .cache/)."""
    from scripts.tiny_models import build_all

    return build_all()


@pytest.fixture(scope="session")
def sd15(comfy, tiny):
    """(model, clip, vae) of the tiny SD1.5 checkpoint, loaded by ComfyUI's own loader."""
    import comfy.sd

    out = comfy.sd.load_checkpoint_guess_config(str(tiny["tiny_sd15"]))
    return out[0], out[1], out[2]


@pytest.fixture(scope="session")
def sdxl(comfy):
    """A tiny SDXL ModelPatcher (in memory: detection pins SDXL's real depths)."""
    from scripts.tiny_models import sdxl_model_patcher

    return sdxl_model_patcher()


@pytest.fixture(scope="session")
def sd2v(comfy):
    """A tiny SD2-style v-prediction ModelPatcher."""
    from scripts.tiny_models import sd2_vpred_model_patcher

    return sd2_vpred_model_patcher()

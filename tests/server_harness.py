"""A real ComfyUI server for tests: ``main.py --cpu`` (on the GPU with COMFYUI_ADD_DEVICE=cuda) on a free loopback port.

``comfy_server`` (session scope) starts it once with a throw-away base directory holding the
plugin link and the tiny models; ``comfy_server.run(api_prompt)`` (scripts/comfy_client.py) queues a
prompt over HTTP, waits for it and returns its history entry (outputs, status, errors).
"""
from __future__ import annotations

import shutil

import pytest

from scripts.comfy_host import ROOT
from scripts.comfy_server import ComfyServer, link_models, running_server  # noqa: F401 (used by tests)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny):
    """A running ComfyUI server with the plugin and the tiny models (session scope)."""
    from scripts.demo_models import prepare

    home = tmp_path_factory.mktemp("server_home")
    link_models(home, tiny)
    # Stand-ins for the real names the shipped workflows use (sd_turbo.safetensors, ...).
    # img2img inputs at 128 px: the tiny UNet has the real width, and a 512 px image costs minutes on a CPU
    prepare([], home / "models", home / "input", extra=tuple((ROOT / "tests" / "data").glob("*_ui.json")),
            image_size=128)
    with running_server(home) as srv:
        yield srv
    shutil.rmtree(home)

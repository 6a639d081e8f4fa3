"""A real ComfyUI server on this machine: ``main.py`` on a free loopback port.

Used by the test harness (tests/server_harness.py) and the picture script (scripts/thumbnails.py).
``ComfyServer(home, log)`` starts the host found by scripts/comfy_host.py with ``home`` as its base
directory (models/, input/, output/, user/, custom_nodes/ with a link to this plugin). It runs on
the CPU (``--cpu``) unless told otherwise or the environment variable ``COMFYUI_ADD_DEVICE`` is
``cuda``, the same rule as the in-process host (scripts/comfy_host.py ``import_comfy``).

The page is the front end the host has installed (its pinned ``comfyui-frontend-package``), or the
one in the folder named by the environment variable ``COMFYUI_FRONT_END_ROOT`` (ComfyUI's
``--front-end-root``: the ``static`` folder of another ``comfyui-frontend-package`` version), which is
how the browser tests are run on a newer front end than the host pins.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from scripts.comfy_client import ComfyClient
from scripts.comfy_host import PLUGIN_LINK_NAME, ROOT, free_port, host_path


def link_models(home: Path, tiny: dict[str, Path]) -> None:
    """Put the tiny models where ComfyUI's folder paths look (symlinks, no copies)."""
    from scripts.tiny_models import CACHE

    for name, path in tiny.items():
        rel = Path(path).relative_to(CACHE)
        dst = home / "models" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            dst.symlink_to(path)


class ComfyServer(ComfyClient):
    def __init__(self, home: Path, log_path: Path, cpu: bool | None = None):
        self.home = home
        self.cpu = os.environ.get("COMFYUI_ADD_DEVICE", "cpu") != "cuda" if cpu is None else cpu
        self.port = free_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
        self.log_path = log_path
        (home / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = home / "custom_nodes" / PLUGIN_LINK_NAME
        if not link.exists():
            link.symlink_to(ROOT)
        cmd = [
            sys.executable, "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1",
            "--port", str(self.port), "--base-directory", str(home), "--database-url", "sqlite:///:memory:",
            "--disable-auto-launch",
        ]
        front_end = os.environ.get("COMFYUI_FRONT_END_ROOT")
        if front_end:
            if not (Path(front_end) / "index.html").is_file():
                raise FileNotFoundError(f"COMFYUI_FRONT_END_ROOT={front_end} has no index.html: point it at the "
                                        "'static' folder of an unpacked comfyui-frontend-package")
            cmd += ["--front-end-root", str(front_end)]
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=host_path(), stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        self._log.flush()
        return Path(self.log_path).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@contextlib.contextmanager
def running_server(home: Path, cpu: bool | None = None):
    """A ComfyServer on ``home`` once it answers; stopped on exit."""
    srv = ComfyServer(home, home / "server.log", cpu=cpu)
    try:
        srv.wait_ready(srv.proc, timeout=180, log_tail=lambda: srv.log()[-4000:])
        yield srv
    finally:
        srv.stop()

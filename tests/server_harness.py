"""A real ComfyUI server for tests: ``main.py --cpu`` on a free loopback port.

``comfy_server`` (session scope) starts it once with a throw-away base directory holding the
plugin link and the tiny models; ``comfy_server.run(api_prompt)`` queues a prompt over HTTP,
waits for it and returns its history entry (outputs, status, errors).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

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


class ComfyServer:
    def __init__(self, home: Path, log_path: Path):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.client_id = uuid.uuid4().hex
        (home / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = home / "custom_nodes" / PLUGIN_LINK_NAME
        if not link.exists():
            link.symlink_to(ROOT)
        cmd = [
            sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(home), "--database-url", "sqlite:///:memory:",
            "--disable-auto-launch",
        ]
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=host_path(), stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        self._log.flush()
        return Path(self.log_path).read_text(errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, data: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
                return json.loads(body) if body else {}
        except urllib.error.HTTPError as e:
            return {"http_status": e.code, **json.loads(e.read() or b"{}")}

    def queue(self, prompt: dict) -> dict:
        """POST /prompt; returns the server's answer (prompt_id, or the validation errors)."""
        return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue and wait; returns the history entry. Raises with the errors if it was refused."""
        ans = self.queue(prompt)
        if "prompt_id" not in ans:
            raise RuntimeError(f"prompt refused: {json.dumps(ans, indent=1)[:4000]}")
        pid = ans["prompt_id"]
        end = time.time() + timeout
        while time.time() < end:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                st = hist[pid]["status"]
                if st.get("status_str") in ("success", "error"):
                    return hist[pid]
            time.sleep(0.2)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny):
    """A running ComfyUI server with the plugin and the tiny models (session scope)."""
    from scripts.demo_models import prepare

    home = tmp_path_factory.mktemp("server_home")
    link_models(home, tiny)
    # Stand-ins for the real names the shipped workflows use (sd_turbo.safetensors, ...).
    prepare([], home / "models", home / "input", extra=tuple((ROOT / "tests" / "data").glob("*_ui.json")))
    srv = ComfyServer(home, home / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()

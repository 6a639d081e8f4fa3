"""A minimal client for a ComfyUI server this project started on the loopback interface.

Shared by the headless runner (scripts/run.py) and the test harness (tests/server_harness.py):
POST /prompt, poll GET /history/<id>, read /object_info. It only ever talks to the local server.
"""
from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class ComfyClient:
    def __init__(self, url: str):
        host = urllib.parse.urlsplit(url).hostname
        if host not in LOOPBACK:
            raise ValueError(f"{url}: this client only talks to a ComfyUI server on this machine (127.0.0.1, localhost or ::1)")
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read()

    def post(self, path: str, data: dict) -> dict:
        """POST JSON; an HTTP error comes back as its JSON body plus ``http_status``."""
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
                return json.loads(body) if body else {}
        except urllib.error.HTTPError as e:
            return {"http_status": e.code, **json.loads(e.read() or b"{}")}

    def wait_ready(self, proc: subprocess.Popen, timeout: float = 300, log_tail=lambda: "") -> None:
        """Wait until the server answers; raise (with the log's tail) if it exits or never does."""
        end = time.time() + timeout
        while time.time() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {proc.returncode} before it was ready:\n{log_tail()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer at {self.url} within {timeout:.0f} s:\n{log_tail()}")

    def queue(self, prompt: dict) -> dict:
        """POST /prompt; returns the server's answer (prompt_id, or the validation errors)."""
        return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue and wait; returns the history entry (status success or error).

        Raises RuntimeError with the server's validation errors if the prompt is refused.
        """
        ans = self.queue(prompt)
        if "prompt_id" not in ans:
            raise RuntimeError(f"prompt refused: {json.dumps(ans, indent=1)[:4000]}")
        pid = ans["prompt_id"]
        end = time.time() + timeout
        while time.time() < end:
            hist = self.get(f"/history/{pid}").get(pid)
            if hist and hist.get("status", {}).get("status_str") in ("success", "error"):
                return hist
            time.sleep(0.2)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout:.0f} s")

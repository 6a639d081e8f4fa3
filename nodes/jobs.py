"""Background training jobs: the registry, the job thread, the HTTP routes and the page events.

State: ``REGISTRY``, every job of this ComfyUI session. Importing this module makes it and, when
ComfyUI's PromptServer exists, adds the routes below to that server and points the registry's
events and queue check at it (``_attach_server``). The plugin's other state that outlives a
prompt (stream states, fast-path graphs, TinyVAE copies) is listed in its __init__.py.

A job runs a :class:`training.run.ADDRun` on its own thread:

- one job trains at a time (others wait in state ``queued``); the training modules are private
  (never registered with model management, so a foreground load or ``/free`` cannot unload them
  mid-step; their memory is ordinary device memory that ComfyUI's free-memory checks see);
- **polite** (default): between steps the job waits while ComfyUI's prompt queue has work
  (state ``paused``) and continues when it is idle; ``alongside`` never waits;
- its own stop event (``POST /add/jobs/{id}/cancel``): ComfyUI's global Cancel never reaches it and
  it never clears the user's interrupt flag (no ProgressBar, no interrupt checks in its thread);
- progress, losses and previews go to the page as ``add.job`` events (PromptServer.send_sync).

Routes (served plain and under /api by ComfyUI): ``GET /add/jobs``, ``GET /add/jobs/{id}``,
``GET /add/jobs/{id}/preview.png``, ``POST /add/jobs/{id}/cancel``. Ids are 12 hex digits made
here; anything else is a 404 with a JSON error, and nothing from a request reaches a file path.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import re
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..adapters import comfy_internals as internals
from ..core.errors import ADDError

log = logging.getLogger("comfyui-add")

STATES = ("queued", "running", "paused", "done", "cancelled", "failed")
_ID_RE = re.compile(r"^[0-9a-f]{12}$")
_HISTORY_MAX = 400  # loss points kept per job (older ones are thinned 2:1)
_EVENT_MIN_INTERVAL = 0.25  # seconds between progress events of one job


@dataclass
class Job:
    """One training job's public state (what routes and events report) plus its control."""

    name: str
    max_steps: int
    lora_path: str
    state_dir: str
    mode: str = "polite"  # 'polite' | 'alongside'
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = "queued"
    step: int = 0
    start_step: int = 0
    losses: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # [{'step', 'd_loss', 'g_loss', 'adv', 'distill'}, ...]
    it_s: float | None = None
    eta_s: float | None = None
    last_checkpoint_step: int | None = None
    settings: dict = field(default_factory=dict)  # what it was started with (a same-name queue must match)
    error: str | None = None
    message: str = ""
    created: float = field(default_factory=time.time)
    preview_step: int | None = None
    preview_png: bytes | None = None
    preview_image: torch.Tensor | None = None  # (P, H, W, 3) in [0, 1], ComfyUI IMAGE layout
    stop_event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    _last_event: float = 0.0

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running", "paused")

    def to_json(self, history: bool = True) -> dict[str, Any]:
        """The job's public state; non-finite numbers (a NaN loss) become None, so it is valid JSON."""
        return json_safe(self._fields(history))

    def _fields(self, history: bool) -> dict[str, Any]:
        out = {"id": self.id, "name": self.name, "state": self.state, "mode": self.mode, "step": self.step,
               "start_step": self.start_step, "max_steps": self.max_steps, "losses": self.losses,
               "it_s": self.it_s, "eta_s": self.eta_s, "lora_path": self.lora_path,
               "last_checkpoint_step": self.last_checkpoint_step, "error": self.error, "message": self.message,
               "preview_step": self.preview_step, "created": self.created}
        if history:
            out["history"] = self.history
        return out

    def add_history(self, step: int, logs: dict) -> None:
        point = {"step": step, **{k: round(float(logs[k]), 6) for k in ("d_loss", "g_loss", "adv", "distill")
                                  if k in logs}}
        self.history.append(point)
        if len(self.history) > _HISTORY_MAX:
            self.history = self.history[::2]


class JobRegistry:
    """All jobs of this ComfyUI session, by id; one trains at a time."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.device_lock = threading.Lock()  # held by the job that is training
        self.notify: Callable[[Job], None] = lambda job: None  # set when a PromptServer exists
        self.busy: Callable[[], bool] = lambda: False  # True while the prompt queue has work

    def get(self, job_id: str) -> Job | None:
        if not isinstance(job_id, str) or not _ID_RE.match(job_id):
            return None
        return self.jobs.get(job_id)

    def active_for(self, lora_path: str) -> Job | None:
        with self._lock:
            return next((j for j in self.jobs.values() if j.active and j.lora_path == lora_path), None)

    def all(self) -> list[Job]:
        return sorted(self.jobs.values(), key=lambda j: j.created)

    def add(self, job: Job) -> Job:
        """Register a job that needs no thread (e.g. a run already trained to max_steps)."""
        with self._lock:
            self.jobs[job.id] = job
        self.emit(job, force=True)
        return job

    def start(self, job: Job, body: Callable[[Job], None]) -> Job:
        """Register ``job`` and run ``body(job)`` on its own daemon thread (after the device lock)."""
        with self._lock:
            self.jobs[job.id] = job
        job.thread = threading.Thread(target=self._run, args=(job, body), name=f"add-train-{job.id}", daemon=True)
        job.thread.start()
        self.emit(job, force=True)
        return job

    def cancel(self, job: Job) -> None:
        job.stop_event.set()
        if job.state == "queued":
            job.message = "cancelling before it started"
        self.emit(job, force=True)

    def emit(self, job: Job, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - job._last_event < _EVENT_MIN_INTERVAL:
            return
        job._last_event = now
        self.notify(job)

    def wait_if_busy(self, job: Job) -> float:
        """Polite mode: block while the prompt queue has work (state 'paused'); -> seconds waited."""
        if job.mode != "polite" or not self.busy():
            return 0.0
        t0 = time.monotonic()
        job.state = "paused"
        job.message = "paused: ComfyUI is running a prompt; continues when the queue is idle"
        self.emit(job, force=True)
        while self.busy() and not job.stop_event.is_set():
            time.sleep(0.1)
        job.state, job.message = "running", ""
        self.emit(job, force=True)
        return time.monotonic() - t0

    def _run(self, job: Job, body: Callable[[Job], None]) -> None:
        with self.device_lock:
            if job.stop_event.is_set():
                job.state, job.message = "cancelled", "cancelled before it started"
                self.emit(job, force=True)
                return
            job.state = "running"
            self.emit(job, force=True)
            failed = False
            try:
                body(job)
            except torch.OutOfMemoryError as exc:
                failed = True
                job.error = (f"Out of memory at step {job.step} ({str(exc).splitlines()[0]}). The last checkpoint "
                             f"(step {job.last_checkpoint_step}) is intact. Lower batch_size or width/height, turn on "
                             "gradient_checkpointing, or free memory, then queue the same name to resume.")
            except Exception as exc:  # the job fails visibly; the server keeps serving
                failed = True
                job.error = str(exc) if isinstance(exc, ADDError) else f"{type(exc).__name__}: {exc}"
                log.error("ADD training job %s (%s) failed:\n%s", job.id, job.name, traceback.format_exc())
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            if failed or job.state == "failed":
                ckpt = job.last_checkpoint_step
                job.message = (f"failed; resume from step {ckpt} by queuing the same name" if ckpt is not None
                               else "failed before the first checkpoint")
                job.state = "failed"  # last: a reader that sees 'failed' sees its error and message too
            self.emit(job, force=True)


REGISTRY = JobRegistry()


def json_safe(value: Any) -> Any:
    """``value`` with every NaN / inf float replaced by None (JSON has no such numbers: a page's
    ``JSON.parse`` rejects the bare ``NaN`` Python's json writes by default)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# Every JSON the plugin serves goes through this: strict (a non-finite number raises here instead of
# reaching a browser as invalid JSON).
strict_dumps = functools.partial(json.dumps, allow_nan=False)




# --------------------------------------------------------------------------------------------
# ComfyUI server: events, queue state, routes (registered once, only when a server exists)
# --------------------------------------------------------------------------------------------
def _attach_server() -> None:
    srv = internals.prompt_server()
    if srv is None:  # imported without ComfyUI's server (tests of the node layer in-process)
        return
    from aiohttp import web

    REGISTRY.notify = lambda job: srv.send_sync("add.job", job.to_json(history=False))
    REGISTRY.busy = lambda: internals.tasks_remaining(srv) > 0
    routes = srv.routes

    def respond(data: Any, status: int = 200):
        return web.json_response(data, status=status, dumps=strict_dumps)

    def _missing(job_id: str):
        shown = job_id if len(job_id) <= 40 else job_id[:40] + f"... ({len(job_id)} characters)"
        return respond({"error": f"no ADD training job with id {shown!r} in this ComfyUI session (ids are 12 "
                                 "hex digits; GET /add/jobs lists them)"}, status=404)

    @routes.get("/add/jobs")
    async def list_jobs(request):
        return respond({"jobs": [j.to_json(history=False) for j in REGISTRY.all()]})

    @routes.get("/add/jobs/{job_id}")
    async def get_job(request):
        job = REGISTRY.get(request.match_info["job_id"])
        return respond(job.to_json()) if job else _missing(request.match_info["job_id"])

    @routes.get("/add/jobs/{job_id}/preview.png")
    async def get_preview(request):
        job = REGISTRY.get(request.match_info["job_id"])
        if job is None:
            return _missing(request.match_info["job_id"])
        if job.preview_png is None:
            return respond({"error": "no preview yet"}, status=404)
        return web.Response(body=job.preview_png, content_type="image/png",
                            headers={"Cache-Control": "no-store"})

    @routes.post("/add/jobs/{job_id}/cancel")
    async def cancel_job(request):
        job = REGISTRY.get(request.match_info["job_id"])
        if job is None:
            return _missing(request.match_info["job_id"])
        REGISTRY.cancel(job)
        return respond(job.to_json(history=False))


_attach_server()

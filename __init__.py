"""ComfyUI-ADD: Adversarial Diffusion Distillation (arXiv 2311.17042) for ComfyUI.

At import: the node modules are imported (nodes/__init__.py lists them; ComfyUI then calls
``comfy_entrypoint``, which hands it the node classes as one ``ComfyExtension``), the web folder is
declared, and nodes/jobs.py (imported by nodes/train.py) makes the empty training-job
registry and, when ComfyUI's PromptServer exists, adds the job routes to it (GET /add/jobs,
GET /add/jobs/{id}, GET /add/jobs/{id}/preview.png, POST /add/jobs/{id}/cancel) and points the
registry's page events and queue check at it. No model or file is read or written and no thread
is started at import (building the node schemas only lists the model folders a file choice offers).

State that outlives a prompt (for the life of the ComfyUI process unless said otherwise):
- nodes/jobs.py ``REGISTRY``: every training job of the session (its thread while it runs, its
  progress, loss history and last preview) and the routes above;
- nodes/stream.py ``_STATES``: the live-mode stream states (prompt embeddings on the device, frames
  in flight, the filter's last frame, the last output), at most 16, dropped when their model is
  collected or unloaded;
- nodes/fast_path.py: each ADD Fast Path's runner, held by the wrapper on the MODEL the node returns
  for as long as that model lives: its CUDA graphs (dropped when ComfyUI unloads the model) or its
  compiled UNet (torch.compile's own caches are torch's, process-wide); and ``_told_cpu``, the
  modes whose "off on the CPU" line was already logged;
- nodes/tiny_vae.py: converted TAESD copies (another dtype, or channels-last on the CPU) kept on the
  VAE object as ``_add_tiny_runners``, for as long as that VAE lives;
- core/schedules.py: ``lcm_timesteps``, a memo of constant timestep tables.
"""
from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]

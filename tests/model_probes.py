"""Probes the tests put on a ComfyUI model (shared by the sampling and stream tests)."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def count_unet_calls(model):
    """Every forward of the diffusion model: records the batch size of each call."""
    calls = []
    h = model.model.diffusion_model.register_forward_pre_hook(lambda m, args, kw=None: calls.append(int(args[0].shape[0])))
    try:
        yield calls
    finally:
        h.remove()

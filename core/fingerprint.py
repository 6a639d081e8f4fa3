"""The one fingerprint of a base model's weights: recorded by ADD Train (``run.json``, the LoRA's
``add.base_fingerprint``) and by the merge/extract nodes, compared when a run resumes.

A short sha256 over a fixed sample of the weights (every n-th tensor by name, 16 in all, and the
first 4096 values of each), so a checkpoint of gigabytes is identified in milliseconds. The
sample is part of the saved runs' identity: changing it makes every saved run look like another
base model. Pure torch: no ComfyUI import.
"""
from __future__ import annotations

import hashlib
from typing import Mapping

import torch


def sampled_fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """16 hex digits identifying ``weights`` (name -> tensor) by the names and first values of every
    n-th tensor in name order (n = count // 16)."""
    h = hashlib.sha256()
    for k in sorted(weights)[:: max(1, len(weights) // 16)]:
        h.update(k.encode())
        h.update(weights[k].detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]

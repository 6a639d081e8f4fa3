"""Data-parallel ADD training on ``torch.distributed`` (launched by torchrun; gloo on CPUs, NCCL on GPUs).

Pure PyTorch. What is parallel and how:

* Data streams. Every step draws ``data_streams`` sub-batches of ``cfg.batch_size``; stream ``r``
  of step ``k`` uses a generator seeded from ``stream_seed(cfg.seed, k, r)`` for its data and all
  of its noise, a pure function of (seed, step, stream) (nanoGPT's ``get_lr(step)`` idea applied
  to randomness). Global batch = ``batch_size * data_streams``. With W ranks each rank runs
  ``data_streams / W`` streams, accumulating their gradients, so the same run continues exactly on
  another number of ranks as long as W divides the stream count; the checkpoint records the count
  (``meta.json: data_streams``) and nothing else is needed to continue the streams.
* Gradients. After the local backward passes, the gradients of the trainable tensors (LoRA
  adapters, discriminator heads) are averaged over the ranks with one flat ``all_reduce``, then
  clipped and stepped identically on every rank, so the replicas stay equal. This is what
  ``DistributedDataParallel`` does for a module; DDP itself is not used because an ADD iteration
  runs the discriminator twice per phase, toggles the heads' ``requires_grad`` between the D and
  G phases and reaches the student's adapters only through hooks on a frozen network, which DDP's
  reducer (one forward -> one backward per module) does not support without
  ``find_unused_parameters`` and static-graph workarounds. The frozen teacher and feature network
  are replicated and never take part in a reduction.
* A non-finite loss on any rank turns that rank's gradients into NaN before the reduction, so
  every rank sees the same non-finite result and skips the same update (no rank waits alone).
* Files. Rank 0 alone writes (atomically, see checkpoint.py); the others wait at a barrier.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


def stream_seed(seed: int, step: int, stream: int) -> int:
    """Seed of data stream ``stream`` at iteration ``step`` of a run seeded ``seed`` (63-bit)."""
    digest = hashlib.blake2b(f"add-stream/{seed}/{step}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def local_streams(data_streams: int, rank: int, world_size: int) -> list[int]:
    """The streams rank ``rank`` of ``world_size`` runs: a contiguous block of ``data_streams / world_size``."""
    if data_streams < 1 or data_streams % world_size:
        raise ValueError(f"data_streams {data_streams} cannot be shared by {world_size} ranks: use a multiple of "
                         f"the number of ranks (e.g. {world_size * max(1, round(data_streams / world_size))}).")
    per = data_streams // world_size
    return list(range(rank * per, (rank + 1) * per))


def resolve_streams(saved: int | None, requested: int | None, world_size: int) -> tuple[int, str]:
    """How many data streams a (re)started run uses -> (count, note for the user; '' when nothing changed).

    ``saved``: the count in the checkpoint (None for a new run). ``requested``: the user's setting
    (None = automatic). Automatic keeps the saved count when the ranks divide it (the run continues
    exactly), otherwise uses one stream per rank (the global batch changes; the note says so).
    """
    if requested is not None:
        local_streams(requested, 0, world_size)  # raises with the fix when the ranks cannot share it
        if saved is not None and saved != requested:
            return requested, (f"data_streams changed from {saved} to {requested}: the global batch is now "
                               f"batch_size x {requested}.")
        return requested, ""
    if saved is None:
        return world_size, ""
    if saved % world_size == 0:
        return saved, ""
    return world_size, (f"the run was saved with {saved} data streams, which {world_size} ranks cannot share; it "
                        f"continues with {world_size} (one per rank), so the global batch is now batch_size x "
                        f"{world_size} instead of batch_size x {saved}. Set data_streams to a multiple of the ranks "
                        "to choose otherwise.")


@dataclass
class Dist:
    """This process's place in a data-parallel group (``world_size == 1``: no communication at all)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    @torch.no_grad()
    def average_grads_(self, params: Sequence[Tensor]) -> None:
        """Average ``p.grad`` over the ranks in place (missing gradients count as zeros), one flat all_reduce."""
        if not self.active or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n

    @torch.no_grad()
    def broadcast_(self, tensors: Sequence[Tensor]) -> None:
        """Copy rank 0's values of ``tensors`` to every rank (start of a run: identical replicas)."""
        if not self.active:
            return
        for t in tensors:
            torch.distributed.broadcast(t.data, src=0)

    @torch.no_grad()
    def mean_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """The ranks' mean of each logged number (same keys on every rank)."""
        if not self.active or not logs:
            return logs
        keys = sorted(k for k, v in logs.items() if isinstance(v, (int, float)))
        vals = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(vals)
        vals /= self.world_size
        return {**logs, **{k: float(v) for k, v in zip(keys, vals.tolist())}}


def from_env() -> Dist:
    """The group torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK (a single process without them)."""
    return Dist(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def init_process_group(dist: Dist, device: torch.device, timeout_s: float = 1800.0) -> None:
    """Join the group torchrun set up: NCCL for CUDA devices, gloo otherwise. No-op for one process."""
    if dist.world_size <= 1 or torch.distributed.is_initialized():
        return
    from datetime import timedelta

    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if backend == "nccl" else {}
    torch.distributed.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)


def destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

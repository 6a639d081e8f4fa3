"""A LoRA from a weight difference: per-layer truncated SVD of dW = W_tuned - W_base, with its error.

Pure PyTorch (no ComfyUI import). Used by ADD Extract LoRA (two ComfyUI models) and by full-weight
ADD training (the fine-tuned student against its frozen teacher), so both write the same format:

- 2-D / 4-D dW (Linear, Conv weights): rank-r truncated SVD, optimal in the Frobenius norm
  (Eckart-Young): ``<module>.lora_up.weight`` = U_r S_r (out, r[, 1, 1]), ``.lora_down.weight`` =
  V_r^T (r, in[, k, k]), ``.alpha`` = r (scale 1);
- 1-D dW (biases, norms) stored exactly as ``<module>.diff`` / ``<module>.diff_b``;
- zero dW is skipped.

These are ComfyUI's own LoRA keys (``diffusion_model.<module>...``), read by core Load LoRA, ADD
LoRA Merge and ADD KSampler. The error of each low-rank layer is measured on the stored (rounded)
factors: ``||dW - up @ down||_F / ||dW||_F``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor

from ..core.errors import ADDError
@dataclass
class ExtractReport:
    """What an extraction kept and lost. Errors are relative Frobenius errors (0 = exact)."""

    requested_rank: int
    rank: int = 0  # the widest rank actually stored (a layer narrower than requested keeps its full width)
    errors: dict[str, float] = field(default_factory=dict)  # weight key -> error of its low-rank layer
    overall: float = 0.0  # sqrt(sum ||dW - up down||^2 / sum ||dW||^2) over every stored tensor
    exact_diffs: int = 0  # 1-D tensors stored exactly

    @property
    def mean(self) -> float:
        """Mean per-layer error of the low-rank layers (0 when there are none)."""
        return sum(self.errors.values()) / len(self.errors) if self.errors else 0.0

    @property
    def worst(self) -> tuple[str, float]:
        """(weight key, error) of the worst low-rank layer; ('', 0.0) when there are none."""
        return max(self.errors.items(), key=lambda kv: kv[1]) if self.errors else ("", 0.0)

    def metadata(self) -> dict[str, str]:
        """Safetensors metadata entries describing the extraction."""
        key, err = self.worst
        return {"add.rank": str(self.rank), "add.requested_rank": str(self.requested_rank),
                "add.relative_error": f"{self.overall:.6g}", "add.mean_layer_error": f"{self.mean:.6g}",
                "add.worst_layer": f"{key}={err:.6g}" if key else ""}

    def summary(self) -> str:
        """One line for logs and job status."""
        key, err = self.worst
        return (f"rank {self.rank} LoRA of {len(self.errors)} layers (+{self.exact_diffs} exact 1-D diffs): relative "
                f"error overall {self.overall:.3g}, per layer mean {self.mean:.3g}, worst {err:.3g}"
                + (f" ({key})" if key else ""))


def low_rank(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(up (out, r), down (r, in*k*k)) in fp32 with up @ down the best rank-r approximation of
    ``delta`` flattened to (out, in*k*k); r = min(rank, *shape)."""
    mat = delta.flatten(1).float()
    r = min(rank, *mat.shape)
    if 3 * r < min(mat.shape):  # randomized SVD (Halko et al. 2011): much faster; the error is measured after
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):  # deterministic; every global RNG is left as it was
            torch.manual_seed(0)
            U, S, V = torch.svd_lowrank(mat, q=min(r + 16, min(mat.shape)), niter=4)
        Vh = V.T
    else:
        U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
    return U[:, :r] * S[:r], Vh[:r]


@torch.no_grad()
def extract_lora(pairs: Iterable[tuple[str, Tensor, Tensor]], rank: int, dtype: torch.dtype = torch.float16,
                 tick: Callable[[], None] | None = None) -> tuple[dict[str, Tensor], ExtractReport]:
    """LoRA state dict (CPU tensors in ``dtype``) and report from ``(weight key, W_tuned, W_base)``.

    Keys are weight names such as ``diffusion_model.input_blocks.1.1.proj_in.weight``; each pair is
    used once and may be produced lazily (one layer in memory at a time). ``tick()`` is called once
    per pair (progress, cancellation).
    """
    if rank < 1:
        raise ADDError(f"extract_lora: rank must be >= 1, got {rank}.")
    out: dict[str, Tensor] = {}
    report = ExtractReport(requested_rank=rank)
    num = den = 0.0
    for key, tuned, base in pairs:
        if tick is not None:
            tick()
        if tuned.shape != base.shape:
            raise ValueError(f"extract_lora: {key} has shape {tuple(tuned.shape)} in the tuned weights and "
                             f"{tuple(base.shape)} in the base: they are not the same architecture.")
        d = tuned.float() - base.float()
        dn = float(d.norm())
        if dn == 0.0:
            continue
        mod, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        if d.ndim < 2:
            stored = d.to(dtype)
            out[f"{mod}.diff" if leaf == "weight" else f"{mod}.diff_b"] = stored.cpu()
            num += float((d - stored.float()).norm()) ** 2
            den += dn ** 2
            report.exact_diffs += 1
            continue
        if leaf != "weight":
            continue
        up, down = low_rank(d, rank)
        up, down = up.to(dtype), down.to(dtype)
        r = int(up.shape[1])
        e = float((d.flatten(1) - up.float() @ down.float()).norm())
        report.errors[key] = e / dn
        report.rank = max(report.rank, r)
        num += e ** 2
        den += dn ** 2
        out[f"{mod}.lora_up.weight"] = up.reshape((d.shape[0], r) + (1,) * (d.ndim - 2)).contiguous().cpu()
        out[f"{mod}.lora_down.weight"] = down.reshape((r,) + tuple(d.shape[1:])).contiguous().cpu()
        out[f"{mod}.alpha"] = torch.tensor(float(r))
    report.overall = (num / den) ** 0.5 if den > 0 else 0.0
    return out, report

"""Former home of the LoRA nodes, kept only as an alias for nodes/train_adapter.py (``from . import lora``).

The nodes now live one per file: ADD LoRA Merge in nodes/lora_merge.py, ADD Save Turbo Checkpoint
in nodes/turbo_checkpoint.py, ADD Extract LoRA in nodes/lora_extract.py; LoRA matching and input
checks in nodes/lora_match.py; fused copies and fingerprints in nodes/patched_weights.py.
Delete this file once nodes/train_adapter.py imports nodes/patched_weights.py directly.
"""
from .patched_weights import _fingerprint, _fused_module

__all__ = ["_fingerprint", "_fused_module"]

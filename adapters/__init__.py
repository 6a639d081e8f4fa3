"""ComfyUI objects -> what the pure-torch training core needs; shared by the nodes and the headless trainer.

- ``model.py``: a ComfyUI MODEL/CLIP as plain torch pieces (the frozen copy, the denoiser, the prompt
  bank, module names for LoRA, features and checkpointing, memory);
- ``run_setup.py``: a checked ``training.setup.RunRequest`` + ComfyUI objects -> ``training.run.RunSpec``
  (the one place a run is assembled);
- ``patched_weights.py``: a ModelPatcher's weights with its patches applied (fused copy, per-layer
  weights, fingerprint);
- ``comfy_internals.py``: every read of a ComfyUI private field or internal structure, behind small
  named functions; ``nodes/`` and the rest of ``adapters/`` call those instead (tests/test_comfy_internals.py
  checks both the functions against the host and that nothing else reads such a name).

Imports ComfyUI, ``training/`` and ``core/``; never ``nodes/`` (the headless trainer imports this
package without the node classes). Importing the package is free.
"""

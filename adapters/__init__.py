"""ComfyUI objects -> what the pure-torch training core needs; shared by the nodes and the headless trainer.

- ``model.py``: a ComfyUI MODEL/CLIP as plain torch pieces (the frozen copy, the denoiser, the prompt
  bank, module names for LoRA, features and checkpointing, memory);
- ``run_setup.py``: a checked ``training.setup.RunRequest`` + ComfyUI objects -> ``training.run.RunSpec``
  (the one place a run is assembled).

Imports ComfyUI, ``training/`` and ``core/``; never ``nodes/`` (the headless trainer imports this
package without the node classes). Importing the package is free.
"""

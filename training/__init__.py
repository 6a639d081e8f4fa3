"""ADD training core in pure PyTorch (Sauer et al., "Adversarial Diffusion Distillation", arXiv 2311.17042).

Nothing here imports ComfyUI; the node layer adapts ComfyUI models to the callables used here.
Importing this package is free: submodules are imported explicitly by their users, e.g.
``from ..training.config import ADDConfig`` in ``nodes/``. Inside this package every import is
relative, so it lives only under the plugin's own package name in ComfyUI's process: no top-level
``training`` module that could collide with another custom node's.
"""

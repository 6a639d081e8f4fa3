"""ADD training core in pure PyTorch (Sauer et al., "Adversarial Diffusion Distillation", arXiv 2311.17042).

Nothing here imports ComfyUI; the node layer adapts ComfyUI models to the callables used here.
Importing this package is free: submodules are imported explicitly by their users, e.g.
``from training.config import ADDConfig``.
"""

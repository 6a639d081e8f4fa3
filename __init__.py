"""ComfyUI-ADD: Adversarial Diffusion Distillation (arXiv 2311.17042) for ComfyUI.

Registers the nodes and the web folder; nothing else happens at import.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

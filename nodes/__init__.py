"""The plugin's ComfyUI nodes (V1 API): one module per concept, merged here.

Importing this imports every node module; the only one with an effect beyond defining things is
nodes/jobs.py (through train.py), which adds its HTTP routes to ComfyUI's server when one exists.
What holds state across prompts is listed in the plugin's __init__.py.
"""
from importlib import import_module

# One entry per node module; each exports NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS.
_MODULES: tuple[str, ...] = (
    "lora_merge",
    "turbo_checkpoint",
    "lora_extract",
    "tiny_vae",
    "sampling",
    "stream",
    "train",
    "compare",
    "fast_path",
)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _name in _MODULES:
    _mod = import_module(f".{_name}", __name__)
    NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)

"""The plugin's ComfyUI nodes (V1 API): one module per concept, merged here."""
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

"""The plugin's ComfyUI nodes, written to ComfyUI's versioned node API (``comfy_api.latest``:
``io.ComfyNode`` classes, handed to ComfyUI by one ``ComfyExtension``).

One module per concept; each lists its node classes in ``NODES``. ``comfy_entrypoint`` (re-exported
by the plugin's ``__init__.py``) is what ComfyUI's loader calls. ``NODE_CLASSES`` maps node id ->
class, for tests and scripts that call a node's ``execute`` directly.

Importing this imports every node module; the only one with an effect beyond defining things is
nodes/jobs.py (through train.py), which adds its HTTP routes to ComfyUI's server when one exists.
What holds state across prompts is listed in the plugin's __init__.py.
"""
from importlib import import_module

from comfy_api.latest import ComfyExtension

# The node modules, in the order their nodes are listed in ComfyUI's node library.
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

NODES: list = []
# TRANSITION (removed when every module is moved): modules still on the V1 API export mappings.
_V1_CLASSES: dict = {}
_V1_NAMES: dict = {}
for _name in _MODULES:
    _mod = import_module(f".{_name}", __name__)
    if hasattr(_mod, "NODES"):
        NODES.extend(_mod.NODES)
    else:
        _V1_CLASSES.update(_mod.NODE_CLASS_MAPPINGS)
        _V1_NAMES.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)
NODE_CLASSES: dict = {node.GET_SCHEMA().node_id: node for node in NODES} | _V1_CLASSES
NODE_CLASS_MAPPINGS = NODE_CLASSES
NODE_DISPLAY_NAME_MAPPINGS = {node.GET_SCHEMA().node_id: node.GET_SCHEMA().display_name for node in NODES} | _V1_NAMES


class ADDExtension(ComfyExtension):
    """ComfyUI-ADD's nodes, as one extension."""

    async def get_node_list(self) -> list:
        return list(NODES)


async def comfy_entrypoint() -> ADDExtension:
    """Called by ComfyUI's custom-node loader (comfy_api's replacement for NODE_CLASS_MAPPINGS)."""
    return ADDExtension()

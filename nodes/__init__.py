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

NODES: list = [node for name in _MODULES for node in import_module(f".{name}", __name__).NODES]
NODE_CLASSES: dict = {node.GET_SCHEMA().node_id: node for node in NODES}


class ADDExtension(ComfyExtension):
    """ComfyUI-ADD's nodes, as one extension."""

    async def get_node_list(self) -> list:
        return list(NODES)


async def comfy_entrypoint() -> ADDExtension:
    """Called by ComfyUI's custom-node loader (comfy_api's replacement for NODE_CLASS_MAPPINGS)."""
    return ADDExtension()

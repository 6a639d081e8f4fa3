"""Find the ComfyUI host and make it importable in this process.

Used by the tests, the benchmarks and the tiny-model builder; the plugin itself never imports
this module (inside ComfyUI the host is already there).

The host is, in order: ``$COMFYUI_PATH``; the path ``scripts/setup.sh`` recorded in
``.comfy_home/host_path``; ``.comfyui/`` in this checkout.
"""
from __future__ import annotations

import asyncio
import importlib
import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / ".comfy_home"
PLUGIN_LINK_NAME = "comfyui-add"


def host_path() -> Path:
    """The ComfyUI root folder (the one with main.py); raises with the fix when there is none."""
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]))
    recorded = HOME / "host_path"
    if recorded.is_file():
        candidates.append(Path(recorded.read_text().strip()))
    candidates.append(ROOT / ".comfyui")
    for c in candidates:
        if (c / "main.py").is_file() and (c / "comfy").is_dir():
            return c.resolve()
    raise RuntimeError(
        "No ComfyUI found (looked at $COMFYUI_PATH, .comfy_home/host_path, .comfyui/). "
        "Run `bash scripts/setup.sh`, or set COMFYUI_PATH to your ComfyUI folder."
    )


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_loaded = False
_plugin_loaded = False


def import_comfy(base_directory: str | os.PathLike | None = None, load_plugin: bool = True, cpu: bool | None = None,
                 extra_nodes: bool = True):
    """Import ComfyUI in this process and (optionally) load this plugin into it.

    ``cpu``: run ComfyUI on the CPU (its ``--cpu``). Default: True, unless the environment
    variable ``COMFYUI_ADD_DEVICE`` is ``cuda`` (how the benchmarks are pointed at a GPU).

    ComfyUI's root must come first on sys.path: its top-level ``nodes``/``utils`` modules would
    otherwise be shadowed by same-named packages elsewhere. Its modules are imported with the
    working directory at its root (a few of them read relative paths at import), then the old
    working directory is restored. ``extra_nodes=False`` skips ComfyUI's comfy_extras nodes (the
    headless trainer needs none of them). Idempotent.
    Returns ComfyUI's ``nodes`` module.
    """
    global _loaded, _plugin_loaded
    if _loaded:
        comfy_nodes = importlib.import_module("nodes")
        if load_plugin and not _plugin_loaded:
            _load_plugin(comfy_nodes, extra_nodes)
            _plugin_loaded = True
        return comfy_nodes
    root = host_path()
    sys.path.insert(0, str(root))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        import comfy.options

        comfy.options.enable_args_parsing(False)
        import comfy.cli_args

        if cpu is None:
            cpu = os.environ.get("COMFYUI_ADD_DEVICE", "cpu") != "cuda"
        comfy.cli_args.args.cpu = cpu
        if base_directory is not None:
            comfy.cli_args.args.base_directory = str(base_directory)
        import folder_paths  # noqa: F401  (reads args.base_directory at import)

        if (root / "utils" / "__init__.py").is_file():
            # ComfyUI's utils package, imported before nodes.py puts comfy/ (which has a utils.py)
            # first on sys.path, as its main.py does: else comfy_extras' nodes_images (server ->
            # utils.install_util) fails to import
            importlib.import_module("utils")
        import nodes as comfy_nodes

        if load_plugin:
            _load_plugin(comfy_nodes, extra_nodes)
            _plugin_loaded = True
    finally:
        os.chdir(cwd)
    _loaded = True
    return comfy_nodes


def _load_plugin(comfy_nodes, extra_nodes: bool = True) -> None:
    """Load this checkout as a custom node the way ComfyUI's loader does, and fail loudly."""
    # init_extra_nodes loads ComfyUI's own comfy_extras (SamplerCustom, ...); a few of them need
    # optional packages (torchaudio) and are skipped with a log line, as in a normal start.
    if extra_nodes:
        asyncio.run(comfy_nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    ok = asyncio.run(comfy_nodes.load_custom_node(str(ROOT), module_parent="custom_nodes"))
    if not ok:
        raise RuntimeError("The plugin failed to load into ComfyUI: see the traceback above.")


def plugin_module(name: str = ""):
    """A submodule of the plugin as ComfyUI loaded it, e.g. ``plugin_module('core.schedules')``.

    ComfyUI registers a folder plugin in sys.modules under its path with '.' replaced by '_x_'.
    """
    base = str(ROOT).replace(".", "_x_")
    return importlib.import_module(base + ("." + name if name else ""))

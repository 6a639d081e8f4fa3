"""Import the plugin's ComfyUI-free packages (``core``, ``training``) the normal way, outside ComfyUI.

The repository root is the plugin's package; its ``__init__`` registers the nodes and so needs a
running ComfyUI. The headless trainer, the benchmarks and the tests of ``core/`` and ``training/``
need the subpackages only, under one package name, so relative imports between them
(``training`` -> ``..core``) resolve as they do inside ComfyUI:

    from scripts.plugin_package import PACKAGE, load
    load()                                   # registers the package 'comfyui_add' (idempotent)
    from comfyui_add.training.config import ADDConfig

``load`` registers the package (its ``__path__`` is the repository root) without running its
``__init__``: nothing of ComfyUI is imported, and every submodule is then imported once, by the
ordinary import system. ``comfyui_add`` is also the short name users see in error types.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "comfyui_add"


def load() -> ModuleType:
    """The package ``comfyui_add`` rooted at this checkout, registered in ``sys.modules``."""
    pkg = sys.modules.get(PACKAGE)
    if pkg is not None:
        if Path(pkg.__path__[0]).resolve() != ROOT:
            raise ImportError(f"{PACKAGE} is already imported from {pkg.__path__[0]}, not from {ROOT}.")
        return pkg
    spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    pkg = importlib.util.module_from_spec(spec)  # __init__ is not executed: it registers nodes with ComfyUI
    sys.modules[PACKAGE] = pkg
    return pkg

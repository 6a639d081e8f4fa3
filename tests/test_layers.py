"""The layers hold: core/ and training/ import no ComfyUI; every user-facing error is an ADDError
whose type users read as a short ``comfyui_add.<Name>``."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from comfyui_add.core import errors

ROOT = Path(__file__).resolve().parent.parent
PURE_MODULES = sorted(f"{pkg}.{p.stem}" for pkg in ("core", "training") for p in (ROOT / pkg).glob("*.py")
                      if p.stem != "__init__")
# ComfyUI's top-level modules: importing any of them from core/ or training/ breaks the layering
COMFY_NAMES = ("comfy", "comfy_extras", "comfy_api", "comfy_execution", "folder_paths", "server", "nodes",
               "latent_preview", "execution", "node_helpers")

_BLOCKER = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {names!r}:
            raise ImportError('layering: ' + name + ' imported')
sys.meta_path.insert(0, Block())
sys.path.insert(0, {root!r})
from scripts.plugin_package import load; load()
import importlib
for m in {modules!r}:
    importlib.import_module('comfyui_add.' + m)
bad = [m for m in sys.modules if m.split('.')[0] in {names!r}]
assert not bad, bad
"""


def test_the_module_list_covers_every_core_and_training_file():
    assert {m.split(".")[0] for m in PURE_MODULES} == {"core", "training"}
    assert len([m for m in PURE_MODULES if m.startswith("core.")]) == len(list((ROOT / "core").glob("*.py"))) - 1
    assert "training.loop" in PURE_MODULES and "core.errors" in PURE_MODULES


def test_every_core_and_training_module_imports_without_comfyui():
    """Each module in a fresh process with every ComfyUI module name blocked (so a lazy or
    conditional ComfyUI import in a module body fails too, naming the module it wanted)."""
    code = _BLOCKER.format(names=COMFY_NAMES, root=str(ROOT), modules=PURE_MODULES)
    done = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_no_core_or_training_file_names_a_comfyui_module():
    """Imports inside functions are not run by the import test above: read the source for them."""
    found = []
    for mod in PURE_MODULES:
        path = ROOT / (mod.replace(".", "/") + ".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            found += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in COMFY_NAMES]
    assert not found, found


def test_the_training_package_imports_nothing_by_itself():
    code = ("import sys; sys.path.insert(0, %r); from scripts.plugin_package import load; load(); "
            "import comfyui_add.training as t; assert 'torch' not in sys.modules, 'training/__init__ imported torch'"
            % str(ROOT))
    subprocess.run([sys.executable, "-c", code], cwd="/", check=True)


@pytest.mark.parametrize("cls", [errors.ADDFileExistsError, errors.ScheduleError, errors.StreamError,
                                 errors.TAESDError, errors.ResumeConflict, errors.TrainingFailed,
                                 errors.NonFiniteTrainingError])
def test_every_error_is_an_add_error_with_a_short_public_name(cls):
    assert issubclass(cls, errors.ADDError) and issubclass(cls, ValueError)
    assert f"{cls.__module__}.{cls.__qualname__}" == f"comfyui_add.{cls.__name__}"


def test_a_subclass_defined_elsewhere_also_gets_the_short_name():
    class SomethingWrong(errors.ADDError):
        pass
    assert SomethingWrong.__module__ == "comfyui_add"
    assert issubclass(errors.ADDFileExistsError, FileExistsError)  # callers catching the OS error keep working


def test_node_and_adapter_code_raises_only_add_errors():
    """What a node raises reaches the user: no bare ValueError/RuntimeError/TypeError in nodes/."""
    bare = []
    for path in sorted((ROOT / "nodes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                if node.exc.func.id in ("ValueError", "RuntimeError", "TypeError", "KeyError", "Exception"):
                    bare.append(f"{path.name}:{node.lineno} {node.exc.func.id}")
    assert not bare, bare


def _imported_names(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                "plugin_module", "import_module") and node.args and isinstance(node.args[0], ast.Constant):
            names.append(str(node.args[0].value))
    return names


def test_the_headless_trainer_imports_no_node_module():
    names = _imported_names(ROOT / "scripts" / "train_add.py")
    assert any(n.startswith("comfyui_add.adapters") for n in names)  # the shared run assembly
    assert not [n for n in names if n.split(".")[0] == "nodes" or n.startswith("comfyui_add.nodes")], names


def test_adapters_import_no_node_module():
    """adapters/ sits below nodes/: the headless trainer imports it without the node classes."""
    for path in sorted((ROOT / "adapters").glob("*.py")):
        bad = [n for n in _imported_names(path) if n.startswith("..nodes") or n.startswith(".nodes")]
        assert not bad, (path.name, bad)

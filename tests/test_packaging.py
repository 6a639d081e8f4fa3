"""What ComfyUI Manager and the Comfy Registry read: pyproject.toml and requirements.txt.

Fields follow the registry's specification (https://docs.comfy.org/registry/specifications) and
are read back with ComfyUI's own parser (``comfy_config.config_parser``, the one its loader uses).
Pure file checks plus one short subprocess; no server.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from scripts.comfy_host import ROOT, host_path

PYPROJECT = ROOT / "pyproject.toml"
REQUIREMENTS = ROOT / "requirements.txt"
# comfy-cli's pattern for requires-comfyui / the front-end version: [operator]X.Y.Z[-suffix], comma-separated
_VERSION_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")
# the registry's node id: < 100 characters, letters, digits, '-', '_', '.', no two specials in a row,
# starting with a letter
_NODE_ID = re.compile(r"^[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*$")
_ICON_FORMATS = {"PNG", "JPEG", "GIF"}  # and .svg, which Pillow does not read


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)


def requirement_lines(path: Path = REQUIREMENTS) -> list[str]:
    lines = []
    for raw in path.read_text().splitlines():
        line = re.sub(r"(^|\s+)#.*$", "", raw).strip()  # pip's comment rule
        if line:
            lines.append(line)
    return lines


def tracked(rel: str) -> bool:
    """Whether git tracks ``rel`` (what a clone, Manager's install and the registry's package hold)."""
    return subprocess.run(["git", "-C", str(ROOT), "ls-files", "--error-unmatch", rel],
                          capture_output=True).returncode == 0


def test_requirements_have_only_loose_lower_bounds():
    """Manager pip-installs requirements.txt into the user's ComfyUI environment: an exact or upper pin
    there would up- or downgrade a package ComfyUI or another custom node needs."""
    reqs = [Requirement(line) for line in requirement_lines()]
    assert reqs, "requirements.txt lists nothing"
    for r in reqs:
        assert r.url is None, f"{r}: a direct URL cannot be resolved against the user's environment"
        for spec in r.specifier:
            assert spec.operator in (">=", ">"), f"{r}: only lower bounds (>=) belong here, not {spec.operator}"
    names = [canonicalize_name(r.name) for r in reqs]
    assert len(names) == len(set(names)), f"a package is listed twice: {names}"
    for pinned in ("torch", "torchvision", "torchaudio"):  # ComfyUI's own install decides these
        assert pinned not in names, f"{pinned} comes with ComfyUI; listing it lets pip replace the user's build"


def test_pyproject_dependencies_match_requirements(pyproject):
    """The registry reads [project].dependencies, Manager reads requirements.txt: the same list."""
    deps = {canonicalize_name(Requirement(d).name): str(Requirement(d).specifier)
            for d in pyproject["project"]["dependencies"]}
    reqs = {canonicalize_name(Requirement(r).name): str(Requirement(r).specifier) for r in requirement_lines()}
    assert deps == reqs


def test_project_table_follows_the_registry_spec(pyproject):
    project = pyproject["project"]
    assert len(project["name"]) < 100 and _NODE_ID.match(project["name"]), project["name"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), "version must be X.Y.Z (semantic versioning)"
    lic = project["license"]
    assert isinstance(lic, dict) and (lic.get("text") or lic.get("file")), "license = {text = ...} or {file = ...}"
    if lic.get("file"):
        assert (ROOT / lic["file"]).is_file()
    repo = urlsplit(project["urls"]["Repository"])
    assert repo.scheme == "https" and repo.netloc == "github.com" and len(repo.path.strip("/").split("/")) == 2
    assert SpecifierSet(project["requires-python"]).contains(f"{sys.version_info.major}.{sys.version_info.minor}")
    assert (ROOT / project["readme"]).is_file()


def test_tool_comfy_is_complete(pyproject):
    comfy = pyproject["tool"]["comfy"]
    assert comfy["PublisherId"].strip() and not re.search(r"\s", comfy["PublisherId"])
    assert comfy["DisplayName"].strip()
    parts = [p.strip() for p in comfy["requires-comfyui"].split(",")]
    assert all(_VERSION_PART.match(p) for p in parts), comfy["requires-comfyui"]
    host_version = re.search(r'__version__\s*=\s*"([^"]+)"', (host_path() / "comfyui_version.py").read_text()).group(1)
    assert Version(host_version) in SpecifierSet(comfy["requires-comfyui"]), \
        f"the ComfyUI the tests run on ({host_version}) must satisfy requires-comfyui"
    assert isinstance(comfy.get("includes", []), list)
    for inc in comfy.get("includes", []):
        assert (ROOT / inc.lstrip("/")).exists(), f"includes names {inc!r}, which is not in the repository"


def icon_file(icon: str, repository: str) -> Path:
    """The repository file an Icon value names: a relative path, or this repository's raw GitHub URL."""
    url = urlsplit(icon)
    if not url.scheme:
        return ROOT / icon
    assert url.scheme == "https", f"Icon {icon!r}: use an https URL"
    owner_repo = urlsplit(repository).path.strip("/").split("/")
    parts = url.path.strip("/").split("/")
    assert url.netloc == "raw.githubusercontent.com" and parts[:2] == owner_repo and len(parts) > 3, \
        f"Icon {icon!r} should be this repository's raw file URL (https://raw.githubusercontent.com/" \
        f"{'/'.join(owner_repo)}/<branch>/<path>), so the picture is the one in the repository"
    return ROOT / "/".join(parts[3:])


def test_icon_exists_in_the_repository_and_fits(pyproject):
    from PIL import Image

    icon = pyproject["tool"]["comfy"].get("Icon")
    if icon is None:
        pytest.skip("no Icon: the registry shows its default")  # left out is allowed; an empty string is not
    assert icon.strip(), "Icon is an empty string: point it at a picture or leave the key out"
    path = icon_file(icon, pyproject["project"]["urls"]["Repository"])
    rel = path.relative_to(ROOT).as_posix()
    assert path.is_file(), f"Icon names {rel}, which is not in the repository"
    assert tracked(rel), f"{rel} is not tracked by git, so the URL would not find it"
    if path.suffix.lower() == ".svg":
        assert "<svg" in path.read_text()[:2000]
        return
    with Image.open(path) as im:
        assert im.format in _ICON_FORMATS, im.format
        assert im.width <= 800 and im.height <= 400, f"{im.size}: the registry allows at most 800 x 400"


def test_comfyui_reads_the_same_fields():
    """ComfyUI's own pyproject parser (its loader calls it for every custom node) sees the fields."""
    code = ("import sys; from comfy_config import config_parser; "
            "print(config_parser.extract_node_configuration(sys.argv[1]).model_dump_json())")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=host_path(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = json.loads(out.stdout.strip().splitlines()[-1])
    with open(PYPROJECT, "rb") as f:
        raw = tomllib.load(f)
    assert cfg["project"]["name"] == raw["project"]["name"]
    assert cfg["project"]["supported_comfyui_version"] == raw["tool"]["comfy"]["requires-comfyui"]
    assert cfg["project"]["supported_os"] == ["OS Independent"]
    tool = cfg["tool_comfy"]
    assert tool["publisher_id"] == raw["tool"]["comfy"]["PublisherId"]
    assert tool["display_name"] == raw["tool"]["comfy"]["DisplayName"]
    assert tool["icon"] == raw["tool"]["comfy"].get("Icon", "")
    assert tool["includes"] == raw["tool"]["comfy"].get("includes", [])
    assert tool["web"] is None  # WEB_DIRECTORY in __init__.py registers web/; no second registration

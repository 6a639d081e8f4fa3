"""The plugin's one way to read and write model files, and to turn a typed name into a path; every
layer uses it (training checkpoints, node saves, the headless trainer), and it imports no ComfyUI.

- Reading: :func:`read_safetensors` / :func:`safetensors_header` check the file before any library
  sees it (exists, not empty, not a pickle, the 8-byte header length, the JSON header, every
  tensor's data offsets against the file size): a broken download is reported by name. Nothing is
  unpickled: a .pt/.ckpt/.pth file is refused with advice to convert it.
- Writing: :func:`atomic_write` and its wrappers write a short hidden ``.partial`` file in the target
  folder (no model list shows it), fsync, then rename; ``overwrite=False`` never replaces a file, even
  one that appears meanwhile. :func:`atomic_write_first_free` takes the first free name of a sequence
  (numbered saves). Temporaries left by a killed process are removed by the next write there.
- Names and paths: :func:`check_name` / :func:`safe_path` refuse '..', absolute paths, drive letters,
  NUL and control characters, misplaced separators and names the file system cannot hold;
  :func:`resolve_inside` is the one "this typed path stays inside that folder" check.
"""
from __future__ import annotations

import json
import os
import re
import struct
import uuid
from typing import Any, Callable, Iterable, Mapping

import torch


from .errors import ADDError, ADDFileExistsError

# --------------------------------------------------------------------------------------------
# reading safetensors
# --------------------------------------------------------------------------------------------
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
PICKLE_EXTS = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
_DEFAULT_FIX = "Re-download the file (or copy it again) as an intact .safetensors file, then queue again."


def _looks_pickled(head: bytes) -> bool:
    """torch.save's zip container or a raw pickle stream (protocol 2-5)."""
    return head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _pickle_error(label: str) -> ADDError:
    return ADDError(
        f"{label} is a pickle checkpoint (PyTorch .pt/.ckpt/.pth format). This plugin never loads pickles, because "
        "opening one can run any code hidden in it. Convert it to .safetensors (or download the .safetensors "
        "version of the same model) and select that file instead.")


def safetensors_header(path: str | os.PathLike, label: str | None = None, fix: str = _DEFAULT_FIX) -> dict[str, Any]:
    """The parsed JSON header of a safetensors file, after checking the file is whole.

    ``label`` is how messages name the file (e.g. 'loras/x.safetensors'); ``fix`` what to do.
    """
    path = os.fspath(path)
    label = label or os.path.basename(path)
    if not os.path.isfile(path):
        raise ADDError(f"{label} does not exist (looked for {path}). Put the file there, or pick another one.")
    size = os.path.getsize(path)
    if size == 0:
        raise ADDError(f"{label} is 0 bytes (an interrupted download or copy). {fix}")
    with open(path, "rb") as f:
        head = f.read(8)
        if _looks_pickled(head) or path.lower().endswith(PICKLE_EXTS):
            raise _pickle_error(label)
        if len(head) < 8:
            raise ADDError(f"{label} is cut short: {size} bytes, fewer than the 8 bytes a safetensors file starts "
                           f"with. {fix}")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or n < 2:
            raise ADDError(f"{label} is not a safetensors file (its first 8 bytes do not give a plausible header "
                           f"length). It may be another format renamed to .safetensors, or random data. {fix}")
        if 8 + n > size:
            raise ADDError(f"{label} is cut short: the header promises at least {8 + n} bytes, the file has {size}. "
                           f"{fix}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError):
        raise ADDError(f"{label} is not a safetensors file (its header is not JSON). It may be another format renamed "
                       f"to .safetensors, or random data. {fix}") from None
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = info["dtype"], info["shape"], info["data_offsets"]
            numel = 1
            for s in shape:
                numel *= int(s)
            ok = dtype in DTYPE_SIZES and 0 <= begin <= stop and stop - begin == numel * DTYPE_SIZES[dtype]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ADDError(f"{label} is corrupt: the header entry for tensor {str(key)[:80]!r} is invalid. {fix}")
        end = max(end, stop)
    if 8 + n + end > size:
        raise ADDError(f"{label} is cut short: the header promises {8 + n + end} bytes, the file has {size}. {fix}")
    return header


def read_safetensors(path: str | os.PathLike, label: str | None = None, fix: str = _DEFAULT_FIX,
                     device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a checked safetensors file; ADDError naming the file otherwise."""
    from safetensors import SafetensorError, safe_open

    label = label or os.path.basename(os.fspath(path))
    safetensors_header(path, label, fix)
    try:
        with safe_open(os.fspath(path), framework="pt", device=device) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ADDError(f"{label} could not be read ({first}). {fix}") from None
    return tensors, metadata


def safetensors_metadata(path: str | os.PathLike, label: str | None = None, fix: str = _DEFAULT_FIX) -> dict[str, str]:
    """The ``__metadata__`` of a checked safetensors file ({} when it has none)."""
    md = safetensors_header(path, label, fix).get("__metadata__") or {}
    return {str(k): str(v) for k, v in md.items()} if isinstance(md, dict) else {}


def nonfinite_keys(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf."""
    return [k for k, t in tensors.items() if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]


# --------------------------------------------------------------------------------------------
# names -> paths
# --------------------------------------------------------------------------------------------
_FORBIDDEN = set('<>:"|?*')
_TEMP_RE = re.compile(r"^\.add-(\d+)-[0-9a-f]{12}\.partial$")


def name_max(folder: str | os.PathLike) -> int:
    """Longest file name (bytes) the file system of ``folder`` (or its nearest existing parent) holds."""
    folder = os.fspath(folder)
    while folder and not os.path.isdir(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    try:
        return int(os.pathconf(folder or ".", "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def check_name(name: Any, what: str = "name", ext: str = ".safetensors", subfolders: bool = False,
               suffixes: Iterable[str] = (), folder: str | os.PathLike | None = None, example: str = "my_turbo_lora") -> str:
    """A typed file name, checked: returned without ``ext`` (one trailing ``ext`` is removed).

    Refused: empty, '..' or '.' parts, absolute paths, drive letters, NUL / control characters,
    ``<>:"|?*``, '/' and '\\' (unless ``subfolders``, where '/' separates folders), parts starting
    with '.' or ending with ' ' or '.', and names whose file name plus ``ext`` (and each of
    ``suffixes``) is longer than the file system of ``folder`` allows.
    """
    raw = "" if name is None else str(name)
    shown = repr(raw[:80] + ("..." if len(raw) > 80 else ""))
    fix = f"type a plain file name, e.g. {example}" + (" (sub-folders with '/')" if subfolders else "")

    def bad(why: str) -> ADDError:
        return ADDError(f"{what} {shown} {why}: {fix}.")

    text = raw.strip()
    if ext and text.lower().endswith(ext.lower()):
        text = text[: -len(ext)]
    if not text:
        raise bad("is empty")
    if "\0" in text or any(ord(c) < 32 for c in text):
        raise bad("contains a NUL or control character")
    if os.path.isabs(text) or text.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", text):
        raise bad("is an absolute path or starts with a drive letter; it must be relative to its folder")
    if "\\" in text or ("/" in text and not subfolders):
        raise bad("contains a path separator ('/' or '\\'), which is not allowed here")
    parts = text.split("/")
    limit = name_max(folder) if folder is not None else 255
    for i, part in enumerate(parts):
        if part in ("", ".", ".."):
            raise bad("contains '..', '.' or an empty folder name")
        odd = sorted(set(part) & _FORBIDDEN)
        if odd:
            raise bad(f"contains {odd[0]!r}, which file systems refuse")
        if part.startswith("."):
            raise bad("has a part starting with '.' (hidden files are not listed by ComfyUI)")
        if part != part.strip() or part.endswith("."):
            raise bad("has a part ending with a space or '.'")
        ends = [ext, *suffixes] if i == len(parts) - 1 else [""]
        longest = max(len((part + e).encode("utf-8")) for e in ends)
        if longest > limit:
            raise bad(f"is too long: the file name would be {longest} bytes and the file system allows {limit}")
    return text


def is_inside(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``path`` lies in ``root`` (or is it), judged on the absolute paths as written ('..'
    resolved, symbolic links not)."""
    root, path = os.path.abspath(root), os.path.abspath(path)
    return os.path.commonpath([root, path]) == root


def resolve_inside(root: str | os.PathLike, rel: Any, what: str, *, where: str | None = None, kind: str = "path",
                   example: str = "my_folder", contain_links: bool = False) -> str:
    """The path ``root/rel`` for a path ``rel`` typed relative to ``root``; ADDError naming ``what`` otherwise.

    Refused, judged on the text as typed (spaces around it stripped, '\\' read as '/'): empty, NUL or
    control characters, absolute paths and drive letters, any '..' part, and ``root`` itself.
    Symbolic links: with ``contain_links`` False (reading), links inside ``root`` are followed wherever
    they point, as ComfyUI's own loaders do, and the path is returned as written. With ``contain_links``
    (writing), the folder the path lies in is resolved (links followed) and must stay inside ``root``
    resolved; the path returned is that real folder plus the last name (which may itself be a link: an
    atomic write replaces the link, never its target). ``where`` describes ``root`` in messages (default:
    its path), ``kind`` says what is typed ('folder', 'file'), ``example`` shows a good value.
    """
    base = os.path.abspath(root)
    where = where or base
    text = ("" if rel is None else str(rel)).strip()
    shown = repr(text[:120])
    if "\0" in text or any(ord(c) < 32 for c in text):
        raise ADDError(f"{what} {shown} contains a NUL or control character (a pasted path?): type the {kind}'s path "
                       f"relative to {where}, e.g. {example}.")
    if not text:
        raise ADDError(f"{what} is empty: type the {kind}'s path relative to {where}, e.g. {example}.")
    text = text.replace("\\", "/")
    path = os.path.normpath(os.path.join(base, text))
    if (os.path.isabs(text) or re.match(r"^[A-Za-z]:", text) or ".." in text.split("/")
            or not is_inside(base, path) or path == base):
        raise ADDError(f"{what} {shown} must be a {kind} inside {where}, given relative to it (e.g. {example}, "
                       "sub-folders with '/'), with no '..' or absolute path.")
    if not contain_links:
        return path
    real_root = os.path.realpath(base)
    real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    if not is_inside(real_root, real) or real == real_root:
        raise ADDError(f"{what} {shown} resolves outside {real_root} (through a symlinked folder); choose another name.")
    return real


def safe_path(folder: str | os.PathLike, name: Any, ext: str = ".safetensors", what: str = "filename",
              subfolders: bool = True, example: str = "my_turbo_model") -> str:
    """``folder/name.ext`` for a checked ``name``; never outside ``folder`` (symlinked folders resolved)."""
    text = check_name(name, what, ext, subfolders=subfolders, folder=folder, example=example)
    return resolve_inside(folder, text + ext, what, example=example, contain_links=True)


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Remove this plugin's temporary files in ``directory`` whose writing process is gone."""
    directory = os.fspath(directory)
    removed = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry)
        if m and not _pid_alive(int(m.group(1))):
            try:
                os.remove(os.path.join(directory, entry))
                removed.append(entry)
            except FileNotFoundError:
                continue
    return removed


def temp_path_for(path: str | os.PathLike) -> str:
    """A fresh temporary name beside ``path``: short (fits any name limit), hidden, not a model extension."""
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    return os.path.join(directory, f".add-{os.getpid()}-{uuid.uuid4().hex[:12]}.partial")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], overwrite: bool = True) -> str:
    """``write(binary file object)`` into a temporary file beside ``path``, fsync, rename onto ``path``.

    With ``overwrite=False`` an existing ``path`` is never replaced (checked before writing and
    again, atomically, at the rename). On any error, or a kill, the old file stays as it was; the
    temporary is removed on error, and by the next write into that folder after a kill.
    """
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    if not overwrite and os.path.exists(path):
        raise ADDFileExistsError(f"{path} already exists; turn on 'overwrite' to replace it, or choose another file name.")
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(directory)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path exists: no window where another file is clobbered
            except FileExistsError:
                raise ADDFileExistsError(f"{path} appeared while saving; turn on 'overwrite' to replace it, or choose "
                               "another file name.") from None
            except OSError:  # file systems without hard links
                if os.path.exists(path):
                    raise ADDFileExistsError(f"{path} appeared while saving; turn on 'overwrite' to replace it, or choose "
                                   "another file name.") from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(directory)
    return path


def atomic_write_first_free(candidates: Iterable[str | os.PathLike], write: Callable[[Any], None],
                            limit: int = 100_000) -> str:
    """``write(binary file object)`` once into a temporary file, then give it the first free name.

    ``candidates`` (all in one folder; may be an endless generator) are tried in order; each is
    claimed atomically with a hard link, which fails when the name exists, so no file, not even
    one that appears while writing, is ever replaced: the next candidate is taken instead. This is
    how numbered saves (``x_00001_``, ``x_00002_``, ...) stay correct when two saves race. On any
    error, or a kill, nothing is left but the temporary (removed as :func:`atomic_write` says).
    Returns the path written.
    """
    it = iter(candidates)
    try:
        first = os.path.abspath(os.fspath(next(it)))
    except StopIteration:
        raise ValueError("atomic_write_first_free needs at least one candidate path") from None
    directory = os.path.dirname(first)
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(directory)
    tmp = temp_path_for(first)
    written = None
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        path, tried = first, 0
        while written is None:
            if os.path.dirname(path) != directory:
                raise ValueError(f"candidate {path} is not in {directory}: all candidates must share one folder")
            if not os.path.lexists(path):
                try:
                    os.link(tmp, path)  # fails if path exists: no window where another file is clobbered
                    written = path
                except FileExistsError:
                    pass  # another save took this name meanwhile: take the next one
                except OSError:  # file systems without hard links: a check, then a rename
                    if not os.path.lexists(path):
                        os.replace(tmp, path)
                        written = path
            if written is None:
                tried += 1
                nxt = next(it, None)
                if nxt is None or tried >= limit:
                    raise ADDFileExistsError(f"no free file name left after {first} ({tried} names taken); choose "
                                             "another file name or clear the folder.")
                path = os.path.abspath(os.fspath(nxt))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(directory)
    return written


def atomic_write_bytes(data: bytes, path: str | os.PathLike, overwrite: bool = True) -> str:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data), overwrite)


def atomic_write_json(obj: Any, path: str | os.PathLike, overwrite: bool = True) -> str:
    """Write ``obj`` as JSON to ``path`` atomically."""
    return atomic_write_bytes(json.dumps(obj, indent=1, sort_keys=True).encode("utf-8"), path, overwrite)


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code


def write_safetensors_to(f, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Stream ``tensors`` in the safetensors format into the open binary file ``f``.

    One tensor at a time (no second copy of a multi-GB checkpoint in memory); the result loads
    with ``safetensors.safe_open`` (tests compare against the library's own serializer).
    """
    names = sorted(tensors)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for k in names:
        t = tensors[k]
        if t.dtype not in _ST_DTYPES:
            raise ADDError(f"tensor {k!r} has dtype {t.dtype}, which safetensors cannot store.")
        nbytes = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the library writes it
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for k in names:
        t = tensors[k].detach()
        if t.numel() == 0:
            continue
        flat = t.to("cpu").contiguous().reshape(-1)
        f.write(memoryview(flat.view(torch.uint8).numpy()))


def atomic_write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                             metadata: Mapping[str, str] | None = None, overwrite: bool = True) -> str:
    """A safetensors file written atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: write_safetensors_to(f, tensors, metadata), overwrite)

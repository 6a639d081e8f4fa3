#!/usr/bin/env bash
# The README's "test" command: set everything up (idempotent, with the test tools), then run the
# whole suite against a real ComfyUI on the CPU. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh" --dev
cd "$ROOT"
# Without a test path of the caller's, run tests/ (pytest would otherwise collect from the repo
# root, whose __init__.py is the plugin package and needs ComfyUI on the path first).
has_path=0
for a in "$@"; do
  case "$a" in -*) ;; *) [ -e "${a%%::*}" ] && has_path=1 ;; esac
done
[ "$has_path" = 1 ] || set -- "$@" "$ROOT/tests"
# Tests run in parallel worker processes (pytest-xdist), one per core up to 4, unless the caller
# chose (-n / --numprocesses / -p no:xdist). Each test still computes on one thread (tests/conftest.py).
case " $* " in
  *" -n"*|*" --numprocesses"*|*"no:xdist"*) ;;
  *) set -- -n auto --maxprocesses 4 "$@" ;;
esac
exec "$ROOT/.venv/bin/python" -m pytest -c "$ROOT/tests/pytest.ini" --rootdir "$ROOT/tests" "$@"

#!/usr/bin/env bash
# The README's "test" command: set everything up (idempotent, with the test tools), then run the
# whole suite against a real ComfyUI on the CPU. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh" --dev
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -c "$ROOT/tests/pytest.ini" --rootdir "$ROOT/tests" "$@"

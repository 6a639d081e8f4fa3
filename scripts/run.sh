#!/usr/bin/env bash
# The README's "run" command: set everything up (idempotent), then start ComfyUI with the plugin
# at http://127.0.0.1:8188, or run one workflow headless:  bash scripts/run.sh --headless NAME
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m scripts.run "$@"

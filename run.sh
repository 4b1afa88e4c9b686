#!/usr/bin/env bash
# Quick start: set up ./.venv and run the daemon. With no config file this is the
# embedded default: the simulated model, storing in ./data. Extra arguments go to `run`.
set -euo pipefail
cd "$(dirname "$0")"
scripts/venv.sh requirements.txt
exec .venv/bin/python main.py run "$@"

#!/usr/bin/env bash
# Quick start: set up ./.venv with the test tools and run every test. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/venv.sh requirements-dev.txt
scripts/install-test-tools.sh
exec .venv/bin/python -m pytest "$@"

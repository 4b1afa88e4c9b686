#!/usr/bin/env bash
# Create or update ./.venv from a requirements file. Usage: scripts/venv.sh requirements.txt
# Re-installs only when the requirements file changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
req=${1:-requirements.txt}
py=${PYTHON:-python3}

if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: SolarPowerBrampton needs Python 3.11 or newer ($py is $("$py" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  # Without --system-site-packages: the venv never imports from the user's site directory.
  if ! "$py" -m venv .venv 2>/dev/null; then
    # Debian and Raspberry Pi OS ship venv separately.
    rm -rf .venv
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    echo "installing python3-venv (Debian package) ..." >&2
    $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq python3-venv >/dev/null
    "$py" -m venv .venv
  fi
fi
stamp=".venv/.installed-$(basename "$req")"
if [ ! -f "$stamp" ] || ! cmp -s <(cat requirements*.txt) "$stamp"; then
  # --require-hashes: every file pip fetches must match a hash in the requirements files
  # (regenerate them with: python scripts/hash_requirements.py). -I: no user site packages.
  .venv/bin/python -I -m pip install -q --disable-pip-version-check --require-hashes -r "$req"
  cat requirements*.txt > "$stamp"
fi

#!/usr/bin/env bash
# Install the real parts the tests use, from Debian's packages:
#   influxdb 1.6.7 (influxd) and victoria-metrics 1.79.5 (tests and bench.py start private instances),
#   chromium (the live page's browser test), systemd's tools (systemd-analyze for the unit tests),
#   mosquitto (the MQTT broker) and prometheus (scrapes /metrics); openssl makes the tests' CAs;
#   nodejs + npm when no node is installed (for InfluxData's Flux parser, below).
# Then, without root: the npm package @influxdata/flux (InfluxData's Flux parser, wasm) into tests/flux/node_modules
# with `npm ci` from tests/flux/package-lock.json (pinned version, integrity hash checked), only when that lock
# changed since the last install.
# Idempotent: does nothing when all are already there. Never leaves the packages' own services
# running. Without root it prints a note and goes on (those tests then skip, off CI).
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/bin/$1" ]; }
root_dir="$(cd "$(dirname "$0")/.." && pwd)"

install_flux_parser() {
  local dir="$root_dir/tests/flux" stamp want
  if ! have node || ! have npm; then
    echo "note: node/npm missing; the Flux parser test will be skipped (run scripts/install-test-tools.sh as root)" >&2
    return 0
  fi
  stamp="$dir/node_modules/.lock-sha256"
  want="$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -f "$dir/node_modules/@influxdata/flux/flux_bg.wasm" ]; then
    return 0
  fi
  echo "installing @influxdata/flux (npm ci in tests/flux) ..." >&2
  if (cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null); then
    echo "$want" > "$stamp"
  else
    echo "warning: npm ci in tests/flux failed; the Flux parser test will be skipped (fails on CI)" >&2
  fi
}

if have influxd && have victoria-metrics && have chromium && have systemd-analyze && have mosquitto \
    && have prometheus && have openssl && have node && have npm; then
  install_flux_parser
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "note: influxd/victoria-metrics/chromium/systemd-analyze/mosquitto/prometheus/node missing and not root; their tests will be skipped (run scripts/install-test-tools.sh as root)" >&2
  install_flux_parser
  exit 0
fi

# Keep invoke-rc.d from starting the packages' services during install.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod 755 "$policy"
  created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

# Debian's nodejs + npm only where there is no node at all (a node from elsewhere, e.g. nodesource, brings its
# own npm, and Debian's npm package would conflict with it).
node_packages=()
if ! have node || ! have npm; then
  node_packages=(nodejs npm)
fi
echo "installing influxdb, victoria-metrics, chromium, systemd tools, mosquitto, prometheus ${node_packages[*]:-} (Debian packages) ..." >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  influxdb victoria-metrics chromium fonts-dejavu-core systemd mosquitto prometheus openssl "${node_packages[@]}" >/dev/null

# No systemd here; but if a postinst started a daemon anyway, stop it.
for svc in influxdb victoria-metrics mosquitto prometheus; do
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now "$svc" >/dev/null 2>&1 || true
  fi
  if [ -x "/etc/init.d/$svc" ]; then
    "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
  fi
done
# Any package-started daemon runs as the packages' system users; our test instances never do.
for user in influxdb victoria-metrics mosquitto prometheus; do
  if id "$user" >/dev/null 2>&1; then
    for pid in $(pgrep -u "$user" -x influxd 2>/dev/null; pgrep -u "$user" -x victoria-metric 2>/dev/null;
                 pgrep -u "$user" -x mosquitto 2>/dev/null; pgrep -u "$user" -x prometheus 2>/dev/null); do
      kill "$pid" 2>/dev/null || true
    done
  fi
done

if have influxd && have victoria-metrics; then
  echo "installed: $(command -v influxd || echo /usr/bin/influxd), $(command -v victoria-metrics || echo /usr/bin/victoria-metrics)" >&2
else
  echo "warning: install finished but influxd/victoria-metrics not found; server tests will be skipped" >&2
fi
install_flux_parser

#!/usr/bin/env bash
# Install SolarPowerBrampton on a Raspberry Pi as the systemd service `solarpowerbrampton`.
#
#   sudo ./install.sh                        install or upgrade to this checkout's HEAD (idempotent)
#   sudo ./install.sh --uninstall            remove service, code and user; keep config and data
#   sudo ./install.sh --uninstall --purge    ... and /etc/solarpowerbrampton and /var/lib/solarpowerbrampton
#
# Layout:
#   /opt/solarpowerbrampton/releases/<git-sha>/   committed files of HEAD (git archive) with their own .venv
#   /opt/solarpowerbrampton/current               -> releases/<git-sha> (relative symlink, swapped atomically)
#   /opt/solarpowerbrampton/previous              -> the release `current` pointed at before an upgrade
#   /etc/solarpowerbrampton/config.toml           root:solarpower 0640, from config.example.toml (never overwritten)
#   /etc/solarpowerbrampton/influx-token          root:root 0600, empty (never overwritten); LoadCredential= hands it over
#   /etc/solarpowerbrampton/gnupg/                root:root 0700, the keyring the self-updater verifies commits with
#   /etc/systemd/system/solarpowerbrampton{.service,-update.service,-update.timer}
#   /var/lib/solarpowerbrampton                   the store (StateDirectory=, created by systemd)
#
# Environment, for tests and packaging:
#   DESTDIR=/dir      test mode: every path this script writes, and the final check's store, go under /dir
#                     (system commands are still run: stub them on PATH, as tests/test_install.py does)
#   SPB_SKIP_PIP=1    do not pip install requirements.txt into the release's .venv
#   SPB_PIP_ARGS=".." extra arguments for pip install (e.g. "--index-url http://mirror/simple")
# Every system command (systemctl, useradd, groupadd, usermod, userdel, groupdel, getent, chown,
# raspi-config, sudo, python3, git) is looked up on PATH.
set -euo pipefail
umask 022

NAME=solarpowerbrampton
SVC_USER=solarpower
BUILD_USER=spb-build  # safepip builds what exists only as source as this user: nothing else runs as it
HW_GROUPS=(i2c gpio)
OPT=/opt/$NAME
ETC=/etc/$NAME
STATE=/var/lib/$NAME
CACHE=/var/cache/$NAME-update
UNIT_DIR=/etc/systemd/system
UNITS=("$NAME.service" "$NAME-update.service" "$NAME-update.timer")
DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}

step() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
  cat <<EOF
usage: sudo $0                       install or upgrade to this checkout's HEAD
       sudo $0 --uninstall [--purge] remove the service (--purge: also config, token and data)
EOF
}

uninstall=0
purge=0
while [ $# -gt 0 ]; do
  case "$1" in
    --uninstall) uninstall=1 ;;
    --purge) purge=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; printf 'ERROR: unknown argument: %s\n' "$1" >&2; exit 2 ;;
  esac
  shift
done
if [ "$purge" = 1 ] && [ "$uninstall" = 0 ]; then
  usage >&2
  printf 'ERROR: --purge only goes with --uninstall\n' >&2
  exit 2
fi
if [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
  die "run as root: sudo $0 $*"
fi
if [ -n "$DESTDIR" ]; then
  info "DESTDIR=$DESTDIR: every path below is written under it"
fi

have() { command -v "$1" >/dev/null 2>&1; }
user_exists() { getent passwd "$1" >/dev/null 2>&1; }
group_exists() { getent group "$1" >/dev/null 2>&1; }

# ------------------------------------------------------------------------------------------- uninstall
do_uninstall() {
  local unit_files=() u
  for u in "${UNITS[@]}"; do
    if [ -e "$DESTDIR$UNIT_DIR/$u" ]; then unit_files+=("$u"); fi
  done

  step "stopping and disabling the units"
  if [ ${#unit_files[@]} -gt 0 ]; then
    systemctl disable --now "$NAME-update.timer" "$NAME.service" || warn "systemctl disable --now failed (continuing)"
    systemctl stop "$NAME-update.service" || warn "systemctl stop $NAME-update.service failed (continuing)"
    info "stopped and disabled"
  else
    info "no unit files installed"
  fi

  step "removing the unit files"
  for u in "${unit_files[@]}"; do
    rm -f "$DESTDIR$UNIT_DIR/$u"
    info "removed $UNIT_DIR/$u"
  done
  if [ ${#unit_files[@]} -gt 0 ]; then
    systemctl daemon-reload || warn "systemctl daemon-reload failed"
    systemctl reset-failed "${UNITS[@]}" >/dev/null 2>&1 || true
  fi

  step "removing $OPT and $CACHE"
  rm -rf "$DESTDIR$OPT" "$DESTDIR$CACHE"
  info "removed"

  step "removing the user and group $SVC_USER"
  if user_exists "$SVC_USER"; then
    userdel "$SVC_USER"
    info "user $SVC_USER removed"
  else
    info "no user $SVC_USER"
  fi
  if group_exists "$SVC_USER"; then
    groupdel "$SVC_USER"
    info "group $SVC_USER removed"
  fi
  if user_exists "$BUILD_USER"; then
    userdel "$BUILD_USER"
    info "user $BUILD_USER removed"
  fi
  if group_exists "$BUILD_USER"; then
    groupdel "$BUILD_USER"
  fi
  info "the groups ${HW_GROUPS[*]} are left alone (other software uses them)"

  if [ "$purge" = 1 ]; then
    step "purging $ETC and $STATE"
    rm -rf "$DESTDIR$ETC" "$DESTDIR$STATE"
    info "removed the config, the token and the store"
  else
    step "keeping $ETC (config, token) and $STATE (the store)"
    # Their owner is gone: hand them to root, so a future user that gets the same uid cannot read them.
    for dir in "$DESTDIR$ETC" "$DESTDIR$STATE"; do
      if [ -e "$dir" ]; then chown -R root:root "$dir"; fi
    done
    info "kept, now owned by root; remove them too with: sudo $0 --uninstall --purge"
  fi
  printf '\nSolarPowerBrampton uninstalled.\n'
}

# ---------------------------------------------------------------------------------------------- install
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# As root on a checkout someone else may own: trust only this directory, and never run its hooks
# or its fsmonitor command (both are programs the checkout's owner chooses).
git_src() {
  git -c safe.directory="$SRC" -c core.hooksPath=/dev/null -c core.fsmonitor=false -c core.untrackedCache=false \
    -C "$SRC" "$@"
}

# The lock the self-updater (updater.py) takes too: neither removes a release the other is building.
take_lock() {
  local lock=$DESTDIR$OPT/.updater.lock wait_s=${SPB_LOCK_WAIT_S:-600}
  mkdir -p "$DESTDIR$OPT"
  if [ -L "$lock" ]; then die "$lock is a symlink: remove it"; fi
  exec 9>>"$lock"
  if ! flock -w "$wait_s" 9; then
    die "the self-updater holds $OPT/.updater.lock (waited $wait_s s): try again when it has finished"
  fi
}
release_lock() { exec 9>&-; }

write_config() {
  # config.example.toml with [simulation] enabled = false (real sensors) and the store in the
  # state directory (the example's "data" is relative to the working directory).
  local example=$1 out=$2
  awk -v state="$STATE" '
    function header(line,   s) { s = line; gsub(/[][[:space:]]/, "", s); sub(/#.*/, "", s); return s }
    function finish(sec) {
      if (sec == "simulation" && !sim) { print "enabled = false"; sim = 1 }
      if (sec == "store" && !store) { print "dir = \"" state "\""; store = 1 }
    }
    /^[[:space:]]*\[/ { finish(sec); sec = header($0); print; next }
    sec == "simulation" && /^[[:space:]]*enabled[[:space:]]*=/ {
      print "enabled = false                 # installed on a Pi: measure the real INA219 sensors"; sim = 1; next
    }
    sec == "store" && /^[[:space:]]*dir[[:space:]]*=/ {
      print "dir = \"" state "\"   # = $STATE_DIRECTORY of solarpowerbrampton.service"; store = 1; next
    }
    { print }
    END {
      finish(sec)
      if (!sim) { print ""; print "[simulation]"; print "enabled = false" }
      if (!store) { print ""; print "[store]"; print "dir = \"" state "\"" }
    }
  ' "$example" >"$out"
}

check_config() {
  # The generated config must parse and say what we meant.
  "$1" -I - "$2" "$STATE" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    data = tomllib.load(f)
assert data["simulation"]["enabled"] is False, "[simulation] enabled is not false"
assert data["store"]["dir"] == sys.argv[2], "[store] dir is not the state directory"
PY
}

do_install() {
  local sha rel_name rel venv cur old tmp u f g src dst changed=0 units_changed=0 start_failed=0 upgrade=0

  step "reading the checkout $SRC"
  have git || die "git is not installed (sudo apt install git)"
  sha=$(git_src rev-parse --verify HEAD 2>/dev/null) || die "$SRC is not a git checkout with a commit"
  [[ $sha =~ ^[0-9a-f]{40}$ ]] || die "unexpected commit id: $sha"
  for u in "${UNITS[@]}" main.py requirements.txt config.example.toml; do
    f=$u
    case "$u" in *.service | *.timer) f=systemd/$u ;; esac
    git_src cat-file -e "HEAD:$f" 2>/dev/null || die "$f is not committed in $SRC: commit it first (the release is HEAD)"
  done
  if [ -n "$(git_src status --porcelain --untracked-files=no)" ]; then
    warn "uncommitted changes in $SRC are NOT installed: the release is HEAD ($sha)"
  fi
  info "release $sha"

  step "groups ${HW_GROUPS[*]} $SVC_USER and user $SVC_USER"
  for g in "${HW_GROUPS[@]}" "$SVC_USER"; do
    if group_exists "$g"; then
      info "group $g exists"
    else
      groupadd --system "$g"
      info "group $g created"
    fi
  done
  if user_exists "$SVC_USER"; then
    usermod --append --groups "$(IFS=,; echo "${HW_GROUPS[*]}")" "$SVC_USER"
    info "user $SVC_USER exists (made sure it is in ${HW_GROUPS[*]})"
  else
    useradd --system --gid "$SVC_USER" --groups "$(IFS=,; echo "${HW_GROUPS[*]}")" \
      --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin \
      --comment "SolarPowerBrampton data logger" "$SVC_USER"
    info "user $SVC_USER created"
  fi
  if user_exists "$BUILD_USER"; then
    info "user $BUILD_USER exists (source builds)"
  else
    useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
      --comment "SolarPowerBrampton source builds" "$BUILD_USER"
    info "user $BUILD_USER created (builds what exists only as source, as no other process runs)"
  fi

  rel_name=releases/$sha
  rel=$DESTDIR$OPT/$rel_name
  step "code in $OPT/$rel_name"
  take_lock
  mkdir -p "$DESTDIR$OPT/releases"
  in_use=
  for link in current previous; do
    [ "$(readlink "$DESTDIR$OPT/$link" 2>/dev/null || true)" = "$rel_name" ] && in_use=$link
  done
  if [ -d "$rel" ] && [ -z "$in_use" ]; then
    # Not current or previous: a self-update's build of it may have been cut off (a power cut during its
    # checkout), so its tree is not trusted to be whole. Copied afresh, under the lock no build runs.
    rm -rf "$rel"
    info "a release directory no link uses was left: copied afresh"
  fi
  if [ -d "$rel" ]; then
    info "exists ($in_use): reused"
  else
    rm -rf "$DESTDIR$OPT/releases/.$sha."*  # left by an interrupted run
    tmp=$(mktemp -d "$DESTDIR$OPT/releases/.$sha.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    git_src archive --format=tar HEAD | tar -x --no-same-owner --no-same-permissions -C "$tmp"
    chmod 0755 "$tmp"
    mv -T "$tmp" "$rel"
    trap - EXIT
    info "copied HEAD (git archive; no .git, no uncommitted files)"
  fi

  venv=$rel/.venv
  step "virtualenv $OPT/$rel_name/.venv"
  if [ -x "$venv/bin/python" ] && [ -e "$venv/.spb-venv-complete" ]; then
    info "exists: reused"
  else
    rm -rf "$venv"  # absent, or left half-made by an interrupted run
    have python3 || die "python3 is not installed (sudo apt install python3 python3-venv)"
    # --system-site-packages: Raspberry Pi OS's python3-lgpio (the LED) is not on PyPI in a usable form.
    if ! python3 -m venv --system-site-packages "$venv"; then
      rm -rf "$venv"
      if have apt-get; then
        info "installing python3-venv (Debian package)"
        apt-get update -qq || true
        apt-get install -y python3-venv
        python3 -m venv --system-site-packages "$venv"
      else
        die "python3 -m venv failed (install python3-venv)"
      fi
    fi
    : >"$venv/.spb-venv-complete"
    info "created (python3 -m venv --system-site-packages)"
  fi
  "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "SolarPowerBrampton needs Python 3.11 or newer ($("$venv/bin/python" --version 2>&1))"
  if [ "${SPB_SKIP_PIP:-0}" = 1 ]; then
    info "pip install skipped (SPB_SKIP_PIP=1)"
  elif cmp -s "$rel/requirements.txt" "$venv/.spb-installed-requirements.txt"; then
    info "requirements.txt already installed"
  else
    local pip_extra=()
    read -r -a pip_extra <<<"${SPB_PIP_ARGS:-}"
    # safepip: every file hash-checked (--require-hashes); as root wheels only, and what exists
    # only as source is built by the unprivileged user spb-build (made above), with hash-pinned tools.
    info "pip install -r requirements.txt (hash-checked) ${pip_extra[*]:-}"
    "$venv/bin/python" -I "$rel/safepip.py" "$venv/bin/python" "$rel/requirements.txt" \
      ${pip_extra[@]+"${pip_extra[@]}"} || die "installing requirements.txt failed (see above)"
    cp "$rel/requirements.txt" "$venv/.spb-installed-requirements.txt"
  fi
  # The service sees the code read-only (ProtectSystem=strict): compile it once, here.
  # -I: root's python never imports from a user site directory (nor PYTHON* variables).
  "$venv/bin/python" -I -m compileall -q -l "$rel" >/dev/null || warn "compileall failed (the daemon still runs)"
  if grep -qs 'Raspberry Pi' /proc/device-tree/model 2>/dev/null && ! "$venv/bin/python" -I -c 'import lgpio' 2>/dev/null; then
    warn "python3-lgpio is not installed: the status LED cannot work (sudo apt install python3-lgpio)"
  fi

  cur=$DESTDIR$OPT/current
  step "$OPT/current -> $rel_name"
  if [ -e "$cur" ] && [ ! -L "$cur" ]; then
    die "$cur exists and is not a symlink: move it away"
  fi
  old=$(readlink "$cur" 2>/dev/null || true)
  if [ -n "$old" ] && [ "$(basename "$old")" = "$sha" ]; then
    info "already points there"
  else
    if [ -n "$old" ]; then
      ln -sfn "$old" "$DESTDIR$OPT/.previous.$$"
      mv -T "$DESTDIR$OPT/.previous.$$" "$DESTDIR$OPT/previous"
      info "previous -> $old"
    fi
    # Marked until the daemon has been restarted on the new code, so a run interrupted before the
    # restart still restarts it next time.
    : > "$DESTDIR$OPT/.restart-pending"
    ln -sfn "$rel_name" "$DESTDIR$OPT/.current.$$"
    mv -T "$DESTDIR$OPT/.current.$$" "$cur"  # rename(2): atomic
    changed=1
    info "switched"
  fi
  if [ -e "$DESTDIR$OPT/.restart-pending" ]; then changed=1; fi
  # Keep only the current and the previous release: each carries a whole virtualenv, and repeated
  # upgrades must not fill the SD card.
  local keep_prev
  keep_prev=$(basename "$(readlink "$DESTDIR$OPT/previous" 2>/dev/null || echo none)")
  for dir in "$DESTDIR$OPT"/releases/*/; do
    [ -d "$dir" ] || continue
    name=$(basename "$dir")
    if [ "$name" != "$sha" ] && [ "$name" != "$keep_prev" ]; then
      rm -rf -- "$dir"
      info "removed the old release $name"
    fi
  done
  release_lock

  step "config $ETC"
  mkdir -p "$DESTDIR$ETC"
  chown "root:$SVC_USER" "$DESTDIR$ETC"
  chmod 0750 "$DESTDIR$ETC"
  local cfg=$DESTDIR$ETC/config.toml tok=$DESTDIR$ETC/influx-token
  if [ -e "$cfg" ]; then
    info "$ETC/config.toml exists: kept as it is"
  else
    tmp=$(umask 077 && mktemp "$DESTDIR$ETC/.config.toml.XXXXXX")
    trap 'rm -f "$tmp"' EXIT
    write_config "$rel/config.example.toml" "$tmp"
    check_config "$venv/bin/python" "$tmp" || die "could not derive a valid config from config.example.toml"
    mv -T "$tmp" "$cfg"
    trap - EXIT
    info "$ETC/config.toml created from config.example.toml ([simulation] enabled = false, [store] dir = \"$STATE\")"
  fi
  chown "root:$SVC_USER" "$cfg"
  chmod 0640 "$cfg"
  if [ -e "$tok" ]; then
    info "$ETC/influx-token exists: kept as it is"
  else
    (umask 077 && : >"$tok")
    info "$ETC/influx-token created, empty: paste the InfluxDB token into it (only for [influx] kind = local v2 / cloud)"
  fi
  chown root:root "$tok"
  chmod 0600 "$tok"
  # The self-updater accepts only commits signed by a key in this keyring ([update] require_signed):
  # import the maintainers' public keys with  sudo gpg --homedir /etc/solarpowerbrampton/gnupg --import KEY.asc
  mkdir -p "$DESTDIR$ETC/gnupg"
  chown root:root "$DESTDIR$ETC/gnupg"
  chmod 0700 "$DESTDIR$ETC/gnupg"

  step "I2C"
  if have raspi-config; then
    if raspi-config nonint do_i2c 0; then
      info "enabled (raspi-config nonint do_i2c 0)"
    else
      warn "raspi-config nonint do_i2c 0 failed: enable I2C with sudo raspi-config (Interface Options)"
    fi
  else
    info "raspi-config not found: make sure I2C is on (dtparam=i2c_arm=on in config.txt, module i2c-dev)"
  fi

  step "systemd units in $UNIT_DIR"
  mkdir -p "$DESTDIR$UNIT_DIR"
  for u in "${UNITS[@]}"; do
    src=$rel/systemd/$u
    dst=$DESTDIR$UNIT_DIR/$u
    if [ -e "$dst" ]; then upgrade=1; fi
    if cmp -s "$src" "$dst"; then
      info "$u unchanged"
    else
      install -m 0644 "$src" "$dst.tmp.$$"
      mv -T "$dst.tmp.$$" "$dst"
      units_changed=1
      info "$u installed"
    fi
    chmod 0644 "$dst"
  done
  systemctl daemon-reload
  if [ -n "$old" ]; then upgrade=1; fi
  if [ "$upgrade" = 1 ] && { [ "$changed" = 1 ] || [ "$units_changed" = 1 ]; }; then
    # A running daemon keeps the old code and unit until restarted (no-op when it is not running).
    if systemctl try-restart "$NAME.service"; then
      rm -f "$DESTDIR$OPT/.restart-pending"
    else
      warn "systemctl try-restart $NAME.service failed"
    fi
  else
    rm -f "$DESTDIR$OPT/.restart-pending"
  fi
  # A service left failed (a crash loop, an exit 78 the new release or config may fix) would stay down:
  # `start` refuses a unit past its start limit until the failure is reset.
  if systemctl is-failed --quiet "$NAME.service"; then
    systemctl reset-failed "$NAME.service" || warn "systemctl reset-failed $NAME.service failed"
    info "$NAME.service had failed: starting it again"
  fi
  if systemctl enable --now "$NAME.service" "$NAME-update.timer"; then
    info "enabled and started $NAME.service and $NAME-update.timer"
  else
    start_failed=1
    warn "systemctl enable --now failed: see journalctl -u $NAME.service"
  fi

  step "check: sudo -u $SVC_USER .../.venv/bin/python .../main.py check --config $ETC/config.toml"
  local rc=0 check_cfg=$DESTDIR$ETC/config.toml
  if [ -n "$DESTDIR" ]; then
    # Test mode touches nothing outside DESTDIR: the check's store (an absolute [store] dir, normally
    # $STATE) goes under it too, through a copy of the config that the check reads instead.
    check_cfg=$(mktemp "$DESTDIR$ETC/.config-check.XXXXXX.toml")
    trap 'rm -f "$check_cfg"' EXIT
    sed -E "s|^([[:space:]]*dir[[:space:]]*=[[:space:]]*\")/|\1$DESTDIR/|" "$DESTDIR$ETC/config.toml" >"$check_cfg"
    chmod 0644 "$check_cfg"
  fi
  if have sudo; then
    (cd / && sudo -u "$SVC_USER" "$DESTDIR$OPT/current/.venv/bin/python" "$DESTDIR$OPT/current/main.py" \
      check --config "$check_cfg") || rc=$?
  else
    warn "sudo is not installed: check skipped"
    rc=-1
  fi

  if [ -n "$DESTDIR" ]; then
    rm -f "$check_cfg"
    trap - EXIT
  fi
  printf '\n'
  if [ "$rc" = 0 ]; then
    info "check passed"
  elif [ "$rc" != -1 ]; then
    info "check FAILED (exit $rc). The install itself is complete and the service keeps retrying;"
    info "fix what is marked FAIL above (wiring, $ETC/config.toml), then run the check again:"
    info "  sudo -u $SVC_USER $OPT/current/.venv/bin/python $OPT/current/main.py check --config $ETC/config.toml"
  fi
  if [ "$start_failed" = 1 ]; then
    info "the service did not start: journalctl -u $NAME.service"
  fi
  cat <<EOF

SolarPowerBrampton installed: release $sha
    code     $OPT/current -> $rel_name
    config   $ETC/config.toml        (root:$SVC_USER 0640)
    token    $ETC/influx-token       (root:root 0600)
    store    $STATE
    status   systemctl status $NAME      logs: journalctl -u $NAME -f
    updates  systemctl list-timers $NAME-update.timer
EOF
}

if [ "$uninstall" = 1 ]; then
  do_uninstall
else
  do_install
fi

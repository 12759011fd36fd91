#!/usr/bin/env bash
# Install edged on this box as a systemd service, or remove it. Run as root from a checkout:
#
#   sudo scripts/install.sh                  # install or upgrade, then `systemctl enable --now edged`
#   sudo scripts/install.sh --prefix /srv/edged --no-start
#   sudo scripts/install.sh --compiled       # the call path compiled with mypyc (opt-in; falls back to pure Python)
#   sudo scripts/install.sh --uninstall      # remove the program, unit and user files; keep config and state
#   sudo scripts/install.sh --uninstall --purge   # also /etc/edged, /var/lib/edged and the edged user
#
# What it does (each step is skipped when already done, so running it again is safe and upgrades):
#   - Debian packages it needs (python3-venv; on armhf also gcc and Debian's PyYAML, cffi)
#   - a virtualenv at PREFIX (default /opt/edged) with edged in it; /usr/local/bin/edged links to it
#     (--compiled: built with EDGED_COMPILE=1, which needs gcc and the Python headers and takes about 10 min on a
#     Pi 4; if that build fails, the pure-Python build is installed instead and the reason is printed)
#   - the edged user and group (sysusers.d), /etc/edged and /etc/edged/services.d (tmpfiles.d)
#   - /etc/edged/edged.toml from config/edged.toml if there is none (0640 root:edged; an existing file is kept,
#     its mode tightened when group-writable or readable by others)
#   - /etc/systemd/system/edged.service pointing at PREFIX, then enable --now (restart when already running)
#
# pip honours its usual variables (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX) for offline installs.
set -euo pipefail

PREFIX=/opt/edged
UNINSTALL=0
PURGE=0
START=1
COMPILED=0
# --compiled: mypyc needs a C compiler and the Python headers.
COMPILE_APT="gcc libc6-dev python3-dev"
# armhf (32-bit Raspberry Pi OS): PyPI has no wheels for httptools, uvloop or cffi. Debian's
# PyYAML and cffi meet edged's floors and come in through --system-site-packages; httptools is compiled
# (Debian's 0.1 works but without the client's parser reuse, which needs 0.6.3); uvloop is left out (19
# minutes to compile on a Pi; asyncio's loop is used).
ARMHF_APT="python3-dev gcc libc6-dev python3-yaml python3-cffi"
# cryptography 46 and later need cffi 2, which has no armhf wheel either (and Debian 12 has cffi 1.15):
# 45 has an armhf wheel and works with Debian's cffi. cbor2 6 has no armhf wheel and needs Rust to build;
# 5.x comes as a pure-Python wheel.
ARMHF_PIP_CONSTRAINTS="cryptography<46 cbor2<6"

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || die "--prefix needs a folder"; PREFIX="$2"; shift 2 ;;
    --prefix=*) PREFIX="${1#--prefix=}"; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    --no-start) START=0; shift ;;
    --compiled) COMPILED=1; shift ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path, got $PREFIX" ;; esac
PREFIX="${PREFIX%/}"
[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 $*)"

SRC="$(cd "$(dirname "$0")/.." && pwd)"
UNIT=/etc/systemd/system/edged.service
SYSUSERS=/usr/lib/sysusers.d/edged.conf
TMPFILES=/usr/lib/tmpfiles.d/edged.conf
LINK=/usr/local/bin/edged
CONFIG=/etc/edged/edged.toml
booted() { [ -d /run/systemd/system ]; }  # systemd is PID 1 (not a chroot or a container build)

if [ "$UNINSTALL" -eq 1 ]; then
  if booted && systemctl cat edged.service >/dev/null 2>&1; then
    systemctl disable --now edged.service >/dev/null 2>&1 || true
  fi
  rm -f "$UNIT" "$SYSUSERS" "$TMPFILES"
  [ -L "$LINK" ] && rm -f "$LINK"
  if [ -x "$PREFIX/bin/edged" ] || [ -f "$PREFIX/.edged-install" ]; then rm -rf "$PREFIX"; fi
  booted && systemctl daemon-reload
  if [ "$PURGE" -eq 1 ]; then
    rm -rf /etc/edged /var/lib/edged /run/edged
    getent passwd edged >/dev/null && userdel edged
    getent group edged >/dev/null && groupdel edged
    say "removed edged, its config, state and user"
  else
    say "removed edged; kept /etc/edged, /var/lib/edged and the edged user (--purge removes them)"
  fi
  exit 0
fi

[ -f "$SRC/pyproject.toml" ] && [ -f "$SRC/systemd/edged.service" ] || die "run it from an edged checkout ($SRC)"
ARCH="$(dpkg --print-architecture 2>/dev/null || uname -m)"

# 1. Debian packages that are missing (nothing is fetched when all are there).
want="python3 python3-venv"
[ "$ARCH" = armhf ] && want="$want $ARMHF_APT"
[ "$COMPILED" -eq 1 ] && want="$want $COMPILE_APT"
missing=""
for pkg in $want; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  say "installing Debian packages:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends $missing >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing >/dev/null; } \
    || die "apt-get could not install:$missing"
fi

# 2. The virtualenv and edged in it.
venv_opts=""
extras="[speed]"
pip_opts=""
if [ "$ARCH" = armhf ]; then
  venv_opts="--system-site-packages"; extras=""
  constraints="$(mktemp)"; trap 'rm -f "$constraints"' EXIT
  printf '%s\n' $ARMHF_PIP_CONSTRAINTS >"$constraints"
  pip_opts="-c $constraints"
fi
if [ ! -x "$PREFIX/bin/python" ] || ! "$PREFIX/bin/python" -c 'import sys' 2>/dev/null; then
  say "creating the virtualenv $PREFIX"
  python3 -m venv $venv_opts "$PREFIX" || die "python3 -m venv $PREFIX failed"
fi
touch "$PREFIX/.edged-install"  # marks the folder as ours for --uninstall
pip_install() {
  "$PREFIX/bin/python" -m pip install -q --disable-pip-version-check --no-warn-script-location $pip_opts "$SRC$extras"
}
if [ "$COMPILED" -eq 1 ]; then
  # pip builds the whole wheel before it replaces anything: a failed build leaves the old install as it was.
  say "installing edged from $SRC into $PREFIX, compiled with mypyc (about 10 min on a Pi 4)"
  if ! EDGED_COMPILE=1 pip_install; then
    say "the compiled build FAILED (see above); installing the pure-Python build instead (same behaviour, more CPU per call)"
    pip_install || die "pip install failed (see above)"
  fi
else
  say "installing edged from $SRC into $PREFIX"
  pip_install || die "pip install failed (see above)"
fi
say "installed $("$PREFIX/bin/edged" --version)"
ln -sfn "$PREFIX/bin/edged" "$LINK"

# 3. User, group and folders.
install -D -m 0644 "$SRC/systemd/edged.sysusers" "$SYSUSERS"
install -D -m 0644 "$SRC/systemd/edged.tmpfiles" "$TMPFILES"
if command -v systemd-sysusers >/dev/null; then
  systemd-sysusers "$SYSUSERS"
else
  getent group edged >/dev/null || groupadd --system edged
  getent passwd edged >/dev/null || useradd --system -g edged -d /var/lib/edged -s /usr/sbin/nologin edged
fi
if command -v systemd-tmpfiles >/dev/null; then
  systemd-tmpfiles --create "$TMPFILES"
else
  install -d -m 0750 -o root -g edged /etc/edged /etc/edged/services.d
fi

# 4. The config: never overwritten; only made private (it may hold tokens and passwords).
if [ ! -e "$CONFIG" ]; then
  install -m 0640 -o root -g edged "$SRC/config/edged.toml" "$CONFIG"
  say "wrote $CONFIG (edit it, then: systemctl reload edged)"
else
  chgrp edged "$CONFIG"
  chmod g-w,o-rwx "$CONFIG"
fi

# 5. The unit, pointing at this prefix.
sed -e "s|/usr/local/bin/edged|$PREFIX/bin/edged|g" "$SRC/systemd/edged.service" >"$UNIT.tmp"
chmod 0644 "$UNIT.tmp"
mv -f "$UNIT.tmp" "$UNIT"
if ! booted; then
  say "installed; systemd is not running here, so edged was not started"
  exit 0
fi
systemctl daemon-reload
if [ "$START" -eq 0 ]; then
  systemctl enable edged.service >/dev/null 2>&1
  say "installed and enabled; start it with: systemctl start edged"
  exit 0
fi
if systemctl is-active --quiet edged.service; then
  systemctl enable edged.service >/dev/null 2>&1
  systemctl restart edged.service || die "edged did not restart: journalctl -u edged"
else
  systemctl enable --now edged.service >/dev/null 2>&1 || die "edged did not start: journalctl -u edged"
fi
say "edged is $(systemctl is-active edged.service): edged status, journalctl -u edged"

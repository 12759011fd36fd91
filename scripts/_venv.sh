# Sourced by scripts/edged and scripts/test: make sure .venv exists and holds edged with the given extras.
# Re-installs only when pyproject.toml changed since the last install.
VENV="${EDGED_VENV:-$PWD/.venv}"
_extras="${1:-speed}"
if [ ! -x "$VENV/bin/python" ]; then
  if ! python3 -m venv "$VENV" 2>/dev/null; then
    # Debian ships venv apart from python3.
    echo "python3 -m venv failed; installing python3-venv" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$VENV"; python3 -m venv "$VENV"
  fi
fi
_stamp="$VENV/.edged-installed-$_extras"
if [ ! -f "$_stamp" ] || [ pyproject.toml -nt "$_stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e ".[$_extras]"
  touch "$_stamp"
fi

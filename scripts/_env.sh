# Sourced by the scripts here: make a virtual environment in .venv with filterd installed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "filterd needs Python >= 3.11 (found: $("$PY" --version 2>&1))" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    if ! "$PY" -m venv .venv 2>/dev/null; then
        # Debian ships venv separately.
        if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            rm -rf .venv && "$PY" -m venv .venv
        else
            echo "cannot create a virtual environment: install python3-venv (apt-get install python3-venv)" >&2
            exit 1
        fi
    fi
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${FILTERD_EXTRAS:-}" \
        > .venv/install.log 2>&1; then
    cat .venv/install.log >&2
    echo "installing filterd failed (log above, also in .venv/install.log)" >&2
    exit 1
fi
.venv/bin/python -c 'import filterd' || { echo "filterd did not install" >&2; exit 1; }
export PATH="$here/.venv/bin:$PATH"

#!/usr/bin/env bash
# Set-up and entry point. `./run.sh caption IMAGES` runs captionkit (any subcommand);
# `./run.sh test` runs the test suite. Either creates .venv on first use.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${CAPTIONKIT_VENV:-$here/.venv}"
stamp="$venv/.captionkit-installed"
want="$(cat "$here/pyproject.toml" "$here/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "captionkit: setting up $venv (first run only)..." >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet -c "$here/constraints.txt" -e "$here[all,test]" >&2
  echo "$want" > "$stamp"
fi
if [ "${1:-}" = "test" ]; then
  shift
  cd "$here"
  # Bytecode caches (__pycache__, ignored by git): with PYTHONDONTWRITEBYTECODE set, as on some CI machines,
  # every test process and every process it starts compiles captionkit and the tests from source again
  # (3 s of CPU per test worker's collection alone).
  unset PYTHONDONTWRITEBYTECODE
  exec "$venv/bin/python" -m pytest "$@"
fi
exec "$venv/bin/captionkit" "$@"

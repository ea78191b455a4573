#!/usr/bin/env bash
# Creates (once) the project's virtual environment in .venv with ntkit installed in editable mode
# and its test dependencies. Safe to run repeatedly: re-installs only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >&2
fi
stamp=.venv/.ntkit-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # The CPU build of torch 2.13.0 is available locally on these machines; fall back to any allowed torch.
  if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q "torch==2.13.0" >&2 || .venv/bin/python -m pip install -q "torch<=2.14.1" >&2
  fi
  .venv/bin/python -m pip install -q -e ".[test]" >&2
  echo "$want" > "$stamp"
fi

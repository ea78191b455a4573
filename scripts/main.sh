#!/usr/bin/env bash
# The main job: set up the environment, then run the ntkit demo (exact kernels, finite vs infinite width).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m ntkit demo "$@"

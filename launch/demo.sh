#!/usr/bin/env bash
# The main job on its embedded default: sets everything up, then runs it. Extra args go to iv2,
# e.g. bash launch/demo.sh --config=configs/features.py:size=S
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/iv2 --workdir="${IV2_WORKDIR:-runs/demo}" "$@"

#!/usr/bin/env bash
# Set up (a local virtualenv) and run SELFEE on the built-in demo task, on CPU; prints a table per round.
set -euo pipefail
cd "$(dirname "$0")"
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
# torch first and pinned: 2.13.0 is a local CPU build; a dependency resolving it alone may pull CUDA wheels.
pip install -q "torch==2.13.0"
pip install -q -e .
PYTHONPATH="examples${PYTHONPATH:+:$PYTHONPATH}" python -m selfee_demo.run "$@"

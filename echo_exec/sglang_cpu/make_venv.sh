#!/usr/bin/env bash
# Make a venv with SGLang for `python -m echo_exec.sglang_cpu` and tests/test_replay_sglang.py (ECHO_SGLANG_PYTHON).
# It sees the system site-packages (the project, transformers); its own torch 2.14.1 + torchvision 0.29.1 shadow
# the project's pinned torch 2.13.0, beside which PyPI's torchvision does not load. About 6 GB.
#   bash echo_exec/sglang_cpu/make_venv.sh VENV     then     export ECHO_SGLANG_PYTHON=VENV/bin/python
set -euo pipefail
venv="${1:?usage: make_venv.sh VENV}"
here="$(cd "$(dirname "$0")" && pwd)"
python3 -m venv --system-site-packages "$venv"
"$venv/bin/pip" install --quiet torch==2.14.1 torchvision==0.29.1
"$venv/bin/pip" install --quiet --no-deps sglang==0.5.23
"$venv/bin/pip" install --quiet -r "$here/requirements.txt"
"$venv/bin/python" -c "import sglang, torch; print('sglang', sglang.__version__, 'torch', torch.__version__)"

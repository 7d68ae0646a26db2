#!/usr/bin/env bash
# Make a venv with SGLang for `python -m echo_exec.sglang_cpu` and the SGLang tests (ECHO_SGLANG_PYTHON).
# It sees the system site-packages (the project, transformers); its own torch 2.14.1 + torchvision 0.29.1 shadow
# the project's pinned torch 2.13.0, beside which PyPI's torchvision does not load. About 6 GB.
# Into it go echo's two SGLang pieces: the torch sgl_kernel CPU ops (echo_exec/sglang_cpu/sgl_kernel, on the path
# through a .pth file, so the venv follows the checkout) and the plugin distribution (echo_exec/sglang_plugin:
# entry point `echo` in group sglang.srt.plugins, installed editable).
#   bash echo_exec/sglang_cpu/make_venv.sh VENV     then     export ECHO_SGLANG_PYTHON=VENV/bin/python
set -euo pipefail
venv="${1:?usage: make_venv.sh VENV}"
here="$(cd "$(dirname "$0")" && pwd)"
python3 -m venv --system-site-packages "$venv"
"$venv/bin/pip" install --quiet torch==2.14.1 torchvision==0.29.1
"$venv/bin/pip" install --quiet --no-deps sglang==0.5.23
"$venv/bin/pip" install --quiet -r "$here/requirements.txt"
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$here" > "$site/echo_sgl_kernel_cpu.pth"
"$venv/bin/pip" install --quiet --no-deps --no-build-isolation -e "$here/../sglang_plugin"
"$venv/bin/python" -c "import sglang, torch, sgl_kernel, echo_sglang_plugin; print('sglang', sglang.__version__, 'torch', torch.__version__, 'sgl_kernel', sgl_kernel.__version__)"

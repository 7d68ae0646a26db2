"""Host memory: the engine keeps freed pages (glibc malloc tuned), so a step's transient tensors stop
page-faulting in again; measured as minor page faults of a step-like allocation pattern, in fresh processes."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

STEPS = """
import resource, sys, numpy as np
if sys.argv[1] == "tuned":
    from echo_exec.host_memory import keep_freed_memory
    assert keep_freed_memory()
sizes = [3, 9, 20, 5, 12]  # MB: one step's activations, of varying size
def step():
    keep = [np.ones(s << 18, np.float32) for s in sizes]
    del keep
step()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


def _faults(mode: str, env: dict | None = None) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_tuned_malloc_stops_refaulting_a_steps_memory():
    plain, tuned = _faults("plain"), _faults("tuned")
    assert plain > 5000  # every step maps and faults its large tensors in again
    assert tuned < plain / 20


def test_opt_out_and_engine_applies_it():
    code = ("import os; os.environ['ECHO_KEEP_FREED_MEMORY'] = '0'; "
            "from echo_exec.host_memory import keep_freed_memory; print(keep_freed_memory())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    code = ("import echo_exec.host_memory as hm; from echo_exec.engine import Engine; "
            "from echo_exec.train_tiny import MODELS_DIR; Engine(MODELS_DIR / 'tiny-target', policy='ar'); "
            "print(hm._done)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    expected = "True" if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" else "False"
    assert out.stdout.strip() == expected

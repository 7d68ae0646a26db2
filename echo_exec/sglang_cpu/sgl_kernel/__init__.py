"""Import-time stand-in for sgl_kernel, put on PYTHONPATH only by echo_exec.sglang_cpu and only when no real
sgl_kernel imports. SGLang's CPU engine imports kernel names from sgl_kernel at module load, for paths this
launcher does not turn on (AMX GEMMs, speculative KV moves); PyPI has no CPU build of sgl-kernel. Every name
imports; calling one raises NotImplementedError with its name, so a run that would need a real kernel stops
loudly instead of computing anything else; with ECHO_SGL_STANDIN_LOG set, each call's name is also appended to
that file (tests check that a run made none)."""

import os

__version__ = "0.0.0+echo-standin"


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        log = os.environ.get("ECHO_SGL_STANDIN_LOG")
        if log:  # a caller may catch the error and fall back: the log still shows the call
            with open(log, "a") as f:
                f.write(name + "\n")
        raise NotImplementedError(f"sgl_kernel.{name} is not available on this machine (echo's import stand-in)")

    missing.__name__ = name
    return missing

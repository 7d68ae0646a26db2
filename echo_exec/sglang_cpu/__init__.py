"""Start a live SGLang server on a CPU, for replay and cross-checks where no GPU is lent.

SGLang runs on a CPU with SGLANG_USE_CPU_ENGINE=1 and its torch-native attention backend; this module builds that
command for a model directory (ours ship a Hugging Face tokenizer.json, so SGLang reads text byte for byte as
`echosim serve` does). Where `sgl_kernel` does not import, the `sgl_kernel/` stand-in beside this file goes on
PYTHONPATH: see its docstring. SGLang itself is not a dependency of the project: `python` is an interpreter that
has it (docs/REPLAY.md says how to make one).

    python -m echo_exec.sglang_cpu --python VENV/bin/python --model echo_exec/models/tiny-target --port 30000
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

STANDIN_DIR = Path(__file__).resolve().parent
ROOT = STANDIN_DIR.parents[1]


@dataclass(frozen=True)
class Speculative:
    """SGLang's speculative flags. algorithm: ECHO (echo's plugin; `policy` and `policy_config` pick the
    echosim.spec policy), STANDALONE (SGLang's own tree: global top N-1 by path score) or EAGLE/EAGLE3."""

    algorithm: str
    draft_dir: str | Path
    steps: int
    topk: int
    num_draft_tokens: int
    policy: str | None = None
    policy_config: str | None = None

    def args(self) -> list[str]:
        out = ["--speculative-algorithm", self.algorithm, "--speculative-draft-model-path", str(self.draft_dir),
               "--speculative-num-steps", str(self.steps), "--speculative-eagle-topk", str(self.topk),
               "--speculative-num-draft-tokens", str(self.num_draft_tokens)]
        if self.policy:
            out += ["--speculative-echo-policy", self.policy]
        if self.policy_config:
            out += ["--speculative-echo-config", self.policy_config]
        return out


def has_sglang(python: str) -> tuple[bool, bool]:
    """(sglang imports, sgl_kernel imports) in that interpreter."""
    def ok(module: str) -> bool:
        return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0
    return ok("sglang"), ok("sgl_kernel")


def server_command(model_dir: str | Path, *, port: int, host: str = "127.0.0.1", python: str = sys.executable,
                   dtype: str = "float32", max_total_tokens: int = 65536, max_running_requests: int | None = None,
                   radix_cache: bool = False, standin: bool = True, attention_backend: str = "torch_native",
                   speculative: Speculative | None = None, threads: int | None = None,
                   extra: tuple[str, ...] = ()) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of `sglang.launch_server` on the CPU. fp32 by default, as our engine runs; no prefix
    cache by default, since our server has none and replayed prompts share prefixes. Speculative decoding needs
    attention_backend intel_amx (kept on CPUs without AMX by echo's plugin, with echo's torch sgl_kernel)."""
    argv = [python, "-m", "sglang.launch_server", "--model-path", str(model_dir), "--device", "cpu",
            "--attention-backend", attention_backend, "--disable-cuda-graph", "--dtype", dtype,
            "--max-total-tokens", str(max_total_tokens), "--host", host, "--port", str(port)]
    if max_running_requests:
        argv += ["--max-running-requests", str(max_running_requests)]
    if not radix_cache:
        argv.append("--disable-radix-cache")
    if speculative is not None:
        argv += speculative.args()
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1")
    if threads:  # a modest count shares the machine
        env["OMP_NUM_THREADS"] = str(threads)
    if standin:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(STANDIN_DIR), env.get("PYTHONPATH", "")) if p)
    return argv + list(extra), env


def launch(model_dir: str | Path, *, port: int, python: str = sys.executable, log_path: str | Path | None = None,
           **kwargs) -> subprocess.Popen:
    """Start the server (stdout and stderr to `log_path`, or discarded); the caller stops it."""
    _, kernel = has_sglang(python)
    argv, env = server_command(model_dir, port=port, python=python, standin=not kernel, **kwargs)
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 - lives as long as the server
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM the server's process group (SGLang runs a scheduler and a detokenizer beside its HTTP process),
    then SIGKILL what is left after `timeout_s`."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 300.0) -> None:
    """Until GET /health answers 200; raises RuntimeError if the server exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the SGLang server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the SGLang server at {url} was not ready after {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m echo_exec.sglang_cpu", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--python", default=sys.executable, help="an interpreter with sglang installed")
    p.add_argument("--max-running-requests", type=int, default=None)
    p.add_argument("--max-total-tokens", type=int, default=65536, help="KV capacity in tokens")
    args = p.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        print(f"error: {args.model}: no config.json (--model is a Hugging Face model directory)", file=sys.stderr)
        return 2
    sglang, kernel = has_sglang(args.python)
    if not sglang:
        print(f"error: sglang does not import in {args.python} (docs/REPLAY.md: how to make an SGLang venv)",
              file=sys.stderr)
        return 2
    cmd, env = server_command(args.model, port=args.port, python=args.python, standin=not kernel,
                              max_total_tokens=args.max_total_tokens, max_running_requests=args.max_running_requests)
    print(" ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


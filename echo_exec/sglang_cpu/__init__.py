"""Start a live SGLang server on a CPU, for replay, cross-checks and speculation where no GPU is lent.

SGLang runs on a CPU with SGLANG_USE_CPU_ENGINE=1; this module builds that command for a model directory (ours ship
a Hugging Face tokenizer.json, so SGLang reads text byte for byte as `echosim serve` does). Plain decoding runs
SGLang's torch-native attention; speculative decoding (ECHO through echo's plugin, STANDALONE) runs its intel_amx
backend, whose sgl_kernel CPU ops are echo's torch implementation beside this file (`sgl_kernel/`; make_venv.sh
puts it and the plugin, echo_exec/sglang_plugin, into the venv; where no sgl_kernel imports, the launcher puts the
directory on PYTHONPATH). SGLang itself is not a dependency of the project: `python` is an interpreter that has it
(docs/REPLAY.md says how to make one).

    python -m echo_exec.sglang_cpu --python VENV/bin/python --model echo_exec/models/tiny-target --port 30000 \
        [--speculative ECHO [--policy echo] [--policy-config FILE] [--ragged-verify]]
    python -m echo_exec.sglang_cpu ... --speculative EAGLE3 [--draft echo_exec/models/tiny-eagle3]
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

from echo_exec.errors import ExecError

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
    ragged: bool = False  # ECHO on a CPU: verify only the real tree nodes (echo's kernels), no dense pads

    def args(self) -> list[str]:
        out = ["--speculative-algorithm", self.algorithm, "--speculative-draft-model-path", str(self.draft_dir),
               "--speculative-num-steps", str(self.steps), "--speculative-eagle-topk", str(self.topk),
               "--speculative-num-draft-tokens", str(self.num_draft_tokens)]
        if self.policy:
            out += ["--speculative-echo-policy", self.policy]
        if self.policy_config:
            out += ["--speculative-echo-config", self.policy_config]
        return out


def heldout_prompts(n: int, nbytes: int = 120) -> list[list[int]]:
    """n byte prompts (token ids of the shipped byte tokenizer) from stdlib files the tiny pair never trained on
    (echo_exec.train_tiny.split_files): one per file in path order from a third of the way into it, then (past the
    number of files) from two thirds of the way."""
    from echo_exec.train_tiny import split_files

    _, held = split_files()
    files = sorted((f for f in held if f.stat().st_size > 4 * nbytes), key=lambda f: f.as_posix())
    if 2 * len(files) < n:
        raise ExecError(f"only {len(files)} held-out files of more than {4 * nbytes} bytes, {n} prompts asked")
    out = []
    for part in (1, 2):
        for f in files:
            if len(out) < n:
                data = f.read_bytes()
                at = len(data) * part // 3
                out.append(list(data[at:at + nbytes]))
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
    if speculative is not None and speculative.ragged:
        env["ECHO_SGLANG_RAGGED"] = "1"
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


def speculative_for(algorithm: str, draft_dir: str | Path, *, policy: str | None = None,
                    policy_config: str | Path | None = None, steps: int | None = None, topk: int | None = None,
                    num_draft_tokens: int | None = None, ragged: bool = False) -> Speculative:
    """SGLang's speculative flags. For ECHO the drafting shape comes from the policy (echosim.spec), whose config
    is `policy_config`, else the draft directory's policy-NAME.json (as `echosim serve` picks it), else the
    policy's defaults; SGLang's dense width N is the policy's largest tree. Explicit steps/topk/N override."""
    from echosim.spec.policies import load_policy, make_policy

    algorithm = algorithm.upper()
    if algorithm != "ECHO":
        return Speculative(algorithm, draft_dir, steps or 5, topk or 2, num_draft_tokens or 10)
    name = policy or "echo"
    shipped = Path(draft_dir) / f"policy-{name}.json"
    if policy_config is None and shipped.is_file():
        policy_config = shipped
    pol = load_policy(policy_config) if policy_config is not None else make_policy(name)
    plan = pol.plan(1)
    if plan.depth == 0:
        raise ExecError(f"policy {pol.name!r} drafts nothing: serve it without --speculative", field="policy")
    tree = pol.max_tree_tokens() or 1 + plan.k1 + (plan.depth - 1) * plan.k * plan.k
    return Speculative("ECHO", draft_dir, steps or plan.depth, topk or plan.k, num_draft_tokens or tree,
                       policy=pol.name, policy_config=str(policy_config) if policy_config is not None else None,
                       ragged=ragged)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m echo_exec.sglang_cpu", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--python", default=sys.executable, help="an interpreter with sglang installed")
    p.add_argument("--max-running-requests", type=int, default=None)
    p.add_argument("--max-total-tokens", type=int, default=65536, help="KV capacity in tokens")
    p.add_argument("--speculative", default=None, metavar="ALGO",
                   help="ECHO (echo's plugin: an echosim.spec policy picks the trees), STANDALONE, EAGLE or EAGLE3")
    p.add_argument("--draft", default=None, help="draft model directory (default beside --model: tiny-eagle3 for "
                                                  "EAGLE3, else tiny-draft)")
    p.add_argument("--policy", default=None, help="ECHO: the echosim.spec policy (default echo)")
    p.add_argument("--policy-config", default=None, help="ECHO: the policy's JSON config file")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--topk", type=int, default=None)
    p.add_argument("--num-draft-tokens", type=int, default=None)
    p.add_argument("--ragged-verify", action="store_true",
                   help="ECHO: verify only each request's selected nodes (packed, no pads; CPU only)")
    p.add_argument("--attention-backend", default=None,
                   help="default: intel_amx (echo's torch kernels) when speculative, else torch_native")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server")
    args = p.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        print(f"error: {args.model}: no config.json (--model is a Hugging Face model directory)", file=sys.stderr)
        return 2
    spec = None
    if args.speculative:
        # EAGLE3 drafts with an EAGLE-3 head (it reads the target's hidden states): the shipped one is tiny-eagle3
        default = "tiny-eagle3" if args.speculative.upper() == "EAGLE3" else "tiny-draft"
        draft = Path(args.draft) if args.draft else Path(args.model).resolve().parent / default
        if not (draft / "config.json").is_file():
            print(f"error: {draft}: no config.json (--draft is the draft model's directory)", file=sys.stderr)
            return 2
        try:
            spec = speculative_for(args.speculative, draft, policy=args.policy, policy_config=args.policy_config,
                                   steps=args.steps, topk=args.topk, num_draft_tokens=args.num_draft_tokens,
                                   ragged=args.ragged_verify)
        except ValueError as exc:  # a policy config error names its file and field
            print(f"error: {exc}", file=sys.stderr)
            return 2
    sglang, kernel = has_sglang(args.python)
    if not sglang:
        print(f"error: sglang does not import in {args.python} (docs/REPLAY.md: how to make an SGLang venv)",
              file=sys.stderr)
        return 2
    backend = args.attention_backend or ("intel_amx" if spec else "torch_native")
    extra = ("--disable-overlap-schedule",) if spec else ()
    cmd, env = server_command(args.model, port=args.port, python=args.python, standin=not kernel,
                              max_total_tokens=args.max_total_tokens, max_running_requests=args.max_running_requests,
                              attention_backend=backend, speculative=spec, threads=args.threads, extra=extra)
    print(" ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)

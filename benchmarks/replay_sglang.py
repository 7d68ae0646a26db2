"""One trace replayed by `echosim replay` against a live SGLang server and against `echosim serve`, side by side.

Same model (the shipped tiny target), same trace slice, same replay client, on this CPU; the servers run one at a
time, each started fresh. SGLang decodes plainly (its speculative workers need GPU kernels); `echosim serve` runs
ar, eagle3 (topk 4, steps 4, N 16) and echo. Report ratios: the machine is shared.

    python benchmarks/replay_sglang.py --sglang-python VENV/bin/python [--trace synthetic_bursty_4rps] \
        [--limit 48] [--time-scales 1,0.5] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from echo_exec import sglang_cpu
from echosim.cli import main as echosim

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "echo_exec" / "models" / "tiny-target"
DRAFT = ROOT / "echo_exec" / "models" / "tiny-draft"
SERVERS = {  # name: echosim serve arguments (None = SGLang)
    "sglang": None,
    "echo-ar": ["--policy", "ar"],
    "echo-eagle3": ["--policy", "eagle3", "--policy-config", '{"steps": 4, "topk": 4, "num_draft_tokens": 16}'],
    "echo-echo": ["--policy", "echo"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, args, sglang_python: str, max_running: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if args is None:
        proc = sglang_cpu.launch(TARGET, port=port, python=sglang_python, log_path=log,
                                 max_running_requests=max_running)
    else:
        cmd = [sys.executable, "-m", "echosim.cli", "serve", "--model", str(TARGET), "--draft", str(DRAFT),
               "--port", str(port), "--max-running", str(max_running), *args]
        proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        sglang_cpu.wait_ready(url, proc, timeout_s=300)
    except RuntimeError:
        sglang_cpu.stop(proc)
        raise
    return proc, url


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sglang-python", required=True)
    p.add_argument("--trace", default="synthetic_bursty_4rps")
    p.add_argument("--limit", type=int, default=48)
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--max-output-tokens", type=int, default=64)
    p.add_argument("--max-running", type=int, default=16)
    p.add_argument("--time-scales", default="1,0.5")
    p.add_argument("--servers", default=",".join(SERVERS), help="which of " + ", ".join(SERVERS))
    p.add_argument("--echo-config", default=None, help="echo-echo's --policy-config (inline JSON or a file)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    servers = {name: SERVERS[name] for name in a.servers.split(",")}
    if a.echo_config:
        servers["echo-echo"] = ["--policy", "echo", "--policy-config", a.echo_config]
    out = Path(a.out or tempfile.mkdtemp(prefix="replay-sglang-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, args in servers.items():
        proc, url = start(name, args, a.sglang_python, a.max_running, out / f"{name}.log")
        try:
            for scale in [float(s) for s in a.time_scales.split(",")]:
                run = out / f"{name}-x{scale:g}"
                rc = echosim(["replay", "--trace", a.trace, "--url", url, "--out", str(run), "--quiet",
                              "--limit", str(a.limit), "--max-prompt-tokens", str(a.max_prompt_tokens),
                              "--max-output-tokens", str(a.max_output_tokens), "--time-scale", str(scale)])
                s = json.loads((run / "summary.json").read_text())
                rows.append(dict(server=name, time_scale=scale, rc=rc, completed=s["completed"],
                                 requests=s["requests"], tok_s=s["throughput_tok_s"], mat=s["mat"],
                                 ttft_p50_ms=s["ttft_ms"]["p50"], tpot_p50_ms=s["tpot_ms"]["p50"],
                                 e2e_mean_ms=s["e2e_ms"]["mean"]))
        finally:
            sglang_cpu.stop(proc)
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    first = next(iter(servers))
    base = {r["time_scale"]: r["tok_s"] for r in rows if r["server"] == first}
    print(f"| server | time scale | completed | tok/s | vs {first} | MAT | TTFT p50 ms | TPOT p50 ms | E2E mean ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mat = "–" if r["mat"] is None else f"{r['mat']:.2f}"
        print(f"| {r['server']} | {r['time_scale']:g} | {r['completed']}/{r['requests']} | {r['tok_s']:.1f} | "
              f"{r['tok_s'] / base[r['time_scale']]:.2f}x | {mat} | {r['ttft_p50_ms']:.1f} | "
              f"{r['tpot_p50_ms']:.1f} | {r['e2e_mean_ms']:.0f} |")
    print(f"runs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SGLang's own server on this CPU: plain decoding vs SGLang+STANDALONE vs SGLang+ECHO, tokens/s at several
concurrencies, side by side in one run.

Servers run one at a time, each started fresh, on the shipped tiny target (fp32); speculative ones with the shipped
tiny draft and SGLang's intel_amx attention (kept on this AMX-less CPU by echo's plugin, echo's torch sgl_kernel).
Plain SGLang runs twice: with its own torch_native attention (SGLang's code only) and with intel_amx (the same
attention kernels the speculative servers use). ECHO runs the policy settings shipped with the draft
(tiny-draft/policy-echo.json: steps 5, topk 2, N 10), dense (SGLang's layout, pads) and ragged (echo's CPU kernels
verify only the selected nodes); STANDALONE the same shape (steps 5, topk 2, N 10).
Load: closed loop, `concurrency` requests in flight, held-out prompts (120 bytes), greedy, ignore_eos.

    python benchmarks/bench_sglang_spec.py --sglang-python VENV/bin/python [--concurrency 1,4,16]
        [--tokens 64] [--rounds 3] [--min-requests 8] [--servers plain,plain-amx,standalone,echo,echo-ragged]
        [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from echo_exec import sglang_cpu

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "echo_exec" / "models" / "tiny-target"
DRAFT = ROOT / "echo_exec" / "models" / "tiny-draft"


def servers() -> dict[str, dict]:
    return {
        "plain": dict(attention_backend="torch_native"),
        "plain-amx": dict(attention_backend="intel_amx"),
        "standalone": dict(attention_backend="intel_amx", speculative=sglang_cpu.speculative_for(
            "STANDALONE", DRAFT, steps=5, topk=2, num_draft_tokens=10)),
        "echo": dict(attention_backend="intel_amx", speculative=sglang_cpu.speculative_for("ECHO", DRAFT)),
        "echo-ragged": dict(attention_backend="intel_amx",
                            speculative=sglang_cpu.speculative_for("ECHO", DRAFT, ragged=True)),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    import urllib.request
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=900) as resp:
        return json.loads(resp.read())


def load(url: str, prompts: list[list[int]], concurrency: int, tokens: int) -> dict:
    params = {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        metas = list(pool.map(lambda ids: post(url + "/generate", {"input_ids": ids, "sampling_params": params})
                              ["meta_info"], prompts))
    wall = time.perf_counter() - t0
    out = sum(m["completion_tokens"] for m in metas)
    steps = sum(m.get("spec_verify_ct") or 0 for m in metas)
    return dict(requests=len(metas), tokens=out, wall_s=round(wall, 3), tok_s=round(out / wall, 2),
                tokens_per_step=round(out / steps, 3) if steps else None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sglang-python", required=True)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--rounds", type=int, default=3, help="requests per concurrency = rounds x concurrency ...")
    p.add_argument("--min-requests", type=int, default=8, help="... and at least this many")
    p.add_argument("--servers", default="plain,plain-amx,standalone,echo,echo-ragged")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per server")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    conc = [int(c) for c in a.concurrency.split(",")]
    out = Path(a.out or tempfile.mkdtemp(prefix="bench-sglang-spec-"))
    out.mkdir(parents=True, exist_ok=True)
    count = {c: max(a.rounds * c, a.min_requests) for c in conc}
    prompts = sglang_cpu.heldout_prompts(max(count.values()) + 1)
    rows = []
    names = a.servers.split(",")
    for i, name in enumerate(names):
        kw = servers()[name]
        label = name if names.index(name) == i else f"{name} (again)"  # a repeat brackets the load's drift
        port = free_port()
        extra = ("--disable-overlap-schedule",) if "speculative" in kw else ()
        proc = sglang_cpu.launch(TARGET, port=port, python=a.sglang_python, log_path=out / f"{label}.log",
                                 max_running_requests=max(conc), threads=a.threads, extra=extra, **kw)
        url = f"http://127.0.0.1:{port}"
        try:
            sglang_cpu.wait_ready(url, proc, timeout_s=900)
            load(url, prompts[-1:], 1, 8)  # warm-up
            for c in conc:
                r = load(url, prompts[:count[c]], c, a.tokens)
                rows.append(dict(server=label, concurrency=c, load1=os.getloadavg()[0], **r))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            sglang_cpu.stop(proc)
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    base = {r["concurrency"]: r["tok_s"] for r in rows if r["server"] == rows[0]["server"]}
    print(f"\n| server | concurrency | requests | tok/s | vs {rows[0]['server']} | tokens/verify | load (1 min) |")
    print("|---|---|---|---|---|---|---|")
    order = [r["server"] for r in rows]
    for r in sorted(rows, key=lambda r: (r["concurrency"], order.index(r["server"]))):
        tps = "–" if r["tokens_per_step"] is None else f"{r['tokens_per_step']:.2f}"
        print(f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['tok_s']:.1f} | "
              f"{r['tok_s'] / base[r['concurrency']]:.2f}x | {tps} | {r['load1']:.1f} |")
    print(f"runs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SGLang's own server on this CPU: plain decoding vs SGLang+STANDALONE vs SGLang+ECHO (adaptive, static), tokens/s
at several concurrencies, side by side in one run.

The servers run in phases of at most three at once (memory: each SGLang server holds about 3.5 GB in its three
processes); a phase's servers start together and are measured in turn, interleaved (server after server,
repeated): on this shared machine the load drifts by 2x within minutes, and interleaving spreads the drift over
every server of the phase alike. Every phase starts with the same anchor server (plain SGLang by default), and each
server's speed is given as its median and range and as a ratio to the anchor's median in its own phase.
Shipped tiny target (fp32); speculative servers with the shipped tiny draft and SGLang's intel_amx attention
(kept on this AMX-less CPU by echo's plugin, echo's torch sgl_kernel).
`plain` is plain SGLang with its own torch_native attention (SGLang's code only; `plain-amx`: with intel_amx, the
kernels the speculative servers use). `echo` runs the policy settings shipped with the draft
(tiny-draft/policy-echo.json: the online-adaptive budget around a 5 x 4 beam, N 24), dense (SGLang's layout, pads)
and `echo-ragged` (echo's CPU kernels verify only the selected nodes); `echo-static` the same settings without the
adaptive budget (every step drafts the full 5 x 4 beam and verifies the top 23); STANDALONE steps 5, topk 2, N 10;
`eagle3` SGLang's EAGLE3 with the shipped EAGLE-3 head (tiny-eagle3), steps 5, topk 2, N 10.
Load: closed loop, `concurrency` requests in flight, held-out prompts (120 bytes), greedy, ignore_eos.
"verified/request/step": tokens through the target's verify forward per request and step (ECHO, from the plugin's
records: N for a dense drafting step, the tree's size for a ragged one, 1 for a plain decoding step).

    python benchmarks/bench_sglang_spec.py --sglang-python VENV/bin/python [--concurrency 1,4,16]
        [--tokens 64] [--rounds 2] [--min-requests 6] [--repeats 3]
        [--servers "plain,echo-static,echo;plain,standalone,echo-ragged" (phases split by ';', at most 3
         servers each, the same first server in each; also: plain-amx, eagle3)]
        [--echo-config FILE] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from echo_exec import sglang_cpu

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "echo_exec" / "models" / "tiny-target"
DRAFT = ROOT / "echo_exec" / "models" / "tiny-draft"
HEAD = ROOT / "echo_exec" / "models" / "tiny-eagle3"  # EAGLE-3 head: reads the target's hidden states


def static_echo_config(out: Path) -> Path:
    """The shipped policy-echo.json without its online-adaptive budget (its inner, static policy)."""
    cfg = json.loads((DRAFT / "policy-echo.json").read_text())
    cfg.pop("adaptive", None)
    path = out / "policy-echo-static.json"
    path.write_text(json.dumps(cfg))
    return path


def servers(out: Path) -> dict[str, dict]:
    return {
        "plain": dict(attention_backend="torch_native"),
        "plain-amx": dict(attention_backend="intel_amx"),
        "standalone": dict(attention_backend="intel_amx", speculative=sglang_cpu.speculative_for(
            "STANDALONE", DRAFT, steps=5, topk=2, num_draft_tokens=10)),
        "eagle3": dict(attention_backend="intel_amx", speculative=sglang_cpu.speculative_for(
            "EAGLE3", HEAD, steps=5, topk=2, num_draft_tokens=10)),
        "echo": dict(attention_backend="intel_amx", speculative=sglang_cpu.speculative_for("ECHO", DRAFT)),
        "echo-static": dict(attention_backend="intel_amx", speculative=sglang_cpu.speculative_for(
            "ECHO", DRAFT, policy_config=static_echo_config(out))),
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


def verified_per_request_step(records: Path, spec) -> float | None:
    """Tokens through the target's verify forward per request and step: N for a dense server; for ECHO from the
    plugin's records (ECHO_SGLANG_RECORDS): per request and step 1 in a plain decoding step, else N dense or the
    tree the policy selected ragged."""
    if spec is None:
        return 1.0
    if spec.algorithm != "ECHO" or not records.is_file():
        return float(spec.num_draft_tokens)
    sizes = []
    for line in records.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("plain"):
            sizes += [1] * len(rec["tree_tokens"])
        else:
            sizes += rec["tree_tokens"] if spec.ragged else [spec.num_draft_tokens] * len(rec["tree_tokens"])
    return sum(sizes) / len(sizes) if sizes else None


def parse_phases(text: str, known: set[str], max_up: int = 3) -> list[list[str]]:
    """`a,b,c;a,d,e` -> [[a, b, c], [a, d, e]]: at most `max_up` servers a phase, each phase led by the same anchor,
    no server twice (other than the anchor)."""
    phases = [[n.strip() for n in part.split(",") if n.strip()] for part in text.split(";") if part.strip()]
    if not phases:
        raise SystemExit("error: --servers: no server named")
    anchor, seen = phases[0][0], set()
    for ph in phases:
        unknown = [n for n in ph if n not in known]
        if unknown:
            raise SystemExit(f"error: --servers: unknown server {unknown[0]!r}; known: {', '.join(sorted(known))}")
        if len(ph) > max_up:
            raise SystemExit(f"error: --servers: phase {','.join(ph)} has {len(ph)} servers, at most {max_up} "
                             "(--max-up)")
        if ph[0] != anchor:
            raise SystemExit(f"error: --servers: every phase starts with the anchor {anchor!r} (got {ph[0]!r})")
        twice = seen & set(ph[1:])
        if twice or len(set(ph)) != len(ph):
            raise SystemExit(f"error: --servers: {sorted(twice)[0] if twice else ph} measured twice")
        seen |= set(ph[1:])
    return phases


def uptime() -> str:
    import subprocess
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


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
    p.add_argument("--rounds", type=int, default=2, help="requests per measurement = rounds x concurrency ...")
    p.add_argument("--min-requests", type=int, default=6, help="... and at least this many")
    p.add_argument("--repeats", type=int, default=3, help="measurements per server and concurrency (interleaved)")
    p.add_argument("--servers", default="plain,echo-static,echo;plain,standalone,echo-ragged",
                   help="phases split by ';' (each: comma-separated servers, led by the same anchor)")
    p.add_argument("--max-up", type=int, default=3, help="servers up at once, at most (memory)")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per server")
    p.add_argument("--echo-config", default=None, help="ECHO's policy config (default: the draft's policy-echo.json)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    conc = [int(c) for c in a.concurrency.split(",")]
    out = Path(a.out or tempfile.mkdtemp(prefix="bench-sglang-spec-"))
    out.mkdir(parents=True, exist_ok=True)
    table = servers(out)
    phases = parse_phases(a.servers, set(table), a.max_up)
    count = {c: max(a.rounds * c, a.min_requests) for c in conc}
    prompts = sglang_cpu.heldout_prompts(max(count.values()) + 1)
    rows, loads = [], {"start": uptime()}
    print(loads["start"], flush=True)
    for phase, names in enumerate(phases):
        rows += run_phase(a, out, table, phase, names, conc, count, prompts)
        loads[f"after phase {phase}"] = uptime()
        print(loads[f"after phase {phase}"], flush=True)
    (out / "results.json").write_text(json.dumps({"uptime": loads, "rows": rows}, indent=1) + "\n")
    print_table(rows, phases, conc)
    print(f"runs in {out}")
    return 0


def run_phase(a, out: Path, table: dict, phase: int, names: list[str], conc: list[int], count: dict[int, int],
              prompts: list[list[int]]) -> list[dict]:
    """Start the phase's servers together, measure them interleaved at each concurrency, stop them."""
    specs, procs, urls, rows = {}, {}, {}, []
    try:
        for name in names:  # the phase's servers up at once; idle ones wait on their sockets
            kw = dict(table[name])
            spec = kw.get("speculative")
            if spec is not None and spec.algorithm == "ECHO" and a.echo_config and name != "echo-static":
                kw["speculative"] = spec = dataclasses.replace(spec, policy_config=a.echo_config)
            specs[name] = spec
            if spec is not None and spec.algorithm == "ECHO":
                os.environ["ECHO_SGLANG_RECORDS"] = str(out / f"{name}-records.jsonl")
            port = free_port()
            # idle SGLang schedulers poll a busy loop: sleep-on-idle keeps the servers not being measured off the CPU
            extra = ("--sleep-on-idle",) + (("--disable-overlap-schedule",) if spec is not None else ())
            procs[name] = sglang_cpu.launch(TARGET, port=port, python=a.sglang_python,
                                            log_path=out / f"{name}-phase{phase}.log", max_running_requests=max(conc),
                                            threads=a.threads, extra=extra, **kw)
            os.environ.pop("ECHO_SGLANG_RECORDS", None)
            urls[name] = f"http://127.0.0.1:{port}"
        for name in names:
            sglang_cpu.wait_ready(urls[name], procs[name], timeout_s=900)
            load(urls[name], prompts[-1:], 1, 8)  # warm-up
        for c in conc:
            for rep in range(a.repeats):  # interleaved: drifts in the machine's load hit every server alike
                for name in names:
                    records = out / f"{name}-records.jsonl"
                    records.unlink(missing_ok=True)
                    r = load(urls[name], prompts[:count[c]], c, a.tokens)
                    r["verified_per_req_step"] = verified_per_request_step(records, specs[name])
                    rows.append(dict(phase=phase, server=name, concurrency=c, repeat=rep, load1=os.getloadavg()[0],
                                     **r))
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        for proc in procs.values():
            sglang_cpu.stop(proc)
    return rows


def print_table(rows: list[dict], phases: list[list[str]], conc: list[int]) -> None:
    anchor = phases[0][0]
    print(f"\n| phase | server | concurrency | requests x repeats | tok/s (median) | min-max | vs {anchor} (its phase) "
          "| tokens/verify | verified/request/step | load (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in conc:
        for phase, names in enumerate(phases):
            med = {}
            for name in names:
                mine = [r for r in rows if r["phase"] == phase and r["server"] == name and r["concurrency"] == c]
                med[name] = statistics.median(r["tok_s"] for r in mine)
                tps = [r["tokens_per_step"] for r in mine if r["tokens_per_step"]]
                ver = [r["verified_per_req_step"] for r in mine if r["verified_per_req_step"] is not None]
                print(f"| {phase} | {name} | {c} | {mine[0]['requests']} x {len(mine)} | {med[name]:.1f} | "
                      f"{min(r['tok_s'] for r in mine):.0f}-{max(r['tok_s'] for r in mine):.0f} | "
                      f"{med[name] / med[anchor]:.2f}x | {statistics.mean(tps) if tps else float('nan'):.2f} | "
                      f"{statistics.mean(ver) if ver else float('nan'):.2f} | "
                      f"{statistics.mean(r['load1'] for r in mine):.1f} |")


if __name__ == "__main__":
    sys.exit(main())

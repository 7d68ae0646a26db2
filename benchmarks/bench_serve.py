"""Throughput of `echosim serve` per policy and concurrency, on Spec-Bench prompts and on the pair's held-out stdlib
code: what a user of the server sees (HTTP, tokenization, the engine thread), every policy greedy and lossless.

One server per policy (`echosim serve --threads 1 --port 0`, each with the settings it would take by default, i.e.
the draft directory's policy-<name>.json), all started first; then for each repeat, prompt set and concurrency C,
the policies take turns (the order rotates) on the same requests: C client threads, each sending its next request
as soon as its previous one returns (a closed loop, the paper's "batch size"), until `--requests-per-client` x C
requests have run. Reported: output tokens per second of wall time, per policy, and its ratio to ar, from the same
interleaved run; echo / max(ar, eagle3) in wall time and in the CPU time the servers' engine threads spent stepping
(Engine.stats()'s step_cpu_ms, read from /server_info around each turn), over all turns and per turn (its range):
on a shared machine a turn's wall time carries whatever load ran beside it, its CPU time far less (with
--threads 1 the engine's forwards run in that thread); the servers' mean accepted length; whether every policy
returned the same tokens.

Prompts: Spec-Bench's first turns (echo_exec/prompts/spec_bench.jsonl.gz, the same 480 prompts as
../shared/data/prompts/spec_bench.jsonl) of at most --max-prompt-bytes bytes, in a seeded order; held-out
stdlib code as benchmarks/bench_engine.py picks it (files the pair never trained on).

    python benchmarks/bench_serve.py [--concurrency 1,4,16,32,64] [--gen-len 64] [--repeats 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_engine import held_out_prompts  # noqa: E402
from echo_exec.replay import SPEC_BENCH_PROMPTS  # noqa: E402
from echo_exec.train_tiny import MODELS_DIR  # noqa: E402


def spec_bench_prompts(path: Path, n: int, max_bytes: int, seed: int) -> list[dict]:
    import gzip

    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    turns = [json.loads(line)["turns"][0] for line in raw.decode().splitlines() if line.strip()]
    turns = [t for t in turns if len(t.encode()) <= max_bytes]
    order = np.random.default_rng(seed).permutation(len(turns))
    return [{"text": turns[i]} for i in order[:n]]


def stdlib_prompts(n: int, prompt_len: int, gen_len: int, seed: int) -> list[dict]:
    return [{"input_ids": p} for p in held_out_prompts(n, prompt_len, gen_len, seed)]


class Server:
    def __init__(self, policy: str, args):
        cmd = [sys.executable, "-c", "import sys; from echosim.cli import main; sys.exit(main())", "serve",
               "--model", str(args.target), "--draft", str(args.draft), "--policy", policy, "--port", "0",
               "--threads", str(args.threads), "--max-running", str(max(args.concurrency_list))]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.policy = policy
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.url = None
        self.lines = []
        t0 = time.time()
        while self.url is None:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server {policy} exited: {''.join(self.lines)}")
            self.lines.append(line)
            if "listening on " in line:
                self.url = line.split("listening on ")[1].split()[0]
            if time.time() - t0 > 300:
                raise RuntimeError(f"server {policy} did not start")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def post(self, body: dict) -> dict:
        req = urllib.request.Request(self.url + "/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def info(self) -> dict:
        with urllib.request.urlopen(self.url + "/server_info", timeout=60) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def engine_cpu_s(server: Server) -> float:
    """CPU seconds the server's engine thread has spent stepping (Engine.stats()'s step_cpu_ms)."""
    return server.info()["internal_states"][0]["engine"].get("step_cpu_ms", 0.0) / 1e3


def closed_loop(server: Server, prompts: list[dict], concurrency: int, gen_len: int) -> tuple[float, int, list]:
    """All prompts through `concurrency` client threads; (wall s, output tokens, outputs in prompt order)."""
    todo: queue.Queue = queue.Queue()
    for i, p in enumerate(prompts):
        todo.put((i, p))
    outs: list = [None] * len(prompts)
    errors: list = []

    def client() -> None:
        while True:
            try:
                i, p = todo.get_nowait()
            except queue.Empty:
                return
            body = dict(p, sampling_params={"max_new_tokens": gen_len, "temperature": 0.0})
            try:
                outs[i] = server.post(body)["output_ids"]
            except Exception as exc:  # noqa: BLE001 (reported below, the run is void)
                errors.append(repr(exc))
                return

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{server.policy}: {errors[0]}")
    return wall, sum(len(o) for o in outs), outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=Path, default=MODELS_DIR / "tiny-target")
    ap.add_argument("--draft", type=Path, default=MODELS_DIR / "tiny-draft")
    ap.add_argument("--policies", default="ar,eagle3,echo")
    ap.add_argument("--sets", default="spec_bench,stdlib")
    ap.add_argument("--spec-bench", type=Path, default=SPEC_BENCH_PROMPTS,
                    help="Spec-Bench prompts (default: the copy shipped in echo_exec/prompts)")
    ap.add_argument("--concurrency", default="1,4,16,32,64")
    ap.add_argument("--requests-per-client", type=int, default=2,
                    help="requests = this x concurrency (at least --min-requests)")
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=192, help="stdlib prompt bytes")
    ap.add_argument("--max-prompt-bytes", type=int, default=1024,
                    help="Spec-Bench prompts longer than this are left out")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.concurrency_list = [int(c) for c in args.concurrency.split(",") if c]
    policies = args.policies.split(",")
    need = max(max(args.min_requests, c * args.requests_per_client) for c in args.concurrency_list)
    sets = {}
    for name in args.sets.split(","):
        if name == "spec_bench":
            sets[name] = spec_bench_prompts(args.spec_bench, need, args.max_prompt_bytes, args.seed)
        elif name == "stdlib":
            sets[name] = stdlib_prompts(need, args.prompt_len, args.gen_len, args.seed)
        else:
            raise SystemExit(f"unknown prompt set {name!r}")
    load0 = os.getloadavg()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers (finally) when stopped
    servers: dict[str, Server] = {}
    try:
        for p in policies:  # one after the other: each profiles its step at start-up
            servers[p] = Server(p, args)
        for s in servers.values():  # warm-up
            closed_loop(s, next(iter(sets.values()))[:2], 2, 8)
        settings = {p: {k: s.info().get(k) for k in ("policy_config", "policy_config_source")}
                    for p, s in servers.items()}
        res = {name: {c: {"turns": [], **{p: dict(wall_s=0.0, cpu_s=0.0, tokens=0) for p in policies}}
                      for c in args.concurrency_list} for name in sets}
        same = {name: {c: True for c in args.concurrency_list} for name in sets}
        turn = 0
        for rep in range(args.repeats):
            for name, prompts in sets.items():
                for c in args.concurrency_list:
                    n = max(args.min_requests, c * args.requests_per_client)
                    batch = prompts[:n]
                    order = policies[turn % len(policies):] + policies[:turn % len(policies)]
                    turn += 1
                    outs = {}
                    this = {}
                    for p in order:
                        cpu0 = engine_cpu_s(servers[p])
                        wall, tokens, outs[p] = closed_loop(servers[p], batch, c, args.gen_len)
                        cpu = engine_cpu_s(servers[p]) - cpu0
                        this[p] = dict(wall_s=wall, cpu_s=cpu, tokens=tokens)
                        for k, v in this[p].items():
                            res[name][c][p][k] += v
                    res[name][c]["turns"].append(this)
                    same[name][c] &= all(outs[p] == outs[policies[0]] for p in policies)
                    print(f"rep {rep} {name} C={c} (load {os.getloadavg()[0]:.1f}): " + "  ".join(
                        f"{p} {this[p]['tokens'] / this[p]['wall_s']:.1f} tok/s, "
                        f"{this[p]['tokens'] / max(this[p]['cpu_s'], 1e-9):.1f} tok/cpu-s" for p in policies),
                        flush=True)
        infos = {p: s.info() for p, s in servers.items()}
    finally:
        for s in servers.values():
            s.stop()
    load1 = os.getloadavg()
    print(f"\nload average (1, 5, 15 min) at start {load0}, at end {load1}")
    for p in policies:
        print(f"{p} settings ({settings[p]['policy_config_source']}): {json.dumps(settings[p]['policy_config'])}")
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "load_start": load0, "load_end": load1,
           "settings": settings, "results": {}, "accept_length": {p: infos[p].get("avg_spec_accept_length")
                                                                  for p in policies}}
    for name in sets:
        print(f"\n{name}: output tokens/s (ratio to ar), greedy, {args.gen_len} tokens per request; "
              "echo / max(ar, eagle3) in wall time and in the engine thread's CPU time; per turn: its range")
        print("| concurrency | " + " | ".join(policies) + " | echo / max, wall | per turn | echo / max, CPU | "
              "per turn | identical outputs |")
        print("|---" * (len(policies) + 6) + "|")
        out["results"][name] = {}
        for c in args.concurrency_list:
            r = res[name][c]
            tps = {p: r[p]["tokens"] / r[p]["wall_s"] for p in policies}
            cps = {p: r[p]["tokens"] / max(r[p]["cpu_s"], 1e-9) for p in policies}
            base = tps.get("ar")
            cells = [f"{tps[p]:.1f}" + (f" ({tps[p] / base:.2f}x)" if base else "") for p in policies]
            rivals = [p for p in policies if p in ("ar", "eagle3")]
            ratio = {}
            for key, kind in (("wall_s", "wall"), ("cpu_s", "cpu")):
                if not rivals or "echo" not in policies:
                    ratio[kind] = ("-", "-", [])
                    continue
                tot = {p: r[p]["tokens"] / max(r[p][key], 1e-9) for p in policies}
                turns = [t["echo"]["tokens"] / max(t["echo"][key], 1e-9)
                         / max(t[p]["tokens"] / max(t[p][key], 1e-9) for p in rivals) for t in r["turns"]]
                ratio[kind] = (f"{tot['echo'] / max(tot[p] for p in rivals):.3f}",
                               f"{min(turns):.2f}-{max(turns):.2f}", turns)
            print(f"| {c} | " + " | ".join(cells) + f" | {ratio['wall'][0]} | {ratio['wall'][1]} | "
                  f"{ratio['cpu'][0]} | {ratio['cpu'][1]} | {same[name][c]} |")
            out["results"][name][c] = dict(tokens_per_s=tps, tokens_per_cpu_s=cps, identical=same[name][c],
                                           echo_over_best_wall_per_turn=ratio["wall"][2],
                                           echo_over_best_cpu_per_turn=ratio["cpu"][2], turns=r["turns"])
    for p in policies:
        st = infos[p].get("internal_states", [{}])[0].get("engine", {})
        print(f"{p}: mean accepted length {infos[p].get('avg_spec_accept_length')}"
              + (f"; adaptive state {json.dumps(st.get('policy_state'))}" if st.get("policy_state") else ""))
    if args.out:
        args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

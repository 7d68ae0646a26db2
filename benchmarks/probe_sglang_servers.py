"""Probe SGLang servers that are already running (plain, standalone, eagle3; e.g. the ones
tests/test_sglang_speculative.py starts, whose logs name their ports): interleaved prompt by prompt at concurrency 1,
the last N held-out prompts (120 bytes), greedy; tokens/s per server, tokens per verify step (SGLang's
spec_verify_ct) and whether each output equals plain SGLang's.

    python benchmarks/probe_sglang_servers.py LOG_DIR N_PROMPTS NEW_TOKENS    # LOG_DIR holds plain.log, ...
"""

import json
import os
import re
import sys
import time
import urllib.request
from pathlib import Path

from echo_exec import sglang_cpu

SERVERS = ("plain", "standalone", "eagle3")


def generate(url: str, ids: list[int], new: int) -> dict:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}}
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=900).read())


def main() -> int:
    log_dir, n, new = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    urls = {}
    for name in SERVERS:
        text = (log_dir / f"{name}.log").read_text(errors="replace")
        urls[name] = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", text).group(1)
    prompts = sglang_cpu.heldout_prompts(n, 120)[-n:]
    secs, toks, verifies = dict.fromkeys(urls, 0.0), dict.fromkeys(urls, 0), dict.fromkeys(urls, 0)
    outs: dict[str, list] = {name: [] for name in urls}
    load = []
    for p in prompts:
        for name, url in urls.items():
            t0 = time.perf_counter()
            r = generate(url, p, new)
            secs[name] += time.perf_counter() - t0
            meta = r["meta_info"]
            toks[name] += meta["completion_tokens"]
            verifies[name] += meta.get("spec_verify_ct") or 0
            outs[name].append(r["output_ids"])
        load.append(os.getloadavg()[0])
    print(f"{n} prompts x {new} tokens, concurrency 1, interleaved; load average {min(load):.0f}-{max(load):.0f}")
    base = toks["plain"] / secs["plain"]
    for name in urls:
        same = sum(a == b for a, b in zip(outs[name], outs["plain"], strict=True))
        rate = toks[name] / secs[name]
        per_verify = toks[name] / verifies[name] if verifies[name] else float("nan")
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {per_verify:.2f} | {same}/{n} equal plain |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

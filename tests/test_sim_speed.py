"""The replica's decode runs (several decode-only iterations prepared at once, echosim/sim/replica.py) against the
general per-iteration loop: the same run folders byte for byte. And two bad inputs met on the way: a request the
KV cache cannot hold (named by trace line and field) and a KV block size past the cap."""

from __future__ import annotations

import filecmp
import gzip

import pytest

import echosim.sim.replica as replica
from echosim.cli import main
from echosim.sim.config import MAX_BLOCK_TOKENS, ClusterConfig, SimConfig
from echosim.sim.errors import SimError
from echosim.sim.simulator import simulate
from echosim.sim.workload import WorkloadSpec

SAMPLE = "traces/azure_conv_2023_5min.jsonl"
GOODPUT = {"policy": "echo", "budget": {"kind": "goodput", "tokens": 31}}
FILES = ("requests.csv", "iterations.csv", "summary.json", "config.json")


@pytest.mark.parametrize("policy, cluster, workload", [
    ({"policy": "ar"}, {}, {}),
    ({"policy": "eagle3"}, {}, {}),
    ({"policy": "echo"}, {}, {"time_scale": 0.4}),               # gated: draft rows vary step by step
    (GOODPUT, {}, {}),
    (GOODPUT, {}, {"time_scale": 0.3}),                           # a queue: admissions cut the runs
    ({"policy": "eagle3"}, {"kv_blocks": 300}, {"time_scale": 0.5}),  # KV shortfalls and preemptions
    ({"policy": "ar"}, {"replicas": 2, "router": "least_kv"}, {}),   # the router reads the replicas' KV mid-run
], ids=["ar", "eagle3", "echo-loaded", "goodput", "goodput-queue", "eagle3-preempt", "ar-2-replicas"])
def test_decode_runs_match_the_general_loop(tmp_path, monkeypatch, policy, cluster, workload):
    for steps in (0, replica.FAST_STEPS):
        monkeypatch.setattr(replica, "FAST_STEPS", steps)
        config = SimConfig(policy=dict(policy), cluster=ClusterConfig(**cluster), core="table")
        simulate(config, WorkloadSpec(kind="trace", trace=SAMPLE, requests=150, **workload),
                 out_dir=tmp_path / str(steps))
    for name in FILES:
        assert filecmp.cmp(tmp_path / "0" / name, tmp_path / str(replica.FAST_STEPS) / name, shallow=False), name
    if "kv_blocks" in cluster:  # the case meant to preempt did
        assert '"preemptions": 0,' not in (tmp_path / "0" / "summary.json").read_text()


def test_a_request_too_big_for_the_kv_cache_names_its_line_and_field(tmp_path, capsys):
    trace = tmp_path / "big.jsonl"
    trace.write_text('{"arrival_s": 0, "prompt_tokens": 10, "output_tokens": 5}\n'
                     '{"arrival_s": 1, "prompt_tokens": 10, "output_tokens": 900000}\n')
    assert main(["run", "--trace", str(trace), "--no-save", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"echosim: error: {trace}:2: field 'output_tokens': ")
    assert "needs 56,251 KV blocks" in err
    # a CSV trace: the file's own column name and line (the header is line 1); a prompt alone too big
    azure = tmp_path / "big.csv.gz"
    with gzip.open(azure, "wt") as fh:
        fh.write("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,100,10\n"
                 "2023-11-16 18:15:47.6805900,100,10\n2023-11-16 18:15:48.6805900,400000,10\n")
    with pytest.raises(SimError) as info:
        simulate(SimConfig(), WorkloadSpec(kind="trace", trace=str(azure)))
    # (raised inside SimPy's process, which re-raises a copy: the original carries the parts)
    cause = info.value.__cause__
    assert (cause.path, cause.line, cause.field) == (str(azure), 4, "ContextTokens")
    assert str(info.value).startswith(f"{azure}:4: field 'ContextTokens': a request of 400,000 prompt + 10 output")


def test_block_size_has_an_upper_bound(capsys):
    assert main(["run", "--trace", SAMPLE, "--requests", "5", "--block-tokens", str(MAX_BLOCK_TOKENS + 1),
                 "--no-save", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == (f"echosim: error: field 'block_tokens': block_tokens (--block-tokens) must be at most "
                   f"{MAX_BLOCK_TOKENS} (engines page the KV cache in blocks of 1 to a few hundred tokens), got "
                   f"{MAX_BLOCK_TOKENS + 1}\n")
    # the cap itself is allowed
    assert main(["run", "--trace", SAMPLE, "--requests", "5", "--block-tokens", str(MAX_BLOCK_TOKENS),
                 "--no-save", "--no-progress"]) == 0

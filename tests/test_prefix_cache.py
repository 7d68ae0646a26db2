"""Prefix (radix) cache in the simulator: keys from hash_ids and text, LRU over leaves, hit rates on our
Mooncake-format samples against an exact offline count, the TTFT effect, the prefix-aware router, and the
closed loop drawing trace rows with their dataset labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echosim.cli import main
from echosim.sim.config import ClusterConfig, SimConfig
from echosim.sim.prefix_cache import (
    PROMPT_BLOCK_CHARS,
    PrefixCache,
    keys_from_hash_ids,
    keys_from_text,
    offline_shared_tokens,
)
from echosim.sim.simulator import simulate
from echosim.sim.workload import WorkloadSpec, request_chunks, trace_reader
from traces import TraceReader

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "tests" / "fixtures" / "prefix"


def offline(path: Path) -> tuple[int, int]:
    a = TraceReader(path).arrays()
    prompts = a.prompt_tokens.tolist()
    return offline_shared_tokens((*keys_from_hash_ids(h, p), p) for h, p in zip(a.hash_ids, prompts, strict=True))


def run(trace, tmp_path=None, **cluster):
    cfg = SimConfig(cluster=ClusterConfig(**cluster), policy={"policy": "eagle3"})
    return simulate(cfg, WorkloadSpec(kind="trace", trace=str(trace)), out_dir=tmp_path).summary


def test_keys_from_hash_ids_and_text():
    keys, sizes = keys_from_hash_ids([7, 8, 9], 1100)
    assert keys == (("h", 7), ("h", 8), ("h", 9)) and sizes == (512, 512, 76)
    assert keys_from_hash_ids([7, 8, 9], 600)[1] == (512, 88)  # ids past the prompt are ignored
    a = keys_from_text("x" * 1000 + "tail A", 250)
    b = keys_from_text("x" * 1000 + "other tail B", 260)
    assert len(a[0]) == 1000 // PROMPT_BLOCK_CHARS and a[0] == b[0]  # same leading text: same chained keys
    c = keys_from_text("y" + "x" * 999, 250)
    assert not set(a[0]) & set(c[0])  # one differing character changes every later key
    assert keys_from_text("", 10) == ((), ())


def test_match_caps_at_prompt_minus_one_and_counts():
    cache = PrefixCache(10_000)
    keys, sizes = keys_from_hash_ids([1, 2], 1024)
    assert cache.match(keys, sizes, 1024) == 0
    cache.insert(keys, sizes)
    assert cache.match(keys, sizes, 1024) == 1023  # the last prompt token is always computed
    longer = keys_from_hash_ids([1, 2, 3], 1500)
    assert cache.match(*longer, 1500) == 1024
    assert cache.stats()["hit_tokens"] == 2047 and cache.stats()["lookups"] == 3


def test_lru_evicts_leaves_least_recently_used():
    cache = PrefixCache(4 * 512)
    a = keys_from_hash_ids([1, 2], 1024)     # shared root 1
    b = keys_from_hash_ids([1, 3], 1024)
    cache.insert(*a)
    cache.insert(*b)
    cache.match(*a, 1024)                    # a is now more recent than b
    c = keys_from_hash_ids([5, 6], 1024)     # needs two blocks: b's leaf (3) goes, then ... the LRU leaf
    cache.insert(*c)
    assert ("h", 3) not in cache.nodes and ("h", 1) in cache.nodes and ("h", 2) in cache.nodes
    assert cache.tokens <= cache.capacity
    # a root is never evicted while a cached child still needs it
    for parent, _, _ in cache.nodes.values():
        assert parent is None or parent in cache.nodes


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=5), min_size=1, max_size=40),
       cap=st.integers(1, 8))
def test_cache_invariants_under_any_sequence(ops, cap):
    """Capacity holds, every cached block's parent is cached (no stranded block), hits never exceed what an
    unbounded cache would give."""
    cache = PrefixCache(cap * 512)
    seen = []
    for path in ops:
        ids = [hash(tuple(path[:i + 1])) for i in range(len(path))]  # chained: an id names its whole prefix
        keys, sizes = keys_from_hash_ids(ids, 512 * len(ids))
        hit = cache.match(keys, sizes, 512 * len(ids))
        unbounded = 0
        prev = {k for ks, _, _ in seen for k in ks}
        for k, s in zip(keys, sizes, strict=True):
            if k not in prev:
                break
            unbounded += s
        assert hit <= min(unbounded, 512 * len(ids) - 1)
        cache.insert(keys, sizes)
        seen.append((keys, sizes, 512 * len(ids)))
        assert cache.tokens <= cache.capacity
        for parent, _, _ in cache.nodes.values():
            assert parent is None or parent in cache.nodes


@pytest.mark.parametrize("name,expect", [("conversation", 0.69), ("templates", 0.77)])
def test_hit_rate_on_samples_equals_offline_count(name, expect):
    """With room for everything, the simulated hit rate is the exact offline count of tokens in blocks an
    earlier request computed (our samples' prefills finish before the next sharer arrives)."""
    path = SAMPLES / f"{name}_mooncake.jsonl"
    hit, total = offline(path)
    s = run(path)["prefix_cache"]
    assert s["prompt_tokens"] == total and s["hit_tokens"] == hit
    assert s["hit_rate"] == pytest.approx(expect, abs=0.01)


def test_small_cache_evicts_and_hits_less():
    path = SAMPLES / "templates_mooncake.jsonl"
    hit, _ = offline(path)
    small = run(path, kv_blocks=400)["prefix_cache"]  # 6,400 tokens: a few templates at most
    assert small["evicted_tokens"] > 0 and 0 < small["hit_tokens"] < hit


def test_prefix_cache_cuts_ttft(tmp_path):
    path = SAMPLES / "conversation_mooncake.jsonl"
    on = run(path)
    off = run(path, prefix_cache=False)
    assert "prefix_cache" not in off
    assert on["ttft_ms"]["mean"] < 0.7 * off["ttft_ms"]["mean"]


def test_no_keys_no_effect(tmp_path):
    """A trace without hash_ids or text runs byte-identically with the cache on or off."""
    trace = ROOT / "traces" / "azure_conv_2023_5min.jsonl"
    cfg = dict(kind="trace", trace=str(trace), requests=300)
    outs = []
    for flag in (True, False):
        out = tmp_path / str(flag)
        simulate(SimConfig(cluster=ClusterConfig(prefix_cache=flag)), WorkloadSpec(**cfg), out_dir=out)
        outs.append(((out / "requests.csv").read_bytes(), (out / "iterations.csv").read_bytes()))
    assert outs[0] == outs[1]


def test_prefix_router_sends_sharers_to_the_same_replica():
    path = SAMPLES / "templates_mooncake.jsonl"
    rr = run(path, replicas=4)["prefix_cache"]
    px = run(path, replicas=4, router="prefix")["prefix_cache"]
    assert px["hit_tokens"] > rr["hit_tokens"]


def test_cli_flags(tmp_path, capsys):
    path = SAMPLES / "conversation_mooncake.jsonl"
    assert main(["run", "--trace", str(path), "--policy", "ar", "--no-save", "--json", "--no-prefix-cache"]) == 0
    assert "prefix_cache" not in json.loads(capsys.readouterr().out)
    assert main(["run", "--trace", str(path), "--policy", "ar", "--no-save", "--json", "--router", "prefix",
                 "--replicas", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["prefix_cache"]["hit_rate"] > 0.5
    assert main(["run", "--trace", str(path), "--dataset", "x", "--no-save"]) == 2
    assert "--dataset" in capsys.readouterr().err


def test_closed_loop_draws_trace_rows_with_their_datasets(tmp_path):
    trace = tmp_path / "mixed.jsonl"
    rows = [{"arrival_s": 0.0, "prompt_tokens": 50 + i, "output_tokens": 20, "dataset": d}
            for i, d in enumerate(["humaneval", "cnn_dm"] * 20)]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = WorkloadSpec(kind="closed", trace=str(trace), concurrency=4, requests=64)
    chunk = next(request_chunks(spec, 0, trace_reader(spec)))
    assert set(chunk.dataset) == {"humaneval", "cnn_dm"}
    for p, d in zip(chunk.prompt_tokens.tolist(), chunk.dataset, strict=True):
        assert d == ("humaneval" if (p - 50) % 2 == 0 else "cnn_dm")  # each row keeps its own label
    only = WorkloadSpec(kind="closed", trace=str(trace), concurrency=4, requests=16, dataset="cnn_dm")
    assert set(next(request_chunks(only, 0, trace_reader(only))).dataset) == {"cnn_dm"}
    bad = WorkloadSpec(kind="closed", trace=str(trace), concurrency=4, requests=16, dataset="gsm")
    with pytest.raises(ValueError, match="gsm"):
        next(request_chunks(bad, 0, trace_reader(bad)))
    # the labels reach the acceptance model: MAT differs by dataset in closed-loop runs
    mats = {}
    for d in ("humaneval", "cnn_dm"):
        cfg = SimConfig(policy={"policy": "eagle3"})
        s = simulate(cfg, WorkloadSpec(kind="closed", trace=str(trace), concurrency=4, requests=32, dataset=d))
        mats[d] = s.summary["mat"]
    assert mats["humaneval"] > mats["cnn_dm"]
    no_trace = WorkloadSpec(kind="closed", concurrency=2, requests=4, dataset="humaneval")
    assert next(request_chunks(no_trace, 0)).dataset == ["humaneval"] * 4

"""The replica's decode runs (several decode-only iterations prepared at once, echosim/sim/replica.py) against the
general per-iteration loop: the same run folders byte for byte. And two bad inputs met on the way: a request the
KV cache cannot hold (named by trace line and field) and a KV block size past the cap."""

from __future__ import annotations

import filecmp
import gzip

import numpy as np
import pytest

import echosim.sim.kernels as kernels
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
    # the reference: every iteration through the general loop, NumPy only (goodput ECHO's merge by
    # _choose_prefix); against it, decode runs with the compiled kernels and with their NumPy twins
    variants = [("reference", 0, False), ("runs-numpy", replica.FAST_STEPS, False)]
    if kernels.jit_enabled():
        variants.append(("runs-compiled", replica.FAST_STEPS, True))
    for name, steps, jit in variants:
        monkeypatch.setattr(replica, "FAST_STEPS", steps)
        monkeypatch.setenv("ECHOSIM_NO_JIT", "0" if jit else "1")
        monkeypatch.setattr(kernels, "_KERNELS", {})
        config = SimConfig(policy=dict(policy), cluster=ClusterConfig(**cluster), core="table")
        simulate(config, WorkloadSpec(kind="trace", trace=SAMPLE, requests=150, **workload),
                 out_dir=tmp_path / name)
        assert (kernels.prefix_steps_kernel() is not None) == jit
    for name, _, _ in variants[1:]:
        for file in FILES:
            assert filecmp.cmp(tmp_path / "reference" / file, tmp_path / name / file, shallow=False), (name, file)
    if "kv_blocks" in cluster:  # the case meant to preempt did
        assert '"preemptions": 0,' not in (tmp_path / "reference" / "summary.json").read_text()


def _goodput_speculator():
    """A table-core goodput ECHO speculator wired as `simulate` wires it (its budget priced by the cluster's
    step-time model), its table built."""
    from echosim.sim.config import build_cost_model
    from echosim.sim.pricing import StepPricer
    from echosim.sim.simulator import budget_step_time, load_acceptance, make_policy
    from echosim.sim.speculation import Speculator

    ref: list = [None]
    policy = make_policy(GOODPUT, budget_step_time(StepPricer(build_cost_model(ClusterConfig())), ref))
    spec = ref[0] = Speculator(policy, load_acceptance("qwen3-8b"), seed=0, core="table")
    _, _, offset = spec.assign(None, 64)
    return spec, offset


@pytest.mark.parametrize("jit", [False, True], ids=["numpy", "compiled"])
def test_goodput_merge_of_a_run_decides_as_the_general_loop(monkeypatch, jit):
    # steps of random batches (some drawing the same table row twice: every key tied), each at a random context:
    # the run's merge (compiled, or its NumPy twin) gives _choose_prefix's rows, or declines a step whose cut
    # falls inside a group of equal keys (where _choose_prefix's order among ties is argpartition's)
    if jit and not kernels.jit_enabled():
        pytest.skip("numba not installed")
    monkeypatch.setenv("ECHOSIM_NO_JIT", "0" if jit else "1")
    monkeypatch.setattr(kernels, "_KERNELS", {})
    spec, offset = _goodput_speculator()
    assert spec._prefix_runs
    rng = np.random.default_rng(7)
    declined = decided = 0
    for trial in range(400):
        B = int(rng.integers(1, 25))
        drawn = offset[rng.integers(0, len(offset), B)] + rng.integers(0, spec.rows_per_bin, B)
        if trial % 2 and B > 1:
            drawn[1] = drawn[0]
        kv_sum = int(rng.integers(B * 20, B * 4000))
        spec.mean_ctx = kv_sum / B
        ref = spec._choose_prefix(spec._rows.take(drawn, axis=0), drawn)
        got = spec._peek_prefix(drawn.reshape(1, B), kv_sum, None)
        if got is None:
            declined += 1
            continue
        decided += 1
        np.testing.assert_array_equal(got[0], ref)
    assert decided > 300 and declined > 0


def test_goodput_run_of_several_steps_matches_step_by_step(monkeypatch):
    # k steps of the same batch at once against k calls of _choose_prefix, the context moving by what each step
    # accepted (the budget's curve changes bucket within the run)
    spec, offset = _goodput_speculator()
    rng = np.random.default_rng(3)
    for jit in ([False, True] if kernels.jit_enabled() else [False]):
        monkeypatch.setenv("ECHOSIM_NO_JIT", "0" if jit else "1")
        monkeypatch.setattr(kernels, "_KERNELS", {})
        for _ in range(40):
            B, k = int(rng.integers(1, 12)), 24
            drawn = offset[rng.integers(0, len(offset), B)][None, :] + rng.integers(0, spec.rows_per_bin, (k, B))
            kv0 = int(rng.integers(B * 20, B * 2000))
            got = spec._peek_prefix(drawn, kv0, None)
            if got is None:
                continue
            kv = kv0
            for i in range(len(got)):
                spec.mean_ctx = kv / B
                ref = spec._choose_prefix(spec._rows.take(drawn[i], axis=0), drawn[i])
                np.testing.assert_array_equal(got[i], ref)
                kv += int(ref[:, 1].sum()) + B


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

"""The replica's decode runs (several decode-only iterations prepared at once, echosim/sim/replica.py) against the
general per-iteration loop: the same run folders byte for byte. And two bad inputs met on the way: a request the
KV cache cannot hold (named by trace line and field) and a KV block size past the cap."""

from __future__ import annotations

import filecmp
import gzip

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    # _choose_prefix); against it, decode runs with the compiled kernels (every policy's steps priced in the
    # compiled loop: ECHOSIM_JIT=1) and with their NumPy twins
    variants = [("reference", 0, False), ("runs-numpy", replica.FAST_STEPS, False)]
    if kernels.jit_enabled():
        variants.append(("runs-compiled", replica.FAST_STEPS, True))
    for name, steps, jit in variants:
        monkeypatch.setattr(replica, "FAST_STEPS", steps)
        monkeypatch.setenv("ECHOSIM_NO_JIT", "0" if jit else "1")
        monkeypatch.setenv("ECHOSIM_JIT", "1" if jit else "0")
        monkeypatch.setattr(kernels, "_KERNELS", {})
        config = SimConfig(policy=dict(policy), cluster=ClusterConfig(**cluster), core="table")
        simulate(config, WorkloadSpec(kind="trace", trace=SAMPLE, requests=150, **workload),
                 out_dir=tmp_path / name)
        assert (kernels.prefix_steps_kernel() is not None) == jit
        assert (kernels._KERNELS.get("decode_steps") is not None) == jit   # the compiled loop made the runs
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


def _cost_models():
    """Step-time models of every kind the compiled loop prices: the fitted H100 model (attention blended into the
    datasheet outside its profiles), the datasheet roofline (no critical path), a TP-4 dense and a TP-8 MoE model
    (all-reduce, expert GEMMs), each with a draft."""
    from cost_models.fitted import FittedCostModel
    from cost_models.roofline import RooflineCostModel
    from echosim.sim.config import build_cost_model

    return {"h100-fitted": build_cost_model(ClusterConfig()),
            "h100-datasheet": build_cost_model(ClusterConfig(cost_model="roofline")),
            "llama70b-tp4": FittedCostModel("llama-3.3-70b", "h100-sxm", tp=4, draft="eagle3-llama-3.3-70b"),
            "qwen235b-moe-tp8": RooflineCostModel("qwen3-235b-a22b", "h100-sxm", tp=8, draft="eagle3-qwen3-235b-a22b")}


COST_MODELS = _cost_models()


@settings(max_examples=60, deadline=None)
@given(model=st.sampled_from(sorted(COST_MODELS)), depth=st.integers(0, 6), batch=st.integers(1, 256),
       steps=st.integers(1, 6), seed=st.integers(0, 2**32 - 1), extra=st.booleans(),
       memo_slots=st.sampled_from([2, 16384]))
def test_compiled_decode_steps_price_as_the_pricer(model, depth, batch, steps, seed, extra, memo_slots):
    # each step the compiled loop makes is priced as StepPricer.price_parts prices it, bit for bit, over models,
    # batches from 1 to 256, contexts from a few tokens to past the profiles (the attention blend), draft trees
    # of 0-6 depths and the optional overhead terms; a 2-slot memo is reset at every new depth part (its
    # values still the same); the clock advances by the steps' times, and the metrics' sums come out in order
    rng = np.random.default_rng(seed)
    from echosim.sim.pricing import StepPricer

    pricer = StepPricer(COST_MODELS[model], *((0.01, 0.02, 0.003) if extra else ()))
    consts = pricer.kernel_constants(depth > 0)
    consts = consts[:7] + kernels.depth_memo(memo_slots)
    sums = np.zeros((steps, 5), np.int64)
    sums[:, 0] = batch * rng.integers(1, 40, steps)                # tokens verified
    sums[:, 1] = rng.integers(0, 4, steps) * batch                 # drafts accepted
    sums[:, 2] = batch
    sums[:, 4] = sums[:, 0] * sums[:, 0] // batch
    qk = rng.integers(0, 10**9, steps)
    width = rng.integers(1, 8, depth).astype(np.float64)
    drows = np.sort(rng.integers(0, batch + 1, (steps, depth)), axis=1)[:, ::-1] * width
    kv0 = int(batch * 10 ** rng.uniform(0.5, 5.5))
    acc0 = rng.uniform(0, 1e3, 4)
    fns = [kernels.decode_steps] + ([kernels.decode_run_kernel()] if kernels.jit_enabled() else [])
    for fn in fns:
        parts, times, kv_after = np.zeros((steps, 4)), np.zeros((steps, 2)), np.zeros(steps, np.int64)
        acc, counts = acc0.copy(), np.zeros(3, np.int64)
        status, k, kv, now = fn(sums, qk, 0, np.ascontiguousarray(drows), 0, steps, steps, kv0, 0, 16, 10**15,
                                10**9, 10**9, 0, False, 0, 1.5, float("inf"), *consts, parts, times, kv_after, acc,
                                counts)
        assert (status, k) == (kernels.STOP_END, steps)
        kv_ref, now_ref, acc_ref = kv0, 1.5, acc0.tolist()
        for i in range(steps):
            T, a = int(sums[i, 0]), int(sums[i, 1])
            ref = pricer.price_parts(float(T), float(kv_ref + T), float(qk[i]) + 0.5 * (int(sums[i, 4]) + T),
                                     float(batch), float(T), tuple(drows[i].tolist()), kv_ref / batch, batch)
            assert tuple(parts[i].tolist()) == ref, (fn, i)
            end = now_ref + sum(ref) / 1000.0
            assert times[i].tolist() == [now_ref, end]
            now_ref, kv_ref = end, kv_ref + a + batch
            acc_ref = [x + y for x, y in zip(acc_ref, ref, strict=True)]
        assert (kv, now, acc.tolist()) == (kv_ref, now_ref, acc_ref)
        assert counts.tolist() == [batch * steps, int(sums[:, 0].sum()), int(sums[:, 1].sum())]


def test_compiled_decode_steps_stop_where_the_general_loop_takes_over():
    # the KV bound, an admissible queue head, a step ending at the next event (or finishing a request): the loop
    # stops at that step, having made the ones before it
    from echosim.sim.pricing import StepPricer

    consts = StepPricer(COST_MODELS["h100-fitted"]).kernel_constants(True)
    fn = kernels.decode_run_kernel() or kernels.decode_steps
    k_n, B = 6, 4
    sums = np.tile(np.array([4 * 8, 8, B, 8 + B, 4 * 64], np.int64), (k_n, 1))
    drows = np.tile(np.array([4.0, 8.0, 8.0]), (k_n, 1))

    def call(k_fin=k_n, kv=1000, kv_blocks=10**6, n_wait=0, head_blocks=0, next_due=float("inf")):
        out = (np.zeros((k_n, 4)), np.zeros((k_n, 2)), np.zeros(k_n, np.int64), np.zeros(4), np.zeros(3, np.int64))
        return fn(sums, np.zeros(k_n, np.int64), 0, drows, 0, k_n, k_fin, kv, B * 15, 16, kv_blocks, 8192, 8192,
                  n_wait, True, head_blocks, 0.0, next_due, *consts, *out)[:2]

    assert call() == (kernels.STOP_END, k_n)
    assert call(k_fin=3) == (kernels.STOP_YIELD, 3)
    # KV: each step adds 12 tokens to the 1000; blocks needed = (kv + 60) // 16 + 2 + 4
    assert call(kv_blocks=(1000 + 24 + 60) // 16 + 2 + 4) == (kernels.STOP_GENERAL, 3)
    assert call(n_wait=1, head_blocks=10**7) == (kernels.STOP_END, k_n)     # the head does not fit: no admission
    assert call(n_wait=1, head_blocks=1)[0] == kernels.STOP_GENERAL
    status, k = call(next_due=1e-9)
    assert (status, k) == (kernels.STOP_YIELD, 0)


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

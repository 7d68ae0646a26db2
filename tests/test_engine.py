"""The engine is lossless: greedy speculative output under every policy of the core is token for token the
engine's plain greedy output (policy "ar"), at batch sizes 1, 4 and 16, with a random draft (short acceptances)
and with a draft that is a copy of the target (long acceptances, deep commits). Models are tiny and random, in
float64 so that the different shapes of a tree verify and a plain step cannot flip a near-tie argmax."""

from pathlib import Path

import numpy as np
import pytest
import torch

from echo_exec.engine import Engine, SamplingParams
from echo_exec.loader import save_model
from echo_exec.model import ModelConfig, Transformer
from echosim.errors import UserError
from echosim.spec.calibrate import calibrate
from echosim.spec.policies import POLICIES
from echosim.spec.records import read_records

torch.set_num_threads(1)  # the machine is shared: one thread is faster than two contended ones

V = 48
EOS = V - 1
N_PROMPTS = 50
MAX_NEW = 16
F64 = torch.float64

# Small trees keep the test fast; every policy's own drafting, gating and selection code still runs.
SMALL = {
    "eagle3": dict(steps=3, topk=3, num_draft_tokens=8),
    "eagle2": dict(total_tokens=8, depth=3, top_k=3),
    "echo": dict(steps=4, topk=3, num_draft_tokens=10, remaining_num_draft_tokens=4, gates=[(2, 0.3)]),
    "echo_dense": dict(steps=4, topk=3, num_draft_tokens=10, remaining_num_draft_tokens=4, gates=[(2, 0.3)]),
    "echo_fixed": dict(steps=4, topk=3, num_draft_tokens=10, remaining_num_draft_tokens=4,
                       gates=[(2, 0.3), (3, 0.5)]),
    "ddd": dict(steps=4, topk=3, num_draft_tokens=10, theta=-1.0, check_depths=(2,)),
    "opt_tree": dict(num_nodes=8, topk=3, max_depth=4, delta=0.2),
    "tetris": dict(steps=3, topk=3, budget={"kind": "per_request", "tokens": 6}),
    "smartspec": dict(max_k=4),
}


def _save(path: Path, hidden: int, layers: int, seed: int) -> Path:
    cfg = ModelConfig(vocab_size=V, hidden_size=hidden, n_layers=layers, n_heads=4, n_kv_heads=2,
                      intermediate_size=2 * hidden, eos_token_id=EOS, max_position_embeddings=512)
    m = Transformer(cfg)
    m.init_weights(seed=seed, std=0.3)  # large weights: peaked, seed-specific distributions
    save_model(m, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine_models")
    return _save(d / "target", 32, 1, 0), _save(d / "draft", 16, 1, 1)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    lens = np.r_[1, 2, 70, rng.integers(1, 30, N_PROMPTS - 3)]  # one-token prompts, and one chunked prefill
    return [rng.integers(0, V - 1, n).tolist() for n in lens]


def _run(target, draft, policy, prompts, batch, config=None, backend="auto", **kw):
    eng = Engine(target, draft, policy=policy, policy_config=config, dtype=F64, max_running=batch,
                 max_prefill_tokens=32, **kw)
    eng.verify_backend = backend  # "auto": NumPy greedy verification on a CPU; "torch": the device version
    return eng, [o.output_ids for o in eng.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW))]


@pytest.fixture(scope="module")
def reference(models, prompts):
    eng, out = _run(models[0], None, "ar", prompts, 16)
    assert eng.stats()["avg_accept_length"] == 1.0
    return out


def test_plain_decoding_is_batch_invariant_and_stops(models, prompts, reference):
    _, single = _run(models[0], None, "ar", prompts[:12], 1)
    assert single == reference[:12]
    assert any(len(o) < MAX_NEW and o[-1] == EOS for o in reference)  # EOS ends a request (and is kept)
    assert all(len(o) == MAX_NEW or o[-1] == EOS for o in reference)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_greedy_speculation_is_lossless(models, prompts, reference, policy):
    target, draft = models
    if policy == "ar":
        return  # the reference itself
    cfg = SMALL.get(policy)
    for batch, drafter, backend in [(1, target, "auto"), (4, draft, "torch"), (16, target, "torch")]:
        eng, out = _run(target, drafter, policy, prompts, batch, cfg, backend)
        bad = [i for i, (a, b) in enumerate(zip(out, reference, strict=True)) if a != b]
        assert not bad, f"{policy} batch {batch}: prompt {bad[0]} differs"
        mat = eng.stats()["avg_accept_length"]
        if drafter == target and policy != "smartspec":
            assert mat > 2.0, f"{policy}: a copy of the target as draft should accept long paths (MAT {mat})"


def test_default_configs_are_lossless(models, prompts, reference):
    """The policies' default (large) trees, a few prompts."""
    target, _ = models
    for policy in ("eagle3", "echo", "eagle2"):
        _, out = _run(target, target, policy, prompts[:8], 4)
        assert out == reference[:8], policy


def test_small_kv_pool_queues_and_preempts(models, prompts):
    """Many long requests through a pool that holds only a few at a time: all complete, losslessly (preempted
    requests are recomputed from their tokens), and every block comes back."""
    target, draft = models
    long = SamplingParams(max_new_tokens=60)
    ref = [o.output_ids for o in Engine(target, None, policy="ar", dtype=F64, max_running=16).generate(prompts[3:19],
                                                                                                     long)]
    eng = Engine(target, draft, policy="eagle3", policy_config=SMALL["eagle3"], dtype=F64, max_running=16,
                 num_kv_blocks=32, block_size=4)
    assert [o.output_ids for o in eng.generate(prompts[3:19], long)] == ref
    s = eng.stats()
    assert s["free_kv_blocks"] == s["num_kv_blocks"] == 32
    assert s["preemptions"] > 0 and s["finished"] == 16


def test_a_static_tree_reserves_room_for_its_tokens_not_every_candidate(models, prompts):
    """eagle3 (3, 3, 8) drafts 21 candidates but verifies 8 tokens a request: four requests of 20 prompt tokens
    run together in a pool of 40 blocks of 4 (room held past each context: 8 tokens, not 22)."""
    target, draft = models
    reqs = [list(p[:20]) + [1] * (20 - len(p[:20])) for p in prompts[3:7]]
    eng = Engine(target, draft, policy="eagle3", policy_config=SMALL["eagle3"], dtype=F64, max_running=4,
                 num_kv_blocks=40, block_size=4, log_iterations=True)
    out = eng.generate(reqs, SamplingParams(max_new_tokens=8, ignore_eos=True))
    ref = Engine(target, None, policy="ar", dtype=F64).generate(reqs, SamplingParams(max_new_tokens=8,
                                                                                     ignore_eos=True))
    assert [o.output_ids for o in out] == [o.output_ids for o in ref]
    assert max(len(it.verify_tokens) for it in eng.iterations if it.verify_tokens is not None) == 4
    assert eng.stats()["preemptions"] == 0


def test_blocks_are_freed_and_requests_stream(models, prompts):
    target, draft = models
    eng = Engine(target, draft, policy="echo", policy_config=SMALL["echo"], dtype=F64, max_running=4)
    streamed: dict[str, list[int]] = {}

    def on_tokens(out, new):
        assert out.output_ids[-len(new):] == new
        streamed.setdefault(out.request_id, []).extend(new)

    ids = [eng.add_request(p, SamplingParams(max_new_tokens=12), on_tokens=on_tokens) for p in prompts[:10]]
    finished = {}
    while eng.has_unfinished():
        held = eng.blocks.num_blocks - eng.blocks.num_free
        assert held == eng.blocks.owned.sum()
        for o in eng.step():
            finished[o.request_id] = o
    assert set(finished) == set(ids)
    assert eng.blocks.num_free == eng.blocks.num_blocks
    for o in finished.values():
        assert o.finished and o.finish_reason in ("stop", "length")
        assert streamed[o.request_id] == o.output_ids
        assert o.first_token_s >= o.arrival_s and o.finish_s >= o.first_token_s
        # the prefill emits the first token; every verify step one more, plus its accepted drafts
        assert o.spec_verify_ct >= 1 and 1 + o.accepted_drafts + o.spec_verify_ct == len(o.output_ids)


def test_abort_frees_and_reports(models, prompts):
    target, draft = models
    eng = Engine(target, draft, policy="eagle3", policy_config=SMALL["eagle3"], dtype=F64, max_running=2)
    a = eng.add_request(prompts[3], SamplingParams(max_new_tokens=50))
    b = eng.add_request(prompts[4], SamplingParams(max_new_tokens=5))
    c = eng.add_request(prompts[5], SamplingParams(max_new_tokens=5))  # waits: max_running is 2
    eng.step()
    eng.abort(a)
    eng.abort(c)
    out = {o.request_id: o for o in eng.step()}
    assert out[a].finish_reason == "abort" and out[c].finish_reason == "abort"
    while eng.has_unfinished():
        out.update({o.request_id: o for o in eng.step()})
    assert out[b].finish_reason in ("stop", "length")
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_bad_requests_are_user_errors(models):
    target, draft = models
    eng = Engine(target, draft, policy="eagle3", policy_config=SMALL["eagle3"], dtype=F64, num_kv_blocks=8,
                 block_size=4)
    with pytest.raises(UserError, match="never fit"):
        eng.add_request([1] * 20, SamplingParams(max_new_tokens=10))
    with pytest.raises(UserError, match="exceeds"):
        eng.add_request([1] * 20, SamplingParams(max_new_tokens=600))
    with pytest.raises(UserError, match="empty"):
        eng.add_request([], SamplingParams())
    with pytest.raises(UserError, match="token ids"):
        eng.add_request([V], SamplingParams())
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(max_new_tokens=0), dict(seed=-1),
                dict(stop_token_ids=("a",))):
        with pytest.raises(UserError):
            eng.add_request([1], SamplingParams(**bad))
    with pytest.raises(UserError, match="draft model"):
        Engine(target, None, policy="echo")
    with pytest.raises(UserError, match="unknown policy"):
        Engine(target, draft, policy="nope")
    assert not eng.has_unfinished()


def test_records_are_the_simulators_schema(models, prompts, reference, tmp_path):
    """Per-node records of every verify step: readable by the simulator, one accepted chain 1..a per request-step,
    and as many accepted nodes as the verifier accepted. calibrate() fits ECHO's gates from them."""
    target, _ = models
    path = tmp_path / "records.jsonl"
    eng, out = _run(target, target, "echo", prompts[:20], 4, SMALL["echo"], records_path=path)
    assert out == reference[:20]
    rec = read_records(path)
    s = eng.stats()
    assert rec.accepted.sum() == s["verified_accepted"] > 0
    assert set(np.unique(rec.request)) <= set(range(20)) and len(np.unique(rec.request)) >= 15
    assert ((rec.draft_prob > 0) & (rec.draft_prob <= 1)).all() and (rec.path_prob <= rec.draft_prob + 1e-6).all()
    key = rec.step * 1000 + rec.request
    for k in np.unique(key):
        acc = np.sort(rec.depth[(key == k) & rec.accepted])
        assert (acc == np.arange(1, len(acc) + 1)).all()
    cal = calibrate(rec, min_samples=5)
    # the gate at depth 2 (tau 0.3) stops most requests there: per-depth statistics for depths 1 and 2
    assert [d.depth for d in cal.depths][:2] == [1, 2] and cal.depths[0].samples > 0 and cal.depths[1].samples > 0


SHIPPED = Path(__file__).resolve().parents[1] / "echo_exec" / "models"


def test_shipped_pair_is_lossless():
    """The trained pair on held-out code: real acceptance, same tokens as plain decoding."""
    from echo_exec.train_tiny import split_files

    _, held = split_files()
    files = [f for f in held if f.stat().st_size > 4000][:6]
    prompts = [list(f.read_bytes()[2000:2064]) for f in files]
    target, draft = SHIPPED / "tiny-target", SHIPPED / "tiny-draft"
    params = SamplingParams(max_new_tokens=24)
    ref = [o.output_ids for o in Engine(target, None, policy="ar", dtype=F64, max_running=6).generate(prompts, params)]
    for policy, cfg in [("eagle3", dict(steps=4, topk=4, num_draft_tokens=16)), ("echo", SMALL["echo"])]:
        for batch in (1, 6):
            eng = Engine(target, draft, policy=policy, policy_config=cfg, dtype=F64, max_running=batch)
            assert [o.output_ids for o in eng.generate(prompts, params)] == ref, (policy, batch)
            assert eng.stats()["avg_accept_length"] > 1.3


def test_stop_token_ids_end_requests_mid_tree(models, prompts, reference):
    """A stop token inside an accepted path ends the request right there, as in plain decoding."""
    target, _ = models
    i = next(i for i, o in enumerate(reference) if len(o) == MAX_NEW)
    stop = reference[i][6]
    want = reference[i][:reference[i].index(stop) + 1]
    for policy, draft in (("ar", None), ("eagle3", target)):
        eng = Engine(target, draft, policy=policy, policy_config=SMALL.get(policy), dtype=F64)
        out = eng.generate([prompts[i]], SamplingParams(max_new_tokens=MAX_NEW, stop_token_ids=(stop,)))[0]
        assert out.output_ids == want and out.finish_reason == "stop"


def test_mixed_batches_under_churn(models, prompts, reference):
    """Greedy and sampled requests share batches, arrive while others run, some are aborted, the pool is small:
    the greedy ones still match plain decoding, every request ends, and every block comes back."""
    target, draft = models
    eng = Engine(target, draft, policy="echo", policy_config=SMALL["echo"], dtype=F64, max_running=6,
                 num_kv_blocks=40, block_size=4)
    rng = np.random.default_rng(1)
    greedy, done, aborted = {}, {}, set()
    for i in range(30):
        if i % 3 == 0:
            greedy[eng.add_request(prompts[i], SamplingParams(max_new_tokens=MAX_NEW))] = i
        else:
            rid = eng.add_request(prompts[i], SamplingParams(max_new_tokens=MAX_NEW, temperature=0.8, top_p=0.9))
            if i % 7 == 0:
                eng.abort(rid)
                aborted.add(rid)
        for o in eng.step() if rng.random() < 0.5 else []:
            done[o.request_id] = o
    while eng.has_unfinished():
        done.update({o.request_id: o for o in eng.step()})
    assert len(done) == 30 and eng.blocks.num_free == eng.blocks.num_blocks
    assert all(done[r].output_ids == reference[i] for r, i in greedy.items())
    assert all(done[r].finish_reason == "abort" for r in aborted)

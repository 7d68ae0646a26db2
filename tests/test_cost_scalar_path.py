"""The roofline's scalar path (what the simulator prices every iteration through) against its StepBatch path: the
same floats bit for bit, inside and outside the profiles' range, at TP 1 and 8, fitted and datasheet parameters;
and the pricer's tuple path against its StepTime path, prefill and overhead terms included."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cost_models.fitted import FittedCostModel
from cost_models.interface import StepBatch
from cost_models.roofline import RooflineCostModel
from echosim.sim.pricing import StepPricer

MODELS = [FittedCostModel("qwen3-8b", "h100-sxm", draft="eagle3-qwen3-8b"),
          FittedCostModel("llama-3.3-70b", "h200", tp=8, draft="eagle3-llama-3.3-70b"),
          RooflineCostModel("qwen3-8b", "h100-sxm", draft="eagle3-qwen3-8b")]

# tokens and sequences as the simulator passes them (integral floats); KV sums up to far past the profiles' 65,536
# keys and 256 sequences, where the fitted rates blend into the datasheet's
shapes = st.tuples(st.integers(1, 2048), st.integers(1, 400), st.integers(0, 3_000_000), st.floats(0.0, 1.0))


@settings(max_examples=300, deadline=None)
@given(shape=shapes, which=st.integers(0, len(MODELS) - 1))
def test_target_parts_equal_step_time(shape, which):
    t, seqs, ctx, frac = shape
    seqs = min(seqs, t)
    cost = MODELS[which]
    kv = float(ctx + t)
    qk = float(int(ctx * frac) * t) + 0.5 * t
    ref = cost.step_time(StepBatch(float(t), kv, qk, float(seqs), float(t)))
    assert ref.draft_ms == 0.0
    assert cost.target_parts(float(t), kv, qk, float(seqs), float(t)) == (ref.verify_ms, ref.lm_head_ms,
                                                                           ref.overhead_ms)
    # twice: the second call takes the memoized (tokens, sequences) terms
    assert cost.target_parts(float(t), kv, qk, float(seqs), float(t))[0] == ref.verify_ms


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 4096), seqs=st.integers(1, 512), ctx=st.floats(1.0, 200_000.0), which=st.integers(0, 2))
def test_draft_depth_parts_equal_step_time(rows, seqs, ctx, which):
    cost = MODELS[which]
    s = min(seqs, rows)
    ref = cost.step_time(StepBatch(0.0, 0.0, 0.0, 0.0, 0.0, (rows,), (s * ctx,), (rows * ctx,), (s,)))
    assert cost.draft_depth_parts(rows, s * ctx, rows * ctx, s) == (ref.draft_ms, ref.lm_head_ms, ref.overhead_ms)


@settings(max_examples=100, deadline=None)
@given(shape=shapes, drows=st.sampled_from([(), (4,), (4, 12, 24), (8, 8, 8, 8, 8)]),
       extra=st.sampled_from([(0.0, 0.0, 0.0), (0.003, 0.001, 0.02)]))
def test_price_parts_equal_price(shape, drows, extra):
    t, seqs, ctx, frac = shape
    seqs = min(seqs, t)
    pricer = StepPricer(MODELS[0], *extra)
    args = (float(t), float(ctx + t), float(int(ctx * frac) * t) + 0.5 * t, float(seqs), float(t), drows,
            ctx / seqs, seqs)
    ref = pricer.price(*args)
    assert pricer.price_parts(*args) == (ref.draft_ms, ref.verify_ms, ref.lm_head_ms, ref.overhead_ms)


def test_a_subclass_with_its_own_step_time_is_priced_through_it():
    class Doubled(FittedCostModel):
        def step_time(self, batch):
            out = super().step_time(batch)
            out.verify_ms *= 2.0
            return out

    cost = Doubled("qwen3-8b", "h100-sxm", draft="eagle3-qwen3-8b")
    pricer = StepPricer(cost)
    base = StepPricer(MODELS[0])
    args = (8.0, 4008.0, 16000.0, 8.0, 8.0, (), 500.0, 8)
    assert pricer.price_parts(*args)[1] == 2.0 * base.price_parts(*args)[1]


def test_price_parts_equal_price_with_memo_hits():
    # one pricer across many steps: the LM head memo and the shape memos hit, and answers stay price()'s
    pricer = StepPricer(MODELS[0])
    for t in (3, 17, 3, 64, 17, 3):
        for ctx in (100.0, 5000.0, 100.0):
            args = (float(t), ctx * t + t, ctx * t + 0.5 * t * (t + 1), float(t), float(t), (t, t // 2 + 1), ctx, t)
            ref = pricer.price(*args)
            assert pricer.price_parts(*args) == (ref.draft_ms, ref.verify_ms, ref.lm_head_ms, ref.overhead_ms)
    assert set(pricer._lm) == {3.0, 17.0, 64.0}

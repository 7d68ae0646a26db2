"""A step-time model at another machine speed: every part of every step `factor` times the inner model's.

What `echosim validate` simulates the replay with a second time, at the speed the engine's replay steps showed
against their calibrated price (a shared CPU's speed moves between the calibration and the replay, seconds
apart, by up to ~30% on this project's development machine: docs/VALIDATION.md). The inner model's shape (how a
step's time grows with tokens, context, drafting) is untouched.
"""

from __future__ import annotations

from cost_models.interface import Num, StepBatch, StepTime


class ScaledCostModel:
    """StepCostModel: `inner`'s step times times `factor` (> 0); the model, hardware and draft are inner's."""

    kind = "scaled"

    def __init__(self, inner, factor: float):
        if not factor > 0:
            raise ValueError(f"a speed factor must be > 0, not {factor!r}")
        self.inner, self.factor = inner, float(factor)
        self.model, self.hardware = inner.model, inner.hardware
        self.draft = getattr(inner, "draft", None)
        self.params = getattr(inner, "params", None)

    def __repr__(self) -> str:
        return f"{self.factor:g} x {self.inner!r}"

    def step_time(self, batch: StepBatch) -> StepTime:
        st = self.inner.step_time(batch)
        f = self.factor
        return StepTime(st.draft_ms * f, st.verify_ms * f, st.lm_head_ms * f, st.overhead_ms * f)

    def verify_ms(self, tokens_total: Num, kv_tokens_total: Num, num_seqs: Num) -> Num:
        return self.inner.verify_ms(tokens_total, kv_tokens_total, num_seqs) * self.factor

    def ar_step_ms(self, batch_size: Num, context_len: Num) -> Num:
        return self.inner.ar_step_ms(batch_size, context_len) * self.factor

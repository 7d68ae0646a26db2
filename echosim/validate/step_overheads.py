"""The engine's step time beyond its forwards: the per-step CPU work (scheduling, sampling, bookkeeping, serving,
each draft depth's launch) that a forward profile does not see, fitted to the engine's logged steps, in the
simulator's own terms (ClusterConfig's overhead knobs and the cost model's draft_depth_overhead_ms).

    over = fit_overheads(cost, calibration_steps)          # cost: the fitted forwards (cost_models)
    priced = priced_steps_ms(cost, over, replay_steps)    # any logged steps, as the simulator prices them
    replay_drift(replay_steps, priced)                    # ~1 when the machine ran at the calibration's speed

Used by `echosim validate` (echosim/validate/crossval.py); the steps are the engine's IterationRecords.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from echosim.validate.errors import ValidationError

SUSPECT_APE_PCT = 20.0  # a calibration fitted this badly means the profile is not this machine's state now
DRIFT_WARN = 0.15  # replay steps this far (median ratio) from their calibrated price: the machine drifted


@dataclass
class Overheads:
    """The engine's per-step CPU work beyond its forwards, in the simulator's terms (ClusterConfig)."""

    step_overhead_ms: float
    overhead_per_token_ms: float
    overhead_per_draft_row_ms: float
    overhead_per_request_ms: float = 0.0
    # per draft depth run (a draft forward launched, its top-k, the tree's bookkeeping): the cost model's own
    # draft_depth_overhead_ms, so the simulator charges it wherever a step drafts that depth
    overhead_per_draft_depth_ms: float = 0.0
    steps: int = 0
    median_ape_pct: float = 0.0        # per-step time, fitted forwards + these overheads, on the calibration steps
    p90_ape_pct: float = 0.0
    forward_share: float = 0.0         # of the calibration steps' time, the share the fitted forwards explain

    @property
    def suspect(self) -> bool:
        """The profiled forwards and the calibration steps disagree: the forwards alone take more than the steps
        did, or the fit misses most steps by a lot (the machine's speed moved between profiling and calibration)."""
        return self.forward_share > 1.0 or self.median_ape_pct > SUSPECT_APE_PCT


def predicted_forward_ms(cost, iterations) -> np.ndarray:
    """The fitted model's time of each logged engine step: the prefill chunks' target forward, then the trees'
    target forward and the drafting (the engine runs them one after the other; the simulator's
    prefill_forward="separate")."""
    from cost_models.interface import StepBatch

    out = np.zeros(len(iterations))
    for i, it in enumerate(iterations):
        if it.verify_tokens is None:
            out[i] = float(cost.step_time(StepBatch.from_requests([], [], (), it.prefill_chunks)).total_ms)
            continue
        batch = StepBatch.from_requests(it.verify_tokens.tolist(), it.context_lens.tolist(), it.draft_rows, [])
        out[i] = float(cost.step_time(batch).total_ms)
        if it.prefill_chunks:
            pre = cost.step_time(StepBatch.from_requests([], [], (), it.prefill_chunks))
            out[i] += float(pre.verify_ms + pre.lm_head_ms)
    return out


def overhead_terms(iterations) -> np.ndarray:
    """[steps, 5]: what each overhead term multiplies in a step: 1, tokens through the target (trees and prefill
    chunks), draft rows (all depths), decoding requests, draft depths run (ECHO's gates stop some steps early)."""
    tokens = np.array([(0 if it.verify_tokens is None else int(it.verify_tokens.sum()))
                       + sum(c for c, _ in it.prefill_chunks) for it in iterations], np.float64)
    rows = np.array([sum(it.draft_rows) for it in iterations], np.float64)
    batch = np.array([0 if it.verify_tokens is None else len(it.verify_tokens) for it in iterations], np.float64)
    depths = np.array([sum(1 for r in it.draft_rows if r > 0) for it in iterations], np.float64)
    return np.stack([np.ones_like(tokens), tokens, rows, batch, depths], axis=1)


def phase_rows(cost, iterations) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The overhead fit's equations: (X [n, 5] in overhead_terms' columns, what the fitted forwards leave
    unexplained [n], the step each row comes from [n]). A decode-only step whose phases the engine timed gives
    three rows, one per phase, each with the terms the simulator charges to that phase (StepPricer.observed_ms):
    drafting (draft_ms: per draft row, per draft depth), verification (target_ms: per token, per decoding
    request) and the rest of the step (per step). Any other step (prefill chunks in it, or a log without phase
    times) gives one row: its whole time. Fitted on whole steps alone, the terms sum right but split wrongly
    (rows, tokens, requests and depths move together): the simulated adaptive budget was then told that drafting
    cost a fifth of what the engine measured and that a sixth of every step was neither drafting nor
    verification, where the engine's remainder is about 1 ms (docs/ADAPTIVE.md)."""
    from cost_models.interface import StepBatch

    X = overhead_terms(iterations)
    pred = predicted_forward_ms(cost, iterations)
    rows, resid, step = [], [], []
    for i, it in enumerate(iterations):
        if it.verify_tokens is None or it.prefill_chunks or it.target_ms <= 0:
            rows.append(X[i])
            resid.append(it.step_ms - pred[i])
            step.append(i)
            continue
        tok, ctx = it.verify_tokens.tolist(), it.context_lens.tolist()
        plain = cost.step_time(StepBatch.from_requests(tok, ctx, (), []))
        full_ms = float(cost.step_time(StepBatch.from_requests(tok, ctx, it.draft_rows, [])).total_ms)
        target_ms = float(plain.verify_ms + plain.lm_head_ms)
        draft_ms = full_ms - float(plain.total_ms)   # draft forwards, their LM heads, the model's per-depth cost
        zero = np.zeros(5)
        d, v, r = zero.copy(), zero.copy(), zero.copy()
        d[2], d[4] = X[i, 2], X[i, 4]
        v[1], v[3] = X[i, 1], X[i, 3]
        r[0] = 1.0
        rows += [d, v, r]
        resid += [it.draft_ms - draft_ms, it.target_ms - target_ms,
                  it.step_ms - it.draft_ms - it.target_ms - float(plain.overhead_ms)]
        step += [i, i, i]
    return np.array(rows).reshape(-1, 5), np.array(resid, np.float64), np.array(step, np.int64)


def priced_steps_ms(cost, over: Overheads, iterations) -> np.ndarray:
    """Each logged engine step as the simulator prices it: the fitted forwards plus the fitted overheads. On the
    replay's own steps this separates the step-time model's error from a difference in what was run (the
    simulator's policy drafting and verifying other trees than the engine's did)."""
    extra = np.array([over.step_overhead_ms - float(cost.params.step_overhead_ms), over.overhead_per_token_ms,
                      over.overhead_per_draft_row_ms, over.overhead_per_request_ms,
                      over.overhead_per_draft_depth_ms - float(cost.params.draft_depth_overhead_ms)])
    return predicted_forward_ms(cost, iterations) + overhead_terms(iterations) @ extra


def replay_drift(iterations, priced_ms: np.ndarray) -> float | None:
    """Median of measured / priced over the replay's steps: 1 when the engine ran the replay at the speed its
    calibration showed; a machine that slowed (or sped up) in between moves every step alike."""
    if not len(iterations):
        return None
    ratio = np.array([it.step_ms for it in iterations]) / np.maximum(priced_ms, 1e-9)
    return round(float(np.median(ratio)), 4)


def fit_overheads(cost, iterations) -> Overheads:
    """overhead = a + b * tokens + c * draft rows + d * decoding requests + e * draft depths run, >= 0 each,
    fitted to what the fitted forwards leave unexplained in each step's measured time, phase by phase where the
    engine timed its phases (phase_rows: drafting c, e; verification b, d; the rest a). Every decode batch size
    class (1, 2-3, 4-7, ...) weighs the same: batch-1 steps outnumber batch-16 ones twenty to one, and only the
    large batches tell the per-request term from the per-step one. Iteratively reweighted least squares with
    Cauchy weights: a step stalled by the machine barely counts."""
    from scipy.optimize import lsq_linear

    if len(iterations) < 8:
        raise ValidationError("too few calibration steps to fit the engine's overheads (raise calibration_prompts)")
    pred = predicted_forward_ms(cost, iterations)
    meas = np.array([it.step_ms for it in iterations])
    X = overhead_terms(iterations)
    batch = X[:, 3].astype(np.int64)
    # the equations: a decode step's three timed phases, or a whole step (phase_rows)
    A, resid, step = phase_rows(cost, iterations)
    _, cls, count = np.unique(np.where(batch > 0, np.floor(np.log2(np.maximum(batch, 1))) + 1, 0),
                              return_inverse=True, return_counts=True)
    balance = (1.0 / count[cls])[step]  # each class's weights sum to 1 (per equation: its step's)
    robust = np.ones(len(resid))
    used = A.any(axis=0)  # a term the calibration never exercises (draft rows under ar) stays 0
    x = np.zeros(A.shape[1])
    for _ in range(6):  # iteratively reweighted least squares, non-negative terms
        sw = np.sqrt(balance * robust)
        x[used] = lsq_linear(A[:, used] * sw[:, None], resid * sw, bounds=(0.0, np.inf)).x
        r = A @ x - resid
        scale = max(1.4826 * float(np.median(np.abs(r - np.median(r)))), 0.05)  # this fit's own spread (MAD)
        robust = 1.0 / (1.0 + (r / (2.385 * scale)) ** 2)  # Cauchy, at its usual tuning constant
    a, b, c, d, e = (float(v) for v in x)
    ape = np.abs(pred + X @ x - meas) / meas * 100
    return Overheads(step_overhead_ms=float(cost.params.step_overhead_ms) + a, overhead_per_token_ms=b,
                     overhead_per_draft_row_ms=c, overhead_per_request_ms=d,
                     overhead_per_draft_depth_ms=float(cost.params.draft_depth_overhead_ms) + e, steps=len(iterations),
                     median_ape_pct=round(float(np.median(ape)), 2),
                     p90_ape_pct=round(float(np.percentile(ape, 90)), 2),
                     forward_share=round(float(pred.sum() / meas.sum()), 4))

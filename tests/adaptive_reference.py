"""The online-adaptive budget as it was before its per-step cost was cut (echosim/spec/adaptive.py at the commit
that made ECHO's served default adaptive, plus the plain-step pricing fix), kept as a test oracle: the faster
code must take the same decisions on the same inputs (tests/test_spec_adaptive.py). Not used by the project.
Its helpers that did not change (config, priors, features) come from the module itself."""

from __future__ import annotations

import numpy as np

from echosim.spec.adaptive import (
    _EPS,
    MAX_DEPTH,
    PROB_CENTRES,
    PROB_EDGES,
    RETRY_STEPS,
    ROBUST_C,
    ROBUST_CLIP,
    ROBUST_FLOOR,
    ROBUST_RATE,
    AdaptiveConfig,
    _verify_features,
    _verify_prior,
)
from echosim.spec.budget import StepTimeFn
from echosim.spec.forest import DraftForest
from echosim.spec.policies.base import DraftPlan, Policy


class AcceptanceTable:
    """P(a node is accepted | its parent was) per (depth, draft-probability bin), from verify results."""

    def __init__(self, prior_trials: float, forget: float):
        self.prior_trials, self.forget = prior_trials, forget
        self.hits = np.zeros((MAX_DEPTH, len(PROB_CENTRES)))
        self.trials = np.zeros((MAX_DEPTH, len(PROB_CENTRES)))

    def rates(self) -> np.ndarray:
        """[MAX_DEPTH, bins]: posterior mean, strictly inside (0, 1) so gains strictly decrease along a path."""
        n0 = self.prior_trials
        r = (self.hits + n0 * PROB_CENTRES) / (self.trials + n0)
        return np.clip(r, _EPS, 1.0 - _EPS)

    @staticmethod
    def cell(depth: np.ndarray, logp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = np.minimum(np.asarray(depth, np.int64), MAX_DEPTH) - 1
        return d, np.searchsorted(PROB_EDGES, np.exp(np.asarray(logp, np.float64)), side="right")

    def update(self, depth: np.ndarray, logp: np.ndarray, hit: np.ndarray) -> None:
        self.hits *= self.forget
        self.trials *= self.forget
        if len(depth):
            d, b = self.cell(depth, logp)
            np.add.at(self.hits, (d, b), hit.astype(np.float64))
            np.add.at(self.trials, (d, b), 1.0)


def _robust(owner, residual: float, predicted: float) -> float:
    """Cauchy weight of the residual at owner.scale (the residuals' clipped running mean absolute size, at least
    ROBUST_FLOOR of the prediction, starting at the prediction); updates owner.scale."""
    floor = ROBUST_FLOOR * max(abs(predicted), _EPS)
    s = max(owner.scale if owner.scale is not None else abs(predicted), floor)
    w = 1.0 / (1.0 + (residual / (ROBUST_C * s)) ** 2)
    owner.scale = s + ROBUST_RATE * (min(abs(residual), ROBUST_CLIP * s) - s)
    return w


class LinearCost:
    """y ~ theta . x by recursive least squares with forgetting, regularized toward a prior theta0 (weight: the
    prior's pseudo-observations). Coefficients are kept >= 0: more work never costs less."""

    def __init__(self, theta0: np.ndarray, prior_weight: np.ndarray, forget: float):
        self.theta0 = np.asarray(theta0, np.float64)
        self.prior = np.diag(np.asarray(prior_weight, np.float64))
        self.forget = forget
        n = len(self.theta0)
        self.xx, self.xy = np.zeros((n, n)), np.zeros(n)
        self.theta = self.theta0.copy()
        self.samples = 0
        self.scale = None

    def update(self, x: np.ndarray, y: float) -> None:
        x = np.asarray(x, np.float64)
        w = _robust(self, y - float(x @ self.theta), float(x @ self.theta))
        self.xx = self.forget * self.xx + w * np.outer(x, x)
        self.xy = self.forget * self.xy + w * x * y
        self.samples += 1
        try:
            theta = np.linalg.solve(self.xx + self.prior, self.xy + self.prior @ self.theta0)
        except np.linalg.LinAlgError:
            return
        self.theta = np.maximum(theta, 0.0)


class ReferenceAdaptive(Policy):
    """The online-adaptive budget around an inner policy (see the module docstring). Same name as the inner
    policy; `describe()` adds the `adaptive` settings, `state()` the live estimates."""

    config_cls = AdaptiveConfig
    needs_step_time = True  # backends bind a profile of their own step as the cost prior when they have none

    def __init__(self, inner: Policy, config: AdaptiveConfig | None = None, step_time: StepTimeFn | None = None):
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]
        self.gates_last_depth = inner.gates_last_depth
        super().__init__(config, step_time if step_time is not None else inner.step_time)

    def check(self) -> None:
        c = self.config
        c.check()
        self.table = AcceptanceTable(c.prior_trials, c.forget)
        self.verify_cost = LinearCost(_verify_prior(self.step_time), [4.0, 4.0, 4.0], c.forget)
        # draft_ms = e * (drafted at all) + f * depths + g * draft rows; generic prior: 0.5 ms a depth
        self.draft_cost = LinearCost(np.array([0.2, 0.5, 0.005]), [2.0, 2.0, 2.0], c.forget)
        self.fixed_ms = 0.0
        self.scale, self._fixed_seen = None, False  # the rest of the step's robust scale (_robust)
        self.full = self.inner.plan(1)
        # running means, per request-step of the steps that drafted: expected accepted drafts of the chosen nodes,
        # verified drafts, draft depths and draft rows (per request); None until a step has drafted
        self.drafting: np.ndarray | None = None
        self.drafts = True  # the plan: draft this step (the inner policy's full plan, gated) or decode plainly
        self.probe_interval, self.since_probe, self.probing = c.probe_every, 0, False
        self.since_plain, self.plain_probe = 0, False  # plain steps taken while drafting, to price plain decoding
        self.steps = 0
        self.rate_per_ms = 0.0  # predicted batch tokens per ms of the chosen plan: sets a verified token's price
        self.last: dict = {}
        # per-request estimates, by the keys the backend gives (set_batch); row order of the current batch
        # key -> [observed hits, predicted hits, best depth-1 gain (running mean), step it last drafted]
        self._req: dict[int, np.ndarray] = {}
        self._keys: np.ndarray | None = None
        self._has_new = False
        self._planned = False
        self._factor = np.ones(0)
        self._gain: np.ndarray | None = None
        self._gain_depth = 0

    def bind(self, step_time: StepTimeFn | None) -> Policy:
        self.inner.bind(step_time)
        self.step_time = step_time
        self.verify_cost = LinearCost(_verify_prior(step_time), [4.0, 4.0, 4.0], self.config.forget)
        return self

    # ---- the backend's side --------------------------------------------------------------------------------

    def set_batch(self, keys) -> None:
        """Stable ids of the requests about to step, in batch row order (per-request estimates follow them)."""
        self._keys = np.asarray(keys, np.int64)
        self._has_new = any(k not in self._req for k in self._keys.tolist())
        self.inner.set_batch(keys)

    def observe_step(self, batch_size: int, verify_tokens: int, verify_ms: float, draft_depths: int = 0,
                     draft_rows: float = 0.0, draft_ms: float = 0.0, other_ms: float | None = None) -> None:
        """A finished step's measured (or priced) times: the verify forward of `verify_tokens` tokens (roots
        included) for `batch_size` requests, the drafting of `draft_depths` depths over `draft_rows` rows in all,
        and the rest of the step (`other_ms`, when the step held nothing else, e.g. no prefill)."""
        x = _verify_features(self.step_time, np.array([float(verify_tokens)]), batch_size)[0]
        self.verify_cost.update(x, float(verify_ms))
        if draft_depths > 0:
            self.draft_cost.update([1.0, draft_depths, draft_rows], float(draft_ms))
        if other_ms is not None and other_ms >= 0:
            w = 0.1 if self.steps > 10 else 0.5
            if self._fixed_seen:
                w *= _robust(self, float(other_ms) - self.fixed_ms, self.fixed_ms)
            self._fixed_seen = True
            self.fixed_ms = (1 - w) * self.fixed_ms + w * float(other_ms)

    # ---- cost predictions ------------------------------------------------------------------------------------

    def _verify_ms(self, tokens: np.ndarray, batch_size: int) -> np.ndarray:
        return _verify_features(self.step_time, tokens, batch_size) @ self.verify_cost.theta

    def _token_ms(self, batch_size: int, tokens: float) -> float:
        """The marginal verify cost of a draft token around `tokens` verified drafts (the batch together)."""
        n = max(tokens, 1.0)
        v = self._verify_ms(np.array([batch_size, batch_size + n]), batch_size)
        return float(v[1] - v[0]) / n

    def _draft_ms(self, depths: np.ndarray, rows: np.ndarray) -> np.ndarray:
        e, f, g = self.draft_cost.theta
        depths = np.asarray(depths, np.float64)
        return np.where(depths > 0, e + f * depths + g * np.asarray(rows, np.float64), 0.0)

    def _rows_per_request(self) -> np.ndarray:
        """Cumulative draft rows per drafting request by depth (the root's row at depth 1, its beam below)."""
        f = self.full
        widths = [1.0, float(min(f.k, f.k1))] + [float(f.k)] * max(f.depth - 2, 0)
        return np.cumsum(widths[:f.depth])

    def _plan_goodput(self, batch_size: int) -> tuple[float, float]:
        """Predicted batch tokens per ms of (plain decoding, drafting as the last drafting steps did)."""
        B = float(batch_size)
        plain = B / max(self.fixed_ms + float(self._verify_ms(np.array([B]), batch_size)[0]), _EPS)
        if self.drafting is None:
            return plain, np.inf
        gain, tokens, depths, rows = self.drafting
        ms = self.fixed_ms + float(self._draft_ms(np.array([depths]), np.array([rows * B]))[0]) + \
            float(self._verify_ms(np.array([B * (1.0 + tokens)]), batch_size)[0])
        return plain, B * (1.0 + gain) / max(ms, _EPS)

    # ---- the scheduler contract -----------------------------------------------------------------------------

    def max_plan(self, batch_size: int) -> DraftPlan:
        return self.inner.max_plan(batch_size)

    def max_tree_tokens(self) -> int | None:
        return self.inner.max_tree_tokens()

    def plan(self, batch_size: int) -> DraftPlan:
        full = self.inner.plan(batch_size)
        # while drafting pays, a plain step now and then: the cost fit sees what plain decoding costs (else it
        # only extrapolates it from tree steps) and the drafting-or-not decision compares two measured prices
        every = self.config.plain_every
        self.plain_probe = bool(self.drafts and not self.probing and not self._has_new and every > 0
                                and self.since_plain >= every)
        if self.plain_probe:
            return DraftPlan(0, 0, 0)
        # a request never seen drafting gets its chance: its own estimates start there
        return full if self.drafts or self.probing or self._has_new else DraftPlan(0, 0, 0)

    def _factors(self, batch_size: int) -> np.ndarray:
        keys = self._keys
        if keys is None or len(keys) != batch_size:
            return np.ones(batch_size)
        n0 = self.config.request_trials
        st = np.array([self._req.get(int(k), (0.0, 0.0, np.nan, -1.0)) for k in keys.tolist()]).reshape(batch_size, 4)
        # a request left out of drafting gets a new chance a few steps later (its text may have become easier)
        self._best1 = np.where(self.steps - st[:, 3] < RETRY_STEPS, st[:, 2], np.nan)
        return (st[:, 0] + n0) / (st[:, 1] + n0)

    def start(self, batch_size: int) -> np.ndarray:
        self._factor = self._factors(batch_size)
        self._gain, self._gain_depth = None, 0
        # the expected accepted tokens a verified draft must bring: its time (the mean over all the drafts the
        # inner policy may verify, a lenient price under a convex step cost) at the step's predicted rate
        cap = self.inner.max_tree_tokens() or 1 + self.full.k1 + (self.full.depth - 1) * self.full.k
        self._price = self.rate_per_ms * self._token_ms(batch_size, float(batch_size * (cap - 1)))
        self._planned = True  # this step's plan drafts (observe reads it: a plan that drafted nobody counts)
        want = self.inner.start(batch_size)
        if not self.probing and self.steps > 0 and len(getattr(self, "_best1", ())) == batch_size:
            best1 = self._best1
            want = want & ~(best1 < self._price)  # NaN (new request): draft
        return want

    def _gains_upto(self, forest: DraftForest, depth: int) -> np.ndarray:
        """Calibrated gains [B, S] (P(path accepted)) filled depth by depth up to `depth`; 0 where undrafted."""
        B, S = forest.token.shape
        if self._gain is None or self._gain.shape != (B, S):
            self._gain, self._gain_depth = np.zeros((B, S)), 0
        rates = self.table.rates()
        f = self._factor if len(self._factor) == B else np.ones(B)
        off = forest.depth_offsets
        g = self._gain
        for d in range(self._gain_depth + 1, min(depth, forest.max_depth) + 1):
            lo, hi = int(off[d - 1]), int(off[d])
            dd, bb = self.table.cell(np.full(hi - lo, d), forest.logp[:, lo:hi])
            cond = np.minimum(rates[dd[None, :], bb] * f[:, None], 1.0 - _EPS)
            par = forest.parent[:, lo:hi]
            parent_gain = np.where(par >= 0, np.take_along_axis(g, np.maximum(par, 0).astype(np.int64), axis=1), 1.0)
            g[:, lo:hi] = np.where(forest.valid[:, lo:hi], cond * parent_gain, 0.0)
        self._gain_depth = max(self._gain_depth, min(depth, forest.max_depth))
        return g

    def gate(self, depth, rows, beam_scores, forest):
        keep = np.asarray(self.inner.gate(depth, rows, beam_scores, forest), dtype=bool)
        if self.probing or depth >= forest.max_depth:
            return keep
        g = self._gains_upto(forest, depth)
        beam = forest.beam_slot[rows, depth - 1]  # [n, k], -1 where the beam is short
        bg = np.where(beam >= 0, np.take_along_axis(g[rows], np.maximum(beam, 0), axis=1), 0.0)
        top_next = float(self.table.rates()[min(depth, MAX_DEPTH - 1)].max())
        f = self._factor[rows] if len(self._factor) == len(forest.root_token) else np.ones(len(rows))
        child = bg * np.minimum(top_next * f, 1.0)[:, None]  # best possible child gain of each beam node
        worth = np.maximum(child - self._price, 0.0)
        row_worth = worth.sum(axis=1)
        keep &= row_worth > 0
        # the next depth's draft forward must pay for itself too
        rows_next = float(keep.sum()) * forest.k
        cost = float(self._draft_ms(np.array([1.0]), np.array([rows_next]))[0] - self.draft_cost.theta[0])
        if keep.any() and row_worth[keep].sum() < self.rate_per_ms * cost:
            keep[:] = False
        return keep

    def select(self, forest: DraftForest) -> np.ndarray:
        base = self.inner.select(forest)
        B = len(forest.root_token)
        if len(base) == 0 or B == 0:
            self._remember(forest, base, np.zeros(0), B)
            return base
        S = forest.num_slots
        g = self._gains_upto(forest, forest.max_depth).ravel()[base]
        order = np.argsort(-g, kind="stable")
        stop = forest.stop_depth if forest.stop_depth is not None else np.zeros(B)
        drafted = int(stop.max(initial=0))
        rows = float(np.sum(self._rows_per_request()[np.maximum(stop[stop > 0], 1) - 1])) if drafted else 0.0
        sunk = float(self._draft_ms(np.array([drafted]), np.array([rows]))[0])
        K = np.arange(len(base) + 1)
        gain = np.r_[0.0, np.cumsum(g[order])]
        ms = self.fixed_ms + sunk + self._verify_ms(B + K, B)
        goodput = (B + gain) / np.maximum(ms, _EPS)
        k = int(np.argmax(goodput))
        chosen = np.sort(base[order[:k]])
        self.last = dict(batch=B, candidates=int(len(base)), verified_drafts=k, expected_accepted=round(float(
            gain[k]), 3), draft_depth=drafted, predicted_ms=round(float(ms[k]), 3))
        self._remember(forest, chosen, g[order[:k]], B, S)
        return chosen

    def _remember(self, forest, chosen, gains, B, S=1) -> None:
        self._chosen, self._chosen_gain, self._chosen_B, self._chosen_S = chosen, gains, B, S

    def observe(self, forest: DraftForest, selection: np.ndarray, accept_len: np.ndarray,
                accepted: np.ndarray | None = None) -> None:
        self.inner.observe(forest, selection, accept_len, accepted)
        self.steps += 1
        B = len(accept_len)
        S = forest.num_slots
        if len(selection) and accepted is not None and S:
            sel = np.asarray(selection, np.int64)
            acc = np.zeros(B * S + 1, bool)
            acc[np.asarray(accepted, np.int64)] = True
            req, slot = sel // S, sel % S
            par = forest.parent[req, slot]
            tried = (par < 0) | acc[np.where(par >= 0, req * S + par, B * S)]
            depth = forest.slot_depth[slot]
            hit = acc[sel]
            self.table.update(depth[tried], forest.logp[req[tried], slot[tried]], hit[tried])
            # the request's factor: its hits against the model's predictions on the same trials
            rates = self.table.rates()
            d, b = self.table.cell(depth[tried], forest.logp[req[tried], slot[tried]])
            pred = np.bincount(req[tried], weights=rates[d, b], minlength=B)
            obs = np.bincount(req[tried], weights=hit[tried].astype(np.float64), minlength=B)
            g = self._gain if self._gain is not None and self._gain.shape == (B, S) else None
            lo, hi = int(forest.depth_offsets[0]), int(forest.depth_offsets[1])
            best1 = g[:, lo:hi].max(axis=1) if g is not None else np.full(B, np.nan)
            self._update_requests(obs, pred, best1, forest.stop_depth)
        elif len(selection) == 0:
            self.table.update(np.zeros(0), np.zeros(0), np.zeros(0, bool))
        self._update_plan(forest, B, S)

    def _update_requests(self, obs, pred, best1, stop) -> None:
        keys = self._keys
        if keys is None or len(keys) != len(obs):
            return
        fg = self.config.forget
        for i, k in enumerate(keys.tolist()):
            if stop is not None and stop[i] == 0:
                continue
            old = self._req.pop(k, None)
            o, p = (fg * old[0], fg * old[1]) if old is not None else (0.0, 0.0)
            b1 = 0.5 * (old[2] + best1[i]) if old is not None and np.isfinite(old[2]) else best1[i]
            self._req[k] = np.array([o + obs[i], p + pred[i], b1, self.steps])
        while len(self._req) > self.config.max_requests:
            self._req.pop(next(iter(self._req)))

    def _update_plan(self, forest: DraftForest, B: int, S: int) -> None:
        drafted = forest.stop_depth if forest.stop_depth is not None and S else np.zeros(B, np.int64)
        if drafted.max(initial=0) > 0 and B:
            gains = getattr(self, "_chosen_gain", np.zeros(0))
            depth = int(drafted.max())
            rows = float(np.sum(self._rows_per_request()[drafted[drafted > 0] - 1]))
            now = np.array([gains.sum() / B, len(gains) / B, depth, rows / B])
            self.drafting = now if self.drafting is None else 0.8 * self.drafting + 0.2 * now
        elif self._planned and self.drafting is not None:  # the plan drafted, but no request was worth it
            self.drafting = 0.8 * self.drafting
        self._planned = False
        plain, spec = self._plan_goodput(max(B, 1))
        drafts = bool(spec > plain)
        self.rate_per_ms = max(plain, spec if np.isfinite(spec) else plain)
        if self.probing:  # a probe that leaves the plan as it was doubles the wait for the next one
            self.probe_interval = self.config.probe_every if drafts else \
                min(2 * self.probe_interval, self.config.probe_max)
            self.probing = False
        self.drafts = drafts
        self.since_plain = 0 if self.plain_probe or not drafts else self.since_plain + 1
        self.plain_probe = False
        self.since_probe += 1
        if not drafts and self.since_probe >= self.probe_interval:
            self.probing, self.since_probe = True, 0

    # ---- reporting ---------------------------------------------------------------------------------------------

    def state(self) -> dict:
        rates = self.table.rates()
        trials = self.table.trials.sum(axis=1)
        D = self.full.depth
        return {
            "steps": self.steps, "drafting": self.drafts, "probing": self.probing,
            "probe_interval": int(self.probe_interval), "max_depth": int(D),
            "tokens_per_ms_predicted": round(self.rate_per_ms, 4),
            "verify_ms_model": dict(zip(("prior_scale", "prior_scale_drafts", "base") if self.step_time is not None
                                        else ("per_root", "per_draft", "base"),
                                        np.round(self.verify_cost.theta, 4).tolist(), strict=True)),
            "draft_ms_model": dict(zip(("base", "per_depth", "per_row"),
                                       np.round(self.draft_cost.theta, 4).tolist(), strict=True)),
            "fixed_ms": round(self.fixed_ms, 3),
            "per_drafting_request_step": None if self.drafting is None else dict(zip(
                ("expected_accepted", "verified_drafts", "draft_depth", "draft_rows"),
                np.round(self.drafting, 3).tolist(), strict=True)),
            # acceptance of a depth's most likely candidates (draft probability >= 0.9), with its weight
            "accept_rate_top_bin_by_depth": np.round(rates[:D, -2:].mean(axis=1), 3).tolist(),
            "trials_by_depth": np.round(trials[:D], 1).tolist(),
            "requests_tracked": len(self._req),
            "last_step": self.last,
        }

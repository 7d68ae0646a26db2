"""The online-adaptive budget: any policy's drafting and verification, trimmed every step to what pays.

Speculation pays only while a verified draft's expected acceptance is worth the time it adds to the step. Both
sides move: acceptance with the prompts and the requests, the step's cost with the load and the machine. So this
wrapper keeps both as running estimates, updated from what the backend reports after each step, and decides:

- what to verify (`select`): of the inner policy's own selection (its caps are the most it may verify), the
  nodes in order of expected gain, the prefix K that maximizes this step's goodput
  (B + sum of the K gains) / (fixed + draft + verify(B + K)) ms. K = 0 is plain decoding for the whole batch;
  a request none of whose nodes pays verifies its root alone.
- whether to draft at all (`plan`): the inner policy's plan while the goodput predicted from the last drafting
  steps (their chosen nodes' gains and counts, their draft depths and rows, priced by the cost fits) beats plain
  decoding's, else none (plain decoding for the whole batch). While off, a probe step drafts now and then (an
  interval that doubles while probes change nothing) so the estimates stay fresh; a request new to the batch
  always gets a drafting step.
- who drafts (`start`) and how deep (`gate`): a request drafts only while its best depth-1 candidate (a running
  mean) is expected to pay for a verified token, else it sits out a few steps; after each depth a request keeps
  drafting only while its best path's next node could still pay, and the batch stops when the next depth's total
  expected gain does not pay for the draft forward.

Expected gain of a node = the probability that the target accepts its whole path: the product, along the path,
of P(accepted | parent accepted), estimated per (depth, draft-probability bin) from every verified node whose
parent was accepted (a Beta prior centred on the draft probability itself, exponentially forgotten), times a
per-request factor (the request's observed acceptances over the model's predictions, shrunk toward 1). Gains
strictly decrease along a path, so every prefix of the gain order is ancestor-closed: lossless verification is
untouched (it only ever sees a subset of what the inner policy would verify).

Step cost: verify_ms = s * prior_ms(tokens, batch) + a, where prior_ms is the bound StepTimeFn (a cost model, or
the backend's own profile: flat, then linear in tokens) and (s, a) start at (1, 0); without a prior, prior_ms is
the token count itself. draft_ms = e * drafted + f * depths + g * draft rows. Each is a
recursive least-squares fit with forgetting, regularized toward its prior; `fixed` is the running mean of the
rest of the step. The engine feeds its measured times, the simulator its priced ones, through `observe_step`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from echosim.spec.budget import StepTimeFn
from echosim.spec.forest import DraftForest
from echosim.spec.policies.base import ConfigError, DraftPlan, Policy

# Draft-probability bin edges: conditional acceptance is estimated per (depth, bin).
PROB_EDGES = np.array([0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.97])
PROB_CENTRES = np.r_[0.025, 0.5 * (PROB_EDGES[:-1] + PROB_EDGES[1:]), 0.985]
MAX_DEPTH = 16
RETRY_STEPS = 4  # steps a request whose best depth-1 draft did not pay sits out of drafting
_EPS = 1e-6
_PLAIN = DraftPlan(0, 0, 0)
# np.linalg.solve's own LAPACK kernel without its Python wrapper (error-state set-up: 4x the cost of a 3 x 3
# solve, twice a step); np.linalg.solve remains the fallback, and the kernel's result is the same
_solve = getattr(getattr(np.linalg, "_umath_linalg", None), "solve1", None)
_NEW_REQUEST = np.array([0.0, 0.0, np.nan, -1.0])  # estimates of a request not seen drafting yet
# robust step-cost fits (RobustScale): Cauchy's usual tuning constant; a residual scale of at least 5% of the
# predicted time (a CPU step's ordinary jitter) and its running mean at a rate of 0.1 a step, each residual
# clipped at 4 scales
ROBUST_C, ROBUST_FLOOR, ROBUST_RATE, ROBUST_CLIP = 2.385, 0.05, 0.1, 4.0


@dataclass
class AdaptiveConfig:
    prior_trials: float = 4.0      # pseudo-trials of each (depth, bin) cell's prior (mean: the draft probability)
    request_trials: float = 6.0    # pseudo-trials behind each request's own acceptance factor (toward 1)
    forget: float = 0.995          # per-step weight of the past, acceptance and step-cost fits alike
    probe_every: int = 8           # first interval (steps) between full-depth probes while drafting less
    probe_max: int = 64            # the interval doubles up to this while probing changes nothing
    plain_every: int = 32          # while drafting, a plain step this often prices plain decoding (0: never)
    max_requests: int = 4096       # per-request estimates kept (the oldest forgotten first)

    def check(self) -> None:
        if not self.prior_trials > 0 or not self.request_trials > 0:
            raise ConfigError("adaptive prior_trials and request_trials must be > 0")
        if not 0.0 < self.forget <= 1.0:
            raise ConfigError(f"adaptive forget must be in (0, 1], not {self.forget}")
        if self.probe_every < 1 or self.probe_max < self.probe_every or self.max_requests < 1:
            raise ConfigError("adaptive needs 1 <= probe_every <= probe_max and max_requests >= 1")
        if self.plain_every < 0:
            raise ConfigError(f"adaptive plain_every must be >= 0, not {self.plain_every}")


class AcceptanceTable:
    """P(a node is accepted | its parent was) per (depth, draft-probability bin), from verify results."""

    def __init__(self, prior_trials: float, forget: float):
        self.prior_trials, self.forget = prior_trials, forget
        self.hits = np.zeros((MAX_DEPTH, len(PROB_CENTRES)))
        self.trials = np.zeros((MAX_DEPTH, len(PROB_CENTRES)))
        self._rates: np.ndarray | None = None  # cached between updates (read several times a step)
        self._best: np.ndarray | None = None

    def rates(self) -> np.ndarray:
        """[MAX_DEPTH, bins]: posterior mean, strictly inside (0, 1) so gains strictly decrease along a path.
        Cached until the next update: read it, never write it."""
        if self._rates is None:
            n0 = self.prior_trials
            r = (self.hits + n0 * PROB_CENTRES) / (self.trials + n0)
            self._rates = np.clip(r, _EPS, 1.0 - _EPS)
        return self._rates

    def best(self) -> np.ndarray:
        """[MAX_DEPTH]: each depth's highest rate (the best a node's child could do)."""
        if self._best is None:
            self._best = self.rates().max(axis=1)
        return self._best

    @staticmethod
    def bins(logp: np.ndarray) -> np.ndarray:
        return np.searchsorted(PROB_EDGES, np.exp(logp, dtype=np.float64), side="right")

    @staticmethod
    def cell(depth: np.ndarray, logp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = np.minimum(np.asarray(depth, np.int64), MAX_DEPTH) - 1
        return d, AcceptanceTable.bins(logp)

    def update(self, depth: np.ndarray, logp: np.ndarray, hit: np.ndarray) -> None:
        if len(depth):
            self.update_cells(*self.cell(depth, logp), hit)
        else:
            self.update_cells(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool))

    def update_cells(self, d: np.ndarray, b: np.ndarray, hit: np.ndarray) -> None:
        """One step's trials, by cell (`cell`'s output): forget the past a step's worth, then count them."""
        self.hits *= self.forget
        self.trials *= self.forget
        if len(d):
            np.add.at(self.hits, (d, b), hit.astype(np.float64))
            np.add.at(self.trials, (d, b), 1.0)
        self._rates = self._best = None


def robust_weight(residual: float, scale: float) -> float:
    """Cauchy weight of a residual at a scale (its usual tuning constant): ~1 within the scale, ~0 far outside."""
    z = residual / (ROBUST_C * scale)
    return 1.0 / (1.0 + z * z)


class RobustScale:
    """A running scale of a fit's residuals: their mean absolute size, each clipped at ROBUST_CLIP scales so one
    stall cannot blow it up, and never below ROBUST_FLOOR of the predicted value. It starts at the first
    prediction itself (nothing is known yet: a prior off by 5x still teaches within a few steps) and settles to
    the residuals' own size; a lasting change (the machine slowed) moves it by up to 30% a step."""

    def __init__(self) -> None:
        self.value: float | None = None

    def weigh(self, residual: float, predicted: float) -> float:
        """The residual's weight, then the scale updated with it."""
        floor = ROBUST_FLOOR * max(abs(predicted), _EPS)
        s = max(self.value if self.value is not None else abs(predicted), floor)
        w = robust_weight(residual, s)
        self.value = s + ROBUST_RATE * (min(abs(residual), ROBUST_CLIP * s) - s)
        return w


class LinearCost:
    """y ~ theta . x by recursive least squares with forgetting, regularized toward a prior theta0 (weight: the
    prior's pseudo-observations). Coefficients are kept >= 0: more work never costs less. Each observation counts
    with a Cauchy weight of its residual against the running fit (RobustScale): a step stalled by the machine (a
    fresh engine's first verify took 239 ms where 12 were due, and with full weight it taught the budget that
    drafts cost 12x their price, so it decoded plainly for the rest of the run: docs/ADAPTIVE.md) barely counts."""

    def __init__(self, theta0: np.ndarray, prior_weight: np.ndarray, forget: float):
        self.theta0 = np.asarray(theta0, np.float64)
        self.prior = np.diag(np.asarray(prior_weight, np.float64))
        self.forget = forget
        n = len(self.theta0)
        self.xx, self.xy = np.zeros((n, n)), np.zeros(n)
        self.theta = self.theta0.copy()
        self.coef = self.theta.tolist()  # theta as Python floats, for scalar predictions
        self.samples = 0
        self.scale = RobustScale()
        self._prior_xy = self.prior @ self.theta0

    def update(self, x: np.ndarray, y: float) -> None:
        x = np.asarray(x, np.float64)
        pred = float(x @ self.theta)
        w = self.scale.weigh(y - pred, pred)
        self.xx = self.forget * self.xx + (w * x)[:, None] * x[None, :]
        self.xy = self.forget * self.xy + (w * y) * x
        self.samples += 1
        a, b = self.xx + self.prior, self.xy + self._prior_xy
        theta = _solve(a, b) if _solve is not None else None  # (xx + prior) is positive definite: solvable
        if theta is None or not np.isfinite(theta).all():
            try:
                theta = np.linalg.solve(a, b)
            except np.linalg.LinAlgError:
                return
        self.theta = np.maximum(theta, 0.0)
        self.coef = self.theta.tolist()


def convex_step_time(table: dict) -> StepTimeFn:
    """A step-time prior from a profile {tokens: ms} taken on a busy machine: the lower convex hull of its points,
    extended linearly past the last one. A step's true cost is flat, then linear in tokens (convex), and a busy
    machine only ever adds time, so the hull (of each point's minimum with every later one) keeps the shape and
    drops the spikes that would otherwise read as a wall of cost at some token count (and, past the profile's end,
    as free tokens)."""
    t = np.array(sorted(table), np.float64)
    y = np.array([table[k] for k in sorted(table)], np.float64)
    y = np.minimum.accumulate(y[::-1])[::-1]  # more tokens never cost less: a point above a later one was slowed
    hull: list[int] = []
    for i in range(len(t)):  # Andrew's monotone chain, lower part
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (y[b] - y[a]) * (t[i] - t[a]) >= (y[i] - y[a]) * (t[b] - t[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    ht, hy = t[hull], y[hull]
    slope = max((hy[-1] - hy[-2]) / (ht[-1] - ht[-2]), 0.0) if len(ht) > 1 else 0.0

    def step_ms(tokens, batch_size):
        x = np.asarray(tokens, np.float64)
        return np.interp(x, ht, hy) + slope * np.maximum(x - ht[-1], 0.0)

    step_ms.table = {int(a): round(float(b), 3) for a, b in zip(ht, hy, strict=True)}  # type: ignore[attr-defined]
    return step_ms


def batched_step_time(grid: dict) -> StepTimeFn:
    """A step-time prior from a profile {batch size: {tokens per request: ms}}: for each profiled batch size, the
    convex hull of its row (convex_step_time, over tokens per request); between batch sizes, linear in log batch
    size; past the largest, that batch size's row at the same total token count (tokens spread over more rows)."""
    sizes = np.array(sorted(int(b) for b in grid), np.float64)
    rows = [convex_step_time({int(n): float(ms) for n, ms in grid[b].items()})
            for b in sorted(grid, key=int)]

    def step_ms(tokens, batch_size):
        t = np.asarray(tokens, np.float64)
        b = float(max(batch_size, 1))
        if b >= sizes[-1]:
            return rows[-1](t / sizes[-1], int(sizes[-1]))
        if b <= sizes[0]:
            return rows[0](t / b, int(sizes[0]))
        j = int(np.searchsorted(sizes, b)) - 1
        w = (np.log(b) - np.log(sizes[j])) / (np.log(sizes[j + 1]) - np.log(sizes[j]))
        return (1 - w) * rows[j](t / b, 0) + w * rows[j + 1](t / b, 0)

    step_ms.table = {int(b): dict(grid[b]) for b in grid}  # type: ignore[attr-defined]
    return step_ms


def _verify_features(step_time: StepTimeFn | None, tokens: np.ndarray, batch_size: int) -> np.ndarray:
    """[n, 3] features of verify_ms = theta . x: (the prior's ms for the batch's roots alone, what the drafts add
    to it, 1) with a prior step-time model, so the fit only rescales and shifts the profiled shape (flat, then
    linear); (roots, drafts, 1) in tokens without one. The plain step and the drafts get scales of their own: a
    tree's tokens cost more than the causal profile's (tree masks, longer contexts than the profile's), and with
    one scale that surplus, learnt from tree steps alone, was charged to plain decoding too (+20% in CPU time
    against ar's measured steps on Spec-Bench at 16 requests: docs/ADAPTIVE.md). No per-request term: under
    closed-loop load the batch size moves with the token count, and such a term soaks up what tokens cost,
    making verification look free at high load."""
    t = np.asarray(tokens, np.float64)
    b = np.full_like(t, float(max(batch_size, 1)))
    if step_time is None:
        return np.column_stack([b, t - b, np.ones_like(t)])
    plain = np.asarray(step_time(b, batch_size), np.float64)
    full = np.asarray(step_time(t, batch_size), np.float64)
    return np.column_stack([plain, np.maximum(full - plain, 0.0), np.ones_like(t)])


def _verify_prior(step_time: StepTimeFn | None) -> np.ndarray:
    """theta0: the prior model itself (scales 1), or a generic 10 ms step whose token costs 1% of it."""
    return np.array([1.0, 1.0, 0.0]) if step_time is not None else np.array([0.1, 0.1, 10.0])


class Adaptive(Policy):
    """The online-adaptive budget around an inner policy (see the module docstring). Same name as the inner
    policy; `describe()` adds the `adaptive` settings, `state()` the live estimates.

    Per step it runs a few dozen small NumPy operations, none per request in Python: the verify-cost features
    of every token count a step may verify are tabled per batch size (the prior does not move; only the fit's
    coefficients do), the acceptance rates are recomputed only when the table changes, and the per-request
    estimates live in arrays keyed by a sorted array of request ids."""

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
        self._fixed_scale, self._fixed_seen = RobustScale(), False
        self.full = self.inner.plan(1)
        f = self.full
        # cumulative draft rows per drafting request by depth (the root's row at depth 1, its beam below)
        self._rows_cum = np.cumsum(([1.0, float(min(f.k, f.k1))] + [float(f.k)] * max(f.depth - 2, 0))[:f.depth])
        # the most drafts one request may verify (the inner policy's cap, else every drafted slot)
        self._cap = self.inner.max_tree_tokens() or 1 + f.k1 + (f.depth - 1) * f.k
        # running means, per request-step of the steps that drafted: expected accepted drafts of the chosen nodes,
        # verified drafts, draft depths and draft rows (per request); None until a step has drafted
        self.drafting: np.ndarray | None = None
        self.drafts = True  # the plan: draft this step (the inner policy's full plan, gated) or decode plainly
        self.probe_interval, self.since_probe, self.probing = c.probe_every, 0, False
        self.since_plain, self.plain_probe = 0, False  # plain steps taken while drafting, to price plain decoding
        self.steps = 0
        self.rate_per_ms = 0.0  # predicted batch tokens per ms of the chosen plan: sets a verified token's price
        self.last: dict = {}
        # per-request estimates, by the keys the backend gives (set_batch): ids sorted, with rows of
        # [observed hits, predicted hits, best depth-1 gain (running mean), step it last drafted] and the order of
        # their last update (the least recently updated are forgotten first past max_requests)
        self._req_keys = np.zeros(0, np.int64)
        self._req_est = np.zeros((0, 4))
        self._req_seq = np.zeros(0, np.int64)
        self._seq = 0
        self._keys: np.ndarray | None = None
        self._has_new = False
        self._planned = False
        self._factor = np.ones(0)
        self._best1 = np.zeros(0)
        self._gain: np.ndarray | None = None  # [B, S] gains of this step's forest, valid up to _gain_depth
        self._gain_depth = 0
        self._features: dict[int, np.ndarray] = {}  # batch size -> verify features by verified drafts
        self._base = np.zeros((0, 1), np.int64)
        self._step_drafted: tuple[int, float] | None = None  # select's _drafted, for observe (the same forest)

    def bind(self, step_time: StepTimeFn | None) -> Policy:
        self.inner.bind(step_time)
        self.step_time = step_time
        self.verify_cost = LinearCost(_verify_prior(step_time), [4.0, 4.0, 4.0], self.config.forget)
        self._features = {}
        return self

    # ---- the backend's side --------------------------------------------------------------------------------

    def _lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row in the per-request arrays, known) of each key."""
        known = self._req_keys
        pos = np.searchsorted(known, keys)
        if len(known) == 0:
            return pos, np.zeros(len(keys), bool)
        return pos, known[np.minimum(pos, len(known) - 1)] == keys

    def set_batch(self, keys) -> None:
        """Stable ids of the requests about to step, in batch row order (per-request estimates follow them)."""
        self._keys = np.asarray(keys, np.int64)
        self._has_new = not self._lookup(self._keys)[1].all()
        self.inner.set_batch(keys)

    def observe_step(self, batch_size: int, verify_tokens: int, verify_ms: float, draft_depths: int = 0,
                     draft_rows: float = 0.0, draft_ms: float = 0.0, other_ms: float | None = None) -> None:
        """A finished step's measured (or priced) times: the verify forward of `verify_tokens` tokens (roots
        included) for `batch_size` requests, the drafting of `draft_depths` depths over `draft_rows` rows in all,
        and the rest of the step (`other_ms`, when the step held nothing else, e.g. no prefill)."""
        drafts = verify_tokens - batch_size
        if drafts >= 0 and drafts == int(drafts):
            x = self._feature_rows(batch_size, int(drafts))[int(drafts)]
        else:
            x = _verify_features(self.step_time, np.array([float(verify_tokens)]), batch_size)[0]
        self.verify_cost.update(x, float(verify_ms))
        if draft_depths > 0:
            self.draft_cost.update(np.array([1.0, draft_depths, draft_rows], np.float64), float(draft_ms))
        if other_ms is not None and other_ms >= 0:
            w = 0.1 if self.steps > 10 else 0.5
            r = float(other_ms) - self.fixed_ms
            if self._fixed_seen:  # the first one sets the level: there is nothing to weigh it against yet
                w *= self._fixed_scale.weigh(r, self.fixed_ms)
            self._fixed_seen = True
            self.fixed_ms += w * r

    # ---- cost predictions ------------------------------------------------------------------------------------

    def _feature_rows(self, batch_size: int, drafts: int) -> np.ndarray:
        """Verify features [n, 3] of batch_size + 0, 1, ... n-1 tokens (n > drafts), tabled per batch size: the
        prior is a fixed function, so a step only multiplies rows of this table by the fitted coefficients."""
        tab = self._features.get(batch_size)
        if tab is None or len(tab) <= drafts:
            n = max(drafts + 1, batch_size * (self._cap - 1) + 1, 2 * len(tab) if tab is not None else 0)
            tab = _verify_features(self.step_time, batch_size + np.arange(n, dtype=np.float64), batch_size)
            self._features[batch_size] = tab
        return tab

    def _verify_ms(self, tokens: np.ndarray, batch_size: int) -> np.ndarray:
        return _verify_features(self.step_time, tokens, batch_size) @ self.verify_cost.theta

    def _token_ms(self, batch_size: int, tokens: float) -> float:
        """The marginal verify cost of a draft token around `tokens` verified drafts (the batch together)."""
        n = max(tokens, 1.0)
        if n == int(n):
            tab = self._feature_rows(batch_size, int(n))
            v = tab[[0, int(n)]] @ self.verify_cost.theta
        else:
            v = self._verify_ms(np.array([batch_size, batch_size + n]), batch_size)
        return float(v[1] - v[0]) / n

    def _draft_ms(self, depths: np.ndarray, rows: np.ndarray) -> np.ndarray:
        e, f, g = self.draft_cost.theta
        depths = np.asarray(depths, np.float64)
        return np.where(depths > 0, e + f * depths + g * np.asarray(rows, np.float64), 0.0)

    def _draft_ms_one(self, depths: float, rows: float) -> float:
        """_draft_ms of one step, in Python floats (the same operations)."""
        e, f, g = self.draft_cost.coef
        return e + f * float(depths) + g * float(rows) if depths > 0 else 0.0

    def _rows_per_request(self) -> np.ndarray:
        """Cumulative draft rows per drafting request by depth (the root's row at depth 1, its beam below)."""
        return self._rows_cum

    def _plan_goodput(self, batch_size: int) -> tuple[float, float]:
        """Predicted batch tokens per ms of (plain decoding, drafting as the last drafting steps did)."""
        B = float(batch_size)
        tab = self._feature_rows(batch_size, 0)
        theta = self.verify_cost.theta
        plain = B / max(self.fixed_ms + float((tab[:1] @ theta)[0]), _EPS)
        if self.drafting is None:
            return plain, np.inf
        gain, tokens, depths, rows = self.drafting.tolist()
        t = B * (1.0 + tokens)
        if t == int(t) and t >= B:  # whole tokens: a row of the table
            j = int(t) - batch_size
            x = self._feature_rows(batch_size, j)[j:j + 1]
        elif self.step_time is None:
            x = _verify_features(None, np.array([t]), batch_size)
        else:  # the plain step's price from the table, what the drafts add from the prior
            p = tab[0, 0]
            full = float(np.asarray(self.step_time(np.array([t]), batch_size), np.float64)[0])
            x = np.array([[p, max(full - p, 0.0), 1.0]])
        ms = self.fixed_ms + self._draft_ms_one(depths, rows * B) + float((x @ theta)[0])
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
            return _PLAIN
        # a request never seen drafting gets its chance: its own estimates start there
        return full if self.drafts or self.probing or self._has_new else _PLAIN

    def _factors(self, batch_size: int) -> np.ndarray:
        keys = self._keys
        if keys is None or len(keys) != batch_size:
            return np.ones(batch_size)
        n0 = self.config.request_trials
        pos, known = self._lookup(keys)
        st = self._req_est[np.where(known, pos, 0)] if len(self._req_est) else np.zeros((batch_size, 4))
        st = np.where(known[:, None], st, _NEW_REQUEST)
        # a request left out of drafting gets a new chance a few steps later (its text may have become easier)
        self._best1 = np.where(self.steps - st[:, 3] < RETRY_STEPS, st[:, 2], np.nan)
        return (st[:, 0] + n0) / (st[:, 1] + n0)

    def start(self, batch_size: int) -> np.ndarray:
        self._factor = self._factors(batch_size)
        self._gain_depth = 0
        # the expected accepted tokens a verified draft must bring: its time (the mean over all the drafts the
        # inner policy may verify, a lenient price under a convex step cost) at the step's predicted rate
        self._price = self.rate_per_ms * self._token_ms(batch_size, float(batch_size * (self._cap - 1)))
        self._planned = True  # this step's plan drafts (observe reads it: a plan that drafted nobody counts)
        want = self.inner.start(batch_size)
        if not self.probing and self.steps > 0 and len(self._best1) == batch_size:
            want = want & ~(self._best1 < self._price)  # NaN (new request): draft
        return want

    def _gains_upto(self, forest: DraftForest, depth: int) -> np.ndarray:
        """Calibrated gains [B, S] (P(path accepted)) filled depth by depth up to `depth`; 0 where undrafted."""
        B, S = forest.token.shape
        if self._gain is None or self._gain.shape != (B, S):
            self._gain, self._gain_depth = np.zeros((B, S)), 0
        g = self._gain
        top = min(depth, forest.max_depth)
        if self._gain_depth >= top:
            return g
        rates = self.table.rates()
        f = self._factor[:, None] if len(self._factor) == B else None
        off = forest.depth_offsets.tolist()
        flat = g.ravel()
        for d in range(self._gain_depth + 1, top + 1):
            lo, hi = off[d - 1], off[d]
            cond = rates[min(d, MAX_DEPTH) - 1][AcceptanceTable.bins(forest.logp[:, lo:hi])]
            if f is not None:
                cond = np.minimum(cond * f, 1.0 - _EPS)
            if d > 1:  # times the parent's gain (a drafted node's parent is drafted, one depth up; an undrafted
                # slot's parent -1 reads some other slot, and the slot is zeroed below)
                cond *= flat[self._row_base(B, S) + forest.parent[:, lo:hi]]
            np.multiply(cond, forest.valid[:, lo:hi], out=g[:, lo:hi])  # 0 where undrafted
        self._gain_depth = top
        return g

    def _row_base(self, B: int, S: int) -> np.ndarray:
        """[B, 1]: each row's first flat index in a [B, S] array."""
        base = self._base
        if base.shape[0] != B or base[1:2, 0].tolist() not in ([], [S]):
            base = self._base = np.arange(B, dtype=np.int64)[:, None] * S
        return base

    def gate(self, depth, rows, beam_scores, forest):
        keep = np.asarray(self.inner.gate(depth, rows, beam_scores, forest), dtype=bool)
        if self.probing or depth >= forest.max_depth:
            return keep
        g = self._gains_upto(forest, depth)
        B, S = g.shape
        every = len(rows) == B  # rows are sorted and distinct: all of them, so slices (views) will do
        beam = forest.beam_slot[:, depth - 1] if every else forest.beam_slot[rows, depth - 1]  # [n, k]; -1: none
        base = self._row_base(B, S) if every else rows[:, None] * S
        bg = g.ravel()[base + beam]
        if depth == 1 and forest.k1 < forest.k:  # a beam shorter than k (-1 slots): no gain there
            bg = np.where(beam >= 0, bg, 0.0)
        top_next = float(self.table.best()[min(depth, MAX_DEPTH - 1)])
        if len(self._factor) == B:
            f = self._factor if every else self._factor[rows]
            child = bg * np.minimum(top_next * f, 1.0)[:, None]  # best possible child gains
        else:
            child = bg * min(top_next, 1.0)
        row_worth = np.maximum(child - self._price, 0.0).sum(axis=1)
        keep &= row_worth > 0
        # the next depth's draft forward must pay for itself too
        rows_next = float(np.count_nonzero(keep)) * forest.k
        cost = self._draft_ms_one(1.0, rows_next) - self.draft_cost.coef[0]
        if keep.any() and row_worth[keep].sum() < self.rate_per_ms * cost:
            keep[:] = False
        return keep

    def select(self, forest: DraftForest) -> np.ndarray:
        self._step_drafted = None
        base = self.inner.select(forest)
        B = len(forest.root_token)
        if len(base) == 0 or B == 0:
            self._remember(base, np.zeros(0))
            return base
        g = self._gains_upto(forest, forest.max_depth).ravel()[base]
        order = np.argsort(-g, kind="stable")
        drafted, rows = self._step_drafted = self._drafted(forest)
        sunk = self._draft_ms_one(drafted, rows)
        gain = np.zeros(len(base) + 1)
        np.cumsum(g[order], out=gain[1:])
        ms = self.fixed_ms + sunk + self._feature_rows(B, len(base))[:len(base) + 1] @ self.verify_cost.theta
        goodput = (B + gain) / np.maximum(ms, _EPS)
        k = int(np.argmax(goodput))
        chosen = np.sort(base[order[:k]])
        self.last = dict(batch=B, candidates=int(len(base)), verified_drafts=k, expected_accepted=round(float(
            gain[k]), 3), draft_depth=drafted, predicted_ms=round(float(ms[k]), 3))
        self._remember(chosen, g[order[:k]])
        return chosen

    def _drafted(self, forest: DraftForest) -> tuple[int, float]:
        """(deepest drafted depth, draft rows in all) of a forest. The rows are whole numbers, so summing them
        per depth count is exact."""
        stop = forest.stop_depth
        if stop is None or forest.num_slots == 0:
            return 0, 0.0
        counts = np.bincount(stop, minlength=len(self._rows_cum) + 1).tolist()
        drafted = max((d for d, n in enumerate(counts) if n), default=0)
        return drafted, float(sum(n * r for n, r in zip(counts[1:], self._rows_cum.tolist(), strict=False)))

    def _remember(self, chosen, gains) -> None:
        self._chosen, self._chosen_gain = chosen, gains

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
            req, slot = np.divmod(sel, S)
            par = forest.parent.ravel()[sel]
            tried = (par < 0) | acc[np.where(par >= 0, req * S + par, B * S)]
            t_sel, t_req = sel[tried], req[tried]
            d, b = self.table.cell(forest.slot_depth[slot[tried]], forest.logp.ravel()[t_sel])
            hit = acc[t_sel]
            self.table.update_cells(d, b, hit)
            # the request's factor: its hits against the model's predictions on the same trials
            pred = np.bincount(t_req, weights=self.table.rates()[d, b], minlength=B)
            obs = np.bincount(t_req, weights=hit.astype(np.float64), minlength=B)
            g = self._gain if self._gain_depth > 0 and self._gain is not None and self._gain.shape == (B, S) \
                else None
            lo, hi = int(forest.depth_offsets[0]), int(forest.depth_offsets[1])
            best1 = g[:, lo:hi].max(axis=1) if g is not None else np.full(B, np.nan)
            self._update_requests(obs, pred, best1, forest.stop_depth)
        elif len(selection) == 0:
            self.table.update_cells(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool))
        self._update_plan(forest, B, S)

    def _update_requests(self, obs, pred, best1, stop) -> None:
        """Each drafting request's estimates: its hits and the model's predictions (forgotten a step's worth, plus
        this step's) and its best depth-1 gain (averaged with the last one)."""
        keys = self._keys
        if keys is None or len(keys) != len(obs):
            return
        if stop is not None:
            m = np.asarray(stop) != 0
            if not m.all():
                keys, obs, pred, best1 = keys[m], obs[m], pred[m], best1[m]
        if len(keys) == 0:
            return
        fg = self.config.forget
        pos, known = self._lookup(keys)
        seq = self._seq + np.arange(len(keys))
        self._seq += len(keys)
        every = bool(known.all())  # the common case: no request new to the estimates, no masks
        if every or known.any():
            k = slice(None) if every else known
            p, est = pos[k], self._req_est
            old = est[p]
            b1 = np.where(np.isfinite(old[:, 2]), 0.5 * (old[:, 2] + best1[k]), best1[k])
            old[:, 0] *= fg
            old[:, 0] += obs[k]
            old[:, 1] *= fg
            old[:, 1] += pred[k]
            old[:, 2] = b1
            old[:, 3] = self.steps
            est[p] = old
            self._req_seq[p] = seq[k]
        if not every:
            new = ~known
            rows = np.column_stack([0.0 + obs[new], 0.0 + pred[new], best1[new], np.full(int(new.sum()),
                                                                                      float(self.steps))])
            order = np.argsort(keys[new], kind="stable")
            at = pos[new][order]
            self._req_keys = np.insert(self._req_keys, at, keys[new][order])
            self._req_est = np.insert(self._req_est, at, rows[order], axis=0)
            self._req_seq = np.insert(self._req_seq, at, seq[new][order])
        extra = len(self._req_keys) - self.config.max_requests
        if extra > 0:  # forget the least recently updated
            keep = np.sort(np.argsort(self._req_seq, kind="stable")[extra:])
            self._req_keys, self._req_est, self._req_seq = \
                self._req_keys[keep], self._req_est[keep], self._req_seq[keep]

    def _update_plan(self, forest: DraftForest, B: int, S: int) -> None:
        depth, rows = (self._step_drafted or self._drafted(forest)) if S else (0, 0.0)
        self._step_drafted = None
        if depth > 0 and B:
            gains = getattr(self, "_chosen_gain", np.zeros(0))
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

    def describe(self) -> dict:
        from echosim.spec.policies.base import config_to_json

        return {**self.inner.describe(), "adaptive": config_to_json(self.config)}

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
            "requests_tracked": len(self._req_keys),
            "last_step": self.last,
        }

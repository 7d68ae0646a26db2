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

    def update(self, x: np.ndarray, y: float) -> None:
        x = np.asarray(x, np.float64)
        self.xx = self.forget * self.xx + np.outer(x, x)
        self.xy = self.forget * self.xy + x * y
        self.samples += 1
        try:
            theta = np.linalg.solve(self.xx + self.prior, self.xy + self.prior @ self.theta0)
        except np.linalg.LinAlgError:
            return
        self.theta = np.maximum(theta, 0.0)


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
            "requests_tracked": len(self._req),
            "last_step": self.last,
        }

"""Speculation inside a decode iteration: the scheduler core (echosim/spec) run with the acceptance model's
synthetic drafter, reduced to what the replica needs per request (tokens verified, drafts accepted) and per depth
(rows the draft model runs).

Two ways to get those numbers, selected by `core`:
- exact: every iteration drafts, gates, selects, packs and verifies the live batch (draft -> select -> pack ->
  target_argmax -> verify_greedy -> observe). Needed when a policy couples the requests of a batch otherwise than
  below (a fixed budget, TETRIS's batch-wide top-C, SmartSpec's batch-size plan and its running acceptance
  estimate), and for per-node records.
- table: for policies that treat each request on its own (AR, EAGLE-2/3, DDD, OPT-Tree, ECHO with a per-request
  budget that never binds), a request's outcome in a step depends only on its own difficulty and dataset, and
  steps are independent draws. So the same core runs once, up front, on a stratified sample of difficulties per
  dataset (`bins` strata x `rows` rows), and each request-step then draws one row of its stratum. The outcome
  distribution is the core's own; the per-iteration cost drops from ~60 us per request to a table lookup.
- table for ECHO with a goodput budget: the budget couples the batch, but only through how long a prefix of each
  request's own score order it verifies (floor, then Priority 1, then Priority 2, each request's nodes in score
  order). So the tables keep, per row, that order's node probabilities and the ranks of the nodes the target
  accepts; each iteration merges the drawn rows' orders, lets the budget choose the prefix (the same
  `Budget.choose` on the same gains), and reads off each request's verified and accepted counts.
- auto: table when the policy allows it and no records are asked for, else exact.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from echosim.sim.errors import SimError
from echosim.sim.kernels import prefix_steps_kernel
from echosim.spec.drafting import depth_widths, draft, draft_rows
from echosim.spec.pack import pack
from echosim.spec.policies import Policy
from echosim.spec.records import step_records, write_records
from echosim.spec.verify import verify_greedy

_NEVER = np.iinfo(np.int64).max
CORE_CHUNK_ROWS = 2048  # rows per core call while building tables (bounds the forest's memory)

# Built tables, kept across runs in one process (the dashboard, sweeps, --compare-policies rebuild the same ones).
# A table is a pure function of its key (below) and of the synthetic drafter's RNG state when the build starts;
# that state is a function of the key's seed and of which tables this speculator built before, so the key carries
# that history, and an entry keeps the RNG state the build left for the next one. Tabled policies keep no state
# across core steps (their observe/set_batch are no-ops), so the policy needs no restoring.
TABLE_CACHE_SIZE = 16  # entries (one per dataset table); ~1.6 MB each at the default 32 x 256 rows
_TABLE_CACHE: OrderedDict[tuple, _CachedTable] = OrderedDict()


@dataclass(frozen=True)
class _CachedTable:
    edges: np.ndarray
    rows: np.ndarray
    probs: np.ndarray | None
    acc_rank: np.ndarray | None
    confident: np.ndarray | None
    drafter_state: dict   # the drafter's bit generator state after the build
    core_steps: int       # core calls the build made


def clear_table_cache() -> None:
    _TABLE_CACHE.clear()


def _table_key(spec: Speculator, dataset: int) -> tuple:
    a, policy = spec.acceptance, spec.policy
    accept = repr((type(a).__qualname__, a.model, a.draft_params, a.accept_params, list(a.skills.items()),
                   a.vocab_size))
    # and the arrays the drafter reads, derived from those at construction (in case a caller edits them)
    arrays = tuple((k, v.dtype.str, v.shape, v.tobytes()) for k, v in sorted(vars(a).items())
                   if isinstance(v, np.ndarray))
    return (accept, arrays, type(policy).__qualname__, policy.name, repr(policy.config), spec.seed, spec.bins,
            spec.rows_per_bin, CORE_CHUNK_ROWS, tuple(spec._dataset_slot), dataset)


def adaptive(policy: Policy) -> bool:
    """The online-adaptive budget (echosim/spec/adaptive.py) learns across steps and couples the batch: exact only."""
    return getattr(policy, "inner", None) is not None


def prefix_tabled(policy: Policy) -> bool:
    """ECHO (and its ablations) with a goodput budget: tabled as per-request priority orders (module docstring)."""
    return not adaptive(policy) and policy.name in ("echo", "echo_dense", "echo_fixed") \
        and policy.config.budget.kind == "goodput"


def row_independent(policy: Policy) -> bool:
    """True when a request's outcome in a step does not depend on the other requests of the batch, nor on
    earlier steps: then outcomes can be tabled per difficulty stratum (see the module docstring)."""
    name = policy.name
    if adaptive(policy):
        return False
    if name in ("ar", "eagle3", "eagle2", "ddd", "opt_tree"):
        return True
    if name in ("echo", "echo_dense", "echo_fixed"):
        c = policy.config
        cap = max(c.num_draft_tokens, c.remaining_num_draft_tokens) - 1
        return c.budget.kind == "per_request" and c.budget.tokens >= cap
    return False


# Columns of a request-step outcome row. One [B, 6] array per iteration lets the replica update its per-request
# counters (tokens verified, drafts accepted, steps) with one vector operation, and sum them with one reduction.
TOKENS, ACCEPTED, ONE, EMIT, TOKENS_SQ, STOP = range(6)
# tabled rows whose draft depth varies carry, after these, one column per depth d: 1 if the request drafted depth
# d (for decode runs: the batch's draft rows per depth are then column sums, as speculation.draft_rows counts them)
DRAFTED = 6


def outcome_rows(tokens: np.ndarray, accepted: np.ndarray, stop_depth: np.ndarray) -> np.ndarray:
    """[n, 6] int64: verified tokens (root included), drafts accepted, 1, accepted + 1 (tokens emitted before
    the output-length cap), tokens squared (attention pairs), deepest drafted depth."""
    tokens = np.asarray(tokens, np.int64)
    accepted = np.asarray(accepted, np.int64)
    return np.column_stack([tokens, accepted, np.ones_like(tokens), accepted + 1, tokens * tokens,
                            np.asarray(stop_depth, np.int64)])


@dataclass
class StepOutcome:
    rows: np.ndarray        # int64 [B, 6]: one outcome row per request (columns above)
    draft_rows: tuple       # per draft depth: rows the draft model runs, the batch together

    @property
    def tokens(self) -> np.ndarray:
        """Verified tokens per request, the root included (1 = plain decoding)."""
        return self.rows[:, TOKENS]

    @property
    def accepted(self) -> np.ndarray:
        """Drafts accepted per request (the bonus token not counted)."""
        return self.rows[:, ACCEPTED]


class Speculator:
    """Per-request latent assignment (at arrival) and per-iteration outcomes (at each decode step)."""

    def __init__(self, policy: Policy, acceptance, *, seed: int, core: str = "auto", records_path=None,
                 bins: int = 32, rows_per_bin: int = 256):
        self.policy, self.acceptance = policy, acceptance
        self.prefix = prefix_tabled(policy)
        independent = row_independent(policy) or self.prefix
        if core == "auto":
            core = "table" if independent and records_path is None else "exact"
        if core == "table" and not independent:
            raise SimError(f"policy {policy.name!r} with this config couples the requests of a batch; it needs "
                            "--core exact", field="core")
        if core == "table" and records_path is not None:
            raise SimError("per-node records need --core exact", field="core")
        self.core = core
        self.seed = seed
        self.rng_latent = np.random.default_rng([seed, 1])
        self.rng_table = np.random.default_rng([seed, 2])
        self.drafter = acceptance.drafter(seed)
        plan = policy.max_plan(1)
        self.depth, self.k1, self.k = plan.depth, plan.k1, plan.k
        self.plain = plan.depth == 0 and policy.name == "ar"
        self.records_path = records_path
        # whether the policy learns from priced step times (adaptive budgets); else the replica skips the call
        self.observes_time = type(policy).observe_step is not Policy.observe_step
        self.step_index = 0
        self.mean_ctx = 512.0  # mean context of the batch being scheduled (for step-time callables)
        if records_path is not None:
            try:
                open(records_path, "w").close()
            except OSError as exc:
                raise SimError(f"cannot write the records ({exc.strerror or exc})", path=str(records_path)) from None
        # tables: stratum g = dataset slot * bins + bin
        self.bins, self.rows_per_bin = bins, rows_per_bin
        self._dataset_slot: dict[int, int] = {}
        self._edges: list[np.ndarray] = []
        self._rows = np.zeros((0, 6), np.int64)  # outcome rows; row stratum * rows_per_bin + r (+ DRAFTED)
        self._base_rows = self._rows                # the same, without the DRAFTED columns
        self._stop_const = False  # every tabled row drafts to full depth (no gating): rows per depth are fixed
        self.tokens_const = 0     # every tabled row verifies this many tokens (a fixed tree; 0 = they differ)
        self.max_request_tokens = 1   # the most tokens a request verifies in a step (root included)
        self.width = depth_widths(self.depth, self.k1, self.k)
        self.width_array = np.array(self.width, np.float64).reshape(self.depth)
        self._draws = np.zeros(0, np.int64)  # row draws, made 65,536 at a time
        self._plain = np.zeros((0, 6), np.int64)  # AR: every request verifies its root, accepts nothing
        self._draw_pos = 0
        self.table_build_s = 0.0
        if self.prefix:  # per tabled row: its priority order's probabilities, accepted ranks, Priority 1 or not
            c = policy.config
            self._cap = max(c.num_draft_tokens, c.remaining_num_draft_tokens) - 1
            self._probs = np.zeros((0, self._cap), np.float32)
            self._acc_rank = np.zeros((0, max(self.depth, 1)), np.int16)
            self._confident = np.zeros(0, bool)
        self._prefix_runs = False   # goodput ECHO in decode runs (`_prefix_keys` decides)

    @property
    def compiled(self) -> bool:
        """Whether goodput ECHO's steps go through the compiled merge (echosim/sim/kernels.py)."""
        return self._prefix_runs and prefix_steps_kernel() is not None

    # --- per request ----------------------------------------------------------------------------------------

    def assign(self, datasets: list | None, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Latents of n arriving requests: (difficulty, dataset index, offset of its stratum in the tables)."""
        names = datasets if datasets is not None else [None] * n
        ds = np.asarray(self.acceptance.dataset_index(names), dtype=np.int64).reshape(n)
        diff = np.asarray(self.acceptance.sample_difficulty(n, ds, self.rng_latent), dtype=np.float64)
        offset = np.zeros(n, np.int64)
        if self.core != "table" or self.plain:
            return diff, ds, offset
        for d in np.unique(ds).tolist():
            slot = self._dataset_slot.get(d)
            if slot is None:
                slot = self._build_table(d)
            m = ds == d
            stratum = slot * self.bins + np.searchsorted(self._edges[slot], diff[m])
            offset[m] = stratum * self.rows_per_bin
        return diff, ds, offset

    # --- per iteration --------------------------------------------------------------------------------------

    def step(self, difficulty: np.ndarray, dataset: np.ndarray, offset: np.ndarray, kv_len: np.ndarray,
             request_ids: np.ndarray) -> StepOutcome:
        """Outcomes of one decode iteration for the B requests given by their columns."""
        B = len(difficulty)
        if self.plain:
            if len(self._plain) < B:
                self._plain = outcome_rows(np.ones(2 * B), np.zeros(2 * B), np.zeros(2 * B))
            return StepOutcome(self._plain[:B], ())
        if self.core == "table":
            pos = self._draw_pos
            if pos + B > len(self._draws):
                self._draws = self.rng_table.integers(0, self.rows_per_bin, size=max(1 << 16, B))
                pos = 0
            self._draw_pos = pos + B
            drawn = offset + self._draws[pos:pos + B]
            rows = self._rows.take(drawn, axis=0)
            if self.prefix:
                kv_sum = int(kv_len.sum())
                self.mean_ctx = kv_sum / B   # = kv_len.mean() exactly (an integer sum), without its overhead
                # the compiled merge where it decides as _choose_prefix does (not at a tie on the cut)
                one = self._peek_prefix(drawn.reshape(1, B), kv_sum, None) if self.compiled else None
                rows = one[0] if one is not None else self._choose_prefix(rows, drawn)
            if self._stop_const:
                return StepOutcome(rows, tuple(B * w for w in self.width))
        else:
            self.mean_ctx = float(kv_len.mean())
            rows = outcome_rows(*self._run_core(difficulty, dataset, kv_len, request_ids))
        return StepOutcome(rows, self.draft_rows(rows[:, STOP]))

    # --- several decode steps of the same batch (the replica's decode run, echosim/sim/replica.py) ----------------

    def peek_steps(self, offset: np.ndarray, k_max: int, kv_sum: int = 0, left: np.ndarray | None = None
                   ) -> np.ndarray | None:
        """Outcome rows [k, B, 6] of up to k_max consecutive decode steps of the same B requests, exactly as k calls
        of `step` would draw them, without consuming the draws (`commit_steps` does). k stops where `step` would
        draw a fresh block of row indices (the next `step` makes it). Goodput ECHO's rows are its budget's choices
        (`_peek_prefix`: from the batch's KV sum `kv_sum` at the first step; it stops after the first step where a
        request has emitted all it had `left`, or before a tie on a step's cut). None for the exact core, and for
        goodput ECHO where its merge cannot decide as `_choose_prefix` does (`_prefix_keys`)."""
        B = len(offset)
        if self.plain:
            if len(self._plain) < B:
                self._plain = outcome_rows(np.ones(2 * B), np.zeros(2 * B), np.zeros(2 * B))
            return np.broadcast_to(self._plain[:B], (k_max, B, 6))
        if self.core != "table" or (self.prefix and not self._prefix_runs):
            return None
        k = min(k_max, (len(self._draws) - self._draw_pos) // B)
        if k <= 0:
            return None
        pos = self._draw_pos
        drawn = self._draws[pos:pos + k * B].reshape(k, B) + offset
        if self.prefix:
            return self._peek_prefix(drawn, kv_sum, left)
        return self._rows.take(drawn, axis=0)

    def _peek_prefix(self, drawn: np.ndarray, kv_sum: int, left: np.ndarray | None) -> np.ndarray | None:
        """Goodput ECHO's outcome rows [k, B, 6] for k steps of the same batch (drawn table rows [k, B]), the
        choices `_choose_prefix` makes step by step: the compiled kernel (echosim/sim/kernels.py), else its NumPy
        twin `_peek_prefix_numpy`. The kernel stops after the first step where a request's tokens `left` run out
        (a decode run ends there; the twin prepares all k). None when no step can be decided here (a tie at the
        first step's cut)."""
        kernel = prefix_steps_kernel()
        if kernel is None:
            return self._peek_prefix_numpy(drawn, kv_sum)
        k, B = drawn.shape
        rows = self._rows.take(drawn, axis=0)
        # (contiguous: a replica's columns may be strided views, a second compiled signature)
        left = np.full(B, _NEVER) if left is None else np.ascontiguousarray(left)   # None: nobody finishes
        emitted = np.zeros(B, np.int64)
        bucket_tokens = self.policy.step_time.ctx_bucket
        i, kv, status = 0, kv_sum, 1
        while status == 1:   # one call per context bucket the run's steps reach
            curve = self._curve(B, int(kv / B) // bucket_tokens)
            i, kv, status = kernel(self._neg_merge, self._gain, self._acc_flag, self._n_pos, self._n_floor, drawn,
                                   i, kv, bucket_tokens, curve, left, emitted, rows)
        return rows[:i] if i else None

    def _peek_prefix_numpy(self, drawn: np.ndarray, kv_sum: int) -> np.ndarray | None:
        """Goodput ECHO's outcome rows for k steps of the same batch (drawn table rows [k, B]), the choices
        `_choose_prefix` makes step by step, with the merges and the budget's goodput curves computed for all the
        steps at once. The merge is one stable sort per step of each row's merge key (its floor first, then
        Priority 1 and 2 by probability); the prefix sums of the sorted gains, accepted nodes and squared tree
        sizes give every candidate cut's numbers. A step's cut depends on the batch's context bucket, which its
        predecessors' accepted tokens move: a scan over the steps takes each step's argmax at its own bucket (a
        bucket's curve evaluated for the remaining steps when the scan first reaches it). The scan stops before a
        step whose cut falls inside a group of equal keys: there the general loop's merge (argpartition) decides
        which of the tied nodes it takes, so that step goes through `step`. None when no step is left."""
        k, B = drawn.shape
        C = self._cap
        n = B * C
        neg = self._neg_merge.take(drawn, axis=0).reshape(k, n)
        order = np.argsort(neg, axis=1, kind="stable")   # [k, n]: floor, then by key; ties by request, then rank
        neg = np.take_along_axis(neg, order, axis=1)
        # prefix sums over the order, a leading 0 for the empty cut: gains, accepted nodes, sum of (2 rank + 1)
        gain = np.zeros((k, n + 1))
        np.cumsum(np.take_along_axis(self._gain.take(drawn, axis=0).reshape(k, n), order, axis=1), axis=1,
                  out=gain[:, 1:])
        acc = np.zeros((k, n + 1), np.int64)
        np.cumsum(np.take_along_axis(self._acc_flag.take(drawn, axis=0).reshape(k, n), order, axis=1), axis=1,
                  out=acc[:, 1:])
        accepted = B + gain     # Budget.choose's expected accepted tokens per cut
        bound = self._n_pos.take(drawn).sum(axis=1)       # nodes offered: floor + the rest (budget >= cap)
        floors = self._n_floor.take(drawn).sum(axis=1).tolist()
        beyond = np.arange(n + 1)[None, :] > bound[:, None]
        bound = bound.tolist()
        bucket_tokens = self.policy.step_time.ctx_bucket
        cuts: list[int] = []
        kv, bucket, best = kv_sum, -1, None
        for i in range(k):
            b = int(kv / B) // bucket_tokens   # as `step` and `_step_time_cached` compute the context bucket
            if b != bucket:
                bucket = b
                goodput = accepted[i:] / self._curve(B, b)[:n + 1]
                goodput[beyond[i:]] = -np.inf
                best = np.argmax(goodput, axis=1).tolist()
            cut = max(best[i - (k - len(best))], floors[i])
            if floors[i] < cut < bound[i] and neg[i, cut - 1] == neg[i, cut]:
                break   # a tie at the cut: the general loop's merge decides it
            cuts.append(cut)
            kv += int(acc[i, cut]) + B
        if not cuts:
            return None
        k = len(cuts)
        cut = np.array(cuts)[:, None]
        # per request: nodes verified (m) and accepted among the first `cut` entries of its step's order
        inv = np.empty_like(order[:k])
        np.put_along_axis(inv, order[:k], np.arange(n)[None, :], axis=1)
        chosen = (inv < cut).reshape(k, B, C)
        m = chosen.sum(axis=2)
        accepted_n = (chosen & self._acc_flag.take(drawn[:k], axis=0).astype(bool)).sum(axis=2)
        rows = self._rows.take(drawn[:k], axis=0)
        rows[:, :, TOKENS] = m + 1
        rows[:, :, ACCEPTED] = accepted_n
        rows[:, :, EMIT] = accepted_n + 1
        rows[:, :, TOKENS_SQ] = (m + 1) * (m + 1)
        return rows

    def commit_steps(self, k: int, batch: int) -> None:
        """The first k steps of the last `peek_steps` happened: their draws are used."""
        if not self.plain:
            self._draw_pos += k * batch

    def observe_time(self, batch_size: int, verify_tokens: int, verify_ms: float, draft_ms: float,
                     other_ms: float, draft_rows: tuple) -> None:
        """The priced times of a decode-only iteration (StepPricer.observed_ms: split as the engine times its
        own), for policies that fit their step cost online (the engine feeds its measured ones the same way)."""
        self.policy.observe_step(batch_size, verify_tokens, verify_ms, draft_depths=len(draft_rows),
                                 draft_rows=float(sum(draft_rows)), draft_ms=draft_ms, other_ms=other_ms)

    def draft_rows(self, stop_depth: np.ndarray) -> tuple:
        return draft_rows(stop_depth, self.width)

    # --- the core -------------------------------------------------------------------------------------

    def _run_core(self, difficulty, dataset, kv_len, request_ids, policy=None, prefix_out=None):
        B = len(difficulty)
        policy = policy or self.policy
        self.drafter.set_batch(difficulty, dataset)
        policy.set_batch(request_ids)
        forest = draft(self.drafter, policy, np.zeros(B, np.int64), kv_len)
        selection = policy.select(forest)
        batch = pack(forest, selection, check=False)
        result = verify_greedy(batch, self.drafter.target_argmax(batch))
        policy.observe(forest, selection, result.accept_len, batch.node[result.accepted_nodes()])
        if prefix_out is not None:
            prefix_out.append(self._prefix_rows(forest, selection, batch, result))
        if self.records_path is not None:
            rec = step_records(forest, batch, result, self.step_index, request_ids)
            write_records(self.records_path, rec, append=True)
        self.step_index += 1
        stop = forest.stop_depth if forest.stop_depth is not None else np.zeros(B, np.int32)
        return batch.tree_sizes.astype(np.int64), result.accept_len.astype(np.int64), stop.astype(np.int64)

    def _prefix_rows(self, forest, selection, batch, result) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per request of a full-cap step: its verified nodes' probabilities in score order [B, C] (0 = none), the
        ranks in that order of the nodes the target accepted [B, D] (C = none), and whether it is in Priority 1."""
        B, S = forest.token.shape
        C, D = self._cap, max(self.depth, 1)
        req = selection // S
        score = forest.score.ravel()[selection]
        order = np.lexsort((-score, req))  # by request, then best first
        req, sel, score = req[order], selection[order], score[order]
        starts = np.searchsorted(req, np.arange(B))
        rank = np.arange(len(req)) - starts[req]
        probs = np.zeros((B, C), np.float32)
        probs[req, rank] = np.exp(score)
        # the accepted nodes: the target's path among the verified ones, depth by depth from the root
        acc_rank = np.full((B, D), C, np.int16)
        depth = forest.slot_depth[sel % S]
        accepted_node = np.isin(sel, batch.node[result.accepted_nodes()])
        acc_rank[req[accepted_node], depth[accepted_node] - 1] = rank[accepted_node]
        stop = forest.stop_depth if forest.stop_depth is not None else np.zeros(B, np.int32)
        gated = forest.gated if forest.gated is not None else stop < forest.max_depth
        confident = (stop > 0) & ~gated
        return probs, acc_rank, confident

    def _choose_prefix(self, rows: np.ndarray, drawn: np.ndarray) -> np.ndarray:
        """ECHO's goodput budget over the drawn rows' priority orders: floor first, then Priority 1 and Priority 2
        by probability, the budget choosing how many to verify; returns the outcome rows for that choice (`rows`,
        updated in place). What depends on a row alone (its floor, its merge keys) is computed once per table
        row (`_prefix_keys`); per step only the merge across the batch and the budget's choice remain."""
        B, C = len(drawn), self._cap
        budget = self.policy.config.budget
        counts = self._counts.take(drawn, axis=0)   # [B, 2]: floor, nodes offered beyond it
        n_floor, offered = counts.sum(axis=0).tolist()
        floor = counts[:, 0]
        key = self._key.take(drawn, axis=0).ravel()   # Priority 1 above 2, by probability; -1 = floor or no node
        n_rest = min(offered, max(budget.upper_bound(B) - n_floor, 0))
        if 0 < n_rest < key.size:
            neg = -key
            top = np.argpartition(neg, n_rest - 1)[:n_rest]
            top = top[np.argsort(neg[top], kind="stable")]
        else:
            top = np.flatnonzero(key > 0)
            top = top[np.argsort(-key[top], kind="stable")][:n_rest]
        gain = self._gain.take(drawn, axis=0)
        floor_gains = gain[self._cols < floor[:, None]] if n_floor else gain[:0, 0]
        gains = np.concatenate([floor_gains, gain.ravel()[top]])
        k = max(budget.choose(B, gains, self._step_time_cached(B)), n_floor)
        m = floor + np.bincount(top[:k - n_floor] // C, minlength=B)
        accepted = (self._acc_rank.take(drawn, axis=0) < m[:, None]).sum(axis=1)
        rows[:, TOKENS] = m + 1
        rows[:, ACCEPTED] = accepted
        rows[:, EMIT] = accepted + 1
        rows[:, TOKENS_SQ] = (m + 1) * (m + 1)
        return rows

    def _curve(self, batch: int, bucket: int) -> np.ndarray:
        """The budget's step-time curve (ms for batch + 0..upper bound verified tokens) at a context bucket, from
        the same cache `_step_time_cached` fills (and filling it the same way)."""
        curve = self._step_ms.get((batch, bucket))
        if curve is None:
            mean_ctx = self.mean_ctx
            self.mean_ctx = float(bucket * self.policy.step_time.ctx_bucket)   # a context inside that bucket
            longest = self.policy.config.budget.upper_bound(batch) + 1
            self._step_time_cached(batch)(np.arange(longest), batch)
            curve = self._step_ms[(batch, bucket)]
            self.mean_ctx = mean_ctx
        return curve

    def _step_time_cached(self, batch: int):
        """The policy's step-time callable, its answers kept per (batch, context bucket, candidates) when the
        simulator's pricer computes it (a pure function of those, `budget_step_time`); else the callable."""
        step_time = self.policy.step_time
        bucket = getattr(step_time, "ctx_bucket", None)
        if bucket is None:
            return step_time
        ctx = int(self.mean_ctx) // bucket
        cache = self._step_ms
        longest = self.policy.config.budget.upper_bound(batch) + 1

        def cached(tokens, batch_size):
            # Budget.choose asks for batch + 0..n-1 with n <= longest: one curve per (batch, bucket), sliced (the
            # cost model prices each candidate on its own, so a prefix of the longest curve is the shorter one)
            key = (batch_size, ctx)
            curve = cache.get(key)
            if curve is None:
                if len(cache) > 16384:
                    cache.clear()
                curve = cache[key] = step_time(batch_size + np.arange(longest), batch_size)
            return curve[:len(tokens)]

        return cached if batch else step_time

    def _prefix_keys(self) -> None:
        """Per tabled row, what the goodput merge needs from it alone: its floor (nodes verified before any
        priority), its merge key per node (probability, + 2 in Priority 1; -1 for the floor and empty slots), how
        many nodes it offers beyond the floor, and its nodes' gains as float64."""
        c = self.policy.config
        C = self._cap
        probs, confident = self._probs, self._confident
        floor = np.minimum(self._rows[:, STOP] > 0, 1) * min(c.floor_tokens, C)
        floor = np.minimum(floor, (probs > 0).sum(axis=1))
        self._cols = np.arange(C)
        rest = (self._cols[None, :] >= floor[:, None]) & (probs > 0)
        self._counts = np.column_stack([floor, rest.sum(axis=1)]).astype(np.int64)
        self._key = np.where(rest, probs + 2.0 * confident[:, None], -1.0)
        self._gain = probs.astype(np.float64)
        self._step_ms: dict = {}
        # for decode runs (`_peek_prefix`): one merge key per node (the floor above every priority key, which
        # are at most 3), negated for an ascending stable sort; accepted nodes by rank; nodes per row
        self._neg_merge = -np.where(self._cols < floor[:, None], 4.0, self._key)
        self._acc_flag = np.zeros((len(probs), C), np.int64)
        rows, depth = np.nonzero(self._acc_rank < C)
        self._acc_flag[rows, self._acc_rank[rows, depth]] = 1
        self._n_floor = floor.astype(np.int64)
        self._n_pos = self._n_floor + self._counts[:, 1]
        # runs decide as the general loop does only if (a) the budget never cuts the merge short of a row's
        # nodes (then the merge takes every positive key, whatever argpartition does), (b) equal keys mean equal
        # gains (p + 2 exact for every Priority 1 node: then the cumulative gains do not depend on how ties are
        # ordered), (c) the step-time curve depends on the context through its bucket only
        tier = self._key - 2.0 * confident[:, None]
        self._prefix_runs = (c.budget.tokens >= C and bool((tier[rest] == self._gain[rest]).all())
                             and getattr(self.policy.step_time, "ctx_bucket", None) is not None)

    def _build_table(self, dataset: int) -> int:
        """Stratified outcomes for one dataset (`_make_table`), or the same table from the process's cache."""
        import time

        t0 = time.perf_counter()
        cacheable = self.records_path is None and self.core == "table" and hasattr(self.drafter, "rng")
        key = _table_key(self, dataset) if cacheable else None
        hit = _TABLE_CACHE.get(key) if key is not None else None
        if hit is None:
            steps0 = self.step_index
            edges, rows, probs, acc_rank, confident = self._make_table(dataset)
            if key is not None:
                hit = _CachedTable(edges, rows, probs, acc_rank, confident,
                                   self.drafter.rng.bit_generator.state, self.step_index - steps0)
                for a in (edges, rows, probs, acc_rank, confident):
                    if a is not None:
                        a.flags.writeable = False  # shared by later runs: nobody may write into them
                _TABLE_CACHE[key] = hit
                while len(_TABLE_CACHE) > TABLE_CACHE_SIZE:
                    _TABLE_CACHE.popitem(last=False)
        else:
            _TABLE_CACHE.move_to_end(key)
            edges, rows, probs, acc_rank, confident = hit.edges, hit.rows, hit.probs, hit.acc_rank, hit.confident
            # as if built here: the next table's build starts from the state this one's left
            self.drafter.rng.bit_generator.state = hit.drafter_state
            self.step_index += hit.core_steps
        self._base_rows = np.concatenate([self._base_rows, rows])
        self._rows = self._base_rows
        if self.prefix:
            self._probs = np.concatenate([self._probs, probs])
            self._acc_rank = np.concatenate([self._acc_rank, acc_rank])
            self._confident = np.concatenate([self._confident, confident])
        self._stop_const = bool((self._rows[:, STOP] == self.depth).all())
        if not self._stop_const:   # the DRAFTED columns (a fixed depth needs none: its rows stay narrower)
            stop = self._base_rows[:, STOP, None]
            drafted = (stop >= np.arange(1, self.depth + 1)) & (stop <= self.depth)
            self._rows = np.column_stack([self._base_rows, drafted]).astype(np.int64)
        tokens = self._rows[:, TOKENS]
        # (goodput ECHO's table holds full-cap trees: the most its budget verifies, and never a constant)
        self.max_request_tokens = int(tokens.max()) if len(tokens) else 1
        self.tokens_const = int(tokens[0]) if len(tokens) and bool((tokens == tokens[0]).all()) \
            and not self.prefix else 0
        if self.prefix:
            self._prefix_keys()
        self._edges.append(edges)
        slot = len(self._edges) - 1
        self._dataset_slot[dataset] = slot
        self.table_build_s += time.perf_counter() - t0
        return slot

    def _make_table(self, dataset: int):
        """Sorted difficulties split into `bins` equal strata; each row one core outcome at its difficulty.
        Returns (stratum edges, outcome rows, then for goodput ECHO: probabilities, accepted ranks, Priority 1)."""
        n = self.bins * self.rows_per_bin
        rng = np.random.default_rng([self.seed, 3, dataset])
        ds = np.full(n, dataset, np.int64)
        diff = np.sort(np.asarray(self.acceptance.sample_difficulty(n, ds, rng), dtype=np.float64))
        strata = diff.reshape(self.bins, self.rows_per_bin)
        edges = 0.5 * (strata[:-1, -1] + strata[1:, 0])  # between neighbouring strata
        order = rng.permutation(n)  # core batches mix strata, as live batches do
        tok, acc, stop = (np.empty(n, np.int64) for _ in range(3))
        kv = np.full(n, 512, np.int64)
        # goodput ECHO: table every request's whole capped priority order (the budget picks a prefix later)
        full = self._full_cap_policy() if self.prefix else None
        probs = np.zeros((n, self._cap), np.float32) if self.prefix else None
        acc_rank = np.zeros((n, max(self.depth, 1)), np.int16) if self.prefix else None
        confident = np.zeros(n, bool) if self.prefix else None
        for lo in range(0, n, CORE_CHUNK_ROWS):
            idx = order[lo:lo + CORE_CHUNK_ROWS]
            out = [] if self.prefix else None
            tok[idx], acc[idx], stop[idx] = self._run_core(diff[idx], ds[idx], kv[idx], idx, full, out)
            if self.prefix:
                probs[idx], acc_rank[idx], confident[idx] = out[0]
        return edges, outcome_rows(tok, acc, stop), probs, acc_rank, confident

    def _full_cap_policy(self) -> Policy:
        """The same ECHO with a per-request budget at its cap: it verifies each request's whole priority order."""
        from dataclasses import replace

        from echosim.spec.budget import Budget

        c = self.policy.config
        return type(self.policy)(replace(c, budget=Budget("per_request", self._cap)))

    def describe(self) -> dict:
        out = {"core": self.core, "policy": self.policy.describe()}
        if self.core == "table":
            out.update(bins=self.bins, rows_per_bin=self.rows_per_bin, table_build_s=round(self.table_build_s, 3))
        return out

"""One model replica: a continuous-batching loop (vLLM / SGLang style), one SimPy event per iteration.

Each iteration:
1. decode: every running request whose prefix is in the KV cache speculates (draft, gate, select, verify) through
   the Speculator: tokens verified and drafts accepted per request, draft rows per depth;
2. KV cache: each request holds ceil(tokens / block) blocks; if the step's tokens do not fit, the most recently
   admitted request is preempted (blocks freed; it re-queues first and later recomputes its prefix);
3. prefill: the token budget left (max_batched_tokens minus the verify trees, at most max_prefill_tokens) goes to
   prompt chunks, oldest first, then to newly admitted requests (chunked prefill, mixed into the same forward);
   a request is admitted only if its whole prefix fits in the free KV blocks;
4. the step-time model prices draft + verify + LM head + overhead, and env.timeout advances time;
5. results: a decode request emits min(accepted + 1, tokens left); a completed prefill emits the first token.
Running requests live in NumPy columns, so an iteration is a few vector operations whatever the batch size.
"""

from __future__ import annotations

import operator
from collections import deque

import numpy as np

from echosim.sim.errors import SimError
from echosim.sim.kernels import STOP_YIELD, decode_run_kernel, jit_everywhere, run_sums_kernel
from echosim.sim.prefix_cache import PrefixCache
from echosim.sim.speculation import ACCEPTED, DRAFTED, EMIT, ONE, STOP, TOKENS, TOKENS_SQ
from echosim.sim.workload import Request

# the longest decode run (`Replica._decode_run`) prepared at once: steps until the next event on this trace are
# ~5-30; a longer preparation is mostly wasted, a run ending early (0 = every iteration through the general loop)
FAST_STEPS = 48

# per running request: tokens in its KV cache, prefix tokens still to prefill, output tokens left, latents,
# admission order; and `stats` [n, 3], its counters since admission in the outcome rows' first columns
# (tokens verified incl. roots, drafts accepted, decode steps), so one `+=` updates all three. The integer
# columns and the counters are rows of one state array [10, n] (the names are views of it: a request joins or
# leaves with one NumPy call, not ten); the difficulty latent is a float column of its own.
_COLUMNS = ("ctx", "prefill_left", "left", "dataset", "offset", "rid", "admitted")


class Replica:
    def __init__(self, env, index: int, pricer, speculator, kv_blocks: int, cluster, metrics, on_finish):
        self.env, self.index, self.pricer, self.spec = env, index, pricer, speculator
        self.kv_blocks = kv_blocks
        self.block = cluster.block_tokens
        self.max_running = cluster.max_running
        self.max_tokens = cluster.max_batched_tokens
        self.max_prefill = cluster.max_prefill_tokens or cluster.max_batched_tokens
        self.separate_prefill = cluster.prefill_forward == "separate"
        self.metrics, self.on_finish = metrics, on_finish
        self.waiting: deque[Request] = deque()
        self.reqs: list[Request] = []          # running requests, aligned with the columns
        self._state = np.zeros((len(_COLUMNS) + 3, 0), np.int64)
        self.difficulty = np.zeros(0, np.float64)
        self._views()
        self.n_prefilling = 0
        self.admit_counter = 0
        self.kv_tokens = 0                      # tokens in the KV cache (sum of ctx), kept up to date
        self.preemptions = 0
        self.iterations = 0
        self._wake = None
        self._last_step_s = 0.0   # the last decode run's last step (s): sizes the next run's preparation
        self._plain_runs: dict[int, tuple] = {}   # plain decoding's decode-run arrays per batch size (compiled loop)
        # prefix cache (SGLang's radix cache): only requests with prefix keys (hash_ids or text) look it up
        self.cache = PrefixCache(kv_blocks * self.block) if getattr(cluster, "prefix_cache", False) else None
        self.process = env.process(self.run())

    # --- the router's view ----------------------------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        return len(self.reqs) + len(self.waiting)

    @property
    def kv_use(self) -> float:
        return self.kv_tokens / (self.kv_blocks * self.block)

    def queued_kv_share(self) -> float:
        """KV share the waiting queue's prefixes will take once admitted."""
        return sum(r.prompt_tokens + r.generated for r in self.waiting) / (self.block * self.kv_blocks)

    def submit(self, req: Request) -> None:
        need = -(-(req.prompt_tokens + req.output_tokens) // self.block)
        if need > self.kv_blocks:
            raise SimError(f"request {req.id if req.id is not None else req.index} needs {need} KV blocks "
                            f"({req.prompt_tokens} + {req.output_tokens} tokens), more than a replica holds "
                            f"({self.kv_blocks}); use a larger GPU, more TP, or drop it from the trace")
        self.waiting.append(req)
        if self._wake is not None:
            wake, self._wake = self._wake, None
            wake.succeed()

    # --- membership changes -----------------------------------------------------------------------------------

    def _views(self) -> None:
        """Name the state array's rows (views: in-place updates through a name write the state)."""
        state = self._state
        self.ctx, self.prefill_left, self.left, self.dataset, self.offset, self.rid, self.admitted = \
            state[:len(_COLUMNS)]
        self.stats = state[len(_COLUMNS):].T

    def _append(self, new: list[Request]) -> None:
        rows = []
        for r in new:
            prefix = r.prompt_tokens + max(r.generated - 1, 0)  # a preempted request recomputes its tokens
            hit = r.cached_tokens  # prompt tokens found in the prefix cache: in the KV cache already
            rows.append((hit, prefix - hit, r.output_tokens - r.generated, r.dataset, r.offset, r.index,
                         self.admit_counter, 0, 0, 0))
            self.admit_counter += 1
            self.kv_tokens += hit
        self._state = np.concatenate([self._state, np.array(rows, np.int64).T], axis=1)
        self.difficulty = np.concatenate([self.difficulty, np.array([r.difficulty for r in new], np.float64)])
        self._views()
        self.reqs.extend(new)
        self.n_prefilling += len(new)

    def _keep(self, keep: np.ndarray) -> None:
        """Drop the running requests where `keep` is False (finished or preempted), saving their counters."""
        for i in np.flatnonzero(~keep).tolist():
            r = self.reqs[i]
            r.generated = r.output_tokens - int(self.left[i])
            verified, accepted, steps = self.stats[i].tolist()
            r.steps += steps
            r.accepted += accepted
            r.verified += verified - steps  # drafts only: roots excluded
        self._state = self._state[:, keep]
        self.difficulty = self.difficulty[keep]
        self._views()
        self.reqs = [r for r, k in zip(self.reqs, keep.tolist(), strict=True) if k]
        self.n_prefilling = int(np.count_nonzero(self.prefill_left))
        self.kv_tokens = int(self.ctx.sum())

    def _preempt_newest(self) -> None:
        i = int(np.argmax(self.admitted))
        r = self.reqs[i]
        keep = np.ones(len(self.reqs), bool)
        keep[i] = False
        self._keep(keep)
        r.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(r)

    # --- decode runs ------------------------------------------------------------------------------------------

    def _head_admitted(self) -> bool:
        """Whether the queue's head is admitted at the next step whatever its tree sizes (checked at the largest
        tokens a step can verify): then the general loop runs that step and no decode run is prepared. Checked
        before `_decode_run` is entered (on the Azure hour, ~17,000 of echo's ~48,000 checks are true; the run's
        generator and first reductions cost more than this check)."""
        w = self.waiting
        if not w:
            return False
        B = len(self.reqs)
        t_max = self.spec.max_request_tokens
        if B >= self.max_running or min(self.max_tokens - B * t_max, self.max_prefill) <= 0:
            return False
        block = self.block
        r = w[0]
        need = (self.kv_tokens + B * (block - 1)) // block + B * t_max // block + B
        return -(-(r.prompt_tokens + max(r.generated - 1, 0)) // block) <= self.kv_blocks - need

    def _decode_run(self):
        """Consecutive decode-only iterations of the same batch (no prefill running, no admission possible), the
        same iterations as the general loop below computes, bit for bit, with its per-iteration NumPy work done
        once for the run: the steps' outcome rows are drawn together (`Speculator.peek_steps`), their sums,
        contexts and first finishing step come from a few vector operations over [steps, batch], and the columns
        are updated once at the end. Per iteration remain the price, the KV and admission checks (scalars) and
        the metrics. Where no other event falls before an iteration's end, the clock is moved there directly
        instead of through a SimPy timeout (nothing else could have run in between: the same order of events).
        A run ends at a request's finish, at an admission becoming possible, at a KV shortfall, or when the
        table's current block of draws is used up; it returns how many iterations it made (0: none, the general
        loop goes on). Tabled policies and AR only: the exact core takes the general loop (and goodput ECHO where
        `Speculator.peek_steps` declines: see there)."""
        env, spec, pricer, block, metrics = self.env, self.spec, self.pricer, self.block, self.metrics
        B = len(self.reqs)
        ctx0, left0 = self.ctx, self.left
        # steps to prepare: up to the first possible finish, and about as many as fit before the next event
        # elsewhere (an arrival usually ends the run), from the last step's length; any choice gives the
        # same iterations, this one wastes the least preparation
        fewest_left = int(left0.min())
        k_max = min(FAST_STEPS, fewest_left)
        gap_s = env.peek() - env.now
        if self._last_step_s > 0 and gap_s < k_max * self._last_step_s:
            k_max = min(k_max, int(gap_s / self._last_step_s) + 2)
        kv_sum = self.kv_tokens
        if spec.plain:
            # plain decoding: every request-step verifies and emits one token, so the run's sums are scalars:
            # each step's outcome sums (tokens, accepted, decoding, emitted, tokens^2), its tok . ctx (the KV sum
            # at its start) and the first finish (the fewest tokens left) need no arrays
            R, tau, sums_kernel = None, 0, None
            sums = ((B, 0, B, B, B),) * k_max
            qk_dot = range(kv_sum, kv_sum + k_max * B, B)
            k_fin = k_max - 1 if k_max == fewest_left else k_max
            drows = ((),) * k_max
        else:
            R = spec.peek_steps(self.offset, k_max, kv_sum, left0)
            if R is None:
                return 0
            k_max = len(R)
            # compiled where goodput ECHO's merge has loaded numba; elsewhere NumPy: loading numba costs ~0.5 s of
            # CPU and ~110 MB of memory a process, more than the compiled sums save (docs/SIMULATOR.md)
            sums_kernel = run_sums_kernel() if spec.prefix and spec.compiled else None
        # the per-step loop compiled (kernels.decode_steps: pricing included) where numba is loaded anyway (goodput
        # ECHO's merge) or asked for (ECHOSIM_JIT=1), the pricer's cost model has the roofline's scalar path and
        # no budget learns from the priced steps (observe_time runs per step)
        loop = decode_run_kernel() if (sums_kernel is not None or jit_everywhere()) and not spec.observes_time \
            else None
        consts = pricer.kernel_constants(spec.depth > 0) if loop is not None else None
        if consts is not None and R is not None:
            sums_kernel = run_sums_kernel()   # (numba is loaded already: the loop is compiled)
        if R is not None and sums_kernel is not None:
            sums_a = np.empty((k_max, 5), np.int64)
            qk_a = np.empty(k_max, np.int64)
            dr_a = np.empty((k_max, spec.depth), np.float64)
            cumE = np.empty((k_max, B), np.int64)
            k_fin = sums_kernel(R, np.ascontiguousarray(ctx0), np.ascontiguousarray(left0), spec.width_array,
                                spec.depth, sums_a, qk_a, dr_a, cumE)
            tau = spec.tokens_const if consts is not None else 0   # (tau x the KV sum: the NumPy loop's qk there)
            if consts is None:
                sums, qk_dot = sums_a.tolist(), qk_a.tolist()
                drows = list(map(tuple, dr_a.tolist()))
        elif R is None and consts is not None:   # plain decoding: the same scalars, as arrays (kept per batch size)
            plain = self._plain_runs.get(B)
            if plain is None:
                plain = self._plain_runs[B] = (np.tile(np.array([B, 0, B, B, B], np.int64), (FAST_STEPS, 1)),
                                               np.zeros(FAST_STEPS, np.int64), np.zeros((FAST_STEPS, 0), np.float64))
            sums_a, qk_a, dr_a = plain
            tau = 1
        elif R is not None:   # the same in NumPy
            E = R[:, :, EMIT]
            cumE = np.cumsum(E, axis=0)  # [k, B]: tokens emitted by the end of each step (before capping)
            tau = spec.tokens_const
            if tau:
                # a fixed tree (EAGLE-3): only the accepted drafts vary; a step's tok . ctx is tau x its KV sum
                sums = [(B * tau, a, B, a + B, B * tau * tau) for a in R[:, :, ACCEPTED].sum(axis=1).tolist()]
                qk_dot = None
            else:
                S = R.sum(axis=1)   # per step: the outcome sums, then requests that drafted each depth
                sums = S[:, :TOKENS_SQ + 1].tolist()
                # each step's tok . ctx, ctx being the context at that step's start (no capping before a finish)
                qk_dot = (R[:, :, TOKENS] * (ctx0 + (cumE - E))).sum(axis=1).tolist()
            fin = (cumE >= left0).any(axis=1)
            k_fin = int(np.argmax(fin)) if fin[-1] else k_max   # the step where a request finishes, if any
        if R is None or sums_kernel is not None:
            pass
        elif spec._stop_const:
            drows = (tuple(B * w for w in spec.width),) * k_max
        elif spec.depth and not tau:   # (rows whose depth varies carry DRAFTED columns)
            # rows per depth as speculation.draft_rows computes them: requests that drafted depth d or deeper
            alive = S[:, DRAFTED:].tolist()
            drows = None   # made step by step from `alive` (a run often ends well before k_max)
        elif spec.depth:
            stop = R[:, :, STOP]
            alive = ((stop[:, :, None] >= np.arange(1, spec.depth + 1)) & (stop[:, :, None] <= spec.depth)
                     ).sum(axis=1).tolist()
            drows = None
        else:
            drows = ((),) * k_max
        n_bias = B * (block - 1)
        max_tokens, max_prefill, kv_blocks = self.max_tokens, self.max_prefill, self.kv_blocks
        done = 0
        finishing = False
        observes = spec.observes_time
        price, iteration, index, width = pricer.price_parts, metrics.iteration, self.index, spec.width
        kv = self.kv_tokens     # kept in a local; written back before every yield (the router reads it)
        step_s = self._last_step_s
        # the admission check's parts that change only while this process yields (the queue)
        admit_ok = B < self.max_running
        head_blocks = n_wait = 0

        def queue_state():
            w = self.waiting
            r = w[0] if w else None
            return len(w), -(-(r.prompt_tokens + max(r.generated - 1, 0)) // block) if r is not None else 0

        n_wait, head_blocks = queue_state()
        next_due = env.peek()   # the next event elsewhere (the queue changes only while this process yields)
        if consts is not None:
            parts = np.empty((k_max, 4), np.float64)
            times = np.empty((k_max, 2), np.float64)
            kv_after = np.empty(k_max, np.int64)
            k = 0
            while True:
                acc, counts = metrics.part_sums(), np.zeros(3, np.int64)
                status, k1, kv, now = loop(sums_a, qk_a, tau, dr_a, k, k_max, k_fin, kv, n_bias, block, kv_blocks,
                                           max_tokens, max_prefill, n_wait, admit_ok, head_blocks, float(env._now),
                                           next_due, *consts, parts, times, kv_after, acc, counts)
                if k1 > k:
                    env._now = now   # the steps made in there: their timeouts' effect, without events
                metrics.decode_iterations_made(index, k1 - k, counts, acc, sums_a[k:k1], times[k:k1], parts[k:k1],
                                               kv_after[k:k1], n_wait)
                done = k1
                if status != STOP_YIELD:
                    if k1 > k:   # the last step priced (sizes the next run's preparation)
                        step_s = sum(parts[k1 - 1].tolist()) / 1000.0
                    break
                # step k1 ends at or after the next event elsewhere, or finishes a request: through SimPy
                st = tuple(parts[k1].tolist())
                t0, end = times[k1].tolist()
                step_s = (st[0] + st[1] + st[2] + st[3]) / 1000.0
                self.kv_tokens = kv
                yield env.timeout(step_s)
                next_due = env.peek()
                n_wait, head_blocks = queue_state()
                T, acc_sum, n_dec = sums_a[k1, :3].tolist()
                kv += acc_sum + n_dec
                done = k1 + 1
                finishing = k1 == k_fin
                if finishing:
                    break
                iteration(end, t0, index, n_dec, 0, T, acc_sum, *st, kv, n_wait)
                k = k1 + 1
        else:
            for k in range(k_max):
                T, acc_sum, n_dec, _, tok_sq = sums[k]
                # the general loop's KV bound; where it fails, that loop makes this step (its exact check, preemption)
                need = (kv + n_bias) // block + T // block + n_dec
                if need > kv_blocks:
                    break
                # could the queue's head be admitted at this step? then the general loop runs it
                if n_wait and admit_ok and min(max_tokens - T, max_prefill) > 0 and head_blocks <= kv_blocks - need:
                    break
                qk = float(qk_dot[k] if qk_dot is not None else tau * kv) + 0.5 * (tok_sq + T)
                dr = drows[k] if drows is not None else tuple(map(operator.mul, alive[k], width))
                finishing = k == k_fin
                tokens = float(T)
                st = price(tokens, float(kv + T), qk, float(n_dec), tokens, dr, kv / n_dec, n_dec)
                step_ms = st[0] + st[1] + st[2] + st[3]
                if observes:
                    spec.observe_time(n_dec, T, *pricer.observed_ms(st, tokens, dr, kv / n_dec, n_dec), dr)
                t0 = env._now
                step_s = step_ms / 1000.0
                end = t0 + step_s   # as SimPy's timeout computes it
                if finishing or end >= next_due:
                    self.kv_tokens = kv
                    yield env.timeout(step_s)
                    next_due = env.peek()
                    n_wait, head_blocks = queue_state()
                else:
                    env._now = end   # nothing is due before `end`: the timeout's effect, without its event
                kv += acc_sum + n_dec
                done = k + 1
                if finishing:
                    break
                iteration(end, t0, index, n_dec, 0, T, acc_sum, *st, kv, n_wait)
        self.kv_tokens = kv
        self.iterations += done
        self._last_step_s = step_s
        if not done:
            return 0
        # the run's effect on the columns: emitted tokens (capped by what each request had left), counters
        if R is None:   # plain: one token per request-step, none finished before the last step
            self.stats += (done, 0, done)
            left0 -= done   # in place: the names are views of the state array
            ctx0 += done
        else:
            spec.commit_steps(done, B)
            emitted = np.minimum(cumE[done - 1], left0)
            self.stats += R[:done, :, :ONE + 1].sum(axis=0)
            left0 -= emitted
            ctx0 += emitted
        if finishing:
            now = env.now
            ended = self.left <= 0
            finished_reqs = [self.reqs[i] for i in np.flatnonzero(ended).tolist()]
            self._keep(~ended)
            metrics.iteration(now, t0, self.index, n_dec, 0, T, acc_sum, *st, self.kv_tokens, len(self.waiting))
            for r in finished_reqs:
                metrics.request(r, now, self.index)
                self.on_finish(r)
        return done

    # --- the loop ---------------------------------------------------------------------------------------------

    def run(self):
        env, block, spec, pricer = self.env, self.block, self.spec, self.pricer
        while True:
            if not self.reqs and not self.waiting:
                self._wake = env.event()
                yield self._wake
            if self.n_prefilling == 0 and self.reqs and FAST_STEPS and not self._head_admitted() \
                    and (yield from self._decode_run()):
                continue
            t0 = env.now

            # 1-2. decode outcomes, then make room in the KV cache (recompute the newest request) if needed
            while True:
                if self.n_prefilling == 0:
                    dec = None
                    ctx = self.ctx
                    out = spec.step(self.difficulty, self.dataset, self.offset, ctx, self.rid) \
                        if len(self.reqs) else None
                else:
                    dec = np.flatnonzero(self.prefill_left == 0)
                    ctx = self.ctx[dec]
                    out = spec.step(self.difficulty[dec], self.dataset[dec], self.offset[dec], ctx, self.rid[dec]) \
                        if len(dec) else None
                if out is not None:
                    rows = out.rows
                    tok = rows[:, TOKENS]
                    T, acc_sum, n_dec, _, tok_sq = rows[:, :TOKENS_SQ + 1].sum(axis=0).tolist()
                else:
                    tok, T, acc_sum, n_dec, tok_sq = None, 0, 0, 0, 0
                # a cheap bound first: sum ceil((c + t) / b) <= (sum c + n (b - 1)) // b + T // b + n_dec
                need = (self.kv_tokens + len(self.reqs) * (block - 1)) // block + T // block + n_dec
                if need <= self.kv_blocks:
                    break
                need = int(((ctx + tok + (block - 1)) // block).sum()) if tok is not None else 0
                if self.n_prefilling:
                    pre = self.prefill_left > 0
                    need += int(((self.ctx[pre] + (block - 1)) // block).sum())
                if need <= self.kv_blocks or len(self.reqs) <= 1:
                    break
                self._preempt_newest()
            n_before = len(self.reqs)  # admissions below append after these rows

            # 3. prefill chunks under the token budget: running prefills first (oldest first), then admissions
            budget = min(self.max_tokens - T, self.max_prefill)
            chunks: list[tuple[int, int]] = []   # (chunk tokens, tokens already cached)
            chunk_rows: list[int] = []
            if (self.n_prefilling or self.waiting) and budget > 0:
                free = self.kv_blocks - need
                if self.n_prefilling:
                    pre = np.flatnonzero(self.prefill_left > 0)
                    pre = pre[np.argsort(self.admitted[pre], kind="stable")]
                    for i in pre.tolist():
                        if budget <= 0:
                            break
                        have = int(self.ctx[i])
                        held = -(-have // block)
                        c = min(int(self.prefill_left[i]), budget, (held + free) * block - have)
                        if c <= 0:
                            break
                        chunks.append((c, have))
                        chunk_rows.append(i)
                        budget -= c
                        free -= -(-(have + c) // block) - held
                admit: list[Request] = []
                while self.waiting and budget > 0 and n_before + len(admit) < self.max_running:
                    r = self.waiting[0]
                    prefix = r.prompt_tokens + max(r.generated - 1, 0)
                    if -(-prefix // block) > free:  # the whole prefix must fit: no admit-then-preempt churn
                        break
                    self.waiting.popleft()
                    hit = r.cached_tokens = self.cache.match(r.prefix_keys, r.prefix_sizes, r.prompt_tokens) \
                        if self.cache is not None and r.prefix_keys else 0
                    c = min(prefix - hit, budget)
                    chunks.append((c, hit))
                    chunk_rows.append(n_before + len(admit))
                    admit.append(r)
                    budget -= c
                    free -= -(-prefix // block)  # reserved for the whole prefix
                if admit:
                    self._append(admit)
            if tok is None and not chunks:
                if len(self.reqs) > 1:  # prefills stuck on KV: give the newest one's blocks back
                    self._preempt_newest()
                    continue
                raise SimError(f"replica {self.index}: nothing can run (KV capacity {self.kv_blocks} blocks, "
                                f"max_batched_tokens {self.max_tokens})")

            # 4. price the iteration (StepBatch aggregates, as StepBatch.from_requests defines them)
            if tok is not None:
                csum = self.kv_tokens if dec is None else int(ctx.sum())
                tokens, kv, seqs = float(T), float(csum + T), float(n_dec)
                qk = float(tok.dot(ctx)) + 0.5 * (tok_sq + T)
                mean_ctx, draft_rows = csum / n_dec, out.draft_rows
            else:
                tokens = kv = qk = seqs = mean_ctx = 0.0
                draft_rows = ()
            lm_rows = tokens
            pre = [0.0, 0.0, 0.0, 0.0, 0.0]  # the chunks' tokens, kv, qk, seqs, lm rows
            for c, have in chunks:
                pre[0] += c
                pre[1] += have + c
                pre[2] += c * have + c * (c + 1) / 2
                pre[3] += 1
                pre[4] += 1
            prefill_tokens = int(pre[0])
            if self.separate_prefill and tok is not None and chunks:
                p = pricer.price(tokens, kv, qk, seqs, lm_rows, draft_rows, mean_ctx, n_dec, prefill=tuple(pre))
                st = (p.draft_ms, p.verify_ms, p.lm_head_ms, p.overhead_ms)
            else:
                st = pricer.price_parts(tokens + pre[0], kv + pre[1], qk + pre[2], seqs + pre[3], lm_rows + pre[4],
                                        draft_rows, mean_ctx, n_dec)
            step_ms = st[0] + st[1] + st[2] + st[3]
            if tok is not None and not chunks and spec.observes_time:  # decode-only: teaches adaptive budgets
                spec.observe_time(n_dec, T, *pricer.observed_ms(st, float(T), draft_rows, mean_ctx, n_dec),
                                  draft_rows)
            yield env.timeout(step_ms / 1000.0)
            self.iterations += 1

            # 5. results
            finished = False
            if tok is not None:
                if dec is None:
                    left = self.left[:n_before]
                    emit = np.minimum(rows[:, EMIT], left)
                    left -= emit
                    self.ctx[:n_before] += emit
                    self.stats[:n_before] += rows[:, :ONE + 1]
                    finished = int(left.min()) <= 0
                else:
                    left = self.left[dec]
                    emit = np.minimum(rows[:, EMIT], left)
                    self.left[dec] = left - emit
                    self.ctx[dec] += emit
                    self.stats[dec] += rows[:, :ONE + 1]
                    finished = bool((left <= emit).any())
                self.kv_tokens += acc_sum + n_dec  # exact unless a request finished (then recounted)
            now = env.now
            for (c, _), i in zip(chunks, chunk_rows, strict=True):
                self.kv_tokens += c
                self.ctx[i] += c
                self.prefill_left[i] -= c
                if self.prefill_left[i] == 0:
                    self.n_prefilling -= 1
                    r = self.reqs[i]
                    if self.cache is not None and r.prefix_keys:  # its prompt's KV now serves later requests
                        self.cache.insert(r.prefix_keys, r.prefix_sizes)
                    if r.first_token_s < 0:  # the prompt's forward emits the first token
                        self.left[i] -= 1
                        r.first_token_s = now
                        finished = finished or self.left[i] <= 0
            if finished:
                done = self.left <= 0
                finished_reqs = [self.reqs[i] for i in np.flatnonzero(done).tolist()]
                self._keep(~done)
            self.metrics.iteration(now, t0, self.index, n_dec, prefill_tokens, T, acc_sum, *st, self.kv_tokens,
                                   len(self.waiting))
            if finished:
                for r in finished_reqs:
                    self.metrics.request(r, now, self.index)
                    self.on_finish(r)

"""The speculative-decoding engine: continuous batching over the scheduler core, with real models.

One `step()`:
1. admit waiting requests while fewer than `max_running` run and the KV pool has room (a prompt that can never
   fit is refused at `add_request`; one that does not fit *now* waits);
2. prefill: chunks of the admitted prompts, at most `max_prefill_tokens` per step, into the target's and the
   draft's KV caches; the chunk that completes a prompt also yields the first output token from the prompt's last
   position (as SGLang's prefill does: time to first token is the prefill's), which becomes the first tree root. A
   request resumed after preemption re-prefills everything but its last token (already emitted: the next root);
3. one speculative decode step for every request prefilled in an earlier step, through the same core as the
   simulator:
   `draft()` with the ModelDrafter (one batched draft forward per depth), `policy.select`, `pack`, ONE target
   forward over the packed trees with the pack's tree masks, torch verification (greedy, or lossless sampling
   with temperature/top-p), then commit: the accepted path's K/V is copied from its tree slots to
   kv_len + depth (KVCache.copy_slots) and the rest is left as scratch. Under KV pressure the most recently
   admitted request is preempted (its blocks freed, recomputed later from its tokens).
Policy "ar" is plain decoding in the same engine: the tree is the root alone, no draft model.

A request's state: `tokens` (prompt + output so far), `kv_len` (positions with target K/V). While decoding,
kv_len == len(tokens) - 1: the last token is the root of the next tree. spec_verify_ct counts decode steps only,
so completion tokens = 1 (from the prefill) + verify steps + accepted drafts.

Threading: add_request and abort may be called from another thread than step (they only queue work); step,
generate and stats belong to one thread. Times are seconds on `Engine.clock` (time.monotonic).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from echo_exec.drafter import Eagle3Drafter, ModelDrafter
from echo_exec.errors import ExecError
from echo_exec.host_memory import keep_freed_memory
from echo_exec.kv import BlockManager, attn_meta
from echo_exec.loader import load_model
from echo_exec.model import Eagle3Head, KVCache
from echo_exec.sampling import target_probs
from echo_exec.tokenizer import EOS_ID
from echo_exec.verify_torch import tree_index, tree_tensors, verify_greedy, verify_sampling
from echosim.spec.adaptive import batched_step_time
from echosim.spec.drafting import depth_widths, draft, draft_rows
from echosim.spec.pack import pack
from echosim.spec.policies import ConfigError, Policy, make_policy
from echosim.spec.records import NodeRecords, step_records, write_records
from echosim.spec.verify import VerifyResult
from echosim.spec.verify import verify_greedy as verify_greedy_np


@dataclass
class IterationRecord:
    """One engine step in the terms a step-time model prices (cost_models' StepBatch.from_requests), with its
    measured time: what the simulator's per-step overheads are fitted from (echosim/validate/crossval.py)."""

    start_s: float                       # on Engine.clock
    step_ms: float                       # the whole step: admission, prefill, draft, verify, commit, emit
    draft_ms: float = 0.0                # drafting + select + pack
    target_ms: float = 0.0               # the verify forward, verification and the commit
    prefill_chunks: list = field(default_factory=list)  # (chunk tokens, tokens already cached) per prefill
    verify_tokens: np.ndarray | None = None  # per decoding request: tokens verified, the root included
    context_lens: np.ndarray | None = None   # per decoding request: cached tokens before the step
    draft_rows: tuple = ()               # per depth: rows the draft model ran, the batch together
    accepted: int = 0                    # drafts accepted, the batch together
    waiting: int = 0                     # requests queued after admission


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # SGLang's flag: run to max_new_tokens through the model's EOS (trace replay)
    seed: int | None = None   # per-request sampling seed (default: derived from the engine seed and arrival order)

    def check(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ExecError(f"must be an integer >= 1, not {self.max_new_tokens!r}", field="max_new_tokens")
        if not self.temperature >= 0.0 or not np.isfinite(self.temperature):
            raise ExecError(f"must be >= 0, not {self.temperature!r}", field="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise ExecError(f"must be in (0, 1], not {self.top_p!r}", field="top_p")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ExecError(f"must be an integer >= 0, not {self.seed!r}", field="seed")
        if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in self.stop_token_ids):
            raise ExecError(f"must be token ids, not {self.stop_token_ids!r}", field="stop_token_ids")


@dataclass
class RequestOutput:
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]      # ends with the stop token when finish_reason == "stop"
    finished: bool
    finish_reason: str | None  # "stop", "length" or "abort"
    arrival_s: float
    first_token_s: float | None
    finish_s: float | None
    spec_verify_ct: int        # verify steps this request took part in
    accepted_drafts: int       # emitted tokens beyond one per verify step: MAT = (this + verify_ct) / verify_ct


@dataclass(eq=False)
class _Request:
    id: str
    seq: int
    prompt: list[int]
    params: SamplingParams
    on_tokens: Callable[[RequestOutput, list[int]], None] | None
    arrival_s: float
    stop: frozenset
    rng: np.random.Generator
    tokens: list[int] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    row: int = -1
    kv_len: int = 0
    first_token_s: float | None = None
    finish_s: float | None = None
    finish_reason: str | None = None
    verify_ct: int = 0
    accepted: int = 0

    def snapshot(self) -> RequestOutput:
        return RequestOutput(self.id, self.prompt, list(self.output), self.finish_reason is not None,
                             self.finish_reason, self.arrival_s, self.first_token_s, self.finish_s, self.verify_ct,
                             self.accepted)


def _eos_ids(cfg) -> set[int]:
    eos = cfg.eos_token_id
    if eos is None:
        return {EOS_ID} if cfg.vocab_size > EOS_ID else set()
    return {int(e) for e in (eos if isinstance(eos, list) else [eos])}


class Engine:
    clock = staticmethod(time.monotonic)

    def __init__(self, target_dir, draft_dir=None, policy="echo", policy_config: dict | None = None, device="cpu",
                 dtype=torch.float32, max_running=32, num_kv_blocks=None, block_size=16, max_prefill_tokens=512,
                 records_path=None, seed=0, log_iterations=False):
        keep_freed_memory()  # a step's transient tensors reuse pages (echo_exec/host_memory.py)
        self.device = torch.device(device)
        try:
            self.policy: Policy = policy if isinstance(policy, Policy) else make_policy(policy, policy_config)
        except ConfigError as exc:
            raise ExecError(str(exc), field="policy") from None
        if max_running < 1 or max_prefill_tokens < 1:
            raise ExecError("max_running and max_prefill_tokens must be >= 1")
        self.target = load_model(target_dir, dtype=dtype, device=self.device)
        cfg = self.target.cfg
        self.draft_model = None
        if draft_dir is not None and self.policy.name != "ar":
            self.draft_model = load_model(draft_dir, dtype=dtype, device=self.device)
            if self.draft_model.cfg.vocab_size != cfg.vocab_size:
                raise ExecError(f"the draft's vocabulary ({self.draft_model.cfg.vocab_size}) differs from the "
                                f"target's ({cfg.vocab_size})", path=str(draft_dir))
        if self.draft_model is None and self.policy.max_plan(1).depth > 0:
            raise ExecError(f"policy {self.policy.name!r} needs a draft model (draft_dir)")
        self.max_running, self.max_prefill_tokens = int(max_running), int(max_prefill_tokens)
        self.max_len = cfg.max_position_embeddings
        if self.draft_model is not None:
            self.max_len = min(self.max_len, self.draft_model.cfg.max_position_embeddings)
        if num_kv_blocks is None:  # room for every running request at 1024 tokens plus one step's lookahead
            num_kv_blocks = max_running * -(-(1024 + self._lookahead(1)) // block_size)
        self.blocks = BlockManager(int(num_kv_blocks), int(block_size), self.max_running, int(num_kv_blocks))
        self.cache = KVCache(cfg, int(num_kv_blocks), int(block_size), dtype=dtype, device=self.device)
        self.drafter = None
        if self.draft_model is not None:
            dcache = KVCache(self.draft_model.cfg, int(num_kv_blocks), int(block_size), dtype=dtype,
                             device=self.device)
            # RoPE positions reach the context length plus one step's lookahead.
            if isinstance(self.draft_model, Eagle3Head):  # drafts from the target's hidden states
                self.drafter = Eagle3Drafter(self.draft_model, self.target, dcache, self.blocks, self.device)
            else:
                self.drafter = ModelDrafter(self.draft_model, dcache, self.blocks, self.device,
                                            self.max_len + 2048)
        # Greedy verification of a tree: "auto" runs the NumPy reference on a CPU (fewest ops for tiny trees) and
        # the torch version on other devices; "torch" always runs the torch version. Both give the same result.
        self.verify_backend = "auto"
        self.eos = _eos_ids(cfg)
        self.vocab_size = cfg.vocab_size
        self.seed = seed
        self._seq = itertools.count()
        self._inbox: deque = deque()  # ("add", request) / ("abort", id): thread-safe appends
        self._ids: set[str] = set()
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self._free_rows = list(range(self.max_running - 1, -1, -1))
        self._aborted: list[_Request] = []
        self.records_path = Path(records_path) if records_path is not None else None
        self._records: list[NodeRecords] = []
        if self.records_path is not None:
            self.records_path.write_text("")
        # one IterationRecord per step that did work, when asked (the caller empties it as it reads)
        self.iterations: list[IterationRecord] | None = [] if log_iterations else None
        self._it: IterationRecord | None = None
        self._just_prefilled: set[str] = set()
        self._prefill_ran, self._prefilled = False, False
        self._step_obs: dict | None = None  # the last decode's times, handed to policy.observe_step
        if self.policy.needs_step_time and self.policy.step_time is None and self.drafter is not None:
            # the adaptive budget's cost prior: this target's own forward, profiled here, now
            grid = self.measure_batch_step_time()
            if grid:  # else a KV pool too small to profile in: the budget starts from its generic prior
                self.policy.bind(batched_step_time(grid))
        self._stats = dict(steps=0, decode_steps=0, prefill_tokens=0, verify_tokens=0, generated_tokens=0,
                           accepted_drafts=0, verified_accepted=0, request_verifies=0, preemptions=0, finished=0,
                           draft_ms=0.0, target_ms=0.0, step_ms=0.0, step_cpu_ms=0.0)

    # ---- public API -------------------------------------------------------------------------------------------

    def add_request(self, prompt_ids, params: SamplingParams, request_id: str | None = None,
                    on_tokens: Callable[[RequestOutput, list[int]], None] | None = None) -> str:
        params.check()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ExecError("the prompt is empty", field="prompt_ids")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ExecError(f"token ids must be in 0..{self.vocab_size - 1}", field="prompt_ids")
        total = len(prompt) + params.max_new_tokens
        if total > self.max_len:
            raise ExecError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                            f"the model's {self.max_len} positions", field="max_new_tokens")
        if self.blocks.blocks_for(total + self._lookahead(1)) > self.blocks.num_blocks:
            raise ExecError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) can never "
                            f"fit the KV pool ({self.blocks.capacity_tokens} tokens)", field="max_new_tokens")
        seq = next(self._seq)
        rid = str(request_id) if request_id is not None else f"req-{seq}"
        if rid in self._ids:
            raise ExecError(f"request id {rid!r} is already in use", field="request_id")
        self._ids.add(rid)
        rng = np.random.default_rng(params.seed if params.seed is not None else [self.seed, seq])
        stop = frozenset(int(t) for t in params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos)
        req = _Request(id=rid, seq=seq, prompt=prompt, params=params, on_tokens=on_tokens, arrival_s=self.clock(),
                       stop=stop, rng=rng, tokens=list(prompt))
        self._inbox.append(("add", req))
        return rid

    def abort(self, request_id) -> None:
        self._inbox.append(("abort", str(request_id)))

    def has_unfinished(self) -> bool:
        return bool(self._inbox or self.waiting or self.running or self._aborted)

    def step(self) -> list[RequestOutput]:
        t0, cpu0 = time.perf_counter(), time.thread_time()
        if self.iterations is not None:
            self._it = IterationRecord(start_s=self.clock(), step_ms=0.0)
        with torch.inference_mode():
            self._drain_inbox()
            self._admit()
            self._just_prefilled = set()
            done = self._prefill()
            self._prefilled = bool(self._just_prefilled) or self._prefill_ran
            done += self._decode()
        done = [r.snapshot() for r in self._aborted] + done
        self._aborted = []
        self._stats["steps"] += 1
        ms = (time.perf_counter() - t0) * 1e3
        if self._step_obs is not None:  # the decode step's measured times, for policies that fit their cost
            obs, self._step_obs = self._step_obs, None
            other = ms - obs["draft_ms"] - obs["verify_ms"] if not self._prefilled else None
            self.policy.observe_step(**obs, other_ms=other)
        self._stats["step_ms"] += ms
        # this thread's CPU time: a loaded machine inflates it far less than wall time (bench_serve's ratios)
        self._stats["step_cpu_ms"] += (time.thread_time() - cpu0) * 1e3
        it = self._it
        if it is not None and (it.prefill_chunks or it.verify_tokens is not None):
            it.step_ms, it.waiting = ms, len(self.waiting)
            self.iterations.append(it)
        if self._records and (len(self._records) >= 64 or not self.has_unfinished()):
            self.flush_records()
        return done

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
        ids = [self.add_request(p, params) for p in prompts]
        out: dict[str, RequestOutput] = {}
        while len(out) < len(ids):
            for r in self.step():
                out[r.request_id] = r
        return [out[i] for i in ids]

    def stats(self) -> dict:
        s = dict(self._stats)
        n = s["request_verifies"]
        s["avg_accept_length"] = (s["accepted_drafts"] + n) / n if n else 0.0
        s["running"], s["waiting"] = len(self.running), len(self.waiting)
        s["free_kv_blocks"], s["num_kv_blocks"] = self.blocks.num_free, self.blocks.num_blocks
        s["policy"] = self.policy.name
        s["policy_settings"] = self.policy.describe()
        s["policy_state"] = self.policy.state()
        return s

    def measure_step_time(self, token_counts=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), context: int = 128,
                          repeats: int = 3) -> Callable[[np.ndarray, int], np.ndarray]:
        """A step-time model of this target on this device (a policy's StepTimeFn: verified tokens, batch size ->
        ms), from timed forwards of one request's tree of n tokens over `context` cached tokens (the best of
        `repeats`), interpolated linearly in tokens. Bind it with `engine.policy.bind(fn)` for goodput budgets."""
        counts = np.array(sorted(set(int(c) for c in token_counts)), np.int64)
        bm, row = self.blocks, np.array([0])
        need = context + int(counts.max())
        if self.running or bm.blocks_for(need) > bm.num_free:
            raise RuntimeError("measure_step_time needs an idle engine with room for one request")
        bm.grow(row, np.array([need]))
        ms = []
        try:
            with torch.inference_mode():
                for n in counts:
                    ms.append(self._time_verify_ms(row, context, int(n), repeats))
        finally:
            bm.free_row(0)
        ms_arr = np.maximum.accumulate(np.array(ms))  # more tokens never cost less

        def step_ms(tokens: np.ndarray, batch_size: int) -> np.ndarray:
            return np.interp(np.asarray(tokens, np.float64), counts, ms_arr)

        step_ms.table = dict(zip(counts.tolist(), np.round(ms_arr, 3).tolist(), strict=True))  # type: ignore[attr-defined]
        return step_ms

    def measure_batch_step_time(self, batch_sizes=(1, 8, 32), tokens_per_request=(1, 2, 4, 8, 16),
                                context: int = 128, repeats: int = 2) -> dict:
        """{batch size: {tokens per request: ms}}: timed target forwards of `batch` requests verifying n tokens
        each (causal within a request) over `context` cached tokens, the best of `repeats` + 1. The adaptive
        budget's cost prior (echosim.spec.adaptive.batched_step_time): what a verify step costs depends on how
        its tokens spread over requests, not only on their number."""
        bm = self.blocks
        out: dict = {}
        with torch.inference_mode():
            for b in batch_sizes:
                if b > self.max_running:
                    continue
                rows = np.arange(b)
                need = context + max(tokens_per_request)
                if self.running or int(bm.blocks_for(need)) * b > bm.num_free:
                    break
                bm.grow(rows, np.full(b, need))
                try:
                    out[b] = {}
                    for n in tokens_per_request:
                        out[b][n] = round(self._time_verify_ms(rows, context, n, repeats), 3)
                finally:
                    for r in rows:
                        bm.free_row(int(r))
        return out

    def _time_verify_ms(self, rows: np.ndarray, context: int, n: int, repeats: int) -> float:
        """The best of `repeats` + 1 timed target forwards of len(rows) requests, each verifying n new tokens
        (causal among them) after `context` cached ones. The rows must hold KV blocks for context + n."""
        b = len(rows)
        pos = np.tile(np.arange(context, context + n), b)
        meta = attn_meta(self.blocks, rows, np.full(b, context + n), np.full(b, n), pos, causal_qpos=pos,
                         device=self.device)
        tok = torch.zeros(b * n, dtype=torch.long, device=self.device)
        pos_t = torch.from_numpy(pos).to(self.device)
        best = np.inf
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            self.target.forward_packed(tok, pos_t, meta, self.cache).argmax(dim=-1).cpu()
            best = min(best, time.perf_counter() - t0)
        return best * 1e3

    def close(self) -> None:
        """Write the records still buffered (the engine stays usable)."""
        self.flush_records()

    def flush_records(self) -> None:
        if self.records_path is not None and self._records:
            write_records(self.records_path, NodeRecords.concat(self._records), append=True)
        self._records = []

    # ---- scheduling ---------------------------------------------------------------------------------------------

    def _lookahead(self, batch_size: int) -> int:
        """Cache positions a request needs past its committed length during one step (draft scratch, tree)."""
        plan = self.policy.max_plan(batch_size)
        if plan.depth == 0:
            return 1
        tree = self.policy.max_tree_tokens() or 1 + plan.k1 + (plan.depth - 1) * plan.k * plan.k
        return max(ModelDrafter.scratch_tokens(plan.depth, plan.k), tree)

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, x = self._inbox.popleft()
            if kind == "add":
                self.waiting.append(x)
                continue
            req = next((r for r in itertools.chain(self.waiting, self.running) if r.id == x), None)
            if req is None:
                continue
            if req in self.running:
                self._release(req)
            else:
                self.waiting.remove(req)
            self._finish(req, "abort")
            self._aborted.append(req)

    def _release(self, req: _Request) -> None:
        self.blocks.free_row(req.row)
        self._free_rows.append(req.row)
        self.running.remove(req)
        req.row, req.kv_len = -1, 0

    def _finish(self, req: _Request, reason: str) -> None:
        req.finish_reason = reason
        req.finish_s = self.clock()
        self._ids.discard(req.id)
        self._stats["finished"] += 1

    def _admit(self) -> None:
        bm = self.blocks
        while self.waiting and len(self.running) < self.max_running:
            req = self.waiting[0]
            need = len(req.tokens) - 1 + self._lookahead(len(self.running) + 1)
            if not self.running:  # alone it always goes in (add_request checked it fits the pool)
                need = min(need, bm.capacity_tokens)
            headroom = len(self.running)  # one free block per running request, for its growth
            if int(bm.blocks_for(need)) + headroom > bm.num_free:
                break
            self.waiting.popleft()
            req.row = self._free_rows.pop()
            req.kv_len = 0
            bm.grow(np.array([req.row]), np.array([need]))
            if self.drafter is not None:
                self.drafter.kv_len[req.row] = 0
            self.running.append(req)

    def _preempt_last(self) -> _Request:
        req = self.running[-1]
        self._release(req)
        self.waiting.appendleft(req)
        self._stats["preemptions"] += 1
        return req

    def _prefill(self) -> list[RequestOutput]:
        budget = self.max_prefill_tokens
        chunks = []
        for r in self.running:
            # a fresh prompt is prefilled whole (its last position gives the first token); a resumed request
            # has emitted its last token already, which is the next root
            n = min(self._prefill_target(r) - r.kv_len, budget)
            if n > 0:
                chunks.append((r, r.kv_len, n))
                budget -= n
            if budget <= 0:
                break
        self._prefill_ran = bool(chunks)
        if not chunks:
            return []
        rows = np.array([r.row for r, _, _ in chunks])
        start = np.array([s for _, s, _ in chunks])
        n = np.array([k for _, _, k in chunks])
        pos = np.concatenate([np.arange(s, s + k) for s, k in zip(start, n, strict=True)])
        toks = np.concatenate([np.asarray(r.tokens[s:s + k], np.int64) for r, s, k in chunks])
        meta = attn_meta(self.blocks, rows, start + n, n, pos, causal_qpos=pos, device=self.device)
        tok_t = torch.from_numpy(toks).to(self.device)
        pos_t = torch.from_numpy(pos).to(self.device)
        first = [i for i, (r, s, k) in enumerate(chunks) if not r.output and s + k == len(r.tokens)]
        last_rows = torch.from_numpy(np.cumsum(n)[first] - 1).to(self.device)
        logits = self.target.forward_packed(tok_t, pos_t, meta, self.cache, last_rows)
        if self.drafter is not None:
            self.drafter.prefill(meta, tok_t, pos_t, rows=rows, start=start, n=n)
            self.drafter.kv_len[rows] = start + n
        for r, s, k in chunks:
            r.kv_len = s + k
        self._stats["prefill_tokens"] += int(n.sum())
        if self._it is not None:
            self._it.prefill_chunks = [(int(k), int(s)) for _, s, k in chunks]
        if not first:
            return []
        done: list[RequestOutput] = []
        reqs = [chunks[i][0] for i in first]
        token = self._sample(reqs, logits)
        for r, t in zip(reqs, token.tolist(), strict=True):
            self._just_prefilled.add(r.id)
            self._stats["generated_tokens"] += 1
            if self._deliver(r, [t]) is not None:
                done.append(r.snapshot())
        return done

    def _prefill_target(self, r: _Request) -> int:
        return len(r.tokens) if not r.output else len(r.tokens) - 1

    def _decode(self) -> list[RequestOutput]:
        # requests whose first token came from this step's prefill decode from the next step on (as the simulator)
        ready = [r for r in self.running if r.kv_len == len(r.tokens) - 1 and r.id not in self._just_prefilled]
        if not ready:
            return []
        bm = self.blocks
        reserve = self._lookahead(len(ready))
        scratch = 1
        keys = np.array([r.seq for r in ready], np.int64)
        self.policy.set_batch(keys)  # before the plan: an adaptive plan depends on who is in the batch
        plan = self.policy.plan(len(ready))
        if plan.depth > 0:
            scratch = ModelDrafter.scratch_tokens(plan.depth, plan.k)
        while True:
            rows = np.array([r.row for r in ready])
            kv = np.array([r.kv_len for r in ready], np.int64)
            if bm.shortfall(rows, kv + scratch) == 0:
                break
            if len(self.running) == 1:
                raise RuntimeError("the KV pool cannot hold a single request's step")
            gone = self._preempt_last()
            ready = [r for r in ready if r is not gone]
            if not ready:
                return []
        bm.grow(rows, kv + scratch)
        B = len(ready)
        if B < len(keys):  # preemption took some: the plan can only get shallower than the scratch reserved
            self.policy.set_batch(np.array([r.seq for r in ready], np.int64))
        roots = np.array([r.tokens[-1] for r in ready], np.int64)

        t0 = time.perf_counter()
        if self.drafter is not None:
            self.drafter.begin_step(rows, kv, [r.tokens for r in ready])
        forest = draft(self.drafter, self.policy, roots, kv)
        selection = self.policy.select(forest)
        temps = np.array([r.params.temperature for r in ready])
        if len(selection) == 0:  # nothing to verify but the roots: a plain decoding step
            t1 = time.perf_counter()
            result, tree_tokens = self._plain_step(ready, rows, kv, roots, temps), B
            emitted = [result.bonus[b:b + 1] for b in range(B)]
        else:
            batch = pack(forest, selection)
            sizes = batch.tree_sizes
            if bm.shortfall(rows, kv + sizes) > 0:  # pool short: cut trees to what each request can hold
                cap = bm.grow_partial(rows, kv + sizes) - kv
                selection = _truncate(selection, forest.num_slots, cap)
                batch = pack(forest, selection)
                sizes = batch.tree_sizes
            bm.grow(rows, kv + sizes)
            t1 = time.perf_counter()
            result = self._tree_step(ready, rows, kv, batch, temps)
            tree_tokens = batch.num_tokens
            emitted = result.emitted(batch)
        t2 = time.perf_counter()
        if self.drafter is not None:  # an EAGLE-3 head keeps the target's states of the accepted tokens
            self.drafter.after_verify(rows, kv, result.accept_index)
        if self.records_path is not None and len(selection):  # bookkeeping: outside the target's time
            self._records.append(step_records(forest, batch, result, self._stats["decode_steps"],
                                              np.array([r.seq for r in ready])))
        accepted = batch.node[result.accepted_nodes()] if len(selection) else np.zeros(0, np.int64)
        self.policy.observe(forest, selection, result.accept_len, accepted)
        drafted = forest.stop_depth if forest.stop_depth is not None and forest.num_slots else np.zeros(B, np.int32)
        depths = int(drafted.max(initial=0))
        self._step_obs = dict(batch_size=B, verify_tokens=int(tree_tokens), verify_ms=(t2 - t1) * 1e3,
                              draft_depths=depths, draft_ms=(t1 - t0) * 1e3,
                              draft_rows=float(sum(draft_rows(drafted, depth_widths(forest.max_depth, forest.k1,
                                                                                     forest.k)))) if depths else 0.0)
        st = self._stats
        st["decode_steps"] += 1
        st["draft_ms"] += (t1 - t0) * 1e3
        st["target_ms"] += (t2 - t1) * 1e3
        st["verify_tokens"] += tree_tokens
        st["verified_accepted"] += int(result.accept_len.sum())
        if self._it is not None:
            it = self._it
            it.draft_ms, it.target_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3
            it.verify_tokens = batch.tree_sizes.copy() if len(selection) else np.ones(B, np.int64)
            it.context_lens, it.accepted = kv.copy(), int(result.accept_len.sum())
            it.draft_rows = draft_rows(forest.stop_depth, depth_widths(forest.max_depth, forest.k1, forest.k)) \
                if self.drafter is not None else ()
        return self._emit(ready, emitted, result.accept_len, reserve)

    def _coins(self, ready, temps, width: int) -> torch.Tensor:
        """[B, width] uniforms from each sampled request's own generator (zeros for greedy requests)."""
        u = np.zeros((len(ready), width))
        for b in np.nonzero(temps > 0)[0]:
            u[b] = ready[b].rng.random(width)
        return torch.from_numpy(u).to(self.device)

    def _sample(self, reqs, logits: torch.Tensor) -> torch.Tensor:
        """One token per request from its logits row: argmax, or temperature / top-p with its own generator."""
        temps = np.array([r.params.temperature for r in reqs])
        if (temps <= 0).all():
            return logits.argmax(dim=-1)
        top_p = np.array([r.params.top_p for r in reqs])
        probs = target_probs(logits, torch.from_numpy(temps).to(self.device), torch.from_numpy(top_p).to(self.device))
        u = self._coins(reqs, temps, 1)
        return (probs.cumsum(dim=1) <= u).sum(dim=1).clamp(max=probs.shape[1] - 1)

    def _plain_step(self, ready, rows, kv, roots, temps) -> VerifyResult:
        """Every request verifies its root alone: one token each, no tree, nothing to commit."""
        B = len(ready)
        meta = attn_meta(self.blocks, rows, kv + 1, np.ones(B, np.int64), kv, causal_qpos=kv, device=self.device)
        logits = self.target.forward_packed(torch.from_numpy(roots).to(self.device),
                                            torch.from_numpy(kv).to(self.device), meta, self.cache)
        bonus = self._sample(ready, logits)
        idx = np.arange(B, dtype=np.int64)
        return VerifyResult(accept_len=np.zeros(B, np.int64), accept_index=idx[:, None], last=idx,
                            bonus=bonus.cpu().numpy().astype(np.int64))

    def _tree_step(self, ready, rows, kv, batch, temps) -> VerifyResult:
        """One target forward over the packed trees (tree masks), verification, and the commit of the accepted
        paths' K/V."""
        ti = tree_index(batch)
        sizes, qo, T = batch.tree_sizes, batch.qo_indptr, batch.num_tokens
        meta = attn_meta(self.blocks, rows, kv + sizes, sizes, kv[ti.req] + ti.local, visible_len=kv,
                         pair_q=qo[ti.mask_req] + ti.mask_row, pair_k=kv[ti.mask_req] + ti.mask_col,
                         device=self.device)
        logits = self.target.forward_packed(torch.from_numpy(batch.tokens[:T]).to(self.device),
                                            torch.from_numpy(batch.positions[:T]).to(self.device), meta, self.cache)
        if (temps <= 0).all() and self.verify_backend == "auto" and self.device.type == "cpu":
            result = verify_greedy_np(batch, logits.argmax(dim=-1).numpy())  # fewest ops on a CPU
            self._commit(rows, kv, ti, result)
            return result
        tt = tree_tensors(batch, ti, self.device)
        if (temps <= 0).all():
            res = verify_greedy(tt, logits.argmax(dim=-1))
        else:
            top_p = np.array([r.params.top_p for r in ready])
            probs = target_probs(logits, torch.from_numpy(temps[ti.req]).to(self.device),
                                 torch.from_numpy(top_p[ti.req]).to(self.device))
            u = self._coins(ready, temps, tt.max_depth + 2)
            res = verify_sampling(tt, probs, u[:, :-1], u[:, -1])
        result = res.numpy()
        self._commit(rows, kv, ti, result)
        return result

    def _commit(self, rows, kv, ti, result) -> None:
        """Move each accepted node's K/V from its tree slot (kv_len + local index) to kv_len + depth."""
        acc = result.accept_index[:, 1:]
        b, d = np.nonzero(acc >= 0)
        if not len(b):
            return
        node = acc[b, d]
        src = self.blocks.slots(rows[b], kv[b] + ti.local[node])
        dst = self.blocks.slots(rows[b], kv[b] + d + 1)
        move = src != dst
        if move.any():
            s = torch.from_numpy(src[move]).to(self.device)
            t = torch.from_numpy(dst[move]).to(self.device)
            self.cache.copy_slots(s, t)

    def _emit(self, ready, emitted, accept_len, reserve) -> list[RequestOutput]:
        done = []
        keep_rows, keep_len = [], []
        for b, r in enumerate(ready):
            a = int(accept_len[b])
            r.kv_len += 1 + a
            new = emitted[b].tolist()
            reason = self._deliver(r, new, verified=True)
            if reason is None:
                keep_rows.append(r.row)
                keep_len.append(r.kv_len + reserve)
            else:
                done.append(r.snapshot())
        if keep_rows:  # drop blocks beyond the next step's needs
            self.blocks.trim(np.array(keep_rows), np.array(keep_len))
        return done

    def _deliver(self, r: _Request, new: list[int], verified: bool = False) -> str | None:
        """Append a request's new tokens (cut at a stop token or max_new_tokens), stream them, and finish it if
        that ends it; a verify step's tokens also count toward the speculation statistics. Returns the finish
        reason, or None while it goes on."""
        new = new[:r.params.max_new_tokens - len(r.output)]
        reason = None
        for i, t in enumerate(new):
            if t in r.stop:
                new, reason = new[:i + 1], "stop"
                break
        if reason is None and len(r.output) + len(new) >= r.params.max_new_tokens:
            reason = "length"
        if verified:
            st = self._stats
            r.verify_ct += 1
            r.accepted += len(new) - 1
            st["request_verifies"] += 1
            st["accepted_drafts"] += len(new) - 1
            st["generated_tokens"] += len(new)
        r.tokens.extend(new)
        r.output.extend(new)
        if r.first_token_s is None:
            r.first_token_s = self.clock()
        if reason is not None:
            self._release(r)
            self._finish(r, reason)
        if r.on_tokens is not None:
            r.on_tokens(r.snapshot(), new)
        return reason


def _truncate(selection: np.ndarray, num_slots: int, cap: np.ndarray) -> np.ndarray:
    """Keep each request's first cap-1 selected nodes (slot order is depth order, so still ancestor-closed)."""
    req = selection // num_slots
    first = np.searchsorted(req, req)
    return selection[(np.arange(len(selection)) - first) < np.maximum(cap[req] - 1, 0)]

"""The ECHO worker: SGLang's STANDALONE worker whose tree is chosen by an echosim.spec policy object.

Per decode step (one batch), in EchoDraftWorker.draft:
1. Draft depth by depth with SGLang's own draft loop pieces (select_top_k_tokens: EAGLE-2 beams, the same slot
   layout as echosim.spec.forest), the draft model forward of every beam node of the batch at once. After each
   depth the candidates go into a DraftForest and the POLICY gates (policy.gate): a gated request stops drafting.
   SGLang drafts the whole batch with one shape, so its later rows are still computed but masked out: their
   probabilities are zeroed (no descendant can be chosen) and the forest marks them never drafted.
2. The POLICY selects (policy.select: batch-wide, under its budget), echosim.spec.pack packs (Flatten & Pack) and
   to_dense pads every request to SGLang's speculative_num_draft_tokens N with unreachable nodes (linked from no
   retrieve_next_token / retrieve_next_sibling, so verification can never accept them).
3. That dense batch becomes SGLang's EagleVerifyInput; SGLang verifies (its target forward, its verify_tree_greedy),
   commits and runs its draft extend, unchanged.
4. The policy learns from the step (EchoWorker): `policy.observe` gets the forest, the selection and the nodes
   SGLang's verify accepted (its accept_index, mapped back through the pack); `policy.observe_step` the measured
   times of the step's draft (draft forwards, selection, pack), verify (the target's forward and SGLang's greedy
   verify) and the rest of the decode step (the draft extend); `policy.set_batch` the batch's requests (stable ids)
   before the plan. That is how the online-adaptive budget (echosim/spec/adaptive.py; the shipped policy-echo.json)
   runs here, the same code as in echo's engine and the simulator.
No policy logic lives here. With ECHO_SGLANG_RECORDS=PATH each step appends one JSON line: request ids, the tree
size the policy selected (root included), whether it was gated, the drafts SGLang accepted, and for an adaptive
policy its step summary (Adaptive.last). With ECHO_SGLANG_RECORD_TREES=1 too, each request's selected tree itself:
its root token and the selected nodes as [forest slot, parent slot (-1: the root), token] (tests check that
SGLang's accepted tokens walk exactly these trees).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sglang.kernels.ops.speculative.spec_tree import TreeMaskMode
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context
from sglang.srt.runtime_context import get_spec
from sglang.srt.speculative.eagle_info import EagleVerifyInput
from sglang.srt.speculative.eagle_utils import per_step_draft_out_cache_loc
from sglang.srt.speculative.eagle_worker_common import prepare_for_draft
from sglang.srt.speculative.spec_utils import renorm_draft_probs, select_top_k_tokens
from sglang.srt.speculative.standalone_worker_v2 import StandaloneDraftWorker, StandaloneWorkerV2
from sglang.srt.utils.common import fast_topk

from echosim.spec.adaptive import Adaptive
from echosim.spec.drafting import depth_widths, draft_rows
from echosim.spec.forest import MAX_LOGP, MIN_LOGP, DraftForest, slot_layout
from echosim.spec.pack import pack, to_dense
from echosim.spec.policies import ConfigError, Policy, load_policy, make_policy

logger = logging.getLogger(__name__)


def policy_from_env(draft_dir: str | None, num_draft_tokens: int | None = None, ragged: bool = False) -> Policy:
    """The policy named by ECHO_SGLANG_POLICY (default echo) with ECHO_SGLANG_POLICY_CONFIG (a JSON file or an
    inline JSON object); without a config, the draft directory's policy-NAME.json when there is one. An
    online-adaptive policy runs as such: with dense verify (`num_draft_tokens` N given, not `ragged`) its verify
    cost prior is flat in the selection (dense_verify_time), since SGLang verifies N tokens a request whatever it
    selects; with ragged verify, the generic prior in verified tokens, fitted online either way."""
    name = os.environ.get("ECHO_SGLANG_POLICY") or "echo"
    config = os.environ.get("ECHO_SGLANG_POLICY_CONFIG")
    if config and config.lstrip().startswith("{"):
        policy = make_policy(name, json.loads(config))
    elif config:
        policy = load_policy(config)
        if policy.name != name and os.environ.get("ECHO_SGLANG_POLICY"):
            raise ConfigError(f"{config}: policy {policy.name!r} but --speculative-echo-policy {name!r}")
    else:
        shipped = Path(draft_dir or "") / f"policy-{name}.json"
        policy = load_policy(shipped) if draft_dir and shipped.is_file() else make_policy(name)
    if isinstance(policy, Adaptive) and policy.step_time is None and num_draft_tokens and not ragged:
        policy.bind(dense_verify_time(num_draft_tokens))
    return policy


def dense_verify_time(num_draft_tokens: int):
    """The adaptive budget's verify-cost prior under SGLang's dense verify: a step that drafts runs N tokens a
    request through the target whatever the policy selected, so its cost is flat in the selection; a step the
    plan leaves undrafted (plain decoding: `tokens` <= the batch size) runs one (EchoWorker switches SGLang to its
    1-token verify). The shape is the generic prior of echosim.spec.adaptive (10 ms + 0.1 ms a token); its scale
    and offset are fitted online. Within a drafting step a smaller selection saves no verify time; drafting itself
    costs its forwards, which the budget weighs, and not drafting saves both."""
    N = float(num_draft_tokens)

    def step_ms(tokens, batch_size):
        b = max(int(batch_size), 1)
        t = np.asarray(tokens, np.float64)
        return 10.0 + 0.1 * b * np.where(t <= b, 1.0, N)

    step_ms.table = {"dense_tokens_per_request": int(N)}  # type: ignore[attr-defined]
    return step_ms


def check_shape(policy: Policy, steps: int, topk: int, num_draft_tokens: int) -> None:
    """The policy's tree must fit SGLang's drafting shape (steps, topk) and dense width N."""
    plan = policy.plan(1)
    if plan.depth > steps or (plan.depth > 0 and (plan.k != topk or plan.k1 != topk)):
        raise ConfigError(f"policy {policy.name!r} drafts depth {plan.depth}, root width {plan.k1}, width "
                          f"{plan.k}; SGLang runs --speculative-num-steps {steps} --speculative-eagle-topk {topk} "
                          "(set them to the policy's steps and topk)")
    most = policy.max_tree_tokens()
    if most is not None and most > num_draft_tokens:
        raise ConfigError(f"policy {policy.name!r} verifies up to {most} tokens per request; "
                          f"--speculative-num-draft-tokens is {num_draft_tokens}")


class ForestBuilder:
    """Fills a DraftForest depth by depth from SGLang's per-depth draft outputs (probabilities, tokens, beams)."""

    def __init__(self, root_token: np.ndarray, kv_len: np.ndarray, topk: int, steps: int):
        B = len(root_token)
        slot_depth, slot_rank, off = slot_layout(topk, topk, steps)
        S = int(off[-1])
        self.off, self.topk = off, topk
        self.forest = DraftForest(
            root_token=root_token, kv_len=kv_len, token=np.zeros((B, S), np.int64),
            logp=np.full((B, S), MIN_LOGP, np.float32), score=np.full((B, S), -np.inf),
            parent=np.full((B, S), -1, np.int32), valid=np.zeros((B, S), bool), slot_depth=slot_depth,
            slot_rank=slot_rank, depth_offsets=off, k1=topk, k=topk, stop_depth=np.zeros(B, np.int32),
            gated=np.zeros(B, bool), beam_slot=np.full((B, steps, topk), -1, np.int32),
            beam_score=np.full((B, steps, topk), -np.inf))

    def add_depth(self, depth: int, rows: np.ndarray, probs: np.ndarray, tokens: np.ndarray,
                  beam_slots: np.ndarray) -> np.ndarray:
        """Candidates of `depth` for the drafting `rows` (probs: SGLang's cumulative path probabilities
        [B, width]; beam_slots: the slots of SGLang's beam at this depth, best first). Returns the beam's log
        scores of those rows."""
        f, k = self.forest, self.topk
        lo, hi = int(self.off[depth - 1]), int(self.off[depth])
        with np.errstate(divide="ignore"):
            path = np.log(probs[rows].astype(np.float64))
        if depth == 1:
            parent = np.full((len(rows), hi - lo), -1, np.int32)
            above = np.zeros_like(path)
        else:
            parent = np.repeat(f.beam_slot[rows, depth - 2], k, axis=1)
            above = np.repeat(f.beam_score[rows, depth - 2], k, axis=1)
        # a child's score stays strictly below its parent's (the forest's invariant): clip each step's log-prob
        logp = np.clip(path - above, MIN_LOGP, MAX_LOGP)
        score = above + logp
        beam = np.take_along_axis(score, beam_slots[rows].astype(np.int64) - lo, axis=1)
        f.token[rows, lo:hi] = tokens[rows]
        f.logp[rows, lo:hi] = logp
        f.score[rows, lo:hi] = score
        f.parent[rows, lo:hi] = parent
        f.valid[rows, lo:hi] = True
        f.stop_depth[rows] = depth
        f.beam_slot[rows, depth - 1] = beam_slots[rows]
        f.beam_score[rows, depth - 1] = beam
        return beam


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").numpy()


def _sync(device) -> None:
    """Wait for the device's queued work, so wall-clock times are the work's (a no-op on the CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


_KEYS = itertools.count(1)


def request_keys(reqs) -> np.ndarray:
    """Stable int ids of SGLang's requests (policy.set_batch), kept on SGLang's Req objects."""
    out = np.empty(len(reqs), np.int64)
    for i, r in enumerate(reqs):
        k = getattr(r, "_echo_key", None)
        if k is None:
            k = r._echo_key = next(_KEYS)
        out[i] = k
    return out


@dataclass
class PendingStep:
    """What the policy drafted and selected this step, for its observe once SGLang has verified it."""

    forest: DraftForest
    selection: np.ndarray
    node: np.ndarray       # packed batch: forest node of each packed token (-1: root)
    qo_indptr: np.ndarray  # packed batch: first token of each request
    verify_tokens: int     # tokens the target's verify forward runs (B x N dense; the trees' sizes ragged)
    draft_ms: float
    verify_ms: float = 0.0


def accepted_nodes(step: PendingStep, accept_index: np.ndarray, accept_lens: np.ndarray, N: int) -> np.ndarray:
    """Forest nodes SGLang's verify accepted: its accept_index holds dense node indices b*N + local (the root
    first, -1 past each request's accept length, the bonus token counted in accept_lens); a dense request's local
    index is its packed one (to_dense keeps the order), and the pack maps packed tokens to forest nodes."""
    B, W = accept_index.shape
    col = np.arange(W)[None, :]
    hit = (col >= 1) & (col < accept_lens[:, None])
    local = accept_index - (np.arange(B) * N)[:, None]
    return np.sort(step.node[(step.qo_indptr[:B, None] + local)[hit]])


def selected_trees(forest: DraftForest, selection: np.ndarray) -> list[dict]:
    """Per request the tree handed to SGLang (records only): root token and [slot, parent slot, token] of each
    selected node, in slot order."""
    B, S = forest.token.shape
    req, slot = selection // S, selection % S
    rows = np.stack([slot, forest.parent[req, slot], forest.token[req, slot]], axis=1).tolist()
    bounds = np.searchsorted(req, np.arange(B + 1))
    return [{"root": int(forest.root_token[b]), "nodes": rows[bounds[b]:bounds[b + 1]]} for b in range(B)]


@dataclass
class RaggedPlan:
    """A step's packed layout for ragged verify: which of the dense B*N tokens are real tree nodes (in order), each
    request's tree size, and the per-request n x n tree masks concatenated (echosim.spec.pack's ragged mask)."""

    keep: torch.Tensor
    lens: torch.Tensor
    mask: torch.Tensor


class EchoDraftWorker(StandaloneDraftWorker):
    """STANDALONE's draft worker; draft() asks the policy (set by EchoWorker) for gating and selection."""

    policy: Policy
    records: Path | None = None
    last_step: dict | None = None
    record_trees: bool = False
    ragged: bool = False
    ragged_plan: RaggedPlan | None = None
    pending: PendingStep | None = None

    def draft(self, batch, *, with_topology: bool = False):
        if with_topology:
            raise NotImplementedError("ECHO does not support pipeline-parallel relays (with_topology)")
        draft_input = batch.spec_info
        forward_batch, _, kv_loc_plan = prepare_for_draft(
            draft_input, self.req_to_token_pool, batch, None, self.draft_runner, self.topk,
            self.speculative_num_steps, target_translator=self.target_worker.model_runner.kv_index_translator,
            num_draft_tokens=self.speculative_num_draft_tokens)
        if forward_batch.forward_mode.is_idle():
            return super().draft(batch)
        t0 = time.perf_counter()
        self.policy.set_batch(request_keys(batch.reqs))  # before the plan: an adaptive plan follows the batch
        if self.speculative_num_steps > 1:
            self.draft_attn_backend.init_forward_metadata(forward_batch)
            forward_batch.mark_forward_metadata_ready()
        forest = self.draft_forest(forward_batch, _np(draft_input.bonus_tokens), _np(batch.seq_lens))
        verify_input = self.verify_input(batch, forest)
        _sync(batch.seq_lens.device)
        self.pending.draft_ms = (time.perf_counter() - t0) * 1e3
        if kv_loc_plan is not None:
            verify_input.kv_loc_plan = kv_loc_plan
            verify_input.prepared_out_cache_loc = kv_loc_plan.write_virtual
        return verify_input

    def draft_forest(self, forward_batch, root_token: np.ndarray, kv_len: np.ndarray) -> DraftForest:
        """SGLang's multi-step draft (EagleDraftWorker.draft_forward, CPU/eager path), gated by the policy."""
        policy, topk, steps = self.policy, self.topk, self.speculative_num_steps
        spec_info = forward_batch.spec_info
        topk_p, topk_index, hidden_states = spec_info.topk_p, spec_info.topk_index, spec_info.hidden_states
        B = len(root_token)
        plan = policy.plan(B)
        if plan.depth > 0 and (plan.k != topk or plan.k1 != topk):  # a policy whose width follows the batch size
            raise ConfigError(f"policy {policy.name!r} plans width {plan.k1}/{plan.k} at batch {B}; SGLang drafts "
                              f"with topk {topk}")
        builder = ForestBuilder(root_token.astype(np.int64), kv_len.astype(np.int64), topk, steps)
        forest = builder.forest
        rows = np.flatnonzero(policy.start(B)) if plan.depth > 0 else np.zeros(0, np.int64)
        out_cache_loc = per_step_draft_out_cache_loc(forward_batch.out_cache_loc, forward_batch.batch_size, topk,
                                                     steps)
        depth_cap = min(plan.depth, steps)
        last = depth_cap if not policy.gates_last_depth else depth_cap + 1
        scores = None
        for i in range(steps):
            depth = i + 1
            input_ids, hidden_states, scores, tree_info = select_top_k_tokens(
                i, topk_p, topk_index, hidden_states, scores, topk)
            if len(rows) and depth <= depth_cap:
                probs = _np(tree_info[0].flatten(1).float())
                tokens = _np(tree_info[1])
                beam_slots = np.tile(np.arange(topk), (B, 1)) if i == 0 else _np(tree_info[2])
                beam_scores = builder.add_depth(depth, rows, probs, tokens, beam_slots)
                if depth < last:
                    keep = np.asarray(policy.gate(depth, rows, beam_scores, forest), dtype=bool)
                    if not keep.all():
                        forest.gated[rows[~keep]] = True
                        rows = rows[keep]
            if depth >= depth_cap or len(rows) == 0:  # nobody drafts deeper: the later steps are not run
                break
            # masked out: requests that stopped drafting get zero probability below this depth
            stopped = np.ones(B, bool)
            stopped[rows] = False
            if stopped.any():
                scores = scores.clone()
                scores[torch.from_numpy(stopped).to(scores.device)] = 0.0
            forward_batch.input_ids = input_ids
            forward_batch.out_cache_loc = out_cache_loc[i]
            spec_info.hidden_states = hidden_states
            with forward_context(ForwardContext(attn_backend=self.draft_attn_backend.attn_backends[i]),
                                 forward_batch=forward_batch):
                logits_output = self.draft_runner.forward(forward_batch).logits_output
            probs_t = renorm_draft_probs(logits_output.next_token_logits, forward_batch.sampling_info, False)
            topk_p, topk_index = fast_topk(probs_t, topk, dim=-1)
            forward_batch.positions.add_(1)
            hidden_states = logits_output.hidden_states
        return forest

    def verify_input(self, batch, forest: DraftForest) -> EagleVerifyInput:
        """The policy's selection, packed (echosim.spec.pack) and padded to N, as SGLang's EagleVerifyInput."""
        N = self.speculative_num_draft_tokens
        B, S = forest.token.shape
        selection = self.policy.select(forest)
        req = selection // S
        first = np.searchsorted(req, np.arange(B))
        keep = (np.arange(len(selection)) - first[req]) < N - 1  # slot order is depth order: stays ancestor-closed
        selection = selection[keep]
        batch_r = pack(forest, selection, check=False)
        dense = to_dense(batch_r, N)
        dev = batch.seq_lens.device
        if self.tree_mask_mode == TreeMaskMode.QLEN_ONLY:
            mask = torch.from_numpy(dense.mask.reshape(-1))
        else:  # FULL_MASK (GPU kernels): per request N rows over its prefix (all visible) and its N tree nodes
            seq = forest.kv_len
            mask = torch.from_numpy(np.concatenate([
                np.concatenate([np.ones((N, int(seq[i])), bool), dense.mask[i]], axis=1).ravel()
                for i in range(B)]))
        self.pending = PendingStep(forest=forest, selection=selection, node=batch_r.node,
                                   qo_indptr=np.asarray(batch_r.qo_indptr), draft_ms=0.0,
                                   verify_tokens=int(batch_r.num_tokens) if self.ragged else B * N)
        if self.records is not None:
            self.last_step = {"rids": [r.rid for r in batch.reqs],
                              "tree_tokens": (dense.is_pad == 0).sum(1).tolist(), "gated": forest.gated.tolist(),
                              "stop_depth": forest.stop_depth.tolist()}
            if isinstance(self.policy, Adaptive):
                self.last_step["adaptive"] = dict(self.policy.last) if forest.stop_depth.max(initial=0) else None
            if self.record_trees:
                self.last_step["trees"] = selected_trees(forest, selection)
        if self.ragged:  # the verify forward runs only the real nodes (EchoWorker.verify)
            self.ragged_plan = RaggedPlan(keep=torch.from_numpy(np.flatnonzero(~dense.is_pad.ravel())).to(dev),
                                          lens=torch.from_numpy(batch_r.tree_sizes).to(dev),
                                          mask=torch.from_numpy(batch_r.mask).to(dev))
        return EagleVerifyInput(
            draft_token=torch.from_numpy(dense.tokens.reshape(-1)).to(dev),
            custom_mask=mask.to(dev),
            positions=torch.from_numpy(dense.positions.reshape(-1)).to(dev),
            retrieve_index=torch.from_numpy(dense.retrive_index).to(dev),
            retrieve_next_token=torch.from_numpy(dense.retrive_next_token.astype(np.int64)).to(dev),
            retrieve_next_sibling=torch.from_numpy(dense.retrive_next_sibling.astype(np.int64)).to(dev),
            retrieve_cum_len=None, spec_steps=self.speculative_num_steps, topk=self.topk, draft_token_num=N,
            capture_hidden_mode=None, seq_lens_sum=None, seq_lens_cpu=None, draft_probs=None,
            prepared_out_cache_loc=None, prepared_mrope_positions=None)


def ragged_forward(dense_forward, plan: RaggedPlan, *args, forward_batch=None, **kwargs):
    """The target's verify forward over the real tree nodes only (T = sum of tree sizes tokens, no pads): the
    forward batch is compacted, the attention backend reads the ragged layout from spec_info.echo_ragged (the
    plugin's hook on intel_amx's extend metadata), and the logits go back to SGLang's dense [B*N] rows (pads get
    zero logits: no retrieve link reaches them, so verification never reads them as a parent)."""
    fb = forward_batch
    dense = fb.input_ids, fb.positions, fb.out_cache_loc
    keep = plan.keep
    fb.input_ids, fb.positions, fb.out_cache_loc = (t[keep] for t in dense)
    fb.spec_info.echo_ragged = plan
    try:
        out = dense_forward(*args, forward_batch=fb, **kwargs)
    finally:
        fb.input_ids, fb.positions, fb.out_cache_loc = dense
        fb.spec_info.echo_ragged = None
    lo = out.logits_output
    logits = lo.next_token_logits
    full = logits.new_zeros((dense[0].shape[0], logits.shape[-1]))
    full[keep] = logits
    lo.next_token_logits = full
    if getattr(lo, "hidden_states", None) is not None:
        hs = lo.hidden_states.new_zeros((dense[0].shape[0], lo.hidden_states.shape[-1]))
        hs[keep] = lo.hidden_states
        lo.hidden_states = hs
    return out


def ragged_extend_metadata(original, backend, forward_batch, *args, **kwargs):
    """AROUND hook on IntelAMXAttnBackend._build_extend_metadata: a ragged ECHO verify extends each request by its
    own tree size, with the packed tree masks; everything else is SGLang's."""
    spec = forward_batch.spec_info
    plan = getattr(spec, "echo_ragged", None) if forward_batch.forward_mode.is_target_verify() else None
    if plan is None:
        return original(backend, forward_batch, *args, **kwargs)
    lens = plan.lens.to(torch.int32)
    start = (torch.cumsum(lens, 0) - lens).to(torch.int32)
    return forward_batch.seq_lens + lens, lens, start, plan.mask


class EchoWorker(StandaloneWorkerV2):
    def __init__(self, server_args, gpu_id, nccl_port, target_worker):
        super().__init__(server_args, gpu_id, nccl_port, target_worker)
        draft = self._draft_worker
        draft.__class__ = EchoDraftWorker
        spec = get_spec()
        draft.ragged = os.environ.get("ECHO_SGLANG_RAGGED", "0") == "1"
        if draft.ragged and self.device != "cpu" and str(self.device) != "cpu":
            raise ConfigError("ECHO_SGLANG_RAGGED=1 (ragged verify) needs echo's CPU kernels: it runs on a CPU only")
        draft.policy = policy_from_env(spec.speculative_draft_model_path, self.speculative_num_draft_tokens,
                                       draft.ragged)
        check_shape(draft.policy, self.speculative_num_steps, self.topk, self.speculative_num_draft_tokens)
        path = os.environ.get("ECHO_SGLANG_RECORDS")
        draft.records = Path(path) if path else None
        draft.record_trees = draft.records is not None and os.environ.get("ECHO_SGLANG_RECORD_TREES") == "1"
        logger.info("ECHO: policy %s", json.dumps(draft.policy.describe()))
        self.warm_shapes: set[tuple[int, int]] = set()
        # plain decoding steps (the plan drafts nothing for the whole batch) through SGLang's own 0-step state
        self.plain_steps = os.environ.get("ECHO_SGLANG_PLAIN_STEPS", "1") != "0"
        self.states: dict[bool, object] | None = None
        self.verify_ms = 0.0

    def use_plain_state(self, plain: bool) -> None:
        """SGLang's adaptive runtime states (the machinery of its --speculative-adaptive): the configured one
        (steps, N) for a drafting step; (0 steps, 1 token) for a plain decoding step, in which SGLang verifies each
        request's root alone (its trivial verify input) and draft-extends one token a request, so such a step costs
        what plain decoding costs, not a dense N-token verify."""
        if self.states is None:
            from sglang.srt.speculative.adaptive_runtime_state import SpecRuntimeState
            dw, runner = self._draft_worker, self._target_worker.model_runner
            spec = SpecRuntimeState(
                speculative_num_steps=self.speculative_num_steps,
                speculative_num_draft_tokens=self.speculative_num_draft_tokens,
                draft_attn_backend=dw.draft_attn_backend, cuda_graph_runner=dw.cuda_graph_runner,
                target_attn_backend=runner.attn_backend, target_graph_runner=runner.decode_cuda_graph_runner,
                draft_extend_attn_backend=dw.draft_extend_attn_backend,
                cuda_graph_runner_for_draft_extend=dw.cuda_graph_runner_for_draft_extend)
            self.states = {False: spec, True: self.build_adaptive_runtime_state(0, 1)}
        self.apply_runtime_state(self.states[plain])

    @property
    def policy(self) -> Policy:
        return self._draft_worker.policy

    def forward_batch_generation(self, batch, *args, **kwargs):
        """SGLang's step; after a decode step (draft, verify, draft extend) the policy gets its measured times.
        When the policy plans no drafting for the whole batch, the step is a plain decoding one (use_plain_state)."""
        decode = not (batch.forward_mode.is_extend() or batch.is_extend_in_batch or batch.forward_mode.is_idle())
        plain = False
        if decode and self.plain_steps and not (batch.spec_info is not None and batch.spec_info.is_verify_input()):
            self.policy.set_batch(request_keys(batch.reqs))
            plain = self.policy.plan(len(batch.reqs)).depth == 0
            if plain or self.states is not None:
                self.use_plain_state(plain)
        t0 = time.perf_counter()
        self.verify_ms = 0.0
        out = super().forward_batch_generation(batch, *args, **kwargs)
        draft = self._draft_worker
        step, draft.pending = draft.pending, None
        if plain:
            step = self.observe_plain(batch, out)
        if step is not None:
            _sync(self.device)
            total_ms = (time.perf_counter() - t0) * 1e3
            stop = step.forest.stop_depth
            depths = int(stop.max(initial=0))
            rows = float(sum(draft_rows(stop, depth_widths(depths, step.forest.k1, step.forest.k)))) if depths else 0.0
            # The first step of each (batch size, draft depth) in this process is a warm-up: SGLang and torch set
            # up per shape lazily (a first 5-deep draft at a new batch size took ~5 s here, later ones ~10-40 ms).
            # Its times would read as the step's cost for hundreds of steps (the fits forget slowly): left out.
            shape = (len(stop), depths)
            if shape not in self.warm_shapes:
                self.warm_shapes.add(shape)
                return out
            self.policy.observe_step(batch_size=len(stop), verify_tokens=step.verify_tokens,
                                     verify_ms=step.verify_ms, draft_depths=depths, draft_rows=rows,
                                     draft_ms=step.draft_ms,
                                     other_ms=max(total_ms - step.draft_ms - step.verify_ms, 0.0))
        return out

    def observe_plain(self, batch, out) -> PendingStep:
        """A plain decoding step, told to the policy as echo's engine tells it: an undrafted forest, the policy's
        (empty) selection, each request's root verified."""
        draft = self._draft_worker
        B = len(batch.reqs)
        forest = ForestBuilder(np.zeros(B, np.int64), _np(batch.seq_lens).astype(np.int64), self.topk,
                               self.speculative_num_steps).forest
        selection = self.policy.select(forest)
        accept_lens = _np(out.accept_lens).astype(np.int64)
        self.policy.observe(forest, selection, accept_lens - 1, np.zeros(0, np.int64))
        if draft.records is not None:
            with open(draft.records, "a") as f:
                f.write(json.dumps({"rids": [r.rid for r in batch.reqs], "tree_tokens": [1] * B,
                                    "gated": [False] * B, "stop_depth": [0] * B, "adaptive": None, "plain": True,
                                    # a plain step verifies each root alone (root token not at hand: -1)
                                    **({"trees": [{"root": -1, "nodes": []}] * B} if draft.record_trees else {}),
                                    "accepted": (accept_lens - 1).tolist(), "draft_ms": 0.0,
                                    "verify_ms": round(self.verify_ms, 3)}) + "\n")
        return PendingStep(forest=forest, selection=selection, node=np.zeros(0, np.int64),
                           qo_indptr=np.zeros(B + 1, np.int64), verify_tokens=B, draft_ms=0.0,
                           verify_ms=self.verify_ms)

    def verify(self, batch, *args, **kwargs):
        draft = self._draft_worker
        plan, draft.ragged_plan = draft.ragged_plan, None
        t0 = time.perf_counter()
        if plan is None:
            out = super().verify(batch, *args, **kwargs)
        else:
            target = self.target_worker
            dense_forward = target.forward_batch_generation
            target.forward_batch_generation = lambda *a, **kw: ragged_forward(dense_forward, plan, *a, **kw)
            try:
                out = super().verify(batch, *args, **kwargs)
            finally:
                del target.forward_batch_generation  # back to the class's method
        accept_lens = _np(out.accept_lens).astype(np.int64)  # a device-to-host copy: waits for the verify
        self.verify_ms = (time.perf_counter() - t0) * 1e3
        step = draft.pending
        if step is None:
            return out
        step.verify_ms = self.verify_ms
        accepted = accepted_nodes(step, _np(out.accept_index).astype(np.int64), accept_lens,
                                  self.speculative_num_draft_tokens)
        self.policy.observe(step.forest, step.selection, accept_lens - 1, accepted)
        if draft.records is not None and draft.last_step is not None:
            rec = dict(draft.last_step, accepted=(accept_lens - 1).tolist(), draft_ms=round(step.draft_ms, 3),
                       verify_ms=round(step.verify_ms, 3))
            with open(draft.records, "a") as f:
                f.write(json.dumps(rec) + "\n")
            draft.last_step = None
        return out

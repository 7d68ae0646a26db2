"""Tree verification, NumPy reference. The simulator uses these; the engine's torch versions are tested against them.

Greedy: walk from the root, accept the child whose token is the target's argmax at its parent; the bonus token
is the target's argmax at the last accepted node.
Sampling (lossless for top-k drafts, target-only): at the current node draw one coin u; walk the children in
sibling order keeping a running sum of the target's probabilities of their tokens; accept the first child where
u < running sum. If none is accepted, draw the bonus token from the target's distribution with the rejected
siblings' tokens zeroed. Each emitted token is thus exactly distributed as the target's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from echosim.spec.pack import VerifyBatch


@dataclass
class VerifyResult:
    accept_len: np.ndarray    # int64 [B]: accepted drafts (the bonus token not counted)
    accept_index: np.ndarray  # int64 [B, D+1]: batch index of the root and each accepted node, -1 after the end
    last: np.ndarray          # int64 [B]: batch index of the last accepted node (the root if none)
    bonus: np.ndarray         # int64 [B]: the token the target emits after the accepted path

    def accepted_nodes(self) -> np.ndarray:
        """Batch indices of accepted drafts (roots excluded), request-major."""
        return self.accept_index[:, 1:][self.accept_index[:, 1:] >= 0]

    def emitted(self, batch: VerifyBatch) -> list[np.ndarray]:
        """Per request: the tokens this step commits (accepted drafts, then the bonus)."""
        out = []
        for i in range(len(self.accept_len)):
            n = int(self.accept_len[i])
            out.append(np.r_[batch.tokens[self.accept_index[i, 1:n + 1]], self.bonus[i]].astype(np.int64))
        return out


def _result(batch: VerifyBatch, accepted: np.ndarray, bonus: np.ndarray) -> VerifyResult:
    B, T = batch.batch_size, batch.num_tokens
    nodes = np.nonzero(accepted[:T])[0]
    req = batch.request_of_token()[nodes]
    depth = batch.depth[nodes]
    max_depth = int(batch.depth[:T].max(initial=0))
    accept_index = np.full((B, max_depth + 1), -1, np.int64)
    accept_index[req, depth] = nodes
    accept_len = np.bincount(req, minlength=B) - 1
    last = accept_index[np.arange(B), accept_len]
    return VerifyResult(accept_len=accept_len.astype(np.int64), accept_index=accept_index, last=last,
                        bonus=np.asarray(bonus, dtype=np.int64))


def verify_greedy(batch: VerifyBatch, target_argmax: np.ndarray) -> VerifyResult:
    """target_argmax [T]: the target's most likely next token at every packed node."""
    T = batch.num_tokens
    target_argmax = np.asarray(target_argmax)
    roots = batch.qo_indptr[:-1]
    req = batch.request_of_token()
    pglobal = np.where(batch.parent[:T] >= 0, roots[req] + batch.parent[:T], -1)
    matched = np.zeros(T, bool)
    has_p = pglobal >= 0
    matched[has_p] = batch.tokens[:T][has_p] == target_argmax[pglobal[has_p]]
    accepted = np.zeros(T, bool)
    accepted[roots] = True
    depth = batch.depth[:T]
    for d in range(1, int(depth.max(initial=0)) + 1):
        cand = np.nonzero((depth == d) & matched)[0]
        cand = cand[accepted[pglobal[cand]]]
        if len(cand) == 0:
            break
        _, first = np.unique(pglobal[cand], return_index=True)  # one child per parent: the first in order
        accepted[cand[first]] = True
    res = _result(batch, accepted, np.zeros(batch.batch_size, np.int64))
    res.bonus = target_argmax[res.last].astype(np.int64)
    return res


def verify_sampling(batch: VerifyBatch, target_probs: np.ndarray, rng: np.random.Generator) -> VerifyResult:
    """target_probs [T, V]: the target's (already temperature/top-p processed) distribution at every node."""
    B, T = batch.batch_size, batch.num_tokens
    roots = batch.qo_indptr[:-1]
    accepted = np.zeros(T, bool)
    accepted[roots] = True
    cur = roots.astype(np.int64).copy()
    live = np.arange(B)
    rejected_all = np.zeros(B, bool)  # the walk ended on a node whose children were all rejected
    walked: list[tuple[np.ndarray, ...]] = []  # (request, node, rejected child token), for the residual
    while len(live):
        base = roots[live]
        child = batch.retrive_next_token[cur[live]].astype(np.int64)
        has_child = child >= 0
        live, base, child = live[has_child], base[has_child], child[has_child]
        if not len(live):
            break
        coin = rng.random(len(live))
        running = np.zeros(len(live))
        chosen = np.full(len(live), -1, np.int64)
        undecided = np.ones(len(live), bool)
        while undecided.any():
            idx = np.nonzero(undecided)[0]
            g = base[idx] + child[idx]
            tok = batch.tokens[g]
            running[idx] += target_probs[cur[live[idx]], tok]
            hit = coin[idx] < running[idx]
            chosen[idx[hit]] = g[hit]
            miss = idx[~hit]
            walked.append((live[miss], cur[live[miss]], batch.tokens[base[miss] + child[miss]]))
            nxt = batch.retrive_next_sibling[base[miss] + child[miss]].astype(np.int64)
            child[miss] = nxt
            undecided[idx[hit]] = False
            undecided[miss[nxt < 0]] = False
        ok = chosen >= 0
        rejected_all[live[~ok]] = True
        accepted[chosen[ok]] = True
        cur[live[ok]] = chosen[ok]
        live = live[ok]
    # Bonus: from the last node's distribution, minus the tokens of siblings rejected there.
    probs = target_probs[cur].astype(np.float64)
    for reqs, nodes, toks in walked:
        keep = rejected_all[reqs] & (nodes == cur[reqs])  # only rejections at the node the walk ended on
        probs[reqs[keep], toks[keep]] = 0.0
    probs /= probs.sum(axis=1, keepdims=True)
    u = rng.random(B)[:, None]
    bonus = np.minimum((np.cumsum(probs, axis=1) <= u).sum(axis=1), probs.shape[1] - 1)
    return _result(batch, accepted, bonus)


def verify_greedy_walk(next_token: np.ndarray, next_sibling: np.ndarray, tokens: np.ndarray,
                       target_argmax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SGLang's sequential walk over one layout of [B, N] arrays (dense, or one request at a time): from the root
    (index 0), take the first child in sibling order whose token is the target's argmax at the current node.
    Returns (accept_len [B], bonus [B]). A plain reference for the vectorized verify_greedy; pads, being linked
    to nothing, are never visited."""
    B = tokens.shape[0]
    accept_len = np.zeros(B, np.int64)
    bonus = np.zeros(B, np.int64)
    for b in range(B):
        cur = 0
        while True:
            child = next_token[b, cur]
            while child != -1 and tokens[b, child] != target_argmax[b, cur]:
                child = next_sibling[b, child]
            if child == -1:
                break
            cur = child
            accept_len[b] += 1
        bonus[b] = target_argmax[b, cur]
    return accept_len, bonus

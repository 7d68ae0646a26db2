"""Flatten & Pack: a selection becomes one kernel-compatible verify batch, in SGLang's layout.

Per request the root (last committed token) comes first, then its selected drafts in slot order (which is depth
order). Trees are described by flat index arrays, as SGLang's kernels take them: retrive_index (where each token
sits in the batch), retrive_next_token (first child: the smallest local index) and retrive_next_sibling (next
larger local index), both local to the request, -1 for none. The tree mask row of a node is its ancestors and itself.

Two layouts: ragged (request i owns qo_indptr[i]:qo_indptr[i+1]; only the total is padded, to a bucket) and dense
(every request padded to one N; pad nodes are linked to nothing, so verification can never accept them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from echosim.spec.forest import DraftForest


class PackError(ValueError):
    """A selection that cannot be packed (not ancestor-closed, out of range)."""


@dataclass
class VerifyBatch:
    """Ragged verify batch. Arrays of length T_pad >= T = qo_indptr[-1]; entries past T are bucket padding."""

    qo_indptr: np.ndarray            # int64 [B+1]
    tokens: np.ndarray               # int64 [T_pad]
    positions: np.ndarray            # int64 [T_pad]: kv_len + depth
    depth: np.ndarray                # int32 [T_pad]: 0 for roots
    parent: np.ndarray               # int32 [T_pad]: local index of the parent, -1 for roots and padding
    node: np.ndarray                 # int64 [T_pad]: flat forest index, -1 for roots and padding
    retrive_index: np.ndarray        # int64 [T_pad]
    retrive_next_token: np.ndarray   # int32 [T_pad]: local index of the first child, -1 none
    retrive_next_sibling: np.ndarray  # int32 [T_pad]: local index of the next sibling, -1 none
    mask: np.ndarray                 # bool: per request n_i x n_i row-major, concatenated (QLEN_ONLY)
    mask_indptr: np.ndarray          # int64 [B+1]
    kv_len: np.ndarray               # int64 [B]

    @property
    def batch_size(self) -> int:
        return len(self.qo_indptr) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.qo_indptr[-1])

    @property
    def tree_sizes(self) -> np.ndarray:
        return np.diff(self.qo_indptr)

    def request_of_token(self) -> np.ndarray:
        return np.repeat(np.arange(self.batch_size), self.tree_sizes)

    def request_mask(self, i: int) -> np.ndarray:
        n = int(self.tree_sizes[i])
        return self.mask[self.mask_indptr[i]:self.mask_indptr[i + 1]].reshape(n, n)

    def full_mask(self, i: int) -> np.ndarray:
        """SGLang's FULL mask for request i: n x (kv_len + n), every cached token visible."""
        n, kv = int(self.tree_sizes[i]), int(self.kv_len[i])
        return np.concatenate([np.ones((n, kv), bool), self.request_mask(i)], axis=1)


def pack(forest: DraftForest, selection: np.ndarray, pad_to: int = 1, check: bool = True) -> VerifyBatch:
    """Ragged pack of `selection` (sorted flat node indices). The total token count is rounded up to a multiple
    of `pad_to` (a CUDA-graph bucket); padding tokens belong to no request. `check=False` skips validating the
    selection (sorted, drafted, ancestor-closed): for a selection a policy's select() made, which guarantees it."""
    B, S = forest.token.shape
    sel = np.asarray(selection, dtype=np.int64)
    if check and len(sel) and (sel[0] < 0 or sel[-1] >= B * S or (np.diff(sel) <= 0).any()):
        raise PackError("selection must be strictly increasing flat node indices within the forest")
    req = sel // S if S else np.zeros(0, np.int64)
    if check and len(sel) and not forest.valid.ravel()[sel].all():
        raise PackError("selection contains a node that was never drafted")
    counts = np.bincount(req, minlength=B)
    sizes = counts + 1
    qo = np.zeros(B + 1, np.int64)
    np.cumsum(sizes, out=qo[1:])
    T = int(qo[-1])
    T_pad = -(-T // pad_to) * pad_to if pad_to > 1 else T
    roots = qo[:-1]
    # The k-th selected node sits after the k nodes before it and the roots of its request and those before.
    out = req + np.arange(1, len(sel) + 1)             # batch index of each selected node
    root_of = roots[req]                               # batch index of its request's root
    tok_req = np.repeat(np.arange(B), sizes)           # request of each token

    tokens = np.zeros(T_pad, np.int64)
    tokens[roots] = forest.root_token
    tokens[out] = forest.token.ravel()[sel]
    slot = sel - req * S
    depth = np.zeros(T_pad, np.int32)
    depth[out] = forest.slot_depth[slot]
    positions = np.zeros(T_pad, np.int64)
    positions[:T] = forest.kv_len[tok_req] + depth[:T]
    node = np.full(T_pad, -1, np.int64)
    node[out] = sel

    # Parent: find the parent's flat index in the (sorted) selection; its batch index is then out[pos].
    pslot = forest.parent.ravel()[sel]
    has_parent = pslot >= 0
    pflat = sel - slot + pslot
    pos = np.searchsorted(sel, pflat)
    pos_c = np.minimum(pos, max(len(sel) - 1, 0))
    if check and (has_parent & ((pos >= len(sel)) | (sel[pos_c] != pflat))).any():
        raise PackError("selection is not ancestor-closed: a node's parent is not selected")
    up_sel = np.where(has_parent, out[pos_c], root_of) if len(sel) else out
    up = np.full(T, -1, np.int64)                      # batch index of each token's parent, -1 for roots
    up[out] = up_sel
    parent = np.full(T_pad, -1, np.int32)
    parent[out] = up_sel - root_of

    # First child / next sibling. In the slot layout a parent's children occupy consecutive slots, so in a
    # selection (slot order) siblings are adjacent: runs of equal parent are sibling lists, no sort needed.
    next_token = np.full(T_pad, -1, np.int32)
    next_sibling = np.full(T_pad, -1, np.int32)
    if len(sel):
        pg, child, loc = up_sel, out, out - root_of
        first = np.empty(len(pg), bool)
        first[0] = True
        np.not_equal(pg[1:], pg[:-1], out=first[1:])
        next_token[pg[first]] = loc[first]
        if np.count_nonzero(next_token >= 0) < np.count_nonzero(first):  # a parent's children are not adjacent
            order = np.argsort(pg, kind="stable")  # (a hand-made forest without that layout)
            pg, child, loc = pg[order], out[order], loc[order]
            first = np.r_[True, pg[1:] != pg[:-1]]
            next_token[pg[first]] = loc[first]
        cont = ~first[1:]
        next_sibling[child[:-1][cont]] = loc[1:][cont]

    # Tree mask: row of each token = itself + its ancestors. Walk all tokens up one level per pass (a root is its
    # own parent, so finished walks stay put), then set every (token, ancestor) cell in one scatter.
    mask_indptr = np.zeros(B + 1, np.int64)
    np.cumsum(sizes * sizes, out=mask_indptr[1:])
    mask = np.zeros(int(mask_indptr[-1]), bool)
    tok_root = roots[tok_req]
    cell = mask_indptr[tok_req] + (np.arange(T) - tok_root) * sizes[tok_req] - tok_root  # + a column's batch index
    up[roots] = roots
    levels = int(depth[:T].max(initial=0))
    walk = np.empty((levels + 1, T), np.int64)
    walk[0] = np.arange(T)
    for level in range(1, levels + 1):
        np.take(up, walk[level - 1], out=walk[level])
    mask[(walk + cell).ravel()] = True
    up[roots] = -1

    return VerifyBatch(qo_indptr=qo, tokens=tokens, positions=positions, depth=depth, parent=parent, node=node,
                       retrive_index=np.arange(T_pad, dtype=np.int64), retrive_next_token=next_token,
                       retrive_next_sibling=next_sibling, mask=mask, mask_indptr=mask_indptr,
                       kv_len=forest.kv_len)


@dataclass
class DenseVerifyBatch:
    """Every request padded to N tokens: [B, N] arrays and a [B, N, N] mask. Pad nodes have is_pad True, attend
    only to themselves, and no next_token/next_sibling points at them."""

    tokens: np.ndarray
    positions: np.ndarray
    parent: np.ndarray
    is_pad: np.ndarray
    retrive_index: np.ndarray
    retrive_next_token: np.ndarray
    retrive_next_sibling: np.ndarray
    mask: np.ndarray
    kv_len: np.ndarray


def to_dense(batch: VerifyBatch, num_tokens: int | None = None, pad_token: int = 0) -> DenseVerifyBatch:
    """Pad a ragged batch to N tokens per request (default: the largest tree)."""
    B = batch.batch_size
    sizes = batch.tree_sizes
    N = int(sizes.max(initial=1)) if num_tokens is None else int(num_tokens)
    if B and sizes.max() > N:
        raise PackError(f"a request has {int(sizes.max())} tokens, more than the dense width N={N}")
    T = batch.num_tokens
    req = batch.request_of_token()
    local = np.arange(T) - batch.qo_indptr[req]
    is_pad = np.ones((B, N), bool)
    is_pad[req, local] = False

    def spread(values: np.ndarray, fill) -> np.ndarray:
        out = np.full((B, N), fill, dtype=values.dtype)
        out[req, local] = values[:T]
        return out

    positions = spread(batch.positions, 0)
    positions[is_pad] = np.repeat(batch.kv_len, N).reshape(B, N)[is_pad]
    mask = np.zeros((B, N, N), bool)
    mask[:, np.arange(N), np.arange(N)] = True
    for i in range(B):  # B small copies of n_i x n_i blocks; the ragged mask is the source of truth
        n = int(sizes[i])
        mask[i, :n, :n] = batch.request_mask(i)
    return DenseVerifyBatch(
        tokens=spread(batch.tokens, pad_token), positions=positions, parent=spread(batch.parent, -1),
        is_pad=is_pad, retrive_index=np.arange(B * N, dtype=np.int64).reshape(B, N),
        retrive_next_token=spread(batch.retrive_next_token, -1),
        retrive_next_sibling=spread(batch.retrive_next_sibling, -1), mask=mask, kv_len=batch.kv_len)

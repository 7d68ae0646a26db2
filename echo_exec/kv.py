"""KV block manager and attention metadata for the engine.

Every running request owns a *row* of the block table: the ids of the fixed-size blocks that hold its positions
(position p lives in slot `table[row, p // bs] * bs + p % bs`). The target and the draft model each have their own
KVCache with the same number of blocks, and both use this one mapping, so one allocation serves both.

Positions here are *cache* positions (where K/V sits), not RoPE positions: a verify writes the tree's nodes at
kv_len + local index (root first), and the accepted path is then copied to kv_len + depth (`commit_slots`).
Everything past a request's committed length is scratch: never visible through a mask, overwritten next step.
All block operations are NumPy over rows; no Python loop over requests.
"""

from __future__ import annotations

import numpy as np
import torch

from echo_exec.model import AttnMeta, ragged_groups


class OutOfBlocks(RuntimeError):
    """The pool has too few free blocks for an all-or-nothing allocation."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, max_rows: int, max_blocks_per_row: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV pool needs at least one block of at least one slot")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.max_blocks_per_row = max_blocks_per_row
        self._free = np.arange(num_blocks - 1, -1, -1, dtype=np.int64)  # a stack: the top is _free[_top - 1]
        self._top = num_blocks
        self.table = np.zeros((max_rows, max_blocks_per_row), np.int64)
        self.owned = np.zeros(max_rows, np.int64)  # blocks held per row

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, tokens) -> np.ndarray:
        return -(-np.asarray(tokens, np.int64) // self.block_size)

    def shortfall(self, rows: np.ndarray, need_tokens: np.ndarray) -> int:
        """Blocks missing for rows to hold need_tokens positions each (0 when it fits)."""
        extra = np.maximum(self.blocks_for(need_tokens) - self.owned[rows], 0)
        return max(int(extra.sum()) - self._top, 0)

    def grow(self, rows: np.ndarray, need_tokens: np.ndarray) -> None:
        """Give every row enough blocks for need_tokens positions; all or nothing (OutOfBlocks)."""
        rows = np.asarray(rows, np.int64)
        want = self.blocks_for(need_tokens)
        if (want > self.max_blocks_per_row).any():
            raise OutOfBlocks(f"a request needs {int(want.max())} blocks, more than a row holds "
                              f"({self.max_blocks_per_row})")
        extra = np.maximum(want - self.owned[rows], 0)
        total = int(extra.sum())
        if total == 0:
            return
        if total > self._top:
            raise OutOfBlocks(f"need {total} free KV blocks, {self._top} left")
        taken = self._free[self._top - total:self._top]
        self._top -= total
        has = extra > 0
        r, e = rows[has], extra[has]
        row_of = np.repeat(r, e)
        col = np.repeat(self.owned[r], e) + (np.arange(total) - np.repeat(np.cumsum(e) - e, e))
        self.table[row_of, col] = taken
        self.owned[r] += e

    def grow_partial(self, rows: np.ndarray, need_tokens: np.ndarray) -> np.ndarray:
        """Like grow, but rows in order take what is left when the pool runs short. Returns the positions each
        row can now hold."""
        rows = np.asarray(rows, np.int64)
        want = np.minimum(self.blocks_for(need_tokens), self.max_blocks_per_row)
        extra = np.maximum(want - self.owned[rows], 0)
        budget = np.minimum(np.cumsum(extra), self._top)
        extra = np.diff(np.r_[0, budget])
        self.grow(rows, (self.owned[rows] + extra) * self.block_size)
        return self.owned[rows] * self.block_size

    def trim(self, rows: np.ndarray, keep_tokens: np.ndarray) -> None:
        """Free the blocks of each row beyond those needed for keep_tokens positions."""
        rows = np.asarray(rows, np.int64)
        keep = np.minimum(self.blocks_for(keep_tokens), self.owned[rows])
        drop = self.owned[rows] - keep
        total = int(drop.sum())
        if total == 0:
            return
        has = drop > 0
        r, d, k = rows[has], drop[has], keep[has]
        col = np.repeat(k, d) + (np.arange(total) - np.repeat(np.cumsum(d) - d, d))
        freed = self.table[np.repeat(r, d), col]
        self._free[self._top:self._top + total] = freed
        self._top += total
        self.owned[r] = k

    def free_row(self, row: int) -> None:
        self.trim(np.array([row]), np.array([0]))

    def slots(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Slots of (row, position) pairs (broadcasting)."""
        positions = np.asarray(positions, np.int64)
        return self.table[rows, positions // self.block_size] * self.block_size + positions % self.block_size


def _to(a: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def attn_meta(bm: BlockManager, rows: np.ndarray, key_len: np.ndarray, q_count: np.ndarray,
              write_pos: np.ndarray, *, causal_qpos: np.ndarray | None = None,
              visible_len: np.ndarray | None = None, pair_q: np.ndarray | None = None,
              pair_k: np.ndarray | None = None, device="cpu") -> AttnMeta:
    """Attention metadata for B requests (table rows `rows`) with q_count[b] new tokens each, packed request by
    request. Request b's keys are its cache positions [0, key_len[b]); new token i is written at cache position
    write_pos[i]. Visibility, one of:
    - causal: causal_qpos[i] is query i's cache position; it sees every key at or before it (prefill chunks);
    - tree: query i sees the positions < visible_len[b] (the committed context) plus the explicit pairs
      (packed query pair_q[j] sees cache position pair_k[j]), e.g. its tree ancestors and itself."""
    B, T = len(rows), len(write_pos)
    bs = bm.block_size
    Tq, L = int(q_count.max()), int(key_len.max())
    req = np.repeat(np.arange(B), q_count)
    local = np.arange(T) - (np.cumsum(q_count) - q_count)[req]
    nb = -(-L // bs)
    gather = (bm.table[rows, :nb][:, :, None] * bs + np.arange(bs)).reshape(B, nb * bs)[:, :L]
    pos = np.arange(L)
    gather[pos >= key_len[:, None]] = 0
    query_index = np.zeros((B, Tq), np.int64)
    query_index[req, local] = np.arange(T)
    mask = np.empty((B, Tq, L), bool)
    if causal_qpos is not None:
        qpos = np.full((B, Tq), -1, np.int64)
        qpos[req, local] = causal_qpos
        np.less_equal(pos, qpos[:, :, None], out=mask)
    else:
        mask[:] = (pos < visible_len[:, None])[:, None, :]
        if pair_q is not None and len(pair_q):
            mask[req[pair_q], local[pair_q], pair_k] = True
    if T < B * Tq:  # padding query rows attend one key, so their softmax stays finite
        mask[:, :, 0] |= np.arange(Tq) >= q_count[:, None]
    rr = rows[req]
    write = bm.table[rr, write_pos // bs] * bs + write_pos % bs
    return AttnMeta(write_slots=_to(write, device), gather_slots=_to(gather, device),
                    query_index=_to(query_index, device), out_index=_to(req * Tq + local, device),
                    mask=_to(mask, device), groups=ragged_groups(q_count, key_len, gather, query_index, mask, device))

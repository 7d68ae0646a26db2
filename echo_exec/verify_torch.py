"""Tree verification in torch, on the model's device, without a Python loop over requests or tree levels.

Same rules as the NumPy reference (echosim/spec/verify.py), recast for tensors:
- every node p that has children gets a *chosen* child: greedy, the first child (sibling order) whose token is the
  target's argmax at p; sampling, the first child where the coin of p's level falls below the running sum of the
  target's probabilities of the children's tokens (coin[b, d]: request b's uniform at depth d);
- a node is accepted when it and all its ancestors are chosen (one dense ancestor-mask reduction): that is the walk
  from the root, since each node has at most one chosen child;
- the bonus token is the target's argmax at the last accepted node (greedy), or a draw from the target's
  distribution there with the tokens of its (all rejected) children zeroed (sampling).
Given the same coins, the result is the reference's exactly; tests/test_engine_verify.py checks it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from echosim.spec.pack import VerifyBatch
from echosim.spec.verify import VerifyResult


@dataclass
class TreeIndex:
    """NumPy index arrays of a packed batch, shared by attention (pairs) and verification (dense layout)."""

    B: int
    N: int                  # largest tree
    T: int
    req: np.ndarray         # [T] request of each packed token
    local: np.ndarray       # [T] index within its request (root = 0)
    parent_g: np.ndarray    # [T] packed index of the parent, -1 for roots
    mask_req: np.ndarray    # per True entry of the tree mask: request, row (local), column (local)
    mask_row: np.ndarray
    mask_col: np.ndarray


def tree_index(batch: VerifyBatch) -> TreeIndex:
    B, T = batch.batch_size, batch.num_tokens
    sizes = batch.tree_sizes
    roots = batch.qo_indptr[:-1]
    req = np.repeat(np.arange(B), sizes)
    local = np.arange(T) - roots[req]
    par = batch.parent[:T].astype(np.int64)
    parent_g = np.where(par >= 0, roots[req] + par, -1)
    m = batch.mask[:int(batch.mask_indptr[-1])]
    e_req = np.repeat(np.arange(B), sizes * sizes)
    within = np.arange(len(m)) - batch.mask_indptr[:-1][e_req]
    n_e = sizes[e_req]
    hit = np.nonzero(m)[0]
    return TreeIndex(B=B, N=int(sizes.max(initial=1)), T=T, req=req, local=local, parent_g=parent_g,
                     mask_req=e_req[hit], mask_row=(within // n_e)[hit], mask_col=(within % n_e)[hit])


def children_table(batch: VerifyBatch, ti: TreeIndex) -> np.ndarray:
    """[T, K] packed indices of each node's children in sibling order, -1 padding (K >= 1: the widest fan-out)."""
    T = ti.T
    roots = batch.qo_indptr[:-1]
    pg = ti.parent_g
    K = max(int(np.bincount(pg[pg >= 0], minlength=T).max(initial=0)), 1) if T else 1
    children = np.full((T, K), -1, np.int64)
    nxt = batch.retrive_next_token[:T].astype(np.int64)
    cur = np.where(nxt >= 0, roots[ti.req] + nxt, -1)
    for j in range(K):  # follow the sibling links: K is the widest fan-out (topk), not the batch
        children[:, j] = cur
        ok = cur >= 0
        sib = np.full(T, -1, np.int64)
        s = batch.retrive_next_sibling[cur[ok]].astype(np.int64)
        sib[ok] = np.where(s >= 0, roots[ti.req[ok]] + s, -1)
        cur = sib
    return children


@dataclass
class TreeTensors:
    """Device tensors of one packed batch for verification."""

    tokens: torch.Tensor    # [T] long
    depth: torch.Tensor     # [T] long
    req: torch.Tensor       # [T] long
    children: torch.Tensor  # [T, K] long, -1 padding
    dense: torch.Tensor     # [B, N] long packed index, 0 for padding
    valid: torch.Tensor     # [B, N] bool
    anc: torch.Tensor       # [B, N, N] bool: ancestor-or-self
    max_depth: int


def tree_tensors(batch: VerifyBatch, ti: TreeIndex, device) -> TreeTensors:
    B, N, T = ti.B, ti.N, ti.T
    dense = np.zeros((B, N), np.int64)
    valid = np.zeros((B, N), bool)
    dense[ti.req, ti.local] = np.arange(T)
    valid[ti.req, ti.local] = True
    anc = np.zeros((B, N, N), bool)
    anc[ti.mask_req, ti.mask_row, ti.mask_col] = True

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return TreeTensors(tokens=t(batch.tokens[:T].astype(np.int64)), depth=t(batch.depth[:T].astype(np.int64)),
                       req=t(ti.req.astype(np.int64)), children=t(children_table(batch, ti)), dense=t(dense),
                       valid=t(valid),
                       anc=t(anc), max_depth=int(batch.depth[:T].max(initial=0)))


@dataclass
class TorchVerifyResult:
    accept_len: torch.Tensor    # [B] accepted drafts (bonus not counted)
    accept_index: torch.Tensor  # [B, D+1] packed index of the root and each accepted node, -1 after the end
    last: torch.Tensor          # [B]
    bonus: torch.Tensor         # [B]

    def numpy(self) -> VerifyResult:
        return VerifyResult(accept_len=self.accept_len.cpu().numpy(), accept_index=self.accept_index.cpu().numpy(),
                            last=self.last.cpu().numpy(), bonus=self.bonus.cpu().numpy())


def _first_true(hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a [T, K] bool: (any, column of the first True)."""
    k = hit.shape[1]
    col = torch.where(hit, torch.arange(k, device=hit.device), k).min(dim=1).values
    return col < k, col.clamp(max=k - 1)


def _accept(tt: TreeTensors, chosen_child: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From each node's chosen child (-1 none): accept_len, accept_index, last."""
    T = tt.tokens.shape[0]
    B = tt.dense.shape[0]
    dev = tt.tokens.device
    chosen = torch.zeros(T + 1, dtype=torch.bool, device=dev)  # one spare slot takes the -1 writes
    chosen[torch.where(chosen_child >= 0, chosen_child, T)] = True
    chosen = chosen[:T] | (tt.depth == 0)                        # roots are always on the path
    ok_dense = chosen[tt.dense] & tt.valid
    path = ~(tt.anc & ~ok_dense[:, None, :]).any(dim=-1) & tt.valid  # node and all its ancestors chosen
    depth_dense = tt.depth[tt.dense]
    accept_len = torch.where(path, depth_dense, 0).max(dim=1).values
    accept_index = torch.full((B, tt.max_depth + 2), -1, dtype=torch.long, device=dev)
    col = torch.where(path, depth_dense, tt.max_depth + 1)        # off-path nodes land in the spare column
    accept_index.scatter_(1, col, torch.where(path, tt.dense, -1))
    accept_index = accept_index[:, :tt.max_depth + 1]
    last = accept_index.gather(1, accept_len[:, None])[:, 0]
    return accept_len, accept_index, last


def verify_greedy(tt: TreeTensors, target_argmax: torch.Tensor) -> TorchVerifyResult:
    """target_argmax [T] long: the target's most likely token at every packed node."""
    kids = tt.children
    has = kids >= 0
    safe = kids.clamp(min=0)
    hit = has & (tt.tokens[safe] == target_argmax[:, None])
    any_hit, col = _first_true(hit)
    chosen_child = torch.where(any_hit, safe.gather(1, col[:, None])[:, 0], -1)
    accept_len, accept_index, last = _accept(tt, chosen_child)
    return TorchVerifyResult(accept_len, accept_index, last, target_argmax[last])


def verify_sampling(tt: TreeTensors, probs: torch.Tensor, coins: torch.Tensor,
                    bonus_u: torch.Tensor) -> TorchVerifyResult:
    """probs [T, V] float64 (temperature/top-p applied); coins [B, D] float64: request b's uniform for the walk
    step from depth d (D >= the tree depth); bonus_u [B] float64: the uniform of the bonus draw."""
    kids = tt.children
    has = kids >= 0
    safe = kids.clamp(min=0)
    T = tt.tokens.shape[0]
    p_kid = torch.where(has, probs[torch.arange(T, device=probs.device)[:, None], tt.tokens[safe]], 0.0)
    running = p_kid.cumsum(dim=1)
    u = coins[tt.req, tt.depth.clamp(max=coins.shape[1] - 1)]
    any_hit, col = _first_true(has & (u[:, None] < running))
    chosen_child = torch.where(any_hit, safe.gather(1, col[:, None])[:, 0], -1)
    accept_len, accept_index, last = _accept(tt, chosen_child)
    # Bonus at the last node: if it has children, the walk rejected every one of them: zero their tokens.
    residual = probs[last].clone()
    lk = kids[last]
    rows = torch.arange(len(last), device=probs.device)[:, None].expand_as(lk)
    keep = lk >= 0
    residual[rows[keep], tt.tokens[lk[keep]]] = 0.0
    total = residual.sum(dim=1, keepdim=True)
    residual = torch.where(total > 0, residual / total.clamp(min=1e-300), probs[last])  # float-rounding guard
    bonus = (residual.cumsum(dim=1) <= bonus_u[:, None]).sum(dim=1).clamp(max=probs.shape[1] - 1)
    return TorchVerifyResult(accept_len, accept_index, last, bonus)

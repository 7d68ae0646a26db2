"""SGLang's speculative bookkeeping ops on the CPU: tree building, greedy tree verification, KV slot moves.

Same signatures and in-place semantics as the sgl_kernel CPU ops SGLang 0.5.23 calls (kernels/ops/speculative/*,
mem_cache/allocation.py, kvcache/cache_move.py); each is the definition of SGLang's Triton kernel of the same name,
vectorized over the batch: ragged per-request ranges become one flat (row, column) index, tree walks advance every
request one level per pass.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

FULL_MASK, QLEN_ONLY = 0, 1


def _ragged(start: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every position start[b] <= c < end[b], rows in order, columns ascending."""
    start, end = start.long(), end.long()
    lens = (end - start).clamp_min(0)
    rows = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens)
    first = torch.cumsum(lens, 0) - lens
    cols = start[rows] + torch.arange(len(rows), device=lens.device) - first[rows]
    return rows, cols


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                                 pool_len: int) -> None:
    """req_to_token[req_pool_indices[b], start[b]:end[b]] = the next run of out_cache_loc (requests in order)."""
    rows, cols = _ragged(start_offset, end_offset)
    req_to_token[req_pool_indices.long()[rows], cols] = out_cache_loc[:len(rows)].to(req_to_token.dtype)


def assign_extend_cache_locs_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                                 pool_len: int) -> None:
    """The inverse gather: out_cache_loc (requests in order) = req_to_token[req_pool_indices[b], start[b]:end[b]]."""
    rows, cols = _ragged(start_offset, end_offset)
    out_cache_loc[:len(rows)] = req_to_token[req_pool_indices.long()[rows], cols].to(out_cache_loc.dtype)


def assign_draft_cache_locs_contiguous_cpu(req_pool_indices, req_to_token, seq_lens, out_cache_loc, pool_len: int,
                                           topk: int, num_cols: int) -> None:
    """Request b's topk * num_cols draft slots: the req_to_token entries from seq_lens[b] on."""
    n = topk * num_cols
    cols = seq_lens.long()[:, None] + torch.arange(n, device=seq_lens.device)
    vals = req_to_token[req_pool_indices.long()[:, None], cols]
    out_cache_loc[:vals.numel()] = vals.reshape(-1).to(out_cache_loc.dtype)


def build_draft_decode_metadata_cpu(req_to_token, req_pool_indices, seq_lens, topk: int, num_steps: int,
                                    pool_len: int) -> torch.Tensor:
    """The req_to_token of the draft's multi-step decode: one row per (request, beam j), the request's prefix
    followed by branch j's draft slots (SGLang's layout: slot seq_len + j * num_steps + s of the request's row holds
    step s of branch j), so row (b, j) column seq_len + s is that slot."""
    rpi = req_pool_indices.long()
    B = len(rpi)
    out = req_to_token[rpi].repeat_interleave(topk, dim=0)
    seq = seq_lens.long()
    j = torch.arange(topk, device=seq.device)
    s = torch.arange(num_steps, device=seq.device)
    src = seq[:, None, None] + j[None, :, None] * num_steps + s[None, None, :]        # [B, topk, steps]
    vals = req_to_token[rpi[:, None, None], src]
    dst_row = (torch.arange(B, device=seq.device)[:, None] * topk + j[None, :])[:, :, None].expand_as(src)
    out[dst_row, (seq[:, None, None] + s[None, None, :]).expand_as(src)] = vals
    return out


def fill_bonus_tokens_cpu(accept_tokens, accept_lens, bonus_tokens, accept_stride: int) -> None:
    """bonus_tokens[b] = the last accepted token of request b (accept_lens counts the bonus)."""
    B = accept_lens.numel()
    at = torch.arange(B, device=accept_lens.device) * accept_stride + accept_lens.long() - 1
    bonus_tokens[:B] = accept_tokens.reshape(-1)[at].to(bonus_tokens.dtype)


def fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, accept_out_cache_loc) -> None:
    """Compact the KV slots of the accepted tokens (accept_index entries != -1, in order) to the front."""
    flat = accept_index.reshape(-1).long()
    vals = out_cache_loc[flat[flat != -1]]
    accept_out_cache_loc[:len(vals)] = vals.to(accept_out_cache_loc.dtype)


_views: dict[tuple[int, int, int], torch.Tensor] = {}


def _byte_rows(ptr: int, stride: int, rows: int) -> torch.Tensor:
    """A uint8 [rows, stride] view of the memory at ptr (a KV buffer the caller owns)."""
    key = (ptr, stride, rows)
    view = _views.get(key)
    if view is None:
        if len(_views) > 256:
            _views.clear()
        buf = (ctypes.c_uint8 * (rows * stride)).from_address(ptr)
        view = _views[key] = torch.frombuffer(buf, dtype=torch.uint8).view(rows, stride)
    return view


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc) -> None:
    """For every buffer (one per layer and K/V; data_ptrs and byte strides per slot), slot tgt_loc[i] = slot
    src_loc[i]; all sources are read before any target is written, as the Triton kernel does per tile."""
    if tgt_loc.numel() == 0:
        return
    tgt, src = tgt_loc.long(), src_loc.long()
    rows = int(max(tgt.max(), src.max())) + 1
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist(), strict=True):
        view = _byte_rows(int(ptr), int(stride), rows)
        view[tgt] = view[src]  # the right side is gathered into a new tensor first


def build_tree_kernel_efficient_cpu(parent_list, selected_index, verified_seq_len, tree_mask, positions,
                                    retrive_index, retrive_next_token, retrive_next_sibling, topk: int, depth: int,
                                    draft_token_num: int, tree_mask_mode: int) -> None:
    """EAGLE's tree from the draft's top candidates (sgl_build_tree_kernel_efficient_triton): node 0 is the root,
    node i >= 1 is candidate selected_index[b, i-1]; a candidate's parent is found through parent_list
    (selected // topk == 0: the root). Children link in increasing node order; the mask row of a node is its
    ancestors, itself and the root; its position is seq_len + its depth."""
    N = draft_token_num
    sel = selected_index.long()
    B = sel.shape[0]
    dev = sel.device
    seq = verified_seq_len.long()
    ar = torch.arange(N, device=dev)
    retrive_index[:] = (torch.arange(B, device=dev)[:, None] * N + ar).to(retrive_index.dtype)
    tb = sel // topk                                                    # [B, N-1]
    if parent_list.shape[1] > 0:
        ptok = torch.gather(parent_list.long(), 1, tb.clamp(0, parent_list.shape[1] - 1))
    else:
        ptok = torch.full_like(sel, -1)
    match = sel[:, None, :] == ptok[:, :, None]                         # [B, child, candidate]
    found_parent = match.any(-1)
    root_child = tb == 0
    linked = root_child | found_parent
    par = torch.where(root_child, 0, match.to(torch.int8).argmax(-1) + 1)  # parent's node index
    par = torch.where(linked, par, -1)

    # links: sort (parent, child) pairs; the first child of a parent is its next_token, each next its sibling
    child = ar[1:].expand(B, N - 1)
    key = torch.where(linked, par * N + child, N * N + child)
    key, _ = key.sort(dim=1)
    kp, kc = key // N, key % N
    ok = kp < N
    first = ok & torch.cat([torch.ones(B, 1, dtype=torch.bool, device=dev), kp[:, 1:] != kp[:, :-1]], dim=1)
    b_idx = torch.arange(B, device=dev)[:, None].expand(B, N - 1)
    retrive_next_token[b_idx[first], kp[first]] = kc[first].to(retrive_next_token.dtype)
    nxt = ok[:, 1:] & (kp[:, 1:] == kp[:, :-1])
    retrive_next_sibling[b_idx[:, :-1][nxt], kc[:, :-1][nxt]] = kc[:, 1:][nxt].to(retrive_next_sibling.dtype)

    # mask and depth: walk every node up one level per pass, at most `depth` passes, as the kernel does
    mask = torch.zeros(B, N, N, dtype=torch.bool, device=dev)
    mask[:, :, 0] = True
    par_full = torch.cat([torch.full((B, 1), -1, dtype=torch.long, device=dev), par], dim=1)  # by node
    real_parent = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=dev), found_parent & ~root_child], dim=1)
    cur = ar.expand(B, N).clone()
    active = cur > 0
    pos = torch.zeros(B, N, dtype=torch.long, device=dev)
    rows_b = torch.arange(B, device=dev)[:, None].expand(B, N)
    rows_x = ar[None, :].expand(B, N)
    for _ in range(depth):
        if not bool(active.any()):
            break
        pos += active
        mask[rows_b[active], rows_x[active], cur[active]] = True
        nxt_ok = torch.gather(real_parent, 1, cur)
        up = torch.gather(par_full, 1, cur)
        active = active & nxt_ok
        cur = torch.where(active, up, cur)
    positions[:B * N] = (seq[:, None] + pos).reshape(-1).to(positions.dtype)
    if tree_mask_mode == QLEN_ONLY:
        tree_mask[:B * N * N] = mask.reshape(-1)
    elif tree_mask_mode == FULL_MASK:
        prefix = torch.cumsum(seq, 0) - seq
        base = N * N * torch.arange(B, device=dev) + prefix * N                          # [B]
        row0 = base[:, None] + (seq[:, None] + N) * ar[None, :] + seq[:, None]            # [B, N]
        idx = row0[:, :, None] + ar[None, None, :]
        tree_mask[idx.reshape(-1)] = mask.reshape(-1)
    else:
        raise NotImplementedError(f"build_tree_kernel_efficient_cpu: tree_mask_mode {tree_mask_mode} "
                                  "(QLEN_ONLY_BITPACKING) is not implemented")


def verify_tree_greedy_cpu(predicts, accept_index, accept_token_num, candidates, retrive_index, retrive_next_token,
                           retrive_next_sibling, target_predict) -> None:
    """Greedy tree verification (verify_tree_greedy_kernel_triton): from the root, at each level take the first
    child in sibling order whose token is the target's argmax at the last accepted node. Every request advances
    together: one pass per level, and per level one pass per sibling rank still searched."""
    cand = candidates.numpy()
    B, N = cand.shape
    S = accept_index.shape[1]
    pred = predicts.numpy().reshape(-1)
    acc = accept_index.numpy()
    ri = retrive_index.numpy()
    nt = retrive_next_token.numpy()
    ns = retrive_next_sibling.numpy()
    tp = target_predict.numpy().reshape(-1)
    rows = np.arange(B)
    last = ri[:, 0].astype(np.int64)
    acc[:, 0] = last
    num = np.zeros(B, np.int64)
    cur = np.zeros(B, np.int64)
    alive = np.ones(B, bool)
    for _ in range(1, S):
        if not alive.any():
            break
        cur = np.where(alive, nt[rows, cur], -1)
        searching = cur != -1
        alive = searching.copy()
        target = tp[last]
        matched = np.zeros(B, bool)
        while searching.any():
            r = np.flatnonzero(searching)
            c = cur[r]
            hit = cand[r, c] == target[r]
            rh, ch = r[hit], c[hit]
            if len(rh):
                idx = ri[rh, ch]
                pred[last[rh]] = target[rh]
                num[rh] += 1
                acc[rh, num[rh]] = idx
                last[rh] = idx
                matched[rh] = True
                searching[rh] = False
            rm, cm = r[~hit], c[~hit]
            cur[rm] = ns[rm, cm]
            searching[rm] = cur[rm] != -1
        alive &= matched
    accept_token_num.numpy()[:B] = num
    pred[last] = tp[last]

"""echo's torch CPU sgl_kernel (echo_exec/sglang_cpu/sgl_kernel) against SGLang's own kernels.

Where SGLang has a Triton kernel for an op (tree building, greedy tree verification, the KV slot moves), the test
runs that kernel on this CPU through Triton's interpreter (TRITON_INTERPRET=1) and compares every output tensor;
those tests need sglang in this interpreter (CI's SGLang step runs this file with the SGLang venv's python) and are
skipped elsewhere. Attention and the byte-level KV copy, which SGLang implements only in C++/CUDA, are checked
against brute-force definitions (per request, plain softmax attention), everywhere torch is."""

import os
import sys
from importlib.util import find_spec
from pathlib import Path

if find_spec("sglang") is not None:  # before triton is imported: SGLang's Triton kernels run on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "echo_exec" / "sglang_cpu"))
import sgl_kernel  # noqa: E402

needs_sglang = pytest.mark.skipif(find_spec("sglang") is None or os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="needs sglang (and triton) in this interpreter")


def random_eagle_draft(rng, B, topk, steps, N):
    """SGLang's draft outputs for a batch: parent_list [B, topk*(steps-1)+1] and the sorted top N-1 candidates."""
    cand = topk + (steps - 1) * topk * topk
    parents = [np.tile(np.arange(-1, topk), (B, 1))]
    for i in range(1, steps - 1):  # beam of depth i+1: topk of the topk*topk candidates of that depth
        beam = np.stack([rng.choice(topk * topk, topk, replace=False) for _ in range(B)])
        parents.append(beam + topk * topk * (i - 1) + topk)
    parent_list = np.concatenate(parents, axis=1) if steps > 1 else np.zeros((B, 0), np.int64)
    # a valid top-(N-1) is ancestor-closed: draw scores that fall along paths, then take the top N-1
    score = rng.random((B, cand))
    for d in range(2, steps + 1):
        lo = topk + (d - 2) * topk * topk
        for p in range(lo, lo + topk * topk):
            par = parent_list[:, p // topk]
            score[:, p] = np.minimum(score[:, p], score[np.arange(B), par] - 1e-3)
    sel = np.sort(np.argsort(-score, axis=1)[:, :N - 1], axis=1)
    return torch.from_numpy(parent_list).long(), torch.from_numpy(sel).long()


def tree_outputs(fn, parent_list, sel, seq_lens, topk, steps, N, mode):
    B = len(seq_lens)
    size = B * N * N if mode == 1 else int(seq_lens.sum()) * N + B * N * N
    mask = torch.full((size,), True)
    pos = torch.empty(B * N, dtype=torch.long)
    ret = torch.full((3, B, N), -1, dtype=torch.long)
    fn(parent_list, sel, seq_lens, mask, pos, ret[0], ret[1], ret[2], topk, steps, N, mode)
    return mask, pos, ret


@needs_sglang
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 5), topk=st.integers(1, 4), steps=st.integers(1, 5),
       mode=st.sampled_from([0, 1]), data=st.data())
def test_build_tree_matches_sglang_triton(seed, B, topk, steps, mode, data):
    from sglang.kernels.ops.speculative.spec_tree import sgl_build_tree_kernel_triton
    rng = np.random.default_rng(seed)
    cand = topk + (steps - 1) * topk * topk
    N = data.draw(st.integers(2, min(cand + 1, 12)))
    parent_list, sel = random_eagle_draft(rng, B, topk, steps, N)
    seq_lens = torch.from_numpy(rng.integers(1, 30, B)).long()
    ref = tree_outputs(sgl_build_tree_kernel_triton, parent_list, sel, seq_lens, topk, steps, N, mode)
    got = tree_outputs(sgl_kernel.build_tree_kernel_efficient_cpu, parent_list, sel, seq_lens, topk, steps, N, mode)
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)


@needs_sglang
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 6), topk=st.integers(1, 4), steps=st.integers(1, 5),
       data=st.data())
def test_verify_tree_greedy_matches_sglang_triton(seed, B, topk, steps, data):
    from sglang.kernels.ops.speculative.spec_tree import sgl_build_tree_kernel_triton, verify_tree_greedy_triton
    rng = np.random.default_rng(seed)
    cand = topk + (steps - 1) * topk * topk
    N = data.draw(st.integers(2, min(cand + 1, 12)))
    parent_list, sel = random_eagle_draft(rng, B, topk, steps, N)
    _, _, ret = tree_outputs(sgl_build_tree_kernel_triton, parent_list, sel, torch.full((B,), 5), topk, steps, N, 1)
    vocab = 3  # few tokens: many matches, deep accepted paths
    candidates = torch.from_numpy(rng.integers(0, vocab, (B, N))).long()
    target = torch.from_numpy(rng.integers(0, vocab, (B, N))).long()
    S = steps + 1

    def run(fn):
        out = (torch.full((B * N,), -7, dtype=torch.long), torch.full((B, S), -1, dtype=torch.long),
               torch.zeros(B, dtype=torch.long))
        fn(out[0], out[1], out[2], candidates, ret[0], ret[1], ret[2], target)
        return out

    ref = run(verify_tree_greedy_triton)
    got = run(lambda p, a, n, c, ri, nt, ns, t: sgl_kernel.verify_tree_greedy_cpu(
        predicts=p, accept_index=a, accept_token_num=n, candidates=c, retrive_index=ri, retrive_next_token=nt,
        retrive_next_sibling=ns, target_predict=t))
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)


def ragged_case(rng, B, pool_rows=8, pool_len=64):
    req_to_token = torch.from_numpy(rng.integers(0, 10_000, (pool_rows, pool_len))).int()
    rpi = torch.from_numpy(rng.choice(pool_rows, B, replace=False)).long()
    start = torch.from_numpy(rng.integers(0, 30, B)).long()
    end = start + torch.from_numpy(rng.integers(0, 20, B)).long()
    return req_to_token, rpi, start, end


@needs_sglang
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 6))
def test_kv_slot_moves_match_sglang_triton(seed, B):
    from sglang.kernels.ops.speculative.cache_locs import (
        assign_draft_cache_locs_contiguous,
        assign_extend_cache_locs,
    )
    from sglang.kernels.ops.speculative.eagle import fill_accept_out_cache_loc, fill_bonus_tokens
    from sglang.srt.mem_cache.allocation import assign_req_to_token_pool
    from sglang.srt.utils import next_power_of_2
    rng = np.random.default_rng(seed)
    req_to_token, rpi, start, end = ragged_case(rng, B)
    total = int((end - start).sum())
    bs_up = next_power_of_2(B)
    # req_to_token <- out_cache_loc
    loc = torch.from_numpy(rng.integers(0, 10_000, total + 3)).long()
    ref, got = req_to_token.clone(), req_to_token.clone()
    assign_req_to_token_pool[(B,)](rpi, ref, start, end, loc, ref.shape[1], bs_up)
    sgl_kernel.assign_req_to_token_pool_cpu(rpi, got, start, end, loc, got.shape[1])
    assert torch.equal(ref, got)
    # out_cache_loc <- req_to_token
    ref, got = torch.full((total + 3,), -1, dtype=torch.long), torch.full((total + 3,), -1, dtype=torch.long)
    assign_extend_cache_locs[(B,)](rpi, req_to_token, start, end, ref, req_to_token.shape[1], bs_up)
    sgl_kernel.assign_extend_cache_locs_cpu(rpi, req_to_token, start, end, got, req_to_token.shape[1])
    assert torch.equal(ref, got)
    # each request's topk * steps draft slots
    topk, steps = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    ref, got = (torch.full((B * topk * steps,), -1, dtype=torch.long) for _ in range(2))
    assign_draft_cache_locs_contiguous[(B,)](rpi, req_to_token, start, ref, req_to_token.shape[1], topk, steps, BS=B)
    sgl_kernel.assign_draft_cache_locs_contiguous_cpu(rpi, req_to_token, start, got, req_to_token.shape[1], topk,
                                                      steps)
    assert torch.equal(ref, got)
    # bonus tokens, accepted slots
    stride = int(rng.integers(1, 6))
    acc_tokens = torch.from_numpy(rng.integers(0, 259, B * stride)).long()
    acc_lens = torch.from_numpy(rng.integers(1, stride + 1, B)).int()
    ref, got = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    fill_bonus_tokens[(B,)](acc_tokens, acc_lens, ref, stride)
    sgl_kernel.fill_bonus_tokens_cpu(acc_tokens, acc_lens, got, stride)
    assert torch.equal(ref, got)
    acc_index = torch.from_numpy(np.where(rng.random(B * stride) < 0.5, -1, rng.permutation(B * stride))).long()
    out_loc = torch.from_numpy(rng.integers(0, 10_000, B * stride)).long()
    ref, got = torch.full((B * stride,), -1, dtype=torch.long), torch.full((B * stride,), -1, dtype=torch.long)
    fill_accept_out_cache_loc[(B * stride,)](acc_index, out_loc, ref, next_power_of_2(B * stride))
    sgl_kernel.fill_accept_out_cache_loc_cpu(acc_index, out_loc, got)
    assert torch.equal(ref, got)


# --- brute-force definitions (SGLang has these only in C++/CUDA) ---

def test_draft_decode_metadata_rows_are_prefix_then_own_branch():
    rng = np.random.default_rng(3)
    req_to_token, rpi, seq, _ = ragged_case(rng, 4)
    topk, steps = 3, 4
    got = sgl_kernel.build_draft_decode_metadata_cpu(req_to_token, rpi, seq, topk, steps, req_to_token.shape[1])
    assert got.shape == (4 * topk, req_to_token.shape[1])
    for b in range(4):
        row = req_to_token[rpi[b]]
        n = int(seq[b])
        for j in range(topk):
            r = got[b * topk + j]
            assert torch.equal(r[:n], row[:n])
            assert torch.equal(r[n:n + steps], row[n + j * steps:n + (j + 1) * steps])


def test_copy_all_layer_kv_cache_moves_slots_in_every_buffer():
    bufs = [torch.randn(50, 2, 8) for _ in range(3)] + [torch.randn(50, 4).half()]
    before = [b.clone() for b in bufs]
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.uint64)
    strides = torch.tensor([b[0].numel() * b.element_size() for b in bufs])
    tgt, src = torch.tensor([3, 7, 9, 10]), torch.tensor([9, 3, 40, 11])  # overlapping: sources read first
    sgl_kernel.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
    for b, old in zip(bufs, before, strict=True):
        want = old.clone()
        want[tgt] = old[src]
        assert torch.equal(b, want)


def brute_attention(q, keys, values, visible, scale):
    """One query row against its keys: softmax(q k^T * scale) over the visible ones, GQA by head groups."""
    H, KVH = q.shape[0], keys.shape[1]
    k = keys.repeat_interleave(H // KVH, dim=1)
    v = values.repeat_interleave(H // KVH, dim=1)
    s = torch.einsum("hd,lhd->hl", q, k) * scale
    s[:, ~visible] = float("-inf")
    return torch.einsum("hl,lhd->hd", torch.softmax(s, dim=-1), v)


def test_decode_attention_writes_the_new_kv_and_attends_to_the_cache():
    torch.manual_seed(0)
    B, H, KVH, D, P = 3, 4, 2, 8, 64
    kb, vb = torch.randn(P, KVH, D), torch.randn(P, KVH, D)
    req_to_token = torch.randperm(8 * 16).view(8, 16).int() % P
    rpi = torch.tensor([5, 1, 6])
    seq = torch.tensor([4, 11, 1])
    loc = req_to_token[rpi, seq - 1].long()
    req_to_token[rpi, seq - 1] = loc.int()
    q, k, v = torch.randn(B, H, D), torch.randn(B, KVH, D), torch.randn(B, KVH, D)
    o = torch.empty(B, H, D)
    torch.ops.sgl_kernel.decode_attention_cpu(q, kb, vb, 1.0, 1.0, o, k, v, loc, torch.empty(0), req_to_token, rpi,
                                              seq, 0.3, 0.0, False, 0, None, None)
    assert torch.equal(kb[loc], k) and torch.equal(vb[loc], v)
    for b in range(B):
        locs = req_to_token[rpi[b], :seq[b]].long()
        want = brute_attention(q[b], kb[locs], vb[locs], torch.ones(len(locs), dtype=torch.bool), 0.3)
        torch.testing.assert_close(o[b], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["causal", "tree"])
def test_extend_attention_prefix_plus_new_tokens(kind):
    torch.manual_seed(1)
    H, KVH, D, P = 4, 2, 8, 200
    kb, vb = torch.randn(P, KVH, D), torch.randn(P, KVH, D)
    req_to_token = torch.randperm(P)[:4 * 40].view(4, 40).int()
    rpi = torch.tensor([2, 0, 3])
    prefix = torch.tensor([5, 0, 17])
    ext = torch.tensor([4, 4, 4]) if kind == "tree" else torch.tensor([3, 6, 1])
    seq = prefix + ext
    start = torch.cumsum(ext, 0) - ext
    T = int(ext.sum())
    q, k, v = torch.randn(T, H, D), torch.randn(T, KVH, D), torch.randn(T, KVH, D)
    tree = None
    if kind == "tree":  # per request 4x4: root, two children of the root, a grandchild under the first child
        m = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
        tree = m.repeat(3, 1, 1).reshape(-1)
    o = torch.empty(T, H, D)
    torch.ops.sgl_kernel.extend_attention_cpu(q, k, v, o, kb, vb, 1.0, 1.0, req_to_token, rpi, seq, ext, start,
                                              int(ext.max()), 0.25, 0.0, False, 0, None, None, tree, True)
    for b in range(3):
        locs = req_to_token[rpi[b], :prefix[b]].long()
        n = int(ext[b])
        for i in range(n):
            row = int(start[b]) + i
            keys = torch.cat([kb[locs], k[start[b]:start[b] + n]])
            vals = torch.cat([vb[locs], v[start[b]:start[b] + n]])
            new_visible = m[i] if kind == "tree" else torch.arange(n) <= i
            visible = torch.cat([torch.ones(len(locs), dtype=torch.bool), new_visible])
            torch.testing.assert_close(o[row], brute_attention(q[row], keys, vals, visible, 0.25),
                                       rtol=1e-5, atol=1e-5)


def test_every_other_name_imports_and_refuses():
    from sgl_kernel import fused_experts_cpu
    with pytest.raises(NotImplementedError, match="fused_experts_cpu"):
        fused_experts_cpu(1)


# --- the plugin's mapping: SGLang's draft outputs -> echosim.spec forest -> pack == SGLang's own tree builder ---

def sglang_draft_outputs(rng, B, topk, steps):
    """What SGLang's draft loop produces per depth (select_top_k_tokens' tree_info): cumulative path probabilities,
    tokens, and the beam (top-k candidates, best first) as flat candidate indices."""
    probs, tokens, beams = [], [], []
    p1 = -np.sort(-rng.dirichlet(np.ones(topk + 1), B)[:, :topk], axis=1)
    probs.append(p1)
    tokens.append(rng.integers(0, 259, (B, topk)))
    beams.append(np.tile(np.arange(topk), (B, 1)))
    beam_p = p1
    for d in range(2, steps + 1):
        child = -np.sort(-rng.dirichlet(np.ones(topk + 1), (B, topk))[:, :, :topk], axis=2)  # [B, beam, topk]
        cum = (beam_p[:, :, None] * child).reshape(B, topk * topk)
        order = np.argsort(-cum, axis=1, kind="stable")[:, :topk]
        probs.append(cum)
        tokens.append(rng.integers(0, 259, (B, topk * topk)))
        beams.append(order + topk + (d - 2) * topk * topk)
        beam_p = np.take_along_axis(cum, order, axis=1)
    return probs, tokens, beams


@needs_sglang
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 4), topk=st.integers(1, 3), steps=st.integers(1, 4),
       data=st.data())
def test_plugin_forest_and_pack_match_sglang_tree_builder(seed, B, topk, steps, data):
    """The plugin's DraftForest from SGLang's draft outputs is valid, and packing SGLang's own selection (global top
    N-1 by path score, organize_draft_results) with echosim.spec.pack gives exactly the tree, mask and positions
    SGLang's build_tree kernel gives: one tree format on both sides."""
    from echo_sglang_plugin.worker import ForestBuilder
    from sglang.kernels.ops.speculative.spec_tree import sgl_build_tree_kernel_triton

    from echosim.spec.pack import pack, to_dense
    rng = np.random.default_rng(seed)
    S = topk + (steps - 1) * topk * topk
    N = data.draw(st.integers(2, min(S + 1, 10)))
    probs, tokens, beams = sglang_draft_outputs(rng, B, topk, steps)
    roots, kv = rng.integers(0, 259, B), rng.integers(1, 40, B)
    fb = ForestBuilder(roots, kv, topk, steps)
    rows = np.arange(B)
    for d in range(1, steps + 1):
        fb.add_depth(d, rows, probs[d - 1], tokens[d - 1], beams[d - 1])
    forest = fb.forest
    forest.validate()
    flat = np.concatenate(probs, axis=1)
    top = np.sort(np.argsort(-flat, axis=1, kind="stable")[:, :N - 1], axis=1)  # SGLang: topk, then sorted
    dense = to_dense(pack(forest, (np.arange(B)[:, None] * S + top).ravel()), N)
    parent_list = np.concatenate([np.tile(np.arange(-1, topk), (B, 1))] + beams[1:-1], axis=1) if steps > 1 \
        else np.zeros((B, 0), np.int64)
    mask, pos, ret = tree_outputs(sgl_build_tree_kernel_triton, torch.from_numpy(parent_list).long(),
                                  torch.from_numpy(top).long(), torch.from_numpy(kv).long(), topk, steps, N, 1)
    assert np.array_equal(dense.retrive_next_token, ret[1].numpy())
    assert np.array_equal(dense.retrive_next_sibling, ret[2].numpy())
    assert np.array_equal(dense.mask.reshape(-1), mask.numpy())
    assert np.array_equal(dense.positions.reshape(-1), pos.numpy())
    want_tokens = np.concatenate([roots[:, None], np.take_along_axis(np.concatenate(tokens, axis=1), top, 1)], 1)
    assert np.array_equal(dense.tokens, want_tokens)


@needs_sglang
def test_adaptive_policy_runs_adaptive(monkeypatch, tmp_path):
    """The shipped policy-echo.json is online-adaptive and the plugin runs it as such. Under SGLang's dense verify
    (N tokens a request whatever is selected) its verify-cost prior is flat in the selection; under ragged verify
    it is the generic one in verified tokens. A static config runs as given."""
    from echo_sglang_plugin.worker import policy_from_env

    from echosim.spec.adaptive import Adaptive

    draft = Path(__file__).resolve().parents[1] / "echo_exec" / "models" / "tiny-draft"
    monkeypatch.delenv("ECHO_SGLANG_POLICY", raising=False)
    monkeypatch.delenv("ECHO_SGLANG_POLICY_CONFIG", raising=False)
    dense = policy_from_env(str(draft), 24)
    assert isinstance(dense, Adaptive) and dense.name == "echo"
    # batch 4: a drafting step costs the same whatever it selects (5..96 tokens), more than a plain step (4 roots)
    # and more than a drafting step of a smaller batch
    flat = dense.step_time(np.array([5.0, 24.0, 96.0]), 4)
    assert flat[0] == flat[1] == flat[2] > dense.step_time(np.array([4.0]), 4)[0]
    assert flat[0] > dense.step_time(np.array([5.0]), 2)[0]
    ragged = policy_from_env(str(draft), 24, ragged=True)
    assert isinstance(ragged, Adaptive) and ragged.step_time is None
    monkeypatch.setenv("ECHO_SGLANG_POLICY_CONFIG", '{"steps": 5, "topk": 2, "num_draft_tokens": 6, '
                                                      '"remaining_num_draft_tokens": 4}')
    policy = policy_from_env(str(draft), 6)
    assert not isinstance(policy, Adaptive) and policy.config.num_draft_tokens == 6


@needs_sglang
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 4), topk=st.integers(1, 3), steps=st.integers(1, 4),
       data=st.data())
def test_plugin_maps_sglang_accepts_to_the_forest_nodes_our_engine_reports(seed, B, topk, steps, data):
    """What the plugin hands policy.observe: SGLang's accept_index (dense b*N + local, the root first, -1 padded,
    accept_lens counting the root) mapped back to forest nodes, equal to the nodes echo's engine hands it for the
    same trees and target (echosim.spec.verify on the packed batch)."""
    from echo_sglang_plugin.worker import ForestBuilder, PendingStep, accepted_nodes

    from echosim.spec.pack import pack
    from echosim.spec.verify import verify_greedy
    rng = np.random.default_rng(seed)
    S = topk + (steps - 1) * topk * topk
    N = data.draw(st.integers(2, min(S + 1, 10)))
    probs, tokens, beams = sglang_draft_outputs(rng, B, topk, steps)
    fb = ForestBuilder(rng.integers(0, 259, B), rng.integers(1, 40, B), topk, steps)
    for d in range(1, steps + 1):
        fb.add_depth(d, np.arange(B), probs[d - 1], tokens[d - 1], beams[d - 1])
    forest = fb.forest
    top = np.sort(np.argsort(-np.concatenate(probs, axis=1), axis=1, kind="stable")[:, :N - 1], axis=1)
    selection = (np.arange(B)[:, None] * S + top).ravel()
    batch = pack(forest, selection)
    T = batch.num_tokens
    # a target that mostly agrees with some child of each node, so paths run deep
    child = np.where(batch.retrive_next_token[:T] >= 0, batch.tokens[np.maximum(batch.retrive_next_token[:T], 0)
                                                                     + batch.qo_indptr[batch.request_of_token()]], 0)
    target = np.where(rng.random(T) < 0.8, child, rng.integers(0, 259, T))
    result = verify_greedy(batch, np.r_[target, np.zeros(len(batch.tokens) - T, np.int64)])
    want = np.sort(batch.node[result.accepted_nodes()])
    req = np.arange(B)[:, None]
    dense_index = np.where(result.accept_index >= 0, result.accept_index - batch.qo_indptr[:B, None] + req * N, -1)
    step = PendingStep(forest=forest, selection=selection, node=batch.node, qo_indptr=batch.qo_indptr,
                       verify_tokens=B * N, draft_ms=0.0)
    got = accepted_nodes(step, dense_index, result.accept_len + 1, N)
    assert np.array_equal(got, want)
    assert len(got) == int(result.accept_len.sum()) and (got >= 0).all()

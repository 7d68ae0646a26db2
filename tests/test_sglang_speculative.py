"""SGLang's own server speculating on this CPU with echo's plugin and torch sgl_kernel: ECHO (an echosim.spec
policy picks the trees inside SGLang's worker), STANDALONE (SGLang's own tree) and EAGLE3, against plain SGLang.

Servers started once for the module and side by side (each takes ~90 s here): plain SGLang (its
torch_native attention, no echo code on its path), SGLang+STANDALONE and SGLang+ECHO (intel_amx attention kept by
the plugin, echo's kernels), all on the shipped tiny target, ECHO and STANDALONE with the shipped tiny draft,
SGLang+EAGLE3 with the shipped EAGLE-3 head (tiny-eagle3, which reads the target's hidden states). Needs
an interpreter with sglang and the plugin (ECHO_SGLANG_PYTHON; make_venv.sh makes one; CI's SGLang step sets it);
skipped elsewhere."""

import json
import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path

import pytest
from test_server_support import post

from echo_exec import sglang_cpu
from echosim.cli import main as echosim
from echosim.spec.policies import load_policy

SGLANG_PYTHON = os.environ.get("ECHO_SGLANG_PYTHON") or (sys.executable if find_spec("sglang") else None)
pytestmark = pytest.mark.skipif(SGLANG_PYTHON is None, reason="no interpreter with sglang (set ECHO_SGLANG_PYTHON)")

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "echo_exec" / "models" / "tiny-target"
DRAFT = TARGET.parent / "tiny-draft"
HEAD = TARGET.parent / "tiny-eagle3"  # the EAGLE-3 head SGLang's EAGLE3 drafts with (reads the target's states)
NUM_PROMPTS, PROMPT_BYTES, NEW_TOKENS = 56, 120, 40
# A static ECHO on this pair (5 x 2 beam, N 10, gated requests 4) with a gate at depth 3 strict enough that both
# of ECHO's tiers (confident requests up to num_draft_tokens, gated ones up to remaining_num_draft_tokens) show up
# in a short test. Explicit rather than the shipped policy-echo.json: that one is online-adaptive, which the
# plugin runs as its inner policy (see test_adaptive_policy_runs_its_inner_policy).
ECHO_TEST_CONFIG = {"policy": "echo", "steps": 5, "topk": 2, "num_draft_tokens": 10, "remaining_num_draft_tokens": 4,
                    "gates": [[3, 0.3]], "budget": {"kind": "goodput", "tokens": 9}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sglang-spec")
    config = tmp / "policy-echo-test.json"
    config.write_text(json.dumps(ECHO_TEST_CONFIG))
    records = {name: tmp / f"{name}-records.jsonl" for name in ("echo", "echo-ragged")}
    kinds = {
        "plain": dict(attention_backend="torch_native"),
        "standalone": dict(attention_backend="intel_amx",
                           speculative=sglang_cpu.speculative_for("STANDALONE", DRAFT, steps=5, topk=2,
                                                                  num_draft_tokens=10)),
        "eagle3": dict(attention_backend="intel_amx",
                       speculative=sglang_cpu.speculative_for("EAGLE3", HEAD, steps=5, topk=2, num_draft_tokens=10)),
        "echo": dict(attention_backend="intel_amx",
                     speculative=sglang_cpu.speculative_for("ECHO", DRAFT, policy="echo", policy_config=config)),
        "echo-ragged": dict(attention_backend="intel_amx", speculative=sglang_cpu.speculative_for(
            "ECHO", DRAFT, policy="echo", policy_config=config, ragged=True)),
    }
    procs, urls = {}, {}
    for name, kw in kinds.items():
        port = free_port()
        extra = ("--disable-overlap-schedule",) if "speculative" in kw else ()
        if name in records:  # the launcher passes the environment on
            os.environ["ECHO_SGLANG_RECORDS"] = str(records[name])
        try:
            procs[name] = sglang_cpu.launch(TARGET, port=port, python=SGLANG_PYTHON, log_path=tmp / f"{name}.log",
                                            max_running_requests=8, threads=1, extra=extra, **kw)
        finally:
            os.environ.pop("ECHO_SGLANG_RECORDS", None)
        urls[name] = f"http://127.0.0.1:{port}"
    try:
        for name, proc in procs.items():
            try:
                sglang_cpu.wait_ready(urls[name], proc, timeout_s=600)
            except RuntimeError as exc:
                pytest.fail(f"{name}: {exc}\n{(tmp / f'{name}.log').read_text(errors='replace')[-3000:]}")
        yield {"urls": urls, "records": records, "policy": load_policy(config)}
    finally:
        for proc in procs.values():
            sglang_cpu.stop(proc)


def generate_all(url: str, prompts: list[list[int]], concurrency: int) -> list[dict]:
    def one(ids):
        status, raw = post(url + "/generate", {"input_ids": ids, "sampling_params": {
            "max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}}, timeout=600)
        assert status == 200, raw[:500]
        return json.loads(raw)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, prompts))


@pytest.fixture(scope="module")
def outputs(servers):
    """Every server's responses to the held-out prompts at concurrency 1 and 8 (plain SGLang: at 1)."""
    prompts = sglang_cpu.heldout_prompts(NUM_PROMPTS, PROMPT_BYTES)
    assert len(prompts) == NUM_PROMPTS
    out = {("plain", 1): generate_all(servers["urls"]["plain"], prompts, 1)}
    for name in ("standalone", "eagle3", "echo", "echo-ragged"):
        for c in (1, 8):
            out[(name, c)] = generate_all(servers["urls"][name], prompts, c)
    return out


def read_records(path: Path) -> dict[str, list[tuple[int, bool, int]]]:
    """Per request id: (tree size the policy selected, gated, drafts SGLang accepted) of each verify step."""
    steps: dict[str, list[tuple[int, bool, int]]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        for rid, n, gated, acc in zip(rec["rids"], rec["tree_tokens"], rec["gated"], rec["accepted"], strict=True):
            steps.setdefault(rid, []).append((n, gated, acc))
    return steps


@pytest.mark.parametrize("name", ["echo", "echo-ragged", "standalone", "eagle3"])
@pytest.mark.parametrize("concurrency", [1, 8])
def test_speculative_sglang_is_lossless(outputs, name, concurrency):
    want = [r["output_ids"] for r in outputs[("plain", 1)]]
    got = [r["output_ids"] for r in outputs[(name, concurrency)]]
    assert all(len(w) == NEW_TOKENS for w in want)
    diff = [i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w]
    assert not diff, f"{len(diff)} of {NUM_PROMPTS} prompts differ from plain SGLang, first {diff[:5]}"
    meta = [r["meta_info"] for r in outputs[(name, concurrency)]]
    assert all(m["spec_verify_ct"] > 0 for m in meta)
    # speculation pays on this pair: well over one token per verify step
    steps = sum(m["spec_verify_ct"] for m in meta)
    assert sum(m["completion_tokens"] for m in meta) / steps > 2.0


def test_echo_steps_are_the_policys(servers, outputs):
    """Each ECHO verify step SGLang counted was drafted and selected by the echosim.spec policy: the plugin's
    records of the policy's trees account for SGLang's own per-request counts (verify steps, accepted drafts), no
    request accepted more than its tree held, and the trees obey the policy's two tiers."""
    cfg = servers["policy"].config
    steps = read_records(servers["records"]["echo"])
    responses = outputs[("echo", 1)] + outputs[("echo", 8)]
    for r in responses:
        meta = r["meta_info"]
        mine = steps[meta["id"]]
        assert len(mine) == meta["spec_verify_ct"]
        assert sum(a for _, _, a in mine) == meta["spec_num_correct_drafts"]
        for n, gated, acc in mine:
            assert 0 <= acc < n <= (cfg.remaining_num_draft_tokens if gated else cfg.num_draft_tokens)
    every = [s for r in responses for s in steps[r["meta_info"]["id"]]]
    assert any(g for _, g, _ in every) and not all(g for _, g, _ in every)  # both tiers occurred
    # SGLang's dense width is the policy's largest tree; gated requests verified fewer (padded, unreachable)
    assert max(n for n, _, _ in every) == cfg.num_draft_tokens
    assert max(n for n, g, _ in every if g) <= cfg.remaining_num_draft_tokens < cfg.num_draft_tokens


def test_ragged_verify_verifies_fewer_tokens_at_the_same_acceptance(servers, outputs):
    """The same policy, dense (every request padded to N) and ragged (echo's CPU kernels verify only the selected
    nodes): the same trees, so the same drafts accepted prompt by prompt (and the same tokens, checked against
    plain SGLang above), with fewer tokens through the target's verify forward."""
    N = servers["policy"].config.num_draft_tokens
    dense, ragged = outputs[("echo", 1)], outputs[("echo-ragged", 1)]
    assert [r["meta_info"]["spec_num_correct_drafts"] for r in dense] == \
        [r["meta_info"]["spec_num_correct_drafts"] for r in ragged]
    assert [r["meta_info"]["spec_verify_ct"] for r in dense] == [r["meta_info"]["spec_verify_ct"] for r in ragged]
    steps = read_records(servers["records"]["echo-ragged"])
    verified_ragged = sum(n for r in ragged for n, _, _ in steps[r["meta_info"]["id"]])
    verified_dense = N * sum(r["meta_info"]["spec_verify_ct"] for r in dense)
    assert verified_ragged < verified_dense


def test_replay_against_sglang_echo_reports_its_verify_counts(servers, outputs, tmp_path):
    rows = [(0.1 * i, 60 + 9 * i, 24) for i in range(8)]
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"arrival_s": t, "prompt_tokens": p, "output_tokens": o}) + "\n"
                             for t, p, o in rows))
    out = tmp_path / "run"
    assert echosim(["replay", "--trace", str(trace), "--url", servers["urls"]["echo"], "--out", str(out),
                    "--concurrency", "4", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] == 8
    # MAT from SGLang's own spec_verify_ct / spec_num_correct_drafts: speculation accepted drafts
    assert summary["mat"] is not None and summary["mat"] > 1.5

"""`echosim serve` with the shipped pair and its default settings: echo runs the online-adaptive budget, its
output is plain decoding's, and /server_info reports the policy's live settings and the budget's state."""

import json

from test_server_support import ROOT, ServerProcess, get, post

from echo_exec.engine import Engine, SamplingParams

MODELS = ROOT / "echo_exec" / "models"


def test_default_echo_serves_adaptively_and_reports_its_state():
    target, draft = MODELS / "tiny-target", MODELS / "tiny-draft"
    proc = ServerProcess(["--model", str(target), "--draft", str(draft), "--threads", "1"])
    try:
        prompts = ["import os\nimport sys\n\ndef main(", "class Parser:\n    def __init__(self, text):\n"]
        outs = []
        for p in prompts:
            status, raw = post(proc.url + "/generate", {"text": p, "sampling_params": {
                "max_new_tokens": 24, "temperature": 0}})
            assert status == 200, raw
            outs.append(json.loads(raw)["output_ids"])
        status, raw = get(proc.url + "/server_info")
        assert status == 200
        info = json.loads(raw)
    finally:
        proc.stop()
    assert info["policy"] == "echo" and info["policy_config_source"].endswith("policy-echo.json")
    engine = info["internal_states"][0]["engine"]
    assert "adaptive" in engine["policy_settings"]
    state = engine["policy_state"]
    assert state["steps"] > 0 and state["verify_ms_model"]["prior_scale"] > 0
    assert set(state) >= {"drafting", "probe_interval", "accept_rate_top_bin_by_depth", "last_step"}
    ref = Engine(target, None, policy="ar").generate([list(p.encode()) for p in prompts],
                                                     SamplingParams(max_new_tokens=24))
    assert outs == [r.output_ids for r in ref]

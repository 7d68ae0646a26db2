"""One step's super-tree: how a policy spends its verification budget across a batch, between depth and width
and across requests (echosim.sim.step_view runs the simulator's own draft -> gate -> select -> verify)."""

from __future__ import annotations

import json

import streamlit as st

from dashboards.common import show_error, step_view
from dashboards.views.whatif import HARDWARE, MODELS, POLICY_NAMES
from echosim.spec.errors import InputError


def page() -> None:
    from echosim.plots import step_figure

    st.title("One step: the batch as one super-tree")
    c1, c2, c3, c4 = st.columns(4)
    name = c1.selectbox("policy", [p for p in POLICY_NAMES if p != "ar"], index=2, key="step_policy")
    batch = int(c2.select_slider("batch size", [1, 2, 4, 8, 16, 32, 64, 128], 16, key="step_batch"))
    model = c3.selectbox("model", MODELS, key="step_model")
    hw = c4.selectbox("GPU", HARDWARE, key="step_hw")
    settings = st.text_input("settings (JSON)", '{"budget": {"kind": "goodput", "tokens": 31}}' if
                             name.startswith("echo") else "{}", key=f"step_settings_{name}")
    c1, c2 = st.columns(2)
    kv_len = int(c1.number_input("cached tokens per request", 1, 131072, 512, key="step_kv"))
    seed = int(c2.number_input("seed", 0, 2**31 - 1, 0, key="step_seed"))
    try:
        try:
            extra = json.loads(settings or "{}")
        except json.JSONDecodeError as exc:
            raise InputError(f"settings: not valid JSON ({exc.msg})", field="settings") from None
        if not isinstance(extra, dict):
            raise InputError("settings: a JSON object, e.g. {\"steps\": 3}", field="settings")
        view = step_view({"policy": name, **extra}, batch, {"model": model, "hardware": hw}, seed, kv_len)
    except InputError as exc:
        show_error(exc)
        st.stop()
    s = view.summary()
    cols = st.columns(5)
    cols[0].metric("verified tokens", f"{s['verified_tokens']:,}")
    cols[1].metric("depth / width", f"{s['depth_tokens']:,} / {s['width_tokens']:,}")
    cols[2].metric("MAT this step", f"{s['mat']:.2f}")
    cols[3].metric("verification waste", f"{100 * s['waste']:.0f}%")
    cols[4].metric("gated requests", f"{s['gated_requests']} / {batch}")
    st.pyplot(step_figure(view), clear_figure=False)
    st.caption("Left: verified nodes per request and depth (the super-tree, requests sorted by difficulty, "
               "easiest first); a dot marks how deep the target accepted. Right: each request's verified drafts "
               "split into depth (one per level reached) and width (siblings beyond it).")


page()

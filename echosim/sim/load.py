"""Is the run hopeless? Offered load against an estimate of what the cluster can serve, and the backlog left when
the arrivals stop. A trace far past capacity still simulates (the queue just grows), but its latencies then describe
a backlog, not the serving system; this is the word the user gets about it (printed, and `load` in summary.json).

Capacity estimate (requests/s per replica): the cluster at its largest feasible batch B = min(max_running, requests
whose prompt + output fit the KV cache at once), each request taking (output - 1) / MAT decode steps at the step
time of a batch of B (the run's own MAT and verified tokens per request-step, the run's mean context), plus the
marginal cost of its prompt's tokens in such a step. It is an estimate from the step-time model, not a measurement:
the overload test leaves it 10% of headroom, and the backlog (requests waiting at the last arrival, time to drain
after it) is reported beside it as what the run actually did.
"""

from __future__ import annotations

import numpy as np

CAPACITY_MARGIN = 1.1      # offered / capacity above this: overloaded
DRAIN_SHARE = 0.25         # or: draining the backlog took longer than this share of the arrival span


def capacity_rps(pricer, width, cluster, kv_blocks: int, prompt_mean: float, output_mean: float, mat: float,
                 tokens_per_step: float) -> tuple[float, int]:
    """(requests/s one replica serves at its largest feasible batch, that batch)."""
    per_request_kv = prompt_mean + output_mean
    batch = int(max(1, min(cluster.max_running, kv_blocks * cluster.block_tokens // max(per_request_kv, 1.0))))
    ctx = prompt_mean + output_mean / 2
    rows = tuple(batch * w for w in width)
    decode_tokens = batch * max(tokens_per_step, 1.0)
    step_ms, with_prompt_ms = pricer.budget_step_ms(np.array([decode_tokens, decode_tokens + prompt_mean]), batch,
                                                    ctx, rows)
    decode_s = max(output_mean - 1.0, 0.0) / max(mat, 1.0) * step_ms / batch / 1000.0
    prefill_s = max(with_prompt_ms - step_ms, 0.0) / 1000.0
    return 1.0 / max(decode_s + prefill_s, 1e-12), batch


def load_report(metrics, summary: dict, capacity: tuple[float, int], replicas: int, waiting_at_last_arrival: int
                ) -> dict | None:
    """summary['load'] for an open-loop run (None when every request arrived at once)."""
    n = summary["requests"]
    span = metrics.last_arrival - metrics.first_arrival
    if n < 2 or span <= 0:
        return None
    cap_rps = capacity[0] * replicas
    output_mean = summary["output_tokens"] / n
    offered_rps = (n - 1) / span
    drain_s = max(metrics.last_finish - metrics.last_arrival, 0.0)
    ratio = offered_rps / cap_rps
    overloaded = ratio > CAPACITY_MARGIN or (drain_s > DRAIN_SHARE * span and waiting_at_last_arrival > 0)
    out = {
        "arrival_span_s": round(span, 3),
        "offered_rps": round(offered_rps, 4),
        "offered_tok_s": round(offered_rps * output_mean, 1),
        "capacity_rps_est": round(cap_rps, 4),
        "capacity_tok_s_est": round(cap_rps * output_mean, 1),
        "capacity_batch_est": capacity[1],
        "load_ratio": round(ratio, 3),
        "waiting_at_last_arrival": int(waiting_at_last_arrival),
        "drain_s": round(drain_s, 3),
        "overloaded": bool(overloaded),
        "warning": None,
    }
    if overloaded:
        out["warning"] = (
            f"overloaded: the workload offers {offered_rps:,.2f} req/s ({out['offered_tok_s']:,.0f} output tok/s), "
            f"{ratio:.1f}x the {cap_rps:,.2f} req/s ({out['capacity_tok_s_est']:,.0f} tok/s) this cluster is "
            f"estimated to serve; {waiting_at_last_arrival:,} requests were waiting at the last arrival and the "
            f"queue took {drain_s:,.0f} s to drain after it (arrivals span {span:,.0f} s). Latencies describe the "
            "backlog: add replicas or GPUs, or replay slower (--time-scale > 1)")
    return out

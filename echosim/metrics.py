"""What a run measures: per-request and per-iteration rows (written to CSV as they come, so memory stays flat),
and the summary computed from them. The simulator and a replay against a real server share these definitions, so
their numbers compare; it imports neither of them.

Definitions (summary.json):
- throughput_tok_s: output tokens / makespan (first arrival to last finish), all replicas together;
- goodput_tok_s: the same, counting only requests that meet both SLOs (TTFT <= slo_ttft_ms, TPOT <= slo_tpot_ms);
- mat: (accepted drafts + 1) summed over decode request-steps / decode request-steps (plain decoding: 1.00);
- ttft_ms: arrival -> first token; e2e_ms: arrival -> finish;
- tpot_ms: (finish - first token) / (output tokens - 1), defined only for outputs of 2 tokens or more: a 1-token
  output has no token after the first, so it is left out of the TPOT mean and percentiles (as SGLang's and vLLM's
  bench_serving do) and counts as meeting the TPOT SLO; requests.csv leaves its tpot_ms empty, and when a run has
  such outputs `tpot_ms.requests` says how many requests the TPOT figures cover;
- verification_waste: draft tokens verified but rejected / draft tokens verified (roots excluded);
- mean_batch: decode requests per decode iteration; preemptions: KV-full recomputations.
"""

from __future__ import annotations

import json
import tempfile
from array import array
from pathlib import Path

import numpy as np

REQUEST_COLUMNS = ("request", "id", "replica", "arrival_s", "first_token_s", "finish_s", "prompt_tokens",
                   "output_tokens", "ttft_ms", "tpot_ms", "e2e_ms", "steps", "accepted", "verified_drafts",
                   "mat", "preemptions")
ITERATION_COLUMNS = ("replica", "start_s", "end_s", "batch", "prefill_tokens", "verified_tokens", "accepted",
                     "draft_ms", "verify_ms", "lm_head_ms", "overhead_ms", "step_ms", "kv_tokens", "waiting")
_FLUSH_ROWS = 20_000
_SPILL_ROWS = 1 << 16   # per-request latencies beyond this many go to a temporary file, a block at a time


class _Column:
    """Float64 values kept in order for exact percentiles. Past _SPILL_ROWS, each full block moves to an
    anonymous temporary file, so that a run of millions of requests holds one block per column in memory; the
    summary reads a column back (8 bytes per request, one column at a time). The file has no name and goes with
    the object."""

    __slots__ = ("buf", "file", "spilled")

    def __init__(self):
        self.buf, self.file, self.spilled = array("d"), None, 0

    def append(self, x: float) -> None:
        buf = self.buf
        buf.append(x)
        if len(buf) >= _SPILL_ROWS:
            if self.file is None:
                self.file = tempfile.TemporaryFile()
            buf.tofile(self.file)
            self.spilled += len(buf)
            self.buf = array("d")

    def __len__(self) -> int:
        return self.spilled + len(self.buf)

    def values(self) -> np.ndarray:
        """All values in the order appended, as a fresh array the caller may reorder."""
        out = np.empty(len(self), np.float64)
        if self.file is not None:
            self.file.flush()
            self.file.seek(0)
            self.file.readinto(memoryview(out[:self.spilled]).cast("B"))
        out[self.spilled:] = np.frombuffer(self.buf, dtype=np.float64) if len(self.buf) else 0.0
        return out


class Metrics:
    def __init__(self, out_dir: Path | None, slo_ttft_ms: float, slo_tpot_ms: float):
        self.slo_ttft_ms, self.slo_tpot_ms = slo_ttft_ms, slo_tpot_ms
        self._req_fh = self._it_fh = None
        if out_dir is not None:
            self._req_fh = open(out_dir / "requests.csv", "w")
            self._req_fh.write(",".join(REQUEST_COLUMNS) + "\n")
            self._it_fh = open(out_dir / "iterations.csv", "w")
            self._it_fh.write(",".join(ITERATION_COLUMNS) + "\n")
        self._req_rows: list[str] = []
        self._it_rows: list[tuple] = []
        # per-request latencies kept for exact percentiles (spilled to a temporary file past _SPILL_ROWS);
        # output tokens and SLO hits only as sums
        self.ttft, self.tpot, self.e2e = _Column(), _Column(), _Column()
        self.out_tokens = self.good_tokens = self.good_requests = 0
        self.first_arrival = float("inf")
        self.last_arrival = 0.0
        self.last_finish = 0.0
        self.prompt_tokens = 0  # summed, for the load estimate
        # per-iteration sums
        self.iterations = self.decode_iterations = 0
        self.request_steps = self.verified_tokens = self.accepted = self.prefill_tokens = 0
        self.draft_ms = self.verify_ms = self.lm_head_ms = self.overhead_ms = 0.0

    def iteration(self, end_s, start_s, replica, batch, prefill_tokens, verified, accepted, draft_ms, verify_ms,
                  lm_head_ms, overhead_ms, kv_tokens, waiting):
        """One iteration; its step time in parts (ms), as cost_models' StepTime splits it."""
        self.iterations += 1
        if batch:
            self.decode_iterations += 1
            self.request_steps += batch
            self.verified_tokens += verified
            self.accepted += accepted
        self.prefill_tokens += prefill_tokens
        d, v, h, o = float(draft_ms), float(verify_ms), float(lm_head_ms), float(overhead_ms)
        self.draft_ms += d
        self.verify_ms += v
        self.lm_head_ms += h
        self.overhead_ms += o
        if self._it_fh is not None:
            self._it_rows.append((replica, start_s, end_s, batch, prefill_tokens, verified, accepted, d, v, h, o,
                                  d + v + h + o, kv_tokens, waiting))
            if len(self._it_rows) >= _FLUSH_ROWS:
                self._flush_iterations()

    def part_sums(self) -> np.ndarray:
        """The step-time parts summed so far (draft, verify, LM head, overhead ms), for a compiled loop that adds
        its iterations' parts in order (`decode_iterations_made` takes them back)."""
        return np.array([self.draft_ms, self.verify_ms, self.lm_head_ms, self.overhead_ms], np.float64)

    def decode_iterations_made(self, replica, n: int, counts: np.ndarray, part_sums: np.ndarray, sums: np.ndarray,
                               times: np.ndarray, parts: np.ndarray, kv_after: np.ndarray, waiting: int) -> None:
        """n decode-only iterations at once, as `iteration` records them one by one: `counts` their batch, tokens
        verified and drafts accepted summed; `part_sums` the part sums with their parts added in order (from
        `part_sums`). For iterations.csv: `sums` [n, 5] their outcome sums (verified, accepted, batch, ...),
        `times` [n, 2] (start, end) s, `parts` [n, 4] ms, `kv_after` [n] the KV tokens after each, `waiting` the
        queue's length throughout."""
        if not n:
            return
        batch, verified, accepted = counts.tolist()
        self.iterations += n
        self.decode_iterations += n
        self.request_steps += batch
        self.verified_tokens += verified
        self.accepted += accepted
        self.draft_ms, self.verify_ms, self.lm_head_ms, self.overhead_ms = part_sums.tolist()
        if self._it_fh is not None:
            for (v, a, b, _, _), (s0, s1), (d, v_ms, h, o), kv in zip(sums.tolist(), times.tolist(), parts.tolist(),
                                                                      kv_after.tolist(), strict=True):
                self._it_rows.append((replica, s0, s1, b, 0, v, a, d, v_ms, h, o, d + v_ms + h + o, kv, waiting))
            if len(self._it_rows) >= _FLUSH_ROWS:
                self._flush_iterations()

    def request(self, r, finish_s: float, replica: int) -> None:
        ttft = (r.first_token_s - r.arrival_s) * 1000.0
        e2e = (finish_s - r.arrival_s) * 1000.0
        self.ttft.append(ttft)
        self.e2e.append(e2e)
        self.out_tokens += r.output_tokens
        if r.output_tokens > 1:
            tpot = (finish_s - r.first_token_s) * 1000.0 / (r.output_tokens - 1)
            self.tpot.append(tpot)
            good = ttft <= self.slo_ttft_ms and tpot <= self.slo_tpot_ms
            tpot_text = f"{tpot:.3f}"
        else:   # no TPOT: nothing follows the first token
            good = ttft <= self.slo_ttft_ms
            tpot_text = ""
        if good:
            self.good_requests += 1
            self.good_tokens += r.output_tokens
        self.first_arrival = min(self.first_arrival, r.arrival_s)
        self.last_arrival = max(self.last_arrival, r.arrival_s)
        self.last_finish = max(self.last_finish, finish_s)
        self.prompt_tokens += r.prompt_tokens
        if self._req_fh is not None:
            mat = (r.accepted + r.steps) / r.steps if r.steps else 1.0
            rid = "" if r.id is None else str(r.id).replace(",", ";")
            self._req_rows.append(
                f"{r.index},{rid},{replica},{r.arrival_s:.6f},{r.first_token_s:.6f},{finish_s:.6f},"
                f"{r.prompt_tokens},{r.output_tokens},{ttft:.3f},{tpot_text},{e2e:.3f},{r.steps},{r.accepted},"
                f"{r.verified},{mat:.4f},{r.preemptions}\n")
            if len(self._req_rows) >= _FLUSH_ROWS:
                self._req_fh.write("".join(self._req_rows))
                self._req_rows.clear()

    def _flush_iterations(self) -> None:
        fmt = "%d,%.6f,%.6f,%d,%d,%d,%d,%.4f,%.4f,%.4f,%.4f,%.4f,%d,%d\n"
        self._it_fh.write("".join([fmt % row for row in self._it_rows]))
        self._it_rows.clear()

    def close(self) -> None:
        if self._req_fh is not None:
            self._req_fh.write("".join(self._req_rows))
            self._req_rows.clear()
            self._req_fh.close()
        if self._it_fh is not None:
            self._flush_iterations()
            self._it_fh.close()

    def summary(self, preemptions: int) -> dict:
        n = len(self.e2e)
        makespan = max(self.last_finish - self.first_arrival, 1e-12) if n else 0.0
        out_tokens = self.out_tokens
        drafts = self.verified_tokens - self.request_steps
        total_ms = self.draft_ms + self.verify_ms + self.lm_head_ms + self.overhead_ms
        s = {
            "requests": n,
            "makespan_s": round(makespan, 6),
            "output_tokens": int(out_tokens),
            "throughput_tok_s": round(float(out_tokens) / makespan, 3) if n else 0.0,
            "goodput_tok_s": round(float(self.good_tokens) / makespan, 3) if n else 0.0,
            "slo_attainment": round(self.good_requests / n, 4) if n else 0.0,
            "request_rate_rps": round(n / makespan, 4) if n else 0.0,
            "mat": round((self.accepted + self.request_steps) / self.request_steps, 4) if self.request_steps else 0.0,
            "verification_waste": round((drafts - self.accepted) / drafts, 4) if drafts > 0 else 0.0,
            "mean_batch": round(self.request_steps / self.decode_iterations, 3) if self.decode_iterations else 0.0,
            "preemptions": int(preemptions),
            "iterations": self.iterations,
            "decode_request_steps": self.request_steps,
            "verified_tokens": self.verified_tokens,
            "accepted_drafts": self.accepted,
            "prefill_tokens": self.prefill_tokens,
            "step_ms_mean": round(total_ms / self.iterations, 4) if self.iterations else 0.0,
            "step_split": {k: round(v / total_ms, 4) if total_ms else 0.0 for k, v in (
                ("draft", self.draft_ms), ("verify", self.verify_ms), ("lm_head", self.lm_head_ms),
                ("overhead", self.overhead_ms))},
        }
        for name, col in (("ttft_ms", self.ttft), ("tpot_ms", self.tpot), ("e2e_ms", self.e2e)):
            if not len(col):
                s[name] = {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
                continue
            x = col.values()
            mean = float(x.mean())   # before the percentiles reorder x in place (no copy)
            p50, p90, p99 = np.percentile(x, [50, 90, 99], overwrite_input=True).tolist()
            s[name] = {"mean": round(mean, 3), "p50": round(p50, 3), "p90": round(p90, 3), "p99": round(p99, 3)}
            del x
        if len(self.tpot) != n:   # some 1-token outputs: say how many requests the TPOT figures cover
            s["tpot_ms"]["requests"] = len(self.tpot)
        return s


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")

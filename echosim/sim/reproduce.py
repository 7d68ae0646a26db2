"""`echosim reproduce paper`: every table and claim of the ECHO paper (arXiv 2604.09603) the simulator can speak to,
simulated with the paper's published settings where they exist and documented choices where they do not, side by
side with the paper's figures (data/paper/echo_reported.md, copied below).

Rows (each: paper figure, simulated figure, error, ordering right or wrong, why it may be off):
- batch1: batch-1 walltime speedup of ECHO over EAGLE-3, per model and dataset (Table 1; MAT and speedups over
  plain decoding in the details). The acceptance presets are calibrated to the paper's EAGLE-3 MAT at batch 1
  under each preset's own tree, so EAGLE-3's MAT matches by construction; ECHO's MAT and every speedup are
  predictions. The paper does not publish per-model batch-1 trees: EAGLE-3 uses each preset's tree, ECHO the same
  tree with the gates of the authors' reference implementation for that model (REFERENCE_GATES). Per model, the
  cheapest step the gates can make (every gate's threshold 1) bounds what ECHO can gain at batch 1.
- concurrency: Qwen3-8B throughput at batch 4..64 with the paper's SGLang settings per batch.
- crossover: the smallest batch at which EAGLE-3 falls below plain decoding (paper: 128 on Qwen3-235B and
  LLaMA3.3-70B); high-load tree (3, 3, 6) as the paper's Qwen3-8B high-load setting (not published per model).
- highload: ECHO vs EAGLE-3 at batch 128 on the largest models (paper: ECHO's gains persist; ordering only).
- verify_cost: LLaMA3.3-70B verification costs more than one autoregressive step at batch 128.
- ablation: full ECHO vs dense gating and vs one fixed threshold (paper: both lose; ordering only).

Workload everywhere: closed loop, input 100 / output 500 tokens (the paper's concurrency setup), H100 (TP 1 for
the 8B and 13B models, 2 for Qwen3-32B, 8 for LLaMA3.3-70B and Qwen3-235B), fitted H100 cost model, SGLang-style
defaults. `quick` shrinks the number of requests and seeds, not the set of rows.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from echosim.sim.config import ClusterConfig, SimConfig
from echosim.sim.simulator import simulate
from echosim.sim.workload import WorkloadSpec

MODELS = {  # paper name -> (catalog / preset name, TP on H100 80GB)
    "Vicuna-13B": ("vicuna-13b", 1),
    "LLaMA3.1-8B": ("llama-3.1-8b", 1),
    "LLaMA3.3-70B": ("llama-3.3-70b", 8),
    "Qwen3-8B": ("qwen3-8b", 1),
    "Qwen3-32B": ("qwen3-32b", 2),
    "Qwen3-235B": ("qwen3-235b-a22b", 8),
}
DATASETS = {"HumanEval": "humaneval", "GSM8K": "gsm8k", "CNN/DM": "cnn_dm", "Alpaca": "alpaca",
            "MT-Bench": "mt_bench"}
# Table 1 (batch 1): model -> method -> per dataset (MAT, speedup over autoregressive decoding)
BATCH1 = {
    "Vicuna-13B": {"EAGLE-3": [(8.49, 4.81), (6.82, 3.85), (6.41, 3.38), (6.49, 3.65), (6.83, 3.89)],
                   "ECHO": [(9.35, 5.25), (6.53, 4.08), (6.34, 3.53), (6.24, 3.74), (6.33, 4.12)]},
    "LLaMA3.1-8B": {"EAGLE-3": [(7.18, 4.02), (6.50, 3.94), (5.46, 3.02), (7.06, 4.01), (6.43, 3.63)],
                    "ECHO": [(7.22, 4.30), (6.28, 4.10), (5.24, 3.26), (6.81, 4.19), (6.23, 3.86)]},
    "LLaMA3.3-70B": {"EAGLE-3": [(7.12, 4.98), (6.53, 4.72), (5.19, 3.60), (6.95, 4.75), (5.92, 4.09)],
                     "ECHO": [(7.07, 5.35), (6.41, 5.08), (5.10, 3.79), (6.84, 4.94), (5.94, 4.32)]},
    "Qwen3-8B": {"EAGLE-3": [(3.91, 2.37), (3.94, 2.35), (3.28, 1.98), (3.46, 2.09), (3.71, 2.20)],
                 "ECHO": [(3.82, 2.74), (3.88, 2.68), (3.20, 2.37), (3.36, 2.51), (3.63, 2.57)]},
    "Qwen3-32B": {"EAGLE-3": [(2.99, 2.02), (3.32, 2.41), (2.55, 1.67), (2.83, 1.97), (3.04, 1.93)],
                  "ECHO": [(2.95, 2.37), (3.29, 2.72), (2.48, 1.93), (2.74, 2.31), (2.95, 2.25)]},
    "Qwen3-235B": {"EAGLE-3": [(2.41, 1.82), (2.73, 1.71), (2.02, 1.35), (2.35, 1.72), (2.54, 1.83)],
                   "ECHO": [(2.32, 2.23), (2.59, 1.92), (2.08, 1.63), (2.24, 2.07), (2.37, 2.23)]},
}
# Qwen3-8B under concurrency: batch -> (EAGLE-3 (steps, topk, N), ECHO from_sglang args, ECHO tok/s, EAGLE-3 tok/s)
CONCURRENCY = {
    4: ((5, 8, 32), (5, 8, 32, 3, 0.3, 20), 521.28, 457.43),
    8: ((5, 8, 32), (5, 8, 32, 3, 0.3, 20), 676.96, 517.37),
    16: ((5, 8, 32), (5, 8, 32, 3, 0.3, 20), 749.22, 549.91),
    32: ((3, 3, 6), (3, 3, 6, 2, 0.9, 4), 1909.19, 1799.37),
    64: ((3, 3, 6), (3, 3, 6, 2, 0.9, 4), 2091.53, 1900.13),
}
HIGHLOAD_TREE = (3, 3, 6)
HIGHLOAD_ECHO = (3, 3, 6, 2, 0.9, 4)
# Batch 1: the authors' reference implementation (echo_reported.md; its Qwen3-8B evaluation runs depth 5, top-k 8,
# 32 tokens on the EAGLE question sets of Table 1). Gates by loop index i (paths of i + 2 draft tokens: depth
# i + 2), per model where it notes them, else its code's own; gates deeper than the tree's steps never fire. A
# root below 0.2 does not deepen and widens to the top 20; a request that stops early spends the same token
# budget on width (remaining = num_draft_tokens).
REFERENCE_GATES = {"Qwen3-8B": ((2, 0.3), (4, 0.5)), "Qwen3-32B": ((1, 0.2), (4, 0.3)),
                   "LLaMA3.1-8B": ((4, 0.3), (8, 0.5))}
REFERENCE_CODE_GATES = ((1, 0.2), (4, 0.3))
REFERENCE_ROOT = (0.2, 20)  # (threshold, width)
CROSSOVER_BATCHES = (16, 32, 64, 128, 256)
CROSSOVER_PAPER = {"Qwen3-235B": 128, "LLaMA3.3-70B": 128}

MOE_NOTE = ("MoE: a 32-token verify tree touches ~112 of the 128 experts of each layer where a decode step touches 8 "
            "(expected distinct experts), so in the simulator verification costs several decode steps; the paper's "
            "deployment of this model (expert parallelism, precision) is not published")
WHY = {
    "batch1": "the paper does not publish its batch-1 trees per model: EAGLE-3 runs each acceptance preset's tree, "
              "ECHO that tree with the authors' reference implementation's gates for the model. ECHO's MAT is "
              "below EAGLE-3's, so its gain is a cheaper step (see 'Step costs at batch 1' below): on Vicuna and "
              "LLaMA the simulated saving matches the paper's (7-8%); on the Qwen models the paper's 16-19% is "
              "more than the gate can save under the kernel cost model even if every request stopped at it "
              "(3-4%: the gate at depth 4 or 3 of 5 skips one or two draft depths, each ~4% of an AR step on an "
              "H100); the paper's Qwen EAGLE-3 step costs 0.4-0.7 AR steps beyond an AR step where the kernels "
              "cost 0.15-0.26 (dense Qwen), i.e. its draft depths cost several times what the kernels do",
    "concurrency": "published settings; the paper's EAGLE-3 steps take 3.1-5.2x the kernel cost model's and each "
                   "added request costs 7-8x the kernels' marginal cost (see 'step times under concurrency' "
                   "below): the paper's engine pays per verified token far more than an H100's kernels do, which "
                   "makes ECHO's fewer verified tokens worth more there than here (batch 8 and 16)",
    "crossover": "the paper's high-load trees are not published (the Qwen3-8B batch 32-64 tree is used); the "
                 "crossover moves with the tree size. With --engine-overhead (a per-token cost fitted on Qwen3-8B "
                 "TP1 carried to these TP-8 models) it moves to batch 16-64, which the paper's own crossover "
                 "rules out: that overhead is not a per-token constant of the engine",
    "highload": "ordering only: the paper gives no number",
    "verify_cost": "a claim about step costs, from the fitted H100 cost model",
    "ablation": "ordering only: the paper gives no numbers; gates as in the published Qwen3-8B settings",
}


@dataclass
class Row:
    table: str
    key: str
    metric: str
    paper: float | None
    simulated: float
    error: float | None            # simulated - paper (points for gains, relative for the rest), None: no number
    ordering_ok: bool | None       # the sign / ordering the paper states, reproduced?
    within_5pt: bool | None        # gains only
    note: str = ""


@dataclass
class Scale:
    """How many requests per point: quick for CI, full for the numbers in docs/REPRODUCTION.md."""

    batch1_requests: int
    rounds: int
    highload_rounds: int
    seeds: int

    @classmethod
    def named(cls, quick: bool) -> Scale:
        return cls(2, 2, 1, 1) if quick else cls(8, 8, 2, 3)


def echo_policy(args) -> dict:
    from echosim.spec.policies import EchoConfig
    from echosim.spec.policies.base import config_to_json

    return {"policy": "echo", **config_to_json(EchoConfig.from_sglang(*args))}


def eagle_policy(tree) -> dict:
    steps, topk, n = tree
    return {"policy": "eagle3", "steps": steps, "topk": topk, "num_draft_tokens": n}


def reference_echo_policy(paper_model: str, tree: tuple[int, int, int], all_gated: bool = False) -> dict:
    """ECHO at batch 1 as the authors' reference implementation sets it for this model (REFERENCE_GATES) on the
    given tree. all_gated: every gate's threshold 1, so every request that passes the root stops at the first
    gate: the cheapest step the gates can make (a diagnostic, not a setting)."""
    from echosim.spec.budget import Budget
    from echosim.spec.policies import EchoConfig
    from echosim.spec.policies.base import config_to_json

    steps, topk, n = tree
    gates = [(i + 2, 1.0 if all_gated else tau) for i, tau in REFERENCE_GATES.get(paper_model, REFERENCE_CODE_GATES)
             if i + 2 <= steps]
    cfg = EchoConfig(steps=steps, topk=topk, num_draft_tokens=n, remaining_num_draft_tokens=n, gates=gates,
                     root_threshold=REFERENCE_ROOT[0], root_width=max(REFERENCE_ROOT[1], topk),
                     budget=Budget("per_request", n - 1))
    return {"policy": "echo", **config_to_json(cfg)}


def preset_tree(model: str) -> tuple[int, int, int]:
    from echosim.sim.acceptance import AcceptanceModel

    p = AcceptanceModel.preset(model).policy or {}
    return int(p.get("steps", 5)), int(p.get("topk", 8)), int(p.get("num_draft_tokens", 32))


NO_OVERHEAD = (None, 0.0, 0.0)


def run_point(model: str, tp: int, policy: dict, batch: int, requests: int, seed: int,
              dataset: str | None = None, overhead=NO_OVERHEAD, records: str | None = None) -> dict:
    cluster = ClusterConfig(model=model, hardware="h100", tp=tp, step_overhead_ms=overhead[0],
                            overhead_per_token_ms=overhead[1], overhead_per_draft_row_ms=overhead[2])
    config = SimConfig(cluster=cluster, policy=policy, acceptance=model, seed=seed,
                       core="exact" if records else "auto")
    workload = WorkloadSpec(kind="closed", concurrency=batch, requests=requests, prompt_tokens=100,
                            output_tokens=500, dataset=dataset)
    return simulate(config, workload, records=records).summary


def mean_point(model, tp, policy, batch, requests, seeds, dataset=None, overhead=NO_OVERHEAD) -> dict:
    runs = [run_point(model, tp, policy, batch, requests, s, dataset, overhead) for s in range(seeds)]
    return {k: float(np.mean([r[k] for r in runs])) for k in ("throughput_tok_s", "mat", "step_ms_mean")}


def fit_engine_overheads(rounds: int, tick=lambda msg: None) -> tuple[float, float, float]:
    """SGLang's engine work that no kernel profile holds (ms per step, per target token, per drafted row),
    fitted by non-negative least squares to the paper's EAGLE-3 throughputs of the Qwen3-8B table ONLY: the ECHO
    column stays out of sample. In a closed loop the sequence of batches does not depend on step times, so the
    makespan is linear in the three overheads: four runs per batch give the coefficients."""
    from scipy.optimize import nnls

    model, tp = MODELS["Qwen3-8B"]
    rows, rhs = [], []
    for batch, (tree, _, _, paper_eagle) in CONCURRENCY.items():
        pol = eagle_policy(tree)
        tick(f"engine overheads: EAGLE-3 batch {batch}")
        n = rounds * batch
        base = run_point(model, tp, pol, batch, n, 0)["makespan_s"]
        unit = [run_point(model, tp, pol, batch, n, 0, overhead=o)["makespan_s"] - base
                for o in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))]
        target = n * 500 / paper_eagle
        rows.append(np.array(unit) / target)
        rhs.append((target - base) / target)
    x, _ = nnls(np.array(rows), np.array(rhs))
    return float(x[0]), float(x[1]), float(x[2])


def gain_row(table, key, paper_gain, sim_gain, note="") -> Row:
    err = (sim_gain - paper_gain) * 100.0
    return Row(table, key, "ECHO over EAGLE-3 (%)", round(paper_gain * 100, 2), round(sim_gain * 100, 2),
               round(err, 2), bool(np.sign(sim_gain) == np.sign(paper_gain)), abs(err) <= 5.0, note)


class Reproduction:
    def __init__(self, scale: Scale, progress: Callable[[str], None] | None = None, only: set[str] | None = None,
                 engine_overhead: bool = False):
        self.scale, self.progress, self.only = scale, progress or (lambda msg: None), only
        self.engine_overhead = engine_overhead
        self.overhead = NO_OVERHEAD
        self.rows: list[Row] = []
        self.details: dict = {}
        self.curves: dict = {}
        self._n = 0

    def _tick(self, what: str) -> None:
        self._n += 1
        self.progress(f"[{self._n}] {what}")

    def want(self, table: str) -> bool:
        return self.only is None or table in self.only

    def batch1(self) -> None:
        sc = self.scale
        for paper_model, (model, tp) in MODELS.items():
            tree = preset_tree(model)
            pols = {"AR": {"policy": "ar"}, "EAGLE-3": eagle_policy(tree),
                    "ECHO": reference_echo_policy(paper_model, tree)}
            for j, (paper_ds, ds) in enumerate(DATASETS.items()):
                res = {}
                for name, pol in pols.items():
                    self._tick(f"batch1 {paper_model} {paper_ds} {name}")
                    res[name] = mean_point(model, tp, pol, 1, sc.batch1_requests, sc.seeds, ds, self.overhead)
                ar = res["AR"]["throughput_tok_s"]
                paper = {m: BATCH1[paper_model][m][j] for m in ("EAGLE-3", "ECHO")}
                detail = {}
                for m in ("EAGLE-3", "ECHO"):
                    sim_speedup = res[m]["throughput_tok_s"] / ar
                    # one speculative step's cost in AR steps: MAT / speedup (the paper's from its own columns)
                    detail[m] = {"paper_mat": paper[m][0], "sim_mat": round(res[m]["mat"], 3),
                                 "paper_speedup": paper[m][1], "sim_speedup": round(sim_speedup, 3),
                                 "paper_step_ar": round(paper[m][0] / paper[m][1], 3),
                                 "sim_step_ar": round(res[m]["mat"] / sim_speedup, 3)}
                if j == 0:
                    self._tick(f"batch1 {paper_model} ECHO gated on every step")
                    # threshold 1: every request stops drafting at the gate: the cheapest step ECHO's gate can make
                    gated = mean_point(model, tp, reference_echo_policy(paper_model, tree, all_gated=True), 1,
                                       sc.batch1_requests, sc.seeds, ds, self.overhead)
                    floor = gated["mat"] / (gated["throughput_tok_s"] / ar)
                    self.details[f"{paper_model} gate bound"] = {
                        "sim_step_ar_all_gated": round(floor, 3),
                        "sim_step_ar_eagle3": detail["EAGLE-3"]["sim_step_ar"],
                        "max_step_saving_pct": round((1 - floor / detail["EAGLE-3"]["sim_step_ar"]) * 100, 1)}
                key = f"{paper_model} / {paper_ds}"
                self.details[key] = detail
                paper_gain = paper["ECHO"][1] / paper["EAGLE-3"][1] - 1
                sim_gain = res["ECHO"]["throughput_tok_s"] / res["EAGLE-3"]["throughput_tok_s"] - 1
                moe = f"; {MOE_NOTE}" if model == "qwen3-235b-a22b" else ""
                self.rows.append(gain_row("batch1", key, paper_gain, sim_gain,
                                          f"trees {tree}; speedup over AR: paper EAGLE-3 {paper['EAGLE-3'][1]}x, "
                                          f"ECHO {paper['ECHO'][1]}x; simulated {detail['EAGLE-3']['sim_speedup']}x, "
                                          f"{detail['ECHO']['sim_speedup']}x{moe}"))

    def concurrency(self) -> None:
        sc = self.scale
        model, tp = MODELS["Qwen3-8B"]
        for batch, (tree, echo_args, paper_echo, paper_eagle) in CONCURRENCY.items():
            res = {}
            for name, pol in (("EAGLE-3", eagle_policy(tree)), ("ECHO", echo_policy(echo_args))):
                self._tick(f"concurrency Qwen3-8B batch {batch} {name}")
                res[name] = mean_point(model, tp, pol, batch, sc.rounds * batch, sc.seeds, overhead=self.overhead)
            e, g = res["ECHO"]["throughput_tok_s"], res["EAGLE-3"]["throughput_tok_s"]
            # the step time the paper's throughput implies at the simulated MAT (the paper gives no MAT here)
            step = {m: {"paper": round(batch * res[m]["mat"] / tok * 1000, 2),
                        "sim": round(batch * res[m]["mat"] / res[m]["throughput_tok_s"] * 1000, 2)}
                    for m, tok in (("ECHO", paper_echo), ("EAGLE-3", paper_eagle))}
            self.details[f"Qwen3-8B batch {batch}"] = {
                "paper_tok_s": {"ECHO": paper_echo, "EAGLE-3": paper_eagle},
                "sim_tok_s": {"ECHO": round(e, 1), "EAGLE-3": round(g, 1)},
                "sim_mat": {"ECHO": round(res["ECHO"]["mat"], 3), "EAGLE-3": round(res["EAGLE-3"]["mat"], 3)},
                "step_ms": step}
            self.rows.append(gain_row("concurrency", f"Qwen3-8B batch {batch}", paper_echo / paper_eagle - 1,
                                      e / g - 1, f"EAGLE-3 {tree}, ECHO {echo_args}; EAGLE-3 tok/s paper "
                                      f"{paper_eagle:.0f}, simulated {g:.0f}"))

    def crossover(self) -> None:
        sc = self.scale
        for paper_model, paper_batch in CROSSOVER_PAPER.items():
            model, tp = MODELS[paper_model]
            ratios, echo_gain = {}, None
            for b in CROSSOVER_BATCHES:
                res = {}
                pols = {"AR": {"policy": "ar"}, "EAGLE-3": eagle_policy(HIGHLOAD_TREE)}
                if b == 128:
                    pols["ECHO"] = echo_policy(HIGHLOAD_ECHO)
                for name, pol in pols.items():
                    self._tick(f"crossover {paper_model} batch {b} {name}")
                    res[name] = mean_point(model, tp, pol, b, sc.highload_rounds * b, 1, overhead=self.overhead)
                ratios[b] = res["EAGLE-3"]["throughput_tok_s"] / res["AR"]["throughput_tok_s"]
                if b == 128:
                    echo_gain = res["ECHO"]["throughput_tok_s"] / res["EAGLE-3"]["throughput_tok_s"] - 1
            self.curves[paper_model] = {str(b): round(r, 4) for b, r in ratios.items()}
            below = [b for b in CROSSOVER_BATCHES if ratios[b] < 1.0]
            sim_batch = below[0] if below else None
            steps = list(CROSSOVER_BATCHES)
            ok = sim_batch is not None and abs(steps.index(sim_batch) - steps.index(paper_batch)) <= 1
            self.rows.append(Row("crossover", paper_model, "first batch with EAGLE-3 below AR", paper_batch,
                                 sim_batch if sim_batch is not None else float("nan"), None, ok, None,
                                 "EAGLE-3 / AR throughput by batch: " + ", ".join(
                                     f"{b}: {r:.2f}" for b, r in ratios.items())))
            self.rows.append(Row("highload", f"{paper_model} batch 128", "ECHO over EAGLE-3 (%)", None,
                                 round(echo_gain * 100, 2), None, echo_gain > 0, None,
                                 f"ECHO {HIGHLOAD_ECHO}, EAGLE-3 {HIGHLOAD_TREE}"))

    def verify_cost(self) -> None:
        from cost_models import FittedCostModel

        model, tp = MODELS["LLaMA3.3-70B"]
        m = FittedCostModel(model, tp=tp)
        b, ctx = 128, 600.0
        n = HIGHLOAD_TREE[2]
        ratio = float(m.verify_ms(n * b, b * ctx, b) / m.ar_step_ms(b, ctx))
        self.rows.append(Row("verify_cost", "LLaMA3.3-70B batch 128", "verify / AR step time", None, round(ratio, 3),
                             None, ratio > 1.0, None, f"{n} tokens per request, context {ctx:g}"))

    def ablation_configs(self, batch: int, args: tuple) -> dict[str, dict]:
        """ECHO with the paper's published gate; the two ablations calibrated, as the paper describes them, on a
        warm-up run's per-node records (ECHO's tree drafted to full depth, no gate): dense gating with a
        threshold calibrated at every depth, and one threshold calibrated on all depths pooled. token_cost:
        a verified draft's cost relative to the step at this batch, from the cost model."""
        import tempfile

        from cost_models import FittedCostModel
        from echosim.spec.calibrate import calibrate, calibrate_fixed
        from echosim.spec.policies import EchoConfig
        from echosim.spec.policies.base import config_to_json
        from echosim.spec.records import read_records

        model, tp = MODELS["Qwen3-8B"]
        base = EchoConfig.from_sglang(*args)
        cm = FittedCostModel(model, tp=tp)
        n = base.num_draft_tokens
        step = float(cm.verify_ms(float(batch), batch * 600.0, batch))
        token_cost = (float(cm.verify_ms(float(batch * n), batch * 600.0, batch)) - step) / (batch * (n - 1)) / step
        with tempfile.TemporaryDirectory() as tmp:
            rec = str(Path(tmp) / "warmup.jsonl")
            self._tick(f"ablation warm-up records Qwen3-8B batch {batch}")
            run_point(model, tp, {"policy": "echo", **config_to_json(base), "gates": []}, batch,
                      max(2 * batch, 4), 1000, records=rec, overhead=self.overhead)
            records = read_records(rec)
        dense = calibrate(records, base=base, max_gates=base.steps - 1, token_cost=token_cost,
                          min_auroc=0.0).config
        fixed = calibrate_fixed(records, base=base, token_cost=token_cost).config
        self.details[f"ablation batch {batch}"] = {"token_cost": round(token_cost, 5), "dense_gates": dense.gates,
                                                   "fixed_threshold": fixed.fixed_threshold}
        return {"echo": echo_policy(args),
                "echo_dense": {**config_to_json(dense), "policy": "echo_dense"},
                "echo_fixed": {**config_to_json(fixed), "policy": "echo_fixed"}}

    def ablation(self) -> None:
        sc = self.scale
        model, tp = MODELS["Qwen3-8B"]
        for batch, args in ((1, (5, 8, 32, 3, 0.3, 20)), (16, CONCURRENCY[16][1])):
            pols = self.ablation_configs(batch, args)
            res = {}
            for name, pol in pols.items():
                self._tick(f"ablation Qwen3-8B batch {batch} {name}")
                res[name] = mean_point(model, tp, pol, batch, max(sc.rounds * batch, sc.batch1_requests), sc.seeds,
                                       overhead=self.overhead)
            for abl in ("echo_dense", "echo_fixed"):
                g = res["echo"]["throughput_tok_s"] / res[abl]["throughput_tok_s"] - 1
                self.rows.append(Row("ablation", f"Qwen3-8B batch {batch}: echo vs {abl}", "ECHO over ablation (%)",
                                     None, round(g * 100, 2), None, g >= 0, None,
                                     f"MAT echo {res['echo']['mat']:.2f}, {abl} {res[abl]['mat']:.2f}"))

    def run(self) -> dict:
        t0 = time.perf_counter()
        if self.engine_overhead:
            self.overhead = fit_engine_overheads(max(self.scale.rounds, 4), self._tick)
            self.details["engine_overheads"] = {"step_ms": round(self.overhead[0], 4),
                                                "per_target_token_ms": round(self.overhead[1], 5),
                                                "per_draft_row_ms": round(self.overhead[2], 5)}
        for name in ("batch1", "concurrency", "crossover", "verify_cost", "ablation"):
            if self.want(name) or (name == "verify_cost" and self.want("crossover")):
                getattr(self, name)()
        return self.summary(time.perf_counter() - t0)

    def summary(self, wall_s: float) -> dict:
        gains = [r for r in self.rows if r.metric == "ECHO over EAGLE-3 (%)" and r.paper is not None]
        ordered = [r for r in self.rows if r.table in ("batch1", "concurrency", "highload")]
        cross = [r for r in self.rows if r.table == "crossover"]

        def share(rows, attr):
            return round(sum(bool(getattr(r, attr)) for r in rows) / len(rows), 4) if rows else None

        return {"echo_vs_eagle3_rows": len(ordered), "ordering_right": share(ordered, "ordering_ok"),
                "gain_rows": len(gains), "within_5_points": share(gains, "within_5pt"),
                "crossover_within_one_step": share(cross, "ordering_ok"), "wall_s": round(wall_s, 1),
                "scale": asdict(self.scale), "engine_overheads": self.details.get("engine_overheads")}


def plots(rep: Reproduction, out: Path) -> list[str]:
    """gains.png (simulated vs paper gains) and crossover.png; none without matplotlib (extra `reproduce`)."""
    try:
        import matplotlib
    except ImportError:
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    gains = [r for r in rep.rows if r.metric == "ECHO over EAGLE-3 (%)" and r.paper is not None]
    if gains:
        fig, ax = plt.subplots(figsize=(6, 6))
        for table, marker in (("batch1", "o"), ("concurrency", "s")):
            rows = [r for r in gains if r.table == table]
            ax.scatter([r.paper for r in rows], [r.simulated for r in rows], marker=marker, label=table)
        lim = [min(min(r.paper for r in gains), min(r.simulated for r in gains)) - 5,
               max(max(r.paper for r in gains), max(r.simulated for r in gains)) + 5]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.fill_between(lim, [v - 5 for v in lim], [v + 5 for v in lim], color="grey", alpha=0.15, label="±5 pt")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_xlabel("paper: ECHO over EAGLE-3 (%)")
        ax.set_ylabel("simulated (%)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "gains.png", dpi=110)
        plt.close(fig)
        files.append("gains.png")
    if rep.curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, curve in rep.curves.items():
            ax.plot([int(b) for b in curve], list(curve.values()), marker="o", label=name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axvline(128, color="grey", ls=":", label="paper: below AR at 128")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (concurrency)")
        ax.set_ylabel("EAGLE-3 / AR throughput")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "crossover.png", dpi=110)
        plt.close(fig)
        files.append("crossover.png")
    return files


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "right" if v else "WRONG"
    if isinstance(v, float) and v != v:
        return "none"
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def report_markdown(rep: Reproduction, summary: dict, command: str, date: str, images: list[str]) -> str:
    lines = [f"# ECHO paper, reproduced by the simulator ({date})", "", f"Command: `{command}`", "",
             f"- ECHO vs EAGLE-3 ordering right: {summary['ordering_right']:.0%} of {summary['echo_vs_eagle3_rows']} "
             "rows (target >= 90%)" if summary["ordering_right"] is not None else "- no ordering rows",
             f"- gains within 5 points: {summary['within_5_points']:.0%} of {summary['gain_rows']} rows "
             "(target >= 60%)" if summary["within_5_points"] is not None else "- no gain rows",
             f"- EAGLE-3-below-AR crossover within one batch step: {summary['crossover_within_one_step']:.0%}"
             if summary["crossover_within_one_step"] is not None else "- no crossover rows",
             "- engine overheads " + (f"(sensitivity run) fitted to the paper's EAGLE-3 Qwen3-8B throughputs only "
                                      f"(ECHO out of sample) and carried to every model: {summary['engine_overheads']}"
                                      if summary["engine_overheads"] else "off (default): the kernel cost model "
                                      "alone"), ""]
    for table in ("batch1", "concurrency", "crossover", "highload", "verify_cost", "ablation"):
        rows = [r for r in rep.rows if r.table == table]
        if not rows:
            continue
        lines += [f"## {table}", "", f"Why rows may be off: {WHY[table]}.", "",
                  "| row | metric | paper | simulated | error | ordering | within 5 pt | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r.key} | {r.metric} | {fmt(r.paper)} | {fmt(r.simulated)} | {fmt(r.error)} | "
                         f"{fmt(r.ordering_ok)} | {fmt(r.within_5pt)} | {r.note} |")
        lines.append("")
    lines += diagnostics_markdown(rep)
    lines += [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def diagnostics_markdown(rep: Reproduction) -> list[str]:
    """Why the gain rows are off, in numbers: what one speculative step costs in AR steps (MAT / speedup) in the
    paper and in the simulator, the cheapest step ECHO's gate can make in the simulator, and the step times the
    paper's concurrency throughputs imply against the simulated ones."""
    d, lines = rep.details, []
    models = [m for m in MODELS if f"{m} gate bound" in d]
    if models:
        lines += ["## Step costs at batch 1 (AR steps per speculative step = MAT / speedup, mean over datasets)", "",
                  "ECHO can beat EAGLE-3 at batch 1 only by making a step cheaper (its MAT is lower). The paper's "
                  "columns say by how much; the simulator's gate floor (threshold 1: every request stops at the "
                  "gate) is the most the gate can save under the cost model.", "",
                  "| model | paper EAGLE-3 | paper ECHO | paper saving | sim EAGLE-3 | sim ECHO | sim saving | "
                  "sim floor (all gated) | most the gate saves |", "|---|---|---|---|---|---|---|---|---|"]
        for m in models:
            rows = [d[f"{m} / {ds}"] for ds in DATASETS if f"{m} / {ds}" in d]
            pe, ph = (np.mean([r[k]["paper_step_ar"] for r in rows]) for k in ("EAGLE-3", "ECHO"))
            se, sh = (np.mean([r[k]["sim_step_ar"] for r in rows]) for k in ("EAGLE-3", "ECHO"))
            b = d[f"{m} gate bound"]
            lines.append(f"| {m} | {pe:.2f} | {ph:.2f} | {(1 - ph / pe) * 100:.0f}% | {se:.2f} | {sh:.2f} | "
                         f"{(1 - sh / se) * 100:.0f}% | {b['sim_step_ar_all_gated']:.2f} | "
                         f"{b['max_step_saving_pct']:.0f}% |")
        lines.append("")
    batches = [b for b in CONCURRENCY if f"Qwen3-8B batch {b}" in d]
    if batches:
        lines += ["## Qwen3-8B step times under concurrency (EAGLE-3)", "",
                  "The step time the paper's throughput implies at the simulated MAT, against the simulated step; "
                  "the marginal cost of one more request per step between batches with the same tree; how much "
                  "cheaper ECHO's step is than EAGLE-3's (each at its own simulated MAT).", "",
                  "| batch | tree | paper-implied step ms | simulated step ms | ratio | paper ms per added request | "
                  "simulated ms per added request | ECHO's step saving: paper / simulated |",
                  "|---|---|---|---|---|---|---|---|"]
        prev = None
        for b in batches:
            st = d[f"Qwen3-8B batch {b}"]["step_ms"]["EAGLE-3"]
            tree = CONCURRENCY[b][0]
            marg = ("-", "-")
            if prev is not None and prev[1] == tree:
                marg = (f"{(st['paper'] - prev[2]['paper']) / (b - prev[0]):.2f}",
                        f"{(st['sim'] - prev[2]['sim']) / (b - prev[0]):.2f}")
            he = d[f"Qwen3-8B batch {b}"]["step_ms"]["ECHO"]
            save = f"{(1 - he['paper'] / st['paper']) * 100:.0f}% / {(1 - he['sim'] / st['sim']) * 100:.0f}%"
            lines.append(f"| {b} | {tree} | {st['paper']:.1f} | {st['sim']:.1f} | {st['paper'] / st['sim']:.2f} | "
                         f"{marg[0]} | {marg[1]} | {save} |")
            prev = (b, tree, st)
        lines.append("")
    return lines


def write_report(rep: Reproduction, summary: dict, out: Path, command: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    images = plots(rep, out)
    (out / "rows.json").write_text(json.dumps({"summary": summary, "command": command, "date": date,
                                               "rows": [asdict(r) for r in rep.rows], "details": rep.details,
                                               "crossover_curves": rep.curves}, indent=2) + "\n")
    path = out / "report.md"
    path.write_text(report_markdown(rep, summary, command, date, images))
    return path

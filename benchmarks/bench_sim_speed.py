"""Simulator speed: the full hour of the Azure LLM 2023 conversation trace (19,366 requests, shipped as
traces/azure_conv_2023_1h.csv.gz) at its real rate, on one H100-modelled replica of Qwen3-8B (the default
`echosim run` cluster). For each policy, side by side in one process: simulated time / wall time, iterations (SimPy
events of the replica loop) per second, requests per second.

    python benchmarks/bench_sim_speed.py                 # ar, eagle3, echo, echo with a goodput budget; full hour
    python benchmarks/bench_sim_speed.py --policies 'echo{"budget":{"kind":"goodput","tokens":31}}' --requests 2000
    python benchmarks/bench_sim_speed.py --core exact --policies echo --requests 2000
    python benchmarks/bench_sim_speed.py --profile --policies echo     # cProfile's top functions instead
    python benchmarks/bench_sim_speed.py --synthetic 1000000            # memory: a 1M-request stream, peak RSS
    python benchmarks/bench_sim_speed.py --jit --policies echo          # every policy's decode runs compiled
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRACE = ROOT / "traces" / "azure_conv_2023_1h.csv.gz"
POLICIES = 'ar,eagle3,echo,echo{"budget":{"kind":"goodput","tokens":31}}'


def _policy(spec: str) -> dict:
    name, brace, body = spec.partition("{")
    return {"policy": name.strip(), **(json.loads(brace + body) if brace else {})}


def run_one(policy: dict, args) -> dict:
    from echosim.sim.config import SimConfig
    from echosim.sim.simulator import simulate
    from echosim.sim.workload import WorkloadSpec

    config = SimConfig(policy=policy, core=args.core, seed=args.seed)
    if args.synthetic is not None:
        workload = WorkloadSpec(kind="poisson", rate_rps=args.rate, requests=args.synthetic, prompt_tokens=32,
                                output_tokens=4)
    else:
        workload = WorkloadSpec(kind="trace", trace=args.trace, requests=args.requests, time_scale=args.time_scale)
    out = Path(args.out) if args.out else None
    cpu0 = time.process_time()
    result = simulate(config, workload, out_dir=out)
    cpu = time.process_time() - cpu0
    s = result.summary
    sim = s["sim"]
    return {
        "policy": json.dumps(policy, separators=(",", ":")), "requests": s["requests"],
        "core": s["speculation"]["core"], "simulated_s": sim["simulated_s"], "wall_s": sim["wall_s"],
        "cpu_s": round(cpu, 3), "speedup_wall": sim["speedup"], "speedup_cpu": round(sim["simulated_s"] / cpu, 1),
        "iterations": s["iterations"], "iterations_per_s": sim["iterations_per_s"],
        "requests_per_s": sim["requests_per_s"], "table_build_s": s["speculation"].get("table_build_s"),
        "mat": s["mat"], "throughput_tok_s": s["throughput_tok_s"], "mean_batch": s["mean_batch"],
        "load_ratio": (s.get("load") or {}).get("load_ratio"),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--core", default="table")
    ap.add_argument("--policies", default=POLICIES,
                    help="comma-separated NAME or NAME{JSON settings} (commas inside {} belong to the item)")
    ap.add_argument("--requests", type=int, default=None, help="only the first N requests")
    ap.add_argument("--time-scale", type=float, default=1.0, help="arrival times x this (0.5 = twice the load)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the run folder here (CSV writing included)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--synthetic", type=int, default=None, metavar="N",
                    help="instead of the trace: N Poisson requests at --rate, prompt 32 / output 4 tokens "
                         "(many short requests: measures streaming and memory; reports peak RSS)")
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--jit", action="store_true",
                    help="every policy's decode runs through the compiled loop (ECHOSIM_JIT=1; by default only "
                         "goodput ECHO's, docs/SIMULATOR.md)")
    args = ap.parse_args()
    if args.jit:
        os.environ["ECHOSIM_JIT"] = "1"
    if args.synthetic is None and not Path(args.trace).is_file():
        print(f"trace not found: {args.trace}", file=sys.stderr)
        return 1
    from echosim.commands.run import split_items

    policies = [_policy(p) for p in split_items(args.policies)]
    if args.profile:
        import cProfile
        import pstats

        for policy in policies:
            prof = cProfile.Profile()
            prof.runcall(run_one, policy, args)
            print(f"== {policy}")
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return 0
    rows = [run_one(policy, args) for policy in policies]
    print(json.dumps(rows, indent=2))
    # CPU time too: on a shared machine wall time also counts the other jobs' turns on the cores
    print(f"\n{'policy':<55}{'sim s':>9}{'wall s':>9}{'x real':>9}{'cpu s':>9}{'x (cpu)':>9}{'iters':>9}")
    for r in rows:
        print(f"{r['policy']:<55}{r['simulated_s']:>9.1f}{r['wall_s']:>9.2f}{r['speedup_wall']:>9.0f}"
              f"{r['cpu_s']:>9.2f}{r['speedup_cpu']:>9.0f}{r['iterations']:>9,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

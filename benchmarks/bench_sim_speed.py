"""Simulator speed: the full hour of the Azure LLM 2023 conversation trace (19,366 requests) at its real rate, on one
H100-modelled replica of Qwen3-8B with echo (the default `echosim run` setup). Reports simulated time / wall time,
iterations (SimPy events of the replica loops) per second and requests per second, for the table and exact cores.

    python benchmarks/bench_sim_speed.py                 # table core (the default), full hour
    python benchmarks/bench_sim_speed.py --core exact --requests 2000
    python benchmarks/bench_sim_speed.py --profile       # cProfile's top functions instead
    python benchmarks/bench_sim_speed.py --synthetic 1000000 --out /tmp/run1m   # memory: a 1M-request stream
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRACE = ROOT.parent / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--core", default="table")
    ap.add_argument("--policy", default="echo")
    ap.add_argument("--requests", type=int, default=None, help="only the first N requests")
    ap.add_argument("--out", default=None, help="also write the run folder here (CSV writing included)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--synthetic", type=int, default=None, metavar="N",
                    help="instead of the trace: N Poisson requests at --rate, prompt 32 / output 4 tokens "
                         "(many short requests: measures streaming and memory; reports peak RSS)")
    ap.add_argument("--rate", type=float, default=300.0)
    args = ap.parse_args()
    if args.synthetic is None and not Path(args.trace).is_file():
        print(f"trace not found: {args.trace} (needs ../shared/data)", file=sys.stderr)
        return 1

    from echosim.sim.config import SimConfig
    from echosim.sim.simulator import simulate
    from echosim.sim.workload import WorkloadSpec

    config = SimConfig(policy={"policy": args.policy}, core=args.core)
    if args.synthetic is not None:
        workload = WorkloadSpec(kind="poisson", rate_rps=args.rate, requests=args.synthetic, prompt_tokens=32,
                                output_tokens=4)
    else:
        workload = WorkloadSpec(kind="trace", trace=args.trace, requests=args.requests)
    out = Path(args.out) if args.out else None
    if args.profile:
        import cProfile
        import pstats

        cProfile.runctx("simulate(config, workload, out_dir=out)", globals(), locals(), "/tmp/bench_sim.prof")
        pstats.Stats("/tmp/bench_sim.prof").sort_stats("tottime").print_stats(25)
        return 0
    cpu0 = time.process_time()
    result = simulate(config, workload, out_dir=out)
    cpu = time.process_time() - cpu0
    s = result.summary
    sim = s["sim"]
    import resource

    report = {
        "trace": f"synthetic poisson {args.rate:g} req/s" if args.synthetic else Path(args.trace).name,
        "requests": s["requests"], "policy": args.policy,
        "core": s["speculation"]["core"], "simulated_s": sim["simulated_s"], "wall_s": sim["wall_s"],
        "cpu_s": round(cpu, 3), "speedup_wall": sim["speedup"],
        "speedup_cpu": round(sim["simulated_s"] / cpu, 1), "iterations": s["iterations"],
        "iterations_per_s": sim["iterations_per_s"], "events": sim["events"], "events_per_s": sim["events_per_s"],
        "requests_per_s": sim["requests_per_s"],
        "table_build_s": s["speculation"].get("table_build_s"), "mat": s["mat"],
        "throughput_tok_s": s["throughput_tok_s"], "mean_batch": s["mean_batch"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

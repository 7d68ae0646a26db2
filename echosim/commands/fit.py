"""`echosim fit`: fit the step-time model's rates and overheads to kernel profiles, write parameters + statistics.

    echosim fit --profiles ../shared/data/profiles/h100/vidur/Llama-2-7b-hf_mlp.csv \
        ../shared/data/profiles/h100/vidur/h100_dgx_all_reduce.csv --out cost_models/fitted/llama2.json
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("fit", help="fit a step-time model to kernel profiles",
                              description="Fit the roofline-shaped step-time model to profile CSVs (Vidur "
                                          "per-operator, Vidur attention, Vidur all-reduce, LLMServingSim per-layer, "
                                          "or `echosim profile` output) and write the parameters with fit "
                                          "statistics (held-out: fit on every other token count, test on the rest).")
    p.add_argument("--profiles", nargs="+", required=True, metavar="CSV", help="profile CSV files")
    p.add_argument("--out", help="output JSON (e.g. cost_models/fitted/<name>.json); required unless --evaluate")
    p.add_argument("--evaluate", metavar="FIT.json", default=None,
                   help="score an existing fit on the profiles instead of fitting: per file and per operator, the "
                        "median and P90 absolute percentage error (a shipped name such as h100 works too)")
    p.add_argument("--json", dest="json_out", metavar="OUT", default=None,
                   help="with --evaluate: write {\"files\": [{\"path\", \"median_ape_pct\", \"p90_ape_pct\", \"n\", "
                        "\"operators\"}, ...]}")
    p.add_argument("--hardware", default=None,
                   help="hardware the profiles ran on (catalog name, or any label for a machine not in the catalog; "
                        "default h100-sxm). With --evaluate: carry the fit to this hardware first (datasheet "
                        "ratios)")
    p.add_argument("--model", default=None,
                   help="model of LLMServingSim profiles (default: from the file name, e.g. Llama-3.1-8B_tp1_...)")
    p.add_argument("--step-overhead-ms", type=float, default=None,
                   help="per-iteration overhead to store (operator profiles do not measure it)")
    p.add_argument("--attn-kv-block", type=float, default=None,
                   help="KV tile (keys) the attention critical path walks whole: default 64 on catalog GPUs "
                        "(FlashAttention), 1 elsewhere")
    p.add_argument("--no-heldout", action="store_true", help="skip the held-out statistics (faster)")
    p.set_defaults(func=run)


def evaluate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from cost_models.fitted import evaluate_allreduce, evaluate_table, load_fit
    from cost_models.profiles import detect_format, read_allreduce, read_profile
    from echosim.errors import UserError

    prm, _ = load_fit(args.evaluate)
    if args.hardware:
        prm = prm.scaled_to(args.hardware)
    files = []
    for path in args.profiles:
        if not Path(path).is_file():
            raise UserError("no such profile file", path=path)
        if detect_format(path) == "allreduce":
            files.append(evaluate_allreduce(read_allreduce(path), prm))
        else:
            files.append(evaluate_table(read_profile(path, model=args.model), prm))
    for f in files:
        print(f"{f['path']}: {f['n']} points, median APE {f['median_ape_pct']}%, P90 {f['p90_ape_pct']}%")
        for name, o in f["operators"].items():
            print(f"  {name}: median {o['median_ape_pct']}%, P90 {o['p90_ape_pct']}% (n {o['n']})")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"fit": str(args.evaluate), "files": files}, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 0


def run(args: argparse.Namespace) -> int:
    import json
    from dataclasses import replace
    from pathlib import Path

    from cost_models.fitted import fit_allreduce, fit_params, heldout_stats
    from cost_models.profiles import concat, detect_format, read_allreduce, read_profile
    from cost_models.roofline import RooflineParams
    from cost_models.specs import known_hardware, load_hardware
    from echosim.errors import UserError

    if args.evaluate:
        return evaluate(args)
    if not args.out:
        raise UserError("--out is required (or --evaluate FIT.json to score a fit)", field="--out")
    args.hardware = args.hardware or "h100-sxm"
    gpu = args.hardware.lower() in {h.lower() for h in known_hardware()}
    kv_block = args.attn_kv_block if args.attn_kv_block is not None else (64.0 if gpu else 1.0)
    if kv_block < 1:
        raise UserError(f"--attn-kv-block {kv_block}: must be >= 1")
    if gpu:
        base = RooflineParams.from_hardware(args.hardware)
    else:  # a machine outside the catalog (e.g. this CPU): neutral starting rates, everything is fitted
        base = RooflineParams(hardware=args.hardware, gemm_tflops=1.0, gemm_gbps=100.0, elem_gbps=100.0,
                              attn_tflops=1.0, attn_gbps=100.0)
    tables, stats, allreduce, allreduce_graph = [], {}, {}, {}
    for path in args.profiles:
        if not Path(path).is_file():
            raise UserError("no such profile file", path=path)
        if detect_format(path) == "allreduce":
            prof = read_allreduce(path)
            fit = fit_allreduce(prof)
            allreduce.update(fit)
            stats[path] = {"format": "allreduce", "world_sizes": fit}
            if prof.min_ms is not None:
                graph = fit_allreduce(prof, graph=True)
                allreduce_graph.update(graph)
                stats[path]["world_sizes_graph"] = graph
        else:
            tables.append(read_profile(path, model=args.model))
    params = base
    fitted: list[str] = []
    if tables:
        res = fit_params(concat(tables), base, kv_block=kv_block)
        params, fitted = res.params, res.fitted
        from cost_models.fitted import ape_stats, predict_obs

        for t in tables:
            entry = {"format": t.fmt, "model": t.model_name, "observations": t.n_obs,
                     "full_fit": ape_stats(predict_obs(t, params), t.obs_measured_ms)}
            if not args.no_heldout:
                entry["heldout"] = heldout_stats(t, base, kv_block=kv_block)
            stats[t.path] = entry
    if allreduce:
        params = replace(params, allreduce={w: [v["latency_us"], v["gbps"]] for w, v in allreduce.items()},
                         allreduce_graph={w: [v["latency_us"], v["gbps"]] for w, v in allreduce_graph.items()})
    if args.step_overhead_ms is not None:
        params = replace(params, step_overhead_ms=args.step_overhead_ms)
    out = {
        "kind": "fitted",
        "hardware": params.hardware,
        "params": params.to_dict(),
        "fitted_parameters": fitted + (["allreduce"] if allreduce else []),
        "profiles": [str(p) for p in args.profiles],
        "stats": stats,
        "command": f"echosim fit --profiles {' '.join(args.profiles)} --out {args.out} --hardware {args.hardware}"
                   + (f" --attn-kv-block {args.attn_kv_block:g}" if args.attn_kv_block is not None else ""),
    }
    try:
        hw = load_hardware(params.hardware)
    except UserError:
        hw = None  # a machine outside the catalog: no datasheet to compare with
    if hw is not None:
        out["nvlink_gbps"] = hw.nvlink_gbps
        out["fraction_of_datasheet"] = {
            "gemm_flops": round(params.gemm_tflops / hw.peak_bf16_tflops, 3),
            "gemm_bandwidth": round(params.gemm_gbps / (hw.hbm_tbps * 1000), 3),
            "elementwise_bandwidth": round(params.elem_gbps / (hw.hbm_tbps * 1000), 3),
            "attention_bandwidth": round(params.attn_gbps / (hw.hbm_tbps * 1000), 3),
            "attention_flops": round(params.attn_tflops / hw.peak_bf16_tflops, 3),
        }
    if allreduce:
        out["world_sizes"] = {str(w): v for w, v in allreduce.items()}
        if allreduce_graph:
            out["world_sizes_graph"] = {str(w): v for w, v in allreduce_graph.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for path, s in stats.items():
        if s["format"] == "allreduce":
            for w, v in s["world_sizes"].items():
                g = s.get("world_sizes_graph", {}).get(w)
                graph = f" (CUDA graph: latency {g['latency_us']} us)" if g else ""
                print(f"{path}: all-reduce TP{w}: latency {v['latency_us']} us, {v['gbps']} GB/s, "
                      f"median APE {v['median_ape_pct']}%{graph}")
        else:
            h = s.get("heldout", {}).get("test")
            held = f"; held-out median {h['median_ape_pct']}% P90 {h['p90_ape_pct']}%" if h else ""
            f = s["full_fit"]
            print(f"{path}: {s['observations']} points, fit median APE {f['median_ape_pct']}% "
                  f"P90 {f['p90_ape_pct']}%{held}")
    print(f"wrote {args.out}")
    return 0

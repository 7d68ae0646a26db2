"""`echosim validate`: strict replay of one trace through the real engine and the simulator (echosim.validate).

    echosim validate --trace synthetic_bursty_4rps --limit 48 --policy eagle3 --out runs/validate-eagle3

With --replay, no engine runs here: the simulator is compared with a replay that already ran (an `echosim replay`
folder against any server, e.g. SGLang on a GPU cluster, or a bench_serving / vLLM result file), with the step-time
fit, acceptance model and overheads the user names (docs/VALIDATION.md, "Validating a GPU cluster's run").

    echosim validate --replay runs/replay-h100 --model Qwen3-8B --draft EAGLE3-Qwen3-8B --policy eagle3 \
        --cost-model fits/h100/cost_fit.json --acceptance fits/acceptance.json --max-running 64 --out runs/val-h100
"""

from __future__ import annotations

from pathlib import Path

from echosim.commands.help_format import DefaultsHelpFormatter
from echosim.errors import UserError

# the shipped tiny pair (echo_exec/models), named without importing echo_exec (torch) at parser build time
MODELS_DIR = Path(__file__).resolve().parents[2] / "echo_exec" / "models"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "validate", help="strict replay: one trace through the engine and the simulator, with their errors",
        description="Run the same requests (arrivals and lengths) through the PyTorch engine behind its HTTP "
                    "server and through the simulator, whose step-time model is fitted from the engine's own "
                    "profile on this machine and whose acceptance model is fitted from the engine's records on "
                    "other prompts. Writes a run folder (profiles, fits, calibration, engine/, sim/, "
                    "validation.json) and prints the signed and absolute errors of throughput, MAT, TTFT, TPOT "
                    "and E2E. With --replay, the simulator against a replay that already ran (any server).",
        formatter_class=DefaultsHelpFormatter)
    p.add_argument("--trace", default="synthetic_bursty_4rps", help="trace file or shipped sample name")
    p.add_argument("--limit", "--num-prompts", dest="limit", type=int, default=48,
                   help="the trace's first N requests")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times by X")
    p.add_argument("--max-prompt-tokens", type=int, default=256, help="clip prompts to N tokens")
    p.add_argument("--max-output-tokens", type=int, default=64, help="clip outputs to N tokens")
    p.add_argument("--model", default=str(MODELS_DIR / "tiny-target"), help="target model directory")
    p.add_argument("--draft", default=str(MODELS_DIR / "tiny-draft"), help="draft model directory")
    p.add_argument("--policy", default="eagle3", help="speculation policy")
    p.add_argument("--policy-config", default=None,
                   help="policy settings: inline JSON or a JSON file (none = the draft directory's "
                        "policy-<policy>.json if it has one, as echosim serve)")
    p.add_argument("--max-running", type=int, default=16, help="most requests decoding at once")
    p.add_argument("--block-size", type=int, default=16, help="KV-cache block size (tokens)")
    p.add_argument("--max-prefill-tokens", type=int, default=512, help="prefill tokens per step")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks (none = room for max-running)")
    p.add_argument("--calibration-prompts", type=int, default=None,
                   help="calibration prompts (other files than the replay's), sent in bursts of each calibration "
                        "batch size (none = max(16, max-running): the largest batch is reached)")
    p.add_argument("--engine-runs", type=int, default=2,
                   help="replays through the engine (the second measures the machine's own noise)")
    p.add_argument("--sim-seeds", type=int, default=8,
                   help="simulated runs of the same replay, seeds --seed, --seed + 1, ...; the simulator is "
                        "compared by their mean (a few dozen requests are a small sample of its acceptance model)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run folder (none = runs/validate-<policy>)")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots (measured against simulated)")
    b = p.add_argument_group("the real backend (--backend sglang: SGLang's own server with echo's plugin)")
    b.add_argument("--backend", choices=("engine", "sglang"), default="engine",
                   help="what the simulator is set against: our PyTorch engine, or SGLang+ECHO (the policy runs in "
                        "SGLang's worker through --speculative-algorithm ECHO; plain SGLang for ar)")
    b.add_argument("--sglang-python", default=None,
                   help="an interpreter with sglang and the plugin (none = $ECHO_SGLANG_PYTHON; "
                        "echo_exec/sglang_cpu/make_venv.sh makes one)")
    b.add_argument("--url", default=None,
                   help="with --backend sglang: a running SGLang server instead of one started here (started with "
                        "SGLANG_LOG_MS=1, --decode-log-interval 1 and ECHO_SGLANG_RECORDS; docs/VALIDATION.md)")
    b.add_argument("--server-log", default=None, help="with --url: the server's log")
    b.add_argument("--server-records", default=None, help="with --url: the server's ECHO_SGLANG_RECORDS file")
    b.add_argument("--ragged-verify", action="store_true",
                   help="with --backend sglang: ECHO verifies only the selected nodes (echo's CPU kernels)")
    r = p.add_argument_group("validating an existing replay (--replay)")
    r.add_argument("--replay", default=None,
                   help="an echosim replay folder (requests.csv, summary.json), or a bench_serving / vLLM result file "
                        "with per-request details: simulate its requests and compare, without running an engine")
    r.add_argument("--cost-model", default=None,
                   help="with --replay: the step-time fit (.json from echosim fit, hardware.json beside it)")
    r.add_argument("--acceptance", default=None,
                   help="with --replay: an acceptance preset or fitted .json (e.g. echosim fit-acceptance on "
                        "serve --records); none = fitted here from --acceptance-records")
    r.add_argument("--acceptance-records", default=None,
                   help="with --replay: draft/accept records (serve --records) to fit the acceptance model from")
    r.add_argument("--overheads", default=None,
                   help="with --replay: the engine's per-step overheads (.json, as validate writes); none = zero")
    r.add_argument("--hardware", default=None,
                   help="with --replay: the GPU (catalog name or spec .json); none = hardware.json beside the fit")
    p.set_defaults(func=run)


def run_replay(args, policy: str, config: dict | None) -> int:
    import json

    from echosim.validate.crossval import CrossValConfig, format_comparison, validate_replay
    from echosim.validate.step_overheads import Overheads

    if args.sim_seeds < 1:
        raise UserError(f"--sim-seeds must be >= 1, got {args.sim_seeds}")
    if args.cost_model is None:
        raise UserError("--replay needs --cost-model (a step-time fit; echosim fit makes one from a profile)")
    acceptance = args.acceptance
    out = Path(args.out) if args.out else Path("runs") / f"validate-replay-{policy}"
    if acceptance is None:
        if args.acceptance_records is None:
            raise UserError("--replay needs --acceptance (preset or fitted .json) or --acceptance-records")
        from echosim.sim.acceptance_fit import fit_records
        from echosim.spec.records import read_records

        out.mkdir(parents=True, exist_ok=True)
        acceptance = str(out / "acceptance.json")
        fit_records(read_records(args.acceptance_records), name="replay-records").model.save(acceptance)
    over = Overheads(0.0, 0.0, 0.0)
    if args.overheads is not None:
        try:
            over = Overheads(**json.loads(Path(args.overheads).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise UserError(f"cannot read the overheads: {exc}", path=args.overheads) from None
    replay = Path(args.replay)
    if not replay.exists():
        raise UserError("no such replay folder or result file", path=args.replay)
    cfg = CrossValConfig(model=args.model, draft=None if policy == "ar" else args.draft, policy=policy,
                         policy_config=config, max_running=args.max_running, num_kv_blocks=args.num_kv_blocks,
                         block_size=args.block_size, max_prefill_tokens=args.max_prefill_tokens, seed=args.seed,
                         max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_output_tokens,
                         sim_seeds=args.sim_seeds)
    result = validate_replay(replay, cfg, Path(args.cost_model), acceptance, over, out, hardware=args.hardware)
    if not args.no_plots and (out / "validation.json").is_file():
        from echosim.plots import plot_validate

        plot_validate(out)
    print(format_comparison(result["metrics"]))
    print(f"run folder: {out} ({result['wall_s']:.0f} s)")
    return 0


def run(args) -> int:
    from echosim.commands.serve import policy_settings
    from echosim.validate.crossval import DRIFT_WARN, CrossValConfig, format_breakdown, format_comparison
    from echosim.validate.crossval import run as crossval

    # the settings `echosim serve` would run with the same draft directory
    policy, config, _ = policy_settings(args.policy_config, args.policy, args.draft)
    if args.replay is not None:
        return run_replay(args, policy, config)
    cfg = CrossValConfig(model=args.model, draft=None if policy == "ar" else args.draft, policy=policy,
                         policy_config=config, trace=args.trace, limit=args.limit, time_scale=args.time_scale,
                         max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_output_tokens,
                         max_running=args.max_running, num_kv_blocks=args.num_kv_blocks,
                         calibration_prompts=args.calibration_prompts, engine_runs=args.engine_runs,
                         sim_seeds=args.sim_seeds,
                         block_size=args.block_size, max_prefill_tokens=args.max_prefill_tokens,
                         device=args.device, threads=args.threads,
                         seed=args.seed)
    sglang = args.backend == "sglang"
    if not sglang and (args.url or args.server_log or args.server_records or args.ragged_verify):
        raise UserError("--url, --server-log, --server-records and --ragged-verify go with --backend sglang")
    if sglang and args.device != "cpu":
        raise UserError("--backend sglang runs SGLang on this CPU (--device cpu)", field="device")
    out = Path(args.out) if args.out else Path("runs") / f"validate-{'sglang-' if sglang else ''}{policy}"
    if out.exists() and not out.is_dir():
        raise UserError("the run folder is a file", path=str(out))
    if sglang:
        from echosim.validate import sglang_backend

        opts = sglang_backend.SglangOptions(python=args.sglang_python, url=args.url, server_log=args.server_log,
                                            server_records=args.server_records, ragged=args.ragged_verify)
        result = sglang_backend.run(cfg, out, opts)
    else:
        result = crossval(cfg, out)
    if not args.no_plots:
        from echosim.plots import plot_validate

        plot_validate(out)
    print(format_comparison(result["metrics"]))
    print(f"\nsteps, {'SGLang' if sglang else 'engine'} against simulator:")
    print(format_breakdown(result["steps"]))
    drift = result.get("replay_steps_over_priced")
    if drift is not None and abs(drift - 1.0) > DRIFT_WARN:
        print(f"warning: the replay's steps took {drift:.2f}x their calibrated price (median): the machine's speed "
              "moved between calibration and replay; run again")
    if result["overheads_suspect"]:
        print("warning: step prices unreliable (the profiled forwards and the calibration steps disagree, "
              "profiled twice): run again on a quieter machine")
    print(f"run folder: {out} ({result['wall_s']:.0f} s)")
    return 0

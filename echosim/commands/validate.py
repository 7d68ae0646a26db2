"""`echosim validate`: strict replay of one trace through the real engine and the simulator (echosim.validate).

    echosim validate --trace synthetic_bursty_4rps --limit 48 --policy eagle3 --out runs/validate-eagle3
"""

from __future__ import annotations

from pathlib import Path

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
                    "and E2E.")
    p.add_argument("--trace", default="synthetic_bursty_4rps", help="trace file or shipped sample name")
    p.add_argument("--limit", type=int, default=48, help="the trace's first N requests (default 48)")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times by X")
    p.add_argument("--max-prompt-tokens", type=int, default=256, help="clip prompts to N tokens (default 256)")
    p.add_argument("--max-output-tokens", type=int, default=64, help="clip outputs to N tokens (default 64)")
    p.add_argument("--model", default=str(MODELS_DIR / "tiny-target"), help="target model directory")
    p.add_argument("--draft", default=str(MODELS_DIR / "tiny-draft"), help="draft model directory")
    p.add_argument("--policy", default="eagle3", help="speculation policy (default eagle3)")
    p.add_argument("--policy-config", default=None,
                   help="policy settings: inline JSON or a JSON file (default: the draft directory's "
                        "policy-<policy>.json if it has one, as echosim serve)")
    p.add_argument("--max-running", type=int, default=16, help="most requests decoding at once (default 16)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks (default: room for max-running)")
    p.add_argument("--calibration-prompts", type=int, default=16,
                   help="calibration prompts (other files than the replay's) per batch size (default 16)")
    p.add_argument("--engine-runs", type=int, default=2,
                   help="replays through the engine (default 2: the second measures the machine's own noise)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run folder (default runs/validate-<policy>)")
    p.set_defaults(func=run)


def run(args) -> int:
    from echosim.commands.serve import policy_settings
    from echosim.validate.crossval import DRIFT_WARN, CrossValConfig, format_breakdown, format_comparison
    from echosim.validate.crossval import run as crossval

    # the settings `echosim serve` would run with the same draft directory
    policy, config, _ = policy_settings(args.policy_config, args.policy, args.draft)
    cfg = CrossValConfig(model=args.model, draft=None if policy == "ar" else args.draft, policy=policy,
                         policy_config=config, trace=args.trace, limit=args.limit, time_scale=args.time_scale,
                         max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_output_tokens,
                         max_running=args.max_running, num_kv_blocks=args.num_kv_blocks,
                         calibration_prompts=args.calibration_prompts, engine_runs=args.engine_runs,
                         device=args.device, threads=args.threads,
                         seed=args.seed)
    out = Path(args.out) if args.out else Path("runs") / f"validate-{policy}"
    if out.exists() and not out.is_dir():
        raise UserError("the run folder is a file", path=str(out))
    result = crossval(cfg, out)
    print(format_comparison(result["metrics"]))
    print("\nsteps, engine against simulator:")
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

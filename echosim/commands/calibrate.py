"""`echosim calibrate`: ECHO's sweet-spot depths and thresholds from per-node records."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="pick ECHO's gate depths and thresholds from per-node records",
                       description="Reads per-node records (JSON lines: step, request, depth, rank, draft_prob, "
                                   "path_prob, accepted) and writes an echo policy config (JSON).")
    p.add_argument("--records", required=True, help="per-node records, JSON lines")
    p.add_argument("-o", "--out", required=True, help="where to write the echo config (JSON)")
    p.add_argument("--base", help="an echo config (JSON) whose other settings to keep")
    p.add_argument("--max-gates", type=int, default=2, help="number of sweet-spot depths (default 2)")
    p.add_argument("--token-cost", type=float, default=0.02,
                   help="cost of one verified draft relative to a step's fixed cost (default 0.02)")
    p.add_argument("--fixed", action="store_true",
                   help="the fixed-threshold ablation: one tau for every depth, calibrated on all depths pooled "
                        "(writes an echo_fixed config)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from echosim.errors import UserError
    from echosim.spec.calibrate import calibrate, calibrate_fixed
    from echosim.spec.policies import ConfigError, load_policy, make_policy, save_policy
    from echosim.spec.records import read_records

    if args.max_gates < 0 or args.token_cost < 0:
        raise UserError("--max-gates and --token-cost must be >= 0")
    try:
        base_policy = load_policy(args.base) if args.base else None
        # an adaptive config (e.g. the shipped policy-echo.json) calibrates the gates of the ECHO inside it
        base = getattr(base_policy, "inner", base_policy).config if base_policy is not None else None
    except ConfigError as exc:
        raise UserError(str(exc), path=args.base) from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read config: {exc}", path=args.base) from None
    records = read_records(args.records)
    if args.fixed:
        cal = calibrate_fixed(records, base=base, token_cost=args.token_cost)
        policy = make_policy("echo_fixed", {"gates": cal.config.gates})
        policy.config = cal.config
        save_policy(policy, args.out, extra={"calibration": cal.to_json()})
        print(f"{len(records)} records, {cal.notes['request_steps']} request-steps")
        print(f"one threshold for every depth: {cal.config.fixed_threshold}; predicted throughput gain "
              f"{cal.predicted_gain:.3f}x")
        print(f"wrote {args.out}")
        return 0
    cal = calibrate(records, base=base, max_gates=args.max_gates, token_cost=args.token_cost)
    policy = make_policy("echo", {"gates": cal.config.gates})
    policy.config = cal.config
    save_policy(policy, args.out, extra={"calibration": cal.to_json()})
    print(f"{len(records)} records, {cal.notes['request_steps']} request-steps")
    print("depth  samples  reached  AUROC")
    for s in cal.depths:
        print(f"{s.depth:5d}  {s.samples:7d}  {s.reached:7d}  {s.auroc:.3f}")
    print(f"gates (depth, tau): {cal.config.gates}; predicted throughput gain {cal.predicted_gain:.3f}x")
    print(f"wrote {args.out}")
    return 0

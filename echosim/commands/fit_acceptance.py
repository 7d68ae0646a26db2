"""`echosim fit-acceptance`: fit the simulator's acceptance model to per-node records by maximum likelihood."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit-acceptance", help="fit the acceptance model to per-node draft/accept records",
                       description="Reads per-node records (JSON lines: step, request, depth, rank, draft_prob, "
                                   "path_prob, accepted; optional dataset, parent_accepted), fits the acceptance "
                                   "model by maximum likelihood, and writes it as JSON (load it with "
                                   "AcceptanceModel.load). See docs/ACCEPTANCE.md.")
    p.add_argument("--records", required=True, help="per-node records, JSON lines (as the engine writes them)")
    p.add_argument("-o", "--out", required=True, help="where to write the fitted model (JSON)")
    p.add_argument("--base", help="a preset name or model JSON supplying what records cannot (vocabulary, policy)")
    p.add_argument("--name", default="fitted", help="model name stored in the output (default: fitted)")
    p.add_argument("--draft-marginal", choices=("logit-normal", "empirical"), default="logit-normal",
                   help="top draft probabilities: the parametric logit-normal (default), or the records' own "
                        "distribution per depth, on and off the accepted path (for records of a tree that "
                        "verifies every candidate)")
    p.add_argument("--rank-shares", action="store_true",
                   help="lower-ranked drafts take the records' own share of the mass the ranks above them left, "
                        "per bin of the top draft's probability (default: a fixed ratio to the top draft)")
    p.add_argument("--match-persistence", action="store_true",
                   help="split the latent variance between request and step so that the records' tree shows the "
                        "records' own step-to-step autocorrelation (as echosim validate does)")
    p.add_argument("--max-records", type=int, default=1_000_000,
                   help="fit a random subset of whole requests beyond this many records (default 1000000)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from echosim.errors import UserError
    from echosim.sim.acceptance import AcceptanceModel
    from echosim.sim.acceptance_fit import fit_records
    from echosim.spec.records import read_records

    base = None
    if args.base:
        base = AcceptanceModel.load(args.base) if Path(args.base).is_file() else AcceptanceModel.preset(args.base)
    records = read_records(args.records)
    if args.max_records < 1:
        raise UserError("--max-records must be >= 1")
    fit = fit_records(records, base=base, name=args.name, max_records=args.max_records,
                      draft_marginal=args.draft_marginal, rank_shares=args.rank_shares)
    if args.match_persistence:
        from echosim.sim.acceptance_fit import match_persistence

        fit.model, info = match_persistence(fit.model, records)
        fit.report["persistence"] = info
    fit.model.save(args.out)
    r, m = fit.report, fit.model
    a, d = m.accept_params, m.draft_params
    used = "" if r["records_used"] == r["records"] else f" (fitted on {r['records_used']}, whole requests)"
    print(f"{r['records']} records{used}; {r['nodes_used']} nodes with an accepted parent ({r['accepted']} accepted), "
          f"{r['steps']} request-steps, {r['requests']} requests; parent_accepted {r['parent_accepted']}")
    print(f"maximum likelihood: converged {r['converged']} in {r['iterations']} iterations; "
          f"log-lik (acceptance) {r['loglik_accept']:.1f} vs constant rate {r['loglik_constant_rate']:.1f} "
          f"(pseudo-R2 {r['pseudo_r2']:.3f}); AUROC {r['auroc']:.3f}")
    print("skill by dataset: " + ", ".join(f"{k} {v:+.3f}" for k, v in m.skills.items()))
    print(f"sigma_request {a.sigma_request:.3f}  sigma_step {a.sigma_step:.3f}  rank_bias {a.rank_bias:+.3f}  "
          f"conf_ease {d.conf_ease:.3f}  conf_sd {d.conf_sd:.3f}  rank_decay {d.rank_decay:.3f} "
          f"(sd {d.rank_sd:.3f})")
    print("depth   gamma    beta  conf_mean   nodes  accepted  predicted")
    rows = {row["depth"]: row for row in r["by_depth"]}
    for i in range(len(a.gamma)):
        row = rows.get(i + 1, {"nodes": 0, "observed": float("nan"), "predicted": float("nan")})
        print(f"{i + 1:5d} {a.gamma[i]:+7.3f} {a.beta[i]:7.3f} {d.conf_mean[i]:10.3f} {row['nodes']:7d} "
              f"{row['observed']:9.3f} {row['predicted']:10.3f}")
    print("draft q~   nodes  accepted  predicted")
    for row in r["by_q"]:
        print(f"{row['q_range']:>7s} {row['nodes']:7d} {row['observed']:9.3f} {row['predicted']:10.3f}")
    print(f"wrote {args.out}")
    return 0

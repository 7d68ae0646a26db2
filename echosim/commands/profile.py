"""`echosim profile`: time the real forward of a model shape (random weights) over a grid, write a profile CSV.

    echosim profile --model echo-target-small --device cpu --out profile.csv
    echosim fit --profiles profile.csv --out cost_models/fitted/cpu_small.json --hardware cpu
"""

from __future__ import annotations

import argparse


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return vals


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("profile", help="time a real forward of a model shape",
                              description="Time echo_exec's forward of a model shape with random weights over a "
                                          "grid of batch sizes x verify tokens per sequence x KV lengths (warm-up, "
                                          "repeats; CUDA events on a GPU) and write a profile CSV for `echosim fit`.")
    p.add_argument("--model", required=True, help="catalog name, config.json, or a Hugging Face model directory")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--out", required=True, help="output CSV")
    p.add_argument("--batch-sizes", type=_ints, default=None, help="e.g. 1,2,4,8")
    p.add_argument("--tokens-per-seq", type=_ints, default=None, help="verify tokens per sequence, e.g. 1,4,16")
    p.add_argument("--kv-lens", type=_ints, default=None, help="cached tokens per sequence, e.g. 0,128,512")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per grid point per round")
    p.add_argument("--rounds", type=int, default=1,
                   help="time the whole grid this many times over and pool each point's calls (noisy machines)")
    p.add_argument("--num-layers", type=int, default=None,
                   help="build only this many decoder layers (the CSV records it; the fit scales per layer)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cuda-graph", action="store_true",
                   help="on a GPU, time CUDA-graph replays of each forward (the kernels back to back, as a serving "
                        "engine's captured step runs them) instead of eager calls, whose time includes Python's "
                        "kernel launches (not yet run on a GPU: docs/COST_MODELS.md)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from cost_models.profiles import write_profile
    from cost_models.specs import load_model
    from echo_exec.profiler import CPU_GRID, GPU_GRID, profile_model
    from echosim.errors import UserError

    if args.repeats < 1 or args.rounds < 1 or args.warmup < 0:
        raise UserError("--repeats and --rounds must be >= 1 and --warmup >= 0")
    spec = load_model(args.model)
    cuda = args.device.startswith("cuda")
    if not cuda and args.device != "cpu":
        raise UserError(f"--device {args.device!r}: expected cpu or cuda")
    if args.cuda_graph and not cuda:
        raise UserError(f"--cuda-graph: needs --device cuda, got {args.device!r}")
    cuda_graph = args.cuda_graph
    grid = GPU_GRID if cuda else CPU_GRID
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise UserError(f"--dtype {dtype!r} is not a torch dtype")
    if args.threads:
        torch.set_num_threads(args.threads)

    def show(row):
        print(f"batch {row['batch_size']:>4} x {row['tokens_per_seq']:>4} tokens, kv {row['kv_len']:>6}: "
              f"{row['time_ms']:.3f} ms", flush=True)

    rows = profile_model(spec, device=args.device, dtype=dtype,
                         batch_sizes=args.batch_sizes or grid["batch_sizes"],
                         tokens_per_seq=args.tokens_per_seq or grid["tokens_per_seq"],
                         kv_lens=args.kv_lens or grid["kv_lens"], warmup=args.warmup, repeats=args.repeats,
                         rounds=args.rounds, num_layers=args.num_layers, cuda_graph=cuda_graph, progress=show)
    write_profile(rows, args.out)
    print(f"wrote {len(rows)} rows to {args.out} (timing: {rows[0]['timing'] if rows else '-'})")
    return 0

"""`echosim train-tiny`: train the shipped tiny target or draft model on the Python standard library's sources
(the recipe of echo_exec/models/tiny-target and tiny-draft; see echo_exec/train_tiny.py)."""

from __future__ import annotations

from pathlib import Path

from echosim.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train-tiny", help="train the shipped tiny target/draft pair on the stdlib's .py sources",
        description="Train the tiny byte-level target (d=384, 6 layers) or draft (d=128, 1 layer, "
                    "distilled from the target) on the Python standard library's sources; writes "
                    "config.json + model.safetensors.")
    p.add_argument("--role", choices=["target", "draft", "eagle3"], required=True,
                   help="eagle3: an EAGLE-3 head over the target's hidden states (SGLang's EAGLE3 format)")
    p.add_argument("--out", type=Path, default=None,
                   help="output model directory (default: echo_exec/models/tiny-<role>)")
    p.add_argument("--teacher", type=Path, default=None,
                   help="draft / eagle3: the target directory to distil from "
                        "(default: echo_exec/models/tiny-target)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget; the LR cosine follows it")
    p.add_argument("--steps", type=int, default=None, help="step budget (with --minutes: first to end)")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--seq-len", type=int, default=256, help="bytes per sequence (default 256)")
    p.add_argument("--lr", type=float, default=None, help="peak LR (default 1e-3 target, 3e-3 draft and eagle3)")
    p.add_argument("--warmup-steps", type=int, default=100, help="linear LR warmup steps (default 100)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--corpus", choices=["stdlib", "wide"], default="stdlib",
                   help="stdlib: the stdlib's .py sources (the shipped pair); wide: plus the documentation under "
                        "/usr/share/common-licenses and /usr/share/doc (echo_exec/models/README.md)")
    p.add_argument("--doc-bytes", type=int, default=8_000_000, help="wide: most bytes of documentation added")
    p.add_argument("--save-every-min", type=float, default=10.0,
                   help="checkpoint period in minutes (default 10)")
    p.set_defaults(func=run)


def run(args) -> int:
    from echo_exec.train_tiny import MODELS_DIR, TrainArgs, train

    if args.minutes is None and args.steps is None:
        raise UserError("give --minutes or --steps (or both)", field="--minutes")
    if (args.minutes is not None and args.minutes <= 0) or (args.steps is not None and args.steps <= 0):
        raise UserError("the budget must be positive", field="--minutes/--steps")
    teacher = None
    if args.role in ("draft", "eagle3"):
        teacher = args.teacher or MODELS_DIR / "tiny-target"
        if not (teacher / "model.safetensors").exists():
            raise UserError("no trained target to distil from; train the target first", path=str(teacher))
    lr = args.lr if args.lr is not None else (1e-3 if args.role == "target" else 3e-3)
    out = args.out or MODELS_DIR / f"tiny-{args.role}"
    train(TrainArgs(role=args.role, out_dir=out, minutes=args.minutes, steps=args.steps, seed=args.seed,
                    batch_size=args.batch_size, seq_len=args.seq_len, lr=lr, warmup_steps=args.warmup_steps,
                    threads=args.threads, teacher_dir=teacher, save_every_min=args.save_every_min,
                    corpus=args.corpus, doc_bytes=args.doc_bytes),
          log=lambda m: print(m, flush=True))
    return 0

"""Train the shipped tiny model pair on the Python standard library's own .py sources (on every machine), or
with --corpus wide on those plus the documentation Debian-family machines ship (`corpus_split`).

- Tokens: bytes (echo_exec/tokenizer.py); each file is [BOS] + its bytes + [EOS], files concatenated in
  sorted path order. Files whose sha1(relative path) % 16 == 0 are held out (evaluation and prompts), see
  `split_files`. The stdlib's test suite, idlelib and site-packages are left out.
- Target: a Llama-type model, d=384, 6 layers, 6 heads, 2 KV heads, SwiGLU 1024 (9.6M params), trained
  with next-byte cross-entropy.
- Draft: d=128, 1 layer (0.27M params), distilled from the target's logits (KL(target || draft)), which
  raises draft/target agreement far more than plain next-byte training.
- EAGLE-3 head (--role eagle3, echo_exec/models/tiny-eagle3): model.Eagle3Head over the frozen target, fed the
  target's residual stream after layers EAGLE3_LAYERS and the target's (frozen) embedding; trained by training-time
  test (EAGLE3_TTT_STEPS draft passes, each fed the previous pass's outputs, weights 0.8^k) on KL(target || head)
  at each pass's predicted position. Saved as SGLang's LlamaForCausalLMEagle3 checkpoint.
- Sequence length 256, AdamW (0.9, 0.95, weight decay 0.1 on matrices), linear warmup, cosine decay to 10%.
  With --minutes the schedule follows wall-clock progress (so a slower machine still completes the cosine);
  with --steps it follows steps. The directory's train_meta.json records what a run did (steps, losses).
- Weights are stored in fp16 (half the bytes of fp32) and load as fp32.
- Checkpoints are written every --save-every-min minutes, so an interrupted run leaves a usable model.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from echo_exec.loader import load_model, save_model
from echo_exec.model import EAGLE3_ARCH, Eagle3Head, ModelConfig, Transformer
from echo_exec.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, write_hf_tokenizer

MODELS_DIR = Path(__file__).parent / "models"
HOLDOUT_MOD = 16
COMMON = dict(rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, model_type="llama",
              max_position_embeddings=4096, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def target_config() -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB_SIZE, hidden_size=384, n_layers=6, n_heads=6, n_kv_heads=2,
                       intermediate_size=1024, **COMMON)


def draft_config() -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB_SIZE, hidden_size=128, n_layers=1, n_heads=4, n_kv_heads=2,
                       intermediate_size=384, **COMMON)


# The target layers (0-based) whose outputs the head reads: low, middle, high. SGLang captures a layer's INPUT
# (its `layers_to_capture` is these ids + 1), so the last layer's output cannot be read; 4 is the last it can.
EAGLE3_LAYERS = (1, 3, 4)
EAGLE3_TTT_STEPS = 3


def eagle3_config(target: ModelConfig) -> ModelConfig:
    """The head for `target`: its width, heads, MLP and vocabulary (SGLang gives the head the target's embedding),
    one layer."""
    return ModelConfig(vocab_size=target.vocab_size, hidden_size=target.hidden_size, n_layers=1,
                       n_heads=target.n_heads, n_kv_heads=target.n_kv_heads, head_dim=target.head_dim,
                       intermediate_size=target.intermediate_size, **COMMON,
                       extra={"architectures": [EAGLE3_ARCH], "draft_vocab_size": target.vocab_size,
                              "target_hidden_size": target.hidden_size,
                              "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(EAGLE3_LAYERS),
                                               "use_aux_hidden_state": True}})


def init_weights(model: torch.nn.Module, seed: int, n_layers: int, std: float = 0.02) -> None:
    """Transformer.init_weights for any module of the same parameter names (the EAGLE-3 head)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            torch.nn.init.ones_(p) if name.endswith("norm.weight") else torch.nn.init.zeros_(p)
        else:
            s = std / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * s)


@torch.no_grad()
def warm_start_eagle3(head: Eagle3Head, target: Transformer, seed: int) -> None:
    """Start the head as the target's last layer applied to the highest captured stream: fc passes that stream
    through (the other blocks small random), the hidden half of q/k/v, o, the norms and the MLP are the target's
    last layer, norm and lm_head the target's; the embedding half of q/k/v stays small random. On a shared CPU
    this saves most of the steps a random start spends finding the target's output space."""
    init_weights(head, seed, 1)
    d, last = target.cfg.hidden_size, target.model.layers[-1]
    head.embed_tokens.weight.copy_(target.model.embed_tokens.weight)
    head.fc.weight[:, -d:] = torch.eye(d)
    ml = head.midlayer
    ml.hidden_norm.weight.copy_(last.input_layernorm.weight)
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(ml.self_attn, name).weight[:, d:] = getattr(last.self_attn, name).weight
    ml.self_attn.o_proj.weight.copy_(last.self_attn.o_proj.weight)
    ml.post_attention_layernorm.weight.copy_(last.post_attention_layernorm.weight)
    ml.mlp.load_state_dict(last.mlp.state_dict())
    head.norm.weight.copy_(target.model.norm.weight)
    head.lm_head.weight.copy_(target.lm_head.weight)


def stdlib_files() -> tuple[Path, list[Path]]:
    """The stdlib's .py files (not its test suite, not site-packages), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root).parts
        if "site-packages" in rel or "dist-packages" in rel or rel[0] in ("test", "tests", "idlelib"):
            continue
        files.append(f)
    return root, sorted(files, key=lambda f: f.relative_to(root).as_posix())


def is_heldout(rel_path: str) -> bool:
    return int(hashlib.sha1(rel_path.encode()).hexdigest(), 16) % HOLDOUT_MOD == 0


def split_files() -> tuple[list[Path], list[Path]]:
    """(train files, held-out files), split deterministically by hash of the path under the stdlib root."""
    root, files = stdlib_files()
    train = [f for f in files if not is_heldout(f.relative_to(root).as_posix())]
    held = [f for f in files if is_heldout(f.relative_to(root).as_posix())]
    return train, held


# The "wide" corpus adds English prose that Debian-family machines ship: the license texts of base-files
# (/usr/share/common-licenses) and each installed package's documentation under /usr/share/doc (its copyright
# file, READMEs, NEWS, changelogs; .gz read decompressed). Each document is under its own package's license,
# which that package's copyright file states (and which the corpus includes); all are free-software licenses
# that allow copying and derived works. What is installed differs between machines, so train_meta.json records
# the corpus's files, bytes and a digest of its file list.
DOC_ROOTS = (Path("/usr/share/common-licenses"), Path("/usr/share/doc"))
DOC_NAMES = ("copyright", "readme", "news", "changelog", "changes", "authors", "todo", "faq")
DOC_SUFFIXES = (".txt", ".md", ".rst", ".markdown", "")
DOC_MAX_FILE_BYTES = 200_000  # a longer changelog is mostly version lists


def _doc_text_files(max_bytes: int) -> list[tuple[str, Path]]:
    """(key, path) of the Debian documentation text files, deduplicated by content, at most max_bytes in all,
    in sorted path order; the key (for the held-out split) is the path itself."""
    out, seen, total = [], set(), 0
    for root in DOC_ROOTS:
        if not root.is_dir():
            continue
        for f in sorted(root.rglob("*")):
            if not f.is_file() or f.is_symlink():
                continue
            name = f.name.lower().removesuffix(".gz")
            stem, suffix = (name.rsplit(".", 1)[0], "." + name.rsplit(".", 1)[1]) if "." in name else (name, "")
            if root.name != "common-licenses" and not (stem.split(".")[0] in DOC_NAMES and suffix in DOC_SUFFIXES):
                continue
            data = read_text_file(f)
            if not data or len(data) > DOC_MAX_FILE_BYTES or b"\0" in data[:4096]:
                continue
            digest = hashlib.sha1(data).digest()
            if digest in seen:
                continue
            seen.add(digest)
            out.append((f.as_posix(), f))
            total += len(data)
            if total >= max_bytes:
                return out
    return out


def read_text_file(f: Path) -> bytes:
    """A corpus file's bytes (.gz decompressed); b"" when unreadable."""
    import gzip

    try:
        return gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
    except (OSError, EOFError, ValueError):
        return b""


def corpus_split(corpus: str = "stdlib", doc_bytes: int = 8_000_000) -> tuple[list[Path], list[Path]]:
    """(train files, held-out files) of a corpus: "stdlib" (the shipped pair's: split_files) or "wide" (the stdlib
    plus up to doc_bytes of Debian documentation, held out by the same path-hash rule)."""
    train, held = split_files()
    if corpus == "stdlib":
        return train, held
    if corpus != "wide":
        raise ValueError(f"corpus must be stdlib or wide, not {corpus!r}")
    docs = _doc_text_files(doc_bytes)
    return (train + [f for key, f in docs if not is_heldout(key)], held + [f for key, f in docs if is_heldout(key)])


def encode_files(files: list[Path]) -> np.ndarray:
    parts = []
    for f in files:
        parts.append(np.array([BOS_ID], dtype=np.int16))
        parts.append(np.frombuffer(read_text_file(f), dtype=np.uint8).astype(np.int16))
        parts.append(np.array([EOS_ID], dtype=np.int16))
    return np.concatenate(parts)


@dataclass
class TrainArgs:
    role: str  # "target", "draft" or "eagle3"
    out_dir: Path
    minutes: float | None = None
    steps: int | None = None
    seed: int = 0
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 1e-3
    warmup_steps: int = 100
    threads: int = 1
    teacher_dir: Path | None = None  # draft / eagle3: distil from this target (eagle3: and read its states)
    corpus: str = "stdlib"           # stdlib (the shipped pair) | wide (+ Debian documentation, corpus_split)
    doc_bytes: int = 8_000_000       # wide: most bytes of documentation added
    save_every_min: float = 10.0
    # Shipped weights are stored in fp16 (half the bytes; training and inference run in fp32).
    save_dtype: torch.dtype = torch.float16
    log_every: int = 20


def lr_at(progress: float, step: int, args: TrainArgs) -> float:
    warm = min(1.0, (step + 1) / args.warmup_steps)
    return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    other = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def batch(data: np.ndarray, rng: np.random.Generator, bs: int, seq: int) -> torch.Tensor:
    starts = rng.integers(0, len(data) - seq - 1, size=bs)
    idx = starts[:, None] + np.arange(seq + 1)
    return torch.from_numpy(data[idx].astype(np.int64))


@torch.no_grad()
def eval_loss(model: Transformer, held: np.ndarray, teacher: Transformer | None, seq: int) -> dict:
    """Cross-entropy (nats/byte) on fixed held-out windows; for a draft also its argmax agreement with the
    teacher."""
    model.eval()
    rng = np.random.default_rng(12345)
    ce, agree, n = 0.0, 0.0, 0
    for _ in range(4):
        x = batch(held, rng, 16, seq)
        logits = model(x[:, :-1])
        ce += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).item()
        if teacher is not None:
            agree += (teacher(x[:, :-1]).argmax(-1) == logits.argmax(-1)).float().mean().item()
        n += 1
    model.train()
    out = {"eval_ce_nats": round(ce / n, 4)}
    if teacher is not None:
        out["eval_argmax_agreement"] = round(agree / n, 4)
    return out


@torch.no_grad()
def eval_eagle3(head: Eagle3Head, teacher: Transformer, held: np.ndarray, seq: int, steps: int) -> dict:
    """On fixed held-out windows: the head's cross-entropy against the data at pass 0 and its argmax agreement
    with the target at each training-time-test pass (pass k: k draft tokens already fed back)."""
    head.eval()
    rng = np.random.default_rng(12345)
    T = seq - steps
    ce, agree = 0.0, np.zeros(steps)
    for _ in range(4):
        x = batch(held, rng, 16, seq)
        t_logits, feats = teacher.forward_aux(x[:, :-1], head.aux_layers)
        out = head.forward_train(feats[:, :T], x[:, :T + steps], steps)
        ce += F.cross_entropy(out[0].flatten(0, 1), x[:, 2:T + 2].flatten()).item() / 4
        for k, lg in enumerate(out):
            agree[k] += (lg.argmax(-1) == t_logits[:, k + 1:k + 1 + T].argmax(-1)).float().mean().item() / 4
    head.train()
    return {"eval_ce_nats": round(ce, 4), "eval_argmax_agreement": round(float(agree[0]), 4),
            "eval_argmax_agreement_per_pass": [round(float(a), 4) for a in agree]}


def eagle3_loss(head: Eagle3Head, teacher: Transformer, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Training-time-test loss of one batch x [B, seq + 1]: sum over passes k of 0.8^k KL(target || head) at the
    position pass k predicts, normalised by the weights."""
    seq = x.shape[1] - 1
    T = seq - steps
    with torch.no_grad():
        t_logits, feats = teacher.forward_aux(x[:, :-1], head.aux_layers)
        t_logp = F.log_softmax(t_logits, -1)
    loss, wsum = 0.0, 0.0
    for k, lg in enumerate(head.forward_train(feats[:, :T], x[:, :T + steps], steps)):
        w = 0.8 ** k
        loss = loss + w * F.kl_div(F.log_softmax(lg, -1).flatten(0, 1), t_logp[:, k + 1:k + 1 + T].flatten(0, 1),
                                   log_target=True, reduction="batchmean")
        wsum += w
    return loss / wsum


def train(args: TrainArgs, log=print) -> dict:
    if args.role not in ("target", "draft", "eagle3"):
        raise ValueError(f"role must be target, draft or eagle3, not {args.role!r}")
    if args.minutes is None and args.steps is None:
        raise ValueError("give --minutes or --steps")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_files, held_files = corpus_split(args.corpus, args.doc_bytes)
    data, held = encode_files(train_files), encode_files(held_files)
    listing = hashlib.sha1("\n".join(f.as_posix() for f in train_files).encode()).hexdigest()
    log(f"corpus {args.corpus}: {len(train_files)} train files ({len(data) / 1e6:.2f}M bytes), {len(held_files)} "
        f"held out ({len(held) / 1e6:.2f}M bytes), python {platform.python_version()}")

    teacher = None
    if args.role in ("draft", "eagle3"):
        if args.teacher_dir is None:
            raise ValueError(f"the {args.role} is distilled from a target: give --teacher")
        teacher = load_model(args.teacher_dir)
        for p in teacher.parameters():
            p.requires_grad_(False)
    if args.role == "eagle3":
        model = Eagle3Head(eagle3_config(teacher.cfg))
        warm_start_eagle3(model, teacher, args.seed)
        # the target's embedding stays frozen: SGLang swaps the target's in at load anyway
        model.embed_tokens.weight.requires_grad_(False)
    else:
        model = Transformer(target_config() if args.role == "target" else draft_config())
        model.init_weights(args.seed)
    model.train()
    log(f"{args.role}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"batch {args.batch_size} x {args.seq_len}, lr {args.lr}, threads {args.threads}")
    opt = make_optimizer(model, args.lr)
    rng = np.random.default_rng(args.seed)
    budget_s = args.minutes * 60 if args.minutes is not None else None
    t0 = last_save = time.time()
    step, loss_ema = 0, None
    meta = {"role": args.role, "seed": args.seed, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "lr": args.lr, "warmup_steps": args.warmup_steps, "minutes": args.minutes,
            "steps_arg": args.steps, "python": platform.python_version(), "train_files": len(train_files),
            "train_bytes": int(len(data)), "corpus": args.corpus, "train_files_sha1": listing,
            "doc_files": sum(1 for f in train_files if f.is_relative_to(DOC_ROOTS[0]) or
                             f.is_relative_to(DOC_ROOTS[1])),
            "params": sum(p.numel() for p in model.parameters()),
            "stored_dtype": str(args.save_dtype).removeprefix("torch."),
            "objective": "cross-entropy" if teacher is None else "KL(teacher || draft), teacher " +
            str(args.teacher_dir.name)}
    if args.role == "eagle3":
        meta.update(trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                    objective=f"training-time test, {EAGLE3_TTT_STEPS} passes weighted 0.8^k, KL(teacher || head) "
                              f"per pass, teacher {args.teacher_dir.name}, features after target layers "
                              f"{list(EAGLE3_LAYERS)}, target embedding frozen, warm start from the target's "
                              f"last layer (warm_start_eagle3)")

    def checkpoint(final: bool):
        stats = (eval_eagle3(model, teacher, held, args.seq_len, EAGLE3_TTT_STEPS) if args.role == "eagle3"
                 else eval_loss(model, held, teacher, args.seq_len))
        meta.update(stats, steps=step, tokens=step * args.batch_size * args.seq_len,
                    wall_min=round((time.time() - t0) / 60, 1), train_loss_ema=round(loss_ema or 0.0, 4),
                    finished=final)
        save_model(model, args.out_dir, dtype=args.save_dtype)
        write_hf_tokenizer(args.out_dir)
        (args.out_dir / "train_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        log(f"checkpoint step {step}: {stats} -> {args.out_dir}")

    while True:
        elapsed = time.time() - t0
        # Progress is whichever limit is closer: wall clock (--minutes) or steps (--steps).
        progress = max(elapsed / budget_s if budget_s is not None else 0.0,
                       step / args.steps if args.steps is not None else 0.0)
        if progress >= 1.0:
            break
        lr = lr_at(progress, step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch(data, rng, args.batch_size, args.seq_len)
        if args.role == "eagle3":
            loss = eagle3_loss(model, teacher, x, EAGLE3_TTT_STEPS)
        elif teacher is None:
            logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        else:
            logits = model(x[:, :-1])
            with torch.no_grad():
                t_logp = F.log_softmax(teacher(x[:, :-1]), -1).flatten(0, 1)
            loss = F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), t_logp, log_target=True,
                            reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        if step % args.log_every == 0:
            el = time.time() - t0
            log(f"step {step} loss {loss_ema:.4f} lr {lr:.2e} progress {progress:.3f} "
                f"{step * args.batch_size * args.seq_len / el:.0f} tok/s elapsed {el / 60:.1f} min")
            sys.stdout.flush()
        if time.time() - last_save > args.save_every_min * 60:
            checkpoint(final=False)
            last_save = time.time()
    checkpoint(final=True)
    return meta

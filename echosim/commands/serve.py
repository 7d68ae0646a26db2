"""`echosim serve --model DIR --draft DIR --policy echo`: the echo engine behind an HTTP server with SGLang's
`/generate`, OpenAI's `/v1/completions` and `/v1/chat/completions`, `/v1/models`, `/server_info`, `/health`,
Prometheus `/metrics` and more (see echo_exec/server.py)."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

from echosim.commands.help_format import DefaultsHelpFormatter
from echosim.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve the engine over HTTP (SGLang /generate, OpenAI /v1/completions and chat)",
        formatter_class=DefaultsHelpFormatter,
        description="Serve the echo engine over HTTP: SGLang's native /generate, OpenAI's /v1/completions, "
                    "/v1/chat/completions and /v1/models, SGLang's /server_info, /get_model_info, /health, "
                    "/health_generate and /flush_cache, and Prometheus /metrics.")
    p.add_argument("--model", required=True, help="target model directory (config.json + safetensors)")
    p.add_argument("--draft", default=None, help="draft model directory (needed by every policy but ar)")
    p.add_argument("--policy", default=None, help="speculation policy (echo, eagle3, ar, ...); none given = echo")
    p.add_argument("--policy-config", default=None,
                   help="policy settings: a JSON object inline, or a JSON file (e.g. from echosim calibrate); "
                        "default: the draft directory's policy-<policy>.json if it has one (the shipped pair has "
                        "policy-echo.json and policy-eagle3.json), else the policy's own, echo's with the "
                        "online-adaptive budget ('adaptive': {}; docs/ADAPTIVE.md)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=30000, help="port (30000 as SGLang; 0 = any free port)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and activations")
    p.add_argument("--max-running", type=int, default=32, help="most requests decoding at once")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache blocks (none = the engine's)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--max-prefill-tokens", type=int, default=512, help="prefill chunk budget")
    p.add_argument("--records", default=None, help="write per-node draft/accept records to this file")
    p.add_argument("--seed", type=int, default=0, help="engine seed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (none = torch's)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name /v1/models reports and responses carry (none = the --model path)")
    p.add_argument("--no-access-log", action="store_true", help="no access log line per request on stderr")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up request before listening")
    p.add_argument("--shutdown-grace", type=float, default=5.0,
                   help="on SIGINT/SIGTERM, seconds requests in flight get to finish before a 503")
    p.set_defaults(func=run)


def _policy_config(arg: str | None, policy: str | None) -> tuple[str, dict | None]:
    """(policy name, settings) from --policy and --policy-config (inline JSON or a file)."""
    config = None
    if arg is not None:
        text, where = arg, "--policy-config"
        if not arg.lstrip().startswith(("{", "[")):
            path = Path(arg)
            try:
                text, where = path.read_text(), str(path)
            except OSError as exc:
                raise UserError(f"cannot read the policy config: {exc.strerror}", path=arg) from None
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"not valid JSON: {exc}", path=where) from None
        if not isinstance(config, dict):
            raise UserError("the policy config must be a JSON object", path=where)
        config = dict(config)
        config.pop("calibration", None)  # informative statistics written by `echosim calibrate`
        named = config.pop("policy", None)
        if named is not None:
            if policy is not None and policy != named:
                raise UserError(f"--policy {policy} disagrees with the config's policy {named!r}", path=where)
            policy = named
    return policy or "echo", config


def policy_settings(arg: str | None, policy: str | None, draft: str | None) -> tuple[str, dict | None, str]:
    """(policy name, settings, where they came from): --policy-config if given; else the draft directory's
    policy-<name>.json, the settings tuned for its pair, if it ships one; else the policy's own defaults."""
    policy, config = _policy_config(arg, policy)
    if config is not None:
        return policy, config, "--policy-config"
    tuned = Path(draft) / f"policy-{policy}.json" if draft is not None else None
    if tuned is not None and tuned.is_file():
        policy, config = _policy_config(str(tuned), policy)
        return policy, config, str(tuned)
    if policy == "echo":  # ECHO serves with the online-adaptive budget unless told otherwise
        return policy, {"adaptive": {}}, "defaults (adaptive budget)"
    return policy, None, "defaults"


def _checks(args) -> None:
    for name in ("max_running", "block_size", "max_prefill_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_kv_blocks is not None and args.num_kv_blocks < 1:
        raise UserError("--num-kv-blocks must be >= 1")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    for flag, d in (("--model", args.model), ("--draft", args.draft)):
        if d is not None and not (Path(d) / "config.json").exists():
            raise UserError(f"{flag}: not a model directory (no config.json)", path=d)


def build_server(args):
    """The engine and the EchoServer around it, from parsed `serve` arguments."""
    _checks(args)
    policy, config, config_source = policy_settings(args.policy_config, args.policy, args.draft)

    import torch

    from echo_exec.engine import Engine, SamplingParams
    from echo_exec.model import ModelConfig
    from echo_exec.server import ChatTemplate, EchoServer, Limits
    from echo_exec.tokenizer import ByteTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    target_cfg = ModelConfig.from_hf(Path(args.model) / "config.json")
    max_context = target_cfg.max_position_embeddings
    if args.draft is not None:
        max_context = min(max_context, ModelConfig.from_hf(Path(args.draft) / "config.json").max_position_embeddings)
    if args.num_kv_blocks is not None:
        max_context = min(max_context, args.num_kv_blocks * args.block_size)
    try:
        engine = Engine(args.model, args.draft, policy=policy, policy_config=config, device=args.device,
                        dtype=getattr(torch, args.dtype), max_running=args.max_running,
                        num_kv_blocks=args.num_kv_blocks, block_size=args.block_size,
                        max_prefill_tokens=args.max_prefill_tokens, records_path=args.records, seed=args.seed)
    except (ValueError, TypeError) as exc:  # ConfigError (bad policy or settings) is a ValueError
        if isinstance(exc, UserError):
            raise
        raise UserError(str(exc)) from None
    max_context = min(max_context, int(getattr(engine, "max_len", max_context)))
    info = {"model": str(args.model), "model_path": str(args.model), "draft_model_path": args.draft,
            "policy": policy, "policy_config": config, "policy_config_source": config_source,
            "device": args.device, "dtype": args.dtype,
            "max_running_requests": args.max_running, "max_context_tokens": max_context}
    tok = ByteTokenizer()
    try:
        template = ChatTemplate.from_model_dir(args.model)
    except (ValueError, OSError) as exc:  # bad JSON, a template that does not compile (jinja's errors are both)
        raise UserError(f"cannot read the chat template: {exc}", path=args.model) from None
    info["chat_template"] = template is not None
    return EchoServer(engine, make_params=SamplingParams, limits=Limits(target_cfg.vocab_size, max_context),
                      info=info, encode=tok.encode, chat_template=template,
                      model_name=getattr(args, "served_model_name", None) or str(args.model))


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the models load, so that a port in use fails in a second."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def _warmup(engine, params_cls) -> float:
    """One short request through the engine (first-call allocations and code paths); seconds it took."""
    t0 = time.perf_counter()
    engine.generate([list(b"def main():\n")], params_cls(max_new_tokens=8, temperature=0.0, ignore_eos=True))
    return time.perf_counter() - t0


def run(args) -> int:
    import asyncio
    import signal

    from echo_exec.server import serve_forever

    if not args.shutdown_grace >= 0:
        raise UserError(f"--shutdown-grace must be >= 0, got {args.shutdown_grace}")
    _checks(args)
    sock = _bind(args.host, args.port)

    def say(msg: str) -> None:
        print(f"echosim serve: {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    say(f"loading {args.model}" + (f" and draft {args.draft}" if args.draft else "") + f" on {args.device}")
    try:
        server = build_server(args)
    except BaseException:
        sock.close()
        raise
    say(f"loaded in {time.perf_counter() - t0:.1f} s")
    if not args.no_warmup:
        from echo_exec.engine import SamplingParams

        say(f"warmed up in {_warmup(server.engine, SamplingParams):.1f} s (one 8-token request)")

    def ready(port: int) -> None:
        # Tests and scripts wait for this line (with --port 0 it is the only way to learn the port).
        print(f"echosim serve: listening on http://{args.host}:{port} (policy {server.info['policy']}, "
              f"settings: {server.info['policy_config_source']})", flush=True)

    async def main() -> None:
        # SIGINT / SIGTERM: stop listening, let requests in flight finish (5 s at most), stop the engine, exit 0.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_forever(server, args.host, args.port, ready=ready, stop=stop, sock=sock,
                            grace_s=args.shutdown_grace, access_log=not args.no_access_log)

    try:
        asyncio.run(main())
    except OSError as exc:
        raise UserError(f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}") from None
    print("echosim serve: stopped", flush=True)
    return 0

"""Helpers for the server and replay tests (no tests here): a fake engine with the real Engine's API, tiny random
model directories, a server subprocess, and small HTTP helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# A fake engine: same API as echo_exec.engine.Engine, deterministic letters, `tokens_per_step` tokens per step.


@dataclass
class FakeParams:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None


@dataclass
class FakeOutput:
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    finished: bool
    finish_reason: str | None
    arrival_s: float
    first_token_s: float | None
    finish_s: float | None
    spec_verify_ct: int
    accepted_drafts: int


def fake_tokens(prompt_ids: list[int], n: int) -> list[int]:
    """The fake engine's output for a prompt: lowercase letters from a prompt-dependent start."""
    start = sum(prompt_ids)
    return [97 + (start + i) % 26 for i in range(n)]


class FakeEngine:
    FAIL_BYTE = ord("~")   # a prompt containing "~" makes step() raise (an engine bug)
    REFUSE_BYTE = ord("^")  # a prompt containing "^" makes add_request raise ValueError

    def __init__(self, tokens_per_step: int = 2, step_s: float = 0.001):
        self.tokens_per_step = tokens_per_step
        self.step_s = step_s
        self.reqs: dict[str, tuple[FakeOutput, FakeParams, object]] = {}
        self.aborted: list[str] = []
        self.steps = 0
        self.verify_total = 0
        self.tokens_total = 0

    def add_request(self, prompt_ids, params, request_id=None, on_tokens=None) -> str:
        if self.REFUSE_BYTE in prompt_ids:
            raise ValueError("prompt refused by the fake engine")
        rid = request_id or uuid.uuid4().hex
        out = FakeOutput(rid, list(prompt_ids), [], False, None, time.perf_counter(), None, None, 0, 0)
        self.reqs[rid] = (out, params, on_tokens)
        return rid

    def abort(self, request_id) -> None:
        if self.reqs.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.reqs)

    def step(self) -> list[FakeOutput]:
        self.steps += 1
        time.sleep(self.step_s)
        if any(self.FAIL_BYTE in out.prompt_ids for out, _, _ in self.reqs.values()):
            raise RuntimeError("fake engine failure")
        finished = []
        for rid, (out, params, cb) in list(self.reqs.items()):
            k = min(self.tokens_per_step, params.max_new_tokens - len(out.output_ids))
            new = fake_tokens(out.prompt_ids, len(out.output_ids) + k)[len(out.output_ids):]
            for j, t in enumerate(new):
                if t in params.stop_token_ids:
                    new = new[:j + 1]
                    out.finish_reason = "stop"
                    break
            out.output_ids.extend(new)
            out.spec_verify_ct += 1
            out.accepted_drafts += len(new) - 1
            self.verify_total += 1
            self.tokens_total += len(new)
            if out.first_token_s is None:
                out.first_token_s = time.perf_counter()
            if cb is not None:
                cb(out, new)
            if out.finish_reason == "stop" or len(out.output_ids) >= params.max_new_tokens:
                out.finish_reason = out.finish_reason or "length"
                out.finished = True
                out.finish_s = time.perf_counter()
                finished.append(out)
                del self.reqs[rid]
        return finished

    def stats(self) -> dict:
        return {"steps": self.steps, "avg_accept_length": self.tokens_total / max(self.verify_total, 1)}


def fake_server(engine: FakeEngine | None = None, max_context: int = 256, grace_s: float = 5.0):
    from echo_exec.server import ChatTemplate, EchoServer, Limits, ServerThread
    from echo_exec.tokenizer import CHAT_TEMPLATE

    engine = engine or FakeEngine()
    server = EchoServer(engine, make_params=FakeParams, limits=Limits(259, max_context),
                        info={"model": "fake", "policy": "fake"}, chat_template=ChatTemplate(CHAT_TEMPLATE))
    return engine, ServerThread(server, grace_s=grace_s)


# ----------------------------------------------------------------------------------------------------------
# Tiny random models and a real server subprocess.


def make_tiny_models(root: Path) -> tuple[Path, Path]:
    """A random byte-level target (d=64, 2 layers) and a draft that is a copy of it (so speculation accepts)."""
    import shutil

    import torch

    from echo_exec.loader import save_model
    from echo_exec.model import ModelConfig, Transformer
    from echo_exec.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE

    cfg = ModelConfig(vocab_size=VOCAB_SIZE, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      intermediate_size=128, max_position_embeddings=1024, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    target, draft = root / "target", root / "draft"
    save_model(model, target)
    shutil.copytree(target, draft)
    return target, draft


class ServerProcess:
    """`echosim serve` in a subprocess on a free port; `.url`, `.pid`, `.stop()`."""

    def __init__(self, args: list[str], timeout_s: float = 120.0):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "echosim.cli", "serve", "--port", "0", *args], cwd=ROOT,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = None
        self.lines: list[str] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if "listening on " in line:
                self.url = line.split("listening on ")[1].split()[0]
                break
        if self.url is None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines))
        # Keep draining its output so that a chatty server never blocks on a full pipe.
        import threading

        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ----------------------------------------------------------------------------------------------------------
# HTTP helpers (stdlib, synchronous).


def post(url: str, body, *, raw: bytes | None = None, timeout: float = 60.0) -> tuple[int, bytes]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get(url: str, timeout: float = 30.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def sse_payloads(raw: bytes) -> list:
    """The `data:` payloads of a server-sent-event body: parsed JSON, or the string "[DONE]"."""
    out = []
    for event in raw.decode().split("\n\n"):
        for line in event.splitlines():
            if line.startswith("data: "):
                payload = line[len("data: "):]
                out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out

"""Request schemas of the HTTP server (echo_exec/server.py), as pydantic models: SGLang's `/generate` (with its
`sampling_params`) and OpenAI's / vLLM's `/v1/completions` and `/v1/chat/completions`.

What a field may hold, in one rule so that any client's request shape works:
- a field we honour is declared on the model with its type (strict: no "5" for 5, no 1 for true);
- a field with no effect on this server whatever its value (`model`, `user`, `skip_special_tokens`, ...) is in
  `INERT` and ignored;
- any other field, one of SGLang's or vLLM's many extensions or one they add tomorrow, is accepted at its neutral
  value (null, false, 0, "", [], {}, or the value listed in `NEUTRAL`: `n` 1, `repetition_penalty` 1...) and
  refused with a 400 naming it otherwise, since we could not honour it.
Errors name the field as the client spelled it (`max_tokens` on the OpenAI routes, `max_new_tokens` on SGLang's).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

# Below this a temperature makes sampling degenerate (logits / 1e-310 overflow to inf, softmax to NaN): greedy,
# as vLLM and SGLang do for their own tiny epsilons.
GREEDY_BELOW_TEMPERATURE = 1e-5
SGLANG_DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default when max_new_tokens is absent or null


class BadRequest(Exception):
    """A client mistake: answered with a 4xx and a message, never raised past the handler."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# Fields accepted with any value because they change nothing here.
INERT = {
    "model", "user", "metadata", "store", "service_tier", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "stream_interval", "return_text_in_logprobs", "log_metrics", "custom_labels", "routing_key",
    "conversation_id", "session_id", "extra_key", "no_logs", "received_time", "external_trace_header",
    "add_special_tokens", "include_stop_str_in_output", "parallel_tool_calls", "reasoning_effort",
    "include_reasoning", "cache_salt", "return_tokens_as_token_ids", "logprob_start_len", "top_logprobs_num",
    "data_parallel_rank", "routed_dp_rank", "bootstrap_host", "bootstrap_port", "bootstrap_room", "name",
}
# Neutral values other than null / false / 0 / "" / [] / {} of fields we cannot honour otherwise.
NEUTRAL: dict[str, tuple] = {
    "n": (1,), "best_of": (1,), "repetition_penalty": (1, 1.0), "length_penalty": (1, 1.0), "top_k": (-1,),
    "tool_choice": ("none", "auto"), "response_format": ({"type": "text"},), "logprob_start_len": (-1,),
}


def _is_neutral(name: str, value: Any) -> bool:
    if value is None or value is False or (type(value) in (int, float) and value == 0):
        return True
    if isinstance(value, (str, list, dict)) and not value:
        return True
    return any(type(value) is type(v) and value == v for v in NEUTRAL.get(name, ()))


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    def check_extra(self, where: str = "") -> None:
        for name, value in (self.model_extra or {}).items():
            if name in INERT or _is_neutral(name, value):
                continue
            shown = repr(value) if isinstance(value, (int, float, bool)) else type(value).__name__
            raise BadRequest(f"field '{where}{name}' = {shown} is not supported by this server (only its neutral "
                             "value is accepted)")


def parse(model: type[_Request], body: Any, where: str = "") -> Any:
    """`body` (decoded JSON) as `model`, or BadRequest naming the first bad field."""
    if not isinstance(body, dict):
        raise BadRequest(f"'{where.rstrip('.')}' must be an object" if where else "the body must be a JSON object")
    try:
        obj = model.model_validate(body)
    except ValidationError as exc:
        raise BadRequest(_message(exc.errors(include_url=False)[0], where)) from None
    except RecursionError:
        raise BadRequest("the body is nested too deeply") from None
    obj.check_extra(where)
    return obj


# What a field that takes several shapes must be (pydantic reports each union member apart).
UNION_WORDS = {
    "text": "a string or a list of strings", "input_ids": "a list of token ids or a list of such lists",
    "prompt": "a string or a list of token ids", "content": 'a string or a list of {"type": "text", "text": ...}',
    "stop": "a string or a list of strings", "rid": "a string or a list of strings",
    "sampling_params": "an object (or a list of one per prompt)",
}
TYPE_WORDS = {"int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
              "bool_type": "true or false", "string_type": "a string", "list_type": "a list",
              "dict_type": "an object", "model_type": "an object", "missing": None}


def _is_tag(part) -> bool:
    return isinstance(part, str) and ("[" in part or part[:1].isupper() or part in ("str", "int", "float", "bool",
                                                                                   "none"))


def _message(err: dict, where: str) -> str:
    loc = list(err["loc"])
    cut = next((i for i, p in enumerate(loc) if _is_tag(p)), None)
    if cut is not None:  # a union: say what the field may be, not what its first member wanted
        path = ".".join(str(p) for p in loc[:cut])
        return f"'{where}{path}' must be {UNION_WORDS.get(str(loc[cut - 1]), 'of another type')}"
    path = ".".join(str(p) for p in loc)
    if err["type"] == "missing":
        return f"'{where}{path}' is required"
    word = TYPE_WORDS.get(err["type"])
    return f"'{where}{path}' must be {word}" if word else f"'{where}{path}': {err['msg']}"


# ----------------------------------------------------------------------------------------------------------
# SGLang's /generate.


class SamplingParamsIn(_Request):
    max_new_tokens: int | None = None          # null = SGLang's default (128)
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    sampling_seed: int | None = None


class GenerateIn(_Request):
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    rid: str | list[str] | None = None


# ----------------------------------------------------------------------------------------------------------
# OpenAI / vLLM.


class StreamOptions(_Request):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _OpenAISampling(_Request):
    """The sampling and streaming fields that completions and chat share."""
    temperature: float | None = None           # null = 1
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    truncate_prompt_tokens: int | None = None  # keep the last N prompt tokens (vLLM)
    request_id: str | None = None


class CompletionIn(_OpenAISampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16                # null = as many as fit the context (vLLM)


class ContentPart(_Request):
    type: Literal["text"]
    text: str


# OpenAI's chat roles (SGLang's schema takes the same set); only an assistant turn may come without content
# (one that made tool calls)
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class Message(_Request):
    role: str
    content: str | list[ContentPart] | None = None

    def check(self, where: str) -> None:
        if self.role not in ROLES:
            raise BadRequest(f"'{where}role' must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.content is None and self.role != "assistant":
            raise BadRequest(f"'{where}content' is required in a {self.role} message")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatIn(_OpenAISampling):
    messages: list[Message]
    max_tokens: int | None = None              # null = as many as fit the context
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


def _num(name: str, value: float, *, low: float, high: float | None = None, low_open: bool = False) -> float:
    v = float(value)
    if v != v or v in (float("inf"), float("-inf")):
        raise BadRequest(f"'{name}' must be finite, got {value}")
    if v < low or (low_open and v == low):
        raise BadRequest(f"'{name}' must be {'>' if low_open else '>='} {low:g}, got {value}")
    if high is not None and v > high:
        raise BadRequest(f"'{name}' must be <= {high:g}, got {value}")
    return v


def sampling_kwargs(*, temperature: float | None, top_p: float | None, seed: int | None,
                    stop_token_ids: list[int] | None, vocab_size: int, seed_name: str = "seed") -> dict:
    """SamplingParams keyword arguments (less max_new_tokens) from checked client values."""
    temp = _num("temperature", 1.0 if temperature is None else temperature, low=0.0)
    if temp < GREEDY_BELOW_TEMPERATURE:
        temp = 0.0
    p = _num("top_p", 1.0 if top_p is None else top_p, low=0.0, high=1.0, low_open=True)
    stops = list(stop_token_ids or [])
    bad = [t for t in stops if not 0 <= t < vocab_size]
    if bad:
        raise BadRequest(f"'stop_token_ids': token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    if seed is not None:
        if not -(2 ** 63) <= seed < 2 ** 64:
            raise BadRequest(f"'{seed_name}' must fit 64 bits, got {seed}")
        seed %= 2 ** 64  # vLLM takes any int64; our generator wants a non-negative one
    return dict(temperature=temp, top_p=p, stop_token_ids=tuple(dict.fromkeys(stops)), seed=seed)


def check_stop_strings(stop) -> None:
    if stop not in (None, "", []):
        raise BadRequest("'stop' strings are not supported by this server; use 'stop_token_ids'")

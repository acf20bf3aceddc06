"""The OpenAI HTTP protocol: request validation, response and chunk objects, SSE framing, errors.

Plain Python (no FastAPI, no Ray, no model). Every invalid input raises :class:`APIError`, whose
body is OpenAI's ``{"error": {"message", "type", "param", "code"}}``.

Supported request fields (others are ignored, like OpenAI ignores unknown ones, except the
unsupported features listed in ``_UNSUPPORTED``, which are refused when set):

* both: ``model``, ``max_tokens``, ``temperature`` (0..2), ``top_p`` (0..1], ``stop`` (string or
  up to 4), ``seed``, ``stream``, ``stream_options.include_usage``, ``n`` (1 only), ``user``;
  extensions: ``top_k``, ``ignore_eos``, ``ffnskip_policy`` (a skip policy object);
* chat: ``messages`` (``role`` + string content or text parts), ``max_completion_tokens``;
* completions: ``prompt`` (a string, a one-string list, or token ids), ``echo`` (the prompt's text
  first), ``logprobs`` (0..5, with ``echo``: the prompt scored by one dense pass, plus at most one
  greedy token with ``max_tokens`` 0 or 1: lm-evaluation-harness's loglikelihood requests).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ffnskip.errors import FFNSkipError

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 4
MAX_TEMPERATURE = 2.0
#: A positive temperature below this samples as greedy does (logits / 1e-300 overflow to inf):
#: it is served as 0, the limit it approaches.
MIN_TEMPERATURE = 1e-4
#: ``seed`` is a 64-bit signed integer (OpenAI's type; PyTorch's generators take no larger).
SEED_RANGE = (-(2**63), 2**63 - 1)
SSE_DONE = b"data: [DONE]\n\n"
#: Largest ``logprobs`` of a completions request (the legacy API's limit).
MAX_LOGPROBS = 5


class APIError(FFNSkipError):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = "invalid_value", status: int = 400) -> APIError:
    return APIError(status, message, param=param, code=code)


def overloaded(message: str) -> APIError:
    """The replica's queue is full: 429 with ``Retry-After`` (clients back off and retry)."""
    return APIError(429, message, type="server_error", code="server_overloaded")


def unauthorized(message: str = "missing or invalid API key: pass it as 'Authorization: Bearer KEY'") -> APIError:
    return APIError(401, message, type="authentication_error", code="invalid_api_key")


# ---------------------------------------------------------------------- parsing helpers
def parse_json_body(raw: bytes) -> dict[str, Any]:
    if not raw or not raw.strip():
        raise invalid("the request body is empty; send a JSON object", code="invalid_json")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too deeply nested
        raise invalid(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object; got {_tname(body)}", code="invalid_json")
    return body


def _tname(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(v), type(v).__name__)


def _type_error(param: str, want: str, v: Any) -> APIError:
    return invalid(f"'{param}' must be {want}; got {_tname(v)} {json.dumps(v)[:80]}", param=param, code="invalid_type")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _opt_int(body: dict, key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v):
        raise _type_error(key, "an integer", v)
    return v


def _opt_num(body: dict, key: str) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if not _is_num(v):
        raise _type_error(key, "a number", v)
    return float(v)


def _opt_bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _type_error(key, "a boolean", v)
    return v


# Fields that change what is returned and that this server does not implement: refused when set
# to anything but their neutral value.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
}


@dataclass
class GenerationRequest:
    """A validated OpenAI completion or chat request (before tokenisation)."""

    kind: str  # "chat" | "completion"
    model: str | None
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    """Streaming: one more chunk before ``[DONE]`` with empty ``choices`` and the ``usage``."""
    ignore_eos: bool = False
    policy_override: dict[str, Any] | None = None
    user: str | None = None
    echo: bool = False
    """Completions: the prompt's text comes first in the returned text."""
    logprobs: int | None = None
    """Completions with echo: score the prompt (token log-probabilities and the top ``logprobs``)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_param(self) -> str:
        return "messages" if self.kind == "chat" else "prompt"


def _common(body: dict, kind: str) -> GenerationRequest:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _type_error("model", "a string", model)
    scoring = kind == "completion" and ("echo" in body or "logprobs" in body)  # parsed in parse_completion
    for key, neutral in _UNSUPPORTED.items():
        if scoring and key in ("echo", "logprobs"):
            continue
        if key in body and body[key] not in neutral:
            if key in ("presence_penalty", "frequency_penalty", "top_logprobs", "best_of", "logprobs") \
                    and not isinstance(body[key], (int, float, bool, type(None))):
                raise _type_error(key, "a number", body[key])
            raise invalid(f"'{key}' is not supported by this server", param=key, code="unsupported_parameter")
    rf = body.get("response_format")
    if rf is not None:
        kind_rf = rf.get("type") if isinstance(rf, dict) else None
        if kind_rf != "text":  # JSON modes would be silently ignored otherwise
            raise invalid(f"'response_format' {json.dumps(rf)[:80]} is not supported by this server; only {{\"type\": \"text\"}}",
                          param="response_format", code="unsupported_parameter")
    n = _opt_int(body, "n")
    if n is not None and n != 1:
        raise invalid(f"only n=1 is supported; got {n}", param="n", code="unsupported_parameter")
    max_tokens = _opt_int(body, "max_tokens")
    if kind == "chat":
        mct = _opt_int(body, "max_completion_tokens")
        if mct is not None:
            if max_tokens is not None and mct != max_tokens:
                raise invalid("give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
            max_tokens = mct
    if max_tokens is not None and max_tokens <= 0 and not (scoring and max_tokens == 0):
        param = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
        raise invalid(f"'{param}' must be a positive integer; got {max_tokens}", param=param)
    temperature = _opt_num(body, "temperature")
    temperature = 1.0 if temperature is None else temperature
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise invalid(f"'temperature' must be between 0 and {MAX_TEMPERATURE:g}; got {temperature:g}",
                      param="temperature")
    if temperature < MIN_TEMPERATURE:
        temperature = 0.0
    top_p = _opt_num(body, "top_p")
    top_p = 1.0 if top_p is None else top_p
    if not 0 < top_p <= 1:
        raise invalid(f"'top_p' must be in (0, 1]; got {top_p:g}", param="top_p")
    top_k = _opt_int(body, "top_k")
    top_k = 0 if top_k is None or top_k == -1 else top_k
    if top_k < 0:
        raise invalid(f"'top_k' must be >= 0 (or -1 for off); got {top_k}", param="top_k")
    stop_v = body.get("stop")
    if stop_v is None:
        stop: tuple[str, ...] = ()
    elif isinstance(stop_v, str):
        stop = (stop_v,)
    elif isinstance(stop_v, list) and all(isinstance(s, str) for s in stop_v):
        if len(stop_v) > MAX_STOP:
            raise invalid(f"'stop' takes at most {MAX_STOP} sequences; got {len(stop_v)}", param="stop")
        stop = tuple(stop_v)
    else:
        raise _type_error("stop", "a string or an array of strings", stop_v)
    stop = tuple(s for s in stop if s)
    seed = _opt_int(body, "seed")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise invalid(f"'seed' must be a 64-bit signed integer; got {seed}", param="seed")
    stream = _opt_bool(body, "stream")
    include_usage = False  # OpenAI: a stream reports usage only when asked, in one last chunk
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise _type_error("stream_options", "an object", so)
        if not stream:
            raise invalid("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        iu = so.get("include_usage")
        if iu is not None and not isinstance(iu, bool):
            raise _type_error("stream_options.include_usage", "a boolean", iu)
        include_usage = bool(iu)
    ignore_eos = _opt_bool(body, "ignore_eos")
    override = body.get("ffnskip_policy")
    if override is not None and not isinstance(override, dict):
        raise _type_error("ffnskip_policy", "an object (a skip policy)", override)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _type_error("user", "a string", user)
    return GenerationRequest(kind=kind, model=model, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k, stop=stop, seed=seed, stream=stream, include_usage=include_usage,
                             ignore_eos=ignore_eos, policy_override=override, user=user)


def _content_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise _type_error(f"{param}[{j}]", "a content part object", part)
            if part.get("type") != "text":
                raise invalid(f"'{param}[{j}].type' {part.get('type')!r} is not supported (text parts only)",
                              param=f"{param}[{j}].type", code="unsupported_parameter")
            text = part.get("text")
            if not isinstance(text, str):
                raise _type_error(f"{param}[{j}].text", "a string", text)
            parts.append(text)
        return "".join(parts)
    raise _type_error(param, "a string or an array of text parts", content)


def parse_chat(body: dict[str, Any]) -> GenerationRequest:
    req = _common(body, "chat")
    if "messages" not in body:
        raise invalid("'messages' is required", param="messages", code="missing_required_parameter")
    msgs = body["messages"]
    if not isinstance(msgs, list):
        raise _type_error("messages", "an array of message objects", msgs)
    if not msgs:
        raise invalid("'messages' must not be empty", param="messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _type_error(p, "a message object", m)
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise invalid(f"'{p}.role' must be one of {', '.join(ROLES)}; got {json.dumps(role)}", param=f"{p}.role")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        text = _content_text(content, f"{p}.content")
        out.append({"role": "system" if role == "developer" else role, "content": text})
    if not any(m["content"].strip() for m in out):
        raise invalid("'messages' has no text", param="messages")
    req.messages = out
    return req


def parse_completion(body: dict[str, Any]) -> GenerationRequest:
    req = _common(body, "completion")
    if "prompt" not in body or body["prompt"] is None:
        raise invalid("'prompt' is required", param="prompt", code="missing_required_parameter")
    p = body["prompt"]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        if not p.strip():
            raise invalid("'prompt' must not be empty", param="prompt")
        req.prompt = p
    elif isinstance(p, list) and p and all(_is_int(t) for t in p):
        if any(t < 0 for t in p):
            raise invalid("'prompt' token ids must be >= 0", param="prompt")
        req.prompt = list(p)
    elif isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
        raise invalid("only one prompt per request is supported", param="prompt", code="unsupported_parameter")
    else:
        raise _type_error("prompt", "a string or an array of token ids", p)
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise _type_error("echo", "a boolean", echo)
    req.echo = bool(echo)
    lp = body.get("logprobs")
    if lp is not None and lp is not False:
        if isinstance(lp, bool) or not isinstance(lp, int):
            raise _type_error("logprobs", "an integer", lp)
        if not 0 <= lp <= MAX_LOGPROBS:
            raise invalid(f"'logprobs' must be between 0 and {MAX_LOGPROBS}; got {lp}", param="logprobs")
        # Prompt scoring (lm-evaluation-harness's loglikelihood requests): the prompt's token
        # log-probabilities, from one dense pass, and at most one greedy token after it.
        if not req.echo:
            raise invalid("'logprobs' is supported together with echo=true (scoring the prompt) only",
                          param="logprobs", code="unsupported_parameter")
        if req.max_tokens is None or req.max_tokens > 1:
            raise invalid("with echo and logprobs, 'max_tokens' must be 0 or 1", param="max_tokens",
                          code="unsupported_parameter")
        if req.stream:
            raise invalid("echo with logprobs cannot be streamed", param="stream", code="unsupported_parameter")
        req.logprobs = lp
    elif req.max_tokens == 0:
        raise invalid("'max_tokens' must be a positive integer; got 0", param="max_tokens")
    return req


# ---------------------------------------------------------------------- responses
def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def ffnskip_info(policy_id: str, stats) -> dict[str, Any]:
    """The ``ffnskip`` object of a response (``stats``: a SeqStats or None)."""
    return {
        "policy_id": policy_id,
        "skip_ratio": float(stats.skip_ratio) if stats is not None else 0.0,
        "skip_ratio_post_warmup": float(stats.skip_ratio_post_warmup) if stats is not None else 0.0,
        "skipped_ffn": int(stats.skipped_ffn) if stats is not None else 0,
    }


@dataclass
class ResponseMeta:
    id: str
    kind: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    echo: str = ""
    """Completions with ``echo``: the prompt's text, sent before the completion."""
    include_usage: bool = False
    """Streaming: end with a usage chunk (``stream_options.include_usage``)."""


def full_response(meta: ResponseMeta, text: str, finish_reason: str, use: dict, info: dict) -> dict[str, Any]:
    if meta.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": meta.echo + text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": meta.id, "object": obj, "created": meta.created, "model": meta.model, "choices": [choice],
            "usage": use, "system_fingerprint": None, "ffnskip": info}


def usage_chunk(meta: ResponseMeta, use: dict, info: dict | None = None) -> dict[str, Any]:
    """OpenAI's last chunk of a stream with ``include_usage``: no choices, the usage."""
    out = chunk(meta, None, info=info, use=use)
    out["choices"] = []
    return out


def chunk(meta: ResponseMeta, text: str | None, finish_reason: str | None = None, *, role: bool = False,
          use: dict | None = None, info: dict | None = None) -> dict[str, Any]:
    if meta.kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    out: dict[str, Any] = {"id": meta.id, "object": obj, "created": meta.created, "model": meta.model,
                           "choices": [choice], "system_fingerprint": None}
    if use is not None:
        out["usage"] = use
    if info is not None:
        out["ffnskip"] = info
    return out


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def parse_sse(text: str) -> list[Any]:
    """Events of an SSE body (``[DONE]`` kept as the string) - for tests and the load script."""
    out: list[Any] = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out

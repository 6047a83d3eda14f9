"""OpenAI's chat and completions API on apreqeld's wire: the request models (validated by
pydantic; a bad field is one 400 naming it), their translation into `wire` generate/chat
params, and the response, stream-chunk, model-list and error objects OpenAI clients expect.

Refused with a 400 naming the field: what apreqeld does not do (tools and functions, logprobs,
n > 1, logit_bias, audio, suffix, echo, best_of > 1, ...) and any field OpenAI does not
define. Accepted and ignored: fields that only label a request (user, metadata, store, ...).
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from apreqeld.errors import DaemonError
from apreqeld.runtime import wire

# Fields that name or tag a request and change nothing apreqeld does.
IGNORED = ("user", "metadata", "store", "service_tier", "safety_identifier",
           "prompt_cache_key", "prompt_cache_retention", "parallel_tool_calls")
# Fields apreqeld refuses unless they hold the value that asks for nothing.
UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "tools": (([], None), "tools (function calling) are not supported"),
    "tool_choice": ((None, "none"), "tool_choice is not supported (no tools)"),
    "functions": (([], None), "functions are not supported"),
    "function_call": ((None, "none"), "function_call is not supported"),
    "n": ((None, 1), "only n = 1 is supported"),
    "best_of": ((None, 1), "only best_of = 1 is supported"),
    "logprobs": ((None, False), "logprobs are not supported"),
    "top_logprobs": ((None,), "top_logprobs are not supported"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "echo": ((None, False), "echo is not supported"),
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
    "audio": ((None,), "audio output is not supported"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "web_search_options": ((None,), "web search is not supported"),
    "reasoning_effort": ((None,), "reasoning_effort is not supported (not a reasoning model)"),
    "verbosity": ((None,), "verbosity is not supported"),
    "moderation": ((None,), "moderation is not supported"),
}
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
RETRY_AFTER_S = "1"  # seconds a client told to retry (429, 503) waits


class OpenAIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def daemon_error(exc: DaemonError) -> OpenAIError:
    """The HTTP status and error object for a scheduler or worker error."""
    code = exc.code
    if code == wire.BUSY:
        return OpenAIError(429, str(exc), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": RETRY_AFTER_S})
    if code in (wire.INVALID, wire.TOO_LARGE):  # found by the worker: the grammar, the context
        message = str(exc)
        if message.startswith("response_format"):
            return OpenAIError(400, message, param="response_format", code="invalid_value")
        if message.startswith("the prompt is too long"):
            return OpenAIError(400, message, code="context_length_exceeded")
        return OpenAIError(400, message, code="invalid_value")
    if code in (wire.UNAVAILABLE, wire.SHUTTING_DOWN):
        return OpenAIError(503, str(exc), type="server_error", code=code,
                           headers={"Retry-After": RETRY_AFTER_S})
    return OpenAIError(500, str(exc), type="server_error", code=code)


def param_name(loc: tuple) -> str:
    """pydantic's location as OpenAI names a parameter: messages[0].content."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def bad_request(exc: ValidationError) -> OpenAIError:
    first = exc.errors()[0]
    param = param_name(tuple(first["loc"]))
    message = first["msg"].removeprefix("Value error, ")
    code = {"extra_forbidden": "unknown_parameter",
            "missing": "missing_required_parameter"}.get(first["type"], "invalid_value")
    if code == "unknown_parameter":
        message = "unrecognized request argument"
    return OpenAIError(400, f"{param}: {message}", param=param, code=code)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's padding option: nothing to pad here


class JsonSchema(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"},
                                    alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    def wire(self) -> dict | None:
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError("type json_schema needs json_schema: {name, schema}")
            return {"type": "json_schema", "json_schema": self.json_schema.schema_}
        return None if self.type == "text" else {"type": "json_object"}


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | None = None
    name: str | None = None
    refusal: str | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, value: object) -> object:
        if value in ("tool", "function"):
            raise ValueError(f"{value} messages need tools, which are not supported")
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, value: object) -> object:
        """Content parts are joined when they are all text; anything else is refused."""
        if not isinstance(value, list):
            return value
        texts = []
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"part {i} is {kind or 'not a content part'}; only text "
                                 "parts are supported")
            texts.append(part["text"])
        return "".join(texts)


class _Request(_Strict):
    model: str = Field(min_length=1, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    seed: int | None = None

    @field_validator("stream_options")
    @classmethod
    def _with_stream(cls, value, info):
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream: true")
        return value

    def sampling(self, max_tokens: int) -> dict:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = {"max_tokens": max_tokens, "temperature": self.temperature, "stop": stop,
                  "presence_penalty": self.presence_penalty,
                  "frequency_penalty": self.frequency_penalty}
        for key in ("top_p", "seed"):
            if getattr(self, key) is not None:
                params[key] = getattr(self, key)
        return params

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None


class CompletionRequest(_Request):
    prompt: str | list[str]
    response_format: ResponseFormat | None = None  # an apreqeld (and llama.cpp) extension

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("exactly one prompt is supported (n = 1)")
            value = value[0]
        return value


def parse(endpoint: str, body: object) -> ChatRequest | CompletionRequest:
    """A decoded JSON body as the endpoint's request, or OpenAIError(400) naming the field."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object", code="invalid_json")
    for key, (harmless, why) in UNSUPPORTED.items():
        if key in body and body[key] not in harmless:
            raise OpenAIError(400, f"{key}: {why}", param=key, code="unsupported_parameter")
    fields = {k: v for k, v in body.items() if k not in UNSUPPORTED and k not in IGNORED}
    model = ChatRequest if endpoint == "chat" else CompletionRequest
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise bad_request(exc) from None


def wire_params(req: ChatRequest | CompletionRequest, *, n_ctx: int) -> tuple[str, dict]:
    """(`generate` or `chat`, validated wire params) for a request; OpenAIError(400) when the
    wire's own bounds refuse it (a 200,000-character prompt, 8 stop strings, ...)."""
    try:
        fmt = req.response_format.wire() if req.response_format else None
    except ValueError as exc:
        raise OpenAIError(400, f"response_format: {exc}", param="response_format",
                          code="invalid_value") from None
    if isinstance(req, ChatRequest):
        kind = "chat"
        limit = req.max_completion_tokens or req.max_tokens or min(n_ctx, 8192)
        payload = {"messages": [{"role": "system" if m.role == "developer" else m.role,
                                 "content": m.content or ""} for m in req.messages]}
    else:
        kind = "generate"
        limit = req.max_tokens or COMPLETIONS_MAX_TOKENS
        payload = {"prompt": req.prompt}
    params = payload | req.sampling(limit) | ({"response_format": fmt} if fmt else {})
    model = wire.ChatParams if kind == "chat" else wire.GenerateParams
    try:
        return kind, model.model_validate(params).model_dump(exclude={"v"})
    except ValidationError as exc:
        raise bad_request(exc) from None


# --------------------------------------------------------------------------- responses


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def finish_reason(finish: str | None) -> str:
    return "length" if finish == "length" else "stop"


def usage(result: dict) -> dict:
    u = result.get("usage") or {}
    prompt, completion = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def extension(member: str | None, result: dict | None = None) -> dict:
    """The `apreqeld` field: which member served, and how fast."""
    out: dict = {"member": member}
    if result is not None:
        u = result.get("usage") or {}
        out |= {"ms_per_token": u.get("ms_per_token"), "ttft_ms": u.get("ttft_ms"),
                "queued_ms": result.get("queued_ms"), "total_ms": u.get("total_ms")}
    return out


class Reply:
    """One completion's identity: the objects it is answered with, whole or as chunks."""

    def __init__(self, kind: str, model: str) -> None:
        self.kind, self.model = kind, model
        self.id, self.created = new_id(kind), int(time.time())

    def _head(self, obj: str, member: str | None) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": member}

    def whole(self, result: dict) -> dict:
        member = result.get("plan")
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": result["text"],
                                              "refusal": None},
                      "logprobs": None, "finish_reason": finish_reason(result.get("finish"))}
            head = self._head("chat.completion", member)
        else:
            choice = {"index": 0, "text": result["text"], "logprobs": None,
                      "finish_reason": finish_reason(result.get("finish"))}
            head = self._head("text_completion", member)
        return head | {"choices": [choice], "usage": usage(result),
                       "apreqeld": extension(member, result)}

    def chunk(self, member: str | None, text: str | None = None, *, first: bool = False,
              finish: str | None = None) -> dict:
        if self.kind == "chat":
            delta: dict = {"role": "assistant", "content": text or ""} if first else (
                {"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            head = self._head("chat.completion.chunk", member)
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            head = self._head("text_completion", member)
        return head | {"choices": [choice]}

    def last(self, result: dict, *, include_usage: bool) -> list[dict]:
        """The finishing chunk (with the `apreqeld` field), then the usage chunk if asked."""
        member = result.get("plan")
        end = self.chunk(member, finish=finish_reason(result.get("finish")))
        end["apreqeld"] = extension(member, result)
        if not include_usage:
            return [end]
        head = self._head(end["object"], member)
        return [end, head | {"choices": [], "usage": usage(result)}]


def model_list(planset, serving: str | None) -> dict:
    """One logical model (the plan set), its members as metadata."""
    return {"object": "list", "data": [model_entry(planset, serving)]}


def model_entry(planset, serving: str | None) -> dict:
    members = [{"id": m.id, "label": m.label, "kind": m.kind, "pareto": m.pareto,
                "serving": m.id == serving, "footprint_bytes": m.measured.footprint_bytes,
                "ms_per_token": m.measured.latency.median_ms, planset.accuracy:
                getattr(m.measured, planset.accuracy)} for m in planset.members]
    return {"id": planset.name, "object": "model", "created": _created(planset.created),
            "owned_by": "apreqeld",
            "apreqeld": {"serving": serving, "model": planset.model.name, "members": members}}


def _created(stamp: str) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(stamp).timestamp())
    except ValueError:
        return 0

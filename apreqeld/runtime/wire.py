"""The daemon's wire: MessagePack-RPC over a Unix stream socket, with bounded frames.

Request `[0, id, method, params]`, response `[1, id, error, result]`, notification
`[2, method, params]`. `params` is an array holding at most one map of named arguments;
every method's arguments are a pydantic model, so nothing unvalidated goes further.
An error is the map `{"code": ..., "message": ...}`.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

import msgpack
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from apreqeld.errors import InputError
from apreqeld.manifest import one_line

PROTOCOL = 1
MAX_FRAME = 1 << 20  # bytes of one message, either way
REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
MAX_ID = 2**32 - 1

# Error codes (the `code` of an error response).
INVALID = "invalid"  # bad message shape or bad arguments
UNKNOWN_METHOD = "unknown_method"
TOO_LARGE = "too_large"
BUSY = "busy"
UNAVAILABLE = "unavailable"  # no variant can serve (loading failed)
WORKER_FAILED = "worker_failed"  # the worker died during the request
SHUTTING_DOWN = "shutting_down"
PERMISSION = "permission"  # the peer's role does not allow the method
FAILED = "failed"


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    v: int = Field(default=PROTOCOL, ge=1, le=PROTOCOL, description="protocol version")


class NoParams(_Params):
    pass


MAX_SCHEMA_BYTES = 64 * 1024  # a JSON schema to enforce, as JSON text
MAX_SCHEMA_DEPTH = 32  # nested objects and arrays (msgpack and the grammar converter recurse)


def _depth(value: object, limit: int = MAX_SCHEMA_DEPTH + 1) -> int:
    """How deep objects and arrays nest in `value` (counted up to `limit`, no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth < limit:
                stack += [(v, depth + 1) for v in (item.values() if isinstance(item, dict)
                                                   else item)]
    return deepest


class ResponseFormat(BaseModel):
    """What the text must be: free text, any JSON object, or JSON valid for a schema (each
    enforced by llama.cpp's grammar sampler in the worker)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = Field(default=None, description="the JSON schema "
                                               "itself (type json_schema only)")

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with type json_schema, and only then")
        if self.json_schema is not None:
            if _depth(self.json_schema) > MAX_SCHEMA_DEPTH:
                raise ValueError(f"json_schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
            try:
                size = len(json.dumps(self.json_schema))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"json_schema is not JSON ({exc})") from None
            if size > MAX_SCHEMA_BYTES:
                raise ValueError(f"json_schema has {size} bytes of JSON, at most "
                                 f"{MAX_SCHEMA_BYTES}")
        return self


class Sampling(_Params):
    max_tokens: int = Field(default=128, ge=1, le=8192)
    temperature: float = Field(default=0.8, ge=0.0, le=5.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0,
                                description="nucleus sampling (None: llama.cpp's default)")
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list, max_length=8)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    response_format: ResponseFormat | None = None


class GenerateParams(Sampling):
    prompt: str = Field(min_length=1, max_length=200_000)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=200_000)


class ChatParams(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=256)


class SetPriorityParams(_Params):
    preset: str | None = None
    weights: tuple[float, float, float] | None = None
    max_latency_ms: float | None = Field(default=None, gt=0)
    max_accuracy: float | None = Field(default=None, gt=0)
    max_memory_bytes: float | None = Field(default=None, gt=0)
    wait: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> SetPriorityParams:
        if (self.preset is None) == (self.weights is None):
            raise ValueError("give either a preset or three weights")
        return self


_PLAN_ID = re.compile(r"[0-9a-f]{4,64}")


class PinParams(_Params):
    id: str = Field(description="a member id or a prefix of one (never a path)")
    wait: bool = False

    @field_validator("id")
    @classmethod
    def _plan_id(cls, value: str) -> str:
        if not _PLAN_ID.fullmatch(value):
            raise ValueError("a plan id is 4 to 64 lower-case hexadecimal characters")
        return value


class UnpinParams(_Params):
    wait: bool = False


METHODS: dict[str, type[_Params]] = {
    "hello": NoParams, "status": NoParams, "plans": NoParams, "generate": GenerateParams,
    "chat": ChatParams, "set_priority": SetPriorityParams, "pin": PinParams,
    "unpin": UnpinParams, "reload": NoParams, "events": NoParams,
}


def error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


def pack(message: list) -> bytes:
    """One message, refused (InputError) beyond the frame bound."""
    data = msgpack.packb(message, use_bin_type=True)
    if len(data) > MAX_FRAME:
        raise InputError(f"message of {len(data)} bytes exceeds the frame bound {MAX_FRAME}")
    return data


def request(msgid: int, method: str, params: dict | None = None) -> bytes:
    return pack([REQUEST, msgid, method, [params or {}]])


def response(msgid: int, err: dict | None, result: Any = None) -> bytes:
    return pack([RESPONSE, msgid, err, result])


def notification(method: str, params: Any) -> bytes:
    return pack([NOTIFICATION, method, [params]])


def unpacker() -> msgpack.Unpacker:
    """A streaming decoder whose buffer never grows past the frame bound."""
    return msgpack.Unpacker(raw=False, max_buffer_size=MAX_FRAME, strict_map_key=True)


class BadMessage(Exception):
    """A request that cannot be served; carries the id to answer (None: not answerable)."""

    def __init__(self, msgid: int | None, code: str, message: str) -> None:
        super().__init__(message)
        self.msgid, self.code, self.message = msgid, code, message


def parse_request(message: object) -> tuple[int, str, _Params]:
    """A decoded message -> (id, method, validated params), or BadMessage."""
    if not isinstance(message, list) or len(message) != 4 or message[0] != REQUEST:
        raise BadMessage(None, INVALID, "expected a request [0, id, method, params]")
    _, msgid, method, params = message
    if not isinstance(msgid, int) or isinstance(msgid, bool) or not 0 <= msgid <= MAX_ID:
        raise BadMessage(None, INVALID, "the request id must be an unsigned 32-bit integer")
    if not isinstance(method, str) or method not in METHODS:
        raise BadMessage(msgid, UNKNOWN_METHOD, f"unknown method {method!r} "
                         f"(methods: {', '.join(METHODS)})")
    if isinstance(params, list) and len(params) <= 1:
        params = params[0] if params else {}
    if not isinstance(params, dict):
        raise BadMessage(msgid, INVALID, "params must be [] or [{name: value, ...}]")
    try:
        return msgid, method, METHODS[method].model_validate(params)
    except ValidationError as exc:
        raise BadMessage(msgid, INVALID, f"{method}: {one_line(exc)}") from None

"""The daemon's wire: MessagePack-RPC over a Unix stream socket, with bounded frames.

Request `[0, id, method, params]`, response `[1, id, error, result]`, notification
`[2, method, params]`. `params` is an array holding at most one map of named arguments;
every method's arguments are a pydantic model, so nothing unvalidated goes further.
An error is the map `{"code": ..., "message": ...}`. `FrameReader` cuts the byte stream into
whole messages and refuses a declared length over the bound as soon as its header arrives.
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
CANCELLED = "cancelled"  # the request was cancelled before it started
IDLE = "idle"  # the connection was closed after being idle too long
MAX_DEPTH = 1024  # nesting of arrays and maps (msgpack's own decoder stops there too)
MAX_ITEMS = 65_536  # values in one message (a chat of 256 messages needs about 800)


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


class ComposeParams(_Params):
    """What would be composed under a budget and a priority (default: the daemon's own)."""

    budget_bytes: float | None = Field(default=None, gt=0)
    preset: str | None = None
    weights: tuple[float, float, float] | None = None
    max_latency_ms: float | None = Field(default=None, gt=0)
    max_memory_bytes: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _at_most_one(self) -> ComposeParams:
        if self.preset is not None and self.weights is not None:
            raise ValueError("give a preset or three weights, not both")
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


class CancelParams(_Params):
    id: int = Field(ge=0, le=MAX_ID, description="the id of a request on this connection")


METHODS: dict[str, type[_Params]] = {
    "hello": NoParams, "status": NoParams, "plans": NoParams, "generate": GenerateParams,
    "chat": ChatParams, "set_priority": SetPriorityParams, "pin": PinParams,
    "unpin": UnpinParams, "reload": NoParams, "events": NoParams, "cancel": CancelParams,
    "compose": ComposeParams,
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


class FrameError(Exception):
    """The byte stream cannot go on: `code` is TOO_LARGE or INVALID."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


# First byte -> (bytes of length/count after it, fixed payload bytes, kind) for the non-fix
# types; kind "raw" skips the length's bytes, "ext" one more, "array"/"map" open containers.
_HEADS: dict[int, tuple[int, int, str]] = {
    0xC0: (0, 0, "raw"), 0xC2: (0, 0, "raw"), 0xC3: (0, 0, "raw"),
    0xC4: (1, 0, "raw"), 0xC5: (2, 0, "raw"), 0xC6: (4, 0, "raw"),
    0xC7: (1, 1, "ext"), 0xC8: (2, 1, "ext"), 0xC9: (4, 1, "ext"),
    0xCA: (0, 4, "raw"), 0xCB: (0, 8, "raw"),
    0xCC: (0, 1, "raw"), 0xCD: (0, 2, "raw"), 0xCE: (0, 4, "raw"), 0xCF: (0, 8, "raw"),
    0xD0: (0, 1, "raw"), 0xD1: (0, 2, "raw"), 0xD2: (0, 4, "raw"), 0xD3: (0, 8, "raw"),
    0xD4: (0, 2, "raw"), 0xD5: (0, 3, "raw"), 0xD6: (0, 5, "raw"), 0xD7: (0, 9, "raw"),
    0xD8: (0, 17, "raw"), 0xD9: (1, 0, "raw"), 0xDA: (2, 0, "raw"), 0xDB: (4, 0, "raw"),
    0xDC: (2, 0, "array"), 0xDD: (4, 0, "array"), 0xDE: (2, 0, "map"), 0xDF: (4, 0, "map"),
}


class FrameReader:
    """Cuts a MessagePack byte stream into whole frames (bytes), reading only headers.

    A declared length or count over `max_frame`, a frame over it, more than MAX_ITEMS values
    or nesting past MAX_DEPTH raise FrameError at once; `partial` says a frame has begun.
    """

    def __init__(self, *, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0  # where the next header starts in _buf
        self._skip = 0  # payload bytes of the current value still to come
        self._open: list[int] = []  # values still expected by each open array/map
        self._items = 0

    @property
    def partial(self) -> bool:
        return bool(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """The frames completed by `data` (possibly none)."""
        self._buf += data
        if len(self._buf) > self.max_frame:
            raise FrameError(TOO_LARGE, f"message exceeds the frame bound {self.max_frame}")
        frames: list[bytes] = []
        buf = self._buf
        while True:
            if self._skip:
                step = min(self._skip, len(buf) - self._pos)
                self._pos += step
                self._skip -= step
                if self._skip:
                    break
                if self._value_done():
                    frames.append(self._cut())
                    buf = self._buf
                continue
            if self._pos >= len(buf):
                break
            head = self._header(buf)
            if head is None:
                break
            size, kind, count = head
            self._items += 1
            if self._items > MAX_ITEMS:
                raise FrameError(TOO_LARGE, f"message holds more than {MAX_ITEMS} values")
            if kind == "container" and count:
                if len(self._open) >= MAX_DEPTH:
                    raise FrameError(INVALID, f"message nested deeper than {MAX_DEPTH}")
                self._open.append(count)
                self._pos += size
                continue
            self._pos += size
            self._skip = count if kind == "raw" else 0
            if not self._skip and self._value_done():
                frames.append(self._cut())
                buf = self._buf
        return frames

    def _header(self, buf: bytearray) -> tuple[int, str, int] | None:
        """(header bytes, "raw" or "container", payload bytes or values), None: incomplete."""
        b = buf[self._pos]
        if b <= 0x7F or b >= 0xE0:
            return 1, "raw", 0
        if b <= 0x8F:
            return 1, "container", 2 * (b & 0x0F)
        if b <= 0x9F:
            return 1, "container", b & 0x0F
        if b <= 0xBF:
            return self._checked(1, "raw", b & 0x1F)
        if b not in _HEADS:
            raise FrameError(INVALID, f"not MessagePack: byte 0x{b:02x} starts no value")
        width, fixed, kind = _HEADS[b]
        if len(buf) - self._pos < 1 + width:
            return None
        n = int.from_bytes(buf[self._pos + 1:self._pos + 1 + width], "big") if width else 0
        if kind == "array":
            return self._checked(1 + width, "container", n)
        if kind == "map":
            return self._checked(1 + width, "container", 2 * n)
        return self._checked(1 + width, "raw", n + fixed)

    def _checked(self, size: int, kind: str, n: int) -> tuple[int, str, int]:
        if n > self.max_frame:
            what = "values" if kind == "container" else "bytes"
            raise FrameError(TOO_LARGE, f"a value declares {n} {what}, over the frame bound "
                             f"{self.max_frame}")
        return size, kind, n

    def _value_done(self) -> bool:
        """One value ended: close the containers it completes; True when a frame ended."""
        while self._open:
            self._open[-1] -= 1
            if self._open[-1]:
                return False
            self._open.pop()
        return True

    def _cut(self) -> bytes:
        frame = bytes(self._buf[:self._pos])
        del self._buf[:self._pos]
        self._pos, self._items = 0, 0
        return frame


def decode(frame: bytes) -> object:
    """One whole frame -> its value (ValueError and msgpack errors for bad content)."""
    return msgpack.unpackb(frame, raw=False, strict_map_key=True)


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

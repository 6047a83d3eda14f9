"""The OpenAI request models, their wire translation, the error mapping and the HTTP address
option, without a daemon."""

from __future__ import annotations

import pytest

from apreqeld.errors import BusyError, DaemonError, InputError
from apreqeld.runtime import openai, wire
from apreqeld.runtime.config import http_address, load_config
from apreqeld.runtime.metrics import outcome_of, swap_reason
from apreqeld.runtime.openai import OpenAIError, daemon_error

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def refused(endpoint: str, body: object) -> OpenAIError:
    with pytest.raises(OpenAIError) as err:
        req = openai.parse(endpoint, body)
        openai.wire_params(req, n_ctx=256)
    assert err.value.status == 400
    return err.value


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"model": "m"}, "messages", "messages: Field required"),
    (CHAT | {"temperature": 3}, "temperature", "temperature: Input should be less than or "
     "equal to 2"),
    (CHAT | {"tools": [{"type": "function"}]}, "tools", "tools: tools (function calling) are "
     "not supported"),
    (CHAT | {"n": 2}, "n", "n: only n = 1 is supported"),
    (CHAT | {"logprobs": True}, "logprobs", "logprobs: logprobs are not supported"),
    (CHAT | {"frobnicate": 1}, "frobnicate", "frobnicate: unrecognized request argument"),
    (CHAT | {"stream_options": {"include_usage": True}}, "stream_options",
     "stream_options: stream_options is only allowed with stream: true"),
    ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role",
     "messages[0].role: tool messages need tools, which are not supported"),
    ({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]}]},
     "messages[0].content", "messages[0].content: part 1 is image_url; only text parts are "
     "supported"),
    (CHAT | {"stop": ["a"] * 9}, "stop", "stop: List should have at most 8 items after "
     "validation, not 9"),
    (CHAT | {"seed": -1}, "seed", "seed: Input should be greater than or equal to 0"),
    (CHAT | {"max_tokens": 9000}, "max_tokens", "max_tokens: Input should be less than or "
     "equal to 8192"),
    (CHAT | {"response_format": {"type": "json_schema"}}, "response_format",
     "response_format: type json_schema needs json_schema: {name, schema}"),
    (CHAT | {"response_format": {"type": "xml"}}, "response_format.type",
     "response_format.type: Input should be 'text', 'json_object' or 'json_schema'"),
])
def test_chat_requests_are_refused_naming_the_field(body, param, message) -> None:
    err = refused("chat", body)
    assert (err.param, err.message) == (param, message)
    assert err.body() == {"error": {"message": message, "type": "invalid_request_error",
                                    "param": param, "code": err.code}}


def test_completion_requests_are_refused_naming_the_field() -> None:
    assert refused("generate", {"model": "m", "prompt": ["a", "b"]}).message == \
        "prompt: exactly one prompt is supported (n = 1)"
    assert refused("generate", {"model": "m", "prompt": "a", "echo": True}).param == "echo"
    assert refused("generate", {"model": "m", "prompt": "a", "suffix": "z"}).param == "suffix"
    assert refused("generate", []).message == "the request body must be a JSON object"


def test_requests_become_wire_params() -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    req = openai.parse("chat", {
        "model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 5, "temperature": 0, "top_p": 0.5, "stop": "x", "seed": 3,
        "presence_penalty": 1, "frequency_penalty": -1, "n": 1, "user": "me",
        "response_format": {"type": "json_schema", "json_schema": {"name": "s",
                                                                   "schema": schema}}})
    kind, params = openai.wire_params(req, n_ctx=256)
    assert kind == "chat"
    assert params == {"messages": [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "ab"}],
                      "max_tokens": 5, "temperature": 0.0, "top_p": 0.5,
                      "presence_penalty": 1.0, "frequency_penalty": -1.0, "stop": ["x"],
                      "seed": 3, "response_format": {"type": "json_schema",
                                                     "json_schema": schema}}
    kind, params = openai.wire_params(openai.parse("generate", {"model": "m", "prompt": ["p"]}),
                                      n_ctx=256)
    assert (kind, params["prompt"], params["max_tokens"]) == ("generate", "p", 16)
    _, params = openai.wire_params(openai.parse("chat", CHAT), n_ctx=256)
    assert params["max_tokens"] == 256 and params["temperature"] == 1.0
    assert params["top_p"] is None and params["response_format"] is None
    _, params = openai.wire_params(openai.parse("chat", CHAT | {"response_format": {
        "type": "json_object"}}), n_ctx=256)
    assert params["response_format"] == {"type": "json_object", "json_schema": None}


def test_wire_validates_sampling_and_response_format() -> None:
    base = {"prompt": "p"}
    with pytest.raises(wire.BadMessage, match=r"generate: top_p: Input should be less than"):
        wire.parse_request([0, 1, "generate", [base | {"top_p": 1.5}]])
    with pytest.raises(wire.BadMessage, match=r"json_schema is given with type json_schema, "
                       "and only then"):
        wire.parse_request([0, 1, "generate", [base | {"response_format": {
            "type": "json_object", "json_schema": {}}}]])
    deep: dict = {}
    node = deep
    for _ in range(40):
        node["items"] = {}
        node = node["items"]
    with pytest.raises(wire.BadMessage, match="json_schema nests deeper than 32 levels"):
        wire.parse_request([0, 1, "chat", [{"messages": [{"role": "user", "content": "x"}],
                                            "response_format": {"type": "json_schema",
                                                                "json_schema": deep}}]])
    _, _, params = wire.parse_request([0, 1, "generate", [base | {
        "presence_penalty": 0.5, "response_format": {"type": "json_object"}}]])
    assert params.presence_penalty == 0.5 and params.response_format.type == "json_object"


def test_errors_map_to_statuses() -> None:
    busy = daemon_error(BusyError("busy: the request queue is full"))
    assert (busy.status, busy.headers, busy.type) == (429, {"Retry-After": "1"},
                                                      "rate_limit_error")
    assert daemon_error(DaemonError("x", code=wire.UNAVAILABLE)).status == 503
    assert daemon_error(DaemonError("x", code=wire.SHUTTING_DOWN)).status == 503
    assert daemon_error(DaemonError("x", code=wire.WORKER_FAILED)).status == 500
    bad = daemon_error(DaemonError("response_format.json_schema cannot be enforced: no",
                                   code=wire.INVALID))
    assert (bad.status, bad.param) == (400, "response_format")
    long = daemon_error(DaemonError("the prompt is too long: 900 > 256", code=wire.INVALID))
    assert (long.status, long.code) == (400, "context_length_exceeded")
    assert [outcome_of(DaemonError("x", code=c)) for c in
            (wire.BUSY, wire.INVALID, wire.UNAVAILABLE, "cancelled", wire.WORKER_FAILED)] == \
        ["busy", "invalid", "unavailable", "cancelled", "failed"]
    assert [swap_reason(r) for r in ("pinned to abcd", "unpinned: x", "priority memory: y",
                                     "plan set reloaded", "monitor: z", None)] == \
        ["pin", "unpin", "priority", "reload", "policy", "other"]


def test_reply_objects() -> None:
    reply = openai.Reply("chat", "tiny")
    result = {"text": "hi", "finish": "length", "plan": "abcd1234", "queued_ms": 1.0,
              "usage": {"prompt_tokens": 3, "completion_tokens": 2, "ms_per_token": 4.0}}
    whole = reply.whole(result)
    assert whole["id"].startswith("chatcmpl-") and whole["system_fingerprint"] == "abcd1234"
    assert whole["choices"][0]["message"]["content"] == "hi"
    assert whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert whole["apreqeld"]["member"] == "abcd1234" and whole["apreqeld"]["ms_per_token"] == 4
    first = reply.chunk("abcd1234", first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    end, use = reply.last(result, include_usage=True)
    assert end["id"] == use["id"] == whole["id"] and use["choices"] == []
    assert end["choices"][0]["finish_reason"] == "length" and use["usage"]["total_tokens"] == 5


@pytest.mark.parametrize(("text", "expected"), [
    ("8080", "127.0.0.1:8080"), ("localhost:0", "127.0.0.1:0"), ("[::1]:9", "[::1]:9"),
    ("unix:/run/a.sock", "unix:/run/a.sock")])
def test_http_addresses(text: str, expected: str) -> None:
    assert str(http_address(text)) == expected
    assert http_address(text).loopback


def test_http_off_loopback_needs_a_token_file() -> None:
    with pytest.raises(InputError, match=r"options: http_token_file: HTTP on 0.0.0.0:80 \(not "
                       r"loopback\) needs a bearer-token file \(--http-token-file\); without "
                       "one, HTTP is loopback only"):
        load_config(None, plans="p", http="0.0.0.0:80")
    assert load_config(None, plans="p", http="0.0.0.0:80", http_token_file="t").http == \
        "0.0.0.0:80"
    with pytest.raises(InputError, match="the host must be an IP address or localhost"):
        load_config(None, plans="p", http="example.com:80")
    with pytest.raises(InputError, match="the port must be 0 to 65535"):
        load_config(None, plans="p", http="127.0.0.1:70000")


def test_http_env_is_the_default(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("APREQELD_HTTP", "8080")
    assert load_config(None, plans="p").http == "127.0.0.1:8080"
    file = tmp_path / "c.toml"
    file.write_text('http = "unix:/run/h.sock"\nhttp_max_body_bytes = "64KiB"\n')
    config = load_config(file, plans="p")  # the file, then flags, override the environment
    assert (config.http, config.http_max_body_bytes) == ("unix:/run/h.sock", 65536)
    assert load_config(file, plans="p", http="9").http == "127.0.0.1:9"
    monkeypatch.delenv("APREQELD_HTTP")
    assert load_config(None, plans="p").http is None


def test_a_stream_the_client_stops_reading_is_cut() -> None:
    """A write that does not drain within http_timeout_s aborts the connection and cancels the
    job (a real client cannot fill the kernel's buffers with a few hundred tokens)."""
    import asyncio
    from types import SimpleNamespace

    from apreqeld.runtime.http import HttpFrontDoor
    from apreqeld.runtime.metrics import Metrics

    class Stalled:
        async def write(self, data: bytes) -> None:
            await asyncio.Event().wait()

    class Gone:
        async def write(self, data: bytes) -> None:
            raise ConnectionResetError("reset by peer")

    aborted = []
    request = SimpleNamespace(transport=SimpleNamespace(abort=lambda: aborted.append(1)))
    config = load_config(None, plans="p", http="127.0.0.1:0", http_timeout_s=0.05)
    door = HttpFrontDoor(config, SimpleNamespace(), Metrics(SimpleNamespace()))

    async def main() -> tuple:
        slow, gone = SimpleNamespace(cancelled=False), SimpleNamespace(cancelled=False)
        return (await door._send(request, slow, Stalled(), [b"data: x\n\n"]), slow.cancelled,
                await door._send(request, gone, Gone(), [b"data: x\n\n"]), gone.cancelled)

    assert asyncio.run(main()) == (False, True, False, True)
    assert aborted == [1] and door.refused["slow"] == 1

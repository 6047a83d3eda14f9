"""The OpenAI-compatible HTTP API of the real daemon (real workers, the default model): the
official `openai` client streaming and not, JSON-schema output, raw HTTP for every error status
on a connection that stays usable, /metrics through prometheus_client's parser, /health
through swaps, streams answered exactly once under swaps, cancellation and mid-stream failure.

Every server listens on 127.0.0.1 (port 0) and is stopped by the fixtures."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Literal

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from apreqeld.client import Client
from apreqeld.errors import DaemonError
from daemon_support import RunningDaemon, ctl, start_daemon

pytestmark = pytest.mark.integration
LONG = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0}  # never stops early


def http_url(d: RunningDaemon, timeout: float = 30) -> str:
    """The URL the daemon printed for its HTTP listener."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"apreqeld: HTTP on (\S+) ", d.stderr())
        if found:
            return found.group(1)
        if d.proc.poll() is not None:
            break
        time.sleep(0.02)
    raise AssertionError(f"no HTTP listener: {d.stderr()}")


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=kw.pop("api_key", "unused"),
                         max_retries=0, timeout=60, **kw)


class Raw:
    """One keep-alive HTTP connection; requests answer (status, headers, parsed body)."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port_of(url), timeout=60)
        self.token = token

    def __call__(self, method: str, path: str, body: object = None, *,
                 raw: bytes | None = None) -> tuple[int, dict, object]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        self.conn.request(method, path, body=data, headers=headers)
        resp = self.conn.getresponse()
        text = resp.read().decode()
        ctype = resp.getheader("Content-Type", "")
        return resp.status, dict(resp.getheaders()), (json.loads(text) if "json" in ctype
                                                      else text)

    def close(self) -> None:
        self.conn.close()


def sse_events(resp: http.client.HTTPResponse) -> Iterator[tuple[str | None, str]]:
    """(event, data) of each server-sent event until the stream ends."""
    event = None
    for raw in resp:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, line[6:]
            event = None


def post_stream(url: str, path: str, body: dict) -> tuple[http.client.HTTPConnection,
                                                          http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port_of(url), timeout=60)
    conn.request("POST", path, body=json.dumps(body | {"stream": True}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    return conn, resp


def metrics(url: str) -> dict[str, dict[tuple, float]]:
    """name -> {sorted label items: value} of every sample on /metrics."""
    status, headers, text = Raw(url)("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def counts(d: RunningDaemon) -> dict:
    with Client(d.socket, timeout=30) as c:
        return c.status()["counts"]


def wait_counts(d: RunningDaemon, key: str, value: int, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while (now := counts(d))[key] < value:
        assert time.monotonic() < deadline, f"{key} stayed {now[key]} (< {value}): {now}"
        time.sleep(0.02)
    return now


@pytest.fixture(scope="module")
def served(tiny_plans, tmp_path_factory) -> Iterator[tuple[RunningDaemon, str]]:
    """One daemon for the tests that do not change what it serves (q4_0, priority memory)."""
    d = start_daemon(tiny_plans, tmp_path_factory.mktemp("http"), "--priority", "memory",
                     "--http", "127.0.0.1:0")
    try:
        yield d, http_url(d)
    finally:
        assert d.stop() == 0


@pytest.mark.timeout(120)
def test_openai_client_whole_and_streamed(served, tiny_plans) -> None:
    d, url = served
    oa = client(url)
    (model,) = oa.models.list().data
    assert model.id == "tiny" and model.owned_by == "apreqeld"
    assert {m["id"] for m in model.model_extra["apreqeld"]["members"]} == \
        set(tiny_plans.by_label.values())
    plan = tiny_plans.by_label["q4_0"]
    r = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                   max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.system_fingerprint == plan
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 0
    assert r.model_extra["apreqeld"]["member"] == plan
    assert r.model_extra["apreqeld"]["ms_per_token"] > 0
    chunks = list(oa.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        r.choices[0].message.content  # greedy: the same text whole or streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert {c.system_fingerprint for c in chunks} == {plan}
    t = oa.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5,
                              temperature=0)
    pieces = [c.choices[0].text for c in oa.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0, stream=True)]
    assert t.object == "text_completion" and "".join(pieces) == t.choices[0].text
    assert t.usage.completion_tokens == 5 and t.system_fingerprint == plan


class Sky(BaseModel):
    color: Literal["red", "green", "blue"]
    clear: bool


@pytest.mark.timeout(120)
def test_json_schema_output_is_parsed_and_validated(served) -> None:
    _, url = served
    oa = client(url)
    parsed = oa.chat.completions.parse(  # the client sends Sky's schema as json_schema
        model="tiny", messages=[{"role": "user", "content": "What colour is the sky?"}],
        response_format=Sky, max_tokens=48, temperature=0)
    message = parsed.choices[0].message
    assert parsed.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Sky)
    assert Sky.model_validate_json(message.content) == message.parsed
    streamed = "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "What colour is the sky?"}],
        max_tokens=48, temperature=0, stream=True, response_format={
            "type": "json_schema", "json_schema": {"name": "sky",
                                                   "schema": Sky.model_json_schema()}}))
    assert Sky.model_validate_json(streamed) == message.parsed
    anything = oa.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "A cat as JSON"}], max_tokens=8,
        temperature=0, response_format={"type": "json_object"})
    assert anything.choices[0].message.content.startswith("{")
    with pytest.raises(openai.BadRequestError, match="response_format.json_schema cannot be "
                       "enforced: Unrecognized schema"):
        oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                   max_tokens=4, response_format={
                                       "type": "json_schema",
                                       "json_schema": {"name": "x", "schema": {"type": "no"}}})


@pytest.mark.timeout(120)
def test_raw_http_errors_keep_the_connection_usable(served) -> None:
    _, url = served
    raw = Raw(url)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    cases = [
        ("POST", "/v1/chat/completions", None, b"{not json", 400, "invalid_json", None),
        ("POST", "/v1/chat/completions", {"model": "tiny"}, None, 400,
         "missing_required_parameter", "messages"),
        ("POST", "/v1/chat/completions", chat | {"tools": [{"type": "function"}]}, None, 400,
         "unsupported_parameter", "tools"),
        ("POST", "/v1/chat/completions", chat | {"top_p": 2}, None, 400, "invalid_value",
         "top_p"),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": "x", "bogus": 1}, None, 400,
         "unknown_parameter", "bogus"),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": "word " * 400}, None, 400,
         "context_length_exceeded", None),
        ("POST", "/v1/chat/completions", chat | {"model": "gpt-4o"}, None, 404,
         "model_not_found", "model"),
        ("GET", "/v1/models/gpt-4o", None, None, 404, "model_not_found", "model"),
        ("GET", "/v2/anything", None, None, 404, "not_found", None),
        ("DELETE", "/v1/models", None, None, 405, "method_not_allowed", None),
        ("POST", "/v1/completions", None, json.dumps({"model": "tiny", "prompt": "x" * (2 << 20)
                                                      }).encode(), 413, "request_too_large",
         None),
    ]
    for method, path, body, data, status, code, param in cases:
        got, headers, answer = raw(method, path, body, raw=data)
        assert (got, answer["error"]["code"], answer["error"]["param"]) == (status, code, param), \
            answer
        assert set(answer["error"]) == {"message", "type", "param", "code"}
        assert answer["error"]["type"] == "invalid_request_error"
        assert raw("GET", "/health")[0] == 200  # the same connection, still usable
    status, _, answer = raw("POST", "/v1/chat/completions", chat)
    assert status == 200 and answer["usage"]["completion_tokens"] == 4
    raw.close()
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
        head = s.recv(65536).decode(errors="replace")
    assert head.startswith("HTTP/1.0 400 Bad Request") and '"code": "bad_request"' in head


@pytest.mark.timeout(120)
def test_client_disconnect_cancels_its_generation(served) -> None:
    d, url = served
    before, tokens = counts(d), metrics(url)["apreqeld_completion_tokens_total"]
    conn, resp = post_stream(url, "/v1/completions", {"model": "tiny"} | LONG)
    assert next(sse_events(resp))[1].startswith("{")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_counts(d, "cancelled", before["cancelled"] + 1)
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=10) as s:  # not streamed
        body = json.dumps({"model": "tiny"} | LONG).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_counts(d, "accepted", before["accepted"] + 2)  # in the queue or generating
    after = wait_counts(d, "cancelled", before["cancelled"] + 2)
    assert after["served"] == before["served"] and after["failed"] == before["failed"]
    generated = metrics(url)["apreqeld_completion_tokens_total"]
    key = (("frontend", "http"),)
    assert generated[key] - tokens[key] < 2 * LONG["max_tokens"]  # both stopped early


@pytest.mark.timeout(120)
def test_metrics_count_both_front_doors(served, tiny_plans) -> None:
    d, url = served
    before = metrics(url)
    oa = client(url)
    for _ in range(2):
        oa.completions.create(model="tiny", prompt="Hi", max_tokens=4, temperature=0)
    with Client(d.socket, timeout=30) as c:
        c.generate("Hi", max_tokens=3, temperature=0)
    after = metrics(url)
    req = "apreqeld_requests_total"

    def delta(name: str, **labels: str) -> float:
        key = tuple(sorted(labels.items()))
        return after[name].get(key, 0) - before[name].get(key, 0)

    assert delta(req, frontend="http", kind="generate", outcome="served") == 2
    assert delta(req, frontend="msgpack", kind="generate", outcome="served") == 1
    assert delta("apreqeld_completion_tokens_total", frontend="http") == 8
    assert delta("apreqeld_completion_tokens_total", frontend="msgpack") == 3
    assert delta("apreqeld_time_to_first_token_seconds_count") == 3
    assert delta("apreqeld_ms_per_token_count") == 3
    plan = tiny_plans.by_label["q4_0"]
    (info,) = after["apreqeld_serving_info"]
    assert dict(info)["member"] == plan and dict(info)["state"] == "measured"
    assert after["apreqeld_ready"][()] == 1 and after["apreqeld_queue_length"][()] == 0
    assert after["apreqeld_queue_bound"][()] == 64 and after["apreqeld_budget_bytes"][()] > 0
    assert after["apreqeld_latency_scale"][()] > 0
    assert after["apreqeld_serving_footprint_bytes"][(("source", "measured"),)] == \
        tiny_plans.planset.member(plan).measured.footprint_bytes
    assert after["apreqeld_memory_available_bytes"][()] > 0
    assert after["apreqeld_http_connections"][()] >= 1
    assert after["apreqeld_scheduler_requests_total"][(("outcome", "accepted"),)] == \
        counts(d)["accepted"]


@pytest.mark.timeout(120)
def test_sampling_options_on_the_msgpack_socket_and_in_apreqelctl(served) -> None:
    d, _ = served
    schema = Sky.model_json_schema()
    with Client(d.socket, timeout=60) as c:
        r = c.chat([{"role": "user", "content": "What colour is the sky?"}], max_tokens=48,
                   temperature=0, response_format={"type": "json_schema",
                                                   "json_schema": schema})
        assert r["finish"] == "stop" and Sky.model_validate_json(r["text"])
        assert r["usage"]["prompt_tokens"] > 0
        r = c.generate("Once upon a time", max_tokens=6, temperature=0.7, top_p=0.5, seed=7,
                       presence_penalty=1.5, frequency_penalty=-0.5)
        again = c.generate("Once upon a time", max_tokens=6, temperature=0.7, top_p=0.5,
                           seed=7, presence_penalty=1.5, frequency_penalty=-0.5)
        assert r["text"] == again["text"] and r["usage"]["completion_tokens"] == 6
        assert c.generate("{", max_tokens=6, temperature=0, response_format={
            "type": "json_object"})["text"].startswith("{")
        with pytest.raises(DaemonError, match=r"^generate: top_p: Input should be less than "
                           r"or equal to 1$") as err:
            c.generate("x", top_p=1.5)
        assert err.value.code == "invalid"
        with pytest.raises(DaemonError, match=r"^response_format.json_schema cannot be "
                           r"enforced: Unrecognized schema") as err:
            c.generate("x", max_tokens=2, response_format={"type": "json_schema",
                                                           "json_schema": {"type": "no"}})
        assert err.value.code == "invalid"
        assert c.generate("Hi", max_tokens=2)["usage"]["completion_tokens"] == 2  # usable
    run = ctl("chat", "What colour is the sky?", "--max-tokens", "48", "--temperature", "0",
              "--json-schema", json.dumps(schema), "--json", socket=d.socket)
    assert run.returncode == 0, run.stderr
    assert Sky.model_validate_json(json.loads(run.stdout)["text"])
    run = ctl("generate", "Hi", "--max-tokens", "3", "--top-p", "0.9", "--presence-penalty",
              "0.5", "--frequency-penalty", "0.5", "--json-object", socket=d.socket)
    assert run.returncode == 0 and run.stdout.startswith("{"), run.stderr
    run = ctl("generate", "Hi", "--json-schema", "[1", socket=d.socket)
    assert run.returncode == 2 and "not a JSON schema file or JSON text" in run.stderr

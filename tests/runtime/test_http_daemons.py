"""The HTTP API on daemons of their own: /health and concurrent streams through swaps (each
answered exactly once, counted by the clients), 429 on a full queue, 503 while loading and
when nothing can serve, a worker killed mid-stream, the bearer token, the connection, body and
time bounds, and HTTP over a Unix socket."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import psutil
import pytest

from apreqeld.client import Client
from apreqeld.manifest import member_shards
from apreqeld.store.shards import ShardStore
from daemon_support import REPO, start_daemon, wait_serving
from test_faults import own_state, shard_of
from test_http import (
    LONG,
    Raw,
    client,
    counts,
    http_url,
    metrics,
    port_of,
    post_stream,
    sse_events,
    wait_counts,
)

pytestmark = pytest.mark.integration
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def worker_pids(d) -> list[int]:
    return [p.pid for p in psutil.Process(d.proc.pid).children()]


class Health:
    """/health polled on one connection until stopped: (status, member, swapping) each time."""

    def __init__(self, url: str) -> None:
        self.url, self.seen, self.stop_flag = url, [], threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        raw = Raw(self.url)
        while not self.stop_flag.is_set():
            status, _, body = raw("GET", "/health")
            self.seen.append((status, body.get("member"), body.get("swapping")))
            time.sleep(0.01)
        raw.close()

    def stop(self) -> list[tuple]:
        self.stop_flag.set()
        self.thread.join(30)
        return self.seen


class Streams:
    """Clients streaming completions with the openai client back to back until stopped; each
    stream's chunks checked as they come (one id, one finish, one usage chunk)."""

    def __init__(self, url: str, n: int) -> None:
        self.url, self.stop_flag, self.lock = url, threading.Event(), threading.Lock()
        self.sent = 0
        self.done: list[dict] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]

    def _run(self, i: int) -> None:
        oa = client(self.url)
        while not self.stop_flag.is_set():
            with self.lock:
                self.sent += 1
            try:
                chunks = list(oa.completions.create(
                    model="tiny", prompt=f"Story {i}:", max_tokens=6, seed=i, stream=True,
                    stream_options={"include_usage": True}))
            except openai.OpenAIError as exc:
                with self.lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            finishes = [c.choices[0].finish_reason for c in chunks if c.choices
                        and c.choices[0].finish_reason]
            usage = [c.usage for c in chunks if c.usage is not None]
            with self.lock:
                self.done.append({"ids": {c.id for c in chunks}, "finishes": finishes,
                                  "usage": usage, "members": {c.system_fingerprint
                                                              for c in chunks}})

    def __enter__(self) -> Streams:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(90)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["make-before-break", "break-before-make"])
def test_health_and_streams_through_swaps(daemon_factory, tiny_plans, mode) -> None:
    d = daemon_factory("--priority", "memory", "--swap-mode", mode, "--http", "127.0.0.1:0")
    url, ids = http_url(d), tiny_plans.by_label
    before = counts(d)
    health = Health(url)
    with Streams(url, 4) as streams, Client(d.socket, timeout=120) as c:
        time.sleep(0.5)
        for plan in (ids["q8_0"], ids["mix"]):
            assert c.pin(plan, wait=True)["plan"] == plan
            time.sleep(0.5)
        assert c.unpin(wait=True)["plan"] == ids["q4_0"]
        time.sleep(0.5)
    seen = health.stop()
    assert streams.errors == []
    assert len(streams.done) == streams.sent >= 8  # every stream sent came back complete
    for s in streams.done:
        assert len(s["ids"]) == 1 and s["finishes"] == ["length"]
        assert len(s["usage"]) == 1 and s["usage"][0].completion_tokens == 6
        assert len(s["members"]) == 1
    assert len({next(iter(s["ids"])) for s in streams.done}) == len(streams.done)
    after = counts(d)
    answered = after["served"] - before["served"]
    assert answered == after["accepted"] - before["accepted"] == streams.sent
    assert after["failed"] == before["failed"] and after["swaps"] - before["swaps"] == 3
    assert {status for status, _, _ in seen} == {200}, seen
    order = [m for i, (_, m, _) in enumerate(seen) if i == 0 or seen[i - 1][1] != m]
    assert order == [ids["q4_0"], ids["q8_0"], ids["mix"], ids["q4_0"]]
    assert any(swapping for _, _, swapping in seen)
    members = set().union(*(s["members"] for s in streams.done))
    assert members <= set(ids.values()) and len(members) >= 2
    swaps = metrics(url)["apreqeld_swaps_total"]
    assert swaps[(("mode", mode), ("reason", "pin"))] == 2
    assert swaps[(("mode", mode), ("reason", "unpin"))] == 1


@pytest.mark.timeout(120)
def test_a_full_queue_is_429_with_retry_after(daemon_factory) -> None:
    d = daemon_factory("--priority", "memory", "--queue", "1", "--http", "127.0.0.1:0")
    url = http_url(d)
    before = counts(d)
    conn, resp = post_stream(url, "/v1/completions", {"model": "tiny"} | LONG)
    events = sse_events(resp)
    next(events)  # generating: the queue is empty again
    waiting = {}
    queued = threading.Thread(target=lambda: waiting.update(
        answer=Raw(url)("POST", "/v1/chat/completions", CHAT)))
    queued.start()
    wait_counts(d, "accepted", before["accepted"] + 2)
    raw = Raw(url)
    status, headers, body = raw("POST", "/v1/chat/completions", CHAT)
    assert (status, headers["Retry-After"]) == (429, "1")
    assert body == {"error": {"message": "busy: the request queue is full (1 waiting); try "
                              "again", "type": "rate_limit_error", "param": None,
                              "code": "queue_full"}}
    assert raw("GET", "/health")[0] == 200
    with pytest.raises(openai.RateLimitError, match="the request queue is full"):
        client(url).chat.completions.create(**CHAT)
    assert list(events)[-1] == (None, "[DONE]")  # the first stream finishes, then the queued
    queued.join(60)
    assert waiting["answer"][0] == 200
    conn.close()
    after = counts(d)
    assert after["busy"] - before["busy"] == 2 and after["served"] - before["served"] == 2


@pytest.mark.timeout(240)
def test_503_while_loading_and_when_nothing_can_serve(tiny_plans, tmp_path) -> None:
    """The first member lacks a shard: a child process builds it (seconds) while /health and
    completions answer 503 loading. Later that shard and one every member needs are gone, the
    manifest the builder reads is broken and the worker is killed: no member can be
    assembled, nothing can serve (503 unavailable)."""
    ids = tiny_plans.by_label
    state = own_state(tiny_plans, tmp_path)
    shard = shard_of(state, tiny_plans, "q4_0")  # a q4_0 tensor no other member uses
    shard.chmod(0o644)
    shard.unlink()
    folder = tmp_path / "d"
    folder.mkdir()
    d = start_daemon(tiny_plans, folder, "--priority", "memory", "--state-dir", str(state),
                     "--no-watch", "--http", "127.0.0.1:0", wait=False)
    try:
        url = http_url(d)
        raw = Raw(url)
        status, headers, body = raw("GET", "/health")
        assert (status, body["status"], headers["Retry-After"]) == (503, "loading", "1")
        assert body["error"]["code"] == "loading" and body["member"] is None
        status, _, body = raw("POST", "/v1/chat/completions", CHAT)
        assert (status, body["error"]["code"]) == (503, "loading")
        wait_serving(d, timeout=180)
        status, _, body = raw("GET", "/health")
        assert (status, body["status"], body["member"]) == (200, "ok", ids["q4_0"])
        assert "build_start" in d.stderr()
        raw.close()
        shard.chmod(0o644)
        shard.unlink()
        planset = tiny_plans.planset  # and a shard every member needs: none can be assembled
        (common,) = sorted(set.intersection(*(set(member_shards(planset, m))
                                              for m in planset.members)))[:1]
        everyone = ShardStore(state).shard_path(common)
        everyone.chmod(0o644)
        everyone.unlink()
        (d.plans_dir / "planset.json").write_text("{")  # what the builder reads
        (pid,) = worker_pids(d)
        os.kill(pid, signal.SIGKILL)
        raw = Raw(url)
        deadline = time.monotonic() + 60
        while (answer := raw("GET", "/health"))[0] == 200:
            assert time.monotonic() < deadline, answer
            time.sleep(0.05)
        status, _, body = answer
        assert (status, body["status"]) == (503, "unavailable")
        assert body["error"]["message"].startswith("no variant can serve: ")
        status, _, body = raw("POST", "/v1/chat/completions", CHAT)
        assert (status, body["error"]["code"]) == (503, "unavailable")
        assert body["error"]["type"] == "server_error" and ids["q4_0"] in body["error"]["message"]
    finally:
        assert d.stop() == 0


@pytest.mark.timeout(120)
def test_a_worker_killed_mid_stream_is_an_sse_error_event(daemon_factory) -> None:
    d = daemon_factory("--priority", "memory", "--http", "127.0.0.1:0")
    url = http_url(d)
    stream = client(url).completions.create(model="tiny", stream=True, **LONG)
    first = next(iter(stream))
    assert first.choices[0].text is not None
    os.kill(worker_pids(d)[0], signal.SIGKILL)
    with pytest.raises(openai.APIError, match="died during the request"):
        list(stream)
    wait_counts(d, "restarts", 1)
    conn, resp = post_stream(url, "/v1/completions", {"model": "tiny"} | LONG)
    events = sse_events(resp)
    assert next(events)[0] is None
    os.kill(worker_pids(d)[0], signal.SIGKILL)
    rest = list(events)
    assert rest[-1] == (None, "[DONE]")
    event, data = rest[-2]
    error = json.loads(data)["error"]
    assert event == "error" and error["code"] == "worker_failed"
    assert error["type"] == "server_error" and set(error) == {"message", "type", "param", "code"}
    conn.close()
    wait_counts(d, "restarts", 2)
    r = client(url).chat.completions.create(**CHAT)  # the daemon serves on
    assert r.usage.completion_tokens == 4


def connect(url: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port_of(url)), timeout=10)


def closed_within(s: socket.socket, seconds: float) -> tuple[float, bytes]:
    """(seconds until the server closed the connection, what it sent before)."""
    t0, got = time.monotonic(), b""
    s.settimeout(seconds)
    while data := s.recv(65536):
        got += data
    return time.monotonic() - t0, got


@pytest.mark.timeout(120)
def test_bearer_token_and_the_connection_body_and_time_bounds(daemon_factory, tmp_path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    config = tmp_path / "apreqeld.toml"
    config.write_text('http_max_connections = 3\nhttp_max_body_bytes = "4KiB"\n'
                      "http_timeout_s = 1.0\n")
    d = daemon_factory("--priority", "memory", "--http", "127.0.0.1:0", "--http-token-file",
                       str(token), "--config", str(config))
    url = http_url(d)
    raw = Raw(url)
    assert raw("GET", "/health")[0] == 200  # probes need no token
    for given in (None, "wrong"):
        raw.token = given
        status, headers, body = raw("GET", "/v1/models")
        assert (status, headers["WWW-Authenticate"]) == (401, 'Bearer realm="apreqeld"')
        assert body["error"]["type"] == "authentication_error"
        assert body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError, match="missing or wrong bearer token"):
        client(url, api_key="wrong").models.list()
    r = client(url, api_key="s3cret-token").chat.completions.create(**CHAT)
    assert r.usage.completion_tokens == 4
    raw.token = "s3cret-token"
    status, _, body = raw("POST", "/v1/completions", {"model": "tiny", "prompt": "x" * 5000})
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    assert raw("GET", "/v1/models")[0] == 200  # still usable
    raw.close()
    took, got = closed_within(connect(url), 5)  # idle: closed after the 1 s timeout
    assert got == b"" and 0.5 < took < 4
    s = connect(url)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    took, got = closed_within(s, 5)
    assert got == b"" and took < 4
    s = connect(url)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret-token"
              b"\r\nContent-Length: 100\r\n\r\n{\"model\"")  # the body never finished
    took, got = closed_within(s, 8)
    assert got.startswith(b"HTTP/1.1 408 Request Timeout") and b'"code": "timeout"' in got
    held = [connect(url) for _ in range(3)]
    time.sleep(0.2)
    took, got = closed_within(connect(url), 5)
    assert got.startswith(b"HTTP/1.1 503 Service Unavailable") and b"Retry-After: 1" in got
    assert b'"code": "too_many_connections"' in got
    for s in held:
        s.close()
    time.sleep(0.2)
    status, _, text = Raw(url, token="s3cret-token")("GET", "/metrics")
    assert status == 200
    assert 'apreqeld_http_refused_total{reason="connections"} 1.0' in text
    assert 'apreqeld_http_refused_total{reason="unauthorized"} 3.0' in text
    assert 'apreqeld_http_refused_total{reason="slow"} 1.0' in text


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=60)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(str(self.path))


@pytest.mark.timeout(120)
def test_http_over_a_unix_socket(daemon_factory, tmp_path) -> None:
    path = tmp_path / "http" / "apreqeld-http.sock"
    d = daemon_factory("--priority", "memory", "--http", f"unix:{path}")
    assert http_url(d) == f"unix:{path}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    conn = UnixHTTP(path)
    conn.request("GET", "/health")
    resp = conn.getresponse()
    assert (resp.status, json.loads(resp.read())["status"]) == (200, "ok")
    conn.request("POST", "/v1/chat/completions", body=json.dumps(CHAT),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 200 and body["usage"]["completion_tokens"] == 4
    conn.close()
    assert d.stop() == 0
    assert not path.exists()


@pytest.mark.timeout(60)
def test_off_loopback_without_a_token_is_refused(tmp_path) -> None:
    run = subprocess.run([sys.executable, "-m", "apreqeld.cli.daemon", "--plans",
                          str(tmp_path), "--socket", str(tmp_path / "s.sock"),
                          "--http", "0.0.0.0:0"], capture_output=True, text=True, timeout=60,
                         cwd=REPO)
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr == ("apreqeld: options: http_token_file: HTTP on 0.0.0.0:0 (not "
                          "loopback) needs a bearer-token file (--http-token-file); without "
                          "one, HTTP is loopback only\n")


@pytest.mark.timeout(120)
def test_sigterm_finishes_http_streams_then_exits(daemon_factory) -> None:
    d = daemon_factory("--priority", "memory", "--http", "127.0.0.1:0")
    url = http_url(d)
    conn, resp = post_stream(url, "/v1/completions", {"model": "tiny"} | LONG)
    events = sse_events(resp)
    next(events)
    d.proc.send_signal(signal.SIGTERM)  # within the grace period: the stream ends normally
    rest = list(events)
    assert rest[-1] == (None, "[DONE]")
    finish = json.loads(rest[-2][1])["choices"][0]["finish_reason"]
    assert finish == "length"
    conn.close()
    assert d.proc.wait(30) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port_of(url)), timeout=2)


@pytest.mark.timeout(60)
def test_a_busy_http_port_is_one_line(tiny_plans, tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = start_daemon(tiny_plans, tmp_path, "--http", f"127.0.0.1:{port}", wait=False)
        assert d.proc.wait(60) == 1
    lines = [line for line in d.stderr().splitlines() if not line.startswith("apreqeld: jtop")]
    assert lines == [f"apreqeld: cannot listen for HTTP on 127.0.0.1:{port}: Address already "
                     "in use"]
    assert not d.socket.exists()

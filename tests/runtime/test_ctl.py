"""`apreqelctl` against one real daemon: exact outputs, exit codes, one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_support import REPO, RunningDaemon, ctl, start_daemon

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def daemon(tiny_plans, tmp_path_factory: pytest.TempPathFactory):
    d = start_daemon(tiny_plans, tmp_path_factory.mktemp("ctl"), "--priority", "memory")
    yield d
    d.stop()


def ok(*args: str, socket: Path) -> str:
    run = ctl(*args, socket=socket)
    assert run.returncode == 0 and run.stderr == "", (run.returncode, run.stderr)
    return run.stdout


@pytest.mark.timeout(60)
def test_status_text_and_json(daemon: RunningDaemon, tiny_plans) -> None:
    q4 = tiny_plans.by_label["q4_0"]
    text = ok("status", socket=daemon.socket)
    assert text.startswith(
        f"plan       {q4}  uniform q4_0\n"
        "swapping   no\n"
        "priority   memory (memory 0.80, latency 0.10, accuracy 0.10)\n"
        "pinned     no\n"
        "queue      0 of 64 waiting, in flight: no\n"
        "served     0 requests, 0 swaps, 0 restarts\n"
        "monitor    ")
    lines = text.splitlines()
    assert lines[7].startswith("machine    available ") and lines[8].startswith("budget     ")
    assert len(lines) == 9 + 3 and sum(line.startswith("  * ") for line in lines) == 1
    assert all("closeness" in line for line in lines[9:])
    status = json.loads(ok("status", "--json", socket=daemon.socket))
    assert status["monitor"]["source"] in ("procfs", "jtop") and status["budget_bytes"] > 0
    assert {p["id"] for p in status["plans"]} == set(tiny_plans.by_label.values())
    assert status["plan"] == q4 and status["swapping"] is False and status["queue"] == 0
    assert status["priority"]["weights"] == pytest.approx([0.8, 0.1, 0.1])


@pytest.mark.timeout(60)
def test_plans_lists_members_with_metrics(daemon: RunningDaemon, tiny_plans) -> None:
    lines = ok("plans", socket=daemon.socket).splitlines()
    assert lines[0] == "  ID                LABEL                          MiB   MS/TOK       KLD"
    assert len(lines) == 5
    assert lines[4] == ("composed: none, composition is off (no predictor evidence in the plan "
                        "set; `apreqel planset --presets` records it)")
    for member, line in zip(tiny_plans.planset.members, lines[1:4], strict=True):
        m = member.measured
        assert line == (f"{'*' if member.label == 'uniform q4_0' else ' '} {member.id:<16}  "
                        f"{member.label:<24}  {m.footprint_bytes / 1024**2:>8.1f}  "
                        f"{m.latency.median_ms:>7.2f}  {m.kld:>8.4f}")
    listed = json.loads(ok("plans", "--json", socket=daemon.socket))
    assert [m["id"] for m in listed["members"]] == [m.id for m in tiny_plans.planset.members]
    assert all("footprint_bytes" in m["measured"] for m in listed["members"])


@pytest.mark.timeout(120)
def test_pin_priority_and_weights_swap_and_say_so(daemon: RunningDaemon, tiny_plans) -> None:
    ids = tiny_plans.by_label
    assert ok("pin", ids["mix"], socket=daemon.socket) == f"pinned {ids['mix']}: serving " \
                                                          f"{ids['mix']}\n"
    out = ok("set-priority", "accuracy", socket=daemon.socket)
    assert out.startswith(f"priority accuracy: serving {ids['mix']}; pinned to {ids['mix']} (")
    out = ok("unpin", socket=daemon.socket)
    assert re.fullmatch(rf"unpinned: serving {ids['q8_0']} \(switch to {ids['q8_0']}: "
                        r"closeness [\d.]+ beats \w+'s [\d.]+ by more than 0\)\n", out), out
    out = ok("set-weights", "1,0,0", socket=daemon.socket)
    assert out.startswith(f"weights 1,0,0: serving {ids['q4_0']} (switch to {ids['q4_0']}")
    out = ok("set-priority", "memory", socket=daemon.socket)
    assert re.fullmatch(rf"priority memory: serving {ids['q4_0']} \({ids['q4_0']} is still "
                        r"the best \(closeness [\d.]+\)\)\n", out), out


@pytest.mark.timeout(60)
def test_generate_streams_text_and_json(daemon: RunningDaemon, tiny_plans) -> None:
    args = ("generate", "The capital of France is", "--max-tokens", "4", "--temperature", "0")
    run = ctl(*args, socket=daemon.socket)
    assert run.returncode == 0
    result = json.loads(ok(*args, "--json", socket=daemon.socket))
    assert run.stdout == result["text"] + "\n"
    plan = tiny_plans.by_label["q4_0"]
    assert result["plan"] == plan and result["usage"]["completion_tokens"] == 4
    assert re.fullmatch(rf"\(plan {plan}, 4 tokens, [\d.]+ ms/token\)\n", run.stderr)
    run = ctl("chat", "Say hi", "--max-tokens", "4", socket=daemon.socket)
    assert run.returncode == 0 and run.stdout.endswith("\n")


@pytest.mark.timeout(60)
def test_events_follow_swaps(daemon: RunningDaemon, tiny_plans) -> None:
    ids = tiny_plans.by_label
    follower = subprocess.Popen(
        [sys.executable, "-m", "apreqeld.cli.ctl", "--socket", str(daemon.socket), "events",
         "--json", "--count", "5"], stdout=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 30
    while json.loads(ok("status", "--json", socket=daemon.socket))["subscribers"] < 1:
        assert time.monotonic() < deadline and follower.poll() is None
        time.sleep(0.1)
    ok("pin", ids["q8_0"], socket=daemon.socket)
    out, _ = follower.communicate(timeout=30)
    events = [json.loads(line) for line in out.splitlines()]
    # every transition of the swap state machine is an event
    assert [(e["kind"], e.get("phase")) for e in events] == [
        ("pin", None), ("swap_start", "preparing"), ("swap_phase", "draining"),
        ("swap_phase", "switching"), ("swap_done", "serving")]
    assert (events[4]["from"], events[4]["to"]) == (ids["q4_0"], ids["q8_0"])
    assert {"reason", "mode", "total_ms", "downtime_ms"} <= set(events[4])
    ok("unpin", socket=daemon.socket)


def test_one_line_errors_and_exit_codes(tmp_path: Path) -> None:
    missing = tmp_path / "none.sock"
    run = ctl("status", socket=missing)
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr == f"apreqelctl: daemon not running (nothing listens on {missing})\n"
    run = ctl("status", env={"APREQELD_SOCKET": str(missing)})
    assert run.returncode == 1 and str(missing) in run.stderr
    run = ctl("set-priority", "fastest", socket=missing)
    assert run.returncode == 2 and "invalid choice: 'fastest'" in run.stderr
    run = ctl("set-weights", "1,2", socket=missing)
    assert run.returncode == 2 and "expected three non-negative weights" in run.stderr
    assert ctl(socket=missing).returncode == 2


@pytest.mark.timeout(60)
def test_bad_input_is_one_line_not_a_traceback(daemon: RunningDaemon) -> None:
    run = ctl("pin", "zzzz", socket=daemon.socket)
    assert run.returncode == 1 and run.stderr.count("\n") == 1
    assert run.stderr.startswith(
        "apreqelctl: pin: id: a plan id is 4 to 64 lower-case hexadecimal")
    run = ctl("pin", "abcd", socket=daemon.socket)
    assert run.returncode == 1 and run.stderr.count("\n") == 1
    assert run.stderr.startswith("apreqelctl: no single plan-set member 'abcd'")
    run = ctl("generate", "x", "--max-tokens", "0", socket=daemon.socket)
    assert run.returncode == 1
    assert run.stderr.startswith("apreqelctl: generate: max_tokens: Input should be greater")


def test_permission_denied_is_one_line(tmp_path: Path) -> None:
    """A user outside the socket's group (nobody, through setpriv) gets one line, exit 1."""
    import os
    import shutil
    import socket

    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run apreqelctl as another user")
    path = tmp_path / "perm.sock"
    tmp_path.chmod(0o755)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    path.chmod(0o660)
    server.listen(1)
    try:
        run = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                              sys.executable, "-m", "apreqeld.cli.ctl", "--socket", str(path),
                              "status"], capture_output=True, text=True, cwd=REPO, timeout=60)
    finally:
        server.close()
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr == (f"apreqelctl: permission denied on {path} (are you in the socket's "
                          "group?)\n")

"""A tiny real plan set for the daemon's integration tests (made once per session), and
helpers to run a real `apreqeld` on it in temporary directories."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from apreqeld.core.qtypes import qtype
from apreqeld.core.recipes import tensor_recipe
from apreqeld.evidence.protocol import Protocol
from apreqeld.evidence.workspace import Workspace
from apreqeld.gguf.view import read_model
from apreqeld.manifest import PlanSet
from apreqeld.planset import planset_from_recipes
from apreqeld.resources import default_model_path

THREADS = 1
PROTOCOL = Protocol(n_ctx=512, chunks=1, n_gen=4, reps=2, threads=THREADS)
SERVING_CTX = 256
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TinyPlans:
    """A saved plan set (`plans_dir/planset.json`), the state dir whose shard store its
    members are assembled from, and the work dir holding its F16 reference."""

    plans_dir: Path
    state_dir: Path
    work_dir: Path
    planset: PlanSet
    by_label: dict[str, str]  # "q4_0", "q8_0", "mix" -> member id


@pytest.fixture(scope="session")
def tiny_plans(tmp_path_factory: pytest.TempPathFactory) -> TinyPlans:
    """Uniform q4_0, uniform q8_0 and a half-and-half mix of the default model, built and
    measured by apreqeld.planset with a tiny protocol (one chunk, tg4 x 2, one thread)."""
    root = tmp_path_factory.mktemp("tiny-plans")
    source = default_model_path()
    view = read_model(source)
    n = len(view.sublayers)
    recipes = {
        "uniform q4_0": tensor_recipe(view, [qtype("q4_0")] * n, outside=qtype("q8_0")),
        "uniform q8_0": tensor_recipe(view, [qtype("q8_0")] * n, outside=qtype("q8_0")),
        "mix q8_0/q4_0": tensor_recipe(
            view, [qtype("q8_0")] * (n // 2) + [qtype("q4_0")] * (n - n // 2),
            outside=qtype("q8_0")),
    }
    plans_dir, state_dir, work_dir = root / "plans", root / "state", root / "work"
    planset = planset_from_recipes(source, recipes, plans_dir,
                                   workspace=Workspace(work_dir, state_dir=state_dir),
                                   protocol=PROTOCOL, serving_ctx=SERVING_CTX, name="tiny")
    short = {"uniform q4_0": "q4_0", "uniform q8_0": "q8_0", "mix q8_0/q4_0": "mix"}
    by_label = {short[m.label]: m.id for m in planset.members}
    assert all(m.pareto for m in planset.members)  # the daemon serves the front
    return TinyPlans(plans_dir, state_dir, work_dir, planset, by_label)


# --------------------------------------------------------------------------- running a daemon


@dataclass
class RunningDaemon:
    proc: subprocess.Popen
    socket: Path
    plans_dir: Path
    log: Path

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def start_daemon(tiny: TinyPlans, tmp: Path, *extra: str, env: dict | None = None,
                 wait: bool = True, copy_plans: bool = True) -> RunningDaemon:
    """Run `apreqeld` in the foreground on a socket in `tmp`; wait until it serves."""
    plans = tmp / "plans"
    if copy_plans:
        shutil.copytree(tiny.plans_dir, plans)
    sock = tmp / "run" / "apreqeld.sock"
    log = tmp / "apreqeld.log"
    cmd = [sys.executable, "-m", "apreqeld.cli.daemon", "--plans", str(plans), "--socket",
           str(sock), "--state-dir", str(tiny.state_dir), "--threads", str(THREADS), *extra]
    full_env = dict(os.environ) | {"APREQEL_HOME": str(tiny.work_dir)} | (env or {})
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env,
                                cwd=REPO)
    daemon = RunningDaemon(proc, sock, plans, log)
    if wait:
        wait_serving(daemon)
    return daemon


def wait_serving(daemon: RunningDaemon, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while "apreqeld: serving" not in daemon.stderr():
        if daemon.proc.poll() is not None:
            raise AssertionError(f"apreqeld exited: {daemon.stderr()}")
        if time.monotonic() > deadline:
            daemon.stop()
            raise AssertionError(f"apreqeld did not serve in {timeout} s: {daemon.stderr()}")
        time.sleep(0.05)


@pytest.fixture
def daemon_factory(tiny_plans: TinyPlans, tmp_path: Path) -> Iterator:
    """Start daemons for one test; all are stopped afterwards."""
    started: list[RunningDaemon] = []

    def make(*extra: str, name: str = "d", **kw) -> RunningDaemon:
        folder = tmp_path / name
        folder.mkdir()
        d = start_daemon(tiny_plans, folder, *extra, **kw)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


def ctl(*args: str, socket: Path | None = None, timeout: float = 60,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run apreqelctl; returns the completed process (text)."""
    cmd = [sys.executable, "-m", "apreqeld.cli.ctl"]
    if socket is not None:
        cmd += ["--socket", str(socket)]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=dict(os.environ) | (env or {}))

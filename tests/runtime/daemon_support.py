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
from datetime import UTC, datetime
from pathlib import Path

import pytest

from apreqeld import engine
from apreqeld.core.plans import canonical_sha256
from apreqeld.core.qtypes import qtype
from apreqeld.core.recipes import tensor_recipe
from apreqeld.evidence.measurement import measure_file
from apreqeld.evidence.protocol import Protocol
from apreqeld.evidence.reference import ensure_reference
from apreqeld.evidence.workspace import Workspace
from apreqeld.gguf.view import file_sha256, read_model
from apreqeld.manifest import (
    LatencyStats,
    Member,
    Metrics,
    ModelInfo,
    PlanSet,
    Serving,
    member_filename,
    save_planset,
)
from apreqeld.resources import default_model_path

THREADS = 1
PROTOCOL = Protocol(n_ctx=512, chunks=1, n_gen=4, reps=2, threads=THREADS)
SERVING_CTX = 256
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TinyPlans:
    """A saved plan set (`plans_dir/planset.json`) and a state dir holding its GGUFs."""

    plans_dir: Path
    state_dir: Path
    planset: PlanSet
    by_label: dict[str, str]  # "q4_0", "q8_0", "mix" -> member id


@pytest.fixture(scope="session")
def tiny_plans(tmp_path_factory: pytest.TempPathFactory) -> TinyPlans:
    """Uniform q4_0, uniform q8_0 and a half-and-half mix of the default model, measured
    with a tiny protocol (one chunk, tg4 x 2, one thread)."""
    root = tmp_path_factory.mktemp("tiny-plans")
    source = default_model_path()
    ws = Workspace(root / "work")
    reference = ensure_reference(source, workspace=ws, protocol=PROTOCOL)
    view = read_model(source)
    n = len(view.sublayers)
    recipes = {
        "q4_0": tensor_recipe(view, [qtype("q4_0")] * n, outside=qtype("q8_0")),
        "q8_0": tensor_recipe(view, [qtype("q8_0")] * n, outside=qtype("q8_0")),
        "mix": tensor_recipe(view, [qtype("q8_0")] * (n // 2) + [qtype("q4_0")] * (n - n // 2),
                             outside=qtype("q8_0")),
    }
    build = root / "build"
    build.mkdir()
    members = []
    for label, recipe in recipes.items():
        path = build / f"{label}.gguf"
        engine.quantize(reference.path, path, tensor_types=recipe, base="q8_0", threads=THREADS)
        m = measure_file(path, protocol=PROTOCOL, reference=reference)
        ms = m["latency_ms"]
        member_id = canonical_sha256(recipe)[:16]
        size = path.stat().st_size
        members.append(Member(
            id=member_id, kind="uniform" if label != "mix" else "mix",
            label=f"uniform {label}" if label != "mix" else "mix q8_0/q4_0",
            base_type="q8_0", recipe=recipe, file_sha256=file_sha256(path), file_bytes=size,
            measured=Metrics(
                parameter_bytes=m["memory_bytes"], footprint_bytes=size + 40 * 1024**2,
                latency=LatencyStats(median_ms=ms, iqr_ms=0.0, mean_ms=ms,
                                     std_ms=m["latency_std_ms"], n=PROTOCOL.reps),
                ppl=m["ppl"], ppl_se=m["ppl_se"], kld=max(m["kld"], 0.0),
                kld_se=m["kld_se"], top1=m["top1_agreement"]),
            pareto=True))
    planset = PlanSet(
        name="tiny", created=datetime.now(UTC).isoformat(timespec="seconds"),
        model=ModelInfo(name=view.name, sha256=reference.source_sha256, path=str(source),
                        architecture=view.architecture),
        engine=engine.engine_version(), device={"note": "test"},
        protocol=PROTOCOL.to_dict(), serving=Serving(n_ctx=SERVING_CTX, threads=THREADS,
                                                     gpu_layers=0),
        members=members)
    plans_dir, state_dir = root / "plans", root / "state"
    state_dir.mkdir()
    for label, member in zip(recipes, members, strict=True):
        shutil.move(build / f"{label}.gguf", state_dir / member_filename(planset, member))
    save_planset(planset, plans_dir)
    by_label = {label: m.id for label, m in zip(recipes, members, strict=True)}
    return TinyPlans(plans_dir, state_dir, planset, by_label)


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
    full_env = dict(os.environ) | (env or {})
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

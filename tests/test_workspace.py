"""The work directory: atomic files without umask changes, the shared lock, the cache command,
and measurement keys that name the machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apreqeld.errors import InputError
from apreqeld.evidence import protocol as protocol_module
from apreqeld.evidence.protocol import Protocol
from apreqeld.evidence.workspace import Workspace, measurement_key
from apreqeld.storage import process_umask, write_json_atomic
from support import CliRunner


def test_atomic_write_never_changes_the_process_umask(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """os.umask is process-wide (a daemon's other threads would see it): never called."""
    def forbidden(_mask: int) -> int:
        raise AssertionError("os.umask called")

    monkeypatch.setattr(os, "umask", forbidden)
    target = write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert target.stat().st_mode & 0o777 == 0o666 & ~process_umask()
    target.chmod(0o600)
    write_json_atomic(target, {"x": 2})
    assert target.stat().st_mode & 0o777 == 0o600  # a replaced file keeps its mode


def test_process_umask_reads_the_real_umask() -> None:
    mask = os.umask(0o027)  # set here in the test only, to check the reader
    try:
        assert process_umask() == 0o027
    finally:
        os.umask(mask)


class _Reference:
    source_sha256 = "ab" * 32


def test_measurement_key_names_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same model, recipe and protocol on another CPU is another measurement."""
    protocol = Protocol(threads=1)
    here = measurement_key({"t": "q8_0"}, _Reference(), protocol)
    assert set(here["machine"]) == {"cpu", "cores", "llama_cpp", "gpu_backend"}
    monkeypatch.setattr(protocol_module.engine, "cpu_description", lambda: "Other CPU 9000")
    assert measurement_key({"t": "q8_0"}, _Reference(), protocol) != here


def _holder(root: Path) -> subprocess.Popen:
    """Another process that uses the work directory until its stdin closes."""
    code = ("import sys; from apreqeld.evidence.workspace import Workspace; "
            f"w = Workspace({str(root)!r}); print('ready', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_clear_waits_for_no_process_and_refuses_while_one_uses_it(tmp_path: Path) -> None:
    root = tmp_path / "home"
    write_json_atomic(root / "measurements" / "m.json", {"result": {}})
    readers = [_holder(root), _holder(root)]  # shared: both hold it at once
    try:
        mine = Workspace(root)
        with pytest.raises(InputError, match=r"is in use by another apreqel process"):
            mine.clear()
        assert (root / "measurements" / "m.json").exists()
    finally:
        for proc in readers:
            proc.stdin.close()
            proc.wait(timeout=30)
    mine.clear()
    assert [p.name for p in root.iterdir()] == [".lock"]
    mine.close()


def test_cache_command_shows_and_clears(run_cli: CliRunner, tmp_path: Path) -> None:
    root = tmp_path / "home"
    write_json_atomic(root / "measurements" / "m.json", {"result": {}})
    (root / "models" / "0123").mkdir(parents=True)
    (root / "models" / "0123" / "reference-f16.gguf").write_bytes(b"x" * 3 * 2**20)
    (root / "models" / "0123" / "layers-k.json").write_text("{}")
    shown = run_cli("cache", "--workdir", root, "--json")
    assert shown.returncode == 0, shown.stderr
    kinds = json.loads(shown.stdout)["kinds"]
    assert kinds["references"] == {"files": 1, "bytes": 3 * 2**20}
    assert kinds["measurements"]["files"] == 1 and kinds["layer profiles"]["files"] == 1
    assert json.loads(shown.stdout)["store"]["shards"] == 0
    holder = _holder(root)
    try:
        busy = run_cli("cache", "--workdir", root, "--clear")
        assert busy.returncode != 0 and len(busy.error_lines) == 1
        assert "in use by another apreqel process" in busy.error_lines[0]
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    started = time.time()
    cleared = run_cli("cache", "--workdir", root, "--clear")
    assert cleared.returncode == 0, cleared.stderr
    assert "(cleared)" in cleared.stdout and time.time() - started < 30
    assert not (root / "models").exists() and not (root / "measurements").exists()

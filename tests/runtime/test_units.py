"""The systemd units, checked by systemd's own tools (they exit 0 on problems, so the output
must be empty), with ExecStart pointed at this checkout's `apreqeld`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
APREQELD = Path(sys.executable).parent / "apreqeld"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed on this machine")
    return path


@pytest.fixture
def units(tmp_path: Path) -> Path:
    for f in SYSTEMD.iterdir():
        shutil.copy(f, tmp_path / f.name)
    service = tmp_path / "apreqeld.service"
    service.write_text(service.read_text().replace("/usr/local/bin/apreqeld", str(APREQELD)))
    return tmp_path


def test_service_declares_what_the_daemon_needs() -> None:
    text = (SYSTEMD / "apreqeld.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID",
                 "RuntimeDirectory=apreqeld",
                 "StateDirectory=apreqeld", "User=apreqeld", "Group=apreqeld",
                 "ProtectSystem=strict", "NoNewPrivileges=yes", "SupplementaryGroups=jtop",
                 "--socket /run/apreqeld/apreqeld.sock", "--state-dir /var/lib/apreqeld",
                 "#Environment=APREQELD_HTTP=127.0.0.1:", "IPAddressDeny=any",
                 "IPAddressAllow=localhost"):
        assert line in text, line
    socket_unit = (SYSTEMD / "apreqeld.socket").read_text()
    assert "ListenStream=/run/apreqeld/apreqeld.sock" in socket_unit
    assert "SocketMode=0660" in socket_unit


@pytest.mark.timeout(60)
@pytest.mark.parametrize("http", [False, True], ids=["socket only", "http on loopback"])
def test_units_pass_systemd_analyze_verify(units: Path, http: bool) -> None:
    analyze = tool("systemd-analyze")
    if http:  # the unit with its HTTP line uncommented
        service = units / "apreqeld.service"
        service.write_text(service.read_text().replace("#Environment=APREQELD_HTTP=",
                                                       "Environment=APREQELD_HTTP="))
    run = subprocess.run([analyze, "verify", "--man=no", str(units / "apreqeld.service"),
                          str(units / "apreqeld.socket")], capture_output=True, text=True,
                         cwd=units, timeout=60)
    assert run.stdout + run.stderr == "", run.stdout + run.stderr


@pytest.mark.timeout(60)
def test_sysusers_and_tmpfiles_entries_apply_to_an_empty_root(units: Path,
                                                              tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    run = subprocess.run([tool("systemd-sysusers"), f"--root={root}",
                          str(units / "apreqeld.sysusers.conf")], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    passwd = (root / "etc" / "passwd").read_text()
    assert passwd.startswith("apreqeld:x:") and "/usr/sbin/nologin" in passwd
    assert "jtop:x:" in (root / "etc" / "group").read_text()
    run = subprocess.run([tool("systemd-tmpfiles"), f"--root={root}", "--create",
                          str(units / "apreqeld.tmpfiles.conf")], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    state = root / "var" / "lib" / "apreqeld"
    assert state.is_dir() and state.stat().st_mode & 0o777 == 0o750
    config = root / "etc" / "apreqeld" / "apreqeld.toml"
    assert config.is_file() and config.read_text() == ""

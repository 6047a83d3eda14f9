"""The daemon's TOML config: validated, flags override the file, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from apreqeld.errors import InputError
from apreqeld.runtime.config import DaemonConfig, default_socket, load_config


def test_file_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "apreqeld.toml"
    file.write_text('plans = "/p"\nsocket = "/run/x.sock"\nqueue-bound = 4\nthreads = 2\n'
                    'swap_margin = 0.1\nreserve_bytes = 1024\n')
    config = load_config(file, threads=3, socket=None)
    assert config == DaemonConfig(plans=Path("/p"), socket=Path("/run/x.sock"), queue_bound=4,
                                  threads=3, swap_margin=0.1, reserve_bytes=1024,
                                  state_dir=config.state_dir)
    assert load_config(None, plans=Path("/q")).socket == default_socket()


@pytest.mark.parametrize("text, message", [
    ('plans = "/p"\nqueue_bound = 0\n', "config .*: queue_bound: Input should be greater"),
    ('plans = "/p"\ncolour = "red"\n', "config .*: colour: Extra inputs are not permitted"),
    ('plans = "/p"\nswap_mode = "sideways"\n', "config .*: swap_mode: Input should be"),
    ("plans = [\n", "config .* is not valid TOML"),
    ("threads = 1\n", "no plan set: give --plans DIR"),
])
def test_bad_config_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "c.toml"
    file.write_text(text)
    with pytest.raises(InputError, match=message) as err:
        load_config(file)
    assert "\n" not in str(err.value)


def test_socket_env_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APREQELD_SOCKET", "/tmp/elsewhere.sock")
    assert default_socket() == Path("/tmp/elsewhere.sock")


@pytest.mark.timeout(60)
def test_daemon_cli_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "apreqeld.cli.daemon", "--plans",
                          str(tmp_path), "--socket", str(tmp_path / "s.sock")],
                         capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr == f"apreqeld: no plan set at {tmp_path / 'planset.json'}\n"
    run = subprocess.run([sys.executable, "-m", "apreqeld.cli.daemon", "--queue", "x"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2

"""The daemon's configuration: a TOML file validated by pydantic, overridden by flags."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from apreqeld.core.limits import parse_size
from apreqeld.errors import InputError
from apreqeld.manifest import one_line
from apreqeld.storage import default_workdir

SOCKET_ENV = "APREQELD_SOCKET"
HTTP_ENV = "APREQELD_HTTP"  # the default of `http` (the systemd unit can set it)
# The daemon's one set of policy defaults (the Policy class and the CLI's help use these).
DEFAULT_RESERVE = 256 * 1024**2  # bytes kept free for the OS and the daemon
DEFAULT_SLACK = 64 * 1024**2  # a bigger member must fit with this to spare (no flapping)
DEFAULT_DWELL_S = 10.0  # seconds a member serves before the monitor may upgrade it
DEFAULT_MARGIN = 0.05  # closeness a better member must gain to be switched to
MONITORS = "auto, procfs, jtop or trace:FILE"


def default_socket() -> Path:
    """$APREQELD_SOCKET, else $XDG_RUNTIME_DIR/apreqeld/apreqeld.sock, else under /tmp."""
    if os.environ.get(SOCKET_ENV):
        return Path(os.environ[SOCKET_ENV])
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/apreqeld-{os.getuid()}"
    return Path(runtime) / "apreqeld" / "apreqeld.sock"


@dataclass(frozen=True)
class HttpAddress:
    """Where the HTTP listener binds: an IP address and port, or a Unix socket path."""

    host: str | None = None
    port: int | None = None
    path: Path | None = None

    @property
    def loopback(self) -> bool:
        return self.path is not None or ipaddress.ip_address(self.host).is_loopback

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def http_address(value: str) -> HttpAddress:
    """`HOST:PORT`, `[V6]:PORT`, `PORT` (127.0.0.1) or `unix:PATH`; HOST is an IP address or
    localhost (no name lookups: what is loopback must be plain)."""
    text = value.strip()
    if text.startswith("unix:"):
        if not text[5:]:
            raise ValueError("unix: needs a socket path")
        return HttpAddress(path=Path(text[5:]))
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.removeprefix("[").removesuffix("]")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value!r}: the host must be an IP address or localhost "
                         "(HOST:PORT, PORT or unix:PATH)") from None
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: the port must be 0 to 65535")
    return HttpAddress(host=str(ip), port=int(port))


def default_state_dir() -> Path:
    """Where member GGUFs are kept: under $APREQEL_HOME (or ~/.cache/apreqel)."""
    return default_workdir() / "state"  # where `apreqel planset materialize` builds too


class DaemonConfig(BaseModel):
    """Everything `apreqeld` needs; None means "what the plan set was measured with"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plans: Path = Field(description="plan-set directory (holds planset.json)")
    socket: Path = Field(default_factory=default_socket)
    state_dir: Path = Field(default_factory=default_state_dir)
    n_ctx: int | None = Field(default=None, ge=8, le=1 << 20)
    threads: int | None = Field(default=None, ge=1, le=1024)
    gpu_layers: int | None = Field(default=None, ge=0)
    queue_bound: int = Field(default=64, ge=1, le=100_000)
    priority: str = "balanced"
    swap_margin: float = Field(default=DEFAULT_MARGIN, ge=0, le=1)
    min_dwell_s: float = Field(default=DEFAULT_DWELL_S, ge=0)
    reserve_bytes: int = Field(default=DEFAULT_RESERVE, ge=0,
                               description="memory kept free for the OS (512MiB, 1GB, bytes)")
    slack_bytes: int = Field(default=DEFAULT_SLACK, ge=0,
                             description="a bigger plan must fit the budget with this to spare")
    monitor: str = Field(default="auto", description=MONITORS)
    monitor_interval_s: float = Field(default=1.0, gt=0, le=60)
    record: Path | None = Field(default=None, description="JSONL of the live states seen")
    adapt: bool = Field(default=True, description="follow the machine (False: decide, not act)")
    compose: bool = Field(default=True, description="serve recipes composed between the "
                          "members when the plan set records the predictor's evidence")
    max_composed: int = Field(default=4, ge=1, le=64, description="composed members kept "
                              "(least recently used go)")
    swap_mode: Literal["auto", "make-before-break", "break-before-make"] = "auto"
    grace_s: float = Field(default=10.0, ge=0, description="SIGTERM: time to finish requests")
    load_timeout_s: float = Field(default=120.0, gt=0, description="a worker's load and warm-up")
    prepare_timeout_s: float = Field(default=900.0, gt=0,
                                     description="a swap's target file made ready (built)")
    drain_timeout_s: float = Field(default=120.0, gt=0, description="a swap waiting for the "
                                   "request in flight before it gives up")
    stall_timeout_s: float = Field(default=60.0, gt=0, description="a worker silent this long "
                                   "during a request is killed")
    backoff_s: float = Field(default=1.0, gt=0, description="wait after a member's first "
                             "failure, doubled per failure in a row")
    backoff_cap_s: float = Field(default=60.0, gt=0)
    quarantine_after: int = Field(default=3, ge=1, description="failures in a row before a "
                                  "member is quarantined")
    quarantine_s: float = Field(default=600.0, gt=0)
    max_connections: int = Field(default=128, ge=1, le=65_536,
                                 description="open connections (inference and control)")
    control_reserve: int = Field(default=8, ge=1, le=1024, description="connections beyond "
                                 "max_connections that only control peers may open")
    max_connections_per_uid: int = Field(default=64, ge=1, le=65_536)
    idle_timeout_s: float = Field(default=300.0, gt=0, description="a connection with no "
                                  "request in progress is closed after this")
    frame_timeout_s: float = Field(default=5.0, gt=0, description="a message begun must be "
                                   "finished within this")
    watch: bool = True
    admin_group: str | None = Field(default=None, description="group (name or gid) whose "
                                    "members may control the daemon, besides root and the "
                                    "service user")
    http: str | None = Field(default_factory=lambda: os.environ.get(HTTP_ENV) or None,
                             validate_default=True, description="OpenAI-compatible HTTP listener: "
                             "HOST:PORT, PORT (127.0.0.1) or unix:PATH; off when unset")
    http_token_file: Path | None = Field(
        default=None, validate_default=True,
        description="file holding the bearer token HTTP clients send; required off loopback")
    http_max_connections: int = Field(default=64, ge=1, le=10_000)
    http_max_body_bytes: int = Field(default=1024**2, ge=1024, le=64 * 1024**2)
    http_timeout_s: float = Field(default=10.0, gt=0, le=3600, description="a client must "
                                  "send its headers and body, and read streamed output, "
                                  "within this; idle connections close after it")

    @field_validator("reserve_bytes", "slack_bytes", "http_max_body_bytes", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        """Sizes may be written 512MiB, 1GB or plain bytes."""
        if isinstance(value, str) and value.strip() not in ("0", "0B"):
            try:
                return int(parse_size(value))
            except InputError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("http")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        return None if value is None else str(http_address(value))

    @field_validator("http_token_file")
    @classmethod
    def _token_off_loopback(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        http = info.data.get("http")
        if value is None and http is not None and not http_address(http).loopback:
            raise ValueError(f"HTTP on {http} (not loopback) needs a bearer-token file "
                             "(--http-token-file); without one, HTTP is loopback only")
        return value

    @property
    def http_address(self) -> HttpAddress | None:
        return None if self.http is None else http_address(self.http)

    @field_validator("monitor")
    @classmethod
    def _monitor(cls, value: str) -> str:
        kind, sep, arg = value.partition(":")
        if (kind == "trace" and arg) or (kind in ("auto", "procfs", "jtop") and not sep):
            return value
        raise ValueError(f"unknown monitor '{value}' (use {MONITORS})")


def load_config(file: Path | None, /, **overrides: object) -> DaemonConfig:
    """The TOML file's settings (if any) with the non-None overrides on top."""
    data: dict = {}
    if file is not None:
        try:
            data = tomllib.loads(Path(file).read_text(encoding="utf-8"))
        except OSError as exc:
            raise InputError(f"cannot read config {file}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"config {file} is not valid TOML ({exc})") from None
        data = {k.replace("-", "_"): v for k, v in data.items()}
    data |= {k: v for k, v in overrides.items() if v is not None}
    if "plans" not in data:
        raise InputError("no plan set: give --plans DIR or `plans` in the config file")
    try:
        return DaemonConfig.model_validate(data)
    except ValidationError as exc:
        where = f"config {file}" if file else "options"
        raise InputError(f"{where}: {one_line(exc)}") from None

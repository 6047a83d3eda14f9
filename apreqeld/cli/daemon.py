"""The `apreqeld` entry point: parse flags, load the config, serve in the foreground."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from apreqeld.errors import ApreqelError
from apreqeld.runtime.config import (
    DEFAULT_RESERVE,
    DEFAULT_SLACK,
    HTTP_ENV,
    MONITORS,
    SOCKET_ENV,
    load_config,
)

MIB = 1024**2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apreqeld", description="Serve a plan set over a Unix socket and hot-swap its "
        "variants to fit the priority. Flags override the config file.")
    p.add_argument("--plans", type=Path, help="plan-set directory (with planset.json)")
    p.add_argument("--socket", type=Path,
                   help=f"Unix socket to listen on (default: ${SOCKET_ENV}, else "
                        "$XDG_RUNTIME_DIR/apreqeld/apreqeld.sock)")
    p.add_argument("--config", type=Path, help="TOML config file")
    p.add_argument("--state-dir", type=Path,
                   help="the state dir: its shard store members are assembled from (default: "
                   "$APREQEL_HOME/state, as for `apreqel planset materialize`)")
    p.add_argument("--ctx", dest="n_ctx", type=int, help="serving context (default: the plan "
                   "set's)")
    p.add_argument("--threads", type=int, help="llama.cpp threads (default: the plan set's)")
    p.add_argument("--gpu-layers", type=int, help="layers offloaded to the GPU")
    p.add_argument("--queue", dest="queue_bound", type=int, help="queue bound (default 64)")
    p.add_argument("--priority", help="initial priority: a preset or three weights "
                   "(default balanced)")
    p.add_argument("--reserve", dest="reserve_bytes", metavar="SIZE",
                   help=f"memory kept free for the OS: 512MiB, 1GB or bytes "
                        f"(default {DEFAULT_RESERVE // MIB}MiB)")
    p.add_argument("--slack", dest="slack_bytes", metavar="SIZE",
                   help=f"a bigger plan must fit the budget with this to spare "
                        f"(default {DEFAULT_SLACK // MIB}MiB)")
    p.add_argument("--monitor", metavar="SPEC",
                   help=f"machine monitor: {MONITORS} (default auto: jtop, else procfs)")
    p.add_argument("--monitor-interval", dest="monitor_interval_s", type=float, metavar="S",
                   help="seconds between two monitor readings (default 1)")
    p.add_argument("--record", type=Path, metavar="FILE",
                   help="write the live states seen as a JSONL trace")
    p.add_argument("--margin", dest="swap_margin", type=float,
                   help="closeness a better plan must gain to switch (default 0.05)")
    p.add_argument("--dwell", dest="min_dwell_s", type=float, metavar="S",
                   help="seconds a plan serves before an upgrade (default 10)")
    p.add_argument("--no-adapt", dest="adapt", action="store_const", const=False,
                   help="decide but do not swap when the machine changes")
    p.add_argument("--no-compose", dest="compose", action="store_const", const=False,
                   help="serve only the plan set's members, never a composed recipe")
    p.add_argument("--max-composed", dest="max_composed", type=int, metavar="N",
                   help="composed members kept, least recently used go (default 4)")
    p.add_argument("--swap-mode", choices=["auto", "make-before-break", "break-before-make"])
    p.add_argument("--grace", dest="grace_s", type=float,
                   help="seconds in-flight requests get on SIGTERM (default 10)")
    p.add_argument("--no-watch", dest="watch", action="store_const", const=False,
                   help="do not watch the plan-set directory")
    p.add_argument("--http", metavar="ADDR",
                   help=f"also serve the OpenAI-compatible HTTP API (/v1/chat/completions, "
                        f"/v1/completions, /v1/models, /health, /metrics) on HOST:PORT, PORT "
                        f"(127.0.0.1) or unix:PATH (default: ${HTTP_ENV}, else off); a "
                        f"non-loopback HOST needs --http-token-file")
    p.add_argument("--http-token-file", type=Path, metavar="FILE",
                   help="HTTP clients must send `Authorization: Bearer TOKEN` with the token "
                        "in this file")
    return p


def main(argv: list[str] | None = None) -> None:
    args = vars(parser().parse_args(argv))
    file = args.pop("config")
    logging.basicConfig(format="apreqeld: %(message)s", level=logging.WARNING)
    try:
        from apreqeld.runtime.server import run_daemon

        run_daemon(load_config(file, **args))
    except ApreqelError as exc:
        print(f"apreqeld: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0)


if __name__ == "__main__":
    main()

"""The README's main job: apreqeld serving and adapting on the built-in default model.

Materializes the checked-in plan set, starts the daemon on a temporary socket, streams a
generation, walks the priority through memory, latency and accuracy with a request in flight
each time, shows every swap (from, to, why, how long) and the plan that served each request,
then stops the daemon with SIGTERM and checks that it left nothing behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from apreqeld.client import Client
from apreqeld.errors import ApreqelError
from apreqeld.manifest import load_planset

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROMPT = "The three things a robot needs to know about its battery are"


def run(*cmd: str) -> str:
    """Run a command as a user would type it, echoing it and its output."""
    print(f"\n$ {' '.join(Path(cmd[0]).name if i == 0 else c for i, c in enumerate(cmd))}",
          flush=True)
    done = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(done.stdout.rstrip(), flush=True)
    if done.returncode != 0:
        raise SystemExit(f"demo: `{' '.join(cmd)}` failed with exit code {done.returncode}")
    return done.stdout


def wait_ready(sock: Path, daemon: subprocess.Popen, log: Path, timeout: float) -> dict:
    """Poll the daemon's status until it serves a plan (or it died, or time ran out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(f"demo: apreqeld exited with {daemon.returncode}:\n"
                             + log.read_text()[-2000:])
        try:
            with Client(sock) as client:
                status = client.status()
            if status.get("plan"):
                return status
        except (ApreqelError, OSError):
            pass
        time.sleep(0.25)
    raise SystemExit(f"demo: apreqeld did not serve within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=Path, default=ROOT / "plans" / "smollm2-135m")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where member GGUFs are built (default $APREQEL_HOME/state)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    home = Path(os.environ.get("APREQEL_HOME", Path.home() / ".cache" / "apreqel"))
    state = args.state_dir or home / "state"
    started = time.monotonic()
    planset = load_planset(args.plans)
    print(f"plan set {planset.name}: {len(planset.members)} members of {planset.model.name}, "
          f"measured on {planset.device.get('cpu', 'an unnamed device')}")

    run(str(BIN / "apreqel"), "planset", "materialize", str(args.plans), "--front",
        "--state-dir", str(state))

    tmp = Path(tempfile.mkdtemp(prefix="apreqeld-demo-"))
    sock, log = tmp / "apreqeld.sock", tmp / "apreqeld.log"
    ctl = (str(BIN / "apreqelctl"), "--socket", str(sock))
    print(f"\n$ apreqeld --plans {args.plans} --socket {sock} --state-dir {state} "
          f"--threads {args.threads} --priority balanced &", flush=True)
    with log.open("w") as log_file:
        daemon = subprocess.Popen(
            [str(BIN / "apreqeld"), "--plans", str(args.plans), "--socket", str(sock),
             "--state-dir", str(state), "--threads", str(args.threads),
             "--priority", "balanced"], stdout=log_file, stderr=subprocess.STDOUT)
    events: list[dict] = []
    served: list[tuple[str, str, dict]] = []
    try:
        status = wait_ready(sock, daemon, log, timeout=180)
        print(f"serving {status['plan']} (pid {daemon.pid})")
        listener = Client(sock)
        listener.connect()
        stream = listener.events()

        def follow() -> None:
            try:
                events.extend(stream)
            except (ApreqelError, OSError):
                pass  # the daemon closed the connection when it stopped

        threading.Thread(target=follow, daemon=True).start()

        run(*ctl, "generate", PROMPT, "--max-tokens", str(args.max_tokens), "--seed", "1")
        run(*ctl, "plans")
        for preset in ("memory", "latency", "accuracy"):
            result: dict = {}

            def in_flight(result: dict = result, preset: str = preset) -> None:
                with Client(sock) as client:
                    result.update(client.generate(PROMPT, max_tokens=args.max_tokens, seed=2))

            worker = threading.Thread(target=in_flight)
            worker.start()
            time.sleep(0.2)  # the request is accepted before the priority changes
            run(*ctl, "set-priority", preset)
            worker.join(timeout=120)
            served.append((f"in flight during set-priority {preset}", result.get("plan", "?"),
                           result.get("usage", {})))
            with Client(sock) as client:
                after = client.generate(PROMPT, max_tokens=args.max_tokens, seed=3)
            served.append((f"after set-priority {preset}", after["plan"], after["usage"]))
        run(*ctl, "status")
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            code = daemon.wait()
    report(events, served, planset)
    print(f"\napreqeld stopped on SIGTERM with exit code {code}; socket left behind: "
          f"{sock.exists()}; total {time.monotonic() - started:.0f} s")
    shutil.rmtree(tmp, ignore_errors=True)
    if code != 0:
        raise SystemExit(1)


def report(events: list[dict], served: list[tuple[str, str, dict]], planset) -> None:
    """Every swap and every request's serving plan, as tables."""
    labels = {m.id: m.label for m in planset.members}
    print("\nswaps (from the daemon's events):")
    print(f"  {'from':<14} {'to':<14} {'mode':<18} {'total ms':>9} {'down ms':>8}  why")
    for e in events:
        if e.get("kind") == "swap_done":
            print(f"  {str(e.get('from')):<14} {str(e.get('to')):<14} {e.get('mode', ''):<18} "
                  f"{e.get('total_ms', 0):>9.0f} {e.get('downtime_ms', 0):>8.0f}  "
                  f"{e.get('reason', '')}")
        elif e.get("kind") == "swap_failed":
            print(f"  {e.get('from')} -> {e.get('to')} FAILED: {e.get('reason')}")
    print("\nrequests (the plan that served each one):")
    for what, plan, usage in served:
        print(f"  {what:<40} {plan:<14} {labels.get(plan, ''):<28} "
              f"{usage.get('completion_tokens', usage.get('tokens', '?'))} tokens, "
              f"{usage.get('ms_per_token', float('nan')):.1f} ms/token")


if __name__ == "__main__":
    main()

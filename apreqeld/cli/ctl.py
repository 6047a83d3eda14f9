"""The `apreqelctl` entry point: control and query a running apreqeld.

Exit codes: 0 ok, 1 error (one line on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from apreqeld.client import Client
from apreqeld.core.limits import parse_size
from apreqeld.errors import ApreqelError, InputError

PRESETS = ("latency", "memory", "accuracy", "balanced")
MIB = 1024**2


def _weights(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected three non-negative weights memory,latency,accuracy, got {text!r}")
    return values


def _schema(text: str) -> dict:
    """A JSON schema given as a file name or as JSON text."""
    path = Path(text)
    try:
        source = path.read_text(encoding="utf-8") if path.is_file() else text
        schema = json.loads(source)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"not a JSON schema file or JSON text: {exc}") from None
    if not isinstance(schema, dict):
        raise argparse.ArgumentTypeError("a JSON schema is a JSON object")
    return schema


def _size(text: str) -> float:
    try:
        return parse_size(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", default=argparse.SUPPRESS,
                        help="daemon socket (default: $APREQELD_SOCKET)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON")
    p = argparse.ArgumentParser(prog="apreqelctl", parents=[common],
                                description="Control a running apreqeld.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("status", parents=[common], help="what is served, swaps, priority, queue")
    sub.add_parser("plans", parents=[common], help="the plan set with its measured metrics")
    sp = sub.add_parser("set-priority", parents=[common], help="a preset priority")
    sp.add_argument("preset", choices=PRESETS)
    sw = sub.add_parser("set-weights", parents=[common], help="memory,latency,accuracy weights")
    sw.add_argument("weights", type=_weights)
    for s in (sp, sw):
        s.add_argument("--max-latency-ms", type=float)
        s.add_argument("--max-accuracy", type=float)
        s.add_argument("--max-memory-bytes", type=float)
    pin = sub.add_parser("pin", parents=[common], help="serve this plan until unpinned")
    pin.add_argument("id")
    unpin = sub.add_parser("unpin", parents=[common], help="follow the priority again")
    for s in (sp, sw, pin, unpin):
        s.add_argument("--no-wait", action="store_true", help="return before the swap ends")
    sub.add_parser("reload", parents=[common], help="reload the plan set")
    gen = sub.add_parser("generate", parents=[common], help="generate from a prompt (streams)")
    gen.add_argument("prompt")
    chat = sub.add_parser("chat", parents=[common], help="one chat turn (streams)")
    chat.add_argument("message")
    chat.add_argument("--system")
    for s in (gen, chat):
        s.add_argument("--max-tokens", type=int, default=128)
        s.add_argument("--temperature", type=float, default=0.8)
        s.add_argument("--seed", type=int)
        s.add_argument("--stop", action="append", default=[])
        s.add_argument("--top-p", type=float)
        s.add_argument("--presence-penalty", type=float)
        s.add_argument("--frequency-penalty", type=float)
        fmt = s.add_mutually_exclusive_group()
        fmt.add_argument("--json-object", action="store_true",
                         help="the reply is a JSON object (llama.cpp's JSON grammar)")
        fmt.add_argument("--json-schema", metavar="SCHEMA", type=_schema,
                         help="the reply is JSON valid for this schema (a file or JSON text)")
    comp = sub.add_parser("compose", parents=[common], help="what would be composed under a "
                          "budget (nothing is served)")
    comp.add_argument("--budget", type=_size, metavar="SIZE",
                      help="memory budget (150MiB, 1GB; default: the daemon's budget now)")
    comp.add_argument("--weights", type=_weights, help="memory,latency,accuracy weights "
                      "(default: the daemon's priority)")
    comp.add_argument("--max-latency-ms", type=float)
    ev = sub.add_parser("events", parents=[common], help="follow swaps and decisions")
    ev.add_argument("--count", type=int, help="stop after this many events")
    return p


def _print_json(value: object) -> None:
    print(json.dumps(value, sort_keys=True))


def render_status(s: dict) -> str:
    pr = s["priority"]
    weights = ", ".join(f"{k} {w:.2f}" for k, w in
                        zip(("memory", "latency", "accuracy"), pr["weights"], strict=True))
    swap = s.get("swap")
    swapping = (f"yes: {swap['from']} -> {swap['to']} ({swap['mode']}, {swap['phase']})"
                if swap else "no")
    counts = s.get("counts", {})
    return "\n".join([
        f"plan       {s['plan'] or '(loading)'}  {s.get('label') or ''}".rstrip(),
        f"swapping   {swapping}",
        f"priority   {pr['name'] or 'weights'} ({weights})",
        f"pinned     {s['pinned'] or 'no'}"
        f"{' (suspended: it does not fit now)' if s.get('pin_held') else ''}",
        f"queue      {s['queue']} of {s['queue_bound']} waiting, "
        f"in flight: {'yes' if s['in_flight'] else 'no'}",
        f"served     {counts.get('served', 0)} requests, {counts.get('swaps', 0)} swaps, "
        f"{counts.get('restarts', 0)} restarts",
        *([f"quarantined {', '.join(q)}"] if (q := s.get("quarantined")) else []),
        *render_machine(s),
    ])


def _mib(value: float | None) -> str:
    return "unknown" if value is None else f"{value / MIB:.0f} MiB"


def render_machine(s: dict) -> list[str]:
    """The monitor's state, the budget, and each plan's fit and closeness."""
    mon, state = s.get("monitor"), s.get("state") or {}
    if not mon:
        return []
    signals = [f"available {_mib(state.get('mem_available_bytes'))}"]
    if state.get("cgroup_headroom_bytes") is not None:
        signals.append(f"cgroup headroom {_mib(state['cgroup_headroom_bytes'])}")
    for key, label, fmt in (("psi_memory_some_avg10", "PSI some", "{:.1f}%"),
                            ("power_mode", "power", "{}"), ("gpu_load", "GPU", "{:.0%}"),
                            ("cpu_freq_ratio", "CPU freq", "{:.0%}"),
                            ("temperature_c", "temp", "{:.0f} C")):
        if state.get(key) is not None:
            signals.append(f"{label} {fmt.format(state[key])}")
    cost = (f"{mon['cpu_percent']:.3f}% CPU" if mon.get("cpu_percent") is not None else "")
    decide = (f", decide {mon['decide_ms_p50']:.3f} ms (median)" if mon.get("decide_ms_p50")
              else "")
    lines = [f"monitor    {mon['source']} every {mon['interval_s']:g} s"
             f"{'' if mon.get('adapt', True) else ' (not adapting)'}; {cost}{decide}",
             f"machine    {', '.join(signals)}",
             f"budget     {_mib(s.get('budget_bytes'))}"]
    for p in s.get("plans") or []:
        mark = "*" if p["serving"] else " "
        fit = "fits" if p["fits"] else f"no: {p['why']}"
        score = f"{p['closeness']:.3f}" if p.get("closeness") is not None else "-"
        lines.append(f"  {mark} {p['id'][:16]:<16} {p['footprint_bytes'] / MIB:>7.1f} MiB "
                     f"{p['latency_ms']:>7.2f} ms/tok  closeness {score:>5}  {fit}")
    return lines


def render_plans(p: dict) -> str:
    acc = p["accuracy"].upper()
    lines = [f"  {'ID':<16}  {'LABEL':<24}  {'MiB':>8}  {'MS/TOK':>7}  {acc:>8}"]
    for m in p["members"]:
        ms = m["measured"]
        value = ms["kld"] if p["accuracy"] == "kld" else ms["ppl"]
        lines.append(f"{'*' if m['serving'] else ' '} {m['id'][:16]:<16}  {m['label'][:24]:<24}"
                     f"  {ms['footprint_bytes'] / MIB:>8.1f}  {ms['latency']['median_ms']:>7.2f}"
                     f"  {value:>8.4f}")
    return "\n".join(lines + render_composed(p))


def render_composed(p: dict) -> list[str]:
    """The composed members kept, apart from the plan set's."""
    if not p.get("composed"):
        compose = p.get("compose") or {}
        return ([] if compose.get("on", True) else
                [f"composed: none, composition is off ({compose.get('off_reason')})"])
    acc = p["accuracy"]
    lines = ["composed (accuracy predicted; footprint and ms/token measured once served):"]
    for m in p["composed"]:
        ms, online = m["measured"], m.get("online") or {}
        seen = ", ".join(name for key, name in (("footprint_bytes", "footprint"),
                                                 ("latency_ms", "ms/token")) if key in online)
        lines.append(f"{'*' if m['serving'] else ' '} {m['id'][:16]:<16}  {m['label'][:24]:<24}"
                     f"  {ms['footprint_bytes'] / MIB:>8.1f}  {ms['latency']['median_ms']:>7.2f}"
                     f"  {ms[acc]:>8.4f}  ({'measured: ' + seen if seen else 'predicted'})")
    return lines


def render_compose(r: dict) -> str:
    budget = "none" if r.get("budget_bytes") is None else f"{r['budget_bytes'] / MIB:.1f} MiB"
    best = r.get("best_member")
    lines = [f"budget     {budget}",
             f"members    {len(r.get('fitting', []))} fit" +
             (f", best {best} ({r['best_member_accuracy']:.4f})" if best else "")]
    c = r.get("composed")
    if c is None:
        lines.append(f"composed   none: {r['reason']}")
        return "\n".join(lines)
    p = c["predicted"]
    acc = "kld" if "kld" in p else "ppl"
    types = ", ".join(f"{q} x{n}" for q, n in sorted(c["types"].items(), key=lambda kv: -kv[1]))
    lines += [f"composed   {c['id']}  {p['footprint_bytes'] / MIB:.1f} MiB, "
              f"{p['latency_ms']:.2f} ms/tok, {acc} {p[acc]:.4f} (predicted)",
              f"tensors    {types}",
              f"verdict    {'would serve it' if r.get('would_serve') else 'would not serve it'}"
              f": {r['reason']}" + ("" if r.get("would_serve") or not r.get("chosen") else
                                    f" (chooses {r['chosen']})")]
    return "\n".join(lines)


def render_event(e: dict) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(e.get("time", 0)))
    parts = [stamp, e["kind"]]
    if e.get("from") is not None or e.get("to") is not None:
        parts.append(f"{e.get('from')} -> {e.get('to')}")
    if e["kind"] == "swap_phase" and e.get("phase"):
        parts.append(e["phase"])
    if e.get("mode"):
        parts.append(f"[{e['mode']}]")
    if e.get("total_ms") is not None:
        parts.append(f"in {e['total_ms']:.0f} ms (downtime {e.get('downtime_ms', 0):.0f} ms)")
    if e.get("reason"):
        parts.append(f"- {e['reason']}")
    return " ".join(parts)


def _stream(client: Client, args: argparse.Namespace, as_json: bool) -> None:
    options = {"max_tokens": args.max_tokens, "temperature": args.temperature,
               "stop": args.stop, "seed": args.seed, "top_p": args.top_p,
               "presence_penalty": args.presence_penalty,
               "frequency_penalty": args.frequency_penalty}
    if args.json_schema is not None:
        options["response_format"] = {"type": "json_schema", "json_schema": args.json_schema}
    elif args.json_object:
        options["response_format"] = {"type": "json_object"}
    if args.command == "chat":
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        stream = client.chat_stream(messages + [{"role": "user", "content": args.message}],
                                    **options)
    else:
        stream = client.generate_stream(args.prompt, **options)
    if as_json:
        stream.text()
        _print_json(stream.result)
        return
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    u = stream.result["usage"]
    ms = f", {u['ms_per_token']:.1f} ms/token" if u.get("ms_per_token") else ""
    print(f"(plan {stream.result['plan']}, {u.get('completion_tokens')} tokens{ms})",
          file=sys.stderr)


def _decision_line(what: str, r: dict) -> str:
    d = r.get("decision") or {}
    pinned = f"; pinned to {r['pinned']}" if r.get("pinned") else ""
    reason = d.get("reason", "no decision")
    if not r.get("pinned") and d.get("choice") not in (None, r["plan"]):
        return f"{what}: switching {r['plan']} -> {d['choice']} ({reason})"
    return f"{what}: serving {r['plan']}{pinned} ({reason})"


def run(args: argparse.Namespace) -> None:
    as_json = getattr(args, "json", False)
    wait = not getattr(args, "no_wait", False)
    with Client(getattr(args, "socket", None)) as c:
        cmd = args.command
        if cmd in ("generate", "chat"):
            _stream(c, args, as_json)
            return
        if cmd == "events":
            for n, event in enumerate(c.events(), start=1):
                print(json.dumps(event, sort_keys=True) if as_json else render_event(event),
                      flush=True)
                if args.count and n >= args.count:
                    return
        levels = {}
        if cmd in ("set-priority", "set-weights"):
            levels = {k: getattr(args, k) for k in
                      ("max_latency_ms", "max_accuracy", "max_memory_bytes")}
        if cmd == "status":
            r = c.status()
            text = render_status(r)
        elif cmd == "plans":
            r = c.plans()
            text = render_plans(r)
        elif cmd == "compose":
            r = c.compose(budget_bytes=args.budget, priority=args.weights,
                          max_latency_ms=args.max_latency_ms)
            text = render_compose(r)
        elif cmd == "set-priority":
            r = c.set_priority(args.preset, wait=wait, **levels)
            text = _decision_line(f"priority {args.preset}", r)
        elif cmd == "set-weights":
            r = c.set_priority(args.weights, wait=wait, **levels)
            text = _decision_line("weights " + ",".join(f"{w:g}" for w in args.weights), r)
        elif cmd == "pin":
            r = c.pin(args.id, wait=wait)
            text = f"pinned {r['pinned']}: serving {r['plan']}"
        elif cmd == "unpin":
            r = c.unpin(wait=wait)
            text = _decision_line("unpinned", r)
        else:
            r = c.reload()
            text = f"plan set {r['planset']} reloaded ({r['members']} members): " \
                   f"serving {r['plan']}"
        if as_json:
            _print_json(r)
        else:
            print(text)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        run(args)
    except ApreqelError as exc:
        print(f"apreqelctl: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    sys.exit(0)


if __name__ == "__main__":
    main()

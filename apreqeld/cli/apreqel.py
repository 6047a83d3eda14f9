"""The `apreqel` command: parse, call one library function, render. Errors become one line."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect as pyinspect
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, TextIO

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from apreqeld import workflow
from apreqeld.core.contribution import DEFAULT_GAMMA
from apreqeld.core.disturbance import CLEAN, disturbed_text, profile_latency_evidence
from apreqeld.core.limits import build_limits
from apreqeld.core.plans import distribution_text
from apreqeld.core.weights import parse_weights
from apreqeld.errors import ApreqelError, InputError
from apreqeld.evidence.protocol import Protocol
from apreqeld.evidence.workspace import Workspace
from apreqeld.gguf.view import read_model
from apreqeld.resources import resolve_model
from apreqeld.storage import default_workdir, write_json_atomic
from apreqeld.workflow import PlanOptions

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Mixed-precision GGUF models that fit your device and your priorities.")
out = Console()
err = Console(stderr=True)
if not out.is_terminal:
    out.width = max(out.width, 140)

ModelArg = Annotated[Path | None, typer.Argument(
    help="GGUF model (default: the built-in SmolLM2-135M-Instruct)", show_default=False)]
Workdir = Annotated[Path | None, typer.Option(
    "--workdir", help="cache of references and measurements (default $APREQEL_HOME or "
    "~/.cache/apreqel)")]
Json = Annotated[bool, typer.Option("--json", help="print JSON instead of tables")]
StateDir = Annotated[Path | None, typer.Option(
    "--state-dir", help="where the shard store is and members are linked (default "
    "$APREQEL_HOME/state)")]
# Measurement options default to None: the Protocol's defaults apply, and a given one is known.
Chunks = Annotated[int | None, typer.Option(
    "--chunks", help=f"perplexity chunks of --ctx tokens (default {Protocol.chunks})")]
Ctx = Annotated[int | None, typer.Option(
    "--ctx", help=f"perplexity context (llama-perplexity -c) (default {Protocol.n_ctx})")]
NGen = Annotated[int | None, typer.Option(
    "--n-gen", help=f"generated tokens per latency run (tg N) (default {Protocol.n_gen})")]
Reps = Annotated[int | None, typer.Option(
    "--reps", help=f"latency repetitions after a warm-up (default {Protocol.reps})")]
Threads = Annotated[int | None, typer.Option("--threads", help="CPU threads (default: all)")]
GpuLayers = Annotated[int | None, typer.Option(
    "--gpu-layers", help="layers offloaded when llama.cpp has a GPU backend (llama-bench -ngl)"
    " (default 0)")]
Gamma = Annotated[float, typer.Option(
    "--gamma", help="layer-contribution threshold: reward below, penalty at or above")]
Types = Annotated[str | None, typer.Option(
    "--types", help="comma list of types, or 'auto' for a fallback-free ladder "
    "(default: the paper's q3_K,q4_K,q5_K,q6_K,q8_0)")]
Outside = Annotated[str | None, typer.Option(
    "--outside-type", help="type of the token embedding/output in every model (default q8_0)")]
ProfileOpt = Annotated[Path | None, typer.Option(
    "--profile", help="device profile JSON measured elsewhere (skips measuring here)")]
WeightsOpt = Annotated[str, typer.Option(
    "--weights", "-w", help="memory,latency,accuracy priorities, e.g. 0.2,0.6,0.2 or "
    "memory=0.2,latency=0.6,accuracy=0.2")]
Estimator = Annotated[str, typer.Option(
    "--estimator", help="'proportional' (the paper) or 'exact' (memory from tensor bytes)")]
Accuracy = Annotated[str, typer.Option(
    "--accuracy", help="accuracy criterion: 'ppl' (the paper) or 'kld' (KL divergence)")]
Calibration = Annotated[Path | None, typer.Option(
    "--calibration", help="calibration text for layer scores (default: shipped Tiny "
    "Shakespeare, disjoint from the WikiText-2 evaluation text)")]
CalTokens = Annotated[int, typer.Option("--calibration-tokens", help="calibration tokens")]
MaxSize = Annotated[str | None, typer.Option(
    "--max-size", help="size budget for the parameters, e.g. 90MiB or 1.5GB (exact bytes)")]
MaxLatency = Annotated[float | None, typer.Option(
    "--max-latency", help="upper bound on predicted ms per generated token")]
MaxPpl = Annotated[float | None, typer.Option("--max-ppl", help="upper bound on predicted PPL")]
MaxKld = Annotated[float | None, typer.Option(
    "--max-kld", help="upper bound on predicted KL divergence from the reference")]


def idle_priority() -> None:
    """This process at idle CPU and I/O priority (SCHED_IDLE, nice 19, I/O class idle), so
    that a build the daemon starts never slows serving; each is skipped where refused."""
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    with contextlib.suppress(OSError):
        os.nice(19)
    with contextlib.suppress(OSError, AttributeError):  # ioprio_set(IOPRIO_WHO_PROCESS, 0, IDLE)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall(251 if os.uname().machine == "x86_64" else 30, 1, 0, 3 << 13)


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handled(fn: Callable) -> Callable:
    """Turn domain errors into one line and a non-zero exit; never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ApreqelError as exc:
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        except KeyboardInterrupt:
            fail("interrupted; finished measurements are kept and the next run resumes", 130)
        except OSError as exc:
            fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
    return wrapper


@contextmanager
def progress_bar(title: str) -> Iterator[Callable[[str, float], None]]:
    """A rich progress bar fed by the library's (what, fraction) callbacks; each new step is
    also a line in $APREQEL_HOME/apreqel.log (`tail -f` it when stderr is not a terminal)."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn(
        "{task.percentage:>3.0f}%"), TimeElapsedColumn(), TimeRemainingColumn())
    log = _progress_log()
    started, last = time.monotonic(), [""]
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(title, total=1.0)

        def update(what: str, fraction: float) -> None:
            fraction = min(max(fraction, 0), 1)
            bar.update(task, description=f"{title}: {what}", completed=fraction)
            if what != last[0]:
                last[0] = what
                line = (f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {time.monotonic() - started:7.1f}s "
                        f"{fraction:4.0%} {title}: {what}")
                if log is not None:
                    log.write(line + "\n")
                    log.flush()

        try:
            yield update
        finally:
            if log is not None:
                log.close()


def _progress_log() -> TextIO | None:
    """The progress log, appended to; None where the work directory cannot be written."""
    try:
        home = default_workdir()
        home.mkdir(parents=True, exist_ok=True)
        return open(home / "apreqel.log", "a", encoding="utf-8")  # noqa: SIM115
    except OSError:
        return None


def _protocol(chunks: int | None, ctx: int | None, n_gen: int | None, reps: int | None,
              threads: int | None, gpu_layers: int | None) -> Protocol:
    """The measurement protocol: the options given, Protocol's defaults for the rest."""
    given = {"chunks": chunks, "n_ctx": ctx, "n_gen": n_gen, "reps": reps, "threads": threads,
             "gpu_layers": gpu_layers}
    return Protocol(**{k: v for k, v in given.items() if v is not None})


# Options of the uniform measurements, which a device profile from elsewhere replaces, and of
# the protocol, which a plan from such a profile uses only to measure built models.
PROFILED = {"types": "--types", "outside_type": "--outside-type"}
PROTOCOL = {"chunks": "--chunks", "ctx": "--ctx", "n_gen": "--n-gen", "reps": "--reps",
            "gpu_layers": "--gpu-layers"}


def _refuse_unused(given: dict, *, measures_built: bool) -> None:
    """Measurement options that --profile would silently ignore are an error."""
    if given["profile_path"] is None:
        return
    unused = PROFILED | ({} if measures_built else PROTOCOL)
    clash = [flag for name, flag in unused.items() if given[name] is not None]
    if clash:
        raise InputError(f"{clash[0]} cannot be combined with --profile: the device profile "
                         "was measured elsewhere, with its own types and protocol")


def _plan_options(profile_path: ProfileOpt = None, types: Types = None,
                  outside_type: Outside = None, estimator: Estimator = "proportional",
                  accuracy: Accuracy = "ppl", calibration: Calibration = None,
                  calibration_tokens: CalTokens = 2048, gamma: Gamma = DEFAULT_GAMMA,
                  chunks: Chunks = None, ctx: Ctx = None, n_gen: NGen = None,
                  reps: Reps = None, threads: Threads = None, gpu_layers: GpuLayers = None,
                  max_size: MaxSize = None, max_latency: MaxLatency = None,
                  max_ppl: MaxPpl = None, max_kld: MaxKld = None,
                  allow_disturbed_latency: Annotated[bool, typer.Option(
                      "--allow-disturbed-latency", help="plan even from latency measured "
                      "under contention (the plan records it)")] = False) -> PlanOptions:
    """The one PlanOptions of plan, optimize and study, every option checked before any work."""
    return PlanOptions(
        protocol=_protocol(chunks, ctx, n_gen, reps, threads, gpu_layers), types=types,
        outside=outside_type or "q8_0", profile_path=profile_path, estimator=estimator,
        accuracy=accuracy, calibration=calibration, calibration_tokens=calibration_tokens,
        gamma=gamma, limits=build_limits(max_size=max_size, max_latency=max_latency,
                                         max_ppl=max_ppl, max_kld=max_kld),
        disturbed_latency="flag" if allow_disturbed_latency else "refuse")


def with_plan_options(fn: Callable) -> Callable:
    """Give a command the shared planning options; it receives them as one `options`. A command
    that measures what it builds (study; optimize with --verify) uses the protocol options."""
    shared = pyinspect.signature(_plan_options, eval_str=True).parameters
    own = [p for p in pyinspect.signature(fn, eval_str=True).parameters.values()
           if p.name != "options"]

    @functools.wraps(fn)
    def wrapper(**kwargs):
        given = {name: kwargs.pop(name) for name in shared}
        _refuse_unused(given, measures_built=kwargs.get("verify", fn.__name__ == "study"))
        return fn(options=_plan_options(**given), **kwargs)

    wrapper.__signature__ = pyinspect.Signature([*own, *shared.values()])
    wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters
                               .values()}
    return wrapper


def _caveat(source: Path) -> None:
    """The one-line warning of every accuracy report on a model stored below q8_0."""
    note = workflow.accuracy_caveat(source)
    if note:
        err.print(f"[yellow]{note}[/]", highlight=False, soft_wrap=True)


def _model(model: Path | None) -> Path:
    path = resolve_model(model)
    read_model(path)  # fail early, with one line, on a missing or broken file
    return path


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


@app.command()
@handled
def inspect(model: ModelArg = None, json_: Json = False) -> None:
    """Architecture, blocks, and every tensor grouped into attention/FFN sublayers."""
    view = read_model(_model(model))
    if json_:
        out.print_json(data=view.to_dict())
        return
    out.print(f"[bold]{view.name}[/] ({view.architecture}), {view.n_blocks} blocks → "
              f"{len(view.sublayers)} sublayers, {view.n_parameters / 1e6:.1f} M parameters, "
              f"{_mib(view.parameter_bytes)} MiB, {view.bits_per_weight:.2f} bits/weight")
    table = Table("sublayer", "tensors", "types", "MiB")
    for s in view.sublayers:
        types = sorted({t.qtype.name for t in s.tensors})
        table.add_row(s.name, str(len(s.tensors)), ",".join(types), _mib(s.n_bytes))
    for t in view.outside:
        table.add_row(f"[dim]{t.name}[/]", "1", t.qtype.name, _mib(t.n_bytes))
    out.print(table)


@app.command()
@handled
def profile(model: ModelArg = None, calibration: Calibration = None,
            tokens: CalTokens = 2048, gamma: Gamma = DEFAULT_GAMMA,
            threads: Threads = None, workdir: Workdir = None, json_: Json = False) -> None:
    """Layer contribution (paper §3.1): cosine of each sublayer's input and output."""
    source = _model(model)
    with progress_bar("profile") as bar:
        result = workflow.layer_profile(source, workspace=Workspace(workdir),
                                        calibration=str(calibration) if calibration else None,
                                        n_tokens=tokens, gamma=gamma, threads=threads,
                                        progress=bar)
    if json_:
        out.print_json(data=result)
        return
    out.print(f"calibration: {result['text']}, tokens {result['token_range'][0]}–"
              f"{result['token_range'][1]}, gamma {result['gamma']}, on the F16 reference")
    table = Table("rank", "sublayer", "score", "reward", "penalty", "mean cosine")
    for s in sorted(result["sublayers"], key=lambda s: s["rank"]):
        table.add_row(str(s["rank"] + 1), s["name"], str(s["score"]), str(s["reward"]),
                      str(s["penalty"]), f"{s['mean_cosine']:.4f}")
    out.print(table)


def _metrics_table(rows: list[tuple[str, dict]], *, title: str | None = None) -> Table:
    table = Table("model", "bpw", "MiB", "ms/token", "PPL", "KLD", "top-1", title=title)
    for name, m in rows:
        table.add_row(name, _fmt(m["bpw"], 2), _mib(m["memory_bytes"]),
                      f"{_fmt(m['latency_ms'], 2)} ± {_fmt(m['latency_std_ms'], 2)}",
                      f"{_fmt(m['ppl'])} ± {_fmt(m['ppl_se'])}",
                      f"{_fmt(m['kld'], 4)} ± {_fmt(m['kld_se'], 4)}",
                      _fmt(100 * m["top1_agreement"], 1) + "%")
    return table


@app.command("measure-types")
@handled
def measure_types(model: ModelArg = None, types: Types = None, outside_type: Outside = None,
                  output: Annotated[Path, typer.Option("-o", "--output")] = Path(
                      "device-profile.json"),
                  chunks: Chunks = None, ctx: Ctx = None, n_gen: NGen = None,
                  reps: Reps = None, threads: Threads = None, gpu_layers: GpuLayers = None,
                  remeasure: Annotated[list[str] | None, typer.Option(
                      "--remeasure", help="re-time cached figures ('latency'): no rebuild of "
                      "what is kept, no accuracy re-scoring")] = None,
                  workdir: Workdir = None, json_: Json = False) -> None:
    """Measure uniform types on this machine and write a portable device profile."""
    protocol = _protocol(chunks, ctx, n_gen, reps, threads, gpu_layers)
    options = PlanOptions(protocol=protocol, types=types, outside=outside_type or "q8_0")
    source = _model(model)
    with progress_bar("measure") as bar:
        result = workflow.device_profile(source, workspace=Workspace(workdir),
                                         protocol=protocol, types=options.types,
                                         outside=options.outside, progress=bar,
                                         remeasure=tuple(remeasure or ()))
    write_json_atomic(output, result)
    if json_:
        out.print_json(data=result)
    else:
        _render_profile(result)
        out.print(f"device profile written to {output}")
    _caveat(source)


def _render_profile(result: dict) -> None:
    ref = result["reference"]
    rows = [(f"reference ({ref['type']})", ref["measured"])]
    rows += [(name, result["uniform"][name]["measured"]) for name in result["types"]]
    p = result["protocol"]
    out.print(_metrics_table(rows, title=(
        f"{result['model']['name']} on {result['device']['cpu']}, {p['threads']} threads; "
        f"{p['chunks']}×{p['n_ctx']} tokens of {p['text']} ({p['tokens_scored']} scored), "
        f"tg{p['n_gen']}×{p['reps']}")))
    out.print(f"reference: {ref['note']}; outside sublayers: {result['policy']['outside_type']}")
    warning = disturbed_text(profile_latency_evidence(result))
    if warning:
        out.print(f"[yellow]measured under contention[/]: {warning}; re-time with "
                  "`apreqel measure-types --remeasure latency` when the machine is quieter")
    for name in result["types"]:
        eff = result["uniform"][name]["effective_types"]
        if set(eff) != {name}:
            out.print(f"[yellow]{name}[/]: llama.cpp's shape fallback gives sublayer tensors "
                      + ", ".join(f"{k}×{v}" for k, v in eff.items()))


@app.command()
@handled
def measure(model: Annotated[Path, typer.Argument(help="any GGUF file")],
            reference: Annotated[Path | None, typer.Option(
                "--reference", help="model whose F16 reference the KL divergence is taken "
                "against (default: no KL divergence)")] = None,
            chunks: Chunks = None, ctx: Ctx = None, n_gen: NGen = None, reps: Reps = None,
            threads: Threads = None, gpu_layers: GpuLayers = None, workdir: Workdir = None,
            json_: Json = False) -> None:
    """Measure one GGUF with the same protocol as the uniform types."""
    protocol = _protocol(chunks, ctx, n_gen, reps, threads, gpu_layers)
    with progress_bar("measure") as bar:
        result = workflow.measure_one(_model(model), workspace=Workspace(workdir),
                                      protocol=protocol, reference_model=reference,
                                      progress=bar)
    if json_:
        out.print_json(data=result)
    else:
        out.print(_metrics_table([(Path(result["model"]).name, result)]))
    if reference is not None:
        _caveat(reference)


def _plan(model: Path | None, weights: str, options: PlanOptions,
          workdir: Path | None) -> tuple[Path, Workspace, dict]:
    """Check the weights and the model, then plan (measuring what is not cached)."""
    w = parse_weights(weights)
    source = _model(model)
    workspace = Workspace(workdir)
    with progress_bar("plan") as bar:
        plan_data = workflow.plan(source, w, workspace=workspace, options=options, progress=bar)
    return source, workspace, plan_data


def _render_plan(plan_data: dict) -> None:
    w = plan_data["weights"]
    p = plan_data["predicted"]
    out.print(f"weights memory {w['memory']:.3f}, latency {w['latency']:.3f}, accuracy "
              f"{w['accuracy']:.3f} → best of {plan_data['candidates']:,} distributions "
              f"(TOPSIS {plan_data['topsis_score']:.4f}, {plan_data['estimator']} estimator, "
              f"accuracy as {plan_data['criteria'][2]})")
    if plan_data.get("limits"):
        out.print(f"limits: {plan_data['limits']} → {plan_data['feasible_candidates']:,} "
                  "distributions fit")
    out.print(f"distribution: {distribution_text(plan_data['distribution'])}  "
              f"({plan_data['bits_per_weight']:.2f} bits/weight)")
    out.print(f"predicted: {_mib(p['memory_bytes'])} MiB (exact {_mib(p['memory_bytes_exact'])}"
              f" MiB), {p['latency_ms']:.2f} ms/token, PPL {p['ppl']:.3f}, KLD {p['kld']:.4f}")
    _latency_warning(plan_data)
    table = Table("block", "attention", "FFN")
    alloc = plan_data["allocation"]
    n_blocks = len(alloc) // 2
    for b in range(n_blocks):
        table.add_row(str(b), alloc[f"blk.{b}.attn"], alloc[f"blk.{b}.ffn"])
    out.print(table)


def _latency_warning(plan_data: dict, prefix: str = "") -> None:
    """Say when a plan's latency figures were measured under contention."""
    warning = plan_data.get("evidence", {}).get("latency", {}).get("warning")
    if warning:
        out.print(f"[yellow]{prefix}measured under contention[/]: {warning}")


def _render_verification(plan_data: dict, measured: dict) -> None:
    p = plan_data["predicted"]
    table = Table("metric", "predicted", "measured", title="predicted vs measured")
    exact = _mib(p["memory_bytes_exact"])
    table.add_row("memory (MiB)", f"{_mib(p['memory_bytes'])} (exact {exact})",
                  _mib(measured["memory_bytes"]))
    table.add_row("latency (ms/token)", _fmt(p["latency_ms"], 2),
                  f"{_fmt(measured['latency_ms'], 2)} ± {_fmt(measured['latency_std_ms'], 2)}")
    table.add_row("perplexity", _fmt(p["ppl"]), f"{_fmt(measured['ppl'])} ± "
                  f"{_fmt(measured['ppl_se'])}")
    table.add_row("KL divergence", _fmt(p["kld"], 4), f"{_fmt(measured['kld'], 4)} ± "
                  f"{_fmt(measured['kld_se'], 4)}")
    out.print(table)


@app.command("plan")
@handled
@with_plan_options
def plan_cmd(options: PlanOptions, model: ModelArg = None, weights: WeightsOpt = "1,1,1",
             output: Annotated[Path | None, typer.Option(
                 "-o", "--output", help="save the plan JSON here")] = None,
             workdir: Workdir = None, json_: Json = False) -> None:
    """Show the plan for your weights without building it."""
    source, _, plan_data = _plan(model, weights, options, workdir)
    if output is not None:
        write_json_atomic(output, plan_data)
    if json_:
        out.print_json(data=plan_data)
    else:
        _render_plan(plan_data)
        if output is not None:
            out.print(f"plan written to {output}; build it with `apreqel build --plan {output}`")
    _caveat(source)


@app.command()
@handled
@with_plan_options
def optimize(options: PlanOptions,
             output: Annotated[Path, typer.Option("-o", "--output", help="the GGUF to write")],
             model: ModelArg = None, weights: WeightsOpt = "1,1,1",
             verify: Annotated[bool, typer.Option(
                 "--verify", help="measure the built model; print predicted vs measured")] = False,
             workdir: Workdir = None) -> None:
    """Plan and build the mixed-precision GGUF that best serves your weights."""
    protocol = options.protocol
    source, workspace, plan_data = _plan(model, weights, options, workdir)
    _render_plan(plan_data)
    with progress_bar("build") as bar:
        built = workflow.build(plan_data, output, source=source, workspace=workspace,
                               threads=protocol.threads, progress=lambda s: bar(s, 0.5))
    out.print(f"built {built} ({_mib(read_model(built).parameter_bytes)} MiB); plan and "
              "llama-quantize recipe beside it")
    if verify:
        with progress_bar("verify") as bar:
            measured = workflow.verify(built, plan_data, source=source, workspace=workspace,
                                       protocol=protocol, progress=bar)
        _render_verification(plan_data, measured)
    _caveat(source)


@app.command("build")
@handled
def build_cmd(plan_path: Annotated[Path, typer.Option("--plan", help="a saved plan JSON")],
              output: Annotated[Path, typer.Option("-o", "--output", help="the GGUF to write")],
              model: Annotated[Path | None, typer.Option(
                  "--model", help="the source model (default: the one the plan records)",
                  show_default=False)] = None,
              threads: Threads = None, workdir: Workdir = None) -> None:
    """Replay a saved plan: the same model, byte for byte."""
    plan_data = workflow.load_plan(plan_path)
    source = _model(workflow.plan_source(plan_data, model))
    with progress_bar("build") as bar:
        built = workflow.build(plan_data, output, source=source, workspace=Workspace(workdir),
                               threads=threads or 0, progress=lambda s: bar(s, 0.5))
    out.print(f"built {built} from plan {plan_data['plan_id']}")


@app.command()
@handled
def demo(output: Annotated[Path, typer.Option(
             "-o", "--output", help="folder for the built models")] = Path("apreqel-demo"),
         model: ModelArg = None, types: Types = None, chunks: Chunks = 2, ctx: Ctx = 512,
         n_gen: NGen = 32, reps: Reps = 3, calibration_tokens: CalTokens = 1024,
         threads: Threads = None, gpu_layers: GpuLayers = 0, workdir: Workdir = None) -> None:
    """Three contrasting priorities on the default model, each built and verified."""
    started = time.time()
    protocol = _protocol(chunks, ctx, n_gen, reps, threads, gpu_layers)
    options = PlanOptions(protocol=protocol, types=types, calibration_tokens=calibration_tokens,
                          disturbed_latency="flag")
    source = _model(model)
    workspace = Workspace(workdir)
    rows = []
    with progress_bar("demo") as bar:
        for i, (name, weights) in enumerate(workflow.DEMO_WEIGHTS):
            def step(what: str, fraction: float, i: int = i, name: str = name) -> None:
                bar(f"{name}: {what}", (i + fraction) / len(workflow.DEMO_WEIGHTS))

            plan_data = workflow.plan(source, weights, workspace=workspace, options=options,
                                      progress=step)
            built = workflow.build(plan_data, output / f"{name}.gguf", source=source,
                                   workspace=workspace, threads=protocol.threads,
                                   progress=lambda s, step=step: step(s, 0.6))
            measured = workflow.verify(built, plan_data, source=source, workspace=workspace,
                                       protocol=protocol,
                                       progress=lambda w, f, step=step: step(w, 0.7 + f / 4))
            rows.append((name, weights, plan_data, measured))
    table = Table("priority", "weights m,l,a", "distribution", "bpw", "MiB pred → meas",
                  "ms/token pred → meas", "PPL pred → meas", "KLD pred → meas",
                  title=f"apreqel demo on {read_model(source).name} "
                        f"({protocol.chunks}×{protocol.n_ctx} tokens, tg{protocol.n_gen}"
                        f"×{protocol.reps}, {protocol.threads} threads)")
    for name, weights, p, m in rows:
        pr = p["predicted"]
        table.add_row(name, ",".join(f"{x:g}" for x in weights),
                      distribution_text(p["distribution"]), f"{p['bits_per_weight']:.2f}",
                      f"{_mib(pr['memory_bytes'])} → {_mib(m['memory_bytes'])}",
                      f"{pr['latency_ms']:.2f} → {m['latency_ms']:.2f}",
                      f"{pr['ppl']:.2f} → {m['ppl']:.2f}", f"{pr['kld']:.4f} → {m['kld']:.4f}")
    out.print(table)
    _latency_warning(rows[0][2], prefix="predicted latency ")
    for name, _, _, m in rows:
        if m.get("latency_quality", CLEAN) != CLEAN:
            out.print(f"[yellow]{name}: measured latency under contention[/]: "
                      f"{m.get('latency', {}).get('reason') or m['latency_quality']}")
    out.print(f"models, plans and llama-quantize recipes in {output}/ "
              f"({time.time() - started:.0f} s)")
    _caveat(source)


@app.command()
@handled
@with_plan_options
def study(options: PlanOptions, model: ModelArg = None,
          out_dir: Annotated[Path, typer.Option("-o", "--output", help="folder for study.json, "
                                                "report.html and the built models")] = Path(
              "apreqel-study"),
          configs: Annotated[Path | None, typer.Option(
              "--configs", help="your own weight configurations (JSON list or 'm,l,a [category]"
              " [name]' lines); default: the paper's 28")] = None,
          interleave: Annotated[bool, typer.Option(
              "--interleave/--no-interleave", help="re-time all models in interleaved rounds "
              "(robust to a machine whose speed drifts); --no-interleave keeps each model's "
              "own llama-bench run, as the paper")] = True,
          workdir: Workdir = None) -> None:
    """The paper's evaluation: every configuration built and measured, Pareto front,
    hypervolume against the uniform types, robustness table, HTML report. Resumable."""
    from apreqeld.core.configs import PAPER_CONFIGS, parse_configs
    from apreqeld.study.run import run_study

    chosen = PAPER_CONFIGS
    if configs is not None:
        if not configs.is_file():
            fail(f"configs file not found: {configs}")
        chosen = parse_configs(configs.read_text())
    source = _model(model)
    with progress_bar("study") as bar:
        result = run_study(source, out_dir, workspace=Workspace(workdir), options=options,
                           configs=chosen, interleave=interleave,
                           command=" ".join(["apreqel", *sys.argv[1:]]), progress=bar)
    _render_study(result)
    out.print(f"study.json and report.html in {out_dir}/ ({result['timing']['total_s']:.0f} s)")
    _caveat(source)


def _render_study(result: dict) -> None:
    from apreqeld.study.report import gain_text, margin_label

    table = Table("accuracy objective", "HV uniform", "HV APreQEL", "HV union", "gain",
                  "gain (union)", title="hypervolume (memory, latency, accuracy; paper Table 1)")
    for key, hv in result["hypervolume"].items():
        label = key.split("+")[0] + (margin_label(hv.get("margin")) if "+" in key else "")
        table.add_row(label, f"{hv['hv_uniform']:.4f}", f"{hv['hv_apreqel']:.4f}",
                      f"{hv['hv_union']:.4f}", gain_text(hv, "gain"),
                      gain_text(hv, "gain_union"))
    out.print(table)
    rows = [*result.get("uniform", []), *result.get("models", [])]
    contended = [r["name"] for r in rows if r["measured"].get("latency_quality") == "disturbed"]
    if contended:
        err.print(f"[yellow]latency measured under contention for {len(contended)} of "
                  f"{len(rows)} models ({', '.join(contended[:6])}"
                  f"{', …' if len(contended) > 6 else ''}): their ms/token and the front "
                  "are not trustworthy; re-run the study on a quiet machine[/]")
    rob = result.get("robustness") or {}
    if rob:
        names = {"memory_bytes": "memory (MiB)", "latency_ms": "latency (ms)"}
        t2 = Table("category", *[names.get(m, m) for m in rob["metrics"]],
                   title="average difference to the best (paper Table 2)")
        for row in rob["rows"]:
            t2.add_row(row["category"], *[
                _mib(row["diff"][m]) if m == "memory_bytes" and row["diff"][m] is not None
                else _fmt(row["diff"][m], 3) for m in rob["metrics"]])
        out.print(t2)
        for metric, best in rob["best"].items():
            mark = "[green]✓[/]" if best["ok"] else "[red]✗[/]"
            out.print(f"{mark} best {metric}: {best['name']} ({best['category']})")


@app.command()
@handled
def cache(clear: Annotated[bool, typer.Option(
              "--clear", help="delete everything cached, not the shard store (refused while "
              "another apreqel process uses the work directory)")] = False,
          prune: Annotated[bool, typer.Option(
              "--prune", help="remove shards no registered plan set uses (and plan sets whose "
              "manifest is gone)")] = False,
          verify: Annotated[bool, typer.Option(
              "--verify", help="hash every shard again; corrupt ones are removed (materialize "
              "rebuilds them)")] = False,
          state_dir: StateDir = None, workdir: Workdir = None, json_: Json = False) -> None:
    """What the work directory and the shard store hold; --clear, --prune, --verify."""
    workspace = Workspace(workdir, state_dir=state_dir)
    if clear:
        workspace.clear()
    store = workspace.store
    pruned = store.prune(forget_stale=True) if prune else None
    corrupt = store.verify() if verify else None
    usage, shards = workspace.usage(), store.usage()
    if json_:
        out.print_json(data={"root": str(workspace.root), "clear": clear,
                             "kinds": {k: {"files": n, "bytes": b}
                                       for k, (n, b) in usage.items()},
                             "store": shards, "pruned": pruned, "corrupt": corrupt})
        return
    table = Table("kind", "files", "MiB", title=f"{workspace.root}"
                  + (" (cleared)" if clear else ""))
    for kind, (n, size) in usage.items():
        table.add_row(kind, str(n), _mib(size))
    table.add_row("shard store", str(shards["shards"]), _mib(shards["bytes"]))
    table.add_row("total", str(sum(n for n, _ in usage.values()) + shards["shards"]),
                  _mib(sum(b for _, b in usage.values()) + shards["bytes"]))
    out.print(table)
    sets = Table("plan set", "manifest", "shards here / used", "MiB",
                 title=f"shard store {shards['root']}: {shards['members']} members linked")
    for r in shards["plansets"]:
        sets.add_row(r["name"], r["manifest"] + (" (gone)" if r["stale"] else ""),
                     f"{r['present']} / {r['shards']}", _mib(r["bytes"]))
    sets.add_row("unused", "", str(shards["unused_shards"]), _mib(shards["unused_bytes"]))
    out.print(sets)
    if pruned is not None:
        out.print(f"pruned: {pruned['removed_shards']} shards ({_mib(pruned['freed_bytes'])} "
                  f"MiB) and {pruned['removed_members']} member links removed; "
                  f"{pruned['kept_shards']} shards kept")
    if corrupt is not None:
        out.print(f"verified: {len(corrupt)} corrupt shards removed" if corrupt
                  else "verified: every shard matches its sha256")


@app.command()
@handled
def report(out_dir: Annotated[Path, typer.Argument(help="a study folder")]) -> None:
    """Re-render a finished study's report.html from its study.json (seconds)."""
    import json

    from apreqeld.study.run import write_study

    path = out_dir / "study.json"
    if not path.is_file():
        fail(f"no study.json in {out_dir}")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        fail(f"study.json is not valid JSON: {exc}")
    _, html = write_study(data, out_dir)
    out.print(f"report written to {html}")


# --------------------------------------------------------------------------- plan sets (issue 8)


class _PlansetGroup(typer.core.TyperGroup):
    """`apreqel planset [MODEL] -o DIR` runs `planset run`; `planset materialize DIR` rebuilds."""

    def parse_args(self, ctx, args):  # click's signature
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = ["run", *args]
        return super().parse_args(ctx, args)


planset_app = typer.Typer(cls=_PlansetGroup, add_completion=False, help=(
    "Plan sets: the measured Pareto set of mixed and uniform GGUFs the daemon serves from. "
    "`apreqel planset [MODEL] -o plans/NAME` makes one; `apreqel planset recipes "
    "LABEL=FILE... -o plans/NAME` measures hand-written llama-quantize recipes as one; "
    "`apreqel planset materialize plans/NAME` rebuilds its GGUFs byte for byte."))
app.add_typer(planset_app, name="planset")
ServingCtx = Annotated[int, typer.Option("--serving-ctx", help="context length the footprint "
                                         "is measured with")]


@planset_app.command("run")
@handled
def planset_run(
        output: Annotated[Path, typer.Option("-o", "--output", help="plan-set folder, e.g. "
                                             "plans/NAME")],
        model: ModelArg = None, types: Types = None, outside_type: Outside = None,
        step: Annotated[float, typer.Option("--step", help="weight grid step (0.1: 66 "
                                            "vectors)")] = 0.1,
        paper: Annotated[bool, typer.Option("--paper/--no-paper", help="add the paper's 28 "
                                            "weight configurations to the grid")] = True,
        weights_file: Annotated[Path | None, typer.Option(
            "--weights-file", help="weight vectors instead of the grid (JSON list or "
            "'m,l,a [category] [name]' lines)")] = None,
        estimator: Annotated[str, typer.Option("--estimator", help="'exact' or "
                                               "'proportional'")] = "exact",
        accuracy: Annotated[str, typer.Option("--accuracy", help="accuracy objective of the "
                                              "plans and the front: 'kld' or 'ppl'")] = "kld",
        calibration: Calibration = None, calibration_tokens: CalTokens = 2048,
        chunks: Chunks = None, ctx: Ctx = None, n_gen: NGen = None, reps: Reps = None,
        threads: Threads = None, gpu_layers: GpuLayers = None,
        serving_ctx: ServingCtx = 2048,
        condition: Annotated[str | None, typer.Option(
            "--condition", help="re-time the existing members of -o under the machine's "
            "current condition (e.g. a power mode) and record it under this name")] = None,
        presets: Annotated[str, typer.Option(
            "--presets", help="llama.cpp presets measured as candidates too: 'all' (those "
            "that quantize the model without an imatrix), 'none', or e.g. Q4_K_M,Q8_0")] = "all",
        protect: Annotated[str | None, typer.Option(
            "--protect", help="sublayer tensors one type gentler than the rest of their "
            "sublayer in every mix, as llama.cpp's presets do, e.g. attn_v,ffn_down")] = None,
        aim: Annotated[bool, typer.Option(
            "--aim/--no-aim", help="also add mixes aimed at beating each preset: needs "
            "every candidate type measured and one probe per sublayer (cached)")] = True,
        aim_rounds: Annotated[int, typer.Option(
            "--aim-rounds", help="rounds of the aiming loop after the first measurement: "
            "recalibrate, re-aim the presets still undominated, measure")] = 3,
        aim_members: Annotated[int, typer.Option(
            "--aim-members", help="members the aiming loop may add in all")] = 36,
        retime: Annotated[bool, typer.Option(
            "--retime", help="re-time the main latency column of the existing plan set in -o "
            "(interleaved rounds; nothing rebuilt or re-scored) and recompute the "
            "front")] = False,
        measure_composed: Annotated[bool, typer.Option(
            "--measure-composed", help="also score the members apreqeld composed and kept in "
            "the state dir (online/), which join the plan set as ordinary measured "
            "members")] = False,
        state_dir: StateDir = None, workdir: Workdir = None) -> None:
    """Plan a weight grid, build and measure each distinct plan, keep the measured front."""
    from apreqeld.aiming_loop import Bounds
    from apreqeld.planset import record_condition, retime_planset, run_planset

    workspace = Workspace(workdir, state_dir=state_dir)
    if retime:
        with progress_bar("retime") as bar:
            result = retime_planset(output, workspace=workspace, source=model, reps=reps,
                                    progress=bar)
        _render_planset(result)
        return
    if condition is not None:
        with progress_bar(f"condition {condition}") as bar:
            result = record_condition(output, condition, workspace=workspace, source=model,
                                      progress=bar)
        _render_planset(result, condition=condition)
        return
    protocol = _protocol(chunks, ctx, n_gen, reps, threads, gpu_layers)
    started = time.time()
    source = _model(model)
    extra = []
    if measure_composed:
        from apreqeld.store.online import composed_recipes

        extra = composed_recipes(workspace.state_dir, workspace.sha256(source))
        out.print(f"{len(extra)} composed members from the state dir to score")
    with progress_bar("planset") as bar:
        result = run_planset(source, output, workspace=workspace, protocol=protocol,
                             types=types, outside=outside_type or "q8_0", step=step,
                             paper=paper, weights_file=weights_file, estimator=estimator,
                             accuracy=accuracy,
                             calibration=str(calibration) if calibration else None,
                             calibration_tokens=calibration_tokens, serving_ctx=serving_ctx,
                             presets=presets, protect=protect, aim=aim,
                             bounds=Bounds(rounds=aim_rounds, members=aim_members),
                             extra=extra, progress=bar)
    _render_planset(result)
    out.print(f"{len(result.members)} members ({len(result.pareto_members)} on the measured "
              f"front) written to {output}/ ({time.time() - started:.0f} s)")


@planset_app.command("materialize")
@handled
def planset_materialize(
        folder: Annotated[Path, typer.Argument(help="plan-set folder or planset.json")],
        state_dir: StateDir = None,
        model: Annotated[Path | None, typer.Option(
            "--model", help="the source model (default: the default model when its sha256 "
            "matches the manifest)")] = None,
        front: Annotated[bool, typer.Option(
            "--front", help="only the members on the measured front (the ones the daemon "
            "serves)")] = False,
        member: Annotated[list[str] | None, typer.Option(
            "--member", help="only this member (id or a prefix of 4+ characters; repeat for "
            "more)")] = None,
        deep: Annotated[bool, typer.Option(
            "--deep", help="hash every shard again first (a corrupt one is rebuilt)")] = False,
        idle: Annotated[bool, typer.Option(
            "--idle", help="run at idle CPU and I/O priority (SCHED_IDLE, nice 19), as the "
            "daemon runs it")] = False,
        workdir: Workdir = None) -> None:
    """Make members loadable from the shard store: each shard the store lacks is quantized
    once from the F16 reference (checked against the manifest), then members are linked."""
    from apreqeld.manifest import load_planset, manifest_path
    from apreqeld.planset import materialize

    if idle:
        idle_priority()
    planset = load_planset(folder)
    workspace = Workspace(workdir, state_dir=state_dir)
    members = (planset.pareto_members if front else
               [planset.member(m) for m in member] if member else None)
    started = time.perf_counter()
    with progress_bar("materialize") as bar:
        paths = materialize(planset, workspace=workspace, members=members, source=model,
                            manifest=manifest_path(folder), deep=deep, progress=bar)
    out.print(f"{len(paths)} members in {workspace.state_dir / 'members'} "
              f"({time.perf_counter() - started:.2f} s), assembled from "
              f"{workspace.store.root}")


@planset_app.command("export")
@handled
def planset_export(
        folder: Annotated[Path, typer.Argument(help="plan-set folder or planset.json")],
        member_id: Annotated[str, typer.Argument(help="member id (or a prefix of 4+)")],
        output: Annotated[Path, typer.Option("-o", "--output", help="the GGUF to write")],
        model: Annotated[Path | None, typer.Option("--model", help="the source model")] = None,
        state_dir: StateDir = None, workdir: Workdir = None) -> None:
    """Write one member as one ordinary GGUF for stock llama.cpp tools (byte for byte what
    `apreqel build` writes for its recipe)."""
    from apreqeld.manifest import load_planset
    from apreqeld.planset import export_member

    planset = load_planset(folder)
    member = planset.member(member_id)
    written = export_member(planset, member, output,
                            workspace=Workspace(workdir, state_dir=state_dir), source=model)
    out.print(f"{member.id} ({member.label}) written to {written} "
              f"({_mib(written.stat().st_size)} MiB)")


@planset_app.command("upgrade")
@handled
def planset_upgrade(
        folder: Annotated[Path, typer.Argument(help="plan-set folder or planset.json")],
        model: Annotated[Path | None, typer.Option("--model", help="the source model")] = None,
        state_dir: StateDir = None, workdir: Workdir = None) -> None:
    """Turn a format-1 plan set (members rebuilt from recipes) into format 2 (assembled from the
    shard store): every member checked byte for byte against its old build, its serving
    footprint measured again as the store serves it."""
    from apreqeld.planset import upgrade_planset
    from apreqeld.store.shards import used_shards

    with progress_bar("upgrade") as bar:
        result = upgrade_planset(folder, workspace=Workspace(workdir, state_dir=state_dir),
                                 source=model, progress=bar)
    _render_planset(result)
    shards = len(set(used_shards(result)))
    out.print(f"{folder}: format {result.format}, its members assembled from {shards} shards")


@planset_app.command("recipes")
@handled
def planset_recipes(
        recipes: Annotated[list[str], typer.Argument(
            help="LABEL=FILE: a llama-quantize --tensor-type-file (PATTERN=TYPE lines, the "
            "first match wins) per member")],
        output: Annotated[Path, typer.Option("-o", "--output", help="plan-set folder, e.g. "
                                             "plans/NAME")],
        model: Annotated[Path | None, typer.Option(
            "--model", help="the source model (default: the built-in default model)")] = None,
        base: Annotated[str, typer.Option(
            "--base", help="type of every tensor no line matches")] = "q8_0",
        accuracy: Annotated[str, typer.Option("--accuracy", help="'kld' or 'ppl'")] = "kld",
        chunks: Chunks = None, ctx: Ctx = None, n_gen: NGen = None, reps: Reps = None,
        threads: Threads = None, gpu_layers: GpuLayers = None,
        serving_ctx: ServingCtx = 2048,
        state_dir: StateDir = None, workdir: Workdir = None) -> None:
    """Build and measure hand-written llama-quantize recipes as a plan set (every one is kept,
    front or not), e.g. to compare them with a planned set or serve them."""
    from apreqeld.core.recipes import parse_tensor_type_file
    from apreqeld.gguf.view import read_model
    from apreqeld.planset import planset_from_recipes

    source = _model(model)
    names = [t.name for t in read_model(source).tensors if t.quantizable]
    parsed = {}
    for spec in recipes:
        label, sep, file = spec.partition("=")
        if not sep or not label or not file:
            raise InputError(f"expected LABEL=FILE, got '{spec}'")
        if label in parsed:
            raise InputError(f"recipe label '{label}' is given twice")
        path = Path(file)
        if not path.is_file():
            raise InputError(f"recipe file not found: {path}")
        parsed[label] = parse_tensor_type_file(path.read_text(encoding="utf-8"), names,
                                               name=str(path))
    protocol = _protocol(chunks, ctx, n_gen, reps, threads, gpu_layers)
    started = time.time()
    with progress_bar("recipes") as bar:
        result = planset_from_recipes(source, parsed, output,
                                      workspace=Workspace(workdir, state_dir=state_dir),
                                      protocol=protocol, serving_ctx=serving_ctx, outside=base,
                                      accuracy=accuracy, progress=bar)
    _render_planset(result)
    out.print(f"{len(result.members)} members ({len(result.pareto_members)} on the measured "
              f"front) written to {output}/ ({time.time() - started:.0f} s)")


def _render_planset(planset: object, *, condition: str | None = None) -> None:
    acc = planset.accuracy
    table = Table("id", "kind", "label", "footprint MiB", "params MiB", "ms/token (median ± IQR)",
                  *([f"{condition} ms/token"] if condition else []), "KLD", "PPL", "front",
                  title=f"{planset.name}: {planset.model.name}, serving ctx "
                        f"{planset.serving.n_ctx}, front over footprint, ms/token, {acc}")
    for m in sorted(planset.members, key=lambda m: m.measured.footprint_bytes):
        x = m.measured
        extra = [_ms(m.conditions[condition])] if condition else []
        table.add_row(m.id, m.kind, m.label, _mib(x.footprint_bytes), _mib(x.parameter_bytes),
                      _ms(x.latency), *extra,
                      f"{x.kld:.4f} ± {x.kld_se:.4f}", f"{x.ppl:.3f} ± {x.ppl_se:.3f}",
                      "✓" if m.pareto else f"× {len(m.dominated_by)}")
    out.print(table)
    bad = [m for m in planset.members if m.measured.latency.disturbed]
    if bad:
        out.print(f"! latency disturbed (marked !) for {len(bad)} of {len(planset.members)} "
                  f"members, e.g. {bad[0].id}: {bad[0].measured.latency.reason}; re-time on a "
                  "quiet machine with --retime")
    if planset.presets:
        beaten = sum(bool(p.dominated_by) for p in planset.presets)
        out.print(f"presets dominated by a mix or uniform member: {beaten} of "
                  f"{len(planset.presets)}")
        for p in planset.presets:
            if not p.dominated_by:
                gaps = ", ".join(f"{k} {100 * v:+.1f}%" for k, v in p.miss.items())
                out.print(f"  {p.name} ({p.member}): not dominated; closest {p.closest}: {gaps}"
                          + (f"; {p.reason}" if p.reason else ""))


def _ms(stats: object) -> str:
    """median ± IQR, marked ! when the disturbance detector flagged the rounds."""
    mark = " !" if stats.disturbed else ""
    return f"{stats.median_ms:.2f} ± {stats.iqr_ms:.2f}{mark}"


def main() -> None:  # pragma: no cover - entry point
    try:
        app()
    except KeyboardInterrupt:
        err.print("error: interrupted")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()

"""Self-contained offline HTML report of a study (tables plus inline SVG figures)."""

from __future__ import annotations

import html
import io
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from apreqeld.study.analysis import average_bpw_by_category, robustness_table

DASH = "—"

CATEGORY_COLORS = {
    "Fairness": "#7b4fa3",
    "Memory": "#2e8b57",
    "Latency": "#e07b00",
    "Accuracy": "#1f6fb4",
}
"""One colour per configuration category, shared by every figure."""

TYPE_PALETTE = ["#1f4e79", "#2f7fb8", "#5fb0b0", "#e3a33b", "#d0553f", "#8c2d2d", "#555555"]
"""Colours of quantization types, least to most aggressive (distribution bars)."""

UNIT = {
    "memory_bytes": ("Memory", "MiB"),
    "latency_ms": ("Latency", "ms/token"),
    "ppl": ("PPL", ""),
    "kld": ("KLD", ""),
}
"""Display name and unit of each objective."""

CSS = """
:root{--fg:#1d232b;--muted:#5d6773;--line:#d9dee5;--zebra:#f4f6f9;--accent:#1f6fb4;
--ok:#1e8e3e;--bad:#c5221f}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",
Arial,sans-serif;color:var(--fg);background:#fff}
main,header.page,footer.page,nav{max-width:1240px;margin:0 auto;padding:0 24px}
header.page{padding-top:28px}
h1{font-size:26px;margin:0 0 4px}
h2{font-size:20px;margin:36px 0 10px;padding-bottom:4px;border-bottom:2px solid var(--line)}
h3{font-size:16px;margin:22px 0 6px}
.sub{color:var(--muted);margin:0 0 16px}
nav{position:sticky;top:0;background:rgba(255,255,255,.95);border-bottom:1px solid var(--line);
padding-top:8px;padding-bottom:8px;z-index:2}
nav a{margin-right:18px;color:var(--accent);text-decoration:none;font-weight:600}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:4px 18px;margin:0;
font-size:14px}
dl.facts dt{color:var(--muted);font-weight:600}
dl.facts dd{margin:0;overflow-wrap:anywhere}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:13px;margin:8px 0 6px;
font-variant-numeric:tabular-nums}
th,td{padding:4px 7px;border-bottom:1px solid var(--line);vertical-align:middle}
th{background:#e9edf2;text-align:left;font-weight:600;white-space:nowrap}
th.grp{text-align:center;border-left:1px solid var(--line)}
tbody tr:nth-child(even){background:var(--zebra)}
tbody tr:hover{background:#e6f0fa}
td.num,th.num{text-align:right;white-space:nowrap}
td.c,th.c{text-align:center}
td.name{font-weight:600;white-space:nowrap}
td.nw{white-space:nowrap}
.same{font-weight:400;font-size:11px;color:var(--muted)}
td.best{font-weight:700;color:var(--ok)}
.ok{color:var(--ok);font-weight:700}
.bad{color:var(--bad);font-weight:700}
.se{color:var(--muted);font-size:12px}
.note{color:var(--muted);font-size:13px}
.verdict{font-size:16px;background:#eef5fc;border-left:4px solid var(--accent);
padding:10px 14px;margin:12px 0}
.cat{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:6px}
.dist{display:flex;width:110px;height:8px;border-radius:2px;overflow:hidden;margin-bottom:2px}
.dist span{display:block;height:100%}
.dtext{font-size:12px;color:var(--muted);white-space:nowrap}
figure{margin:18px 0 26px}
figure svg{max-width:100%;height:auto;display:block}
figcaption{color:var(--muted);font-size:13px;margin-top:4px;max-width:900px}
.missing{color:var(--muted);font-style:italic}
pre{background:#f4f6f9;border:1px solid var(--line);padding:10px 12px;overflow-x:auto;
font-size:13px}
footer.page{margin-top:40px;padding-bottom:40px;border-top:2px solid var(--line)}
"""


class _Raw(str):
    """HTML that is already safe (built here from escaped parts) and must not be escaped again."""


def _e(value: Any) -> str:
    """Escaped text of any value, "—" for None."""
    if isinstance(value, _Raw):
        return value
    return html.escape(DASH if value is None else str(value))


def _get(obj: Any, *keys: Any) -> Any:
    """Nested lookup through mappings and sequences, None where any step is missing."""
    for k in keys:
        if isinstance(obj, Mapping):
            obj = obj.get(k)
        elif isinstance(obj, Sequence) and not isinstance(obj, str) and isinstance(k, int):
            obj = obj[k] if -len(obj) <= k < len(obj) else None
        else:
            return None
    return obj


def _num(value: Any) -> float | None:
    """A finite float, or None for null, text, booleans, NaN and infinities."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _fmt(value: Any, digits: int) -> str:
    """Fixed-point text of a number, "—" when missing."""
    v = _num(value)
    return DASH if v is None else f"{v:,.{digits}f}"


def _mib(value: Any) -> str:
    """Bytes as MiB with one decimal."""
    v = _num(value)
    return DASH if v is None else f"{v / 2**20:,.1f}"


def _pct(value: Any, signed: bool = True) -> str:
    """A fraction as a percentage with two decimals."""
    v = _num(value)
    if v is None:
        return DASH
    return f"{100 * v:+.2f}%" if signed else f"{100 * v:.2f}%"


def margin_label(margin: Any) -> str:
    """" (reference point +N%)" for a hypervolume whose reference point was moved out."""
    m = _num(margin)
    return f" (reference point +{100 * m:g}%)" if m else " (reference point moved)"


def gain_text(hv: Mapping[str, Any], key: str) -> str:
    """A hypervolume gain as a percentage; "undefined" when the uniform set has no volume."""
    if hv and _num(hv.get("hv_uniform")) == 0:
        return "undefined"
    return _pct(hv.get(key))


def _pm(value: Any, err: Any, digits: int) -> _Raw:
    """"value ± err" with the error in muted small text (error left out when missing)."""
    text = _fmt(value, digits)
    if text == DASH or _num(err) is None:
        return _Raw(_e(text))
    return _Raw(f"{_e(text)} <span class=se>± {_e(_fmt(err, digits))}</span>")


def _tip(value: Any, err: Any, digits: int) -> _Raw:
    """A number whose ± error is shown as a tooltip (keeps wide tables narrow)."""
    text = _e(_fmt(value, digits))
    if text == DASH or _num(err) is None:
        return _Raw(text)
    return _Raw(f"<span title='± {_e(_fmt(err, digits))}'>{text}</span>")


def _objective(name: str, value: Any) -> str:
    """A value of an objective in its display unit."""
    if name == "memory_bytes":
        v = _mib(value)
        return DASH if v == DASH else f"{v} MiB"
    digits = {"latency_ms": 2, "ppl": 3, "kld": 4}.get(name, 4)
    v = _fmt(value, digits)
    return f"{v} ms" if name == "latency_ms" and v != DASH else v


def _label(name: str) -> str:
    """Axis/table label of an objective, unit included."""
    title, unit = UNIT.get(name, (name, ""))
    return f"{title} ({unit})" if unit else title


def _check(flag: Any) -> _Raw:
    """✓ for true, empty for false, "—" when unknown."""
    if flag is True:
        return _Raw("<span class=ok>✓</span>")
    return _Raw("") if flag is False else _Raw(DASH)


def _okbad(flag: Any) -> _Raw:
    """✓ (ok) or ✗ (not ok) mark, "—" when unknown."""
    if flag is None:
        return _Raw(DASH)
    return _Raw("<span class=ok>✓</span>" if flag else "<span class=bad>✗</span>")


Cell = Any
"""A table cell: plain value (escaped), _Raw HTML, or (content, css class)."""


def _table(head: str, rows: Iterable[Sequence[Cell]], empty: str, ncols: int) -> str:
    """An HTML table from a raw header and cell rows; a single muted row when there is no row."""
    body = []
    for row in rows:
        cells = []
        for cell in row:
            content, cls = cell if isinstance(cell, tuple) else (cell, "")
            attr = f" class='{cls}'" if cls else ""
            cells.append(f"<td{attr}>{_e(content)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    if not body:
        body.append(f"<tr><td colspan={ncols} class=missing>{_e(empty)}</td></tr>")
    return (f"<div class=scroll><table><thead>{head}</thead><tbody>"
            + "\n".join(body) + "</tbody></table></div>")


def _th(*labels: str, cls: str = "") -> str:
    """A header row of escaped labels."""
    attr = f" class='{cls}'" if cls else ""
    return "<tr>" + "".join(f"<th{attr}>{_e(x)}</th>" for x in labels) + "</tr>"


def _section(sid: str, title: str, body: str) -> str:
    """A report section with its anchor id."""
    return f"<section id='{sid}'><h2>{_e(title)}</h2>\n{body}\n</section>"


def _missing(text: str) -> str:
    """A paragraph saying a piece of the study is not available."""
    return f"<p class=missing>{_e(text)}</p>"


def _entries(study: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    """The mapping entries of a list in the study (uniform or models), [] when absent."""
    items = study.get(key)
    if not isinstance(items, Sequence) or isinstance(items, str):
        return []
    return [x for x in items if isinstance(x, Mapping)]


def _flags(study: Mapping[str, Any], key: str, n: int) -> list[Any]:
    """Pareto flags of a list, padded with None when absent or of the wrong length."""
    flags = _get(study, "pareto", key)
    if isinstance(flags, Sequence) and not isinstance(flags, str) and len(flags) == n:
        return [f if isinstance(f, bool) else None for f in flags]
    return [None] * n


def _types_order(study: Mapping[str, Any], models: Sequence[Mapping[str, Any]]) -> list[str]:
    """Quantization types, least to most aggressive, then any other seen in a distribution."""
    order = [str(t) for t in study.get("types") or [] if isinstance(t, str)]
    for m in models:
        dist = m.get("distribution")
        if isinstance(dist, Mapping):
            order += [str(t) for t in dist if str(t) not in order]
    return order


def _distribution(dist: Any, order: Sequence[str]) -> _Raw:
    """Compact distribution: a stacked bar plus text such as "q8_0×4 q6_K×20"."""
    if not isinstance(dist, Mapping):
        return _Raw(DASH)
    parts = [(t, int(c)) for t in order if (c := _num(dist.get(t))) is not None and c > 0]
    if not parts:
        return _Raw(DASH)
    bar = "".join(
        f"<span style='flex:{c};background:{TYPE_PALETTE[min(order.index(t), 6)]}' "
        f"title='{_e(t)}×{c}'></span>"
        for t, c in parts
    )
    text = " ".join(f"{t}×{c}" for t, c in parts)
    return _Raw(f"<div class=dist>{bar}</div><span class=dtext>{_e(text)}</span>")


def _weights(w: Any) -> str:
    """Weights (memory, latency, accuracy) as "0.70 / 0.15 / 0.15"."""
    if not isinstance(w, Sequence) or isinstance(w, str) or not w:
        return DASH
    return " / ".join(_fmt(x, 2) for x in w)


def _category(cat: Any) -> _Raw:
    """Category name with its colour dot."""
    if cat is None:
        return _Raw(DASH)
    color = CATEGORY_COLORS.get(str(cat), "#888888")
    return _Raw(f"<span class=cat style='background:{color}'></span>{_e(cat)}")


# ----------------------------------------------------------------------------- sections


def _header(study: Mapping[str, Any]) -> str:
    """Page header: model, device, protocol, reference, policy and date."""
    model, dev, prot = (study.get(k) or {} for k in ("model", "device", "protocol"))
    model = model if isinstance(model, Mapping) else {}
    dev = dev if isinstance(dev, Mapping) else {}
    prot = prot if isinstance(prot, Mapping) else {}

    def j(*parts: Any) -> str:
        """Join the present parts with a middle dot."""
        kept = [str(p) for p in parts if p not in (None, "", DASH)]
        return " · ".join(kept) if kept else DASH

    def n(v: Any, unit: str) -> str | None:
        """A count with its unit, None when missing."""
        return None if _num(v) is None else f"{_fmt(v, 0)} {unit}"

    gpu, version = dev.get("gpu"), study.get("apreqel_version")
    facts = [
        ("Model", j(model.get("name"), model.get("architecture"),
                    n(model.get("n_blocks"), "blocks"), n(model.get("n_sublayers"), "sublayers"))),
        ("File", j(model.get("path"))),
        ("SHA-256", j(model.get("sha256"))),
        ("Reference", j(model.get("reference"))),
        ("Device", j(dev.get("cpu"), f"GPU {gpu}" if gpu else ("no GPU" if "gpu" in dev else None),
                     n(dev.get("threads"), "threads"), n(dev.get("gpu_layers"), "GPU layers"),
                     f"llama.cpp {dev['llama_cpp']}" if dev.get("llama_cpp") else None)),
        ("Evaluation", j(prot.get("text"), n(prot.get("chunks"), "chunks"),
                         f"ctx {_fmt(prot['ctx'], 0)}" if _num(prot.get("ctx")) else None,
                         n(prot.get("tokens_scored"), "tokens scored"))),
        ("Latency", j(n(prot.get("latency_reps"), "repetitions"),
                      n(prot.get("latency_tokens"), "generated tokens each"))),
        ("Calibration", j(prot.get("calibration"))),
        ("Policy", j(f"token_embd and output kept at {_get(study, 'policy', 'outside_type')}"
                     if _get(study, "policy", "outside_type") else None)),
        ("Date", j(study.get("created"), f"apreqel {version}" if version else None)),
    ]
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts)
    name = model.get("name") or "unknown model"
    return (f"<header id='header' class=page><h1>APreQEL study — {_e(name)}</h1>"
            "<p class=sub>Mixed-precision quantization under user weights for (memory, latency, "
            "accuracy), compared with uniform quantization by Pareto front and hypervolume."
            f"</p><dl class=facts>{dl}</dl></header>")


def _nav() -> str:
    """Sticky in-page navigation (local anchors only)."""
    links = [("summary", "Summary"), ("uniform", "Uniform types"), ("models", "Configurations"),
             ("robustness", "Robustness"), ("figures", "Figures"), ("footer", "Reproduce")]
    return "<nav>" + "".join(f"<a href='#{i}'>{_e(t)}</a>" for i, t in links) + "</nav>"


def _verdict(study: Mapping[str, Any], n_uni: int, models: Sequence[Mapping[str, Any]]) -> str:
    """One sentence saying whether APreQEL enlarges the uniform hypervolume."""
    gains = {k: _num(_get(study, "hypervolume", k, "gain")) for k in ("ppl", "kld")}
    if not models:
        return "No APreQEL configuration has been measured yet, so there is nothing to compare."
    if all(g is None for g in gains.values()):
        return "No hypervolume is available yet for this study."
    flags = _flags(study, "models", len(models))
    nd = sum(1 for f in flags if f is True)
    known = [g for g in gains.values() if g is not None]
    verb = ("enlarge" if all(g > 0 for g in known)
            else "do not enlarge" if all(g <= 0 for g in known) else "change")
    parts = [f"{_pct(g)} with {UNIT[k][0]} as accuracy objective"
             for k, g in gains.items() if g is not None]
    pareto = (f"; {nd} of {len(models)} configurations are non-dominated in the union "
              "(memory, latency, PPL)" if any(f is not None for f in flags) else "")
    return (f"The {len(models)} APreQEL configurations {verb} the hypervolume of the "
            f"{n_uni} uniform types: {' and '.join(parts)}{pareto}.")


def _summary(study: Mapping[str, Any], n_uni: int, models: Sequence[Mapping[str, Any]]) -> str:
    """Hypervolume table (paper Table 1 analogue), normalisation and verdict."""
    head = _th("Accuracy objective", "Objectives", "HV uniform", "HV APreQEL", "HV union",
               "Gain", "Gain (union)")
    rows, notes = [], []
    for key in ("ppl", "kld", "ppl+margin", "kld+margin"):
        hv = _get(study, "hypervolume", key)
        hv = hv if isinstance(hv, Mapping) else {}
        if not hv and "+" in key:
            continue
        base, _, variant = key.partition("+")
        label = UNIT[base][0] + (margin_label(hv.get("margin")) if variant else "")
        objs = [str(o) for o in hv.get("objectives") or []]
        rows.append([
            (label, "name"),
            ", ".join(objs) if objs else DASH,
            (_fmt(hv.get("hv_uniform"), 4), "num"),
            (_fmt(hv.get("hv_apreqel"), 4), "num"),
            (_fmt(hv.get("hv_union"), 4), "num"),
            (gain_text(hv, "gain"), "num best" if (_num(hv.get("gain")) or 0) > 0 else "num"),
            (gain_text(hv, "gain_union"), "num"),
        ])
        if hv:
            ideal, ref = hv.get("ideal") or [], hv.get("ref") or []
            pts = [(f"{_label(o)}: {_objective(o, _get(ideal, i))} → {_objective(o, _get(ref, i))}")
                   for i, o in enumerate(objs)]
            notes.append(f"<li><b>{_e(label)}</b>: {_e(hv.get('normalisation') or DASH)}. "
                         f"Ideal → reference point: {_e('; '.join(pts) or DASH)}.</li>")
    table = _table(head, rows, "No hypervolume.", 7)
    gain_def = ("<p class=note>Gain = (HV<sub>APreQEL</sub> − HV<sub>uniform</sub>) / "
                "HV<sub>uniform</sub> (paper §4.1.2); the union gain uses HV of uniform ∪ "
                "APreQEL.</p>")
    norm = f"<ul class=note>{''.join(notes)}</ul>" if notes else ""
    verdict = f"<p class=verdict>{_e(_verdict(study, n_uni, models))}</p>"
    return _section("summary", "Summary: hypervolume (paper Table 1)",
                    verdict + table + gain_def + norm)


def _uniform(study: Mapping[str, Any], uniform: Sequence[Mapping[str, Any]]) -> str:
    """Table of the uniform quantization types with their measurements."""
    head = _th("Type", "bpw", "Memory (MiB)", "Latency (ms/token)", "PPL", "KLD",
               "Top-1 agree", "Pareto")
    flags = _flags(study, "uniform", len(uniform))
    rows = []
    for u, flag in zip(uniform, flags, strict=True):
        m = u.get("measured") if isinstance(u.get("measured"), Mapping) else {}
        rows.append([
            (u.get("type") or u.get("name"), "name"),
            (_fmt(u.get("bpw"), 2), "num"),
            (_mib(m.get("memory_bytes")), "num"),
            (_pm(m.get("latency_ms"), m.get("latency_std_ms"), 2), "num"),
            (_pm(m.get("ppl"), m.get("ppl_se"), 3), "num"),
            (_pm(m.get("kld"), m.get("kld_se"), 4), "num"),
            (_pct(m.get("top1_agreement"), signed=False), "num"),
            (_check(flag), "c"),
        ])
    table = _table(head, rows, "No uniform type measured yet.", 8)
    note = ("<p class=note>Latency: mean ± standard deviation over repetitions; PPL and KLD "
            "(against the reference) ± standard error. Pareto ✓: non-dominated in (memory, "
            "latency, PPL) over uniform ∪ APreQEL.</p>")
    return _section("uniform", "Uniform quantization types", table + note)


def _models(study: Mapping[str, Any], models: Sequence[Mapping[str, Any]]) -> str:
    """Table of every APreQEL configuration, predicted next to measured."""
    head = (
        "<tr><th rowspan=2>Configuration</th><th rowspan=2>Category</th>"
        "<th rowspan=2 title='memory / latency / accuracy'>Weights<br>mem / lat / acc</th>"
        "<th rowspan=2>Distribution</th><th rowspan=2 class=num>bpw</th>"
        "<th colspan=2 class=grp>Memory (MiB)</th><th colspan=2 class=grp>Latency (ms/token)</th>"
        "<th colspan=2 class=grp>PPL</th><th colspan=2 class=grp>KLD</th>"
        "<th rowspan=2>Pareto</th></tr>"
        + _th(*(["pred.", "meas."] * 4), cls="num")
    )
    order = _types_order(study, models)
    flags = _flags(study, "models", len(models))
    rows = []
    for mod, flag in zip(models, flags, strict=True):
        p = mod.get("predicted") if isinstance(mod.get("predicted"), Mapping) else {}
        m = mod.get("measured") if isinstance(mod.get("measured"), Mapping) else {}
        same = mod.get("same_as")
        name = _e(mod.get("name")) + (f"<div class=same>same plan as {_e(same)}</div>"
                                      if same else "")
        rows.append([
            (_Raw(name), "name"),
            (_category(mod.get("category")), "nw"),
            (_weights(mod.get("weights")), "num"),
            _distribution(mod.get("distribution"), order),
            (_fmt(mod.get("bpw"), 2), "num"),
            (_mib(p.get("memory_bytes")), "num"),
            (_mib(m.get("memory_bytes")), "num"),
            (_fmt(p.get("latency_ms"), 2), "num"),
            (_tip(m.get("latency_ms"), m.get("latency_std_ms"), 2), "num"),
            (_fmt(p.get("ppl"), 3), "num"),
            (_tip(m.get("ppl"), m.get("ppl_se"), 3), "num"),
            (_fmt(p.get("kld"), 4), "num"),
            (_tip(m.get("kld"), m.get("kld_se"), 4), "num"),
            (_check(flag), "c"),
        ])
    table = _table(head, rows, "No APreQEL configuration yet.", 14)
    note = ("<p class=note>Predicted values are the paper's estimate (§3.2.1): the layer-share "
            "weighted mean of the uniform measurements. Weights are the user priorities for "
            "(memory, latency, accuracy). Hover a measured value for its standard deviation "
            "(latency) or standard error (PPL, KLD).</p>")
    return _section("models", f"APreQEL configurations ({len(models)})", table + note)


def _robustness(study: Mapping[str, Any], models: Sequence[Mapping[str, Any]]) -> str:
    """Paper Table 2 analogue and the best-model-per-metric check."""
    rob = study.get("robustness")
    if not isinstance(rob, Mapping) and models:
        rob = robustness_table(models)
    if not isinstance(rob, Mapping) or not rob.get("rows"):
        return _section("robustness", "Robustness (paper Table 2)",
                        _missing("No robustness analysis available yet."))
    metrics = [str(x) for x in rob.get("metrics") or []]
    rows_in = [r for r in rob.get("rows") or [] if isinstance(r, Mapping)]
    lowest = {}
    for mt in metrics:
        vals = [v for r in rows_in if (v := _num(_get(r, "diff", mt))) is not None]
        lowest[mt] = min(vals) if vals else None
    head = _th("Category", "Models", *(f"Δ {_label(mt)}" for mt in metrics))
    rows = []
    for r in rows_in:
        cells: list[Cell] = [_category(r.get("category")), (_fmt(r.get("n_models"), 0), "num")]
        for mt in metrics:
            d = _num(_get(r, "diff", mt))
            text = _mib(d) if mt == "memory_bytes" else _fmt(d, {"latency_ms": 2, "ppl": 3}
                                                              .get(mt, 4))
            rel = _num(_get(r, "rel", mt))
            raw = _e(text) + (f" <span class=se>({_e(_pct(rel))})</span>" if rel is not None
                              and d is not None else "")
            best = d is not None and lowest[mt] is not None and d == lowest[mt]
            cells.append((_Raw(raw), "num best" if best else "num"))
        rows.append(cells)
    table = _table(head, rows, "No category.", 2 + len(metrics))
    best = rob.get("best") if isinstance(rob.get("best"), Mapping) else {}
    head2 = _th("Metric", "Best value", "Best configuration", "Its category", "Expected", "Check")
    rows2 = []
    for mt in metrics:
        b = best.get(mt) if isinstance(best.get(mt), Mapping) else {}
        tied = [t for t in b.get("tied") or [] if isinstance(t, Mapping)]
        names = ", ".join(str(t.get("name")) for t in tied) or b.get("name")
        rows2.append([
            (_label(mt), "name"),
            (_objective(mt, b.get("value")), "num"),
            names,
            _category(b.get("category")),
            b.get("expected"),
            (_okbad(b.get("ok")), "c"),
        ])
    checks = [_get(best, mt, "ok") for mt in metrics]
    n_ok = sum(1 for c in checks if c is True)
    sentence = (f"{n_ok} of {len(metrics)} metrics have their best configuration in the category "
                "that prioritises them (a Fairness best counts as not ok).")
    note = ("<p class=note>Δ = mean over the category's configurations of (measured value − best "
            "measured value over all configurations); lower is better, the lowest per column is "
            "bold; in brackets relative to the best value. Configurations sharing a plan count "
            "separately.</p>")
    body = (table + note + "<h3>Best configuration per metric</h3>"
            + _table(head2, rows2, "No metric.", 6) + f"<p>{_e(sentence)}</p>")
    return _section("robustness", "Robustness (paper Table 2)", body)


# ----------------------------------------------------------------------------- figures


def _svg(fig: Figure, key: str, label: str) -> str:
    """The figure as inline SVG markup, ids prefixed with `key` so several figures coexist."""
    buf = io.StringIO()
    with mpl.rc_context({"svg.hashsalt": "apreqel", "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", bbox_inches="tight",
                    metadata={"Date": None, "Creator": None, "Type": None, "Format": None})
    fig.clear()
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    head, rest = text.split(">", 1)
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", head) + ">" + rest
    text = re.sub(r'\bid="([^"]+)"', rf'id="{key}-\1"', text)
    text = re.sub(r"url\(#([^)]+)\)", rf"url(#{key}-\1)", text)
    text = re.sub(r'href="#([^"]+)"', rf'href="#{key}-\1"', text)
    return text.replace("<svg ", f"<svg role='img' aria-label='{_e(label)}' ", 1)


def _figure(fid: str, caption: str, draw: Callable[[], Figure | None], why: str) -> str:
    """A <figure> holding the drawn SVG, or a "not available" note when draw has no data."""
    fig = draw()
    body = _svg(fig, fid, caption) if fig is not None else _missing(why)
    return f"<figure id='{fid}'>{body}<figcaption>{_e(caption)}</figcaption></figure>"


def _style(ax: Any) -> None:
    """Light grid and no top/right spines."""
    ax.grid(True, color="#e3e7ec", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _fig_contribution(study: Mapping[str, Any]) -> Figure | None:
    """Figure 1: mean cosine similarity per sublayer, attention and FFN over block index."""
    subs = _get(study, "contribution", "sublayers")
    if not isinstance(subs, Sequence):
        return None
    series: dict[str, list[tuple[float, float]]] = {"attn": [], "ffn": []}
    for s in subs:
        b, c = _num(_get(s, "block")), _num(_get(s, "mean_cosine"))
        if b is not None and c is not None and _get(s, "kind") in series:
            series[_get(s, "kind")].append((b, c))
    if not any(series.values()):
        return None
    fig = Figure(figsize=(10, 3.8))
    ax = fig.add_subplot()
    for kind, color, label in (("attn", "#1f6fb4", "attention"), ("ffn", "#7f7f7f", "FFN")):
        pts = sorted(series[kind])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, ms=4, lw=1.4,
                    label=label)
    gamma = _num(_get(study, "contribution", "gamma"))
    if gamma is not None:
        ax.axhline(gamma, color="#c5221f", ls="--", lw=1.2, label=f"γ = {gamma:g}")
    ax.set_xlabel("block index")
    ax.set_ylabel("mean cosine similarity (input, output)")
    _style(ax)
    ax.legend(frameon=False, loc="lower center", ncols=3)
    return fig


def _fig_latency_size(uniform: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Figure 2: latency against size for the uniform types, each annotated with its name."""
    pts = []
    for u in uniform:
        mem, lat = _num(_get(u, "measured", "memory_bytes")), _num(_get(u, "measured",
                                                                        "latency_ms"))
        if mem is not None and lat is not None:
            sd = _num(_get(u, "measured", "latency_std_ms")) or 0.0
            pts.append((mem / 2**20, lat, sd, str(u.get("type") or u.get("name"))))
    if not pts:
        return None
    pts.sort()
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color="#b8c2cc", lw=1, zorder=1)
    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="s",
                color="#1d232b", ms=6, capsize=3, zorder=2)
    for x, y, _, name in pts:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 7), fontsize=10)
    ax.set_xlabel("model size (MiB)")
    ax.set_ylabel("latency (ms/token)")
    ax.margins(x=0.12, y=0.2)
    _style(ax)
    return fig


def _fig_bpw(models: Sequence[Mapping[str, Any]],
             uniform: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Figure 5: mean bpw per category with min-max bars, uniform types as dashed lines."""
    stats = average_bpw_by_category(models)
    if not stats:
        return None
    fig = Figure(figsize=(7.5, 4.4))
    ax = fig.add_subplot()
    cats = list(stats)
    for i, c in enumerate(cats):
        s = stats[c]
        color = CATEGORY_COLORS.get(c, "#888888")
        ax.errorbar([i], [s["mean"]], yerr=[[s["mean"] - s["min"]], [s["max"] - s["mean"]]],
                    fmt="o", color=color, ms=9, capsize=7, lw=2, zorder=3)
        jitter = np.linspace(-0.12, 0.12, len(s["values"])) if len(s["values"]) > 1 else [0.0]
        ax.scatter(i + 0.25 + np.asarray(jitter), s["values"], s=12, color=color, alpha=0.55,
                   zorder=2)
    trans = ax.get_yaxis_transform()
    for u in uniform:
        bpw = _num(u.get("bpw"))
        if bpw is not None:
            ax.axhline(bpw, color="#c5221f", ls="--", lw=1, alpha=0.7, zorder=1)
            ax.text(1.01, bpw, str(u.get("type") or u.get("name")), transform=trans,
                    va="center", fontsize=9, color="#c5221f")
    ax.set_xticks(range(len(cats)), [f"APreQEL-{c}" for c in cats])
    ax.set_xlim(-0.5, len(cats) - 0.3)
    ax.set_ylabel("average bits per weight")
    _style(ax)
    return fig


def _points(entries: Sequence[Mapping[str, Any]], keys: Sequence[str], where: str = "measured",
            scale: Mapping[str, float] | None = None) -> list[tuple[int, tuple[float, ...]]]:
    """(index, values) of entries having every key finite in `where`, memory in MiB."""
    out = []
    for i, e in enumerate(entries):
        vals = [_num(_get(e, where, k)) for k in keys]
        if all(v is not None for v in vals):
            out.append((i, tuple(v / 2**20 if k.startswith("memory") else v
                                 for v, k in zip(vals, keys, strict=True))))
    return out


def _front2d(pts: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated points of a 2-D minimisation, sorted by the first objective."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(pts):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def _scatter_sets(ax: Any, study: Mapping[str, Any], keys: Sequence[str],
                  uniform: Sequence[Mapping[str, Any]],
                  models: Sequence[Mapping[str, Any]]) -> list[tuple[float, ...]]:
    """Draw uniform (squares) and models (dots by category, non-dominated ringed) on ax."""
    fu = _flags(study, "uniform", len(uniform))
    fm = _flags(study, "models", len(models))
    allpts: list[tuple[float, ...]] = []
    for cat, color in [*CATEGORY_COLORS.items(), (None, "#888888")]:
        sel = [(i, p) for i, p in _points(models, keys)
               if (models[i].get("category") == cat
                   or (cat is None and models[i].get("category") not in CATEGORY_COLORS))]
        if not sel:
            continue
        allpts += [p for _, p in sel]
        label = f"APreQEL-{cat}" if cat else "APreQEL (other)"
        for nd in (True, False):
            part = [p for i, p in sel if (fm[i] is True) == nd]
            if not part:
                continue
            ax.scatter(*zip(*part, strict=True), s=36 if nd else 26, color=color,
                       edgecolors="#000000" if nd else color, linewidths=1.4 if nd else 0.0,
                       alpha=1.0 if nd else 0.45, label=label, zorder=3 if nd else 2)
            label = None
    upts = _points(uniform, keys)
    if upts:
        allpts += [p for _, p in upts]
        cols = list(zip(*[p for _, p in upts], strict=True))
        edges = ["#c5221f" if fu[i] else "#1d232b" for i, _ in upts]
        ax.scatter(*cols, s=52, marker="s", color="#ffffff", edgecolors=edges, linewidths=1.8,
                   label="uniform", zorder=4)
        for i, p in upts:
            name = str(uniform[i].get("type") or uniform[i].get("name"))
            if len(p) == 3:
                ax.text(*p, f"  {name}", fontsize=8, color="#1d232b")
            else:
                ax.annotate(name, p, textcoords="offset points", xytext=(5, 5), fontsize=8)
    return allpts


def _fig_pareto3d(study: Mapping[str, Any], uniform: Sequence[Mapping[str, Any]],
                  models: Sequence[Mapping[str, Any]]) -> Figure | None:
    """3-D scatter of (memory, latency, ppl): uniform vs APreQEL, non-dominated highlighted."""
    keys = ("memory_bytes", "latency_ms", "ppl")
    if not _points(uniform, keys) and not _points(models, keys):
        return None
    fig = Figure(figsize=(8.5, 6.4))
    ax = fig.add_subplot(projection="3d")
    _scatter_sets(ax, study, keys, uniform, models)
    ax.set_xlabel("memory (MiB)")
    ax.set_ylabel("latency (ms/token)")
    ax.set_zlabel("PPL", labelpad=8)
    ax.view_init(elev=22, azim=-58)
    ax.legend(frameon=False, loc="center left", bbox_to_anchor=(1.16, 0.5), fontsize=9)
    return fig


def _fig_pareto2d(study: Mapping[str, Any], uniform: Sequence[Mapping[str, Any]],
                  models: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Three pairwise 2-D projections with the 2-D non-dominated front of the union."""
    pairs = [("memory_bytes", "latency_ms"), ("memory_bytes", "ppl"), ("latency_ms", "ppl")]
    if not any(_points(uniform, p) or _points(models, p) for p in pairs):
        return None
    fig = Figure(figsize=(13.5, 4.4))
    axes = fig.subplots(1, 3)
    for ax, (kx, ky) in zip(axes, pairs, strict=True):
        pts = _scatter_sets(ax, study, (kx, ky), uniform, models)
        front = _front2d([(p[0], p[1]) for p in pts])
        if len(front) > 1:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="#5d6773",
                    ls="--", lw=1, zorder=2, label="2-D front (union)")
        ax.set_xlabel(_label(kx).replace("Memory", "memory").replace("Latency", "latency"))
        ax.set_ylabel(_label(ky).replace("Latency", "latency"))
        _style(ax)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncols=len(labels), frameon=False,
                   bbox_to_anchor=(0.5, -0.04))
    fig.subplots_adjust(wspace=0.28, bottom=0.2)
    return fig


def _fig_pred_meas(models: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Predicted vs measured memory, latency and ppl, with the y = x line and the mean error."""
    keys = ("memory_bytes", "latency_ms", "ppl")
    have = [(k, [(i, p, m) for i, e in enumerate(models)
                 if (p := _num(_get(e, "predicted", k))) is not None
                 and (m := _num(_get(e, "measured", k))) is not None]) for k in keys]
    if not any(v for _, v in have):
        return None
    fig = Figure(figsize=(13.5, 4.4))
    axes = fig.subplots(1, 3)
    for ax, (k, vals) in zip(axes, have, strict=True):
        div = 2**20 if k == "memory_bytes" else 1.0
        _style(ax)
        ax.set_xlabel(f"predicted {_label(k)}")
        ax.set_ylabel(f"measured {_label(k)}")
        if not vals:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="#5d6773")
            continue
        colors = [CATEGORY_COLORS.get(str(models[i].get("category")), "#888888")
                  for i, _, _ in vals]
        xs, ys = [p / div for _, p, _ in vals], [m / div for _, _, m in vals]
        ax.scatter(xs, ys, s=30, c=colors, alpha=0.85, zorder=3)
        lo, hi = min(xs + ys), max(xs + ys)
        if k == "memory_bytes":
            ex = [(e / div, m / div) for i, _, m in vals
                  if (e := _num(_get(models[i], "predicted", "memory_bytes_exact"))) is not None]
            if ex:
                ax.scatter(*zip(*ex, strict=True), s=30, marker="x", color="#1d232b", lw=1,
                           zorder=4)
                lo = min(lo, *(e for e, _ in ex))
                hi = max(hi, *(e for e, _ in ex))
                ax.legend(handles=[
                    Line2D([], [], marker="o", ls="", color="#888888",
                           label="paper estimate (colour: category)"),
                    Line2D([], [], marker="x", ls="", color="#1d232b",
                           label="exact tensor sizes")], frameon=False, fontsize=8,
                    loc="upper left")
        pad = (hi - lo) * 0.06 or abs(hi) * 0.01 or 1.0
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="#c5221f", lw=1, ls="--",
                zorder=2)
        mape = sum(abs(m - p) / abs(m) for _, p, m in vals if m) / len(vals)
        ax.set_title(f"{UNIT[k][0]}: mean |error| {100 * mape:.2f}%", fontsize=11)
    fig.subplots_adjust(wspace=0.3)
    return fig


def _figures(study: Mapping[str, Any], uniform: Sequence[Mapping[str, Any]],
             models: Sequence[Mapping[str, Any]]) -> str:
    """All figures, each an inline SVG, or a note when its data is missing."""
    gamma = _num(_get(study, "contribution", "gamma"))
    text = _get(study, "contribution", "text")
    figs = [
        _figure("fig-contribution",
                "Figure 1 analogue: mean cosine similarity between the input and output hidden "
                "states of each sublayer, attention and FFN, over the block index"
                + (f"; the dashed line is γ = {gamma:g}" if gamma is not None else "")
                + (f"; calibration text {text}." if text else "."),
                lambda: _fig_contribution(study), "No layer-contribution profile in this study."),
        _figure("fig-latency-size",
                "Figure 2 analogue: latency per generated token against model size for the "
                "uniform types (error bars: standard deviation over repetitions).",
                lambda: _fig_latency_size(uniform), "No uniform measurement yet."),
        _figure("fig-bpw",
                "Figure 5 analogue: average bits per weight of the APreQEL configurations per "
                "category (mean, min-max bar, individual configurations as small dots); dashed "
                "lines are the uniform types.",
                lambda: _fig_bpw(models, uniform), "No APreQEL configuration yet."),
        _figure("fig-pareto-3d",
                "Measured (memory, latency, PPL) of uniform types (squares, red edge when "
                "non-dominated) and APreQEL configurations (dots by category, black ring when "
                "non-dominated over uniform ∪ APreQEL).",
                lambda: _fig_pareto3d(study, uniform, models), "No measurement yet."),
        _figure("fig-pareto-2d",
                "Pairwise projections; rings mark points non-dominated in 3-D, the dashed "
                "staircase is the 2-D non-dominated front of the union in that projection.",
                lambda: _fig_pareto2d(study, uniform, models), "No measurement yet."),
        _figure("fig-pred-meas",
                "Predicted (paper §3.2.1 linear estimate; crosses: exact tensor sizes) against "
                "measured values for each APreQEL configuration; dashed line y = x.",
                lambda: _fig_pred_meas(models), "No APreQEL configuration measured yet."),
    ]
    return _section("figures", "Figures", "\n".join(figs))


def _footer(study: Mapping[str, Any]) -> str:
    """How to reproduce the study, and where the time went."""
    cmd = study.get("command")
    if isinstance(cmd, Sequence) and not isinstance(cmd, str):
        cmd = " ".join(str(c) for c in cmd)
    how = (f"<pre><code>{_e(cmd)}</code></pre>" if cmd else
           "<p>Run <code>apreqel study</code> on the same model file (check its SHA-256 above) "
           "with the protocol listed at the top of this page.</p>")
    t = study.get("timing") if isinstance(study.get("timing"), Mapping) else {}
    parts = [(lbl, _num(t.get(k))) for lbl, k in (("total", "total_s"),
                                                   ("uniform measurements", "measure_uniform_s"),
                                                   ("building", "build_s"),
                                                   ("configuration measurements",
                                                    "measure_models_s"))]
    timing = ", ".join(f"{lbl} {v / 60:.1f} min" for lbl, v in parts if v is not None)
    version = study.get("apreqel_version")
    return (f"<footer id='footer' class=page><h2>How to reproduce</h2>{how}"
            f"<p class=note>Study time: {_e(timing or DASH)}. Generated by apreqel "
            f"{_e(version)}; this page is self-contained and works offline.</p></footer>")


def render_report(study: Mapping[str, Any], /) -> str:
    """One self-contained offline HTML page (inline CSS and SVG) presenting a study dict."""
    study = study if isinstance(study, Mapping) else {}
    uniform, models = _entries(study, "uniform"), _entries(study, "models")
    title = _get(study, "model", "name") or "study"
    body = "\n".join([
        _header(study),
        _nav(),
        "<main>",
        _summary(study, len(uniform), models),
        _uniform(study, uniform),
        _models(study, models),
        _robustness(study, models),
        _figures(study, uniform, models),
        "</main>",
        _footer(study),
    ])
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>APreQEL report — {_e(title)}</title><style>{CSS}</style></head>"
            f"<body>\n{body}\n</body></html>\n")

"""Tests of the self-contained HTML report, including a headless Chromium render."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from apreqeld.study.report import render_report
from study_fixture import make_study

SECTIONS = ("header", "summary", "uniform", "models", "robustness", "figures", "footer")
FIGURES = ("fig-contribution", "fig-latency-size", "fig-bpw", "fig-pareto-3d", "fig-pareto-2d",
           "fig-pred-meas")


@pytest.fixture(scope="module")
def study() -> dict:
    """The full 28-configuration synthetic study."""
    return make_study()


@pytest.fixture(scope="module")
def page(study: dict) -> str:
    """The report of the full study (rendered once: figures take a few seconds)."""
    return render_report(study)


def _ids(text: str) -> list[str]:
    """Every id attribute of a document."""
    return re.findall(r"""\sid=['"]([^'"]+)['"]""", text)


def test_sections_in_order(page: str) -> None:
    ids = _ids(page)
    for sid in (*SECTIONS, *FIGURES):
        assert sid in ids, sid
    assert [ids.index(s) for s in SECTIONS] == sorted(ids.index(s) for s in SECTIONS)


def test_ids_are_unique(page: str) -> None:
    ids = _ids(page)
    assert len(ids) == len(set(ids))


def test_every_model_and_type_is_listed(study: dict, page: str) -> None:
    for m in study["models"]:
        assert f">{m['name']}<" in page
    for u in study["uniform"]:
        assert f">{u['type']}<" in page
    assert page.count("same plan as") == sum(1 for m in study["models"] if m["same_as"])


def test_six_inline_svg_figures(page: str) -> None:
    assert page.count("<svg") == 6
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page


def test_no_network_resource(page: str) -> None:
    assert not re.search(r"""(src|href|action)\s*=\s*['"]?\s*(https?:)?//""", page, re.I)
    assert not re.search(r"url\(\s*['\"]?\s*(https?:)?//", page, re.I)
    assert "@import" not in page and "<script" not in page.lower()
    assert "http://" not in page and "https://" not in page


def test_header_and_summary_content(study: dict, page: str) -> None:
    for text in ("SmolLM2-135M-Instruct", "F16 (dequantized from Q4_1)", "wiki.test.raw",
                 "10,240 tokens scored", "5 repetitions", "kept at q8_0",
                 "2025-11-23T14:39:00+00:00", study["device"]["gpu"]):
        assert text in page, text
    hv = study["hypervolume"]["ppl"]
    assert f"{hv['hv_uniform']:.4f}" in page and f"{hv['hv_apreqel']:.4f}" in page
    assert f"{100 * hv['gain']:+.2f}%" in page
    assert "enlarge the hypervolume" in page
    assert study["command"] in page


def test_number_formats(study: dict, page: str) -> None:
    q8 = study["uniform"][0]["measured"]
    assert f"{q8['memory_bytes'] / 2**20:,.1f}" in page
    assert f"{q8['latency_ms']:.2f}" in page
    assert f"{q8['ppl']:.3f}" in page and f"{q8['kld']:.4f}" in page


def test_compact_distribution() -> None:
    s = make_study(3)
    s["models"][0]["distribution"] = {"q8_0": 4, "q6_K": 20, "q5_K": 0, "q4_K": 36, "q3_K": 0}
    assert "q8_0×4 q6_K×20 q4_K×36" in render_report(s)


def test_robustness_check_marks(study: dict) -> None:
    s = copy.deepcopy(study)
    s["robustness"]["best"]["latency_ms"].update(category="Fairness", ok=False)
    html = render_report(s)
    section = html[html.index("id='robustness'"):html.index("id='figures'")]
    assert section.count("class=bad>✗") == 1 and section.count("class=ok>✓") == 2
    assert "2 of 3 metrics" in section


def test_script_in_name_is_escaped() -> None:
    s = make_study(4)
    s["models"][1]["name"] = "<script>alert(1)</script>"
    s["models"][2]["same_as"] = "<script>alert(1)</script>"
    s["model"]["name"] = "evil<img src=x onerror=alert(1)>"
    html = render_report(s)
    assert "<script" not in html and "<img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_empty_study_renders() -> None:
    html = render_report({})
    for sid in SECTIONS:
        assert f"id='{sid}'" in html
    assert "<svg" not in html and "—" in html
    assert "No APreQEL configuration" in html


def test_renders_with_missing_pieces(study: dict) -> None:
    s = copy.deepcopy(study)
    del s["contribution"], s["command"], s["robustness"], s["pareto"], s["timing"]
    del s["hypervolume"]["kld"]
    s["device"]["gpu"] = None
    s["models"][0]["measured"] = None
    s["models"][1]["measured"]["ppl"] = None
    s["models"][2]["predicted"] = {}
    s["models"][3].pop("distribution")
    s["uniform"][0]["measured"]["kld"] = float("nan")
    html = render_report(s)
    assert "id='fig-contribution'" in html and "No layer-contribution profile" in html
    assert html.count("<svg") == 5
    assert "no GPU" in html and "Run <code>apreqel study</code>" in html
    assert "Best configuration per metric" in html  # robustness recomputed from the models
    for m in s["models"]:
        assert f">{m['name']}<" in html


def test_no_models_yet(study: dict) -> None:
    s = copy.deepcopy(study)
    s["models"], s["robustness"], s["hypervolume"] = [], None, {}
    s["pareto"]["models"] = []
    html = render_report(s)
    assert "No APreQEL configuration yet." in html
    assert "No robustness analysis available yet." in html
    assert html.count("<svg") == 4  # contribution, latency-size, 3-D and 2-D Pareto (uniform)


def _chromium() -> str:
    """Path of Chromium; skip locally when absent, fail in CI (CI=true) when absent."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists()
                                        else None)
    if path:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is required in CI (apt-get install -y chromium)")
    pytest.skip("chromium not installed (apt-get install -y chromium); required when CI=true")


@pytest.mark.browser
def test_renders_in_headless_chromium(page: str, tmp_path: Path) -> None:
    chromium = _chromium()
    report = tmp_path / "report.html"
    report.write_text(page, encoding="utf-8")
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", report.as_uri()], capture_output=True, text=True,
                         timeout=180, check=True).stdout
    assert dom.count("<table") >= 5
    assert dom.count("<svg") == 6
    for sid in (*SECTIONS, *FIGURES):
        assert re.search(rf"""id=["']{sid}["']""", dom), sid
    shot = tmp_path / "report.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,4000", report.as_uri()],
                   capture_output=True, timeout=180, check=True)
    assert shot.exists() and shot.stat().st_size > 100_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_margin_label_follows_the_study_and_undefined_gain_is_said() -> None:
    """The moved reference point is labelled with the study's own margin, and a uniform set
    without volume gives an "undefined" gain, not a percentage."""
    study = make_study(3)
    hv = copy.deepcopy(study["hypervolume"]["ppl"])
    study["hypervolume"]["ppl+margin"] = hv | {"margin": 0.25}
    study["hypervolume"]["kld"] |= {"hv_uniform": 0.0, "gain": None, "gain_union": None}
    page = render_report(study)
    assert "reference point +25%" in page and "reference point +10%" not in page
    assert "undefined" in page and "-100.00%" not in page

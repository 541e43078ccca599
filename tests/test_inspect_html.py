"""The HTML report: self-contained, with the site table, plan, NFN heatmap, pass trace with
collapsible diffs and inline SVG pictures (drawn by Graphviz or by the pure-Python layout);
rendered in real headless Debian chromium.

Playwright drives the system chromium (`executable_path`), so no browser is downloaded.
"""

import os
import re
import shutil

import pytest
from playwright.sync_api import sync_playwright

import peftc
from peftc.inspect.report import html_report, write_report
from tests.models import perturb, tiny_llama, token_inputs
from tests.pictures import ENGINES, read_svg, use_engine

SPEC = {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj", "down_proj"], "rank": 4}]}
CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
PICTURED = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.mlp.down_proj",
]


@pytest.fixture(scope="module")
def adapted():
    out = peftc.compile(tiny_llama(), SPEC, token_inputs())
    perturb(out.trainable_parameters())
    return out


@pytest.fixture(scope="module", params=ENGINES)
def report(request, adapted, tmp_path_factory):
    """(engine, path) of the report, its pictures laid out by that engine."""
    with pytest.MonkeyPatch.context() as mp:
        use_engine(mp, request.param)
        path = tmp_path_factory.mktemp(f"report-{request.param}") / "report.html"
        write_report(adapted, path)
    return request.param, path


def test_report_is_self_contained_and_complete(adapted, report):
    engine, path = report
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    # nothing to fetch: no scripts, stylesheets, images or frames, no URLs in attributes
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b", text, re.I)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text, re.I)
    assert not re.search(r"url\(", text, re.I)
    rows = re.findall(r'<tr class="site (adapted|unadapted)" data-path="([^"]+)"', text)
    assert [p for _, p in rows] == [s.path for s in adapted.sites]
    assert {p for cls, p in rows if cls == "adapted"} == {a.path for a in adapted.plan}
    modified = [r for r in adapted.pass_trace(diffs=True) if r.diff]
    assert len(re.findall(r'<details class="diff"', text)) == len(modified)
    # one picture per kind of adapter: q_proj, v_proj, down_proj
    figures = re.findall(
        r'<figure data-site="([^"]+)"><figcaption>[^<]*</figcaption>(<svg.*?</svg>)</figure>',
        text,
        re.S,
    )
    assert [site for site, _ in figures] == PICTURED
    program = adapted.program()
    for site, svg in figures:
        pic = read_svg(svg)
        assert pic.layout == engine
        assert pic.legend is None  # the page's legend, above the pictures, serves them all
        spliced = {
            n.name for n in program.graph.nodes if n.meta.get("peftc", {}).get("sites") == (site,)
        }
        assert spliced and spliced <= set(pic.nodes)
        assert all(pic.nodes[n].get("data-peftc-role") == "adapter" for n in spliced)
        assert site in pic.clusters
    assert text.count('<p class="legend">') == 1
    assert len(re.findall(r'<details class="explain"', text)) == len(adapted.plan)
    assert "No NFN scores were computed" in text


def test_nfn_heatmap_when_scores_exist(adapted, monkeypatch):
    scores = {s.path: 1.0 + i / 10 for i, s in enumerate(adapted.sites) if s.op == "linear"}
    types = {}
    for s in adapted.sites:
        if s.path in scores:
            types.setdefault(s.module_type, []).append(scores[s.path])
    monkeypatch.setattr(adapted.plan, "site_scores", scores)
    monkeypatch.setattr(adapted.plan, "type_scores", {t: sum(v) / len(v) for t, v in types.items()})
    text = html_report(adapted, pictures=[])
    heat = text[text.index('<table id="nfn-heatmap">') :]
    heat = heat[: heat.index("</table>")]
    cells = re.findall(r'<td class="heat( chosen)?" style="background:rgb\(', heat)
    assert len(cells) == len(scores)
    assert sum(1 for c in cells if c) == len(adapted.plan)  # adapted sites are outlined
    lowest = min(scores, key=scores.get)
    assert f'title="{lowest}">{scores[lowest]:.2f}<' in heat
    assert 'style="background:rgb(253,231,37);color:#000" title="' + lowest in heat  # yellow
    highest = max(scores, key=scores.get)
    assert 'style="background:rgb(68,1,84);color:#fff" title="' + highest in heat  # purple


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian chromium is not installed (apt-get install chromium); CI installs it",
)
def test_report_renders_in_headless_chromium(adapted, report, tmp_path):
    engine, path = report
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 2400})
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.as_uri())
            seen = page.evaluate(
                """() => ({
                rows: document.querySelectorAll('#sites tbody tr').length,
                adapted: [...document.querySelectorAll('#sites tr.adapted')].map(r => r.dataset.path),
                passes: document.querySelectorAll('#passes tbody tr').length,
                svgs: [...document.querySelectorAll('#pictures figure svg')].map(
                    s => s.getBoundingClientRect().width),
                layouts: [...document.querySelectorAll('#pictures figure svg')].map(
                    s => s.dataset.peftcLayout),
                adapterShapes: [...document.querySelectorAll('#pictures figure')].map(f =>
                    f.querySelectorAll('svg [fill="#f28e2b"], svg [fill="#4e79a7"]').length),
                diffShown: document.querySelector('details.diff pre').checkVisibility(),
            })"""
            )
            assert seen["rows"] == len(adapted.sites)
            assert seen["adapted"] == [a.path for a in adapted.plan]
            assert seen["passes"] == len(adapted.pass_records)
            assert len(seen["svgs"]) == 3 and all(w > 100 for w in seen["svgs"])
            assert seen["layouts"] == [engine] * 3
            # each picture draws (at least) its own site's adapter and fused nodes in colour
            own = [
                sum(
                    1
                    for n in adapted.program().graph.nodes
                    if site in n.meta.get("peftc", {}).get("sites", ())
                )
                + 2  # lora_A and lora_B placeholders
                for site in PICTURED
            ]
            assert all(s >= n for s, n in zip(seen["adapterShapes"], own, strict=True))
            assert seen["diffShown"] is False  # diffs start collapsed ...
            _screenshot(page, tmp_path / "report-top.png")
            page.evaluate("document.getElementById('pictures').scrollIntoView()")
            _screenshot(page, tmp_path / "report-pictures.png")
            opened = page.evaluate(
                "() => { const d = document.querySelector('details.diff'); d.open = true;"
                " return d.querySelector('pre').checkVisibility(); }"
            )
            assert opened is True  # ... and open on demand
            assert requests == [path.as_uri()]  # the page fetched nothing else
        finally:
            browser.close()


def _screenshot(page, path) -> None:
    png = page.screenshot(path=path)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_report_file_is_written_whole_or_not_at_all(adapted, tmp_path):
    with pytest.raises(FileNotFoundError, match="folder .*missing does not exist"):
        write_report(adapted, tmp_path / "missing" / "r.html", pictures=[])
    path = write_report(adapted, tmp_path / "r.html", pictures=[])
    assert path.read_text().rstrip().endswith("</html>")
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temporary file left over
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask

"""The HTML report: self-contained, with the site table, plan, NFN heatmap, pass trace with
collapsible diffs and inline SVG pictures; rendered in real headless Debian chromium.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: NUL-ended
JSON messages on fds 3 and 4), so the test needs no browser download and no extra package.
"""

import base64
import fcntl
import json
import os
import re
import shutil
import subprocess

import pytest

import peftc
from peftc.inspect.report import html_report, write_report
from tests.models import perturb, tiny_llama, token_inputs

SPEC = {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj", "down_proj"], "rank": 4}]}
CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def adapted():
    out = peftc.compile(tiny_llama(), SPEC, token_inputs())
    perturb(out.trainable_parameters())
    return out


@pytest.fixture(scope="module")
def report(adapted, tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.html"
    write_report(adapted, path)
    return path


def test_report_is_self_contained_and_complete(adapted, report):
    text = report.read_text()
    assert text.startswith("<!DOCTYPE html>")
    # nothing to fetch: no scripts, stylesheets, images or frames, no URLs in attributes
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b", text, re.I)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text, re.I)
    assert not re.search(r"url\(", text, re.I)
    rows = re.findall(r'<tr class="site (adapted|unadapted)" data-path="([^"]+)"', text)
    assert [p for _, p in rows] == [s.path for s in adapted.sites]
    assert {p for cls, p in rows if cls == "adapted"} == {a.path for a in adapted.plan}
    modified = [r for r in adapted.pass_records if r.diff]
    assert len(re.findall(r'<details class="diff"', text)) == len(modified)
    # one picture per kind of adapter: q_proj, v_proj, down_proj
    figures = re.findall(r'<figure data-site="([^"]+)"><figcaption>[^<]*</figcaption><svg', text)
    assert figures == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.mlp.down_proj",
    ]
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


class DevTools:
    """A minimal Chrome DevTools Protocol client over chromium's debugging pipe."""

    def __init__(self, profile: str):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire_fds():  # chromium reads commands on fd 3 and writes replies on fd 4
            a = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        flags = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank",
        ]  # fmt: skip
        # close_fds=False keeps fds 3 and 4, set up after fork; every other fd Python opens
        # is non-inheritable, so nothing else leaks into the browser
        self.proc = subprocess.Popen(
            [CHROMIUM, *flags],
            close_fds=False,
            preexec_fn=wire_fds,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._id = 0
        self.events: list[dict] = []

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_child, 1 << 16)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe (exit {self.proc.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, event: str) -> dict:
        while True:
            for e in self.events:
                if e.get("method") == event:
                    return e
            self.events.append(self._read())

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except RuntimeError:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)


def _screenshot(browser: DevTools, session: str, path) -> None:
    shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
    png = base64.b64decode(shot["data"])
    path.write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian chromium is not installed (apt-get install chromium); CI installs it",
)
def test_report_renders_in_headless_chromium(adapted, report, tmp_path):
    browser = DevTools(str(tmp_path / "profile"))
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})
        session = browser.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )["sessionId"]
        browser.send("Page.enable", session=session)
        browser.send("Network.enable", session=session)
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 2400, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        browser.send("Page.navigate", {"url": report.as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        probe = """JSON.stringify({
            rows: document.querySelectorAll('#sites tbody tr').length,
            adapted: [...document.querySelectorAll('#sites tr.adapted')].map(r => r.dataset.path),
            passes: document.querySelectorAll('#passes tbody tr').length,
            svgs: [...document.querySelectorAll('#pictures figure svg')].map(
                s => s.getBoundingClientRect().width),
            adapterShapes: [...document.querySelectorAll('#pictures figure')].map(f =>
                f.querySelectorAll('svg [fill="#f28e2b"], svg [fill="#4e79a7"]').length),
            diffShown: document.querySelector('details.diff pre').checkVisibility(),
        })"""
        result = browser.send(
            "Runtime.evaluate", {"expression": probe, "returnByValue": True}, session=session
        )
        seen = json.loads(result["result"]["value"])
        assert seen["rows"] == len(adapted.sites)
        assert seen["adapted"] == [a.path for a in adapted.plan]
        assert seen["passes"] == len(adapted.pass_records)
        assert len(seen["svgs"]) == 3 and all(w > 100 for w in seen["svgs"])
        # each picture draws (at least) its own site's adapter and fused nodes in colour
        own = [
            sum(
                1
                for n in adapted.program().graph.nodes
                if path in n.meta.get("peftc", {}).get("site", "").split(",")
            )
            + 2  # lora_A and lora_B placeholders
            for path in (
                "model.layers.0.self_attn.q_proj",
                "model.layers.0.self_attn.v_proj",
                "model.layers.0.mlp.down_proj",
            )
        ]
        assert all(s >= n for s, n in zip(seen["adapterShapes"], own, strict=True))
        assert seen["diffShown"] is False  # diffs start collapsed ...
        _screenshot(browser, session, tmp_path / "report-top.png")
        browser.send(
            "Runtime.evaluate",
            {"expression": "document.getElementById('pictures').scrollIntoView()"},
            session=session,
        )
        _screenshot(browser, session, tmp_path / "report-pictures.png")
        opened = browser.send(
            "Runtime.evaluate",
            {
                "expression": "const d = document.querySelector('details.diff'); d.open = true;"
                " d.querySelector('pre').checkVisibility()",
                "returnByValue": True,
            },
            session=session,
        )
        assert opened["result"]["value"] is True  # ... and open on demand
        requests = [
            e["params"]["request"]["url"]
            for e in browser.events
            if e.get("method") == "Network.requestWillBeSent"
        ]
        assert requests == [report.as_uri()]  # the page fetched nothing else
    finally:
        browser.close()


def test_report_file_is_written_whole_or_not_at_all(adapted, tmp_path):
    with pytest.raises(FileNotFoundError, match="folder .*missing does not exist"):
        write_report(adapted, tmp_path / "missing" / "r.html", pictures=[])
    path = write_report(adapted, tmp_path / "r.html", pictures=[])
    assert path.read_text().rstrip().endswith("</html>")
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temporary file left over
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask

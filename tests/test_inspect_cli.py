"""`peftc inspect` end to end: JSON with sort and filter, the text table and trace with diffs,
pictures around a site (SVG by Graphviz or the pure-Python layout, PNG by Graphviz), the HTML
report, --explain, and clear errors for bad flags."""

import json
import re

import pydot
import pytest

from peftc.cli import main
from tests.pictures import ENGINES, read_svg, use_engine

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pydot.dot_parser")

MODEL = "tests.models:tiny_llama"
SPEC = """adapters:
  - method: lora
    targets: ["q_proj", "v_proj"]
    rank: 4
  - method: lora
    targets: ["*.mlp.down_proj"]
    rank: 2
"""


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "spec.yaml"
    path.write_text(SPEC)
    return str(path)


def _run(capsys, *argv):
    rc = main(["inspect", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_sorted_and_filtered(capsys, spec):
    rc, out, _ = _run(
        capsys,
        "--model",
        MODEL,
        "--spec",
        spec,
        "--json",
        "--sort=-params",
        "--filter",
        "*.layers.1.*",
    )
    assert rc == 0
    data = json.loads(out)
    assert [s["path"] for s in data["sites"]] == [
        "model.layers.1.self_attn.q_proj",  # 4·(64+64) = 512
        "model.layers.1.self_attn.v_proj",  # 4·(64+32) = 384
        "model.layers.1.mlp.down_proj",  # 2·(96+64) = 320
    ]
    assert [s["params"] for s in data["sites"]] == [512, 384, 320]
    assert data["trainable_parameters"] == 2 * (512 + 384 + 320)
    assert [p["name"] for p in data["passes"]][0] == "insert_adapters"
    assert data["passes"][0]["rules"]["insert_adapter"]["matches"] == 6


@pytest.mark.parametrize("engine", ENGINES)
def test_table_trace_pictures_and_report(capsys, spec, tmp_path, monkeypatch, engine):
    use_engine(monkeypatch, engine)
    dot, svg, png, report = (tmp_path / f"g.{x}" for x in ("dot", "svg", "png", "html"))
    with_png = ["--png", str(png)] if engine == "graphviz" else []  # PNG needs Graphviz
    rc, out, err = _run(
        capsys, "--model", MODEL, "--spec", spec, "--diff", "--dot", str(dot), "--svg", str(svg),
        *with_png, "--around", "*.layers.1.self_attn.q_proj", "--radius", "1",
        "--html", str(report),
    )  # fmt: skip
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["path", "op", "in->out", "dtype"]
    assert sum(1 for line in lines if line.startswith("model.layers.")) == 6
    assert "6 of 16 sites adapted (lora); 2,432 trainable adapter parameters" in out
    assert "--- before insert_adapters" in out and "+++ after insert_adapters" in out
    graph = pydot.graph_from_dot_data(dot.read_text())[0]
    names = {n.get_name().strip('"') for n in graph.get_nodes()}
    assert "adapters_model_layers_1_self_attn_q_proj_lora_a" in names
    assert not any("layers_0" in n for n in names)  # radius 1 stays inside layer 1
    picture = read_svg(svg.read_text())
    assert picture.layout == engine
    assert set(picture.nodes) == names - {"node", "edge", "graph"}  # the same nodes as the DOT
    assert picture.legend is not None
    assert f"wrote {svg} (orange: adapter nodes" in err
    if engine == "graphviz":
        assert png.read_bytes()[:4] == b"\x89PNG"
    html = report.read_text()
    assert '<figure data-site="model.layers.1.self_attn.q_proj">' in html
    assert html.count("<figure ") == 1
    figure = re.search(r"<figure .*?</figure>", html, re.S)[0]
    assert f'data-peftc-layout="{engine}"' in figure
    assert f"wrote {report}" in err


def test_explain(capsys, spec):
    rc, out, _ = _run(
        capsys, "--model", MODEL, "--spec", spec, "--explain", "*.layers.0.self_attn.[qk]_proj"
    )
    assert rc == 0
    q, k = out.split("\n\nsite ")
    assert q.startswith("site model.layers.0.self_attn.q_proj")
    assert "formula (from the method's docstring):\n  LoRA: y = base(x)" in q
    assert "merged form (eval graph, adapters folded):" in q
    assert "matched adapters[0]" in q
    assert k.startswith("model.layers.0.self_attn.k_proj") and "why not adapted:" in k


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--around", "*.q_proj"],
            "--around picks what to draw; add --dot, --svg, --png or --html",
        ),
        (["--sort", "size"], "cannot sort by 'size'"),
        (["--radius", "-1", "--around", "q_proj", "--dot", "x.dot"], "--radius must be 0 or more"),
    ],
)
def test_bad_flags_fail_before_compiling(capsys, spec, flags, message):
    rc, out, err = _run(capsys, "--model", "no.such.module:factory", "--spec", spec, *flags)
    assert rc == 2 and out == ""
    assert message in err  # checked before the model is loaded (it does not exist)


def test_png_without_graphviz_prints_how_to_install(capsys, spec, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    rc, _, err = _run(
        capsys, "--model", "no.such.module:factory", "--spec", spec, "--png", str(tmp_path / "g.png"),
    )  # fmt: skip
    assert rc == 2  # before loading the model (it does not exist)
    assert "apt-get install graphviz" in err
    assert not (tmp_path / "g.png").exists()

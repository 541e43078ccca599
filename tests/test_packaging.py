"""Packaging promises: one onnxruntime distribution, the console script, the layout."""

from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_exactly_one_onnxruntime_distribution_is_installed():
    names = {d.metadata["Name"].lower() for d in metadata.distributions()}
    assert len(names & {"onnxruntime", "onnxruntime-gpu"}) == 1, sorted(
        n for n in names if "onnxruntime" in n
    )


def test_console_script_and_layout():
    entry = [e for e in metadata.entry_points(group="console_scripts") if e.name == "peftc"]
    assert entry and entry[0].value == "peftc.cli:main"
    for folder in (
        "rewrite",
        "passes",
        "lowering",
        "cost_model",
        "tests",
        "examples",
        "bench",
        "peftc",
        ".ci",
    ):
        assert (ROOT / folder).is_dir(), folder


def test_lower_layers_never_import_the_facade():
    for folder in ("rewrite", "passes", "lowering", "cost_model"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            assert "import peftc" not in text and "from peftc" not in text, path
    for path in (ROOT / "rewrite").rglob("*.py"):
        text = path.read_text()
        for other in ("passes", "lowering", "cost_model"):
            assert f"from {other}" not in text and f"import {other}" not in text, (path, other)

"""The README opens with the two commands, and CI runs exactly those lines."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_readme_first_block_has_two_lines_that_ci_runs():
    text = (ROOT / "README.md").read_text()
    block = text.split("```", 2)[1]
    lines = [line for line in block.strip("\n").splitlines() if line.strip()]
    assert len(lines) == 2, lines
    assert "torch==2.13.0" in lines[0] and "examples/" in lines[0]
    assert "pytest" in lines[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for line in lines:
        assert line in ci, f"{line!r} is not run by .ci/run"


def test_readme_methods_table_is_generated_from_the_registry():
    from peftc.methods_table import readme_block

    assert readme_block() in (ROOT / "README.md").read_text()


def test_methods_table_write_replaces_a_stale_table(tmp_path):
    from peftc.methods_table import BEGIN, END, readme_block, write_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"# intro\n\n{BEGIN}\n| stale |\n{END}\n\nafter\n")
    assert write_readme(readme) is True
    assert readme.read_text() == f"# intro\n\n{readme_block()}\n\nafter\n"
    assert write_readme(readme) is False
    readme.write_text("no table here")
    with pytest.raises(ValueError, match="no .*methods-table"):
        write_readme(readme)

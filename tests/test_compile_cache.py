"""Inductor's caches are keyed on the source of peftc's custom ops (lowering/compile_cache.py)."""

import re
from pathlib import Path

import torch

import peftc
from lowering.compile_cache import OP_MODULES, cache_key_tag, digest, ops_digest, salted
from lowering.inductor import compile_program
from tests.models import tiny_llama, token_inputs

ROOT = Path(__file__).resolve().parent.parent
REGISTERS_AN_OP = re.compile(r"""custom_op\(\s*["']peftc::|Library\(\s*["']peftc["']""")


def test_every_module_that_registers_a_peftc_op_salts_the_key():
    found = set()
    for folder in ("rewrite", "passes", "lowering", "cost_model", "peftc"):
        for path in (ROOT / folder).rglob("*.py"):
            if REGISTERS_AN_OP.search(path.read_text()):
                found.add(".".join(path.relative_to(ROOT).with_suffix("").parts))
    assert "passes.fused_loss" in found  # the scan itself finds what it looks for
    assert found == set(OP_MODULES)


def test_a_changed_op_source_changes_the_digest(tmp_path):
    ops = tmp_path / "ops.py"
    ops.write_text("def backward(g):\n    return g * 2\n")
    before = digest([ops])
    ops.write_text("def backward(g):\n    return g * 3\n")
    assert digest([ops]) != before
    assert len(ops_digest()) == 16


@torch.compiler.config.patch(cache_key_tag="")  # whatever the environment sets
def test_salted_calls_run_under_the_ops_tag_after_the_users_own():
    own = f"peftc-ops-{ops_digest()}"
    probe = salted(lambda: torch.compiler.config.cache_key_tag)
    assert torch.compiler.config.cache_key_tag == ""
    assert probe() == own
    with torch.compiler.config.patch(cache_key_tag="mine"):
        assert probe() == f"mine+{own}"
        assert salted(probe)() == f"mine+{own}"  # nested: the digest once
    assert torch.compiler.config.cache_key_tag == ""  # restored after each call
    assert cache_key_tag() == own


@torch.compiler.config.patch(cache_key_tag="")
def test_a_compiled_training_step_compiles_under_the_salted_tag(monkeypatch):
    adapted = peftc.compile(
        tiny_llama(layers=1),
        {"adapters": [{"method": "lora", "targets": ["*.q_proj"], "rank": 2}]},
        token_inputs(),
    )
    program = adapted.pipeline.program(training=True)
    seen = []

    def fake_compile(fn, **kwargs):
        return lambda *args: seen.append(torch.compiler.config.cache_key_tag)

    monkeypatch.setattr(torch, "compile", fake_compile)
    run = compile_program(program)
    run(*[None] * len(program.slots))
    assert seen == [f"peftc-ops-{ops_digest()}"]

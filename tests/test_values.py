"""Node values for inspect: one fake-tensor run gives every node (spliced adapter nodes, fused
nodes) a value in the trace's own size symbols, and a failed run changes nothing."""

import pytest
import torch

import peftc
from peftc.inspect.graph import FUSED, program_graph
from rewrite.program import USER_INPUT
from rewrite.values import refresh_values
from tests.models import tiny_gpt2, tiny_llama, token_inputs

TARGETS = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj", "*.gate_proj", "*.up_proj"]


def symbols(val) -> set[str]:
    if not isinstance(val, torch.Tensor):
        return set()
    return {
        str(s) for d in val.shape if isinstance(d, torch.SymInt) for s in d.node.expr.free_symbols
    }


def check_program(program) -> None:
    inputs = {s.name for s in program.slots if s.kind == USER_INPUT}
    allowed = set().union(
        *(symbols(n.meta["val"]) for n in program.graph.nodes if n.name in inputs)
    )
    assert allowed  # batch and sequence are symbolic
    tagged = [n for n in program.graph.nodes if n.meta.get("peftc")]
    assert tagged
    for node in tagged:
        assert isinstance(node.meta.get("val"), torch.Tensor | tuple | list), node.format_node()
    for node in program.graph.nodes:
        assert symbols(node.meta.get("val")) <= allowed, node.format_node()


@pytest.fixture(scope="module")
def llama():
    """LoRA on six module types of tiny Llama (fused siblings), training graph."""
    spec = {"adapters": [{"method": "lora", "targets": TARGETS, "rank": 4}]}
    return peftc.compile(tiny_llama(layers=1), spec, token_inputs()).train()


def test_spliced_and_fused_nodes_use_the_traces_symbols(llama):
    adapted = llama
    program = adapted.program(values=True)
    check_program(program)
    fused = [n for n, d in program_graph(program).nodes(data=True) if d["role"] == FUSED]
    assert fused and all(program_graph(program).nodes[n]["value"] for n in fused)


def test_flattened_rows_and_another_method():
    spec = {"adapters": [{"method": "vera", "targets": ["c_attn", "c_fc"], "rank": 4}]}
    adapted = peftc.compile(tiny_gpt2(), spec, token_inputs()).eval()
    check_program(adapted.program(values=True))


def test_a_failed_run_changes_no_node(llama):
    adapted = llama
    program = adapted.program(values=True)
    before = {n: n.meta.get("val") for n in program.graph.nodes}
    state = adapted.state()
    wrong = {k: (torch.zeros(7, 3) if "lora_A" in k else v) for k, v in state.items()}
    for node in program.graph.nodes:  # make the adapter placeholders take their value from state
        if node.op == "placeholder" and node.name.endswith("lora_a"):
            node.meta.pop("val", None)
            before[node] = None
    assert refresh_values(program, wrong) is False
    assert {n: n.meta.get("val") for n in program.graph.nodes} == before
    assert refresh_values(program, state) is True

"""The suite's shared traces (tests/shared_traces.py): a copy for a model built the same way, a
real export for any model that differs in what the graph could depend on."""

import torch

from rewrite.trace import trace
from tests.models import tiny_llama, token_inputs
from tests.shared_traces import SHARED


def _hit(model: torch.nn.Module, training: bool = False) -> bool:
    before = SHARED.hits
    trace(model, token_inputs(), training=training)
    return SHARED.hits == before + 1


def test_the_same_build_shares_a_copy_that_is_rewritten_alone():
    first = trace(tiny_llama(layers=1), token_inputs(), training=False)
    before = SHARED.hits
    second = trace(tiny_llama(layers=1), token_inputs(), training=False)
    assert SHARED.hits == before + 1
    assert second.graph_module.code == first.graph_module.code
    n_first = len(first.graph.nodes)
    x = next(iter(second.graph.nodes))
    with second.graph.inserting_after(x):  # a rewrite of the copy ...
        second.graph.call_function(torch.ops.aten.neg.default, (x,))
    second.slots.pop()
    assert len(first.graph.nodes) == n_first == len(second.graph.nodes) - 1  # ... alone
    assert len(first.slots) == len(second.slots) + 1


def test_a_model_that_differs_is_traced_again():
    trace(tiny_llama(layers=1), token_inputs(), training=False)
    changed_weight = tiny_llama(layers=1)
    with torch.no_grad():
        changed_weight.model.norm.weight.add_(1.0)
    assert not _hit(changed_weight)
    changed_eps = tiny_llama(layers=1)
    changed_eps.model.norm.variance_epsilon = 1e-2
    assert not _hit(changed_eps)
    assert not _hit(tiny_llama(layers=1, seed=3))  # other initial weights
    hooked = tiny_llama(layers=1)
    hooked.model.layers[0].register_forward_hook(lambda m, i, o: o)
    assert not _hit(hooked)
    assert _hit(tiny_llama(layers=1))  # and the original build still shares

"""Rules and passes on hand-built graphs of a few nodes, with no model: each rule's rewrite
and each reason it declines, and the pass manager's requires/ensures checks."""

import operator

import pytest
import torch
import torch.fx

from passes.cleanup import Cleanup
from passes.fuse import FuseSiblings, fold_scale
from rewrite.passes import PassConditionError, PassManager, PassResult
from rewrite.program import PARAMETER, USER_INPUT, Program, Slot

aten = torch.ops.aten
TAG = {"sites": ("s",), "method": "lora", "role": "adapter"}


def program(graph: torch.fx.Graph, params: list[str], training: bool = True) -> Program:
    """A Program over `graph` whose placeholders `params` (lower case, as fx names them) are
    adapter parameters and `x` the input."""
    slots = [Slot(PARAMETER, p, f"adapters.{p}") for p in params] + [Slot(USER_INPUT, "x", "x")]
    return Program(
        torch.fx.GraphModule(torch.nn.Module(), graph),
        slots,
        ["x"],
        None,
        None,
        [],
        {},
        {},
        training,
    )


def placeholders(g: torch.fx.Graph, *names: str) -> list[torch.fx.Node]:
    return [g.placeholder(n) for n in names]


def tagged(node: torch.fx.Node, val: torch.Tensor | None = None, **extra) -> torch.fx.Node:
    node.meta["peftc"] = {**TAG, **extra}
    if val is not None:
        node.meta["val"] = val
    return node


def run(p: Program, *args: torch.Tensor) -> torch.Tensor:
    return p.graph_module(*args)


def scaled_lora(scale, shapes: bool = False) -> Program:
    """base + linear(linear(x, A), B) * scale, tagged as an adapter; with `shapes`, the two
    matmuls carry their traced values (x [3, 5], rank 2), as an inserted snippet's do."""
    g = torch.fx.Graph()
    A, B, s, x = placeholders(g, "a", "b", "s", "x")
    base = g.call_function(aten.relu.default, (x,))
    h = tagged(g.call_function(aten.linear.default, (x, A)), torch.empty(3, 2) if shapes else None)
    up = tagged(g.call_function(aten.linear.default, (h, B)), torch.empty(3, 5) if shapes else None)
    mul = tagged(g.call_function(aten.mul.Tensor, (up, s if scale == "tensor" else scale)))
    g.output(tagged(g.call_function(aten.add.Tensor, (base, mul)), output=True))
    return program(g, ["a", "b", "s"])


def tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 5, generator=g),
        torch.randn(5, 2, generator=g),
        torch.randn(3, 5, generator=g),
    )


def test_fold_scale_moves_a_constant_scale_into_the_add():
    p = scaled_lora(0.5)
    A, B, x = tensors()
    expected = run(p, A, B, torch.tensor(0.5), x)
    rules = fold_scale()
    PassManager([rules]).run(p)
    adds = [n for n in p.graph.nodes if n.target == aten.add.Tensor]
    assert [n.kwargs.get("alpha") for n in adds] == [0.5]
    assert not any(n.target == aten.mul.Tensor for n in p.graph.nodes)
    assert rules.stats["fold_scale_into_add"].matches == 1
    torch.testing.assert_close(run(p, A, B, torch.tensor(0.5), x), expected)


def test_fold_scale_scales_a_widening_weight_not_the_output():
    # B is [5, 2]: scaling it touches 10 values, where scaling the output touches 3 x 5 and
    # makes the backward a scaled copy of the output's gradient
    p = scaled_lora(0.5, shapes=True)
    A, B, x = tensors()
    expected = run(p, A, B, torch.tensor(0.5), x)
    rules = fold_scale()
    PassManager([rules]).run(p)
    (mul,) = [n for n in p.graph.nodes if n.target == aten.mul.Tensor]
    assert mul.args == (next(n for n in p.graph.nodes if n.name == "b"), 0.5)
    (add,) = [n for n in p.graph.nodes if n.target == aten.add.Tensor]
    assert add.args[1].target == aten.linear.default and add.args[1].args[1] is mul
    assert "alpha" not in add.kwargs
    assert mul.meta["val"].shape == (5, 2) and mul.meta["peftc"]["method"] == "lora"
    assert rules.stats["scale_widening_weight"].matches == 1
    torch.testing.assert_close(run(p, A, B, torch.tensor(0.5), x), expected)


@pytest.mark.parametrize("shapes", [False, True])
def test_fold_scale_declines_a_tensor_scale_and_says_why(shapes):
    p = scaled_lora("tensor", shapes)
    rules = fold_scale()
    PassManager([rules]).run(p)
    stats = rules.stats["fold_scale_into_add"]
    assert stats.matches == 0
    assert dict(stats.declines) == {"scale is a tensor, not a constant": 1}
    widening = rules.stats["scale_widening_weight"]  # the decline is counted once, above
    assert widening.matches == 0 and not widening.declines


@pytest.mark.parametrize(
    "p_drop,train,dropped", [(0.0, True, True), (0.1, False, True), (0.1, True, False)]
)
def test_identity_dropout_is_dropped_and_live_dropout_kept(p_drop, train, dropped):
    g = torch.fx.Graph()
    (x,) = placeholders(g, "x")
    d = tagged(g.call_function(aten.dropout.default, (x, p_drop, train)))
    g.output(g.call_function(aten.relu.default, (d,)))
    p = program(g, [])
    rules = fold_scale()
    PassManager([rules]).run(p)
    has_dropout = any(n.target == aten.dropout.default for n in p.graph.nodes)
    assert has_dropout is not dropped
    declines = dict(rules.stats["drop_identity_dropout"].declines)
    assert declines == ({} if dropped else {"dropout is live (p > 0 in training)": 1})


def siblings(with_values: bool = True) -> Program:
    """Two adapters whose A matmuls read the same x: linear(x, A1) and linear(x, A2)."""
    g = torch.fx.Graph()
    A1, A2, x = placeholders(g, "a1", "a2", "x")
    outs = []
    for i, (A, r) in enumerate(((A1, 2), (A2, 3))):
        val = torch.empty(3, r, device="meta") if with_values else None
        outs.append(tagged(g.call_function(aten.linear.default, (x, A)), val, sites=(f"s{i}",)))
    g.output(tuple(outs))
    return program(g, ["a1", "a2"])


def test_fuse_siblings_turns_two_matmuls_into_one_and_keeps_the_values():
    p = siblings()
    gen = torch.Generator().manual_seed(0)
    A1, A2, x = (torch.randn(*s, generator=gen) for s in ((2, 5), (3, 5), (3, 5)))
    expected = run(p, A1, A2, x)
    PassManager([FuseSiblings()]).run(p)
    linears = [n for n in p.graph.nodes if n.target == aten.linear.default]
    assert len(linears) == 1 and linears[0].args[1].target == aten.cat.default
    assert [n.target for n in p.graph.nodes if n.op == "call_function"].count(operator.getitem) == 2
    assert linears[0].meta["peftc"]["sites"] == ("s0", "s1")  # a tuple, not a joined string
    for got, want in zip(run(p, A1, A2, x), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_a_lone_adapter_matmul_is_not_fused_and_the_decline_is_counted():
    g = torch.fx.Graph()
    A, x = placeholders(g, "a", "x")
    g.output(tagged(g.call_function(aten.linear.default, (x, A)), torch.empty(3, 2, device="meta")))
    p = program(g, ["a"])
    fuse = FuseSiblings()
    PassManager([fuse]).run(p)
    assert dict(fuse.stats["fuse_shared_input_matmuls"].declines) == {
        "no sibling adapter reads this input": 1
    }


def test_a_pass_whose_requirement_fails_is_named():
    with pytest.raises(PassConditionError, match="fuse_siblings requires 'adapter_values'.*linear"):
        PassManager([FuseSiblings()]).run(siblings(with_values=False))


class LeavesDeadCode:
    name = "leaves_dead_code"
    requires: tuple[str, ...] = ()
    ensures: tuple[str, ...] = ("no_dead_code",)

    def __call__(self, p: Program) -> PassResult:
        x = next(n for n in p.graph.nodes if n.op == "placeholder")
        with p.graph.inserting_after(x):
            p.graph.call_function(aten.neg.default, (x,))
        return PassResult(p.graph_module, True)


def test_a_pass_that_breaks_what_it_ensures_is_named_and_cleanup_holds_it():
    def graph() -> Program:
        g = torch.fx.Graph()
        (x,) = placeholders(g, "x")
        g.output(g.call_function(aten.relu.default, (x,)))
        return program(g, [])

    with pytest.raises(
        PassConditionError, match="leaves_dead_code should ensure 'no_dead_code'.*neg"
    ):
        PassManager([LeavesDeadCode()]).run(graph())
    p = graph()
    LeavesDeadCode()(p)
    PassManager([Cleanup()]).run(p)
    assert not any(n.target == aten.neg.default for n in p.graph.nodes)


def test_code_is_kept_only_when_asked_and_diffed_only_when_read():
    p = scaled_lora(0.5)
    manager = PassManager([fold_scale()], keep_code=True)
    manager.run(p)
    record = manager.records[0]
    assert "diff" not in record.__dict__  # nothing was diffed while the pass ran
    assert "-    mul" in record.diff and "alpha = 0.5" in record.diff
    plain = PassManager([fold_scale()])
    plain.run(scaled_lora(0.5))
    assert plain.records[0].code_before is None
    with pytest.raises(ValueError, match="kept no code.*keep_code=True"):
        _ = plain.records[0].diff


def dead_neg(p: Program) -> None:
    """A node nobody reads, for Cleanup to remove."""
    x = p.placeholder("x")
    with p.graph.inserting_after(x):
        p.graph.call_function(aten.neg.default, (x,))


def test_the_graph_module_is_recompiled_once_after_the_last_pass(monkeypatch):
    """Passes only mark the code stale; the manager regenerates it once, and the module then
    runs the rewritten graph (not the code of the trace it started from)."""
    p = siblings()
    dead_neg(p)
    calls = []
    recompile = torch.fx.GraphModule.recompile
    monkeypatch.setattr(
        torch.fx.GraphModule, "recompile", lambda gm: calls.append(gm) or recompile(gm)
    )
    manager = PassManager([FuseSiblings(), Cleanup()])
    manager.run(p)
    assert [r.modified for r in manager.records] == [True, True]
    assert calls == [p.graph_module]
    assert "aten.cat" in p.graph_module.code and "aten.neg" not in p.graph_module.code
    dead_neg(p)
    Cleanup()(p)  # outside a manager a pass recompiles at once, as before
    assert len(calls) == 2 and "aten.neg" not in p.graph_module.code

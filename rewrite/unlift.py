"""Turn a functional Program plus its state into a self-contained GraphModule.

Parameter, buffer and constant placeholders become attributes read with get_attr, and the
generated forward takes the traced input names and returns the model's output structure.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

from rewrite.program import BUFFER, CONSTANT, PARAMETER, USER_INPUT, Program


def _assign(root: torch.nn.Module, target: str, value: torch.Tensor, kind: str) -> None:
    *parents, leaf = target.split(".")
    module = root
    for part in parents:
        if not hasattr(module, part):
            module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
    if kind == PARAMETER:
        module.register_parameter(
            leaf, torch.nn.Parameter(value, requires_grad=value.requires_grad)
        )
    else:
        module.register_buffer(leaf, value, persistent=kind == BUFFER)


def _copy_attribute(source: torch.nn.Module, root: torch.nn.Module, target: str) -> None:
    *parents, leaf = target.split(".")
    owner = source.get_submodule(".".join(parents)) if parents else source
    value = getattr(owner, leaf)
    module = root
    for part in parents:
        if not hasattr(module, part):
            module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
    setattr(module, leaf, value)


def unlift(program: Program, state: Mapping[str, torch.Tensor]) -> torch.fx.GraphModule:
    """A GraphModule that owns its tensors and runs like the original model."""
    root = torch.nn.Module()
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    slots = {s.name: s for s in program.slots}
    old_nodes = list(program.graph.nodes)
    for node in old_nodes:
        if node.op == "placeholder" and slots[node.name].kind == USER_INPUT:
            env[node] = graph.placeholder(slots[node.name].target)
            env[node].meta = dict(node.meta)
    for node in old_nodes:
        if node.op != "placeholder" or slots[node.name].kind == USER_INPUT:
            continue
        slot = slots[node.name]
        value = program.constants[slot.target] if slot.kind == CONSTANT else state[slot.target]
        _assign(root, slot.target, value, slot.kind)
        env[node] = graph.get_attr(slot.target)
        env[node].meta = dict(node.meta)
    for node in old_nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            outs = list(node.args[0])
            n = len(program.mutated_buffers)
            for name, value in zip(program.mutated_buffers, outs[:n], strict=True):
                graph.call_function(
                    torch.ops.aten.copy_.default, (graph.get_attr(name), env[value])
                )
            graph.output(tuple(torch.fx.map_arg(v, lambda x: env[x]) for v in outs[n:]))
            continue
        if node.op == "get_attr" and not hasattr(root, node.target):
            # a subgraph of a higher-order op (torch.export keeps a no_grad or autocast
            # region as `submod_N` of the graph module): the new module needs it too
            _copy_attribute(program.graph_module, root, node.target)
        env[node] = graph.node_copy(node, lambda x: env[x])
    names = [s.target for s in program.slots if s.kind == USER_INPUT]
    in_spec = pytree.tree_flatten((tuple(range(len(names))), {}))[1]
    graph._codegen = _PyTreeCodeGen(_PyTreeInfo(names, in_spec, program.out_spec))
    gm = torch.fx.GraphModule(root, graph)
    gm.recompile()
    return gm

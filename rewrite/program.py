"""The graph program: one functional ATen graph plus the slots that feed it.

A `Program` wraps the lifted graph that torch.export produces. Every placeholder is a slot:
a parameter, a buffer, a lifted constant, or a user input. The program owns no tensors; the
caller passes a `state` mapping (parameter and buffer names to tensors) on each call. That
keeps one source of truth for weights when the training and eval programs both exist, and
it makes adapter tensors ordinary graph inputs, so swapping them never recompiles.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

PARAMETER = "parameter"
BUFFER = "buffer"
CONSTANT = "constant"
USER_INPUT = "user_input"


@dataclass
class Slot:
    """One placeholder of the graph: what kind of value feeds it and under which name."""

    kind: str  # PARAMETER, BUFFER, CONSTANT or USER_INPUT
    name: str  # the placeholder node's name
    target: str  # state name for parameters/buffers/constants, argument name for user inputs


@dataclass
class Program:
    """A lifted ATen graph, the slots feeding it, and how to map user inputs and outputs."""

    graph_module: torch.fx.GraphModule
    slots: list[Slot]
    input_names: list[str]  # the keyword arguments the program was traced with, in order
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    mutated_buffers: list[str]  # leading outputs that are new values of these buffers
    constants: dict[str, Any]
    input_meta: dict[str, tuple[tuple[int | None, ...], torch.dtype]]  # None marks a dynamic dim
    training: bool
    exported: torch.export.ExportedProgram | None = field(default=None, repr=False)
    # per user input and dim: the trace's symbol where the dim is dynamic, None where fixed
    input_dims: dict[str, tuple[str | None, ...]] = field(default_factory=dict)
    # recompiles asked for inside `deferred_recompile()`, made once when it ends
    _deferring: int = field(default=0, repr=False, compare=False)
    _stale: bool = field(default=False, repr=False, compare=False)

    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph

    def recompile(self) -> None:
        """Regenerate the graph module's code after a rewrite of its graph (what a pass calls
        once it changed something). Inside `deferred_recompile()` this only marks the code
        stale: generating Python for a 4,000-node graph takes a tenth of a second or more, and
        the passes between read the graph, never the code."""
        if self._deferring:
            self._stale = True
        else:
            self.graph_module.recompile()

    @contextlib.contextmanager
    def deferred_recompile(self) -> Iterator[None]:
        """Hold the recompiles passes ask for until the block ends, then make one."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
            if not self._deferring and self._stale:
                self._stale = False
                self.graph_module.recompile()

    def placeholder(self, name: str) -> torch.fx.Node:
        for node in self.graph.find_nodes(op="placeholder"):
            if node.name == name:
                return node
        raise KeyError(name)

    def slot_for(self, node: torch.fx.Node) -> Slot | None:
        for slot in self.slots:
            if slot.name == node.name:
                return slot
        return None

    def add_parameter(self, target: str) -> torch.fx.Node:
        """Add a parameter placeholder (before the user inputs) and its slot; reuse it if present."""
        for slot in self.slots:
            if slot.kind == PARAMETER and slot.target == target:
                return self.placeholder(slot.name)
        first_input = next(
            (self.placeholder(s.name) for s in self.slots if s.kind == USER_INPUT), None
        )
        name = target.replace(".", "_")
        if first_input is None:
            last = self.graph.find_nodes(op="placeholder")[-1]
            ctx = self.graph.inserting_after(last)
        else:
            ctx = self.graph.inserting_before(first_input)
        with ctx:
            node = self.graph.placeholder(name)
        index = next((i for i, s in enumerate(self.slots) if s.kind == USER_INPUT), len(self.slots))
        self.slots.insert(index, Slot(PARAMETER, node.name, target))
        return node

    def clone(self) -> Program:
        """A copy whose graph can be rewritten without touching this one."""
        graph = copy.deepcopy(self.graph_module.graph)
        # The copy may rename nodes (a placeholder named after a builtin, `input` in
        # nn.Sequential's forward, becomes `input_1`), so slots follow the nodes, not the names.
        renamed = {a.name: b.name for a, b in zip(self.graph.nodes, graph.nodes, strict=True)}
        gm = torch.fx.GraphModule(self.graph_module, graph)
        return Program(
            graph_module=gm,
            slots=[Slot(s.kind, renamed.get(s.name, s.name), s.target) for s in self.slots],
            input_names=list(self.input_names),
            in_spec=self.in_spec,
            out_spec=self.out_spec,
            mutated_buffers=list(self.mutated_buffers),
            constants=self.constants,
            input_meta=dict(self.input_meta),
            input_dims=dict(self.input_dims),
            training=self.training,
            exported=self.exported,
        )

    def run(
        self,
        state: Mapping[str, torch.Tensor],
        inputs: Mapping[str, Any],
        runner: Callable[..., Any] | None = None,
    ) -> Any:
        """Run the graph on `state` (parameters and buffers by name) and keyword `inputs`.

        `runner` replaces the graph module's own call (a compiled version of it)."""
        args = []
        for slot in self.slots:
            if slot.kind == USER_INPUT:
                args.append(inputs[slot.target])
            elif slot.kind == CONSTANT:
                args.append(self.constants[slot.target])
            else:
                args.append(state[slot.target])
        outputs = (self.graph_module if runner is None else runner)(*args)
        n = len(self.mutated_buffers)
        if n:
            with torch.no_grad():
                for name, value in zip(self.mutated_buffers, outputs[:n], strict=True):
                    state[name].copy_(value)
        return pytree.tree_unflatten(list(outputs[n:]), self.out_spec)

"""Turn a functional Program plus its state back into a torch.export ExportedProgram.

A rewritten Program is still the lifted ATen graph torch.export produced, so handing it back
as an ExportedProgram lets a consumer that wants one (torch.onnx) take the graph as it is,
instead of capturing the unlifted GraphModule with torch.export once more.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputKind,
    OutputSpec,
    TensorArgument,
)

from rewrite.program import BUFFER, CONSTANT, PARAMETER, USER_INPUT, Program

_KINDS = {
    PARAMETER: InputKind.PARAMETER,
    BUFFER: InputKind.BUFFER,
    CONSTANT: InputKind.CONSTANT_TENSOR,
    USER_INPUT: InputKind.USER_INPUT,
}


def exported_program(program: Program, state: Mapping[str, torch.Tensor]) -> ExportedProgram | None:
    """`program` over `state` as an ExportedProgram with its trace's shape constraints; None
    where the program cannot be one as it is (it came from no torch.export trace, or it
    returns values that are not tensors), so the caller captures the graph instead. The
    program's graph becomes the ExportedProgram's: clone the program first to keep it."""
    trace = program.exported
    outputs = program.graph.output_node().args[0]
    if trace is None or not all(isinstance(v, torch.fx.Node) for v in outputs):
        return None
    persistent = {
        s.target: s.persistent
        for s in trace.graph_signature.input_specs
        if s.kind == InputKind.BUFFER
    }
    slots = {s.name: s for s in program.slots}
    placeholders = program.graph.find_nodes(op="placeholder")
    fake_mode = next(
        (
            n.meta["val"].fake_mode
            for n in placeholders
            if isinstance(n.meta.get("val"), torch._subclasses.FakeTensor)
        ),
        None,
    )
    inputs, state_dict, constants = [], {}, dict(program.constants)
    for node in placeholders:
        slot = slots[node.name]
        if slot.kind == USER_INPUT:
            inputs.append(InputSpec(InputKind.USER_INPUT, TensorArgument(node.name), None))
            continue
        keep = persistent.get(slot.target, True) if slot.kind == BUFFER else None
        inputs.append(InputSpec(_KINDS[slot.kind], TensorArgument(node.name), slot.target, keep))
        if slot.kind == CONSTANT:
            value = constants[slot.target]
        elif slot.kind == PARAMETER:
            value = torch.nn.Parameter(state[slot.target], requires_grad=False)
            state_dict[slot.target] = value
        else:
            value = state[slot.target]
            (state_dict if keep else constants)[slot.target] = value
        # a placeholder a pass added (a merged, untied weight), or a weight the merge
        # reshaped (a grouped conv made dense): the trace's fake value no longer describes it
        val = node.meta.get("val")
        if val is None or val.shape != value.shape or val.dtype != value.dtype:
            if fake_mode is None:
                return None
            node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True)
    mutated = len(program.mutated_buffers)
    output_specs = [
        OutputSpec(OutputKind.BUFFER_MUTATION, TensorArgument(v.name), target)
        for v, target in zip(outputs[:mutated], program.mutated_buffers, strict=True)
    ] + [
        OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(v.name), None) for v in outputs[mutated:]
    ]
    return ExportedProgram(
        root=program.graph_module,
        graph=program.graph,
        graph_signature=ExportGraphSignature(inputs, output_specs),
        state_dict=state_dict,
        range_constraints=trace.range_constraints,
        module_call_graph=copy.deepcopy(trace.module_call_graph),
        constants=constants,
        verifiers=trace.verifiers,  # the trace's IR: it may keep in-place ops
    )

"""Tracing: nn.Module + example inputs -> Program, through torch.export (non-strict, ATen training IR).

Products of an activation with a transposed parameter (`x @ W.T`) are rewritten into
`aten.linear` right after the export (`rewrite/canonical.py`), so they are sites.

Inputs are normalised to keyword arguments by binding them to the model's forward signature,
so a model traced with `(ids,)` can be called with `input_ids=ids` and the other way round.
Batch and sequence dimensions are dynamic: dim 0 of every tensor, and dim 1 of integer
tensors of rank 2 or more (token ids, masks) and of floating tensors of rank 3 (hidden states).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.export import Dim
from torch.export.graph_signature import InputKind, OutputKind

from rewrite.canonical import canonicalize_linears
from rewrite.noop_casts import NoOpCastsAsValues, drop_cast_aliases
from rewrite.program import BUFFER, CONSTANT, PARAMETER, USER_INPUT, Program, Slot


class TraceError(RuntimeError):
    """The model could not be traced; the message names the failing op or module and a fix."""


def bind_inputs(model: torch.nn.Module, example_inputs: Any) -> dict[str, Any]:
    """Turn a tuple of positional args or a dict of keyword args into keyword args by name."""
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, tuple | list):
        args, kwargs = tuple(example_inputs), {}
    elif isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    else:
        raise TypeError(
            f"example inputs must be a tuple of positional arguments or a dict of keyword "
            f"arguments, got {type(example_inputs).__name__}"
        )
    return bind_call(model, args, kwargs)


def bind_call(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Bind a call's arguments to the names of the model's forward; keep the tensors."""
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError as e:
        raise TypeError(
            f"inputs do not fit {type(model).__name__}.forward{signature}: {e}"
        ) from None
    named = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise TypeError(
                f"{type(model).__name__}.forward takes *{name}; peftc needs named arguments. "
                "Wrap the model in a module whose forward names each input."
            )
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"input {name!r} is a {type(value).__name__}; peftc traces tensor inputs only. "
                "Bind non-tensor options when building the model (or in a wrapper module)."
            )
        named[name] = value
    if not named:
        raise TypeError("no tensor inputs were given; pass example inputs for the model")
    return named


def dynamic_dims(t: torch.Tensor) -> tuple[int, ...]:
    """The dims peftc must keep dynamic by default: batch, and sequence for ids/masks."""
    if t.dim() == 0:
        return ()
    if not t.is_floating_point() and t.dim() >= 2:
        return (0, 1)
    return (0,)


def candidate_dims(t: torch.Tensor) -> tuple[int, ...]:
    """The dims traced as `Dim.AUTO` by default, which torch.export keeps dynamic unless the
    model fixes them: `dynamic_dims`, and every dim of a rank-3 float input (hidden states
    [batch, time, features] and speech features [batch, features, time] alike: the model
    fixes the feature dim, whichever it is). Images keep their spatial dims (convolutions
    accept any size, but what follows them often needs one)."""
    if t.is_floating_point() and t.dim() == 3:
        return tuple(d for d in range(3) if d == 0 or t.shape[d] >= 2)
    return dynamic_dims(t)


def resolved_dims(program: Program) -> dict[str, tuple[str | None, ...]]:
    """What the trace made of each user input's dims: the symbol's name where a dim is
    dynamic (dims that must be equal share one), None where it is fixed."""
    out = {}
    for slot in program.slots:
        if slot.kind != USER_INPUT:
            continue
        val = program.placeholder(slot.name).meta.get("val")
        dims = []
        for d in getattr(val, "shape", ()):
            expr = d.node.expr if isinstance(d, torch.SymInt) else None
            dims.append(None if expr is None or expr.is_number else str(expr))
        out[slot.target] = tuple(dims)
    return out


def _held_only_at_trace_size(
    program: Program, model: torch.nn.Module, inputs: Mapping[str, Any], declared: Mapping
) -> list[tuple[str, int]]:
    """The offered dims (candidate_dims beyond dynamic_dims, not the user's) that the graph
    left dynamic but cannot run at another size: each is tried at its size + 1 on fake
    tensors (shapes only, no compute, the model's state untouched)."""
    dims = resolved_dims(program)
    offered = [
        (name, d)
        for name, t in inputs.items()
        if name not in declared
        for d in set(candidate_dims(t)) - set(dynamic_dims(t))
        if dims[name][d] is not None
    ]
    if not offered:
        return []
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(model.named_buffers(remove_duplicate=False))
    # the propagation writes each node's meta; the trace's own (symbolic) values come back
    metas = {node: dict(node.meta) for node in program.graph.nodes}
    fixed = []
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    was_disabled, quiet.disabled = quiet.disabled, True  # a refused size is the answer here
    try:
        for name, d in offered:
            if not _runs_at(program, inputs, state, name, d):
                fixed.append((name, d))
    finally:
        quiet.disabled = was_disabled
        for node, meta in metas.items():
            node.meta.clear()
            node.meta.update(meta)
    return fixed


def _runs_at(
    program: Program, inputs: Mapping[str, Any], state: Mapping[str, Any], name: str, d: int
) -> bool:
    """Whether the graph propagates fake tensors with input `name`'s dim `d` one larger."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    args = []
    for slot in program.slots:
        if slot.kind == USER_INPUT:
            t = inputs[slot.target]
            size = list(t.shape)
            if slot.target == name:
                size[d] += 1
            args.append(mode.from_tensor(torch.empty(size, dtype=t.dtype)))
        elif slot.kind == CONSTANT:
            args.append(mode.from_tensor(program.constants[slot.target]))
        else:
            args.append(mode.from_tensor(state[slot.target]))
    try:
        FakeTensorProp(program.graph_module, mode).propagate_dont_convert_inputs(*args)
    except Exception:  # any op refusing the size: the dim is fixed after all
        return False
    return True


def declared_shapes(dynamic_shapes: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """torch.export's `dynamic_shapes` (a dict by input name, or a tuple in the forward's
    order) as a dict by input name."""
    if dynamic_shapes is None:
        return {}
    if isinstance(dynamic_shapes, Mapping):
        unknown = sorted(set(dynamic_shapes) - set(inputs))
        if unknown:
            raise TraceError(
                f"dynamic_shapes names {unknown}, which are not inputs of this call; the "
                f"inputs are {list(inputs)}"
            )
        return dict(dynamic_shapes)
    if isinstance(dynamic_shapes, tuple | list):
        if len(dynamic_shapes) != len(inputs):
            raise TraceError(
                f"dynamic_shapes has {len(dynamic_shapes)} entries for {len(inputs)} inputs "
                f"{list(inputs)}; give one per input, or a dict by input name"
            )
        return dict(zip(inputs, dynamic_shapes, strict=True))
    raise TraceError(
        "dynamic_shapes must be torch.export's form: a dict by input name of {dim: Dim}, "
        f"got {type(dynamic_shapes).__name__}"
    )


@contextlib.contextmanager
def _tracing_mode(model: torch.nn.Module, training: bool) -> Iterator[None]:
    """Put the model in train/eval mode and switch off HF's KV cache while tracing."""
    was_training = model.training
    config = getattr(model, "config", None)
    had_cache = getattr(config, "use_cache", None)
    model.train(training)
    if had_cache is not None:
        config.use_cache = False
    try:
        yield
    finally:
        model.train(was_training)
        if had_cache is not None:
            config.use_cache = had_cache


def _explain_failure(
    model: torch.nn.Module, error: Exception, dynamic_shapes: Mapping | None = None
) -> str:
    """Name the op and the model source line where tracing failed, and suggest a fix."""
    frames = traceback.extract_tb(error.__traceback__)
    user_frames = [
        f
        for f in frames
        if "/torch/" not in f.filename
        and "/rewrite/" not in f.filename
        and "contextlib" not in f.filename
    ]
    where = ""
    if user_frames:
        f = user_frames[-1]
        where = f"\n  at {f.filename}:{f.lineno} in {f.name}: {f.line}"
    text = str(error).strip().splitlines()
    first = text[0] if text else type(error).__name__
    lowered = str(error).lower()
    if "data-dependent" in lowered or "guardondatadependent" in type(error).__name__.lower():
        fix = (
            "the model branches on a tensor's value. Replace the Python `if` on tensor data with "
            "torch.where/torch.cond, or compute that value outside forward."
        )
    elif "not supported" in lowered or "unsupported" in lowered:
        fix = (
            "this op cannot be exported; move it out of forward or replace it with a supported op."
        )
    elif "dynamic" in lowered or "constraint" in lowered or "specializ" in lowered:
        violated = re.search(r"Constraints violated \(([^)]*)\)", str(error))
        dim_names = {n.strip() for n in violated.group(1).split(",")} if violated else set()
        named = [
            f"input {name!r} dim {d}"
            for name, dims in (dynamic_shapes or {}).items()
            if isinstance(dims, Mapping)
            for d, dim in dims.items()
            if getattr(dim, "__name__", None) in dim_names
        ]
        fixed = f"the model fixes {', '.join(named)}" if named else "the model fixes a size"
        fix = (
            f"{fixed}. Declare only the dims it leaves free in dynamic_shapes (or leave it to "
            "peftc's default), and pass example inputs with batch >= 2 and sequence >= 2."
        )
    else:
        fix = (
            "make forward traceable by torch.export (no data-dependent Python control flow, no "
            "non-tensor outputs), or wrap the model in a module with a simpler forward."
        )
    return (
        f"could not trace {type(model).__name__} with torch.export: "
        f"{type(error).__name__}: {first}{where}\n  fix: {fix}"
    )


def trace(
    model: torch.nn.Module,
    example_inputs: Any,
    training: bool = True,
    dynamic_shapes: Any = None,
) -> Program:
    """Export `model` on `example_inputs` into a Program (lifted ATen training IR).

    `dynamic_shapes` is torch.export's (by input name); inputs it does not name get
    `candidate_dims` as `Dim.AUTO`. The Program records the dims as the trace resolved them
    (`input_dims`, and None in `input_meta` where a dim is dynamic), which every later check
    and the ONNX export read."""
    inputs = bind_inputs(model, example_inputs)
    declared = declared_shapes(dynamic_shapes, inputs)
    shapes = {}
    for name, t in inputs.items():
        if name in declared:
            shapes[name] = declared[name]
            continue
        for d in dynamic_dims(t):
            if t.shape[d] < 2:
                raise TraceError(
                    f"input {name!r} has size {t.shape[d]} in dim {d}, which peftc keeps dynamic "
                    "(batch or sequence); torch.export would fix it to 1. Trace with batch >= 2 "
                    "and sequence >= 2; the model then runs at any size."
                )
        shapes[name] = {d: Dim.AUTO for d in candidate_dims(t)}
    program = export_program(model, inputs, shapes, {}, training)
    # dims offered beyond batch and sequence that the graph only accepts at their traced size
    # (the model fixes them through a split or a reshape, which torch.export keeps symbolic)
    fixed = _held_only_at_trace_size(program, model, inputs, declared)
    if fixed:
        for name, d in fixed:
            shapes[name] = {k: v for k, v in shapes[name].items() if k != d}
        program = export_program(model, inputs, shapes, {}, training)
    program.input_dims = resolved_dims(program)
    program.input_meta = {
        name: (
            tuple(None if sym is not None else s for sym, s in zip(dims, t.shape, strict=True)),
            t.dtype,
        )
        for name, t in inputs.items()
        for dims in [program.input_dims[name]]
    }
    canonicalize_linears(program)  # x @ W.T and its kin become linear sites
    return program


def export_program(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    dynamic_shapes: dict[str, dict[int, Any]],
    input_meta: dict[str, tuple[tuple[int | None, ...], torch.dtype]],
    training: bool,
) -> Program:
    """The torch.export call itself, on checked and bound inputs. (The test suite wraps this
    one function to share a trace between tests that build the same model.)"""
    try:
        with _tracing_mode(model, training), NoOpCastsAsValues():
            ep = torch.export.export(model, (), inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # torch.export raises many exception types; all mean "untraceable"
        raise TraceError(_explain_failure(model, e, dynamic_shapes)) from e
    return _program_from_export(ep, list(inputs), input_meta, training)


def _program_from_export(
    ep: torch.export.ExportedProgram,
    input_names: list[str],
    input_meta: dict,
    training: bool,
) -> Program:
    slots = []
    user_inputs = iter(input_names)
    kinds = {
        InputKind.PARAMETER: PARAMETER,
        InputKind.BUFFER: BUFFER,
        InputKind.CONSTANT_TENSOR: CONSTANT,
        InputKind.USER_INPUT: USER_INPUT,
    }
    for spec in ep.graph_signature.input_specs:
        if spec.kind not in kinds:
            raise TraceError(f"unsupported graph input kind {spec.kind} for {spec.arg.name}")
        kind = kinds[spec.kind]
        target = next(user_inputs) if kind == USER_INPUT else spec.target
        slots.append(Slot(kind, spec.arg.name, target))
    mutated = []
    for spec in ep.graph_signature.output_specs:
        if spec.kind == OutputKind.BUFFER_MUTATION:
            mutated.append(spec.target)
        elif spec.kind != OutputKind.USER_OUTPUT:
            raise TraceError(
                f"the model mutates {spec.target or spec.arg} ({spec.kind.name}); "
                "peftc supports buffer mutations only (e.g. BatchNorm statistics)"
            )
    _drop_dtype_checks(ep.graph_module)
    drop_cast_aliases(ep.graph_module)
    return Program(
        graph_module=ep.graph_module,
        slots=slots,
        input_names=input_names,
        in_spec=ep.call_spec.in_spec,
        out_spec=ep.call_spec.out_spec,
        mutated_buffers=mutated,
        constants=dict(ep.constants),
        input_meta=input_meta,
        training=training,
        exported=ep,
    )


def _drop_dtype_checks(graph_module: torch.fx.GraphModule) -> None:
    """Remove torch.export's `_assert_tensor_metadata` nodes.

    export puts one before each `.to()`, asserting that its input has the dtype and device it
    had when traced. Under `torch.autocast` a linear's output is bf16 where the trace saw fp32,
    so the check before the model's own upcast (`logits.float()`) fails while the cast itself
    is what autocast needs. The graph's inputs are checked by `check_inputs` instead."""
    graph = graph_module.graph
    for node in list(graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
    graph_module.recompile()


def check_inputs(program: Program, inputs: Mapping[str, Any]) -> None:
    """Refuse inputs whose names, ranks, static sizes or dtypes differ from the traced ones."""
    if set(inputs) != set(program.input_names):
        extra = sorted(set(inputs) - set(program.input_names))
        missing = sorted(set(program.input_names) - set(inputs))
        diff = ", ".join(
            part
            for part in (f"extra {extra}" if extra else "", f"missing {missing}" if missing else "")
            if part
        )
        hint = (
            " To get the model's own loss (transformers' Trainer passes labels), compile with "
            "labels in the example inputs."
            if "labels" in extra
            else ""
        )
        raise TypeError(
            f"this model was compiled for inputs {program.input_names}, got {sorted(inputs)} "
            f"({diff}). Call it with the same named inputs as the example inputs.{hint}"
        )
    for name, (shape, _dtype) in program.input_meta.items():
        t = inputs[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"input {name!r} must be a tensor, got {type(t).__name__}")
        if t.dim() != len(shape) or any(s is not None and s != a for s, a in zip(shape, t.shape)):
            want = "x".join("*" if s is None else str(s) for s in shape)
            fixed = [
                f"dim {d} is {a}, fixed at {s}"
                for d, (s, a) in enumerate(zip(shape, t.shape))
                if s is not None and s != a
            ]
            why = f": {'; '.join(fixed)}" if t.dim() == len(shape) else f": rank {t.dim()}"
            raise ValueError(
                f"input {name!r} has shape {tuple(t.shape)}, expected {want} "
                f"(* marks a dynamic dim){why}. Re-compile with example inputs of this shape, "
                "or declare the dim in dynamic_shapes if the model allows it."
            )

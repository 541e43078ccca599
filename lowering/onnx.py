"""ONNX lowering: export a (merged) graph with torch.onnx's dynamo exporter, optimise it for
onnxruntime, write it atomically, and verify it against PyTorch on fresh shapes.

The pipeline is the same for every graph (merged, base, multi-adapter), so their node counts
and latencies compare like for like: torch.onnx.export(dynamo=True) -> onnxscript optimizer ->
onnxruntime fusions (`onnxscript.rewriter.ort_fusions`: RMSNorm, skip-norm, rotary, attention)
-> file. Inputs keep the traced names (`input_ids`, `attention_mask`, ...), outputs are the
model's named outputs (`logits`, ...) with batch and sequence axes dynamic.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from lowering.grouped_mm import decompose_grouped_mm
from passes.merge import fold_weights, merged_biases, merged_weights, op_multiset
from passes.pipeline import pipeline_of
from rewrite.exported import exported_program
from rewrite.files import staged
from rewrite.program import Program
from rewrite.sites import find_sites
from rewrite.trace import dynamic_dims, trace
from rewrite.unlift import unlift

log = logging.getLogger("peftc.onnx")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
EXTERNAL_DATA_BYTES = 2 * 1024**3  # protobuf's limit: larger models keep weights beside the file
AXIS_NAMES = ("batch", "sequence")


class OnnxExportError(RuntimeError):
    """The export failed or the exported graph disagrees with PyTorch; the message says which."""


@dataclass
class ExportReport:
    """What an export wrote and how it checked out."""

    path: str
    dtype: str
    input_names: list[str]
    output_names: list[str]
    nodes: int
    fusions: dict[str, int] = field(default_factory=dict)
    max_errors: dict[str, float] = field(default_factory=dict)  # shape -> max |ORT - PyTorch|
    tolerance: float = 0.0
    drift: float | None = None  # max |merged - unmerged|, both in PyTorch
    provider: str = ""
    quantized: str | None = None  # the unmerged model's quantized base ("nf4", "int8"), if any
    fusions_dropped: str | None = None  # why the ORT-fused graph was not kept, if it was not

    def summary(self) -> str:
        errors = ", ".join(f"{shape}: {err:.2e}" for shape, err in self.max_errors.items())
        lines = [
            f"wrote {self.path} ({self.dtype}, {self.nodes} nodes; inputs "
            f"{', '.join(self.input_names)}; outputs {', '.join(self.output_names)})",
            f"onnxruntime ({self.provider}) vs PyTorch max error {errors} "
            f"(tolerance {self.tolerance:g})",
        ]
        fused = {k: v for k, v in self.fusions.items() if v}
        if fused:
            lines.append("ort fusions: " + ", ".join(f"{k}={v}" for k, v in sorted(fused.items())))
        if self.fusions_dropped:
            lines.append(f"ort fusions dropped, exported unfused: {self.fusions_dropped}")
        if self.drift is not None:
            against = (
                f"the quantized ({self.quantized}) training model"
                if self.quantized
                else "unmerged model"
            )
            lines.append(f"merge drift vs {against}: max {self.drift:.2e}")
        return "\n".join(lines)


# -- onnxruntime -------------------------------------------------------------------------


def session(path: str | os.PathLike, providers: list[str] | None = None):
    """An onnxruntime session on `path`: CUDA when the build and a GPU allow it, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    # onnxruntime-gpu lists CUDA even on machines without a GPU, then prints a failed library
    # load at every session; ask for it only where an NVIDIA device exists
    gpu = os.path.exists("/dev/nvidiactl") or os.environ.get("CUDA_VISIBLE_DEVICES", "") != ""
    default = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
    wanted = providers or default
    chosen = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # the CUDA provider's missing-library notices are noise
    try:
        sess = ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as e:  # a CUDA build without a usable GPU fails at session creation
        if chosen == ["CPUExecutionProvider"]:
            raise
        log.info("onnxruntime: %s unavailable (%s); falling back to CPU", chosen[0], e)
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    log.info("onnxruntime session on %s uses %s", Path(path).name, sess.get_providers()[0])
    return sess


def run_session(sess, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    feed = {i.name: inputs[i.name].detach().cpu().numpy() for i in sess.get_inputs()}
    return [torch.from_numpy(o) for o in sess.run(None, feed)]


# -- outputs -----------------------------------------------------------------------------


def output_names(value: Any) -> list[str]:
    """Names for the flattened outputs: ModelOutput/dict keys, else output / output_<i>."""
    if isinstance(value, Mapping):
        names = []
        for key, item in value.items():
            leaves = pytree.tree_leaves(item)
            names += [key] if len(leaves) == 1 else [f"{key}_{i}" for i in range(len(leaves))]
        return names
    leaves = pytree.tree_leaves(value)
    return ["output"] if len(leaves) == 1 else [f"output_{i}" for i in range(len(leaves))]


def flat_outputs(value: Any) -> list[torch.Tensor]:
    if isinstance(value, Mapping):
        return [leaf for item in value.values() for leaf in pytree.tree_leaves(item)]
    return pytree.tree_leaves(value)


class _Flat(torch.nn.Module):
    """Calls a module with named inputs and returns its outputs as a flat tuple of tensors."""

    def __init__(self, module: torch.nn.Module, names: list[str]):
        super().__init__()
        self.module = module
        self.names = names

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(flat_outputs(self.module(**dict(zip(self.names, args)))))


# -- writing -----------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's notices that concern optional packages (torchvision ops not
    registered) and its deprecation chatter; errors still raise."""
    import warnings

    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            # input_ids and attention_mask share the batch/sequence dims; the exporter says so
            warnings.filterwarnings("ignore", message=".*The axis name: .* will not be used")
            yield
    finally:
        registration.setLevel(level)


# torchlib's registry per opset, built on peftc's first export (see _torchlib_registry_once)
_REGISTRIES: dict[tuple[type, int], Any] = {}


@contextlib.contextmanager
def _torchlib_registry_once():
    """torch.onnx.export rebuilds its registry of ONNX functions from torchlib on every call
    (0.6-1.2 s here, as long as exporting a small model). peftc's exports pass no custom
    translation table, so nothing changes the registry once built: within this block it is
    built once per opset, with peftc's complex-valued translations added
    (lowering/onnx_complex.py), and reused. Outside it (the user's own exports) torch's is
    left as it is; a torch without this private hook just builds it each time (and then
    lacks those translations)."""
    try:
        from torch.onnx._internal.exporter import _registration

        original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    except (ImportError, KeyError):
        yield
        return
    build = original.__func__

    def from_torchlib(cls, opset_version=None, **kwargs):
        if kwargs:  # a signature this cache does not know: build it as torch would
            return build(cls, opset_version, **kwargs)
        opset = _registration._constants.TORCHLIB_OPSET if opset_version is None else opset_version
        key = (cls, opset)
        if key not in _REGISTRIES:
            from lowering.onnx_complex import register_complex_translations

            _REGISTRIES[key] = register_complex_translations(build(cls, opset))
        return _REGISTRIES[key]

    _registration.ONNXRegistry.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        _registration.ONNXRegistry.from_torchlib = original


def _save(program, path: Path, external: bool) -> None:
    program.save(str(path), external_data=external)


# -- export ------------------------------------------------------------------------------


Dims = Mapping[str, tuple]  # per input: the trace's symbol per dim, None where fixed


def axis_names(inputs: Mapping[str, torch.Tensor], dims: Dims | None) -> dict[tuple, str]:
    """The ONNX name of each dynamic (input, dim): `batch` and `sequence` where the heuristic
    places them and the example agrees on one size, else one name per trace symbol (dims the
    model ties together share it). Without `dims` (a module exported on its own), the
    heuristic's batch and sequence dims."""
    if dims is None:
        dims = {
            name: tuple(f"h{d}" if d in dynamic_dims(t) else None for d in range(t.dim()))
            for name, t in inputs.items()
        }
    per_symbol: dict[str, str] = {}
    names: dict[tuple, str] = {}
    for name, symbols in dims.items():
        t = inputs[name]
        for d, symbol in enumerate(symbols):
            if symbol is None:
                continue
            own = per_symbol.setdefault(symbol, f"{name}_dim{d}")
            names[(name, d)] = AXIS_NAMES[d] if d in dynamic_dims(t) else own
    sizes: dict[str, set[int]] = {}
    for (name, d), axis in names.items():
        sizes.setdefault(axis, set()).add(int(inputs[name].shape[d]))
    for (name, d), axis in list(names.items()):
        if axis in AXIS_NAMES and len(sizes[axis]) > 1:  # not one axis after all
            names[(name, d)] = per_symbol[dims[name][d]]
    return names


def _dynamic_shapes(
    inputs: Mapping[str, torch.Tensor], dynamic: bool, dims: Dims | None = None
) -> tuple | None:
    """torch.export's dynamic_shapes for the export: exactly the dims the trace resolved
    dynamic (`dims`), one Dim per axis name."""
    if not dynamic:
        return None
    from torch.export import Dim

    names = axis_names(inputs, dims)
    made = {axis: Dim(axis) for axis in dict.fromkeys(names.values())}
    return tuple(
        {d: made[names[(name, d)]] for d in range(t.dim()) if (name, d) in names}
        for name, t in inputs.items()
    )


def export_module(
    module: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamic: bool = True,
    ort_fusions: bool = True,
    dims: Dims | None = None,
    dynamic_shapes: tuple | None = None,
    fusion_check: Sequence[Mapping[str, torch.Tensor]] | None = None,
    fusion_tolerance: float | None = None,
    finish: Callable[[Any], None] | None = None,
    exported: torch.export.ExportedProgram | None = None,
) -> ExportReport:
    """Export `module(**inputs)` to `path` through the shared pipeline (no verification).
    `dims` are the dims a trace resolved (Program.input_dims); without them, batch and
    sequence are dynamic. `dynamic_shapes` (torch.export's form, one entry per input) replaces
    both; the fused graph is test-run on each of `fusion_check` (default: `inputs`) and, with
    `fusion_tolerance`, must give the module's outputs there within it; `finish` edits the
    onnx_ir model last, just before it is written. `exported` is `module`'s own graph as an
    ExportedProgram (rewrite/exported.py), with the dims `dims` names dynamic: torch.onnx then
    takes it as it is instead of capturing `module` with torch.export again (a third to a
    half of torch.onnx.export's time)."""
    names = list(inputs)
    module = module.eval()
    with torch.no_grad():
        reference = module(**inputs)
    decomposed = decompose_grouped_mm(module)  # MoE experts: no ONNX op of their own
    outs = output_names(reference)
    use_exported = dims is not None and dynamic and dynamic_shapes is None
    if exported is not None and decomposed is module and use_exported:
        # the program's dims are the trace's symbols; torch.onnx renames them to these
        axes = axis_names(inputs, dims)
        dynamic_shapes = tuple(
            {d: axes[(name, d)] for d in range(t.dim()) if (name, d) in axes}
            for name, t in inputs.items()
        )
        target = exported
    else:
        if dynamic_shapes is None:
            dynamic_shapes = _dynamic_shapes(inputs, dynamic, dims)
        # _Flat.forward takes *args: its dynamic shapes nest under that one parameter
        dynamic_shapes = None if dynamic_shapes is None else (dynamic_shapes,)
        target = _Flat(decomposed, names).eval()
    module = decomposed
    try:
        with torch.no_grad(), _quiet_exporter(), _torchlib_registry_once():
            program = torch.onnx.export(
                target,
                tuple(inputs.values()),
                dynamo=True,
                input_names=names,
                output_names=outs,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                # the onnxscript optimizer (constant folding, dead code, inlining); the ORT
                # fusions run it themselves first, so it is not run twice
                optimize=not ort_fusions,
                verbose=False,
            )
    except Exception as e:  # the exporter raises many types; all mean "could not export"
        raise OnnxExportError(
            f"torch.onnx.export failed ({type(e).__name__}): {_cause(e)}\n"
            "  fix: if an op has no ONNX translation, try another --opset; if a size got "
            "fixed, export with dynamic=False"
        ) from e
    size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    fusions, dropped = {}, None
    if ort_fusions:
        checks = list(fusion_check or [inputs])
        expected = None
        if fusion_tolerance is not None:
            with torch.no_grad():
                expected = [flat_outputs(reference if c is inputs else module(**c)) for c in checks]
        fusions, dropped = _fuse_for_ort(
            program, checks, size < EXTERNAL_DATA_BYTES, expected, fusion_tolerance
        )
    if finish is not None:
        finish(program.model)
    with staged(path, make_parents=True) as tmp:
        _save(program, tmp, external=size > EXTERNAL_DATA_BYTES)
    return ExportReport(
        path=str(path),
        dtype="",
        input_names=names,
        output_names=outs,
        nodes=len(program.model.graph),
        fusions=dict(fusions),
        fusions_dropped=dropped,
    )


def _fuse_for_ort(
    program,
    checks: Sequence[Mapping[str, torch.Tensor]],
    check: bool,
    expected: Sequence[list[torch.Tensor]] | None = None,
    tolerance: float | None = None,
) -> tuple[dict[str, int], str | None]:
    """Apply onnxscript's ORT fusions (attention, RMSNorm, rotary, skip-norm, GELU), after
    rewriting transformers 5's RoPE angles into the form the rotary fusion matches
    (`lowering/ort_rope.py`). Returns the fusions made and, where the fused graph was
    dropped, why.

    A fusion can match a pattern it then mis-handles, giving a graph that onnxruntime refuses
    to load or run (seen with stacked adapters: the MHA fusion on GPT-2, and the MHA-bias
    fusion taking a BERT adapter's [batch, seq, out] update for a bias), or one that runs and
    computes something else (seen on Mistral and Gemma 3, with sliding-window attention, and
    on Granite, with its attention and residual multipliers), or one that runs at some shapes
    only (Cohere, at batch 3). So the fused graph is run on each of `checks`, its outputs
    compared with `expected` within `tolerance` where given, and the unfused graph is kept if
    any of it fails."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    from lowering.ort_attention_rank import restore_flat_attention_outputs
    from lowering.ort_rope import rewrite_rope_freqs

    program.optimize()  # constants folded, so that the RoPE rule sees its constant inputs
    # the unfused graph, optimized: what is exported if the fused one is dropped
    before = ir.serde.serialize_model(program.model) if check else None
    rope = rewrite_rope_freqs(program.model)
    program.model, fusions = optimize_for_ort(program.model)
    flat = restore_flat_attention_outputs(program.model)
    fusions = {**fusions, "rope_freqs_as_matmul": rope, "flat_attention_output": flat}
    if before is None:
        return dict(fusions), None
    import onnxruntime as ort

    try:  # with ORT's own graph optimisations on, as the real session will have them
        proto = ir.serde.serialize_model(program.model)
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        got = [run_session(sess, inputs) for inputs in checks]
    except Exception as e:  # onnxruntime raises its own Fail/InvalidArgument types
        why = f"onnxruntime cannot run the fused graph ({type(e).__name__}: {_cause(e)})"
    else:
        error = None
        if expected is not None:
            error = max(
                (g.float() - e.float()).abs().max().item()
                for outs, wants in zip(got, expected, strict=True)
                for g, e in zip(outs, wants, strict=True)
            )
        if error is None or error <= tolerance:
            return dict(fusions), None
        why = f"the fused graph is {error:.2e} off PyTorch (tolerance {tolerance:g})"
    log.warning("ORT fusions dropped: %s; the graph is exported unfused", why)
    program.model = ir.serde.deserialize_model(before)
    return {}, why


def _cause(error: BaseException) -> str:
    """The innermost exception's first line: the exporter wraps the real reason twice."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


# -- verification ------------------------------------------------------------------------


def fresh_inputs(
    example: Mapping[str, torch.Tensor],
    shapes: list[tuple[int, int]],
    seed: int = 1234,
    dims: Dims | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Random inputs like `example` at other (batch, sequence) sizes: integer inputs draw from
    the example's value range (ids stay in the vocabulary, masks stay ones), floats are normal.
    Every dynamic dim (`axis_names`) moves: batch to the given batch, the others by as much
    as the sequence moves, one size per axis."""
    g = torch.Generator().manual_seed(seed)
    names = axis_names(example, dims)
    first = next(iter(example.values()))
    example_seq = int(first.shape[1]) if first.dim() > 1 else 1
    out = []
    for batch, seq in shapes:
        made = {}
        for name, t in example.items():
            size = list(t.shape)
            for d in range(t.dim()):
                axis = names.get((name, d))
                if axis == "batch":
                    size[d] = batch
                elif axis is not None:
                    size[d] = int(t.shape[d]) + seq - example_seq
            if t.is_floating_point():
                made[name] = torch.randn(size, generator=g).to(t.dtype)
            else:
                lo, hi = int(t.min()), int(t.max())
                made[name] = torch.randint(lo, hi + 1, size, generator=g, dtype=t.dtype)
        out.append(made)
    return out


def verify_shapes(example: Mapping[str, torch.Tensor]) -> list[tuple[int, int]]:
    """Two (batch, sequence) sizes that differ from the example's."""
    first = next(iter(example.values()))
    batch = int(first.shape[0]) if first.dim() else 1
    seq = int(first.shape[1]) if first.dim() > 1 else 1
    return [(batch + 1, seq + 5), (1, seq + 9)]


def verify(
    path: str | os.PathLike,
    reference: Callable[..., Any],
    example: Mapping[str, torch.Tensor],
    tolerance: float,
    shapes: list[tuple[int, int]] | None = None,
    sess=None,
    inputs: list[dict[str, torch.Tensor]] | None = None,
    dims: Dims | None = None,
) -> tuple[dict[str, float], str]:
    """Run onnxruntime and `reference` on fresh inputs at two new shapes (or on `inputs`);
    raise above tolerance. Returns the max absolute error per shape and the provider used."""
    sess = sess or session(path)
    errors = {}
    fresh = inputs or fresh_inputs(example, shapes or verify_shapes(example), dims=dims)
    for feed in fresh:
        with torch.no_grad():
            expected = flat_outputs(reference(**feed))
        got = run_session(sess, feed)
        key = "x".join(str(s) for s in next(iter(feed.values())).shape)
        errors[key] = max(
            (g.float() - e.float()).abs().max().item() for g, e in zip(got, expected, strict=True)
        )
        print(f"verify {Path(path).name} at {key}: max |onnxruntime - PyTorch| = {errors[key]:.3e}")
        if not errors[key] <= tolerance:  # NaN fails too
            raise OnnxExportError(
                f"{path}: onnxruntime disagrees with PyTorch at input shape {key}: max error "
                f"{errors[key]:.3e} > tolerance {tolerance:g}. The file was written but is wrong; "
                "export with ort_fusions=False to tell a fusion bug from an exporter bug"
            )
    return errors, sess.get_providers()[0]


# -- the merged export -------------------------------------------------------------------


def _cast_inputs(inputs: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


@contextlib.contextmanager
def _cast_tensors(module: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Swap a cast copy of `module`'s floating-point parameters and buffers into it, for the
    duration; the originals are put back after, even on error.

    What `copy.deepcopy(module).to(dtype)` would trace, without copying the module tree or
    the fp32 weights: only the cast tensors are made (the export needs them anyway). Tied
    weights stay tied (one cast copy per tensor object). They go into the modules' own
    parameter and buffer tables, not through `torch.func.functional_call`, because the trace
    must see them as the module's parameters (sites are ops on parameters)."""
    cast: dict[int, torch.Tensor] = {}
    saved: list[tuple[dict, str, torch.Tensor]] = []

    def swap(table: dict, name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> None:
        value = table[name]
        if value is None or not value.is_floating_point():
            return
        if id(value) not in cast:
            cast[id(value)] = make(value)
        saved.append((table, name, value))
        table[name] = cast[id(value)]

    try:
        with torch.no_grad():
            for sub in module.modules():
                for name in list(sub._parameters):
                    swap(
                        sub._parameters,
                        name,
                        lambda p: torch.nn.Parameter(p.detach().to(dtype), requires_grad=False),
                    )
                for name in list(sub._buffers):
                    swap(sub._buffers, name, lambda b: b.detach().to(dtype))
        yield
    finally:
        for table, name, value in reversed(saved):
            table[name] = value


def merged_module(adapted, dtype: str = "fp32", safe_merge: bool = True) -> torch.fx.GraphModule:
    """The adapted model (an AdaptedModel or its Pipeline) with adapters folded in, in `dtype`;
    merging always runs in fp32.

    fp32 uses the pipeline's merge. fp16 re-traces the base model with fp16 copies of its
    weights swapped in (its graph casts to the traced dtype, so an fp32 graph cannot just take
    fp16 weights) and folds the merged weights, computed in fp32 and cast once, into it."""
    return unlift(*merged_program(adapted, dtype, safe_merge))


def merged_program(
    adapted, dtype: str = "fp32", safe_merge: bool = True
) -> tuple[Program, dict[str, torch.Tensor]]:
    """merged_module's program and the state it reads, before they become a GraphModule."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    pipeline = pipeline_of(adapted)
    if dtype == "fp32":
        return pipeline.merged_program(safe_merge=safe_merge)
    torch_dtype = DTYPES[dtype]
    assignments = pipeline.plan.assignments
    dense = pipeline.dense_state()  # a quantized base: dequantized in fp32, merged, cast once
    merged = merged_weights(assignments, dense, safe_merge, torch_dtype)
    base = pipeline.model
    inputs = _cast_inputs(pipeline.example_inputs, torch_dtype)
    with pipeline.dense_base(), _cast_tensors(base, torch_dtype):
        program = trace(base, inputs, False, pipeline.dynamic_shapes)
        state = pipeline.base_state()  # the fp16 copies, kept by the folded graph
    biases = merged_biases(assignments, dense, torch_dtype)
    return fold_weights(program, find_sites(program), assignments, state, merged, biases)


def export_merged(
    adapted,
    path: str | os.PathLike,
    dtype: str = "fp32",
    opset: int | None = None,
    dynamic: bool = True,
    *,
    check: bool = True,
    ort_fusions: bool = True,
    safe_merge: bool = True,
) -> ExportReport:
    """Fold the adapters of `adapted` (an AdaptedModel or its Pipeline) into its weights and
    export to ONNX.

    The file is verified with onnxruntime at two fresh shapes (tolerance 1e-4 fp32, 1e-2 fp16)
    and the merge drift against the unmerged model is measured and reported."""
    pipeline = pipeline_of(adapted)
    program, state = merged_program(pipeline, dtype, safe_merge)
    gm = unlift(program, state)
    fp32_example = pipeline.example_inputs
    example = _cast_inputs(fp32_example, DTYPES[dtype])
    dims = pipeline.program(training=False).input_dims  # as the trace resolved them
    # the fused graph is checked at the verify shapes: a fusion can go wrong only past some
    # length (a sliding window) or at some batch sizes
    checks = fresh_inputs(example, verify_shapes(example), dims=dims) if dynamic else None
    report = export_module(
        gm,
        example,
        path,
        opset=opset,
        dynamic=dynamic,
        ort_fusions=ort_fusions,
        dims=dims,
        fusion_check=checks,
        fusion_tolerance=TOLERANCE[dtype],
        exported=exported_program(program, state),  # after unlift: it takes the graph
    )
    report.dtype = dtype
    report.tolerance = TOLERANCE[dtype]
    kinds = sorted({r.kind for r in pipeline.quantized_weights.values()})
    report.quantized = "+".join(kinds) or None
    with torch.no_grad():
        unmerged = flat_outputs(pipeline.run(False, fp32_example))  # the eval graph, unmerged
        merged = flat_outputs(gm(**example))
    report.drift = max(
        (m.float() - u.float()).abs().max().item() for m, u in zip(merged, unmerged, strict=True)
    )
    if check:
        shapes = verify_shapes(example) if dynamic else [_shape_of(example)]
        report.max_errors, report.provider = verify(
            path, gm, example, report.tolerance, shapes, dims=dims
        )
    return report


def _shape_of(example: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    first = next(iter(example.values()))
    return (int(first.shape[0]), int(first.shape[1]) if first.dim() > 1 else 1)


def base_module(model: torch.nn.Module, example_inputs: Any) -> torch.fx.GraphModule:
    """The base model's own eval graph as a GraphModule (for node-count and speed baselines)."""
    program = trace(model, example_inputs, training=False)
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(model.named_buffers(remove_duplicate=False))
    return unlift(program, state)


__all__ = [
    "ExportReport",
    "OnnxExportError",
    "base_module",
    "export_merged",
    "export_module",
    "fresh_inputs",
    "merged_module",
    "op_multiset",
    "session",
    "verify",
]

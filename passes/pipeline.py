"""The compile pipeline: one object that owns what an adapted model is made of.

A `Pipeline` holds the model and its example inputs, the typed spec (its placement section
parsed once, with it), the traces, the plan, the adapter tensors, the debug flag and the named
pass pipelines, and builds every graph from them:

    spec ──load_spec(parse_placement)──▶ AdaptationSpec (placement typed)
    model ──trace(mode)──▶ an un-rewritten Program per mode, each mode traced at most once
    eval trace + calibration ──place, capture──▶ Plan, site inputs for data-driven inits
    trace + Plan ──ADAPT──▶ that mode's adapted graph (the eval trace that placement and
                            calibration read becomes the eval graph; it is not traced again)
    eval graph + Plan ──MERGE──▶ a merged, self-contained GraphModule

`peftc.AdaptedModel` is a thin nn.Module over it, and lowering (`lowering.onnx`,
`lowering.multi_adapter`, `lowering.inductor`) takes this object (`pipeline_of` finds it on an
AdaptedModel), never an AdaptedModel's private fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from cost_model.place import place, wants_scores
from cost_model.placement_spec import Placement, parse_placement
from cost_model.plan import Plan
from passes.adapters.insert import AdapterStore, create_adapter_tensors, insert_adapters
from passes.adapters.registry import methods
from passes.cleanup import Cleanup
from passes.fuse import FuseSiblings, fold_scale
from passes.fused_loss import fused_loss
from passes.merge import MergeAdapters, merged_biases, merged_weights
from passes.quantize import DequantizeBase, QuantizeBase, QuantizedBase, QuantStore
from rewrite.bnb_layers import read_bnb_layers
from rewrite.capture import capture_site_inputs
from rewrite.codec import QuantizedWeight
from rewrite.names import PREFIX, param_target
from rewrite.passes import Pass, PassManager, PassRecord
from rewrite.program import Program
from rewrite.quantize_config import QuantizeSpecError, parse_quantize
from rewrite.sites import SiteIndex, find_sites, is_output_head, mark_output_head, name_parts
from rewrite.spec import AdaptationSpec, SpecError, load_spec
from rewrite.trace import bind_inputs, check_inputs, trace
from rewrite.unlift import unlift
from rewrite.values import refresh_values

# The named pass pipelines, as their passes name themselves (`adapt_passes`, `merge_passes`).
ADAPT = ("insert_adapters", "fold_scale", "fuse_siblings", "cleanup")  # train and eval graphs
ADAPT_UNFUSED = ("insert_adapters", "cleanup")  # fuse=False
# training graphs with fused_loss=True (the default): the head's linear and the loss from
# `labels` become one chunked op (passes/fused_loss.py; a graph without that loss is unchanged)
ADAPT_TRAINING = ("insert_adapters", "fold_scale", "fuse_siblings", "fused_loss", "cleanup")
MERGE = ("merge_adapters", "cleanup")  # the eval graph with every adapter folded in
# with a quantized base (spec `quantize:`, or a bitsandbytes model), each pipeline starts with
# the quantize rewrite (ADAPT) or its inverse (MERGE): "quantize_base" / "dequantize_base"


class Pipeline:
    """The model, spec, traces, plan, adapter tensors and pass pipelines of one adaptation.

    Build it in order: `Pipeline(model, example_inputs, spec)` (the spec is parsed before
    anything is traced, so a bad spec fails fast), then `build(calibration)`. `from_peft`
    derives its spec from the sites, so it gives no spec, reads `sites` and calls
    `parse_spec` before `build`."""

    def __init__(
        self,
        model: torch.nn.Module,
        example_inputs: Any,
        spec: Any = None,
        *,
        debug: bool | None = None,
        fuse: bool = True,
        training: bool | None = None,
        registry: Mapping[str, type] | None = None,
        dynamic_shapes: Any = None,
        quantize: Any = None,
        fused_loss: bool = True,
    ):
        """`training` is the mode traced first (its sites are `sites`; default: the model's
        mode); the other mode is traced on first use, or reused from placement.
        `quantize` overrides the spec's `quantize:` section (same values). bitsandbytes layers
        of `model` are read here, before anything is traced (the model is changed in place).
        `fused_loss`: the training graph computes a loss from `labels` chunk by chunk, without
        the full logits, and returns `logits=None` (passes/fused_loss.py)."""
        self.model = model
        self.registry = methods() if registry is None else registry
        self.spec: AdaptationSpec | None = None
        try:
            self.quantize_option = parse_quantize(quantize)
        except QuantizeSpecError as e:
            raise SpecError(str(e)) from None
        # the quantized base: weight name -> its record, and the packed tensors as buffers
        self.quantized_base = QuantizedBase(model)
        self._from_bnb = bool(self.quantized_base.add(read_bnb_layers(model)))
        if spec is not None:
            self.parse_spec(spec)
        # bound once to the forward's names: every trace, check and export reads this dict
        self.example_inputs: dict[str, Any] = bind_inputs(model, example_inputs)
        self.dynamic_shapes = dynamic_shapes  # torch.export's, where the user states them
        self.debug = debug
        self.fuse = fuse
        self.fused_loss = fused_loss
        self.training = model.training if training is None else training
        self.plan: Plan | None = None
        self.adapters = AdapterStore()
        self.pass_records: list[PassRecord] = []  # the adapt pipeline as first run
        self._records_mode: bool | None = None  # the mode pass_records were built in
        self._records_with_code: list[PassRecord] | None = None
        # compiled callables that replace a mode's graph module when it runs (lowering.inductor)
        self.runners: dict[bool, Callable[..., Any]] = {}
        self._counters: tuple[Plan, list[str]] | None = None  # advance_step_counters' names
        self._traces: dict[bool, Program] = {}  # un-rewritten, until that mode's graph is built
        self._sites: dict[bool, SiteIndex] = {}
        self._programs: dict[bool, Program] = {}  # rewritten
        self._refreshed: set[bool] = set()
        # recompute the training graph's forward in the backward (transformers' flag, through
        # AdaptedModel.activation_checkpointing_enable); compiled graphs take it at compile
        self.checkpointing = False
        # per-block checkpointing (lowering/checkpointing.py): every n-th block, what it keeps
        self.checkpoint_every = 1
        self.checkpoint_policy = "recompute"

    # -- the spec -------------------------------------------------------------------------

    def parse_spec(self, source: Any) -> AdaptationSpec:
        """Read and validate the spec, its placement section included: the one parse."""
        spec = load_spec(source, self.registry, parse_placement=parse_placement)
        if self.quantize_option is not None:
            spec = dataclasses.replace(spec, quantize=self.quantize_option)
        if spec.quantize is not None and self._from_bnb:
            raise SpecError(
                "the model's layers are already quantized by bitsandbytes; drop quantize "
                "(peftc reads their NF4/int8 state as it is)"
            )
        self.spec = spec
        return self.spec

    @property
    def placement(self) -> Placement | None:
        """The spec's typed placement section (None without one)."""
        return self._spec().placement

    def _spec(self) -> AdaptationSpec:
        if self.spec is None:
            raise RuntimeError("the pipeline has no spec yet: call parse_spec(spec) first")
        return self.spec

    def _plan(self) -> Plan:
        if self.plan is None:
            raise RuntimeError("the pipeline has no plan yet: call build(calibration) first")
        return self.plan

    # -- traces ---------------------------------------------------------------------------

    def traced(self, training: bool) -> Program:
        """The un-rewritten trace of a mode, traced on first use and kept until that mode's
        adapted graph is built from it (placement and calibration read it first)."""
        if training in self._programs:
            raise RuntimeError(
                f"the {'training' if training else 'eval'} trace was already rewritten into "
                "its adapted graph; placement and calibration run before it is built"
            )
        if training not in self._traces:
            self._traces[training] = trace(
                self.model, self.example_inputs, training, self.dynamic_shapes
            )
        return self._traces[training]

    def sites_of(self, training: bool) -> SiteIndex:
        """The sites of a mode's trace (node names differ between the modes' traces)."""
        if training not in self._sites:
            built = self._programs.get(training)
            found = find_sites(self.traced(training) if built is None else built)
            found = name_parts(found, getattr(self.model, "config", None))
            self._sites[training] = mark_output_head(found, self.model)
        return self._sites[training]

    @property
    def sites(self) -> SiteIndex:
        """The sites of the first-traced mode: what the spec's rules select from."""
        return self.sites_of(self.training)

    def base_state(self) -> dict[str, torch.Tensor]:
        """The base model's parameters and buffers by name (tied names kept)."""
        out = dict(self.model.named_parameters(remove_duplicate=False))
        out.update(self.model.named_buffers(remove_duplicate=False))
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor the graphs read, by name: base parameters and buffers, the packed
        weights of a quantized base, then adapters."""
        out = self.base_state()
        out.update(self.quantized_base.state())
        out.update(self.adapter_parameters())
        return out

    # -- a quantized base (passes.quantize.QuantizedBase holds it) ------------------------

    @property
    def quantized(self) -> QuantStore:
        """The packed base weights as buffers (AdaptedModel registers it as `quantized`)."""
        return self.quantized_base.store

    @property
    def quantized_weights(self) -> dict[str, QuantizedWeight]:
        """Weight name -> its quantization record (empty without a quantized base)."""
        return self.quantized_base.records

    def _quantize_base(self) -> None:
        """Quantize the base weights the spec's `quantize:` section selects (after the adapter
        inits, which read the full-precision weights)."""
        config = self._spec().quantize
        if config is not None:
            self.quantized_base.quantize(config, self.sites, {a.site.path for a in self._plan()})

    def dense_weights(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Each quantized base weight dequantized in fp32, cast once (QuantizedBase)."""
        return self.quantized_base.dense_weights(dtype)

    def dense_base(self) -> contextlib.AbstractContextManager[None]:
        """The dequantized weights in the base model's parameters for the duration."""
        return self.quantized_base.dense_base()

    def dense_state(self) -> dict[str, torch.Tensor]:
        """`state()` with every quantized weight dequantized under its own name."""
        return {**self.state(), **self.dense_weights()}

    def base_weight_bytes(self, quantized_only: bool = False) -> int:
        """Bytes the base weights hold: with `quantized_only`, those of the quantized layers
        (codes and scales); else every base parameter and buffer too (each storage once)."""
        return self.quantized_base.base_weight_bytes(self.base_state(), quantized_only)

    def adapter_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The adapter tensors by their graph names (`adapters.<site>.<name>`)."""
        return {PREFIX + n: p for n, p in self.adapters.named_parameters()}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The adapter tensors that train (the base model is frozen)."""
        return [p for p in self.adapters.parameters() if p.requires_grad]

    def advance_step_counters(self) -> None:
        """Add 1 to every step counter (`ParamSpec.counter`: SingLoRA's t), as a training
        forward begins. Here rather than in the graph: a graph that wrote its input would
        have a recompute (activation checkpointing, a compiled backward) read the new value,
        and torch.utils.checkpoint refuses a saved input written after the save."""
        plan = self._plan()
        if self._counters is None or self._counters[0] is not plan:
            names = {
                param_target(a.method, a.site, name)
                for a in plan
                for name, spec in a.method.params(a.site).items()
                if spec.counter
            }
            self._counters = (plan, sorted(names))
        if self._counters[1]:
            state = self.adapter_parameters()
            with torch.no_grad():
                for name in self._counters[1]:
                    state[name].add_(1)

    # -- planning and building ---------------------------------------------------------------

    def place(self, calibration: list[Mapping[str, torch.Tensor]] | None = None) -> Plan:
        """Plan the adapters over `sites`. `calibration` is a list of bound input dicts; a
        data-driven placement scores them through the eval trace, which is kept for the eval
        graph (and for calibrating adapter inits) rather than traced again."""
        spec = self._spec()
        scoring = self.traced(self.training)
        if calibration is not None and wants_scores(spec.placement):
            scoring = self.traced(False)  # NFN/EVA without dropout
        weights = {**self.base_state(), **self.dense_weights()}  # a bnb base, dequantized
        self.plan = place(spec, self.sites, self.registry, scoring, weights, calibration)
        return self.plan

    def build(self, calibration: Iterable[Any] | None = None, loading: bool = False) -> None:
        """Place the adapters, make their tensors (data-driven inits read `calibration`) and
        build the first mode's adapted graph. `calibration` is an iterable of inputs in the
        form of the example inputs; `loading` means a checkpoint is loaded right after."""
        # bound once, so a one-shot iterable serves both the placement and the adapter init
        batches = None if calibration is None else [bind_inputs(self.model, b) for b in calibration]
        plan = self.place(batches)
        self.model.requires_grad_(False)  # the base is frozen; adapter inits may edit it
        captured = None if batches is None else self._calibrate(batches)
        create_adapter_tensors(
            plan.assignments,
            self.dense_state(),
            self.adapters,
            self._spec().seed,
            captured,
            loading=loading,
        )
        self._quantize_base()
        self.program(self.training)

    def _calibrate(self, batches: list[Mapping[str, torch.Tensor]]) -> dict | None:
        """Site inputs over the calibration batches, for methods whose init needs data,
        captured through the eval trace (the one placement read, when it read one)."""
        paths = [a.site.path for a in self._plan() if getattr(a.method, "needs_calibration", False)]
        if not paths:
            return None
        captured: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
        capture_site_inputs(
            self.traced(False),
            self.dense_state(),
            self.sites_of(False),
            paths,
            batches,
            lambda path, rows: captured[path].append(rows),
            desc="calibrating adapter init",
        )
        return captured

    # -- graphs -----------------------------------------------------------------------------

    def adapt_passes(
        self, program: Program, sites: SiteIndex, assignments: list | None = None
    ) -> list[Pass]:
        """The ADAPT pipeline for one mode's trace (ADAPT_UNFUSED with fuse=False; a training
        trace also gets fused_loss unless it is off, ADAPT_TRAINING); the plan's assignments
        unless `assignments` (the same plan on another trace's sites) are given."""
        chosen = self._plan().assignments if assignments is None else assignments
        passes: list[Pass] = [insert_adapters(program, sites, chosen)]
        if self.fuse:
            passes += [fold_scale(), FuseSiblings()]
        if self.quantized_weights:
            passes.insert(0, QuantizeBase(self.quantized_weights, self.state()))
        if self.fused_loss and program.training:
            head = next((s for s in sites if is_output_head(s)), None)
            nodes = sites.nodes.get(head.path, []) if head is not None else []
            weight_grad = head is not None and self.state()[head.weight].requires_grad
            passes.append(fused_loss(nodes, weight_grad))
        return [*passes, Cleanup()]

    def merge_passes(
        self, state: Mapping[str, torch.Tensor], safe_merge: bool = True
    ) -> tuple[list[Pass], MergeAdapters]:
        """The MERGE pipeline, and its merge pass (whose `state` holds the merged weights).
        With a quantized base, `state` must hold the dequantized weights (`dense_state`)."""
        assignments = self._plan().assignments
        merge = MergeAdapters(
            assignments,
            merged_weights(assignments, state, safe_merge),
            merged_biases(assignments, state),
        )
        first = [DequantizeBase()] if self.quantized_weights else []
        return [*first, merge, Cleanup()], merge

    def program(self, training: bool | None = None, values: bool = False) -> Program:
        """The adapted graph of a mode, built on first use from that mode's trace.

        `values=True` also gives every node its shape in the trace's symbols (what inspect
        shows; one fake-tensor run over the graph, done once)."""
        training = self.training if training is None else training
        if training not in self._programs:
            program = self.traced(training)
            sites = self.sites_of(training)
            manager = PassManager(self.adapt_passes(program, sites), debug=self.debug)
            # rewritten in place: from here on the trace is the adapted graph, so a rewrite
            # that fails leaves no half-rewritten trace (or its sites) behind to reuse
            del self._traces[training]
            try:
                manager.run(program)
            except BaseException:
                self._sites.pop(training, None)
                raise
            self._programs[training] = program
            if not self.pass_records:  # the pipeline as run at compile time
                self.pass_records = manager.records
                self._records_mode = training
        program = self._programs[training]
        if values and training not in self._refreshed:
            refresh_values(program, self.state())
            self._refreshed.add(training)
        return program

    def pass_trace(self, diffs: bool = False) -> list[PassRecord]:
        """The adapt pipeline's records as run at compile time. With `diffs` every record
        also holds the graph code before and after its pass; a compile that kept none (no
        debug) has the pipeline replayed once on a fresh trace of the same mode for them, so
        only inspect pays for diffs (one more torch.export)."""
        records = self.pass_records
        if not diffs or all(r.code_before is not None for r in records):
            return records
        if self._records_with_code is None:
            program = trace(
                self.model, self.example_inputs, self._records_mode, self.dynamic_shapes
            )
            passes = self.adapt_passes(program, find_sites(program))
            replay = PassManager(passes, keep_code=True)
            replay.run(program)
            self._records_with_code = [
                dataclasses.replace(r, code_before=again.code_before, code_after=again.code_after)
                for r, again in zip(records, replay.records, strict=True)
            ]
        return self._records_with_code

    def run(self, training: bool, inputs: Mapping[str, Any]) -> Any:
        """Run a mode's adapted graph on named inputs (compiled, where `runners` has it)."""
        program = self.program(training)
        check_inputs(program, inputs)
        if training:
            self.advance_step_counters()
        runner = self.runners.get(training)
        if training and self.checkpointing and runner is None and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(
                program.run, self.state(), inputs, None, use_reentrant=False
            )
        return program.run(self.state(), inputs, runner)

    def merge(self, safe_merge: bool = True) -> torch.fx.GraphModule:
        """A GraphModule (eval mode) with every adapter folded into its base weight."""
        return unlift(*self.merged_program(safe_merge))

    def merged_program(self, safe_merge: bool = True) -> tuple[Program, dict[str, torch.Tensor]]:
        """The eval program (a copy) with every adapter folded into its base weight, and the
        state it reads (tensors of its own)."""
        program = self.program(training=False).clone()
        state = self.dense_state()  # a quantized base: dequantized in fp32, cast once
        passes, merge = self.merge_passes(state, safe_merge)
        PassManager(passes, debug=self.debug).run(program)
        with torch.no_grad():
            owned = {k: v.detach().clone() for k, v in {**state, **merge.state}.items()}
        return program, owned

    # -- reports ----------------------------------------------------------------------------

    def summary(self) -> str:
        """One line of totals, the pass pipeline, then one line per adapted site."""
        plan = self._plan()
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.model.parameters()) + sum(
            p.numel() for p in self.adapters.parameters()
        )
        lines = [
            f"peftc: {len(plan)} of {len(self.sites)} sites adapted "
            f"({', '.join(sorted(plan.methods()))}); trainable {trainable:,} of {total:,} "
            f"parameters ({100 * trainable / max(total, 1):.3f}%)",
            f"pipeline: {' -> '.join(r.name for r in self.pass_records)}",
        ]
        for a in plan:
            n = sum(
                math.prod(s.shape)
                for s in a.method.params(a.site).values()
                if s.trainable and not s.shared
            )
            lines.append(
                f"  {a.site.path:<48} {a.site.op:<9} {a.site.in_features:>6}->{a.site.out_features:<6} "
                f"{a.method.name:<8} r={a.rank!s:<4} params={n:,}"
            )
        return "\n".join(lines)


def pipeline_of(adapted: Any) -> Pipeline:
    """The Pipeline itself, or the one an AdaptedModel (or any holder) carries as `.pipeline`."""
    if isinstance(adapted, Pipeline):
        return adapted
    pipeline = getattr(adapted, "pipeline", None)
    if not isinstance(pipeline, Pipeline):
        raise TypeError(
            f"expected a compiled model (peftc.compile / from_peft) or its Pipeline, got "
            f"{type(adapted).__name__}"
        )
    return pipeline

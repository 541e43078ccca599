"""The adapted model: the user's model, its adapter tensors, and the rewritten graphs.

It is an nn.Module called like the original model. The base model stays the owner of the
base weights (frozen); adapter tensors live under `adapters.`. Training and eval mode use
separately traced graphs (dropout differs), built from the same plan and sharing tensors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree

from cost_model.plan import Plan
from passes.adapters.insert import (
    PREFIX,
    AdapterStore,
    create_adapter_tensors,
    insert_adapters,
    param_target,
)
from passes.cleanup import Cleanup
from passes.fuse import FuseSiblings, fold_scale
from passes.merge import MergeAdapters, merged_weights
from rewrite.capture import capture_site_inputs
from rewrite.passes import PassManager, PassRecord
from rewrite.program import Program
from rewrite.sites import SiteIndex, find_sites
from rewrite.spec import AdaptationSpec
from rewrite.trace import bind_call, check_inputs, trace
from rewrite.unlift import unlift
from rewrite.values import refresh_values


class DeadAdapterWarning(UserWarning):
    """Adapters got no gradient (all zero or None) in the first backward: their sites' outputs
    most likely do not reach the loss, so they will never train."""


def dead_adapters(plan: Plan, params: Mapping[str, torch.nn.Parameter]) -> list[str]:
    """The planned sites whose own trainable adapter tensors all have a `.grad` that is None
    or exactly zero. All of them, not any: LoRA's A gets a zero gradient at the first step
    (B starts at zero) while B's is not. Shared tensors (VeRA's A/B) say nothing about one
    site and are left out; a site with no trainable tensor of its own is never reported."""
    dead = []
    for a in plan.assignments:
        own = [
            params[param_target(a.method, a.site, name)]
            for name, spec in a.method.params(a.site).items()
            if spec.trainable and not spec.shared
        ]
        own = [p for p in own if p.requires_grad]
        if own and all(p.grad is None or not bool(p.grad.any()) for p in own):
            dead.append(a.site.path)
    return dead


class AdaptedModel(torch.nn.Module):
    def __init__(
        self,
        model: torch.nn.Module,
        program: Program,
        sites: SiteIndex,
        plan: Plan,
        spec: AdaptationSpec,
        example_inputs: Any,
        calibration: Any = None,
        debug: bool | None = None,
        loading: bool = False,
        fuse: bool = True,
        eval_program: Program | None = None,
    ):
        """`calibration` is a list of batches already bound to input names; `eval_program`
        an un-rewritten eval-mode trace to reuse for it (else one is traced when needed)."""
        super().__init__()
        self.base = model
        model.requires_grad_(False)
        self.adapters = AdapterStore()
        self.sites = sites
        self.plan = plan
        self.spec = spec
        self._example_inputs = example_inputs
        self._debug = debug
        self._fuse = fuse
        self._compiled: dict[bool, Any] = {}
        self._refreshed: set[bool] = set()
        # the first-backward gradient check (see _arm_gradient_check): done once per model
        self._grad_check_done = False
        self._grad_check_queued = False
        self._grad_check_hooks: list[Any] = []
        self.pass_records: list[PassRecord] = []
        captured = None
        if calibration is not None:
            captured = self._calibrate(
                calibration, eval_program or (None if program.training else program)
            )
        create_adapter_tensors(
            plan.assignments, self.state(), self.adapters, spec.seed, captured, loading=loading
        )
        self._programs: dict[bool, Program] = {}
        self._programs[program.training] = self._rewrite(program, sites)
        self.train(model.training)

    def _calibrate(
        self, batches: Any, program: Program | None = None
    ) -> dict[str, list[torch.Tensor]] | None:
        """Site inputs over the calibration batches, for methods whose init needs data.

        `program` is an eval-mode trace not yet rewritten, reused when the caller has one."""
        paths = [a.site.path for a in self.plan if getattr(a.method, "needs_calibration", False)]
        if not paths:
            return None
        if program is None or program.training:
            program = trace(self.base, self._example_inputs, training=False)
        captured: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
        capture_site_inputs(
            program,
            self.state(),
            find_sites(program),
            paths,
            batches,
            lambda path, rows: captured[path].append(rows),
            desc="calibrating adapter init",
        )
        return captured

    # -- graphs -------------------------------------------------------------------------

    def _rewrite(self, program: Program, sites: SiteIndex) -> Program:
        passes = [insert_adapters(program, sites, self.plan.assignments)]
        if self._fuse:
            passes += [fold_scale(), FuseSiblings()]
        manager = PassManager([*passes, Cleanup()], debug=self._debug)
        manager.run(program)
        if not self.pass_records:  # the pipeline as run at compile time
            self.pass_records = manager.records
        return program

    def program(self, training: bool | None = None, values: bool = False) -> Program:
        """The rewritten graph for train (or eval) mode; the other mode is traced on first use.

        `values=True` also gives every node its shape in the trace's symbols (what inspect
        shows; one fake-tensor run over the graph, done once)."""
        training = self.training if training is None else training
        if training not in self._programs:
            traced = trace(self.base, self._example_inputs, training=training)
            self._programs[training] = self._rewrite(traced, find_sites(traced))
        program = self._programs[training]
        if values and training not in self._refreshed:
            refresh_values(program, self.state())
            self._refreshed.add(training)
        return program

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        return self.program().graph_module

    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor the graphs read, by name: base parameters and buffers, then adapters."""
        out = dict(self.base.named_parameters(remove_duplicate=False))
        out.update(self.base.named_buffers(remove_duplicate=False))
        out.update((PREFIX + n, p) for n, p in self.adapters.named_parameters())
        return out

    # -- calling ------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        program = self.program()
        inputs = bind_call(self.base, args, kwargs)
        check_inputs(program, inputs)
        out = program.run(self.state(), inputs, self._compiled.get(program.training))
        if not self._grad_check_done:  # after the first backward, this test is all it costs
            self._arm_gradient_check(out)
        return out

    # -- the first-backward gradient check ---------------------------------------------------
    #
    # A dead adapter's parameters get no gradient, so hooks on them would never fire for it.
    # Instead a hook on the model's outputs (outside the graph, so the Inductor-compiled
    # function is untouched) queues a callback that autograd runs when the whole backward is
    # done, every `.grad` accumulated; it reads the adapter tensors' `.grad` once, warns, and
    # removes every hook. Until that first backward each forward registers hooks on its
    # outputs (a forward whose outputs never see a backward keeps the check armed).

    def _arm_gradient_check(self, out: Any) -> None:
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return  # no backward will follow; or a caller's torch.compile traces this forward
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                self._grad_check_hooks.append(leaf.register_hook(self._on_output_grad))

    def _on_output_grad(self, grad: torch.Tensor) -> None:
        if not (self._grad_check_done or self._grad_check_queued):
            self._grad_check_queued = True  # several outputs (or forwards) share one backward
            torch.autograd.Variable._execution_engine.queue_callback(self._check_gradients)

    def _check_gradients(self) -> None:
        self._grad_check_done = True
        for handle in self._grad_check_hooks:
            handle.remove()
        self._grad_check_hooks.clear()
        dead = dead_adapters(self.plan, self.named_adapter_parameters())
        if not dead:
            return
        shown = ", ".join(dead[:8]) + (f" and {len(dead) - 8} more" if len(dead) > 8 else "")
        warnings.warn(
            f"peftc: after the first backward, {len(dead)} of {len(self.plan)} adapters got no "
            f"gradient (all zero or None): {shown}. Their sites' outputs most likely do not "
            "reach the loss (a loss on mean-pooled last_hidden_state never reads BERT's "
            "pooler), so they will never train; leave them out of the spec, or make the loss "
            "read those outputs",
            DeadAdapterWarning,
            stacklevel=1,  # autograd's engine calls this: no frame of the caller's to point at
        )

    def compile_for_training(
        self,
        mode: str | None = None,
        dynamic: bool = True,
        activation_checkpointing: bool = False,
    ) -> AdaptedModel:
        """Compile the training graph with Inductor (Triton on GPU, C++ on CPU), fullgraph,
        dynamic batch and sequence. Returns self; training-mode calls then run compiled."""
        from lowering.inductor import compile_program

        self._compiled[True] = compile_program(
            self.program(training=True), mode, dynamic, activation_checkpointing
        )
        return self

    # -- adapters -----------------------------------------------------------------------

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The adapter tensors that train (the base model is frozen)."""
        return [p for p in self.adapters.parameters() if p.requires_grad]

    def named_adapter_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {PREFIX + n: p for n, p in self.adapters.named_parameters()}

    def summary(self) -> str:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.base.parameters()) + sum(
            p.numel() for p in self.adapters.parameters()
        )
        lines = [
            f"peftc: {len(self.plan)} of {len(self.sites)} sites adapted "
            f"({', '.join(sorted(self.plan.methods()))}); trainable {trainable:,} of {total:,} "
            f"parameters ({100 * trainable / max(total, 1):.3f}%)",
            f"pipeline: {' -> '.join(r.name for r in self.pass_records)}",
        ]
        for a in self.plan:
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

    def save_adapter(self, directory: str) -> None:
        """Write adapter_model.safetensors + adapter_config.json in PEFT's format."""
        from peftc.peft_format import save_adapter

        save_adapter(self, directory)

    def load_adapter(self, directory: str) -> None:
        """Load adapter weights saved by peftc or by PEFT's save_pretrained."""
        from peftc.peft_format import load_adapter

        load_adapter(self, directory)

    # -- merging ------------------------------------------------------------------------

    def merge(self, safe_merge: bool = True) -> torch.fx.GraphModule:
        """A GraphModule (eval mode) with every adapter folded into its base weight."""
        program = self.program(training=False).clone()
        state = self.state()
        merge = MergeAdapters(
            self.plan.assignments, merged_weights(self.plan.assignments, state, safe_merge)
        )
        PassManager([merge, Cleanup()], debug=self._debug).run(program)
        merged_state = {**state, **merge.state}
        with torch.no_grad():
            owned = {k: v.detach().clone() for k, v in merged_state.items()}
        return unlift(program, owned)

    def export_onnx(
        self,
        path: str,
        dtype: str = "fp32",
        opset: int | None = None,
        dynamic: bool = True,
    ) -> Any:
        """Merge the adapters and export an ONNX file verified with onnxruntime (ExportReport)."""
        from lowering.onnx import export_merged

        return export_merged(self, path, dtype=dtype, opset=opset, dynamic=dynamic)

"""The adapted model: the user's model, its adapter tensors, and the rewritten graphs.

It is an nn.Module called like the original model, and a thin one: the `Pipeline`
(`passes/pipeline.py`) owns the spec, traces, plan, graphs and adapter tensors, and every
method here delegates to it. The module is what training code holds: the base model stays
the owner of the base weights (frozen, under `base.`), adapter tensors live under `adapters.`
(both registered here, so `parameters()`, `state_dict()` and `.to()` see them). Training and
eval mode use separately traced graphs (dropout differs), built from the same plan and sharing
tensors.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from cost_model.plan import Plan
from passes.pipeline import Pipeline
from peftc.gradient_check import DeadAdapterWarning, GradientCheck, dead_adapters
from rewrite.dequant import recompute_dequantized
from rewrite.passes import PassRecord
from rewrite.program import Program
from rewrite.sites import SiteIndex
from rewrite.spec import AdaptationSpec
from rewrite.trace import bind_call

__all__ = ["AdaptedModel", "DeadAdapterWarning", "dead_adapters"]


class AdaptedModel(torch.nn.Module):
    # transformers' Trainer: the loss is the traced model's own (its mean over the batch), so
    # Trainer scales it for gradient accumulation instead of passing num_items_in_batch
    accepts_loss_kwargs = False
    supports_gradient_checkpointing = True

    def __init__(self, pipeline: Pipeline):
        """`pipeline` is built (`Pipeline.build`): it has its plan and adapter tensors."""
        super().__init__()
        if pipeline.plan is None:
            raise ValueError("AdaptedModel needs a built pipeline (Pipeline.build) with a plan")
        # forward shows the base model's signature (see adapted_class)
        self.__class__ = adapted_class(type(pipeline.model))
        self.pipeline = pipeline
        self._compile_options: dict[str, Any] | None = None
        # registered here too (the same module objects the pipeline reads), so that
        # parameters(), state_dict() and .to() cover the base and the adapters
        self.base = pipeline.model
        self.adapters = pipeline.adapters
        self.quantized = pipeline.quantized  # a quantized base's packed weights (buffers)
        self._gradient_check = GradientCheck(pipeline)
        self.train(pipeline.model.training)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # pickle and copy.deepcopy come here; the traces hold fake tensors and the compiled
        # steps are code, so neither could copy them, and a rebuilt copy would re-run the
        # adapter inits that edit the base (PiSSA's residual)
        raise TypeError(
            f"a peftc adapted model ({type(self).__name__}) cannot be pickled or deep-copied "
            "as a whole: it holds traced graphs and compiled code. Save its adapters with "
            "adapted.save_adapter(directory) and rebuild with peftc.from_peft(model, "
            "directory, example_inputs), or copy adapted.state_dict() (torch.save takes it)"
        )

    # -- what the pipeline owns, read through --------------------------------------------

    @property
    def plan(self) -> Plan:
        return self.pipeline.plan

    @property
    def sites(self) -> SiteIndex:
        return self.pipeline.sites

    @property
    def spec(self) -> AdaptationSpec:
        return self.pipeline.spec

    @property
    def fused_loss(self) -> bool:
        """Whether the training graph's loss from `labels` is fused with the output head
        (`peftc.compile(..., fused_loss=)`): training-mode calls then return logits=None."""
        return self.pipeline.fused_loss

    @property
    def pass_records(self) -> list[PassRecord]:
        return self.pipeline.pass_records

    def pass_trace(self, diffs: bool = False) -> list[PassRecord]:
        """The pass records; with `diffs`, each with the graph code around its pass (see
        Pipeline.pass_trace: a compile without debug replays the pipeline once for them)."""
        return self.pipeline.pass_trace(diffs)

    def program(self, training: bool | None = None, values: bool = False) -> Program:
        """The rewritten graph for train (or eval) mode; the other mode is built on first use.

        `values=True` also gives every node its shape in the trace's symbols (what inspect
        shows; one fake-tensor run over the graph, done once)."""
        return self.pipeline.program(self.training if training is None else training, values)

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        return self.program().graph_module

    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor the graphs read, by name: base parameters and buffers, then adapters."""
        return self.pipeline.state()

    # -- calling ------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = bind_call(self.base, args, kwargs)
        if self.pipeline.quantized_weights:
            # autograd keeps how to dequantize each base weight, not the weight (rewrite/dequant.py)
            with recompute_dequantized():
                out = self.pipeline.run(self.training, inputs)
        else:
            out = self.pipeline.run(self.training, inputs)
        if not self._gradient_check.done:  # after the first backward, this test is all it costs
            self._gradient_check.arm(out)
        return out

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' `generate` (any GenerationMixin arguments; KV cache as the model
        uses it) with the adapters live, unmerged: see peftc/generate.py."""
        from peftc.generate import generate

        return generate(self.pipeline, *args, **kwargs)

    # the first-backward check's state, under the names tests and callers have read
    @property
    def _grad_check_done(self) -> bool:
        return self._gradient_check.done

    @property
    def _grad_check_hooks(self) -> list[Any]:
        return self._gradient_check.hooks

    def compile_for_training(
        self,
        mode: str | None = None,
        dynamic: bool = True,
        activation_checkpointing: bool = False,
        frozen_casts: bool = True,
    ) -> AdaptedModel:
        """Compile the training graph with Inductor (Triton on GPU, C++ on CPU), fullgraph,
        dynamic batch and sequence. Returns self; training-mode calls then run compiled.
        `activation_checkpointing` recomputes each block in the backward, keeping its matmul
        outputs (see `activation_checkpointing_enable`). Under `torch.autocast`, with
        `frozen_casts`, the frozen base weights that only feed matmuls are cast to autocast's
        dtype once and kept between steps (cast again when they change in place; not through
        `.data`), instead of at every step: the same numbers, for half their fp32 size in
        memory (lowering/frozen_casts.py)."""
        from lowering.inductor import compile_pipeline

        activation_checkpointing = activation_checkpointing or self.pipeline.checkpointing
        self.pipeline.checkpointing = activation_checkpointing
        compile_pipeline(self.pipeline, mode, dynamic, activation_checkpointing, frozen_casts)
        self._compile_options = {"mode": mode, "dynamic": dynamic, "frozen_casts": frozen_casts}
        return self

    # transformers' activation (gradient) checkpointing flags, as Trainer sets them

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
        policy: str | None = None,
    ) -> None:
        """Recompute activations in the backward, block by block: the training graph is cut
        into one piece per repeated layer and every `every_n_layers`-th is checkpointed
        (non-reentrant, whatever else `activation_checkpointing_kwargs` say). `policy` (or
        `activation_checkpointing_kwargs["policy"]`): "recompute" keeps only each block's
        inputs; "save_matmuls" keeps its matmul and attention outputs and recomputes the
        elementwise ops (torch's selective checkpointing). A model without repeated layers is
        recomputed whole. A compiled graph is compiled again with it."""
        from lowering.checkpointing import check_policy

        if offload:
            raise ValueError(
                "peftc checkpoints activations by recomputing them, not by offloading them; "
                "drop offload from the activation checkpointing options"
            )
        if every_n_layers < 1:
            raise ValueError(f"every_n_layers must be 1 or more, got {every_n_layers}")
        chosen = policy or (activation_checkpointing_kwargs or {}).get("policy", "recompute")
        self.pipeline.checkpoint_policy = check_policy(chosen)
        self.pipeline.checkpoint_every = every_n_layers
        self._set_checkpointing(True)

    def activation_checkpointing_disable(self) -> None:
        self._set_checkpointing(False)

    gradient_checkpointing_enable = activation_checkpointing_enable
    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.pipeline.checkpointing

    def _set_checkpointing(self, on: bool) -> None:
        self.pipeline.checkpointing = on
        if self._compile_options is not None:  # compiled: compile again with the new setting
            from lowering.inductor import compile_pipeline

            opts = self._compile_options
            compile_pipeline(self.pipeline, opts["mode"], opts["dynamic"], on, opts["frozen_casts"])
            return
        # eager: the per-block pieces run the training graph (None: recomputed whole, by run)
        from lowering.checkpointing import per_block

        pipeline = self.pipeline
        blocks = (
            per_block(pipeline, pipeline.checkpoint_every, pipeline.checkpoint_policy)
            if on
            else None
        )
        if blocks is None:
            self.pipeline.runners.pop(True, None)
        else:
            self.pipeline.runners[True] = blocks

    # -- adapters -----------------------------------------------------------------------

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The adapter tensors that train (the base model is frozen)."""
        return self.pipeline.trainable_parameters()

    def base_weight_bytes(self, quantized_only: bool = False) -> int:
        """Bytes held by the base weights; `quantized_only`: those of the quantized layers
        (codes and scales), the number to compare with their fp32 size."""
        return self.pipeline.base_weight_bytes(quantized_only)

    def named_adapter_parameters(self) -> dict[str, torch.nn.Parameter]:
        return self.pipeline.adapter_parameters()

    def summary(self) -> str:
        return self.pipeline.summary()

    def save_adapter(self, directory: str, format: str = "auto") -> None:
        """Write adapter_model.safetensors + adapter_config.json: PEFT's format where PEFT has
        the method, else peftc's own (peft_type "PEFTC_<NAME>", which PEFT cannot read);
        `format="peft"` refuses a method PEFT does not have instead."""
        from peftc.peft_format import save_adapter

        save_adapter(self.pipeline, directory, format=format)

    def load_adapter(self, directory: str) -> None:
        """Load adapter weights saved by peftc or by PEFT's save_pretrained."""
        from peftc.peft_format import load_adapter

        load_adapter(self.pipeline, directory)

    # -- merging ------------------------------------------------------------------------

    def merge(self, safe_merge: bool = True) -> torch.fx.GraphModule:
        """A GraphModule (eval mode) with every adapter folded into its base weight."""
        return self.pipeline.merge(safe_merge=safe_merge)

    def export_onnx(
        self,
        path: str,
        dtype: str = "fp32",
        opset: int | None = None,
        dynamic: bool = True,
        *,
        ort_fusions: bool = True,
    ) -> Any:
        """Merge the adapters and export an ONNX file verified with onnxruntime (ExportReport).
        `dtype="int8"`: the fp32 export quantized by onnxruntime (Int8Report: drift, speed).
        `ort_fusions=False` keeps the exporter's graph without onnxruntime's fused operators."""
        if dtype == "int8":
            from lowering.onnx_int8 import export_int8

            return export_int8(self.pipeline, path, opset=opset, ort_fusions=ort_fusions)
        from lowering.onnx import export_merged

        return export_merged(
            self.pipeline, path, dtype=dtype, opset=opset, dynamic=dynamic, ort_fusions=ort_fusions
        )

    def export_genai(
        self,
        directory: str,
        dtype: str = "fp32",
        *,
        model_dir: str | None = None,
        check: bool = True,
    ) -> Any:
        """Merge the adapters and write an onnxruntime-genai package to `directory`: a decoder
        ONNX graph with a KV cache and genai_config.json (plus the tokenizer files of
        `model_dir`), verified by onnxruntime-genai's greedy tokens against transformers'
        `generate` on the merged model (GenaiReport). Several adapters in one package:
        `lowering.genai.export_genai(adapters, directory, mode="inputs" | "mixed")`."""
        from lowering.genai import export_genai

        return export_genai(self.pipeline, directory, dtype=dtype, model_dir=model_dir, check=check)


@functools.cache
def adapted_class(base_class: type) -> type:
    """AdaptedModel whose `forward` shows `base_class.forward`'s signature, so the adapted
    model reads like the original one: transformers' Trainer keeps the dataset columns the
    signature names, finds `labels` in it and sees whether the model can return a loss."""
    try:
        signature = inspect.signature(base_class.forward)
    except (TypeError, ValueError):  # a forward without a readable signature
        return AdaptedModel

    def forward(self: AdaptedModel, *args: Any, **kwargs: Any) -> Any:
        return AdaptedModel.forward(self, *args, **kwargs)

    forward.__signature__ = signature
    forward.__doc__ = f"{base_class.__name__}.forward, through the adapted graph."
    name = f"Adapted{base_class.__name__}"
    return type(name, (AdaptedModel,), {"forward": forward, "__module__": __name__})

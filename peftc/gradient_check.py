"""The first-backward gradient check: warn once about adapters that got no gradient.

An adapter whose site's output never reaches the loss (a loss on mean-pooled
last_hidden_state never reads BERT's pooler) gets no gradient and never trains. A dead
adapter's parameters get no gradient, so hooks on them would never fire for it. Instead a hook
on the model's outputs (outside the graph, so the Inductor-compiled function is untouched)
queues a callback that autograd runs when the whole backward is done, every `.grad`
accumulated; it reads the adapter tensors' `.grad` once, warns, and removes every hook. Until
that first backward each forward registers hooks on its outputs (a forward whose outputs never
see a backward keeps the check armed).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Protocol

import torch
import torch.utils._pytree as pytree

from cost_model.plan import Plan
from rewrite.names import param_target


class DeadAdapterWarning(UserWarning):
    """Adapters got no gradient (all zero or None) in the first backward: their sites' outputs
    most likely do not reach the loss, so they will never train."""


class _Adapted(Protocol):
    """What the check reads when the backward is done: the plan and the adapter tensors."""

    plan: Plan

    def adapter_parameters(self) -> dict[str, torch.nn.Parameter]: ...


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


class GradientCheck:
    """Armed by each forward until the first backward has run; then checks once and is done."""

    def __init__(self, adapted: _Adapted):
        # read when the backward is done, not now: the plan and tensors may be replaced
        # (load_adapter, load_state_dict) between compile and the first step
        self.adapted = adapted
        self.done = False
        self.queued = False
        self.hooks: list[Any] = []

    def arm(self, out: Any) -> None:
        """Hook the outputs of one forward (a no-op once the check has run)."""
        if self.done or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return  # no backward will follow; or a caller's torch.compile traces this forward
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                self.hooks.append(leaf.register_hook(self._on_output_grad))

    def _on_output_grad(self, grad: torch.Tensor) -> None:
        if not (self.done or self.queued):
            self.queued = True  # several outputs (or forwards) share one backward
            torch.autograd.Variable._execution_engine.queue_callback(self._check)

    def _check(self) -> None:
        self.done = True
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()
        plan = self.adapted.plan
        dead = dead_adapters(plan, self.adapted.adapter_parameters())
        if not dead:
            return
        shown = ", ".join(dead[:8]) + (f" and {len(dead) - 8} more" if len(dead) > 8 else "")
        warnings.warn(
            f"peftc: after the first backward, {len(dead)} of {len(plan)} adapters got no "
            f"gradient (all zero or None): {shown}. Their sites' outputs most likely do not "
            "reach the loss (a loss on mean-pooled last_hidden_state never reads BERT's "
            "pooler), so they will never train; leave them out of the spec, or make the loss "
            "read those outputs",
            DeadAdapterWarning,
            stacklevel=1,  # autograd's engine calls this: no frame of the caller's to point at
        )

"""Shared checks of one adapter method against Hugging Face PEFT (the oracle), fp32, 1e-5.

tests/test_methods.py runs them on every method's shared model; each
`tests/test_method_<name>.py` runs them on the PEFT configs of its own (other forms, patterns,
architectures):
PEFT parity both ways, merge (merged == unmerged, merged weights == PEFT's
merge_and_unload), gradients reaching exactly the declared trainable tensors, and costs
(param count == PEFT's get_nb_trainable_parameters == the sympy cost formula).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

import peftc
from passes.merge import merged_weights
from rewrite.names import param_target
from tests.models import minilm_2_layers, perturb, tiny_gpt2, tiny_llama, token_inputs

TOL = 1e-5  # fp32


ARCHS = {
    "llama": (tiny_llama, 128),
    "gpt2": (tiny_gpt2, 128),
    "minilm": (minilm_2_layers, 30522),
}


@dataclass
class Case:
    """One architecture: the base model, a PEFT model (the oracle) and the peftc model,
    holding the same adapter weights."""

    arch: str
    base: torch.nn.Module
    peft: torch.nn.Module
    adapted: peftc.AdaptedModel
    at_init: torch.Tensor | None = None  # peftc's output before the checkpoint was loaded


def shared_case(model) -> Case:
    """A method's shared model (tests/method_cases.py, tiny Llama) as a Case: PEFT's model is
    the one loaded from peftc's checkpoint of the shared trained state."""
    return Case("llama", model.base, model.peft(), model.adapted, model.at_init)


def example_inputs(arch: str) -> dict:
    return token_inputs(2, 12, vocab=ARCHS[arch][1])


def fresh_inputs(arch: str) -> dict:
    """Other shapes and tokens than the trace's, so dynamic dims are exercised."""
    return token_inputs(3, 9, vocab=ARCHS[arch][1], seed=5)


def out(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        result = model(**inputs)
    if isinstance(result, torch.Tensor):
        return result
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def peft_trainable(peft_model) -> list[torch.nn.Parameter]:
    return [p for p in peft_model.parameters() if p.requires_grad]


def make_peft(arch: str, config, directory: Path, std: float, seed: int = 3):
    """A base model and its PEFT model with perturbed (non-zero) adapter weights, saved to
    `directory` with save_pretrained. Returns (base, peft_model), in eval mode."""
    base = ARCHS[arch][0]()
    peft_model = get_peft_model(copy.deepcopy(base), config)
    perturb(peft_trainable(peft_model), std=std, seed=seed)
    peft_model.eval().save_pretrained(directory)
    return base, peft_model


def from_peft_case(arch: str, config, directory: Path, std: float) -> Case:
    """PEFT saves; peftc.from_peft reads its config into a spec and loads its weights."""
    base, peft_model = make_peft(arch, config, directory, std)
    return Case(
        arch, base, peft_model, peftc.from_peft(base, directory, example_inputs(arch)).eval()
    )


def compiled_case(arch: str, spec: dict, config, directory: Path, std: float) -> Case:
    """peftc compiles `spec` and records its output at init (for `assert_identity_at_init`),
    then load_adapter loads the PEFT checkpoint of `config`."""
    base, peft_model = make_peft(arch, config, directory, std)
    adapted = peftc.compile(base, spec, example_inputs(arch)).eval()
    case = Case(arch, base, peft_model, adapted)
    case.at_init = out(adapted, fresh_inputs(arch))
    adapted.load_adapter(directory)
    return case


def assert_identity_at_init(case: Case) -> None:
    expected = out(case.base, fresh_inputs(case.arch))
    torch.testing.assert_close(case.at_init, expected, atol=TOL, rtol=TOL)


def assert_peft_parity(case: Case) -> None:
    x = fresh_inputs(case.arch)
    expected = out(case.peft, x)
    assert (expected - out(case.base, x)).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(out(case.adapted, x), expected, atol=TOL, rtol=TOL)


def assert_peftc_to_peft(case: Case, directory: Path, std: float) -> dict:
    """peftc saves (new perturbed weights), PEFT loads, both agree; the case's weights are
    restored afterwards. Returns the adapter_config.json that peftc wrote."""
    adapted = case.adapted
    before = [p.detach().clone() for p in adapted.trainable_parameters()]
    try:
        perturb(adapted.trainable_parameters(), std=std, seed=11)
        adapted.save_adapter(directory)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(case.base), directory).eval()
        x = fresh_inputs(case.arch)
        ours = out(adapted, x)
        assert (ours - out(case.base, x)).abs().max() > 1e-3
        assert (ours - out(case.peft, x)).abs().max() > 1e-3  # new weights, not the old ones
        torch.testing.assert_close(out(peft_model, x), ours, atol=TOL, rtol=TOL)
    finally:
        with torch.no_grad():
            for p, v in zip(adapted.trainable_parameters(), before, strict=True):
                p.copy_(v)
    return json.loads((directory / "adapter_config.json").read_text())


def assert_merge_matches(case: Case) -> None:
    """merged == unmerged, and each merged weight == PEFT's merge_and_unload weight."""
    adapted, x = case.adapted, fresh_inputs(case.arch)
    unmerged = out(adapted, x)
    assert (unmerged - out(case.base, x)).abs().max() > 1e-3
    merged = adapted.merge()
    assert not any(n.meta.get("peftc") for n in merged.graph.nodes)  # adapters folded away
    torch.testing.assert_close(out(merged, x), unmerged, atol=TOL, rtol=TOL)
    ours = merged_weights(adapted.plan.assignments, adapted.state())
    theirs = copy.deepcopy(case.peft).merge_and_unload()
    for a in adapted.plan:
        expected = theirs.get_submodule(a.site.path).weight
        assert not torch.equal(expected, case.base.get_submodule(a.site.path).weight)
        torch.testing.assert_close(ours[a.site.path], expected, atol=TOL, rtol=TOL)


def declared_trainable(adapted) -> set[str]:
    return {
        param_target(a.method, a.site, name)
        for a in adapted.plan
        for name, spec in a.method.params(a.site).items()
        if spec.trainable
    }


def assert_gradients_reach_declared(case: Case) -> None:
    """A backward pass gives non-zero gradients to exactly the declared trainable adapter
    tensors; base weights and frozen adapter tensors get none.

    It runs the eval-mode graph: the configs here have no dropout, so it is the training
    graph's maths, and a second trace (the slowest step of these tests) is saved.
    """
    adapted = case.adapted
    adapted.zero_grad(set_to_none=True)
    loss = out_with_grad(adapted, fresh_inputs(case.arch)).float().pow(2).mean()
    loss.backward()
    params = dict(adapted.named_parameters())
    reached = {n for n, p in params.items() if p.grad is not None}
    assert reached == declared_trainable(adapted)
    for n in reached:
        assert params[n].grad.abs().sum() > 0, n
    assert all(not p.requires_grad for p in adapted.base.parameters())
    adapted.zero_grad(set_to_none=True)


def out_with_grad(model, inputs: dict) -> torch.Tensor:
    result = model(**inputs)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def assert_costs_match(case: Case) -> int:
    """peftc's trainable count == PEFT's == the sympy cost formulas summed over sites."""
    ours = sum(p.numel() for p in case.adapted.trainable_parameters())
    theirs, _ = case.peft.get_nb_trainable_parameters()
    formula = sum(a.method.cost(a.site).evaluate()["params"] for a in case.adapted.plan)
    assert ours == theirs == formula, (ours, theirs, formula)
    return ours

"""Every registered method, compiled from its case (tests/method_cases.py) on tiny Llama,
against Hugging Face PEFT where the method has a PEFT record (fp32, 1e-5): identity at init,
checkpoints both ways and the config read back, merge, gradients and parameter counts.

PEFT's model is loaded from peftc's checkpoint (so no test writes a PEFT config by hand);
`tests/test_method_<name>.py` holds what one method adds: its own PEFT configs and forms, its
maths, its errors.
"""

import copy
import dataclasses

import pytest
import torch

from passes.adapters.base import bind_plan
from passes.adapters.registry import methods
from passes.merge import merged_weights
from peftc.peft_format import claims, method_for_config, read_config, spec_from_peft
from rewrite.spec import load_spec, resolve
from tests import method_checks as mc
from tests.method_cases import ROWS, TOL, case, cases, fresh_inputs, logits, names


def plan_of(assignments) -> list:
    return [(a.path, a.method) for a in assignments]


def test_every_row_is_a_registered_method_and_its_fields():
    """A row left behind by a renamed or removed method, or naming a field the method does not
    declare, is an error rather than a row no test reads."""
    assert set(ROWS) <= set(methods())
    for name in ROWS:
        assert set(case(name).hyper) <= {f.name for f in dataclasses.fields(methods()[name])}


@pytest.mark.parametrize("name", names(starts_as_identity=True))
def test_identity_at_init(method_model, name):
    model = method_model(name)
    expected = logits(model.base, fresh_inputs())
    torch.testing.assert_close(model.at_init, expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", names(starts_as_identity=False))
def test_declared_not_identity_moves_the_model_at_init(method_model, name):
    """A method that declares `starts_as_identity = False` (LoRA-XS's random R, SVFT's gate)
    does change the output at init: the declaration is true, not a way out of the test."""
    model = method_model(name)
    assert not torch.equal(model.at_init, logits(model.base, fresh_inputs()))


@pytest.mark.parametrize("name", names(peft=False))
def test_own_format_checkpoint(method_model, name, tmp_path):
    """A method PEFT lacks saves in peftc's own format: PEFT's file layout, a PEFTC_ peft_type
    and the method's hyperparameters; the config reads back as this plan, and a PEFT-format
    save is refused with the way out."""
    model = method_model(name)
    model.adapted.save_adapter(tmp_path)
    config = read_config(tmp_path)
    cls = model.case.cls
    assert config["peft_type"] == "PEFTC_" + name.upper()
    assert sorted(config["target_modules"]) == sorted(a.path for a in model.adapted.plan)
    for field, value in model.case.hyper.items():
        assert config[field] == value, field
    assert method_for_config(config) is cls
    spec = load_spec(spec_from_peft(config, model.sites), methods())
    again = bind_plan(resolve(spec, model.sites, methods()))
    assert plan_of(again) == plan_of(model.adapted.plan)
    with pytest.raises(ValueError, match="not a Hugging Face PEFT method.*format='auto'"):
        model.adapted.save_adapter(tmp_path / "peft", format="peft")


@pytest.mark.parametrize("name", names(peft=True))
def test_peftc_checkpoint_loads_into_peft(method_model, name):
    """PEFT loads peftc's checkpoint and computes the same; the config reads back as this
    plan, or (a method saved in another's format: LoRA+, PiSSA's converted LoRA) as that one."""
    model = method_model(name)
    x = fresh_inputs()
    ours = logits(model.adapted, x)
    assert (ours - logits(model.base, x)).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(logits(model.peft(), x), ours, atol=TOL, rtol=TOL)
    config, cls, registry = model.peft_config(), model.case.cls, methods()
    reader = method_for_config(config)  # raises where no method reads it
    if cls.peft.claims and cls.peft.saved_as is None:
        assert reader is cls and claims(cls, config)
        spec = load_spec(spec_from_peft(config, model.sites), registry)
        again = bind_plan(resolve(spec, model.sites, registry))
        assert plan_of(again) == plan_of(model.adapted.plan)
    else:
        assert reader is not cls and not claims(cls, config)


@pytest.mark.parametrize("name", names(peft=True))
def test_peft_checkpoint_loads_into_peftc(method_model, name, tmp_path):
    """PEFT's model, with new trained-looking values, saved by PEFT and loaded by peftc."""
    model = method_model(name)
    theirs = copy.deepcopy(model.peft())
    mc.perturb(mc.peft_trainable(theirs), std=model.case.std, seed=7)
    theirs.save_pretrained(tmp_path)
    x = fresh_inputs()
    before = logits(model.adapted, x)
    model.adapted.load_adapter(tmp_path)
    expected = logits(theirs, x)
    assert (expected - before).abs().max() > 1e-3  # new values, not the old ones
    torch.testing.assert_close(logits(model.adapted, x), expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", names(mergeable=True))
def test_merge(method_model, name):
    """merged == unmerged with no adapter node left; each merged weight == PEFT's
    merge_and_unload weight, where PEFT has the method."""
    model = method_model(name)
    adapted, x = model.adapted, fresh_inputs()
    unmerged = logits(adapted, x)
    assert (unmerged - logits(model.base, x)).abs().max() > 1e-3
    merged = adapted.merge()
    assert not any(n.meta.get("peftc") for n in merged.graph.nodes)  # adapters folded away
    with torch.no_grad():
        got = merged(**x).logits
    torch.testing.assert_close(got, unmerged, atol=TOL, rtol=TOL)
    ours = merged_weights(adapted.plan.assignments, adapted.state())
    peft_model = model.peft()
    theirs = None if peft_model is None else copy.deepcopy(peft_model).merge_and_unload()
    for a in adapted.plan:
        base_weight = model.base.get_submodule(a.site.path).weight
        assert not torch.equal(ours[a.site.path], base_weight)
        if theirs is not None:
            expected = theirs.get_submodule(a.site.path).weight
            torch.testing.assert_close(ours[a.site.path], expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("name", names())
def test_checkpoint_round_trips(method_model, name, tmp_path):
    """save_adapter, other values, load_adapter: the saved values and outputs come back (for
    every method, PEFT's or not)."""
    model = method_model(name)
    x = fresh_inputs()
    saved = logits(model.adapted, x)
    model.adapted.save_adapter(tmp_path)
    model.case.perturb(model.adapted, seed=11)
    assert (logits(model.adapted, x) - saved).abs().max() > 1e-4  # other values now
    model.adapted.load_adapter(tmp_path)
    for key, p in model.adapted.named_adapter_parameters().items():
        assert torch.equal(p, model.trained[key]), key
    torch.testing.assert_close(logits(model.adapted, x), saved, atol=0, rtol=0)


@pytest.mark.parametrize("name", names())
def test_gradients_reach_exactly_the_declared_tensors(method_model, name):
    model = method_model(name)
    mc.assert_gradients_reach_declared(mc.Case("llama", model.base, None, model.adapted))


@pytest.mark.parametrize("name", [c.name for c in cases(peft=True) if c.cls.peft.saved_as is None])
def test_trainable_count_matches_peft(method_model, name):
    """peftc's trainable tensors == PEFT's get_nb_trainable_parameters == the cost formula
    (methods saved converted, PiSSA and CorDA, train fewer tensors than the converted LoRA:
    their files compare with PEFT's own model of the method)."""
    assert mc.assert_costs_match(mc.shared_case(method_model(name))) > 0

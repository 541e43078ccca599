"""The methods PEFT lacks (../shared/methods-reference.md) train exactly the counts of the
reference's table, per linear site, with the hyperparameters of each method's test case.

The formulas are the table's, written here as the oracle (not read from the method files or
their cost formulas); `h` is the site's method, so its defaults and the case's values count.
"""

import pytest

from passes.adapters.registry import methods
from tests.method_cases import names


def _mora_rank(i: int, o: int, h) -> int:
    r = int(((i + o) * h.rank) ** 0.5 + 0.5)
    return r // 2 * 2 if h.mora_type == 6 else r


def _svft(i: int, o: int, h) -> int:
    n, d = (min(i, o) if h.rank is None else h.rank), h.off_diag
    return n * (2 * d + 1) - d * (d + 1) + 1 if h.pattern == "banded" else None


REFERENCE = {
    "loraxs": lambda i, o, h: h.rank**2,
    "mora": lambda i, o, h: _mora_rank(i, o, h) ** 2,
    "singlora": lambda i, o, h: max(i, o) * h.rank,
    "lori": lambda i, o, h: o * h.rank,
    "abba": lambda i, o, h: 2 * h.rank * (i + o),
    "lorma": lambda i, o, h: 2 * (o if h.side == "pre" else i) * h.rank,
    "edora": lambda i, o, h: h.rank**2 + o,
    "svft": _svft,
    "nola": lambda i, o, h: 2 * h.num_basis,
    "hydra": lambda i, o, h: h.rank * (i + o) + (h.seq_rank or h.rank) * (o + o),
    "loldu": lambda i, o, h: h.rank,
    "paca": lambda i, o, h: o * h.rank,
    "qrlora": lambda i, o, h: h.rank * i,
    "flora": lambda i, o, h: h.rank**2 + h.rank * (i + o),
    "spectral": lambda i, o, h: h.rank * (i + o),
    "multilora": lambda i, o, h: h.num_adapters * h.rank * (i + o) + h.num_adapters,
    "nlora": lambda i, o, h: h.rank * (i + o) + h.rank**2,
}


def test_every_method_peft_lacks_has_a_reference_count():
    """A method outside PEFT gets its count checked here; one without an entry fails."""
    missing = set(names(peft=False)) - set(REFERENCE)
    assert not missing, f"add the trainable count of {sorted(missing)} to REFERENCE"


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_trainable_count_per_site_matches_the_reference(method_model, name):
    assert name in methods(), f"{name} (methods-reference.md) is not registered"
    model = method_model(name)
    params = model.adapted.named_adapter_parameters()
    for a in model.adapted.plan:
        own = sum(p.numel() for k, p in params.items() if p.requires_grad and f".{a.path}." in k)
        expected = REFERENCE[name](a.site.in_features, a.site.out_features, a.method)
        assert own == expected, (a.path, own, expected)

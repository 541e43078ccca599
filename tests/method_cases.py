"""The method cases: the one table that every method-generic test reads.

A case is the hyperparameters one method's tests compile it with (small sizes, so the tests
are fast, and an init that starts as the identity where the method can), and how its adapter tensors are given
trained-looking values. Every registered method has a case: `ROWS` holds only what differs
from the default a method's declared fields and capabilities give:

- rank 4 where the method has a `rank` field (the defaults, 8 to 256, are sized for real
  models, not tiny test layers);
- calibration batches where it declares `needs_calibration`;
- the merge checks where it is `mergeable`, the PEFT checks where it has a `peft` record, the
  multi-adapter graph where it is `batchable` (read from the class, never listed here).

So a new method adds a row only where its defaults do not fit the test layers or do not start
as the identity; none at all when they do.

The shared models: `SharedModels` compiles each method once per test run (tiny Llama, one
layer, the case's targets) and hands it out in a fixed trained-looking state; the `method_model`
fixture (conftest.py) restores that state after every test, so a test may perturb, load or
train the model it was given without leaking into the next one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import peftc
from passes.adapters.registry import methods
from tests.models import perturb, tiny_llama, token_inputs

TOL = 1e-5  # fp32
LLAMA_TARGETS = ("q_proj", "v_proj", "down_proj")  # 64->64, 64->32, 96->64: 1 layer, 3 sites


@dataclass(frozen=True)
class Row:
    """What a method's case changes from the default; every field is optional."""

    hyper: dict[str, Any] = field(default_factory=dict)  # rule fields, beside the default rank
    targets: tuple[str, ...] = LLAMA_TARGETS
    std: float = 0.05  # the perturbation: a visible update (> 1e-3) within fp32 tolerance
    # adapter tensors (by name) set to a value after the perturbation, where noise alone does
    # not make the update show
    fill: dict[str, float] = field(default_factory=dict)


ROWS: dict[str, Row] = {
    # the ramp's step counter at ramp_up_steps (u = 1), so the trained-looking state shows
    "singlora": Row(fill={"singlora_t": 100.0}),
    # blocks must divide 32, 64 and 96; zeros is PEFT's init_weights=True, the identity
    "c3a": Row({"block_size": 16, "init_weights": "zeros"}, std=1.0),  # ΔW = C(w)/d_in
    # a few frequencies per layer; init_weights=True zeroes the spectrum: the identity
    "fourierft": Row({"n_frequency": 64, "init_weights": True}, std=0.5),
    # a looser convergence threshold (tau: the cosine similarity of the components between
    # incremental-PCA steps), so the init stops after a few batches
    "eva": Row({"tau": 0.9}),
    # the embedding form too (PEFT's: A zero, B normal)
    "lora": Row(targets=(*LLAMA_TARGETS, "embed_tokens")),
    # the update's norm is bounded by λ (default 15); the perturbation alone keeps it small
    "delora": Row(std=0.3, fill={"delora_lambda": 30.0}),
    # updates that scale less than linearly with their tensors: the perturbations their own
    # tests were tuned with
    "hra": Row(std=0.3),
    "vera": Row(std=0.5),
    "randlora": Row(std=0.2),
    "gralora": Row(std=0.1),
}


@dataclass(frozen=True)
class MethodCase:
    name: str
    cls: type
    hyper: dict[str, Any]
    targets: tuple[str, ...]
    std: float
    fill: dict[str, float]

    @property
    def calibration(self) -> list[dict] | None:
        """Batches for methods whose init reads activations (EVA, CorDA), else None."""
        if not self.cls.needs_calibration:
            return None
        return [token_inputs(2, 16, seed=s) for s in range(3)]

    def rule(self, targets: Any = None) -> dict:
        return {"method": self.name, "targets": list(targets or self.targets), **self.hyper}

    def spec(self, targets: Any = None) -> dict:
        return {"adapters": [self.rule(targets)]}

    def instance(self):
        return self.cls(**self.hyper)

    def perturb(self, adapted, std: float | None = None, seed: int = 1) -> None:
        """Trained-looking values: Gaussian noise on the trainable tensors, then `fill`."""
        perturb(adapted.trainable_parameters(), std=self.std if std is None else std, seed=seed)
        self.apply_fill(adapted)

    def apply_fill(self, adapted) -> None:
        """Set the tensors named in `fill` (trainable or not: SingLoRA's step counter)."""
        with torch.no_grad():
            for key, p in adapted.named_adapter_parameters().items():
                leaf = key.rsplit(".", 1)[-1]
                if leaf in self.fill:
                    p.fill_(self.fill[leaf])

    def __repr__(self) -> str:  # pytest ids
        return self.name


def case(name: str) -> MethodCase:
    cls = methods()[name]
    row = ROWS.get(name, Row())
    fields = {f.name for f in dataclasses.fields(cls)}
    hyper = {"rank": 4} if "rank" in fields else {}
    hyper.update(row.hyper)
    unknown = set(hyper) - fields
    assert not unknown, f"ROWS[{name!r}] names fields {name} does not declare: {sorted(unknown)}"
    return MethodCase(name, cls, hyper, row.targets, row.std, row.fill)


def in_peft(cls: type) -> bool:
    """PEFT, the oracle, has the method: its record's peft_type is one PEFT defines (a method
    may keep a PEFT-style record of its own that PEFT cannot load)."""
    from peft.utils.peft_types import PeftType

    return cls.peft is not None and cls.peft.peft_type in PeftType.__members__


def cases(**capabilities: bool) -> list[MethodCase]:
    """Every registered method's case, optionally only those with the given capabilities
    (`mergeable=True`, `batchable=True`, `peft=True` where PEFT has the method, ...)."""
    out = []
    for name, cls in methods().items():
        have = {
            "peft": in_peft(cls),
            "mergeable": cls.mergeable,
            "batchable": cls.batchable,
            "needs_calibration": cls.needs_calibration,
            "starts_as_identity": cls.starts_as_identity,
        }
        if all(have[k] == v for k, v in capabilities.items()):
            out.append(case(name))
    return out


def names(**capabilities: bool) -> list[str]:
    return [c.name for c in cases(**capabilities)]


# -- inputs and outputs -------------------------------------------------------------------


def example_inputs() -> dict:
    return token_inputs()


def fresh_inputs() -> dict:
    """Other shapes and tokens than the trace's, so dynamic dims are exercised."""
    return token_inputs(3, 9, seed=5)


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def base_model() -> torch.nn.Module:
    return tiny_llama(layers=1)


# -- one compiled model per method, shared by the test run ---------------------------------


@dataclass
class SharedModel:
    """A method's case compiled once: the base model, the adapted model (eval mode) and its
    output before any perturbation; `trained` is the state every test starts from."""

    case: MethodCase
    base: torch.nn.Module
    adapted: Any
    at_init: torch.Tensor  # fresh_inputs() through the adapted model at init
    trained: dict[str, torch.Tensor]
    _peft: Any = None
    _peft_config: dict | None = None

    @property
    def sites(self):
        return self.adapted.sites

    def restore(self) -> None:
        """Back to `trained`: adapter values, no gradients, eval mode."""
        with torch.no_grad():
            for name, p in self.adapted.named_adapter_parameters().items():
                p.copy_(self.trained[name])
                p.grad = None
        self.adapted.zero_grad(set_to_none=True)
        self.adapted.eval()

    def peft(self):
        """PEFT's model loaded from peftc's checkpoint of `trained` (built once; callers that
        change it work on a copy); None where PEFT lacks the method."""
        if not in_peft(self.case.cls):
            return None
        if self._peft is None:
            from peft import PeftModel

            with tempfile.TemporaryDirectory() as tmp:
                self.adapted.save_adapter(tmp)
                self._peft_config = json.loads((Path(tmp) / "adapter_config.json").read_text())
                self._peft = PeftModel.from_pretrained(
                    copy.deepcopy(self.base), tmp, is_trainable=True
                ).eval()
        return self._peft

    def peft_config(self) -> dict:
        """The adapter_config.json peftc writes for `trained`."""
        self.peft()
        return self._peft_config


def build(name: str) -> SharedModel:
    c = case(name)
    base = base_model()
    adapted = peftc.compile(base, c.spec(), example_inputs(), calibration=c.calibration).eval()
    at_init = logits(adapted, fresh_inputs())
    c.perturb(adapted)
    trained = {n: p.detach().clone() for n, p in adapted.named_adapter_parameters().items()}
    return SharedModel(c, base, adapted, at_init, trained)


class SharedModels:
    def __init__(self) -> None:
        self._built: dict[str, SharedModel] = {}

    def get(self, name: str) -> SharedModel:
        if name not in self._built:
            self._built[name] = build(name)
        return self._built[name]

    def __iter__(self) -> Iterator[SharedModel]:
        return iter(self._built.values())

"""The adapter-method contract, written down once: what a method must define, what it may
define, and how its hyperparameters are declared and checked.

A method subclasses `Method` and is registered by name, which makes it a frozen dataclass:

    @register("lora")
    class LoRA(LowRank):
        init_weights: str = hp("kaiming", one_of("kaiming", "gaussian"))
        peft = PeftFormat(...)                      # where PEFT has the method
        def params(self, site): ...                 # tensor shapes, and which train
        def init(self, site, W, calib, generator): ...
        def forward(self, x, base_out, W, p, ctx): ...
        def merged_weight(self, site, W, p): ...    # or mergeable = False and a reason
        def cost(self, site): ...                   # sympy parameters, FLOPs, bytes

Each hyperparameter is a dataclass field declared with `hp(default, rule)`; one validator
checks them all when the method is built, with messages like "lora: rank must be a positive
integer, got 0". Capabilities (supported ops, mergeable, batchable in the multi-adapter
graph, needs calibration) are class attributes, read by the passes, lowering and the
cost model instead of lists kept elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from passes.adapters.base import Params, ParamSpec, SiteContext, Tensor, is_int
from passes.adapters.cost import Cost
from rewrite.sites import Site

if TYPE_CHECKING:
    from passes.adapters.peft_record import PeftFormat


# -- hyperparameters as data -----------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A constraint on one hyperparameter: `ok(value)`, and how a message says it."""

    text: str  # completes "<field> must be ..."
    ok: Callable[[Any], bool]


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


POSITIVE_INT = Rule("a positive integer", lambda v: is_int(v) and v > 0)
NON_NEGATIVE_INT = Rule("a non-negative integer", lambda v: is_int(v) and v >= 0)
POSITIVE_NUMBER = Rule("a positive number", lambda v: _number(v) and v > 0)
POSITIVE_FINITE = Rule("a positive finite number", lambda v: _number(v) and 0 < v < math.inf)
FINITE_NON_ZERO = Rule(
    "a finite non-zero number", lambda v: _number(v) and v != 0 and math.isfinite(v)
)
PROBABILITY = Rule("in [0, 1)", lambda v: _number(v) and 0.0 <= v < 1.0)
UNIT_INTERVAL = Rule("in [0, 1]", lambda v: _number(v) and 0.0 <= v <= 1.0)
FLAG = Rule("true or false", lambda v: isinstance(v, bool))


def one_of(*choices: object) -> Rule:
    return Rule(
        f"one of {choices!r}", lambda v: any(v == c and type(v) is type(c) for c in choices)
    )


def int_at_least(low: int) -> Rule:
    return Rule(f"an integer >= {low}", lambda v: is_int(v) and v >= low)


def at_least(low: float) -> Rule:
    return Rule(f">= {low:g}", lambda v: _number(v) and v >= low)


def optional(rule: Rule, none_means: str) -> Rule:
    """`rule`, or None (which means `none_means`)."""
    return Rule(f"null ({none_means}) or {rule.text}", lambda v: v is None or rule.ok(v))


def hp(
    default: Any, rule: Rule, about: str = "", hint: str = "", spec_name: str | None = None
) -> Any:
    """Declare a hyperparameter field: its default, its constraint, and optionally what it is
    and what to do instead (shown in messages: "rank (the block size) must be ..., got 0").
    `spec_name` is the key specs and configs use where the paper's name cannot be a field
    (NLoRA's `init` would hide `Method.init`)."""
    metadata = {"rule": rule, "about": about, "hint": hint, "spec_name": spec_name}
    return dataclasses.field(default=default, metadata=metadata)


def spec_name(f: dataclasses.Field) -> str:
    """The key a hyperparameter field goes by in specs, messages and peftc's checkpoints."""
    return f.metadata.get("spec_name") or f.name


def spec_names(cls: type) -> dict[str, str]:
    """spec key -> field name, for every field of a method class."""
    return {spec_name(f): f.name for f in dataclasses.fields(cls)}


def validate_fields(method: object) -> None:
    """Check every declared hyperparameter of `method` against its rule."""
    for f in dataclasses.fields(method):
        rule = f.metadata.get("rule")
        value = getattr(method, f.name)
        if rule is not None and not rule.ok(value):
            about = f" ({f.metadata['about']})" if f.metadata.get("about") else ""
            hint = f"; {f.metadata['hint']}" if f.metadata.get("hint") else ""
            raise ValueError(
                f"{method.name}: {spec_name(f)}{about} must be {rule.text}, got {value!r}{hint}"
            )


# -- the contract ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Method(ABC):
    """An adapter method. Subclasses are frozen dataclasses of hyperparameters (see `hp`)."""

    name: ClassVar[str] = ""  # set by @register

    # Capabilities, declared.
    supported_ops: ClassVar[tuple[str, ...]] = ("linear",)
    mergeable: ClassVar[bool] = True
    unmergeable_reason: ClassVar[str] = ""  # why not, when mergeable is False
    batchable: ClassVar[bool] = False  # the multi-adapter ONNX graph can batch its adapters
    needs_calibration: ClassVar[bool] = False  # init reads activation statistics
    # the adapted model equals the base at init (False: the paper's init moves it, LoRA-XS)
    starts_as_identity: ClassVar[bool] = True
    save_frozen: ClassVar[bool] = False  # its frozen tensors are part of the checkpoint
    # its Hugging Face PEFT format, where PEFT has it; without one, checkpoints are written in
    # peftc's own format (the same layout, peft_type "PEFTC_<NAME>"; peft_record.own_format)
    peft: ClassVar[PeftFormat | None] = None

    def __post_init__(self) -> None:
        validate_fields(self)
        self.validate()

    def validate(self) -> None:
        """Checks that involve several hyperparameters; raise ValueError naming the fix."""
        return None

    def check(self, site: Site) -> str | None:
        """Why this method cannot adapt `site`, or None when it can."""
        if site.op not in self.supported_ops:
            kinds = dict.fromkeys("linear" if op == "addmm" else op for op in self.supported_ops)
            conv1d = " (GPT-2's Conv1D, its weight stored transposed)" if site.op == "addmm" else ""
            return (
                f"{self.name} supports {', '.join(kinds)} layers only, not {site.op} sites{conv1d}"
            )
        return self.check_site(site)

    def check_site(self, site: Site) -> str | None:
        """Method-specific reasons to decline a site whose op it supports."""
        return None

    @abstractmethod
    def params(self, site: Site) -> dict[str, ParamSpec]:
        """The adapter tensors at `site`: shapes, and which train."""

    @abstractmethod
    def init(self, site: Site, W: Tensor, calib: object, generator: torch.Generator) -> Params:
        """Initial values of `params(site)`, from the weight (and calibration data)."""

    @abstractmethod
    def forward(
        self, x: Tensor, base_out: Tensor, W: Tensor, p: Params, ctx: SiteContext
    ) -> Tensor:
        """The adapted output, as traceable torch code that only reads `p` (a step count it
        reads is a `ParamSpec(counter=True)`, advanced by the pipeline; a write is refused)."""

    def merged_weight(self, site: Site, W: Tensor, p: Params) -> Tensor | None:
        """The folded weight, so that the site's op with it equals `forward` (None: cannot)."""
        return None

    def merged_bias(self, site: Site, W: Tensor, b: Tensor, p: Params) -> Tensor | None:
        """The folded bias where the update changes it (Hydra's sequential branch acts on the
        base output, bias included); None: the base bias stays. Called only on sites whose
        bias is a parameter."""
        return None

    @abstractmethod
    def cost(self, site: Site) -> Cost:
        """Sympy formulas of parameters, FLOPs and activation bytes at `site`."""

    @classmethod
    def bind_plan(cls, assignments: list) -> list:
        """Let the method see all of its sites at once (shared tensors are sized by all of
        them); returns the assignments with method instances that carry what they need."""
        return assignments

    # Checkpoint conversions, for methods whose PEFT form differs from their own tensors.
    def peft_tensors(
        self, site: Site, p: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor] | None:
        """The tensors to save, by key suffix (None: save `params` under `peft.keys`)."""
        return None

    def params_from_peft(
        self, site: Site, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor] | None:
        """Read checkpoint tensors (by key suffix) into `params` (None: as saved)."""
        return None


@dataclass(frozen=True)
class LowRank(Method):
    """The LoRA-family fields, declared once: rank, alpha, dropout and rsLoRA scaling."""

    rank: int = hp(8, POSITIVE_INT)
    alpha: float = hp(8.0, POSITIVE_NUMBER)
    dropout: float = hp(0.0, PROBABILITY)
    use_rslora: bool = hp(False, FLAG)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def check_site(self, site: Site) -> str | None:
        fan_in = site.in_features * math.prod(site.conv.kernel if site.conv else ())
        return rank_too_large(self.rank, fan_in, site.out_features)


def rank_too_large(rank: int, d_in: int, d_out: int, in_name: str = "in") -> str | None:
    """The message for a rank above min(d_in, d_out), or None when it fits."""
    if rank <= min(d_in, d_out):
        return None
    return (
        f"rank {rank} is larger than the layer allows (min({in_name}={d_in}, out={d_out}) = "
        f"{min(d_in, d_out)}); lower the rank"
    )


def alpha_over_rank(alpha: float | None, rank: int) -> float:
    """s = alpha/rank, where a missing alpha means alpha = rank (s = 1), as the papers of
    LoRA-XS, NOLA, QR-LoRA and MultiLoRA default it."""
    return (rank if alpha is None else alpha) / rank

"""What VeRA (vera.py) and RandLoRA (randlora.py) share: frozen random tensors seeded by
`projection_prng_key`, shared by every adapted site and sized by the largest one (as PEFT's
`_find_dim` does), their common hyperparameters, and their PEFT format.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from passes.adapters.contract import (
    FLAG,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    PROBABILITY,
    Method,
    Rule,
    hp,
)
from passes.adapters.peft_record import PeftField, PeftFormat
from rewrite.sites import Site
from rewrite.spec import SpecError

POSITIVE_OR_NULL = Rule("a positive integer or null", lambda v: v is None or POSITIVE_INT.ok(v))


def bound_dim() -> Any:
    """max_in_features / max_out_features: the size of the shared tensors, the largest in/out
    over all sites (set by bind_plan, as PEFT's _find_dim does); a larger value may be given,
    a smaller one is refused by check()."""
    return field(default=None, repr=False, metadata={"rule": POSITIVE_OR_NULL})


def projection_format(
    peft_type: str, config: str, prefix: str, rank: int, trained: tuple, fields: dict, **extra
) -> PeftFormat:
    """PEFT's format of a SharedProjection method: the `trained` tensors under each module's
    path, the shared pair once as base_model.<prefix>_A/_B (when save_projection)."""
    shared = {f"{prefix}_{m}": f"base_model.{prefix}_{m}" for m in "AB"}
    return PeftFormat(
        peft_type=peft_type,
        config=config,
        fields={
            "rank": PeftField("r", rank, read=int),
            **fields,
            "dropout": PeftField(f"{prefix}_dropout", 0.0, read=float),
            "projection_prng_key": PeftField("projection_prng_key", 0),
            "save_projection": PeftField("save_projection", True, read=bool),
        },
        keys={**{name: name for name in trained}, **shared},
        fan_in_fan_out=True,
        **extra,
    )


@dataclass(frozen=True)
class SharedProjection(Method):
    """Frozen random tensors seeded by projection_prng_key, shared by every site and sized by
    the largest (max_in_features, max_out_features, set by bind_plan)."""

    rank: int = hp(256, POSITIVE_INT)
    dropout: float = hp(0.0, PROBABILITY)
    projection_prng_key: int = hp(0, NON_NEGATIVE_INT)
    save_projection: bool = hp(True, FLAG)
    init_weights: bool = hp(True, FLAG)
    max_in_features: int | None = bound_dim()
    max_out_features: int | None = bound_dim()

    supported_ops: ClassVar[tuple[str, ...]] = ("linear", "addmm")
    shared_by_all: ClassVar[tuple[str, ...]] = ("rank", "projection_prng_key", "save_projection")
    shared_what: ClassVar[str] = "one random A/B pair"

    @property
    def save_frozen(self) -> bool:
        """PEFT's save_projection: the shared tensors go into the checkpoint too."""
        return self.save_projection

    def check_site(self, site: Site) -> str | None:
        for side in ("in", "out"):
            n, limit = getattr(site, f"{side}_features"), getattr(self, f"max_{side}_features")
            if limit is not None and n > limit:
                return f"{side}_features {n} exceed max_{side}_features {limit}"
        return None

    def _shared_dims(self, site: Site) -> tuple[int, int]:
        """(in, out) of the shared tensors; unbound (a one-site plan): the site's own dims."""
        return (
            max(site.in_features, self.max_in_features or 0),
            max(site.out_features, self.max_out_features or 0),
        )

    @classmethod
    def bind_plan(cls, assignments: list) -> list:
        """Size the shared tensors by all sites; they must agree on what the tensors are."""
        for attr in cls.shared_by_all:
            values = {getattr(a.method, attr) for a in assignments}
            if len(values) > 1:
                raise SpecError(
                    f"{cls.name}: all sites share {cls.shared_what}, so {attr} must be the same "
                    f"at every {cls.name} site; this plan has {sorted(values)}"
                )
        n_in, n_out = map(max, zip(*(a.method._shared_dims(a.site) for a in assignments)))
        bound = {"max_in_features": n_in, "max_out_features": n_out}
        return [replace(a, method=replace(a.method, **bound)) for a in assignments]

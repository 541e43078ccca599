"""The plan: which method and hyperparameters each chosen site gets, and why."""

from __future__ import annotations

from dataclasses import dataclass, field

from rewrite.spec import Assignment


@dataclass
class Plan:
    assignments: list[Assignment]
    strategy: str = "manual"
    type_scores: dict[str, float] = field(default_factory=dict)
    site_scores: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def sites(self) -> list[Assignment]:
        return self.assignments

    def __iter__(self):
        return iter(self.assignments)

    def __len__(self) -> int:
        return len(self.assignments)

    def methods(self) -> set[str]:
        return {a.method.name for a in self.assignments}

    def trainable_parameters(self) -> int:
        """Trainable adapter parameters, counting each shared tensor once."""
        seen, total = set(), 0
        for a in self.assignments:
            for name, spec in a.method.params(a.site).items():
                key = (a.method.name, name) if spec.shared else (a.site.path, name)
                if spec.trainable and key not in seen:
                    seen.add(key)
                    n = 1
                    for s in spec.shape:
                        n *= s
                    total += n
        return total

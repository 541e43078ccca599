"""Rules, passes and the pass manager.

A rule has a pattern (`matches`), a `check` that returns a reason when it declines, and a
`rewrite`. A `RuleSet` pass applies its rules to each node and counts matches and declines
by reason. The `PassManager` runs a named pipeline over a Program, records what each pass
did, and with `debug=True` or PEFTC_DEBUG=1 prints a diff of the graph code per pass.
"""

from __future__ import annotations

import difflib
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import torch.fx

from rewrite.program import Program


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool


@dataclass
class RuleStats:
    matches: int = 0
    declines: Counter = field(default_factory=Counter)


class Rule(Protocol):
    name: str

    def matches(self, node: torch.fx.Node) -> bool: ...

    def check(self, node: torch.fx.Node) -> str | None: ...

    def rewrite(self, node: torch.fx.Node) -> None: ...


class Pass(Protocol):
    name: str
    requires: tuple[str, ...]

    def __call__(self, program: Program) -> PassResult: ...


class RuleSet:
    """A pass that tries each rule on each node, in graph order."""

    requires: tuple[str, ...] = ()

    def __init__(self, name: str, rules: list[Rule]):
        self.name = name
        self.rules = rules
        self.stats = {rule.name: RuleStats() for rule in rules}

    def __add__(self, other: RuleSet) -> RuleSet:
        return RuleSet(f"{self.name}+{other.name}", self.rules + other.rules)

    def __call__(self, program: Program) -> PassResult:
        modified = False
        for node in list(program.graph.nodes):
            for rule in self.rules:
                if not rule.matches(node):
                    continue
                reason = rule.check(node)
                if reason is not None:
                    self.stats[rule.name].declines[reason] += 1
                    continue
                rule.rewrite(node)
                self.stats[rule.name].matches += 1
                modified = True
                break
        if modified:
            program.graph.lint()
            program.graph_module.recompile()
        return PassResult(program.graph_module, modified)


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    nodes_before: int
    nodes_after: int
    rules: dict[str, RuleStats]
    diff: str


def _code(program: Program) -> str:
    return program.graph_module.code


def debug_enabled(flag: bool | None) -> bool:
    return bool(flag) or os.environ.get("PEFTC_DEBUG", "") not in ("", "0")


class PassManager:
    """Runs a named list of passes over a Program and records what each one did."""

    def __init__(self, passes: list[Pass], debug: bool | None = None):
        self.passes = passes
        self.debug = debug_enabled(debug)
        self.records: list[PassRecord] = []

    @property
    def pipeline(self) -> list[str]:
        return [p.name for p in self.passes]

    def run(self, program: Program, keep_diffs: bool = False) -> Program:
        for p in self.passes:
            before = _code(program) if (self.debug or keep_diffs) else ""
            n_before = len(program.graph.nodes)
            start = time.perf_counter()
            result = p(program)
            seconds = time.perf_counter() - start
            diff = ""
            if self.debug or keep_diffs:
                diff = "".join(
                    difflib.unified_diff(
                        before.splitlines(keepends=True),
                        _code(program).splitlines(keepends=True),
                        f"before {p.name}",
                        f"after {p.name}",
                    )
                )
            record = PassRecord(
                p.name,
                seconds,
                result.modified,
                n_before,
                len(program.graph.nodes),
                dict(getattr(p, "stats", {})),
                diff,
            )
            self.records.append(record)
            if self.debug:
                print(
                    f"[peftc] pass {p.name}: {record.nodes_before} -> {record.nodes_after} nodes, "
                    f"{'modified' if result.modified else 'unchanged'}, {seconds * 1e3:.1f} ms",
                    file=sys.stderr,
                )
                for rule, stats in record.rules.items():
                    print(
                        f"[peftc]   rule {rule}: {stats.matches} matches, declines {dict(stats.declines)}",
                        file=sys.stderr,
                    )
                print(diff or "[peftc]   (no change)", file=sys.stderr)
        return program

"""Rules, passes and the pass manager.

A rule has a pattern (`matches`), a `check` that returns a reason when it declines, and a
`rewrite`. A `RuleSet` pass applies its rules to each node and counts matches and declines
by reason. A pass declares the graph conditions it `requires` and `ensures` (names in
`CONDITIONS`); the `PassManager` checks them around each pass and names the pass that broke
one. It records what each pass did (and, when asked, the code before and after for a diff),
recompiles the graph module once at the end, and with `debug=True` or PEFTC_DEBUG=1 prints
the diff per pass.
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import torch.fx

from rewrite.program import Program
from rewrite.tags import tag_of


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
    ensures: tuple[str, ...]

    def __call__(self, program: Program) -> PassResult: ...


def _adapter_values(program: Program) -> str | None:
    bare = [
        n.name
        for n in program.graph.nodes
        if n.op == "call_function" and tag_of(n) and n.users and "val" not in n.meta
    ]
    return f"adapter nodes without shape metadata: {', '.join(bare[:5])}" if bare else None


def _adapter_nodes(program: Program) -> str | None:
    left = [n.name for n in program.graph.nodes if tag_of(n)]
    return f"adapter nodes remain: {', '.join(left[:5])}" if left else None


def _lint(program: Program) -> str | None:
    try:
        program.graph.lint()
    except Exception as e:  # lint raises RuntimeError and others; all mean a broken graph
        return f"the graph does not lint: {e}"
    return None


def _dead_code(program: Program) -> str | None:
    dead = [
        n.name
        for n in program.graph.nodes
        if n.op == "call_function" and not n.users and not n.is_impure()
    ]
    return f"dead nodes: {', '.join(dead[:5])}" if dead else None


# Graph conditions by name: each returns None when it holds, else what is wrong.
CONDITIONS = {
    "adapter_values": _adapter_values,  # adapter nodes carry meta["val"] (shapes, dtypes)
    "no_adapters": _adapter_nodes,  # no node carries an adapter tag (merged graphs)
    "lint": _lint,
    "no_dead_code": _dead_code,
}


class PassConditionError(RuntimeError):
    """A pass ran on a graph that lacks a condition it requires, or broke one it ensures."""


def check_conditions(p: Pass, program: Program, which: str) -> None:
    for name in getattr(p, which, ()):
        if name not in CONDITIONS:
            raise KeyError(
                f"pass {p.name} names unknown condition {name!r}; known: {list(CONDITIONS)}"
            )
        why = CONDITIONS[name](program)
        if why is None:
            continue
        if which == "requires":
            raise PassConditionError(
                f"pass {p.name} requires {name!r}, which does not hold before it ({why}); "
                "run a pass that ensures it first"
            )
        raise PassConditionError(f"pass {p.name} should ensure {name!r}, but after it: {why}")


class RuleSet:
    """A pass that tries each rule on each node, in graph order."""

    def __init__(
        self,
        name: str,
        rules: list[Rule],
        requires: tuple[str, ...] = (),
        ensures: tuple[str, ...] = ("lint",),
    ):
        self.requires = requires
        self.ensures = ensures
        self.name = name
        self.rules = rules
        self.stats = {rule.name: RuleStats() for rule in rules}

    def __add__(self, other: RuleSet) -> RuleSet:
        return RuleSet(
            f"{self.name}+{other.name}",
            self.rules + other.rules,
            tuple(dict.fromkeys(self.requires + other.requires)),
            tuple(c for c in self.ensures if c in other.ensures),
        )

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
            program.recompile()
        return PassResult(program.graph_module, modified)


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    nodes_before: int
    nodes_after: int
    rules: dict[str, RuleStats]
    # the graph's code around the pass; kept only when asked (debug, or keep_code=True)
    code_before: str | None = field(default=None, repr=False)
    code_after: str | None = field(default=None, repr=False)

    @functools.cached_property
    def diff(self) -> str:
        """A unified diff of the graph code before and after the pass ("" if unchanged)."""
        if self.code_before is None or self.code_after is None:
            raise ValueError(
                f"the record of pass {self.name} kept no code to diff: run the pass manager "
                "with keep_code=True (peftc.compile(..., debug=True)), or ask the pipeline "
                "for pass_trace(diffs=True)"
            )
        return "".join(
            difflib.unified_diff(
                self.code_before.splitlines(keepends=True),
                self.code_after.splitlines(keepends=True),
                f"before {self.name}",
                f"after {self.name}",
            )
        )


def graph_code(program: Program) -> str:
    """The Python the graph compiles to now (what GraphModule.code holds after a recompile),
    generated without compiling it."""
    return program.graph.python_code(root_module="self").src


def debug_enabled(flag: bool | None) -> bool:
    return bool(flag) or os.environ.get("PEFTC_DEBUG", "") not in ("", "0")


class PassManager:
    """Runs a named list of passes over a Program and records what each one did.

    The graph module is recompiled once, after the last pass (passes only mark it stale).
    With `keep_code` (implied by debug) each record also keeps the graph's code before and
    after its pass, for diffs: generating it costs about what a recompile does."""

    def __init__(self, passes: list[Pass], debug: bool | None = None, keep_code: bool = False):
        self.passes = passes
        self.debug = debug_enabled(debug)
        self.keep_code = keep_code or self.debug
        self.records: list[PassRecord] = []

    @property
    def pipeline(self) -> list[str]:
        return [p.name for p in self.passes]

    def run(self, program: Program) -> Program:
        with program.deferred_recompile():
            code = graph_code(program) if self.keep_code else None
            for p in self.passes:
                code = self._run_one(p, program, code)
        return program

    def _run_one(self, p: Pass, program: Program, before: str | None) -> str | None:
        check_conditions(p, program, "requires")
        n_before = len(program.graph.nodes)
        start = time.perf_counter()
        result = p(program)
        seconds = time.perf_counter() - start
        check_conditions(p, program, "ensures")
        after = None
        if self.keep_code:
            after = graph_code(program) if result.modified else before
        record = PassRecord(
            p.name,
            seconds,
            result.modified,
            n_before,
            len(program.graph.nodes),
            dict(getattr(p, "stats", {})),
            before,
            after,
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
            print(record.diff or "[peftc]   (no change)", file=sys.stderr)
        return after

"""Cleanup: remove nodes whose results nobody reads (after merging or fusion)."""

from __future__ import annotations

from rewrite.passes import PassResult
from rewrite.program import Program


class Cleanup:
    name = "cleanup"
    requires: tuple[str, ...] = ()
    ensures: tuple[str, ...] = ("no_dead_code",)

    def __call__(self, program: Program) -> PassResult:
        modified = program.graph.eliminate_dead_code()
        if modified:
            program.recompile()
        return PassResult(program.graph_module, modified)

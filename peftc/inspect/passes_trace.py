"""The per-pass trace: what each pass of the pipeline did, from the PassManager's records.

For each pass: its name, duration, whether it changed the graph, the node count before and
after, each rule's matches and its declines grouped by reason, and (on request) the unified
diff of the generated graph code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rewrite.passes import PassRecord


def trace_json(records: Sequence[PassRecord], diff: bool = False) -> list[dict[str, Any]]:
    """Plain data for `--json`: one dict per pass, in pipeline order."""
    out = []
    for i, r in enumerate(records):
        item: dict[str, Any] = {
            "index": i,
            "name": r.name,
            "seconds": r.seconds,
            "modified": r.modified,
            "nodes_before": r.nodes_before,
            "nodes_after": r.nodes_after,
            "rules": {
                name: {
                    "matches": stats.matches,
                    "declines": dict(stats.declines.most_common()),
                }
                for name, stats in r.rules.items()
            },
        }
        if diff:
            item["diff"] = r.diff
        out.append(item)
    return out


def rule_lines(record: PassRecord) -> list[str]:
    """`rule R: N matches; declined K: reason (n), ...` per rule of a pass."""
    lines = []
    for name, stats in record.rules.items():
        text = f"rule {name}: {stats.matches} match{'es' if stats.matches != 1 else ''}"
        declined = sum(stats.declines.values())
        if declined:
            reasons = "; ".join(f"{why} ({n})" for why, n in stats.declines.most_common())
            text += f"; declined {declined}: {reasons}"
        lines.append(text)
    return lines


def format_trace(records: Sequence[PassRecord], diff: bool = False) -> str:
    """A terminal listing of the pipeline, one block per pass (with its diff on request)."""
    if not records:
        return "no passes were recorded"
    width = max(len(r.name) for r in records)
    out = []
    for i, r in enumerate(records, 1):
        delta = r.nodes_after - r.nodes_before
        out.append(
            f"{i:>2}. {r.name:<{width}}  {r.seconds * 1e3:8.1f} ms  "
            f"{'changed  ' if r.modified else 'unchanged'}  "
            f"{r.nodes_before} -> {r.nodes_after} nodes ({delta:+d})"
        )
        out.extend(f"      {line}" for line in rule_lines(r))
        if diff:
            if r.diff:
                out.append(r.diff.rstrip("\n"))
            elif r.modified:
                out.append("      (the diff was not kept for this run)")
            else:
                out.append("      (no change)")
    return "\n".join(out)

"""Capture the inputs of sites over calibration batches, by interpreting the traced graph.

Used by data-driven placement (NFN scores) and data-driven inits (EVA, CorDA). It runs
forward only, under no_grad, with a progress bar, and uses no module hooks: a
torch.fx.Interpreter sees each site op's input as the graph computes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.fx
from tqdm.auto import tqdm

from rewrite.program import CONSTANT, USER_INPUT, Program
from rewrite.sites import SITE_OPS, SiteIndex

SiteInputCallback = Callable[[str, torch.Tensor], None]


def site_input(op: str, node: torch.fx.Node, args: tuple) -> Any:
    return args[SITE_OPS[op].x]


def _token_rows(x: torch.Tensor, op: str, mask: torch.Tensor | None) -> torch.Tensor:
    """Flatten a site input to [tokens, features], dropping padded tokens where a mask says so."""
    if op in ("conv1d", "conv2d"):
        # channels are dim 1: every spatial position is a token
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    if mask is not None and mask.dim() == 2:
        keep = mask.reshape(-1).bool()
        rows = x.reshape(-1, x.shape[-1]) if op != "embedding" else x.reshape(-1)
        if rows.shape[0] == keep.shape[0]:
            return rows[keep]
    return x.reshape(-1, x.shape[-1]) if op != "embedding" else x.reshape(-1)


class _Capture(torch.fx.Interpreter):
    def __init__(self, gm, watch: dict[torch.fx.Node, tuple[str, str]], callback, mask):
        super().__init__(gm)
        self.watch = watch
        self.callback = callback
        self.mask = mask

    def run_node(self, n: torch.fx.Node) -> Any:
        if n in self.watch:
            path, op = self.watch[n]
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.callback(path, _token_rows(site_input(op, n, args), op, self.mask))
        return super().run_node(n)


def capture_site_inputs(
    program: Program,
    state: Mapping[str, torch.Tensor],
    sites: SiteIndex,
    paths: Iterable[str],
    batches: Iterable[Mapping[str, torch.Tensor]],
    callback: SiteInputCallback,
    desc: str = "calibrating",
) -> int:
    """Run `program` on each batch (dicts of named inputs) and hand each watched site's input,
    as [tokens, features] rows, to `callback(path, rows)`. Returns the number of batches."""
    wanted = set(paths)
    watch = {
        node: (path, sites[path].op)
        for path, nodes in sites.nodes.items()
        if path in wanted
        for node in nodes
    }
    count = 0
    batches = list(batches)
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
            args = []
            for slot in program.slots:
                if slot.kind == USER_INPUT:
                    args.append(batch[slot.target])
                elif slot.kind == CONSTANT:
                    args.append(program.constants[slot.target])
                else:
                    args.append(state[slot.target])
            _Capture(program.graph_module, watch, callback, batch.get("attention_mask")).run(*args)
            count += 1
    if count == 0:
        raise ValueError("calibration needs at least one batch; got an empty iterable")
    return count

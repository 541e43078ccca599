"""Per-block modules for the flat adapted graph: the units FSDP2 shards, compiles and checkpoints.

The adapted graph is flat: every tensor is a graph input, and no submodule is ever called.
FSDP2 shards per module and gathers a module's parameters in that module's forward pre-hook,
so a flat graph gives it nothing to hook. `split_blocks` restores the hierarchy from the same
graph (torch.fx's `split_module`):

    flat graph ──owner of each node──▶ one piece per decoder block, and the runs between
                                        them (embeddings before, norm/head/loss after)

A node belongs to a block when torch.export's `nn_module_stack` puts it inside that block's
module, or, for a node an adapter pass inserted, when its site is inside it. Each block piece
becomes a `Block`: an nn.Module that holds the block's base module and the adapter tensors of
its sites as children, and whose forward reads their current values (what FSDP2 has just
gathered) and runs its piece of the graph. The pieces between blocks run as they are, on the
state the caller passes. The top graph takes the flat graph's arguments and calls the pieces in
order, so it replaces the graph module in `Program.run`; its outputs are the flat graph's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch.fx.passes.split_module import split_module

from passes.quantize import QUANT_PREFIX
from rewrite.names import PREFIX
from rewrite.program import Program
from rewrite.sites import SiteIndex
from rewrite.tags import tag_of


class BlockSplitError(ValueError):
    """The graph cannot be cut into one contiguous piece per block."""


def block_paths(sites: SiteIndex, model: torch.nn.Module) -> list[str]:
    """The blocks a model repeats, from its sites' paths: each path's prefix up to its first
    numeric component (`model.layers.3`, `encoder.layer.0`), kept where it names a module."""
    modules = dict(model.named_modules())
    out: list[str] = []
    for site in sites:
        parts = site.path.split(".")
        index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if index is None:
            continue
        path = ".".join(parts[: index + 1])
        if path in modules and path not in out:
            out.append(path)
    return out


def _inside(path: str, block: str) -> bool:
    return path == block or path.startswith(block + ".")


def _owner(node: torch.fx.Node, blocks: Sequence[str]) -> int | None:
    """The index of the block a node belongs to, or None for a node outside every block."""
    tag = tag_of(node)
    paths = (
        list(tag["sites"])
        if tag
        else [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
    )
    owners = {i for p in paths for i, b in enumerate(blocks) if _inside(p, b)}
    if len(owners) > 1:
        names = sorted(blocks[i] for i in owners)
        raise BlockSplitError(f"{node.name} belongs to several blocks {names}: no block boundary")
    return owners.pop() if owners else None


def _partition(
    graph: torch.fx.Graph, blocks: Sequence[str]
) -> tuple[dict[torch.fx.Node, int], dict[int, int]]:
    """Piece index per node: each block's span (first to last node it owns, with whatever lies
    between) is one piece; the nodes outside every span form the pieces between. Also returns
    the block index of each block piece."""
    body = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    owners = [_owner(n, blocks) for n in body]
    spans: dict[int, list[int]] = {}
    for position, owner in enumerate(owners):
        if owner is not None:
            spans.setdefault(owner, [position, position])[1] = position
    ordered = sorted(spans.items(), key=lambda item: item[1][0])
    for (a, (_, end)), (b, (start, _)) in zip(ordered, ordered[1:], strict=False):
        if start <= end:
            raise BlockSplitError(
                f"the graph interleaves {blocks[a]} and {blocks[b]}; FSDP2 needs each block's "
                "computation in one piece"
            )
    block_at = [None] * len(body)
    for owner, (start, end) in spans.items():
        for position in range(start, end + 1):
            block_at[position] = owner
    pieces: dict[torch.fx.Node, int] = {}
    piece, previous = -1, object()
    for node, owner in zip(body, block_at, strict=True):
        key = ("block", owner) if owner is not None else ("between", None)
        if key != previous:
            piece, previous = piece + 1, key
        pieces[node] = piece
    return pieces, {pieces[body[s]]: owner for owner, (s, _) in spans.items()}


class Block(torch.nn.Module):
    """One block: its base module and adapter tensors as children, and its piece of each
    mode's graph. Its forward takes the piece's other inputs, reads its own tensors' current
    values by name, and runs the piece of the mode it is in (`self.training`)."""

    def __init__(
        self,
        base: torch.nn.Module,
        path: str,
        adapters: torch.nn.Module | None,
        quantized: torch.nn.Module | None = None,
    ):
        super().__init__()
        self.base = base
        if adapters is not None:
            self.adapters = adapters
        if quantized is not None:  # a quantized base's packed weights in this block
            self.quantized = quantized
        self.path = path
        # "train" / "eval": that mode's piece of the graph (lifted: it holds no tensors)
        self.pieces: dict[str, torch.fx.GraphModule] = {}
        self._sources: dict[str, list[str | None]] = {}  # per piece input: owned state or None
        # what runs a mode's piece: the piece itself, or a compiled / checkpointed call of it
        self.runners: dict[str, Callable[..., Any]] = {}

    def owned(self) -> dict[str, torch.Tensor]:
        """The block's parameters by state name, as they are now (gathered inside forward)."""
        out = {f"{self.path}.{n}": t for n, t in self.base.named_parameters()}
        if hasattr(self, "adapters"):
            prefix = f"{PREFIX}{self.path}"
            out.update({f"{prefix}.{n}": t for n, t in self.adapters.named_parameters()})
        if hasattr(self, "quantized"):
            prefix = f"{QUANT_PREFIX}{self.path}"
            out.update({f"{prefix}.{n}": t for n, t in self.quantized.named_parameters()})
        return out

    def add_piece(self, mode: str, piece: torch.fx.GraphModule, sources: list[str | None]) -> None:
        self.pieces[mode] = piece
        self._sources[mode] = sources
        self.runners[mode] = piece

    def forward(self, *others: Any) -> Any:
        mode = _mode(self.training)
        own, rest = self.owned(), iter(others)
        args = [next(rest) if s is None else own[s] for s in self._sources[mode]]
        return self.runners[mode](*args)


def _mode(training: bool) -> str:
    return "train" if training else "eval"


def split_blocks(
    program: Program,
    model: torch.nn.Module,
    adapters: torch.nn.Module,
    blocks: Sequence[str] | dict[str, Block],
    quantized: torch.nn.Module | None = None,
) -> tuple[torch.fx.GraphModule, dict[str, Block]]:
    """Cut `program`'s graph into one piece per block (paths of modules of `model`, or the
    `Block`s of the other mode, which get this mode's pieces) and the pieces between.
    `quantized` holds a quantized base's packed weights (the parameters among them are the
    blocks' own).

    Returns the top graph module, called with the graph module's own arguments (it calls each
    `Block` as a submodule), and the blocks by path."""
    made = blocks if isinstance(blocks, dict) else {}
    paths = list(blocks)
    if not paths:
        raise BlockSplitError("no blocks to split into: the model has no repeated layers")
    graph_module = program.graph_module
    pieces, piece_block = _partition(graph_module.graph, paths)
    top = split_module(
        graph_module,
        graph_module,
        lambda node: pieces[node],
        keep_original_order=True,
        keep_original_node_name=True,
    )
    targets = {s.name: s.target for s in program.slots}
    for node in list(top.graph.nodes):
        if node.op != "call_module":
            continue
        owner = piece_block.get(int(node.target.rsplit("_", 1)[1]))
        if owner is None:
            continue
        path = paths[owner]
        if path not in made:
            quant = None if quantized is None else _submodule(quantized, path)
            made[path] = Block(model.get_submodule(path), path, _submodule(adapters, path), quant)
        block = made[path]
        owned = set(block.owned())
        sources = [
            targets[a.name] if a.op == "placeholder" and targets.get(a.name) in owned else None
            for a in node.args
        ]
        node.args = tuple(a for a, s in zip(node.args, sources, strict=True) if s is None)
        block.add_piece(_mode(program.training), getattr(top, node.target), sources)
        setattr(top, node.target, block)
    top.recompile()
    return top, made


def _submodule(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None

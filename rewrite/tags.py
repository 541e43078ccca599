"""The typed tag that marks a node an adapter pass inserted: `node.meta["peftc"]`.

Splicing tags every node of an adapter snippet with its site and method; the node whose value
replaces the base op's result is the `output` and names that `base` node. Fusion tags the
nodes it builds with every site they serve. A node without a tag belongs to the base model.
"""

from __future__ import annotations

from typing import TypedDict

import torch.fx

KEY = "peftc"
ADAPTER, FUSED = "adapter", "fused"


class _Every(TypedDict):
    sites: tuple[str, ...]  # one site path; several for a node fusion shares between sites
    method: str  # the method's spec name, or "fused"
    role: str  # ADAPTER or FUSED


class AdapterTag(_Every, total=False):
    output: bool  # this node's value replaces the base op's result
    base: str  # for the output: the base op node's name


def tag_of(node: torch.fx.Node) -> AdapterTag | None:
    """The node's adapter tag, or None for a base-model node."""
    return node.meta.get(KEY)


def adapter_tag(sites: tuple[str, ...], method: str, role: str = ADAPTER) -> AdapterTag:
    return AdapterTag(sites=tuple(sites), method=method, role=role)

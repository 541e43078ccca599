"""Sites: the ops that multiply by a parameter weight, and so can take an adapter.

A site is `aten.linear`, `aten.addmm` (weight stored transposed, as in GPT-2's Conv1D),
`aten.conv1d`, `aten.conv2d` or `aten.embedding` whose weight is a parameter placeholder.
Sites are keyed by module path; a module called twice is one site with two nodes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import networkx as nx
import torch
import torch.fx

from rewrite.program import PARAMETER, Program
from rewrite.tags import KEY as TAG_KEY

aten = torch.ops.aten


class SiteOp(NamedTuple):
    """A site op kind: its ATen overload and which argument is x, the weight and the bias."""

    target: Any
    x: int
    weight: int
    bias: int | None


# The one table of site operands; every pass and lowering reads x, W and b through it.
SITE_OPS = {
    "linear": SiteOp(aten.linear.default, x=0, weight=1, bias=2),
    "addmm": SiteOp(aten.addmm.default, x=1, weight=2, bias=0),  # weight stored [in, out]
    "conv1d": SiteOp(aten.conv1d.default, x=0, weight=1, bias=2),
    "conv2d": SiteOp(aten.conv2d.default, x=0, weight=1, bias=2),
    "embedding": SiteOp(aten.embedding.default, x=1, weight=0, bias=None),
}
_OP_BY_TARGET = {op.target: name for name, op in SITE_OPS.items()}


def operand(node: torch.fx.Node, op: str, role: str) -> Any:
    """Argument `role` ("x", "weight" or "bias") of a site node of kind `op` (None if absent)."""
    index = getattr(SITE_OPS[op], role)
    return node.args[index] if index is not None and index < len(node.args) else None


@dataclass(frozen=True)
class ConvGeometry:
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int


@dataclass(frozen=True)
class Site:
    """One adaptable op. Shapes use the logical [out, in] orientation whatever the storage."""

    path: str  # module path, e.g. model.layers.0.self_attn.q_proj
    op: str  # linear | addmm | conv1d | conv2d | embedding
    module_type: str  # path after the layer index, e.g. self_attn.q_proj
    layer: int | None
    in_features: int  # in channels for conv, vocabulary size for embedding
    out_features: int  # out channels for conv, embedding dim for embedding
    weight: str  # state name of the weight parameter
    weight_shape: tuple[int, ...]  # as stored
    dtype: torch.dtype
    has_bias: bool
    module_class: str
    group: tuple[str, ...] = ()  # paths of the sites sharing this site's input (itself included)
    conv: ConvGeometry | None = None
    padding_idx: int | None = None
    output_head: bool = False  # the model's output embeddings (see mark_output_head)
    transposed: bool = False  # a linear of t(W): W stored [in, out] (rewrite/canonical.py)
    bias: str | None = None  # state name of the bias, where it is a parameter

    @property
    def stored_in_out(self) -> bool:
        """The weight is stored [in, out], the transpose of the logical [out, in]."""
        return self.op == "addmm" or self.transposed


LINEAR_OPS = ("linear", "addmm")  # what `targets: all-linear` selects (addmm: GPT-2's Conv1D)


def is_output_head(site: Site) -> bool:
    """The model's output head: its output embeddings as the pipeline marks them from
    `get_output_embeddings()`, or, on sites found without the model, a module named lm_head."""
    return site.output_head or site.path.rsplit(".", 1)[-1] == "lm_head"


def is_linear_layer(site: Site) -> bool:
    """Selected by `targets: all-linear`, PEFT's convention: every linear-like site but the
    output head."""
    return site.op in LINEAR_OPS and not is_output_head(site)


@dataclass
class SiteIndex:
    """All sites of a program, by path, with the graph nodes that compute them."""

    sites: dict[str, Site]
    nodes: dict[str, list[torch.fx.Node]] = field(default_factory=dict)

    def __iter__(self):
        return iter(self.sites.values())

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, path: str) -> Site:
        return self.sites[path]

    def module_types(self) -> list[str]:
        return sorted({s.module_type for s in self.sites.values()})


def module_path(node: torch.fx.Node, fallback: str) -> tuple[str, str]:
    """The innermost module path and class of a node, from torch.export's nn_module_stack."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, cls = list(stack.values())[-1]
        cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        if path:
            return path, cls_name.rsplit(".", 1)[-1]
    return fallback, ""


def split_path(path: str) -> tuple[str, int | None]:
    """(module type, layer index): the type is what follows the last numeric component."""
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            rest = ".".join(parts[i + 1 :])
            return (rest or path), int(parts[i])
    return path, None


def type_matches(module_type: str, selector: str) -> bool:
    """A `types:` selector matches a type by whole-component suffix."""
    return module_type == selector or module_type.endswith("." + selector)


def _geometry(node: torch.fx.Node, weight_shape: tuple[int, ...], dims: int) -> ConvGeometry:
    args = list(node.args) + [None] * 7

    def tup(v, default):
        if v is None:
            v = default
        if isinstance(v, str):
            return v
        v = tuple(v) if isinstance(v, list | tuple) else (v,)
        return v * dims if len(v) == 1 else v

    return ConvGeometry(
        kernel=tuple(weight_shape[2:]),
        stride=tup(args[3], 1),
        padding=tup(args[4], 0),
        dilation=tup(args[5], 1),
        groups=int(args[6] or 1),
    )


def find_sites(program: Program) -> SiteIndex:
    """Scan the graph for adaptable ops and describe each one."""
    params = {s.name: s.target for s in program.slots if s.kind == PARAMETER}
    found: dict[str, Site] = {}
    nodes: dict[str, list[torch.fx.Node]] = {}
    inputs: dict[str, torch.fx.Node] = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in _OP_BY_TARGET:
            continue
        if node.meta.get(TAG_KEY):  # an adapter's own op, not a base site
            continue
        op = _OP_BY_TARGET[node.target]
        weight = operand(node, op, "weight")
        transposed = op == "linear" and _is_transpose_of_parameter(weight, params)
        if transposed:
            weight = weight.args[0]
        if not isinstance(weight, torch.fx.Node) or weight.name not in params:
            continue
        val = weight.meta.get("val")
        shape = tuple(int(s) for s in val.shape)
        weight_name = params[weight.name]
        path, cls = module_path(node, weight_name.rsplit(".", 1)[0])
        if path in nodes:
            nodes[path].append(node)
            continue
        if op == "addmm" or transposed:
            in_f, out_f = shape
        elif op == "embedding":
            in_f, out_f = shape
        else:
            out_f, in_f = shape[0], shape[1]
        bias = operand(node, op, "bias")
        module_type, layer = split_path(path)
        conv = None
        if op in ("conv1d", "conv2d"):
            conv = _geometry(node, shape, 1 if op == "conv1d" else 2)
            in_f = in_f * conv.groups
        padding_idx = None
        if (
            op == "embedding"
            and len(node.args) > 2
            and node.args[2] is not None
            and node.args[2] >= 0
        ):
            padding_idx = int(node.args[2])
        found[path] = Site(
            path=path,
            op=op,
            module_type=module_type,
            layer=layer,
            in_features=in_f,
            out_features=out_f,
            weight=weight_name,
            weight_shape=shape,
            dtype=val.dtype,
            has_bias=isinstance(bias, torch.fx.Node),
            bias=params.get(bias.name) if isinstance(bias, torch.fx.Node) else None,
            module_class=cls,
            conv=conv,
            padding_idx=padding_idx,
            transposed=transposed,
        )
        nodes[path] = [node]
        inputs[path] = operand(node, op, "x")
    return SiteIndex(_with_groups(found, inputs), nodes)


def _is_transpose_of_parameter(node: Any, params: Mapping[str, str]) -> bool:
    """`aten.t` of a 2-D parameter placeholder: the weight operand of `linear(x, t(W))`."""
    return (
        isinstance(node, torch.fx.Node)
        and node.target == aten.t.default
        and isinstance(node.args[0], torch.fx.Node)
        and node.args[0].name in params
    )


def _with_groups(sites: dict[str, Site], inputs: dict[str, torch.fx.Node]) -> dict[str, Site]:
    """Group sites that read the same input node (q/k/v, gate/up): connected components."""
    g = nx.Graph()
    for path, inp in inputs.items():
        g.add_edge(("site", path), ("input", inp.name))
    grouped = {}
    for component in nx.connected_components(g):
        members = tuple(sorted(p for kind, p in component if kind == "site"))
        for path in members:
            s = sites[path]
            grouped[path] = Site(**{**s.__dict__, "group": members})
    return {p: grouped[p] for p in sites}


def output_head_path(model: torch.nn.Module) -> str | None:
    """The module path of a model's output embeddings (transformers' `get_output_embeddings()`,
    e.g. `lm_head`), or None for a model without one."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError):  # models that declare the method but no head
        return None
    if not isinstance(head, torch.nn.Module):
        return None
    return next((name for name, m in model.named_modules() if m is head), None)


def mark_output_head(sites: SiteIndex, model: torch.nn.Module) -> SiteIndex:
    """Mark the site of the model's output embeddings, in place; returns `sites`."""
    path = output_head_path(model)
    if path in sites.sites:
        sites.sites[path] = dataclasses.replace(sites.sites[path], output_head=True)
    return sites

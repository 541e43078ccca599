"""Sites: the ops that multiply by a parameter weight, and so can take an adapter.

A site is `aten.linear`, `aten.addmm` (weight stored transposed, as in GPT-2's Conv1D),
`aten.conv1d`, `aten.conv2d` or `aten.embedding` whose weight is a parameter placeholder.
Sites are keyed by module path; a module called twice is one site with two nodes.

Experts: a 3-D parameter [experts, ., .] that a mixture-of-experts grouped matmul multiplies
by (transformers' `grouped_mm_fallback`, `aten._grouped_mm`) is one site with an expert
dimension (`op="experts"`), at the parameter's path: `mlp.experts.gate_up_proj` is its type,
as PEFT's `target_parameters` names it. Like parts, experts are kept apart
(`SiteIndex.experts`): a target or type that names them selects them, `all-linear` does not
(nor does PEFT's).

Parts: where the graph slices a linear site's output along its features (`split`, `chunk`,
`slice`, `narrow`: a packed qkv or gate_up projection), each slice is a site of its own too,
addressed `path[start:end]` over output features (`find_parts`). Parts are kept apart from the
whole sites (`SiteIndex.parts`): only a target that names a slice selects one, and placement,
`all-linear` and every whole-site tool see the model's modules as before.
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
    rows: tuple[int, int] | None = None  # a part: [start, end) of the parent's output features
    parent: str | None = None  # a part: the path of the whole site
    part: str | None = None  # a part's name where the config makes it unambiguous (q, gate, ...)
    experts: int | None = None  # an expert site: how many experts the 3-D weight stacks

    @property
    def owner(self) -> str:
        """The whole site whose weight this site multiplies by: itself, or a part's parent."""
        return self.parent or self.path

    @property
    def state_path(self) -> str:
        """The path adapter tensors are stored under: a part's brackets are not attribute
        names, so `qkv_proj[0:64]` keeps its tensors under `qkv_proj.rows_0_64`."""
        if self.rows is None:
            return self.path
        return f"{self.parent}.rows_{self.rows[0]}_{self.rows[1]}"

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
    parts: dict[str, Site] = field(default_factory=dict)  # slices of packed projections
    experts: dict[str, Site] = field(default_factory=dict)  # 3-D expert weights

    def __iter__(self):
        return iter(self.sites.values())

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, path: str) -> Site:
        for table in (self.sites, self.parts, self.experts):
            if path in table:
                return table[path]
        raise KeyError(path)

    def __contains__(self, path: str) -> bool:
        return path in self.sites or path in self.parts or path in self.experts

    def everything(self) -> list[Site]:
        """Whole sites, then slices, then expert weights: all a rule can select."""
        return [*self.sites.values(), *self.parts.values(), *self.experts.values()]

    def parts_of(self, path: str) -> list[Site]:
        return [p for p in self.parts.values() if p.parent == path]

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
    index = SiteIndex(_with_groups(found, inputs), nodes)
    find_experts(program, index)
    return find_parts(index)


def expert_matmuls() -> tuple:
    """The grouped matmuls of mixture-of-experts layers: aten's, and transformers' CPU
    fallback where transformers has registered it."""
    ops: tuple = (aten._grouped_mm.default,)
    try:
        ops += (torch.ops.transformers.grouped_mm_fallback.default,)
    except (AttributeError, RuntimeError):
        pass
    return ops


def find_experts(program: Program, index: SiteIndex) -> SiteIndex:
    """Add to `index` a site for each 3-D parameter that is the weight of a grouped matmul,
    directly ([experts, in, out], `transposed`) or through `transpose(-2, -1)` ([experts,
    out, in], as transformers stores Mixtral's); returns `index`."""
    grouped = expert_matmuls()
    params = {s.name: s.target for s in program.slots if s.kind == PARAMETER}
    # in an adapted graph the base ops read the adapted weight: the adapter output that
    # stands for the placeholder (its tag's base)
    stand_in: dict[str, torch.fx.Node] = {}
    for n in program.graph.nodes:
        tag = n.meta.get(TAG_KEY)
        if tag and tag.get("output") and tag.get("base"):
            stand_in[tag["base"]] = n
    for node in program.graph.nodes:
        val = node.meta.get("val")
        if node.op != "placeholder" or node.name not in params or val is None or val.dim() != 3:
            continue
        layouts = set()
        weight = stand_in.get(node.name, node)
        for user in weight.users:
            if user.target in grouped and user.args[1] is weight:
                layouts.add("in_out")
            elif user.target == aten.transpose.int and {d % 3 for d in user.args[1:3]} == {1, 2}:
                if any(u.target in grouped and u.args[1] is user for u in user.users):
                    layouts.add("out_in")
        if len(layouts) != 1:
            continue
        (layout,) = layouts
        name = params[node.name]
        experts, a, b = (int(d) for d in val.shape)
        out_f, in_f = (a, b) if layout == "out_in" else (b, a)
        module_type, layer = split_path(name)
        _, module_class = module_path(next(iter(weight.users)), "")
        index.experts[name] = Site(
            path=name,
            op="experts",
            module_type=module_type,
            layer=layer,
            in_features=in_f,
            out_features=out_f,
            weight=name,
            weight_shape=(experts, a, b),
            dtype=val.dtype,
            has_bias=False,
            module_class=module_class,
            group=(name,),
            transposed=layout == "in_out",
            experts=experts,
        )
        index.nodes[name] = [node]
    return index


# reshapes that keep the features as the last dim, which a packed projection's output may
# pass through before it is sliced (GPT-2's Conv1D output is [rows, out], viewed [b, s, out])
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_SLICERS = (
    aten.slice.Tensor,
    aten.narrow.default,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.chunk.default,
)


def _ranges(node: torch.fx.Node, features: int) -> list[tuple[int, int]]:
    """The feature ranges `node` takes from a tensor whose last dim has `features` entries:
    empty when it does not slice the last dim by constant amounts."""
    args = list(node.args) + [None] * 5
    if node.target not in _SLICERS or not all(
        isinstance(a, int | list | tuple | type(None)) for a in args[1:5]
    ):
        return []  # not a slicing op, or a symbolic bound: not a fixed range of features
    rank = node.args[0].meta["val"].dim()

    def last(dim: int | None) -> bool:
        return dim in (-1, rank - 1)

    def tiled(size: int | list[int]) -> list[tuple[int, int]]:
        sizes = [size] * -(features // -size) if isinstance(size, int) else list(size)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [(a, min(a + n, features)) for a, n in zip(starts, sizes, strict=True)]

    target = node.target

    def index(i: int | None, default: int) -> int:  # Python's slice bounds: negative, clamped
        i = default if i is None else i
        return max(0, min(features, i + features if i < 0 else i))

    if target == aten.slice.Tensor and last(args[1]) and args[4] in (None, 1):
        return [(index(args[2], 0), index(args[3], features))]
    if target == aten.narrow.default and last(args[1]):
        start = index(args[2], 0)
        return [(start, start + args[3])]
    if target in (aten.split.Tensor, aten.split_with_sizes.default) and last(args[2]):
        return tiled(args[1])
    if target == aten.chunk.default and last(args[2]):
        return tiled(-(features // -args[1]))
    return []


def _slicers(node: torch.fx.Node, features: int) -> list[torch.fx.Node]:
    """The users that slice `node`'s features, through views that keep the last dim and
    through adapters already spliced onto it."""
    out = []
    for user in node.users:
        if user.op != "call_function":
            continue
        tag = user.meta.get(TAG_KEY)
        if tag:  # an adapter's node: its output stands for the op's output (an adapted graph)
            if tag.get("output"):
                out.extend(_slicers(user, features))
            continue
        if user.target in _VIEWS:
            val = user.meta.get("val")
            if val is not None and val.dim() > 0 and int(val.shape[-1]) == features:
                out.extend(_slicers(user, features))
            continue
        out.append(user)
    return out


def find_parts(index: SiteIndex) -> SiteIndex:
    """Add to `index` a part for each feature range a slicing op takes from a linear site's
    output (see the module note); returns `index`."""
    for path, site in index.sites.items():
        if site.op not in LINEAR_OPS:
            continue
        ranges: set[tuple[int, int]] = set()
        for node in index.nodes[path]:
            for user in _slicers(node, site.out_features):
                ranges.update(r for r in _ranges(user, site.out_features) if r[1] > r[0])
        ranges.discard((0, site.out_features))
        for start, end in sorted(ranges):
            part = f"{path}[{start}:{end}]"
            index.parts[part] = dataclasses.replace(
                site,
                path=part,
                module_type=f"{site.module_type}[{start}:{end}]",
                out_features=end - start,
                rows=(start, end),
                parent=path,
                group=(part,),
                output_head=False,
            )
            index.nodes[part] = index.nodes[path]
    return index


def name_parts(index: SiteIndex, config: Any) -> SiteIndex:
    """Name the parts where a transformers config makes it unambiguous, in place: three parts
    tiling a projection as (heads, kv heads, kv heads) x head_dim are q, k and v; two parts of
    `intermediate_size` each tiling a module named gate..up are gate and up."""
    heads = getattr(config, "num_attention_heads", None)
    if config is None or not heads:
        return index
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // heads
    inter = getattr(config, "intermediate_size", None)
    for path, site in index.sites.items():
        parts = sorted(index.parts_of(path), key=lambda p: p.rows)
        sizes = [p.out_features for p in parts]
        tiles = bool(parts) and _tiles(parts, site.out_features)
        leaf = path.rsplit(".", 1)[-1]
        if tiles and sizes == [heads * head_dim, kv * head_dim, kv * head_dim]:
            names = ("q", "k", "v")
        elif tiles and inter and sizes == [inter, inter] and "gate" in leaf and "up" in leaf:
            names = ("gate", "up")
        else:
            continue
        for p, name in zip(parts, names, strict=True):
            index.parts[p.path] = dataclasses.replace(p, part=name)
    return index


def _tiles(parts: list[Site], features: int) -> bool:
    """Whether sorted `parts` cover [0, features) end to end, without overlap."""
    edges = [0] + [p.rows[1] for p in parts]
    return edges[-1] == features and all(p.rows[0] == e for p, e in zip(parts, edges, strict=False))


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

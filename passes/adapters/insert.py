"""The pass that grafts adapter subgraphs onto the planned sites, and the adapter tensor store.

For each site node the rule traces the method's `forward` into an ATen snippet (cached for the
whole process by method, hyperparameters, op, shapes, dtypes and mode: see `_snippet_key` and
`rewrite.splice.trace_snippet`), adds the adapter tensors as parameter placeholders named
`adapters.<site path>.<name>` (shared tensors: `adapters.shared.<method>.<name>`), splices the
snippet after the base op and reroutes the base op's users to the adapted output. Slices of
one packed projection (`qkv_proj[0:64]`, `qkv_proj[96:128]`) chain: each snippet reads the
output the one before left and rewrites its own rows (`site_forward`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
import torch.fx

from passes.adapters.base import site_forward
from rewrite.names import PREFIX, logical_weight, param_target, stored_weight, whole_weight
from rewrite.passes import RuleSet
from rewrite.program import Program
from rewrite.sites import Site, SiteIndex, operand
from rewrite.spec import Assignment
from rewrite.splice import splice, trace_snippet
from rewrite.tags import adapter_tag

aten = torch.ops.aten


class AdapterStore(torch.nn.Module):
    """Holds adapter tensors in a module tree that mirrors their dotted names."""

    def add(self, name: str, tensor: torch.Tensor, trainable: bool) -> torch.nn.Parameter:
        *parents, leaf = name.split(".")
        module: torch.nn.Module = self
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        param = torch.nn.Parameter(tensor.detach().clone(), requires_grad=trainable)
        module.register_parameter(leaf, param)
        return param


def create_adapter_tensors(
    assignments: list[Assignment],
    state: Mapping[str, torch.Tensor],
    store: AdapterStore,
    seed: int,
    calibration: Mapping[str, list[torch.Tensor]] | None = None,
    loading: bool = False,
) -> None:
    """Initialise every adapter tensor once (shared tensors once per method) into `store`.

    `calibration` maps a site path to its captured inputs ([tokens, features] per batch),
    for methods that declare `needs_calibration`. With `loading` (a checkpoint is loaded right
    after), such methods get `calib=None` instead of an error and decide what they can build.
    """
    generator = torch.Generator().manual_seed(seed)
    made: dict[str, tuple[int, ...]] = {}
    for a in assignments:
        W = logical_weight(a.site, state[a.site.weight])
        calib = (calibration or {}).get(a.site.path)
        if calib is None and getattr(a.method, "needs_calibration", False) and not loading:
            raise ValueError(
                f"{a.method.name} at {a.site.path} initialises from data: pass calibration "
                "batches (a list of model inputs) as peftc.compile(..., calibration=batches)"
            )
        values = a.method.init(a.site, W, calib, generator)
        for name, spec in a.method.params(a.site).items():
            target = param_target(a.method, a.site, name)
            if target in made:
                # a shared tensor is made once; every site must declare the same shape
                if made[target] != tuple(spec.shape):
                    raise ValueError(
                        f"{a.method.name} at {a.site.path} declares shared {name} with shape "
                        f"{tuple(spec.shape)}, but another site declared {made[target]}; "
                        "bind the plan first (passes.adapters.base.bind_plan)"
                    )
                continue
            value = values[name]
            if tuple(value.shape) != tuple(spec.shape):
                raise ValueError(
                    f"{a.method.name}.init gave {name} shape {tuple(value.shape)}, "
                    f"params() declares {spec.shape}"
                )
            store.add(target[len(PREFIX) :], value.to(W.device), spec.trainable)
            made[target] = tuple(spec.shape)


def anonymous_site(site: Site) -> Site:
    """`site` with the fields that say where it is (path, layer, module type and class, weight
    and bias names, sibling group, output head) blanked: what an adapter forward is traced with. No forward needs
    them, and handing it only this makes `_snippet_key` complete by construction."""
    return dataclasses.replace(
        site,
        path="",
        module_type="",
        layer=None,
        weight="",
        group=(),
        module_class="",
        output_head=False,
        # a linear's snippet reads W through the graph's t(W), [out, in] either way; an expert
        # weight is read as stored, so its layout shapes the snippet
        transposed=site.transposed and site.experts is not None,
        bias=None if site.bias is None else "",  # whether a bias exists (has_bias), not its name
        parent=None if site.parent is None else "",  # a slice's rows stay: they shape the graph
        part=None,
    )


def _snippet_key(method: object, site: Site, training: bool) -> tuple:
    """What an adapter's traced forward depends on besides its tensors' shapes and dtypes
    (`trace_snippet` adds those): the method (its class and every hyperparameter, as the
    frozen dataclass compares them), the anonymous site (op, bias presence, conv geometry,
    padding index, dims, dtype) and the mode. Keeping a site's path in it would give every
    site an export of its own."""
    # alpha=8 equals alpha=8.0, but a scalar's type is written into the graph (mul by an
    # int or by a float), so the field types are part of the key too
    fields = dataclasses.fields(method) if dataclasses.is_dataclass(method) else ()
    types = tuple(type(getattr(method, f.name)) for f in fields)
    return (type(method), method, types, anonymous_site(site), training)


class InsertAdapterRule:
    """Pattern: a site op. Check: the plan assigns it a method. Rewrite: splice the adapter."""

    name = "insert_adapter"

    def __init__(self, program: Program, sites: SiteIndex, plan: list[Assignment]):
        self.program = program
        self.by_path = {a.site.path: a for a in plan}
        # a node's sites: the whole op, or its slices (a plan never takes both, see resolve)
        self.paths_of: dict[torch.fx.Node, list[str]] = {}
        for path in [*sites.sites, *sites.parts, *sites.experts]:
            for node in sites.nodes[path]:
                self.paths_of.setdefault(node, []).append(path)

    def matches(self, node: torch.fx.Node) -> bool:
        return node in self.paths_of

    def check(self, node: torch.fx.Node) -> str | None:
        if not any(p in self.by_path for p in self.paths_of[node]):
            return "not targeted by the spec"
        return None

    def rewrite(self, node: torch.fx.Node) -> None:
        out = node
        for path in self.paths_of[node]:
            if path not in self.by_path:
                continue
            a = self.by_path[path]
            if a.site.experts is not None:  # node is the expert weight's placeholder
                self._splice_weight(a, node)
            else:
                out = self._splice(a, node, out)

    def _splice_weight(self, a: Assignment, weight: torch.fx.Node) -> torch.fx.Node:
        """An expert site: the ops that read the 3-D weight read `merged_weight(W, p)` instead,
        computed each step (PEFT's target_parameters does the same), so the update is exactly
        what merging folds in. Returns the adapted weight."""
        site, method, graph = a.site, a.method, self.program.graph
        names = list(method.params(site))
        param_nodes = [self.program.add_parameter(param_target(method, site, n)) for n in names]
        meta = {
            n: torch.empty(s.shape, dtype=s.dtype or site.dtype, device="meta")
            for n, s in method.params(site).items()
        }
        w_meta = torch.empty(site.weight_shape, dtype=site.dtype, device="meta")
        traced_site = anonymous_site(site)

        def fn(x, base_out, W, b, p):
            merged = method.merged_weight(traced_site, whole_weight(traced_site, W), p)
            return stored_weight(traced_site, merged)

        # the snippet's x and base_out are the weight too: a weight rewrite reads no activation
        snippet = trace_snippet(
            fn,
            weight,
            weight,
            w_meta,
            None,
            meta,
            key=_snippet_key(method, site, False),
            owner=f"{method.name} at {site.path}",
        )
        # right before the weight's first reader, inside its layer, as every other snippet
        # sits beside its op (not among the graph's inputs)
        first_reader = min(weight.users, key=list(graph.nodes).index)
        inputs = [weight, weight, weight, None, *param_nodes]
        out, inserted = splice(
            graph, snippet, inputs, first_reader.prev, adapter_tag((site.path,), method.name)
        )
        out.meta["peftc"].update(output=True, base=weight.name)
        keep = set(inserted)
        weight.replace_all_uses_with(out, delete_user_cb=lambda user: user not in keep)
        return out

    def _splice(self, a: Assignment, node: torch.fx.Node, current: torch.fx.Node) -> torch.fx.Node:
        """Splice `a`'s adapter onto the site op `node`, reading `current` (the op's output, or
        what an earlier slice's adapter made of it); returns the adapted output."""
        site, method, graph = a.site, a.method, self.program.graph
        training = self.program.training
        x, weight = operand(node, site.op, "x"), operand(node, site.op, "weight")
        bias = operand(node, site.op, "bias") if site.has_bias else None
        if site.op == "addmm":
            with graph.inserting_before(current.next):
                weight = graph.call_function(aten.t.default, (weight,))
        names = list(method.params(site))
        param_nodes = [self.program.add_parameter(param_target(method, site, n)) for n in names]
        meta = {
            n: torch.empty(s.shape, dtype=s.dtype or site.dtype, device="meta")
            for n, s in method.params(site).items()
        }
        whole_out = int(node.meta["val"].shape[-1]) if site.rows else site.out_features
        w_meta = torch.empty(
            (whole_out, site.in_features)
            if site.op not in ("embedding",) and site.conv is None
            else site.weight_shape,
            dtype=site.dtype,
            device="meta",
        )
        b_meta = (
            torch.empty((whole_out,), dtype=site.dtype, device="meta") if bias is not None else None
        )

        traced_site = anonymous_site(site)

        def fn(x, base_out, W, b, p):
            return site_forward(method, traced_site, x, base_out, W, b, p, training)

        snippet = trace_snippet(
            fn,
            x,
            current,
            w_meta,
            b_meta,
            meta,
            key=_snippet_key(method, site, training),
            owner=f"{method.name} at {site.path}",
        )
        inputs = [x, current, weight, bias, *param_nodes]
        tag = adapter_tag((site.path,), method.name)
        after = weight if site.op == "addmm" else current
        out, inserted = splice(graph, snippet, inputs, after, tag)
        # merging reroutes every adapter output to the base op: a chain of slices unwinds too
        out.meta["peftc"].update(output=True, base=node.name)
        keep = set(inserted)
        current.replace_all_uses_with(out, delete_user_cb=lambda user: user not in keep)
        return out


def insert_adapters(program: Program, sites: SiteIndex, plan: list[Assignment]) -> RuleSet:
    return RuleSet("insert_adapters", [InsertAdapterRule(program, sites, plan)])

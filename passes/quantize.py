"""A quantized frozen base as a graph rewrite: packed weights, dequantized next to their matmul.

    base weight placeholder W ──quantize_base──▶ quantized.<W>.{codes, absmax, ...} buffers
                                                 ──peftc::dequantize_*──▶ W' ──▶ the site op

`quantize_base` (in the ADAPT pipeline, first, so the adapter passes see the dequantized W'
as the site's weight) rewires each quantized weight's placeholder to buffer placeholders and
one dequantize node right before the weight's first user. `dequantize_base` (first in MERGE)
undoes it on a copy of the eval graph: the site op reads a full-precision weight placeholder
again, fed the weight dequantized in fp32, so merging folds the adapters into it and casts
once. The packed tensors live in a `QuantStore` under `quantized.<weight name>.<tensor>`; the
base layer's own parameter is replaced by a one-value shape holder, so the fp32 weight is gone.

`QuantizedBase` is that state for one adaptation (the records, the store, what they are
dequantized into); the Pipeline holds one and delegates to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.fx

import rewrite.dequant  # noqa: F401  (registers the peftc::dequantize_* ops)
from rewrite.bnb_layers import shape_holder
from rewrite.codec import (
    QuantizedWeight,
    check_nf4_shape,
    dequantize,
    quantize_int8,
    quantize_nf4,
)
from rewrite.passes import PassResult
from rewrite.program import BUFFER, PARAMETER, Program
from rewrite.quantize_config import QuantizeConfig
from rewrite.sites import Site, SiteIndex, is_linear_layer
from rewrite.spec import SpecError
from rewrite.swap import swapped_parameters

QUANT_PREFIX = "quantized."
META_KEY = "peftc_quantized"  # on a dequantize node: the weight name it stands for
NF4_ARGS = ("codes", "code", "absmax", "code2", "absmax2", "offset")


class QuantStore(torch.nn.Module):
    """The packed base weights as buffers, in a module tree that mirrors their dotted names."""

    def add(self, name: str, tensor: torch.Tensor) -> None:
        *parents, leaf = name.split(".")
        module: torch.nn.Module = self
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_buffer(leaf, tensor)


def state_name(weight: str, tensor: str) -> str:
    return f"{QUANT_PREFIX}{weight}.{tensor}"


def target_sites(config: QuantizeConfig, sites: SiteIndex, adapted: set[str]) -> list[Site]:
    """The linear sites whose weights `config` quantizes (one per weight)."""
    chosen, seen = [], set()
    for site in sites:
        if site.op not in ("linear", "addmm") or site.weight in seen:
            continue
        if config.targets == "adapted" and site.path not in adapted:
            continue
        if config.targets == "all-linear" and not (is_linear_layer(site) or site.path in adapted):
            continue
        seen.add(site.weight)
        chosen.append(site)
    if not chosen:
        raise SpecError(
            f"quantize (targets: {config.targets}) selects no linear layer; quantize applies to "
            "linear weights: adapt a linear layer or use targets: all-linear"
        )
    return chosen


def quantize_parameters(
    model: torch.nn.Module, config: QuantizeConfig, sites: list[Site]
) -> dict[str, QuantizedWeight]:
    """Quantize the weights of `sites` and replace each base parameter by a shape holder;
    returns weight name -> record. Every weight is checked before any is replaced."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for site in sites:
        W = _as_bnb_layout(site, params[site.weight])
        if config.compute_dtype is not None and config.compute_dtype != W.dtype:
            raise SpecError(
                f"quantize: compute_dtype {config.compute_dtype} differs from {site.path}'s "
                f"{W.dtype} weights; cast the model (model.to({config.compute_dtype})) before "
                "compiling, or drop compute_dtype"
            )
        if config.kind == "nf4":
            why = check_nf4_shape(tuple(W.shape), config.blocksize, f"quantize at {site.path}")
            if why is not None:
                raise SpecError(why)
    out = {}
    for site in sites:
        param = params[site.weight]
        W = _as_bnb_layout(site, param).contiguous()
        if config.kind == "nf4":
            record = quantize_nf4(W, config.blocksize, config.double_quant)
        else:
            record = quantize_int8(W)
        record.transposed = site.op == "addmm"
        out[site.weight] = record
        _replace_parameter(model, site.weight, shape_holder(tuple(param.shape), param.dtype))
    return out


def _as_bnb_layout(site: Site, W: torch.Tensor) -> torch.Tensor:
    """The weight as [out, in], the layout bitsandbytes quantizes: an addmm site's weight
    (GPT-2's Conv1D) is stored [in, out] and is quantized as its transpose (a view)."""
    return W.detach().t() if site.op == "addmm" else W


def _replace_parameter(model: torch.nn.Module, name: str, value: torch.nn.Parameter) -> None:
    """Set parameter `name` on every module that holds the same tensor (tied weights too)."""
    old = dict(model.named_parameters(remove_duplicate=False))[name]
    for module in model.modules():
        for leaf, param in list(module._parameters.items()):
            if param is old:
                module._parameters[leaf] = value


class QuantizedBase:
    """The quantized frozen base of one model: weight name -> its record (`records`), the
    packed tensors as buffers of `store` (a QuantStore, under `quantized.<weight>.<tensor>`
    in the graphs' state), and the dense weights made from them on demand."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.store = QuantStore()
        self.records: dict[str, QuantizedWeight] = {}

    def __bool__(self) -> bool:
        return bool(self.records)

    def add(self, records: Mapping[str, QuantizedWeight]) -> dict[str, QuantizedWeight]:
        """Keep `records` (read from bitsandbytes layers, or made by `quantize`)."""
        for weight, record in records.items():
            for tensor_name, tensor in record.tensors.items():
                self.store.add(state_name(weight, tensor_name)[len(QUANT_PREFIX) :], tensor)
            self.records[weight] = record
        return dict(records)

    def quantize(self, config: QuantizeConfig, sites: SiteIndex, adapted: set[str]) -> None:
        """Quantize the weights `config` selects among `sites` (`adapted`: the adapted paths)."""
        chosen = target_sites(config, sites, adapted)
        self.add(quantize_parameters(self.model, config, chosen))

    def state(self) -> dict[str, torch.Tensor]:
        """The packed tensors by graph name (none without a quantized base)."""
        if not self.records:
            return {}
        out = {QUANT_PREFIX + n: b for n, b in self.store.named_buffers()}
        # integer codes FSDP2 shards are frozen parameters there (peftc.distributed)
        out.update((QUANT_PREFIX + n, p) for n, p in self.store.named_parameters())
        return out

    def dense_weights(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Each quantized base weight dequantized (in fp32, then cast once to `dtype`, default
        its own dtype): made on each call, for merging, placement and inits; never kept."""
        with torch.no_grad():
            return {
                name: _weight_layout(record, dequantize(record, torch.float32)).to(
                    dtype or record.dtype
                )
                for name, record in self.records.items()
            }

    @contextlib.contextmanager
    def dense_base(self) -> Iterator[None]:
        """Put the dequantized weights into the model's parameters for the duration (a trace
        that must see real values: the fp16 export); the shape holders come back after."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        dense = {id(params[name]): value for name, value in self.dense_weights().items()}
        with swapped_parameters(self.model, lambda param: dense.get(id(param))):
            yield

    def base_weight_bytes(
        self, base_state: Mapping[str, torch.Tensor], quantized_only: bool = False
    ) -> int:
        """Bytes the base weights hold: with `quantized_only`, those of the quantized layers
        (codes and scales); else every tensor of `base_state` too (each storage once)."""
        packed = sum(r.nbytes() for r in self.records.values())
        if quantized_only:
            return packed
        seen: set[int] = set()
        total = 0
        for t in base_state.values():
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total + packed


class QuantizeBase:
    """Feed each quantized weight's users from a dequantize node over its packed buffers."""

    name = "quantize_base"
    requires: tuple[str, ...] = ()
    ensures: tuple[str, ...] = ("lint",)

    def __init__(self, records: Mapping[str, QuantizedWeight], store: Mapping[str, torch.Tensor]):
        self.records = records
        self.store = store  # state name -> tensor, for the placeholders' fake values

    def __call__(self, program: Program) -> PassResult:
        graph = program.graph
        modified = False
        for slot in [s for s in program.slots if s.kind == PARAMETER and s.target in self.records]:
            weight = program.placeholder(slot.name)
            if not weight.users:
                continue
            record = self.records[slot.target]
            inputs = {n: self._buffer(program, weight, slot.target, n) for n in record.tensors}
            first = min(weight.users, key=_position(graph))
            val = weight.meta.get("val")
            with graph.inserting_before(first):
                node = graph.call_function(*_dequantize_call(record, inputs))
                if record.transposed:
                    node.meta["val"] = None if val is None else val.t()
                    node = graph.call_function(torch.ops.aten.t.default, (node,))
            node.meta["val"] = val
            node.meta[META_KEY] = slot.target
            if "nn_module_stack" in first.meta:
                node.meta["nn_module_stack"] = first.meta["nn_module_stack"]
            weight.replace_all_uses_with(node)
            graph.erase_node(weight)
            program.slots.remove(slot)
            modified = True
        if modified:
            program.recompile()
        return PassResult(program.graph_module, modified)

    def _buffer(self, program: Program, weight: torch.fx.Node, target: str, tensor: str):
        name = state_name(target, tensor)
        node = program.add_parameter(name)
        slot = program.slot_for(node)
        slot.kind = BUFFER  # packed codes and scales: state, not trainable parameters
        fake = getattr(weight.meta.get("val"), "fake_mode", None)
        if fake is not None and "val" not in node.meta:
            node.meta["val"] = fake.from_tensor(self.store[name], static_shapes=True)
        return node


def _weight_layout(record: QuantizedWeight, dense: torch.Tensor) -> torch.Tensor:
    """A dequantized record in its weight's own layout."""
    return dense.t().contiguous() if record.transposed else dense


def _position(graph: torch.fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__


def _dequantize_call(record: QuantizedWeight, inputs: dict[str, torch.fx.Node]) -> tuple:
    if record.kind == "nf4":
        args = tuple(inputs.get(n) for n in NF4_ARGS)
        extra = (record.blocksize, list(record.shape), record.dtype)
        return torch.ops.peftc.dequantize_nf4.default, args + extra
    return torch.ops.peftc.dequantize_int8.default, (
        inputs["codes"],
        inputs["absmax"],
        record.dtype,
    )


class DequantizeBase:
    """Undo `quantize_base` on a graph copy: each dequantize node becomes a weight placeholder
    again (the caller's state gives it the weight dequantized in fp32, cast once)."""

    name = "dequantize_base"
    requires: tuple[str, ...] = ()
    ensures: tuple[str, ...] = ("lint",)

    def __call__(self, program: Program) -> PassResult:
        graph = program.graph
        nodes = [n for n in graph.nodes if META_KEY in n.meta]
        for node in nodes:
            placeholder = program.add_parameter(node.meta[META_KEY])
            placeholder.meta["val"] = node.meta.get("val")
            node.replace_all_uses_with(placeholder)
            source = node.args[0] if node.target is torch.ops.aten.t.default else None
            graph.erase_node(node)
            if source is not None:  # the dequantize under a transposed record's `t`
                graph.erase_node(source)
        for slot in list(program.slots):
            if slot.target.startswith(QUANT_PREFIX):
                ph = program.placeholder(slot.name)
                if not ph.users:
                    graph.erase_node(ph)
                    program.slots.remove(slot)
        if nodes:
            program.recompile()
        return PassResult(program.graph_module, bool(nodes))

"""Trace plain torch code into an ATen snippet and splice it into a program's graph.

Adapter forwards are written as ordinary torch code. `trace_snippet` exports such a function
with meta tensors shaped like the graph values it will read (symbolic dims stay dynamic), so
the spliced nodes are the same ATen training IR that the rest of the graph uses.

Exporting is the expensive part (a fresh torch.export per call), and most sites of a model
ask for the same snippet: every q/k/v/o projection of a Llama has the same shapes. So
`trace_snippet` keeps the snippets it traced in one bounded, process-wide cache (`SNIPPETS`),
keyed by what the caller says `fn` reads besides its tensors (the method, its
hyperparameters, the site's op, the mode) plus the exact example inputs of the export. The
cached GraphModules are shared by every site and every compile, so nothing may mutate them:
`splice` only reads them, and gives each copied node meta of its own.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch
import torch.fx
from torch.export import Dim

# One tensor argument of an export, as the export sees it: example sizes, which of those
# dims are dynamic, dtype. Two calls that agree on these (and on `fn`) trace the same graph.
TensorSignature = tuple[tuple[int, ...], tuple[int, ...], torch.dtype]


def example_like(val: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict]:
    """A meta tensor shaped like a graph value, and the dynamic-shape spec of its symbolic dims."""
    sizes, dynamic = [], {}
    for i, d in enumerate(val.shape):
        # a SymInt the trace fixed (a Dim.AUTO the model specialised) is a number: static
        if isinstance(d, torch.SymInt) and not d.node.expr.is_number:
            hint = d.node.hint
            sizes.append(int(hint) if hint is not None and int(hint) >= 2 else 3)
            dynamic[i] = Dim.AUTO
        else:
            sizes.append(int(d))
    return torch.empty(sizes, dtype=dtype or val.dtype, device="meta"), dynamic


def _signature(t: torch.Tensor | None, dynamic: dict | None = None) -> TensorSignature | None:
    # The example sizes themselves (not just "symbolic here") are part of it: export
    # duck-sizes equal example sizes into one symbol, and a dim that `fn` specialises is
    # baked in at its example size, so a snippet is only reusable at the same sizes. All
    # sites of one trace share the symbols' hints, so this costs no reuse within a model.
    if t is None:
        return None
    return tuple(t.shape), tuple(sorted(dynamic or ())), t.dtype


class _Snippet(torch.nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x, base_out, weight, bias, params):
        return self.fn(x, base_out, weight, bias, params)


class SnippetCache:
    """A bounded least-recently-used map from snippet keys to traced GraphModules.

    `exports` counts the torch.export calls made through it and `hits` the reuses, since the
    process started; tests and the compile-time benchmark read their differences. The
    entries are shared: callers must not mutate a GraphModule they get from here.
    """

    def __init__(self, maxsize: int = 256) -> None:
        self.maxsize = maxsize
        self.exports = 0
        self.hits = 0
        self._entries: OrderedDict[Hashable, torch.fx.GraphModule] = OrderedDict()
        self._lock = threading.Lock()  # compiles in threads share the cache

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> torch.fx.GraphModule | None:
        with self._lock:
            gm = self._entries.get(key)
            if gm is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            return gm

    def put(self, key: Hashable, gm: torch.fx.GraphModule) -> None:
        with self._lock:
            self.exports += 1
            self._entries[key] = gm
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every snippet, as in a fresh process. The counters keep counting (they
        only ever grow, so a caller can take differences across a clear)."""
        with self._lock:
            self._entries.clear()


# A LoRA snippet is a handful of nodes, about 90 KiB with its fake-tensor metadata. A model
# asks for a few per method (one per distinct site shape and mode), so 256 holds many models'
# worth, and a long-lived process that compiles many differently shaped models stays bounded
# (tens of MB at most).
SNIPPETS = SnippetCache()


def trace_snippet(
    fn: Callable,
    x: torch.fx.Node,
    base_out: torch.fx.Node,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    params: dict[str, torch.Tensor],
    key: Hashable | None = None,
    owner: str = "the adapter",
) -> torch.fx.GraphModule:
    """Export `fn(x, base_out, weight, bias, params)` into an ATen graph (`owner`: whose
    forward it is, for the error when `fn` writes one of its inputs).

    `x` and `base_out` are graph nodes whose meta values give their (possibly symbolic) shapes;
    the other arguments are meta tensors of fixed shape.

    With `key`, the snippet comes from (and goes into) `SNIPPETS`. The key must name
    everything `fn` reads besides its tensor arguments (for an adapter: method class and
    hyperparameters, the site's op, bias presence, conv geometry, training mode) and nothing
    site-specific such as its path; the sizes, dynamic dims and dtypes of every argument are
    added here. The returned module is then shared: read it, never mutate it.
    """
    x_ex, x_dyn = example_like(x.meta["val"])
    out_ex, out_dyn = example_like(base_out.meta["val"])
    full_key = None
    if key is not None:
        full_key = (
            key,
            _signature(x_ex, x_dyn),
            _signature(out_ex, out_dyn),
            _signature(weight),
            _signature(bias),
            tuple((name, _signature(t)) for name, t in params.items()),
        )
        cached = SNIPPETS.get(full_key)
        if cached is not None:
            return cached
    args = (x_ex, out_ex, weight, bias, params)
    dynamic = (x_dyn or None, out_dyn or None, None, None, {k: None for k in params})
    ep = torch.export.export(_Snippet(fn), args, dynamic_shapes=dynamic, strict=False)
    written = written_inputs(ep.graph_module.graph)
    if written:
        raise ValueError(
            f"{owner}: its forward writes its input {', '.join(written)} in place: a forward "
            "must only read its tensors (a recompute under activation checkpointing, or a "
            "compiled backward, would read the written value). For a step count, declare the "
            "tensor ParamSpec(..., trainable=False, dtype=torch.int64, counter=True): the "
            "pipeline adds 1 to it before each training forward"
        )
    if full_key is not None:
        SNIPPETS.put(full_key, ep.graph_module)
    return ep.graph_module


def written_inputs(graph: torch.fx.Graph) -> list[str]:
    """The placeholders that an op of `graph` writes in place (its schema marks the argument
    written: `add_`'s self, `copy_`'s destination, an `out=`), by name."""
    placeholders = set(graph.find_nodes(op="placeholder"))
    written = []
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        for position, argument in enumerate(schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            value = node.args[position] if position < len(node.args) else None
            value = node.kwargs.get(argument.name, value)
            if isinstance(value, torch.fx.Node) and value in placeholders:
                written.append(value.name)
    return sorted(set(written))


def _own_meta(meta: dict) -> dict:
    """A node's meta with its containers copied, so a later in-place edit on the host graph
    (a pass appending to a list, updating a dict) cannot reach the shared cached snippet."""
    return {k: copy.copy(v) if isinstance(v, dict | list) else v for k, v in meta.items()}


def splice(
    graph: torch.fx.Graph,
    snippet: torch.fx.GraphModule,
    inputs: list[torch.fx.Node | None],
    after: torch.fx.Node,
    meta: dict,
) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    """Copy `snippet`'s nodes into `graph` right after `after`, feeding its placeholders from
    `inputs` in order. Returns the node of its (single) output and the nodes inserted.

    The snippet was exported on meta tensors, so what it says about the meta device is
    dropped or moved to `after`'s device: its `_assert_tensor_metadata` checks (left by a
    real dtype cast, such as an fp32 upcast in a bf16 model) and `device=meta` arguments.
    `snippet` itself is only read: it may be the cached one that other sites and compiles
    splice too."""
    placeholders = [n for n in snippet.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise ValueError(f"snippet takes {len(placeholders)} inputs but {len(inputs)} were given")
    env: dict[torch.fx.Node, torch.fx.Node] = dict(zip(placeholders, inputs, strict=True))
    host = after.meta.get("val")
    device = host.device if isinstance(host, torch.Tensor) else None
    inserted = []
    output = None
    with graph.inserting_before(after.next):
        for node in snippet.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                output = torch.fx.map_arg(node.args[0], lambda n: env[n])
                continue
            if node.target is torch.ops.aten._assert_tensor_metadata.default:
                continue
            new = graph.node_copy(node, lambda n: env[n])
            if device is not None and new.kwargs.get("device") == torch.device("meta"):
                new.kwargs = {**new.kwargs, "device": device}
            new.meta = {**_own_meta(node.meta), "peftc": dict(meta)}
            env[node] = new
            inserted.append(new)
    if isinstance(output, tuple | list):
        (output,) = output
    return output, inserted

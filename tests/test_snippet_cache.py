"""The process-wide snippet cache: sites and compiles that trace the same adapter graph share
one export; anything that changes the graph (rank, a hyperparameter, dtype, mode, bias, method,
example sizes) gets its own; cached snippets are never mutated by splicing or later passes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import peftc
import rewrite.splice as splice_mod
from rewrite.splice import SNIPPETS, SnippetCache
from tests.models import perturb


class Chain(torch.nn.Module):
    """Three 16 -> 16 linears (one with a bias) in a chain, two siblings reading one input
    (so fusion rewrites adapter nodes), and a 16 -> 24 head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 16, bias=False)
        self.b = torch.nn.Linear(16, 16, bias=False)
        self.c = torch.nn.Linear(16, 16, bias=True)
        self.d = torch.nn.Linear(16, 16, bias=False)
        self.head = torch.nn.Linear(16, 24, bias=False)
        self.drop = torch.nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(self.a(x))  # b reads a's adapted output: a snippet output feeds a snippet
        h = self.c(h) + self.d(h)  # c and d read the same input: fusion groups them
        return self.head(self.drop(h))


def chain(seed: int = 0, dtype: torch.dtype = torch.float32) -> Chain:
    torch.manual_seed(seed)
    return Chain().to(dtype).eval()


def x_in(batch: int = 2, seq: int = 5, dtype: torch.dtype = torch.float32) -> tuple:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, seq, 16, generator=g).to(dtype),)


def lora(targets: list[str], **hp: object) -> dict:
    return {"adapters": [{"method": "lora", "targets": targets, "rank": 4, "alpha": 8, **hp}]}


@pytest.fixture
def exports(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Start from an empty cache and record every snippet torch.export really makes (the
    cache's own counter is not trusted here: it is what is being tested)."""
    SNIPPETS.clear()
    made: list[str] = []
    real = torch.export.export

    def counting(mod: torch.nn.Module, *args: object, **kwargs: object) -> object:
        if isinstance(mod, splice_mod._Snippet):
            made.append("snippet")
        return real(mod, *args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counting)
    yield made
    SNIPPETS.clear()


def test_sites_with_the_same_graph_share_one_export(exports: list[str]) -> None:
    # a, b, d: 16 -> 16, no bias; c: the same with a bias; head: 16 -> 24
    exports0, hits0 = SNIPPETS.exports, SNIPPETS.hits
    peftc.compile(chain(), lora(["a", "b", "d"]), x_in())
    # a reads the model input, b and d adapter outputs whose shapes are in the first snippet's
    # own symbols: other symbols, same sizes, one export
    assert len(exports) == 1
    peftc.compile(chain(), lora(["a", "b", "c", "d", "head"]), x_in())
    assert len(exports) == 3  # c (bias) and head (out 24) are new; a/b/d came from the cache
    assert (SNIPPETS.exports - exports0, SNIPPETS.hits - hits0) == (3, 2 + 3)  # its own count


def test_second_compile_exports_nothing_and_computes_the_same(exports: list[str]) -> None:
    targets = ["a", "b", "c", "d", "head"]
    first = peftc.compile(chain(), lora(targets, dropout=0.1), x_in()).eval()
    n = len(exports)
    assert n == 3
    second = peftc.compile(chain(), lora(targets, dropout=0.1), x_in()).eval()
    assert len(exports) == n
    perturb(first.trainable_parameters())
    with torch.no_grad():
        for p, q in zip(second.trainable_parameters(), first.trainable_parameters(), strict=True):
            p.copy_(q)
        x = x_in(3, 7)  # other sizes than traced: the shared snippet stayed dynamic
        out = second(*x)
        assert (out - chain()(*x)).abs().max() > 1e-3  # the adapters do something
        torch.testing.assert_close(out, first(*x), atol=0, rtol=0)
    # the training graph is a separate trace in the other mode: new snippets, once
    first.train()(*x_in())
    n_train = len(exports)
    assert n_train > n
    second.train()(*x_in())
    assert len(exports) == n_train


# Each variant changes one thing that the snippet key holds because the traced adapter graph
# may depend on it, relative to lora(["a"]) on an fp32 model in eval mode, input 2 x 5 x 16.
VARIANTS = {
    "rank": dict(spec=lora(["a"], rank=2)),
    "alpha": dict(spec=lora(["a"], alpha=4)),  # the scale is a constant in the graph
    # 8.0 == 8, but a method may write a hyperparameter into the graph as given (mul by an int
    # or by a float), so the key tells the types apart
    "alpha as a float": dict(spec=lora(["a"], alpha=8.0)),
    # every hyperparameter is keyed, even one that only matters in the other mode
    "dropout": dict(spec=lora(["a"], dropout=0.1)),
    "method": dict(spec={"adapters": [{"method": "dora", "targets": ["a"], "rank": 4}]}),
    "bias": dict(spec=lora(["c"])),  # c is a with a bias: same shapes otherwise
    "dtype": dict(dtype=torch.bfloat16),
    "training": dict(training=True),
    # export sizes dims it keeps dynamic by their example sizes (equal ones are merged into
    # one symbol), so a snippet is reused only at the example sizes it was traced at
    "example sizes": dict(batch=3),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_what_changes_the_graph_gets_its_own_export(exports: list[str], name: str) -> None:
    v = VARIANTS[name]
    peftc.compile(chain(), lora(["a"]), x_in())
    assert len(exports) == 1
    dtype = v.get("dtype", torch.float32)
    model = chain(dtype=dtype).train(v.get("training", False))
    peftc.compile(model, v.get("spec", lora(["a"])), x_in(v.get("batch", 2), dtype=dtype))
    assert len(exports) == 2, f"a {name} change reused the other snippet"
    # and the variant itself is now cached like any other
    model = chain(dtype=dtype).train(v.get("training", False))
    peftc.compile(model, v.get("spec", lora(["a"])), x_in(v.get("batch", 2), dtype=dtype))
    assert len(exports) == 2


# LoRA; DoRA (per-site magnitude, reads the bias); VeRA (tensors shared by every site, sized
# by bind_plan over the whole plan)
METHODS = {
    "lora": {"method": "lora", "rank": 4, "alpha": 8},
    "dora": {"method": "dora", "rank": 4, "alpha": 8},
    "vera": {"method": "vera", "rank": 4},
}


@pytest.mark.parametrize("method", list(METHODS))
def test_a_reused_snippet_gives_the_graph_a_fresh_export_gives(
    exports: list[str], method: str
) -> None:
    spec = {"adapters": [{**METHODS[method], "targets": ["a", "b", "c", "d", "head"]}]}
    peftc.compile(chain(seed=1), spec, x_in())  # another model of these shapes fills the cache
    n = len(exports)
    warm = peftc.compile(chain(), spec, x_in())
    assert len(exports) == n  # every site came from the cache
    SNIPPETS.clear()
    cold = peftc.compile(chain(), spec, x_in())
    assert len(exports) == 2 * n  # and here every one was traced again
    assert warm.graph_module.code == cold.graph_module.code
    perturb(warm.trainable_parameters())
    with torch.no_grad():
        for p, q in zip(cold.trainable_parameters(), warm.trainable_parameters(), strict=True):
            p.copy_(q)
        out = warm(*x_in(3, 7))
        assert (out - chain()(*x_in(3, 7))).abs().max() > 1e-3
        torch.testing.assert_close(out, cold(*x_in(3, 7)), atol=0, rtol=0)


def _snapshot(gm: torch.fx.GraphModule) -> list[tuple]:
    return [
        (
            n.name,
            n.op,
            str(n.target),
            repr(n.args),
            repr(n.kwargs),
            repr(sorted(n.meta)),
            repr(n.meta.get("nn_module_stack")),
            repr(n.meta.get("val")),
        )
        for n in gm.graph.nodes
    ] + [(gm.code,)]


def test_cached_snippets_are_never_mutated(exports: list[str]) -> None:
    spec = lora(["a", "b", "c", "d", "head"])
    first = peftc.compile(chain(), spec, x_in())  # fusion rewrites c's and d's adapter nodes
    cached = list(SNIPPETS._entries.values())
    assert len(cached) == 3
    before = [_snapshot(gm) for gm in cached]
    second = peftc.compile(chain(), spec, x_in())
    assert len(exports) == 3
    assert [_snapshot(gm) for gm in cached] == before
    # spliced nodes own their meta containers: editing them in place cannot reach the cache
    snippet_containers = {
        id(v)
        for gm in cached
        for n in gm.graph.nodes
        for v in n.meta.values()
        if isinstance(v, dict | list)
    }
    for model in (first, second):
        for node in model.graph_module.graph.nodes:
            if node.meta.get("peftc"):
                for v in node.meta.values():
                    assert not (isinstance(v, dict | list) and id(v) in snippet_containers)


def test_cache_is_bounded_least_recently_used() -> None:
    cache = SnippetCache(maxsize=2)
    gms = [torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph()) for _ in range(3)]
    cache.put("x", gms[0])
    cache.put("y", gms[1])
    assert cache.get("x") is gms[0]  # x is now the most recently used
    cache.put("z", gms[2])
    assert len(cache) == 2 and cache.get("y") is None
    assert cache.get("x") is gms[0] and cache.get("z") is gms[2]
    assert (cache.exports, cache.hits) == (3, 3)
    cache.clear()
    assert len(cache) == 0 and cache.get("x") is None
    assert (cache.exports, cache.hits) == (3, 3)  # counters only grow: callers take differences

"""Keys Inductor's compile caches on the source of peftc's custom ops.

torch.compile keeps compiled graphs on disk (the FX graph and AOTAutograd caches) and keys
them on the captured graph, in which a custom op is only its name. What peftc's ops do while
a graph is compiled, their autograd formulas and autocast kernels, is traced into the compiled
code but is not in the key, so after an upgrade that changed one a warm cache served the old
compiled graph (measured: `peftc::linear_cross_entropy`'s new autocast kernel stayed unused,
its GEMMs in fp32, until the cache directory was emptied). Every compiled call peftc makes runs
under `torch.compiler.config.cache_key_tag` salted with a digest of the modules that define
the ops; a tag the user set is kept in front of it.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch

# the modules that register `peftc::` ops (torch.library); tests/test_compile_cache.py checks
# that the list holds every one in the tree
OP_MODULES = (
    "rewrite.dequant",
    "passes.fused_loss",
    "passes.adapters.paca",
    "passes.adapters.singlora",
)


def digest(paths: Iterable[Path]) -> str:
    """The first 16 hex digits of the SHA-256 of the files' bytes, in order."""
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


@functools.cache
def ops_digest() -> str:
    """The digest of OP_MODULES' source files (read once: they do not change in a process)."""
    return digest(Path(find_spec(name).origin) for name in OP_MODULES)


def cache_key_tag() -> str:
    """The tag compiled calls run under: the user's tag, if any, then peftc's ops digest."""
    own = f"peftc-ops-{ops_digest()}"
    user = torch.compiler.config.cache_key_tag
    if not user or user == own or user.endswith(f"+{own}"):
        return user or own
    return f"{user}+{own}"


def salted(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """`compiled` called under cache_key_tag(), so that what it compiles is keyed on it."""
    config = torch.compiler.config

    @functools.wraps(compiled)
    def call(*args: Any, **kwargs: Any) -> Any:
        # set and restored by hand: config.patch() costs 20 us a call, this about 4
        before = config.cache_key_tag
        config.cache_key_tag = cache_key_tag()
        try:
            return compiled(*args, **kwargs)
        finally:
            config.cache_key_tag = before

    return call

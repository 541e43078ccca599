"""Recompute every node's `meta["val"]` after rewriting, in the trace's own symbols.

Spliced adapter nodes arrive with values from their snippet's separate export (its own size
symbols, such as s77, where the model's graph says s0), and nodes made by fusion passes have
none. Propagating fake tensors from the placeholders through the finished graph, in the fake
mode and shape environment of the original trace, gives every node a value that names the
same batch and sequence symbols as the rest of the graph (what `peftc inspect` shows).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from rewrite.program import Program

log = logging.getLogger(__name__)


def refresh_values(program: Program, state: Mapping[str, torch.Tensor]) -> bool:
    """Set `meta["val"]` of every node of `program` with torch.fx's FakeTensorProp; tensors the
    trace did not see (adapter parameters) get theirs from `state`. All or nothing: if the run
    fails, every node keeps its old value and False is returned."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([n.meta.get("val") for n in placeholders])
    if mode is None:
        return False
    slots = {s.name: s for s in program.slots}
    args = []
    for node in placeholders:
        val = node.meta.get("val")
        if val is None:
            tensor = state[slots[node.name].target]
            val = mode.from_tensor(tensor.detach(), static_shapes=True)
        args.append(val)
    old = {n: n.meta["val"] for n in program.graph.nodes if "val" in n.meta}
    # a meta kernel that cannot take symbolic sizes (FFTs, as in C3A) makes FakeTensor log an
    # error before it raises; here that only means the old values stay, so keep it quiet
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        FakeTensorProp(program.graph_module, mode).propagate_dont_convert_inputs(*args)
    except Exception as e:  # metadata only: a failure must not stop the rewrite
        log.debug("could not refresh node values (%s); keeping the spliced ones", e)
        for node in program.graph.nodes:
            if node in old:
                node.meta["val"] = old[node]
            else:
                node.meta.pop("val", None)
        return False
    finally:
        fake_log.setLevel(level)
    return True

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import uuid  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from passes.adapters import registry  # noqa: E402
from passes.adapters.base import ParamSpec  # noqa: E402
from passes.adapters.contract import Method  # noqa: E402
from passes.adapters.cost import Cost  # noqa: E402


@pytest.fixture
def unmergeable_method():
    """A method whose update depends on the input (so it cannot merge), registered for one
    test; yields its spec name."""
    name = f"test_gate_{uuid.uuid4().hex[:8]}"

    @registry.register(name)
    class Gate(Method):
        mergeable = False
        unmergeable_reason = "its update is gated by the input's own norm"

        def params(self, site):
            return {"g": ParamSpec((site.out_features,))}

        def init(self, site, W, calib, generator):
            return {"g": torch.full((site.out_features,), 0.1, dtype=W.dtype)}

        def forward(self, x, base_out, W, p, ctx):
            return base_out * (1 + p["g"] * x.norm(dim=-1, keepdim=True))

        def cost(self, site):
            return Cost(0, 0, 0, 0)

    yield name
    registry._METHODS.pop(name, None)

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Idle OpenMP threads sleep instead of spinning. On the shared 2-core machine, with other
# processes on the cores, a spinning thread waits on a peer the scheduler has taken off its
# core: a compiled (Inductor C++) training step of tiny Llama took 1.2 s instead of 10 ms, and
# eager tests ran up to twice as long. Read once, when libgomp loads: so before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under pytest-xdist (`-n 2`, the README's command) each worker gets one core of its own.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import uuid  # noqa: E402
from collections import Counter  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from passes.adapters import registry  # noqa: E402
from passes.adapters.base import ParamSpec  # noqa: E402
from passes.adapters.contract import Method  # noqa: E402
from passes.adapters.cost import Cost  # noqa: E402
from tests import shared_traces  # noqa: E402
from tests.method_cases import SharedModels  # noqa: E402

shared_traces.install()


# The files that take longest (a minute or more each on the 2-core machine), in that order.
# xdist's loadfile hands out whole files in collection order, by default the files with the
# most tests first; these have few tests, so they went last and the other worker sat idle
# while one of them ran. Longest first, then the rest as xdist orders them.
SLOW_FILES = (
    "test_architectures.py",
    "test_random_nets.py",
    "test_distributed.py",
    "test_onnx_export.py",
    "test_genai.py",
    "test_onnx_multi.py",
    "test_quantize.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order set below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    counts = Counter(item.path.name for item in items)

    def rank(item):
        name = item.path.name
        slow = SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)
        return (slow, -counts[name], name)

    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.fixture(autouse=True)
def _fresh_trace(request):
    """Tests marked `fresh_trace` export every model they trace (see tests/shared_traces.py)."""
    fresh = request.node.get_closest_marker("fresh_trace") is not None
    shared_traces.SHARED.enabled = not fresh
    yield
    shared_traces.SHARED.enabled = True


@pytest.fixture(scope="session")
def traced():
    """`traced("llama" | "gpt2")`: tiny Llama's (2 layers) or GPT-2's eval-mode trace at
    token_inputs(), traced once per test run. Read-only: (model, program, sites, state)."""
    from types import SimpleNamespace

    from rewrite.sites import find_sites
    from rewrite.trace import trace
    from tests.models import tiny_gpt2, tiny_llama, token_inputs

    built = {}

    def get(arch: str):
        if arch not in built:
            model = {"llama": tiny_llama, "gpt2": tiny_gpt2}[arch]()
            program = trace(model, token_inputs(), training=False)
            state = dict(model.named_parameters(remove_duplicate=False))
            state.update(model.named_buffers())
            built[arch] = SimpleNamespace(
                model=model, program=program, sites=find_sites(program), state=state
            )
        return built[arch]

    return get


@pytest.fixture(scope="session")
def shared_models() -> SharedModels:
    """Each method's case compiled once per test run (see tests/method_cases.py)."""
    return SharedModels()


@pytest.fixture
def method_model(shared_models):
    """`method_model(name)`: the shared compiled model of a method's case, in its trained
    state; whatever the test changes (adapter values, gradients, mode) is undone after it."""
    handed = []

    def get(name: str):
        model = shared_models.get(name)
        model.restore()
        handed.append(model)
        return model

    yield get
    for model in handed:
        model.restore()


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

"""Linear layers written as matmuls with a parameter (`x @ self.weight.T`, `mm` with `W.t()`,
`matmul` with `W.transpose(0, 1)`, and `h @ W` with W stored [in, out]) are sites: adapted,
trained, merged and exported like `nn.Linear`. Oracles: PEFT for the Linear subclass, LoRA's merged-weight formula in eager
PyTorch for the raw parameters, onnxruntime for the export (fp32: 1e-5, ONNX 1e-4)."""

import copy

import pytest
import torch
from peft import PeftModel

import peftc
from rewrite.canonical import canonicalize_linears
from rewrite.trace import trace
from tests.models import perturb

TOL, ONNX_TOL = 1e-5, 1e-4


class TransposedLinear(torch.nn.Linear):
    """An nn.Linear subclass with a forward of its own, as some model code writes it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


class Handwritten(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = TransposedLinear(8, 12)
        self.mix = torch.nn.Parameter(torch.randn(12, 12) / 4)  # h.mm(mix.t()), on 2-D rows
        self.down = torch.nn.Parameter(torch.randn(6, 12) / 4)  # matmul(h, down.transpose(0, 1))
        self.store = torch.nn.Parameter(torch.randn(6, 3) / 4)  # h @ store: kept [in, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x))
        b, s, _ = h.shape
        h = h.reshape(-1, 12).mm(self.mix.t()).reshape(b, s, 12)
        h = torch.matmul(h, self.down.transpose(0, 1))
        return h @ self.store


def x_in(batch: int = 2, seq: int = 5, seed: int = 0) -> tuple[torch.Tensor]:
    return (torch.randn(batch, seq, 8, generator=torch.Generator().manual_seed(seed)),)


SPEC = {"adapters": [{"method": "lora", "targets": "all-linear", "rank": 2, "alpha": 4}]}


@pytest.fixture(scope="module")
def adapted():
    base = Handwritten().eval()
    model = peftc.compile(base, SPEC, x_in()).eval()
    perturb(model.trainable_parameters(), std=0.2)
    return base, model


def test_transposed_parameter_products_are_linear_sites():
    program = trace(Handwritten(), x_in(), training=False)
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.linear.default) == 4
    assert torch.ops.aten.matmul.default not in targets and torch.ops.aten.mm.default not in targets
    assert canonicalize_linears(program) == 0  # nothing left to rewrite
    sites = peftc.compile(Handwritten(), SPEC, x_in()).sites
    assert {s.path: (s.op, s.in_features, s.out_features) for s in sites} == {
        "up": ("linear", 8, 12),
        "mix": ("linear", 12, 12),
        "down": ("linear", 12, 6),
        "store": ("linear", 6, 3),
    }
    assert sites["up"].module_class.endswith("TransposedLinear")
    assert [s.path for s in sites if s.transposed] == ["store"]  # the one stored [in, out]


def test_adapted_output_is_the_merged_weight_formula(adapted):
    base, model = adapted
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for a in model.plan:
            p = model.named_adapter_parameters()
            A, B = (p[f"adapters.{a.path}.lora_{k}"] for k in ("A", "B"))
            weight = reference.up.weight if a.path == "up" else getattr(reference, a.path)
            delta = a.method.scaling * B @ A  # [out, in]
            weight.add_(delta.t() if a.path == "store" else delta)
        x = x_in(3, 7, seed=1)  # other sizes than traced
        got, expected = model(*x), reference(*x)
        assert (got - base(*x)).abs().max() > 1e-3  # the adapters do something
    torch.testing.assert_close(got, expected, atol=TOL, rtol=TOL)
    with torch.no_grad():
        torch.testing.assert_close(model.merge()(*x), got, atol=TOL, rtol=TOL)


def test_gradients_reach_every_adapter(adapted):
    _, model = adapted
    model.train()
    try:
        model(*x_in()).square().mean().backward()
        for name, p in model.named_adapter_parameters().items():
            assert p.grad is not None and p.grad.abs().max() > 0, name
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_onnx_export_verifies(adapted, tmp_path):
    _, model = adapted
    report = model.export_onnx(str(tmp_path / "m.onnx"))
    assert report.max_errors and max(report.max_errors.values()) <= ONNX_TOL


def test_the_linear_subclass_matches_peft(tmp_path):
    base = Handwritten().eval()
    spec = {"adapters": [{"method": "lora", "targets": ["up"], "rank": 2, "alpha": 4}]}
    model = peftc.compile(base, spec, x_in()).eval()
    perturb(model.trainable_parameters(), std=0.2)
    model.save_adapter(tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    x = x_in(3, 7, seed=2)
    with torch.no_grad():
        ours = model(*x)
        assert (ours - base(*x)).abs().max() > 1e-3
        torch.testing.assert_close(theirs(*x), ours, atol=TOL, rtol=TOL)


def test_bare_parameter_sites_save_and_load_in_peftc(adapted, tmp_path):
    _, model = adapted
    saved = {k: p.detach().clone() for k, p in model.named_adapter_parameters().items()}
    with pytest.warns(UserWarning, match=r"^mix, down, store: .*PEFT cannot load"):
        model.save_adapter(tmp_path)
    try:
        perturb(model.trainable_parameters(), std=0.2, seed=9)
        model.load_adapter(tmp_path)
        for key, p in model.named_adapter_parameters().items():
            assert torch.equal(p, saved[key]), key
    finally:
        with torch.no_grad():
            for key, p in model.named_adapter_parameters().items():
                p.copy_(saved[key])

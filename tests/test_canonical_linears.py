"""Linear layers written as matmuls with a parameter (`x @ self.weight.T`, `mm` with `W.t()`,
`matmul` with `W.transpose(0, 1)`, `h @ W` with W stored [in, out], and the `addmm`, `bmm` and
`einsum` forms) are sites: adapted,
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


class Batched(torch.nn.Module):
    """The other forms: addmm with a transposed weight, bmm with the weight repeated over the
    batch, einsum with the weight stored [in, out]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.proj = torch.nn.Parameter(torch.randn(12, 8) / 4)  # addmm(bias, x, proj.t())
        self.bias = torch.nn.Parameter(torch.randn(12) / 4)
        self.mix = torch.nn.Parameter(torch.randn(6, 12) / 4)  # bmm(h, mix.t() repeated)
        self.store = torch.nn.Parameter(torch.randn(6, 3) / 4)  # einsum("bsi,io->bso", h, store)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = torch.addmm(self.bias, x.reshape(-1, 8), self.proj.t()).reshape(b, s, 12)
        h = torch.bmm(torch.relu(h), self.mix.t().unsqueeze(0).expand(b, -1, -1))
        return torch.einsum("bsi,io->bso", h, self.store)


def test_addmm_bmm_and_einsum_forms_are_linear_sites_and_merge_and_export(tmp_path):
    base = Batched().eval()
    program = trace(base, x_in(), training=False)
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.linear.default) == 3
    aten = torch.ops.aten
    assert not {aten.addmm.default, aten.bmm.default, aten.einsum.default} & set(targets)
    model = peftc.compile(base, SPEC, x_in()).eval()
    assert {s.path: (s.in_features, s.out_features, s.transposed) for s in model.sites} == {
        "proj": (8, 12, False),
        "mix": (12, 6, False),
        "store": (6, 3, True),
    }
    assert model.sites["proj"].bias == "bias"
    perturb(model.trainable_parameters(), std=0.2)
    reference = copy.deepcopy(base)
    p = model.named_adapter_parameters()
    with torch.no_grad():
        for a in model.plan:
            A, B = (p[f"adapters.{a.path}.lora_{k}"] for k in ("A", "B"))
            delta = a.method.scaling * B @ A  # [out, in]
            getattr(reference, a.path).add_(delta.t() if a.path == "store" else delta)
        x = x_in(3, 7, seed=1)
        got = model(*x)
        assert (got - base(*x)).abs().max() > 1e-3
        torch.testing.assert_close(got, reference(*x), atol=TOL, rtol=TOL)
        torch.testing.assert_close(model.merge()(*x), got, atol=TOL, rtol=TOL)
    report = model.export_onnx(str(tmp_path / "m.onnx"))
    assert report.max_errors and max(report.max_errors.values()) <= ONNX_TOL

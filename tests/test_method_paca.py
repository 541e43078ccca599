"""PaCA against the reference formula (fp32, 1e-5), in eval and training graphs, on linear
and addmm (GPT-2 Conv1D) sites; the training graph's shape (no extra matmul, P's gradient
from x[..., idx] only); its refusals. The method-generic checks (merge, gradients,
checkpoints, bf16, ONNX, counts) are tests/test_methods.py's and its siblings'."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import peftc
from passes.adapters.registry import methods
from rewrite.trace import trace
from tests.oracle import TOL, one_linear, perturbed

aten = torch.ops.aten
methods()  # registers every method, and with paca its op peftc::paca_linear
MATMULS = {aten.mm.default, aten.addmm.default, aten.linear.default, aten.bmm.default}
MATMULS |= {aten.matmul.default, torch.ops.peftc.paca_linear.default}  # PaCA's own: one GEMM


def reference(x, W, b, idx, P, s):
    """y = x·W'ᵀ + b, W' = W with columns idx replaced by s·P (the reference's merged W)."""
    Wp = W.clone()
    Wp[:, idx] = s * P
    return x @ Wp.T + b


def test_init_and_forward_equal_the_reference_formula():
    """idx: rank distinct input columns (int64, frozen); P = W[:, idx]/s; in eval and in
    training mode (the custom op) the output is x·W'ᵀ + b; the merged weight is W'."""
    one = one_linear("paca", rank=4, alpha=6.0)
    t, W, b = one.tensors(), one.layer.weight.detach(), one.layer.bias.detach()
    idx, s = t["paca_indices"], 6.0 / 4
    assert idx.dtype == torch.int64 and len(set(idx.tolist())) == 4 and 0 <= idx.min()
    assert (
        idx.max() < 24
        and not one.adapted.named_adapter_parameters()["adapters.0.paca_indices"].requires_grad
    )
    torch.testing.assert_close(t["paca_w"], W[:, idx] / s, atol=TOL, rtol=TOL)
    perturbed(one)
    P = one.tensors()["paca_w"]
    expected = reference(one.x, W, b, idx, P, s)
    assert (expected - one.base_out()).abs().max() > 1e-3  # a visible update
    torch.testing.assert_close(one.out(), expected, atol=TOL, rtol=TOL)
    with torch.no_grad():
        trained = one.adapted.train()(one.x)
    torch.testing.assert_close(trained, expected, atol=TOL, rtol=TOL)
    merged = one.adapted.eval().merge()
    torch.testing.assert_close(merged(one.x), expected, atol=TOL, rtol=TOL)


def test_training_graph_has_no_extra_matmul_and_feeds_dP_with_r_columns():
    """The base model's training graph has one matmul (aten.linear); PaCA's has one too, the
    custom op that replaces it (no aten matmul is left), fed by index_select(x, -1, idx) of
    width r: what P's gradient is computed from."""
    one = one_linear("paca", rank=4).adapted.train()
    pipeline = one.pipeline
    adapted = pipeline.program(True).graph
    base = trace(pipeline.model, pipeline.example_inputs, training=True).graph
    calls = [n for n in base.nodes if n.op == "call_function" and n.target in MATMULS]
    assert [n.target for n in calls] == [aten.linear.default]
    calls = [n for n in adapted.nodes if n.op == "call_function" and n.target in MATMULS]
    assert [n.target for n in calls] == [torch.ops.peftc.paca_linear.default]
    x, x_idx = calls[0].args[:2]
    assert x.op == "placeholder" and tuple(x.meta["val"].shape)[-1] == 24
    assert x_idx.target == aten.index_select.default and x_idx.args[0] is x
    assert tuple(x_idx.meta["val"].shape)[-1] == 4  # r columns, not in_features
    assert x_idx.args[2].name.endswith("paca_indices")


class _LogMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in MATMULS:
            self.shapes.append(tuple(out.shape))
        return out


def test_backward_saves_and_reads_only_the_selected_columns():
    """Autograd keeps x[..., idx] (not x) for the backward, and the backward's matmuls are
    dx = gy·W' and dP = s·gyᵀ·x[..., idx]: no out×in gradient of W' is formed. The
    gradients equal plain autograd through the reference formula."""
    one = perturbed(one_linear("paca", rank=4, alpha=6.0))
    t, W, b = one.tensors(), one.layer.weight.detach(), one.layer.bias.detach()
    model = one.adapted.train()
    P = model.named_adapter_parameters()["adapters.0.paca_w"]
    x = one.x.clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda s: saved.append(s.shape) or s, lambda s: s
    ):
        y = model(x)
    assert torch.Size([3, 7, 4]) in saved and torch.Size([3, 7, 24]) not in saved
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    with _LogMatmuls() as log:
        y.backward(gy)
    assert sorted(log.shapes) == [(16, 4), (21, 24)]  # dP [out, r] and dx [T, in]
    xr, Pr = one.x.clone().requires_grad_(True), t["paca_w"].clone().requires_grad_(True)
    reference(xr, W, b, t["paca_indices"], Pr, 6.0 / 4).backward(gy)
    torch.testing.assert_close(P.grad, Pr.grad, atol=TOL, rtol=TOL)
    torch.testing.assert_close(x.grad, xr.grad, atol=TOL, rtol=TOL)


def test_addmm_site_gpt2_conv1d():
    """GPT-2's Conv1D (weight stored [in, out], an addmm site): W' is built on the logical
    [out, in] weight, in eval and training graphs."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(16, 24)  # nf=out, nx=in
    spec = {"adapters": [{"method": "paca", "targets": ["0"], "rank": 4}]}
    adapted = peftc.compile(torch.nn.Sequential(layer), spec, (torch.randn(2, 5, 24),))
    assert adapted.plan.assignments[0].site.op == "addmm"
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    t = {k.rsplit(".", 1)[-1]: v.detach() for k, v in adapted.named_adapter_parameters().items()}
    x = torch.randn(3, 7, 24)
    W, b = layer.weight.detach().T, layer.bias.detach()
    expected = reference(x, W, b, t["paca_indices"], t["paca_w"], 8.0 / 4)
    assert (expected - layer(x)).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(adapted.eval()(x), expected, atol=TOL, rtol=TOL)
        torch.testing.assert_close(adapted.train()(x), expected, atol=TOL, rtol=TOL)


def test_indices_follow_the_spec_seed():
    """idx is drawn from the spec-seeded generator: the same seed gives the same columns."""

    def idx(seed):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 8))
        spec = {"seed": seed, "adapters": [{"method": "paca", "targets": ["0"], "rank": 8}]}
        adapted = peftc.compile(model, spec, (torch.randn(2, 5, 64),))
        return adapted.named_adapter_parameters()["adapters.0.paca_indices"].detach()

    assert torch.equal(idx(1), idx(1)) and not torch.equal(idx(1), idx(2))


def test_refuses_rank_above_in_features():
    with pytest.raises(Exception, match=r"rank 32 is more input columns than the layer has"):
        one_linear("paca", rank=32)


def test_refuses_conv2d():
    from tests.oracle import one_conv2d

    with pytest.raises(Exception, match=r"paca supports linear layers only, not conv2d"):
        one_conv2d("paca", rank=2)

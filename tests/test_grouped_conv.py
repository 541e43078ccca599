"""LoRA on grouped and depthwise convolutions, where the rank is divisible by the groups, at
PEFT parity (A a full conv, B a grouped 1x1 conv). PEFT refuses to merge them; peftc merges
into a dense conv. Oracles: PEFT's forward both ways, the unmerged graph for the merge,
onnxruntime for the export (fp32: 1e-5, ONNX 1e-4)."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peftc
from rewrite.spec import SpecError
from tests.method_checks import peft_trainable
from tests.models import perturb

TOL, ONNX_TOL = 1e-5, 1e-4
GROUPED = ["depthwise", "grouped", "strided"]


class GroupedNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = torch.nn.Conv2d(8, 12, 1, groups=2)
        self.strided = torch.nn.Conv2d(12, 12, 3, stride=2, padding=1, groups=4, bias=False)
        self.head = torch.nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(self.depthwise(h))
        h = torch.relu(self.grouped(h))
        return self.head(self.strided(h).mean(dim=(2, 3)))


def images(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, 10, 10, generator=torch.Generator().manual_seed(seed)),)


SPEC = {"adapters": [{"method": "lora", "targets": GROUPED, "rank": 8, "alpha": 16}]}


@pytest.fixture(scope="module")
def adapted():
    base = GroupedNet().eval()
    model = peftc.compile(base, SPEC, images()).eval()
    perturb(model.trainable_parameters(), std=0.2)
    return base, model


def _out(model, x):
    with torch.no_grad():
        return model(*x)


def test_peftc_adapter_loads_into_peft_and_counts_match(adapted, tmp_path):
    base, model = adapted
    model.save_adapter(tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True).eval()
    x = images(3, seed=1)
    ours = _out(model, x)
    assert (ours - _out(base, x)).abs().max() > 1e-3
    torch.testing.assert_close(_out(theirs, x), ours, atol=TOL, rtol=TOL)
    n = sum(p.numel() for p in model.trainable_parameters())
    formula = sum(a.method.cost(a.site).evaluate()["params"] for a in model.plan)
    assert n == theirs.get_nb_trainable_parameters()[0] == formula


def test_peft_adapter_loads_into_peftc(adapted, tmp_path):
    base, model = adapted
    config = LoraConfig(r=8, lora_alpha=16, target_modules=GROUPED)
    theirs = get_peft_model(copy.deepcopy(base), config).eval()
    perturb(peft_trainable(theirs), std=0.2, seed=3)
    theirs.save_pretrained(tmp_path)
    other = peftc.compile(copy.deepcopy(base), SPEC, images()).eval()
    other.load_adapter(tmp_path)
    x = images(3, seed=2)
    expected = _out(theirs, x)
    assert (expected - _out(base, x)).abs().max() > 1e-3
    torch.testing.assert_close(_out(other, x), expected, atol=TOL, rtol=TOL)


def test_merge_makes_the_grouped_convs_dense_and_exports(adapted, tmp_path):
    base, model = adapted
    x = images(3, seed=4)
    unmerged = _out(model, x)
    merged = model.merge()
    groups = [
        n.args[6] if len(n.args) > 6 else 1
        for n in merged.graph.nodes
        if n.target == torch.ops.aten.conv2d.default
    ]
    assert groups == [1, 1, 1, 1]  # was [1, 8, 2, 4]
    torch.testing.assert_close(_out(merged, x), unmerged, atol=TOL, rtol=TOL)
    report = model.export_onnx(str(tmp_path / "m.onnx"))
    assert report.max_errors and max(report.max_errors.values()) <= ONNX_TOL


def test_a_rank_the_groups_do_not_divide_and_dora_are_refused():
    spec = {"adapters": [{"method": "lora", "targets": ["depthwise"], "rank": 4}]}
    with pytest.raises(
        SpecError, match="depthwise: lora on a convolution with groups=8 needs a rank"
    ):
        peftc.compile(GroupedNet(), spec, images())
    spec = {"adapters": [{"method": "dora", "targets": ["grouped"], "rank": 4}]}
    with pytest.raises(SpecError, match="dora supports convolutions with groups=1 only"):
        peftc.compile(GroupedNet(), spec, images())


def test_the_fp16_merge_is_dense_too(adapted):
    """The fp16 export folds merged weights into a fresh fp16 trace: its grouped convs are
    made dense the same way (fp16 tolerance 1e-2 against the fp32 model)."""
    from lowering.onnx import merged_module

    base, model = adapted
    gm = merged_module(model, "fp16")
    groups = [
        n.args[6] if len(n.args) > 6 else 1
        for n in gm.graph.nodes
        if n.target == torch.ops.aten.conv2d.default
    ]
    assert groups == [1, 1, 1, 1]
    x = images(3, seed=5)
    with torch.no_grad():
        expected = model(*x)
        got = gm(x[0].half()).float()
    assert (expected - _out(base, x)).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)

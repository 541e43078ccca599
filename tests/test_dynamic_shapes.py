"""Dynamic dims as the trace resolves them, and as the user states them (torch.export's
`dynamic_shapes`): the default keeps free what the model leaves free, the ONNX export and
its verification use exactly the resolved dims, and a fixed dim is named in the error."""

import pytest
import torch
from torch.export import Dim

import peftc
from tests.models import perturb

FP32 = 1e-4  # onnxruntime against PyTorch, as the ONNX export's own check


class SpeechEncoderDecoder(torch.nn.Module):
    """Features [batch, 12 features, time] through a conv encoder, pooled over time into a
    token decoder: the float input's dim 1 is fixed (the conv's channels), its time dim and
    the decoder's sequence are free and unrelated (the export failed here when dim 1 of a
    rank-3 float input was taken for the sequence)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Conv1d(12, 16, 3, padding=1)
        self.embed = torch.nn.Embedding(50, 16)
        self.proj = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 50)

    def forward(self, input_features: torch.Tensor, decoder_input_ids: torch.Tensor):
        memory = self.encoder(input_features).mean(-1, keepdim=True).transpose(1, 2)
        return self.head(torch.relu(self.proj(self.embed(decoder_input_ids) + memory)))


def speech_inputs(batch: int = 2, time: int = 30, seq: int = 7) -> dict:
    g = torch.Generator().manual_seed(batch * 100 + time)
    return {
        "input_features": torch.randn(batch, 12, time, generator=g),
        "decoder_input_ids": torch.randint(0, 50, (batch, seq), generator=g),
    }


SPEC = {"adapters": [{"method": "lora", "targets": "all-linear", "rank": 4}]}


def test_default_resolves_free_and_fixed_dims_and_exports(tmp_path):
    adapted = peftc.compile(SpeechEncoderDecoder(), SPEC, speech_inputs()).eval()
    dims = adapted.program(training=False).input_dims
    assert dims["input_features"][1] is None  # fixed by the conv
    assert dims["input_features"][2] is not None  # time stays free
    assert dims["input_features"][2] != dims["decoder_input_ids"][1]  # and unrelated
    perturb(adapted.trainable_parameters(), std=0.2)
    other = speech_inputs(3, 41, 11)  # batch, time and sequence all new
    with torch.no_grad():
        assert (adapted(**other) - adapted.base(**other)).abs().max() > 1e-3
    report = adapted.export_onnx(str(tmp_path / "speech.onnx"))
    assert len(report.max_errors) == 2 and max(report.max_errors.values()) <= FP32
    shapes = {key.split("x")[2] for key in report.max_errors}  # time of input_features
    assert "30" not in shapes  # verified at other lengths than the trace's


class Spectrogram(torch.nn.Module):
    """A [batch, 1, mel, time] image whose time axis a user states as dynamic (images keep
    their spatial dims fixed by default)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.out = torch.nn.Linear(4 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)  # [b, 4, 8, t]
        return self.out(h.permute(0, 3, 1, 2).flatten(2))  # [b, t, 10]


def test_declared_time_dim_is_dynamic_through_onnx(tmp_path):
    x = torch.randn(2, 1, 8, 20)
    spec = {"adapters": [{"method": "lora", "targets": ["conv", "out"], "rank": 2}]}
    default = peftc.compile(Spectrogram(), spec, (x,))
    assert default.program().input_dims["x"][3] is None  # not guessed for images
    adapted = peftc.compile(
        Spectrogram(), spec, (x,), dynamic_shapes={"x": {0: Dim.AUTO, 3: Dim("time")}}
    ).eval()
    assert adapted.program(training=False).input_dims["x"][3] is not None
    perturb(adapted.trainable_parameters(), std=0.2)
    longer = torch.randn(3, 1, 8, 33)
    with torch.no_grad():
        assert adapted(longer).shape == (3, 33, 10)
        assert (adapted(longer) - adapted.base(longer)).abs().max() > 1e-3
    report = adapted.export_onnx(str(tmp_path / "spec.onnx"))
    assert max(report.max_errors.values()) <= FP32
    assert all(key.endswith("x8x" + key.split("x")[-1]) for key in report.max_errors)
    assert {key.split("x")[-1] for key in report.max_errors} != {"20"}


def test_fixed_dims_are_named_in_errors():
    with pytest.raises(peftc.TraceError, match="input 'input_features' dim 1"):
        peftc.compile(
            SpeechEncoderDecoder(),
            SPEC,
            speech_inputs(),
            dynamic_shapes={"input_features": {0: Dim("b"), 1: Dim("features")}},
        )
    adapted = peftc.compile(SpeechEncoderDecoder(), SPEC, speech_inputs())
    wrong = speech_inputs()
    wrong["input_features"] = torch.randn(2, 13, 30)
    with pytest.raises(ValueError, match=r"'input_features'.*dim 1 is 13, fixed at 12"):
        adapted(**wrong)
    with pytest.raises(peftc.TraceError, match="not inputs of this call"):
        peftc.compile(SpeechEncoderDecoder(), SPEC, speech_inputs(), dynamic_shapes={"y": {}})

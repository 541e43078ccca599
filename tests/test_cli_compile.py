"""`peftc compile` adapts a model from a spec file and writes a PEFT-format adapter."""

import json

import torch
import yaml
from safetensors.torch import load_file

from peftc.cli import main


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model.example_inputs = lambda: (torch.randn(2, 8),)
    return model


def test_compile_command_writes_an_adapter(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump({"adapters": [{"method": "lora", "targets": ["0", "2"], "rank": 2}]})
    )
    out = tmp_path / "adapter"
    assert (
        main(["compile", "--model", f"{__file__}:build", "--spec", str(spec), "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "2 of 2 sites adapted (lora)" in printed
    config = json.loads((out / "adapter_config.json").read_text())
    assert (
        config["peft_type"] == "LORA"
        and config["r"] == 2
        and config["target_modules"] == ["0", "2"]
    )
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors["base_model.model.0.lora_A.weight"].shape == (2, 8)


def test_compile_command_reports_a_bad_spec(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("adapters:\n  - {method: lorra, targets: ['0']}\n")
    code = main(
        [
            "compile",
            "--model",
            f"{__file__}:build",
            "--spec",
            str(spec),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "unknown method 'lorra' (did you mean 'lora'?)" in capsys.readouterr().err

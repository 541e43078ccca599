"""Shared CLI helpers: load a model from a Python path or a Hugging Face directory, and
build example inputs for it."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch


def load_model(ref: str) -> torch.nn.Module:
    """`pkg.module:factory` (a callable returning a module, or a module instance),
    `path/to/file.py:factory`, or a Hugging Face model directory."""
    if os.path.isdir(ref):
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(ref)
        archs = getattr(config, "architectures", None) or []
        cls = (
            AutoModelForCausalLM
            if any("CausalLM" in a or "LMHead" in a for a in archs)
            else AutoModel
        )
        return cls.from_pretrained(ref).eval()
    if ":" not in ref:
        raise ValueError(
            f"--model {ref!r} is neither a directory nor 'module:factory'; give a Hugging Face "
            "model directory or a Python path like mypkg.models:build"
        )
    module_ref, attr = ref.rsplit(":", 1)
    if module_ref.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(module_ref).stem, module_ref)
        if spec is None or spec.loader is None:
            raise FileNotFoundError(f"cannot load {module_ref}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_ref)
    obj = getattr(module, attr)
    model = obj() if callable(obj) and not isinstance(obj, torch.nn.Module) else obj
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{ref} gave a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def example_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 16) -> Any:
    """Token inputs for Hugging Face models (input_ids + attention_mask); models from a Python
    path may define `example_inputs()` next to their factory instead."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "vocab_size"):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    maker = getattr(model, "example_inputs", None)
    if callable(maker):
        return maker()
    raise ValueError(
        f"cannot guess example inputs for {type(model).__name__}; give it an "
        "example_inputs() method returning a tuple or dict of tensors"
    )

"""transformers' Trainer for adapted models, with checkpoints that hold the adapter only.

`transformers.Trainer(model=adapted, ...)` trains an AdaptedModel as it is: its forward
shows the base model's signature (so Trainer keeps the dataset's columns and finds
`labels`), the loss is the model's own, computed in the traced graph when the example inputs
had `labels`, and the activation checkpointing flags are honoured. What plain Trainer cannot
know is that the model is an adapter: it writes each checkpoint as the whole state dict
(`model.safetensors`, base weights included). `peftc.hf.Trainer` writes the adapter instead,
in the form Trainer gives PEFT models (`adapter_model.safetensors` and
`adapter_config.json`, which `PeftModel.from_pretrained(base, "out/checkpoint-N")` loads
for methods PEFT has), and resumes from it.

    from peftc.hf import Trainer
    trainer = Trainer(model=adapted, args=TrainingArguments(...), train_dataset=...)
    trainer.train()                                   # out/checkpoint-N/adapter_model.safetensors
    trainer.train(resume_from_checkpoint=True)        # the adapter, optimizer and schedule back
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers
from transformers.trainer import TRAINING_ARGS_NAME

from peftc.adapted import AdaptedModel
from peftc.peft_format import CONFIG, WEIGHTS


def _adapted(model: object) -> AdaptedModel:
    """The AdaptedModel inside what Trainer holds (accelerate may wrap it)."""
    while not isinstance(model, AdaptedModel) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, AdaptedModel):
        raise TypeError(
            f"peftc.hf.Trainer trains a peftc AdaptedModel, got {type(model).__name__}; "
            "use transformers.Trainer for other models"
        )
    return model


class Trainer(transformers.Trainer):
    """transformers.Trainer whose checkpoints are the adapter in PEFT's layout."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        _adapted(self.model).save_adapter(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))  # as Trainer does

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: object = None) -> None:
        directory = Path(resume_from_checkpoint)
        if not (directory / WEIGHTS).exists() or not (directory / CONFIG).exists():
            raise ValueError(
                f"{directory} holds no adapter ({WEIGHTS} and {CONFIG}); peftc.hf.Trainer "
                "resumes from the checkpoints it wrote"
            )
        _adapted(self.model if model is None else model).load_adapter(str(directory))

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)

"""Hugging Face PEFT's adapter format, both ways.

A PEFT adapter directory holds `adapter_model.safetensors` (keys like
`base_model.model.<module path>.lora_A.weight`) and `adapter_config.json`. Each method maps
its tensors to key suffixes (`peft_keys`) and its hyperparameters to and from the config
(`peft_config`, `hyperparams_from_peft`, `overrides_from_peft`, `claims_peft`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from passes.adapters.insert import param_target
from passes.adapters.registry import methods
from rewrite.files import staged, write_atomic
from rewrite.sites import SiteIndex

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
KEY_PREFIX = "base_model.model."


def _absolute(site, suffix: str) -> str:
    # A key that starts with "base_model." is absolute: shared tensors (VeRA's "base_model.vera_A")
    # live outside any module path.
    return suffix if suffix.startswith("base_model.") else f"{KEY_PREFIX}{site.path}.{suffix}"


def peft_key(method, site, name: str) -> str:
    return _absolute(site, method.peft_keys(site)[name])


def peft_aliases(method, site) -> dict[str, list[str]]:
    """Extra keys under which PEFT checkpoints repeat a tensor (optional hook `peft_aliases`:
    RandLoRA saves its shared bases once per layer too). Written on save, accepted on load."""
    hook = getattr(method, "peft_aliases", None)
    if hook is None:
        return {}
    return {name: [_absolute(site, k) for k in keys] for name, keys in hook(site).items()}


def save_adapter(adapted, directory: str | os.PathLike) -> None:
    plan = adapted.plan
    names = plan.methods()
    if len(names) != 1:
        raise ValueError(
            f"this plan mixes methods {sorted(names)}; a PEFT adapter_config.json holds one "
            "method, so save one adapter per method"
        )
    method_cls = type(plan.assignments[0].method)
    state = adapted.state()
    tensors: dict[str, torch.Tensor] = {}
    for a in plan:
        convert = getattr(a.method, "peft_tensors", None)
        if convert is not None:
            # The method ships a converted form (PiSSA/CorDA: a plain LoRA on the original base).
            p = {
                n: state[param_target(a.method, a.site, n)].detach()
                for n in a.method.params(a.site)
            }
            for suffix, value in convert(a.site, p).items():
                tensors[f"{KEY_PREFIX}{a.site.path}.{suffix}"] = value.contiguous().cpu()
            continue
        for name, spec in a.method.params(a.site).items():
            if spec.trainable or getattr(a.method, "save_frozen", False):
                key = peft_key(a.method, a.site, name)
                tensors[key] = (
                    state[param_target(a.method, a.site, name)].detach().contiguous().cpu()
                )
                for alias in peft_aliases(a.method, a.site).get(name, ()):
                    tensors[alias] = tensors[key].clone()  # safetensors refuses shared memory
    config = method_cls.peft_config(plan.assignments)
    config.setdefault("task_type", None)
    config.setdefault("base_model_name_or_path", None)
    config.setdefault("inference_mode", True)
    config.setdefault("revision", None)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with staged(out / WEIGHTS) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    write_atomic(out / CONFIG, json.dumps(config, indent=2, sort_keys=True))


def read_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: is {directory} a PEFT or peftc adapter directory?"
        )
    return json.loads(path.read_text())


def load_adapter(adapted, directory: str | os.PathLike) -> None:
    path = Path(directory) / WEIGHTS
    if not path.exists():
        hint = (
            " (found adapter_model.bin: re-save it with safe_serialization=True)"
            if (Path(directory) / "adapter_model.bin").exists()
            else ""
        )
        raise FileNotFoundError(f"{path} not found{hint}")
    loaded = load_file(str(path))
    state = adapted.state()
    expected = {}
    for a in adapted.plan:
        for name, spec in a.method.params(a.site).items():
            if spec.trainable or getattr(a.method, "save_frozen", False):
                expected[peft_key(a.method, a.site, name)] = param_target(a.method, a.site, name)
    # PEFT may keep the adapter name in keys (".lora_A.default.weight"); drop it.
    loaded = {re.sub(r"\.default(?=\.|$)", "", k): v for k, v in loaded.items()}
    # Copies of a tensor that is loaded under its own key (see peft_aliases) are not read.
    aliases = {
        k for a in adapted.plan for keys in peft_aliases(a.method, a.site).values() for k in keys
    }
    loaded = {k: v for k, v in loaded.items() if k not in aliases or k in expected}
    # PEFT saves adapted embeddings' base weights too (save_embedding_layers), e.g. after a
    # vocabulary resize; like PEFT, load them into the base weight.
    for a in adapted.plan:
        key = f"{KEY_PREFIX}{a.site.path}.base_layer.weight"
        if key in loaded:
            expected[key] = a.site.weight
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter in {directory} does not fit this model's plan: "
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}. "
            "Compile with the spec the adapter was trained with (or use peftc.from_peft)."
        )
    values = {key: (target, loaded[key]) for key, target in expected.items()}
    for a in adapted.plan:
        convert = getattr(a.method, "params_from_peft", None)
        if convert is None:
            continue
        # The method reads its own tensors (PiSSA/CorDA: raw or converted form); it gets them
        # by key suffix and returns values by parameter name.
        found = {}
        for name, suffix in a.method.peft_keys(a.site).items():
            key = peft_key(a.method, a.site, name)
            if key in values:
                found[suffix] = values.pop(key)[1]
        for name, value in convert(a.site, found).items():
            target = param_target(a.method, a.site, name)
            values[f"{a.site.path}:{name}"] = (target, value)
    with torch.no_grad():
        for key, (target, value) in values.items():
            param = state[target]
            if tuple(param.shape) != tuple(value.shape):
                raise ValueError(
                    f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(param.shape)}"
                )
            param.copy_(value.to(param.dtype))


def method_for_config(config: dict) -> type:
    peft_type = config.get("peft_type")
    for cls in methods().values():
        claims = getattr(cls, "claims_peft", None)
        if claims is not None and claims(config):
            return cls
    supported = sorted({getattr(c, "peft_type", None) for c in methods().values()} - {None})
    raise ValueError(
        f"PEFT adapter type {peft_type!r} (with these options) is not supported; "
        f"supported peft_type values: {', '.join(supported)}"
    )


def peft_targets(config: dict, sites: SiteIndex) -> list[str]:
    """The module paths PEFT would adapt for `config`, following PEFT's matching rules."""
    targets = config.get("target_modules")
    exclude = config.get("exclude_modules")
    layers = config.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]

    def hit(path: str, rule: Any) -> bool:
        if rule is None:
            return False
        if isinstance(rule, str):
            return re.fullmatch(rule, path) is not None
        return any(path == t or path.endswith("." + t) for t in rule)

    chosen = []
    for site in sites:
        if targets == "all-linear":
            ok = site.op in ("linear", "addmm") and not site.path.endswith("lm_head")
        else:
            ok = hit(site.path, targets)
        if ok and not hit(site.path, exclude) and (layers is None or site.layer in layers):
            chosen.append(site.path)
    if not chosen:
        raise ValueError(
            f"PEFT target_modules {targets!r} match no adaptable module; module types here: "
            f"{', '.join(sites.module_types())}"
        )
    return chosen


def spec_from_peft(config: dict, sites: SiteIndex) -> dict:
    """Translate a PEFT adapter_config.json into an equivalent peftc spec dict."""
    cls = method_for_config(config)
    paths = peft_targets(config, sites)
    rule = {"method": cls.name, "targets": paths, **cls.hyperparams_from_peft(config)}
    overrides = {p: o for p in paths if (o := cls.overrides_from_peft(config, p))}
    if overrides:
        rule["overrides"] = overrides
    return {"adapters": [rule]}

"""Hugging Face PEFT's adapter format, both ways.

A PEFT adapter directory holds `adapter_model.safetensors` (keys like
`base_model.model.<module path>.lora_A.weight`) and `adapter_config.json`. Each method
declares its format as one `PeftFormat` record (passes/adapters/peft_record.py): which
configs it claims, its config fields and patterns, its key names. This module reads and
writes every method through those records. Methods PEFT does not have are written in peftc's
own format (`own_format`): the same two files, with a `PEFTC_<NAME>` peft_type that PEFT
cannot read and peftc reads back. So are adapters on slices of packed projections
(`qkv_proj[0:64]`), which PEFT cannot adapt (peft#1705): the method's PEFT layout with its
module paths as peftc writes them and `PEFTC_` before its peft_type (`PEFTC_LORA`).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from passes.adapters.contract import spec_names
from passes.adapters.peft_record import OWN_PREFIX, get_nested, record_of, set_nested
from passes.adapters.registry import methods
from rewrite.files import staged, write_atomic
from rewrite.names import param_target
from rewrite.sites import SiteIndex, is_linear_layer

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
KEY_PREFIX = "base_model.model."


def _absolute(site, suffix: str) -> str:
    # A key that starts with "base_model." is absolute: shared tensors (VeRA's "base_model.vera_A")
    # live outside any module path.
    return suffix if suffix.startswith("base_model.") else f"{KEY_PREFIX}{site.path}.{suffix}"


def key_suffixes(method, site) -> dict[str, str]:
    """Adapter tensor name -> checkpoint key suffix at `site`."""
    record = record_of(type(method))
    if record.keys_are_names:
        return {name: name for name in method.params(site)}
    keys = record.keys_by_op.get(site.op, record.keys)
    return {name: keys[name] for name in method.params(site) if name in keys}


def peft_key(method, site, name: str) -> str:
    return _absolute(site, key_suffixes(method, site)[name])


def peft_aliases(method, site) -> dict[str, list[str]]:
    """Extra keys under which PEFT checkpoints repeat a tensor (RandLoRA saves its shared
    bases once per layer too). Written on save, accepted on load."""
    aliases = record_of(type(method)).aliases
    return {name: [_absolute(site, k) for k in keys] for name, keys in aliases.items()}


def claims(cls: type, config: dict) -> bool:
    """Whether `cls` reads adapter config `config` (PEFT's, or peftc's own)."""
    return record_of(cls).claims_config(config)


def hyperparams_from_peft(cls: type, config: dict) -> dict:
    """The method's hyperparameters that a PEFT config gives every module."""
    record = record_of(cls)
    out = {}
    for name, f in record.fields.items():
        if f.from_config is not None:
            out[name] = f.from_config(config)
            continue
        value = get_nested(config, f.key)
        out[name] = f.read(f.default if value is None else value)
    return out


def overrides_from_peft(cls: type, config: dict, path: str) -> dict:
    """The hyperparameters that the config's per-module patterns give the module at `path`."""
    record = record_of(cls)
    out = {}
    for name, f in record.fields.items():
        if f.pattern is not None:
            value = record.pattern_value(config.get(f.pattern) or {}, path)
            if value is not None:
                out[name] = f.read(value)
    return out


def peft_config(assignments: list) -> dict:
    """The adapter_config.json of one method's assignments."""
    record = record_of(type(assignments[0].method))
    if record.saved_as is not None:
        assignments = [replace(a, method=record.saved_as(a.method)) for a in assignments]
        record = record_of(type(assignments[0].method))
    config: dict[str, Any] = {"peft_type": record.peft_type}
    for name, f in record.fields.items():
        values = [getattr(a.method, name) for a in assignments]
        common = Counter(values).most_common(1)[0][0]
        if f.pattern is not None:
            # Full module paths as keys: every PEFT lookup matches a path exactly.
            config[f.pattern] = {
                a.site.path: f.write(v) for a, v in zip(assignments, values) if v != common
            }
        elif len(set(values)) > 1 and not f.init_only:
            raise ValueError(
                f"PEFT's {record.config} holds one {f.key} for all modules; this plan mixes "
                f"{sorted(set(map(repr, values)))}, so it cannot be saved in PEFT format"
            )
        value = f.from_method(assignments[0].method) if f.from_method else f.write(common)
        set_nested(config, f.key, value)
    for key, value in record.constants.items():
        set_nested(config, key, value)
    config["target_modules"] = sorted(a.site.path for a in assignments if a.site.experts is None)
    experts = [a.site.path for a in assignments if a.site.experts is not None]
    if experts:  # 3-D expert weights: PEFT's target_parameters
        config["target_parameters"] = experts
    if record.is_peft and any(a.site.rows is not None for a in assignments):
        config["peft_type"] = OWN_PREFIX + record.peft_type  # slices: PEFT cannot read it
    if record.fan_in_fan_out:
        config["fan_in_fan_out"] = all(a.site.op == "addmm" for a in assignments)
    config.setdefault("bias", "none")
    return config


def _expert_prefixes(model: torch.nn.Module, assignments: list) -> dict[str, str]:
    """expert site path -> its checkpoint key prefix. PEFT wraps each targeted 3-D parameter
    of a module in a ParamWrapper around the module, in the module's parameter order, each
    around the one before: the last is outermost (`experts.lora_A`), the first deepest
    (`experts.base_layer.lora_A`, one `base_layer.` per wrapper around it)."""
    order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    by_module: dict[str, list[str]] = {}
    for a in assignments:
        if a.site.experts is not None:
            by_module.setdefault(a.site.path.rpartition(".")[0], []).append(a.site.path)
    prefixes = {}
    for module, paths in by_module.items():
        paths.sort(key=lambda p: order.get(p, len(order)))
        for i, path in enumerate(paths):
            depth = len(paths) - 1 - i
            prefixes[path] = f"{KEY_PREFIX}{module}.{'base_layer.' * depth}"
    return prefixes


def _to_param_wrapper(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA on an expert site (only `lora` takes them) in PEFT's ParamWrapper layout: lora_A a
    Linear(in, r·E) whose row e·r + j is A_e's row j, lora_B a Linear(r·E, out) whose column
    j·E + e is B_e's column j."""
    A, B = p["lora_A"], p["lora_B"]  # [E, r, in], [E, out, r]
    experts, rank = A.shape[0], A.shape[1]
    return {
        "lora_A.weight": A.reshape(experts * rank, -1),
        "lora_B.weight": B.permute(1, 2, 0).reshape(B.shape[1], rank * experts),
    }


def _from_param_wrapper(site, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`_to_param_wrapper`'s inverse: per-expert A [E, r, in] and B [E, out, r]."""
    experts = site.experts
    rank = A.shape[0] // experts
    return A.reshape(experts, rank, -1), B.reshape(B.shape[0], rank, experts).permute(2, 0, 1)


FORMATS = ("auto", "peft")


def save_adapter(adapted, directory: str | os.PathLike, format: str = "auto") -> None:
    """Write the adapter: in PEFT's format where PEFT has the method, else in peftc's own
    (`format="peft"` refuses the latter instead)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    plan = adapted.plan
    names = plan.methods()
    if len(names) != 1:
        raise ValueError(
            f"this plan mixes methods {sorted(names)}; a PEFT adapter_config.json holds one "
            "method, so save one adapter per method"
        )
    record = record_of(type(plan.assignments[0].method))
    if format == "peft" and not record.is_peft:
        raise ValueError(
            f"{plan.assignments[0].method.name} is not a Hugging Face PEFT method, so it has no "
            f"PEFT format; save with format='auto' to write peftc's own (peft_type "
            f"{record.peft_type!r}, PEFT's file layout), which peftc's load_adapter and "
            "from_peft read and PEFT cannot"
        )
    sliced = [a.path for a in plan if a.site.rows is not None]
    if format == "peft" and sliced:
        raise ValueError(
            f"{sliced[0]} is a slice of a packed projection; PEFT adapts whole modules only "
            "(peft#1705), so it has no format for this adapter. Save with format='auto' to "
            f"write peftc's own (peft_type {OWN_PREFIX + record.peft_type!r}, PEFT's file "
            "layout), which peftc's load_adapter and from_peft read and PEFT cannot"
        )
    modules = dict(adapted.model.named_modules())
    bare = [
        a.path
        for a in plan
        if a.site.experts is None and not hasattr(modules.get(a.site.owner), "weight")
    ]
    if bare and record.is_peft:
        warnings.warn(
            f"{', '.join(bare[:3])}{' ...' if len(bare) > 3 else ''}: adapted parameter "
            "products (x @ W) with no module of their own; PEFT cannot load this adapter "
            "(it has no module to put it on), peftc's load_adapter and from_peft can",
            stacklevel=3,
        )
    state = adapted.state()
    tensors: dict[str, torch.Tensor] = {}
    expert_keys = _expert_prefixes(adapted.model, plan.assignments)
    for a in plan:
        p = {n: state[param_target(a.method, a.site, n)].detach() for n in a.method.params(a.site)}
        if a.site.experts is not None:
            for suffix, value in _to_param_wrapper(p).items():
                tensors[expert_keys[a.path] + suffix] = value.contiguous().cpu()
            continue
        converted = a.method.peft_tensors(a.site, p)
        if converted is not None:
            # The method ships a converted form (PiSSA/CorDA: a plain LoRA on the original base).
            for suffix, value in converted.items():
                tensors[f"{KEY_PREFIX}{a.site.path}.{suffix}"] = value.contiguous().cpu()
            continue
        for name, spec in a.method.params(a.site).items():
            if spec.trainable or a.method.save_frozen:
                key = peft_key(a.method, a.site, name)
                tensors[key] = (
                    state[param_target(a.method, a.site, name)].detach().contiguous().cpu()
                )
                for alias in peft_aliases(a.method, a.site).get(name, ()):
                    tensors[alias] = tensors[key].clone()  # safetensors refuses shared memory
    config = peft_config(plan.assignments)
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
    config = json.loads(path.read_text())
    peft_type = str(config.get("peft_type", ""))
    peft_types = {record_of(c).peft_type for c in methods().values()}
    if peft_type.startswith(OWN_PREFIX) and peft_type[len(OWN_PREFIX) :] in peft_types:
        # a PEFT method on slices of packed projections, in that method's layout
        config["peft_type"] = peft_type[len(OWN_PREFIX) :]
    return config


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
    expert_keys = _expert_prefixes(adapted.model, adapted.plan.assignments)
    for a in adapted.plan:
        if a.site.experts is not None:  # converted from PEFT's ParamWrapper layout below
            continue
        for name, spec in a.method.params(a.site).items():
            if spec.trainable or a.method.save_frozen:
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
    for a in adapted.plan:
        if a.site.experts is not None:
            for suffix in ("lora_A.weight", "lora_B.weight"):
                expected[expert_keys[a.path] + suffix] = f"{a.path}:{suffix}"
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
        if a.site.experts is not None:
            keys = [expert_keys[a.path] + suffix for suffix in ("lora_A.weight", "lora_B.weight")]
            A, B = _from_param_wrapper(a.site, *(values.pop(k)[1] for k in keys))
            for name, value in (("lora_A", A), ("lora_B", B)):
                values[f"{a.path}:{name}"] = (param_target(a.method, a.site, name), value)
            continue
        # A method may read its own tensors (PiSSA/CorDA: raw or converted form); it gets
        # them by key suffix and returns values by parameter name.
        keys = {
            suffix: key
            for name, suffix in key_suffixes(a.method, a.site).items()
            if (key := peft_key(a.method, a.site, name)) in values
        }
        converted = a.method.params_from_peft(a.site, {s: values[k][1] for s, k in keys.items()})
        if converted is None:
            continue
        for key in keys.values():
            del values[key]
        for name, value in converted.items():
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
        if claims(cls, config):
            return cls
    supported = sorted({record_of(c).peft_type for c in methods().values()})
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
    for name in config.get("target_parameters") or ():
        chosen += [p for p in sites.experts if p == name or p.endswith("." + name)]
    for site in [*sites, *sites.parts.values()]:
        if site.rows is not None and not (isinstance(targets, list) and site.path in targets):
            continue  # a slice is only ever named exactly (peftc's own format)
        if targets == "all-linear":
            ok = is_linear_layer(site)
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
    key = {field: name for name, field in spec_names(cls).items()}  # field -> spec key

    def keyed(values: dict) -> dict:
        return {key[k]: v for k, v in values.items()}

    rule = {"method": cls.name, "targets": paths, **keyed(hyperparams_from_peft(cls, config))}
    overrides = {p: keyed(o) for p in paths if (o := overrides_from_peft(cls, config, p))}
    if overrides:
        rule["overrides"] = overrides
    return {"adapters": [rule]}

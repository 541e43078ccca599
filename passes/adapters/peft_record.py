"""A method's Hugging Face PEFT format as data: which configs it claims, how its
hyperparameters map to config fields (and per-module patterns), and its checkpoint key names.

One record per method, read both ways by `peftc.peft_format`, so no method writes
translation code. Example (LoRA):

    PeftFormat(
        peft_type="LORA", config="LoraConfig",
        when={"use_dora": (False,), "init_lora_weights": (True, False, "gaussian")},
        fields={"rank": PeftField("r", 8, pattern="rank_pattern"), ...},
        keys={"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"},
    )
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class PeftField:
    """One hyperparameter's config field.

    `key` may reach into a nested config ("eva_config.tau"). `default` is PEFT's default,
    used when the config lacks the field. `pattern` names the config's per-module dict
    (LoRA's "rank_pattern"); a field without one must be the same on every module of a plan
    to be saved, unless `init_only` (it only shaped the init: the most common value is written).
    Where a field's value depends on other fields (MiSS: mini_r counts only in the "mini"
    form), `from_config` reads it from the whole config and `from_method` writes it from the
    whole method, instead of `read` and `write`.
    """

    key: str
    default: Any
    pattern: str | None = None
    read: Callable[[Any], Any] = _same  # config value -> hyperparameter
    write: Callable[[Any], Any] = _same  # hyperparameter -> config value
    init_only: bool = False
    from_config: Callable[[Mapping], Any] | None = None
    from_method: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class PeftFormat:
    """How a method is stored by PEFT.

    `when` is the claims condition beyond `peft_type`: config key -> the accepted values (a
    tuple whose first entry stands for an absent key) or a predicate of the value (None when
    absent). `keys` maps adapter tensors to checkpoint key suffixes after the module path;
    a suffix starting with "base_model." is absolute (tensors shared by all sites), and
    `keys_by_op` replaces them for one op kind (LoRA's embeddings). `aliases` are further
    suffixes under which PEFT repeats a tensor (written on save, accepted on load).
    `constants` are written as they are (dotted keys nest). `saved_as` maps a method to the
    one whose record and hyperparameters are written (PiSSA: its converted plain LoRA).
    """

    peft_type: str
    config: str  # PEFT's config class, named in messages
    fields: Mapping[str, PeftField]
    keys: Mapping[str, str]
    when: Mapping[str, tuple | Callable[[Any], bool]] = field(default_factory=dict)
    keys_by_op: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    constants: Mapping[str, Any] = field(default_factory=dict)
    fan_in_fan_out: bool = False  # written as true when every site stores W as [in, out]
    claims: bool = True  # False: saved in another method's format, which loads it back
    pattern_lookup: Literal["suffix", "suffix_or_path"] = "suffix"
    saved_as: Callable[[Any], Any] | None = None
    keys_are_names: bool = False  # peftc's own format: each tensor is saved under its own name

    @property
    def is_peft(self) -> bool:
        """Whether Hugging Face PEFT reads this format (False: peftc's own)."""
        return not self.peft_type.startswith(OWN_PREFIX)

    def claims_config(self, config: Mapping) -> bool:
        if not self.claims or config.get("peft_type") != self.peft_type:
            return False
        for key, accepted in self.when.items():
            value = get_nested(config, key)
            if callable(accepted):
                if not accepted(value):
                    return False
            else:
                value = accepted[0] if value is None else value
                if not any(value == a and type(value) is type(a) for a in accepted):
                    return False
        return True

    def pattern_value(self, patterns: Mapping, path: str) -> Any:
        """The value a per-module pattern dict gives the module at `path`, or None, with
        PEFT's own lookup for this method."""
        if self.pattern_lookup == "suffix":  # LoRA's get_pattern_key
            for key, value in patterns.items():
                if re.match(rf"(.*\.)?({key})$", path):
                    return value
            return None
        # FourierFT's and C3A's: the first key that matches a dotted suffix, else the path.
        key = next((k for k in patterns if re.match(rf".*\.{k}$", path)), path)
        return patterns.get(key)


OWN_PREFIX = "PEFTC_"
# Hyperparameters that may differ per module, as LoRA's rank_pattern and alpha_pattern.
PER_MODULE = ("rank", "alpha")


@functools.cache
def own_format(cls: type) -> PeftFormat:
    """peftc's own checkpoint format for a method PEFT does not have: PEFT's layout
    (adapter_model.safetensors keys `base_model.model.<path>.<tensor name>`, and an
    adapter_config.json with target_modules), a peft_type of `PEFTC_<NAME>` that PEFT does not
    know, and every hyperparameter under its own name (rank and alpha per module through
    `rank_pattern` / `alpha_pattern`)."""
    fields = {
        f.name: PeftField(
            key := f.metadata.get("spec_name") or f.name,
            f.default,
            pattern=f"{key}_pattern" if key in PER_MODULE else None,
        )
        for f in dataclasses.fields(cls)
        if "rule" in f.metadata
    }
    return PeftFormat(
        peft_type=OWN_PREFIX + cls.name.upper(),
        config="peftc's own adapter_config.json",
        fields=fields,
        keys={},
        keys_are_names=True,
    )


def record_of(cls: type) -> PeftFormat:
    """The format a method's checkpoints are written in: PEFT's where PEFT has the method,
    else peftc's own."""
    return cls.peft if cls.peft is not None else own_format(cls)


def get_nested(config: Mapping, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(config, Mapping):
            return None
        config = config.get(part)
    return config


def set_nested(config: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[last] = value

"""The adaptation spec: which sites get which adapter method, read from YAML, JSON or a dict.

    adapters:
      - method: lora
        targets: ["*.q_proj", "*.v_proj"]   # globs over module paths, or "all-linear"
        types: [mlp.down_proj]             # module types, matched by suffix
        layers: "0-5"                      # layer indices: "0-5", "0,2,4", 3 or [0, 1]
        exclude: ["*.layers.0.*"]
        rank: 8                            # ...and the method's own hyperparameters
        overrides: {"*.layers.0.*": {rank: 16}}
    seed: 0

Rules apply in order and the first rule that matches a site wins. A target without glob
characters matches a module path exactly or as a dotted suffix (`q_proj`), as PEFT does;
`all-linear` (alone or in the list) is every linear-like site but the output head, as in PEFT.
A target ending in `[start:end]` (or a part's name: `[q]`, `[gate]`) selects that slice of a
packed projection's output features (`*.qkv_proj[0:64]`, see `rewrite.sites.find_parts`);
only such a target selects a slice, and a rule may not adapt both a module and its slices.
Method names and hyperparameters are checked against the registry the caller passes in,
so this module stays independent of the adapter library. The `quantize:` section (a frozen
base in NF4 or int8) is typed by `rewrite.quantize_config`. The `placement:` section is typed
the same way: the caller passes the parser (the cost model's `parse_placement`), so the
section is parsed once, when the spec is, and the spec carries the typed object.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rewrite.quantize_config import QuantizeSpecError, parse_quantize
from rewrite.sites import Site, SiteIndex, is_linear_layer, type_matches

TOP_KEYS = ("adapters", "placement", "quantize", "seed")
SELECTOR_KEYS = ("targets", "types", "layers", "exclude", "overrides")
ALL_LINEAR = "all-linear"  # a `targets` entry: PEFT's convention
# a target naming a slice of a packed projection: <path glob>[start:end] or <path glob>[name]
SLICE = re.compile(r"^(?P<path>.+)\[(?:(?P<start>\d+):(?P<end>\d+)|(?P<name>[a-z_]+))\]$")


class SpecError(ValueError):
    """The spec is invalid; the message names the problem and the fix."""


@dataclass(frozen=True)
class AdapterRule:
    index: int
    method: str
    hyperparams: dict
    targets: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    layers: frozenset[int] | None = None
    exclude: tuple[str, ...] = ()
    overrides: tuple[tuple[str, dict], ...] = ()

    def describe(self) -> str:
        what = []
        if self.targets:
            what.append(f"targets {list(self.targets)}")
        if self.types:
            what.append(f"types {list(self.types)}")
        if self.layers is not None:
            what.append(f"layers {sorted(self.layers)}")
        return f"rule {self.index} ({self.method}: {', '.join(what) or 'no selector'})"

    def selects(self, site: Site) -> bool:
        if site.rows is not None and not self.targets:
            return False  # a slice is selected by a target that names it, nothing else
        if self.targets and not any(target_matches(site, t) for t in self.targets):
            return False
        if self.types and not any(type_matches(site.module_type, t) for t in self.types):
            return False
        if self.layers is not None and site.layer not in self.layers:
            return False
        return not any(path_matches(site.path, e) for e in self.exclude)

    def hyperparams_for(self, path: str) -> dict:
        params = dict(self.hyperparams)
        for pattern, values in self.overrides:
            if path_matches(path, pattern):
                params.update(values)
        return params


@dataclass(frozen=True)
class AdaptationSpec:
    adapters: tuple[AdapterRule, ...]
    # the placement section: the typed object load_spec's `parse_placement` made of it,
    # or the mapping as written when the spec was loaded without one; None when absent
    placement: Any = None
    seed: int = 0
    source: dict | None = dataclasses.field(default=None, compare=False)
    # the quantize section (rewrite.quantize_config.QuantizeConfig), None: a full-precision base
    quantize: Any = None


@dataclass(frozen=True)
class Assignment:
    """A site, the method instance chosen for it, and the rule that chose it."""

    site: Site
    method: Any
    rule: int

    @property
    def path(self) -> str:
        return self.site.path

    @property
    def rank(self) -> int | None:
        return getattr(self.method, "rank", None)


def target_matches(site: Site, target: str) -> bool:
    """A `targets` entry: `all-linear` (every linear-like site but the output head, as in
    PEFT), else a glob or dotted suffix of the module path; a slice target (`SLICE`) matches
    only the part it names, and a part only a slice target."""
    sliced = SLICE.match(target)
    if site.rows is not None:
        if sliced is None:
            return False
        if sliced["name"]:
            named = site.part == sliced["name"]
        else:
            named = site.rows == (int(sliced["start"]), int(sliced["end"]))
        return named and path_matches(site.parent, sliced["path"])
    if sliced is not None:
        return False
    if target == ALL_LINEAR:
        return is_linear_layer(site)  # never an expert weight, as in PEFT
    return path_matches(site.path, target)


def path_matches(path: str, pattern: str) -> bool:
    """A glob over the path, or the path itself or a dotted suffix of it. The path itself
    first: a slice's path (`qkv_proj[0:64]`) would read as a glob character class."""
    if path == pattern:
        return True
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(path, pattern)
    return path == pattern or path.endswith("." + pattern)


def _did_you_mean(key: str, allowed) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; allowed keys: {', '.join(allowed)}"


def _read(source: Any) -> dict:
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, Path) or (
        isinstance(source, str)
        and "\n" not in source
        and Path(source).suffix in (".yaml", ".yml", ".json")
    ):
        path = Path(source)
        if not path.exists():
            raise SpecError(f"spec file {path} does not exist")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise SpecError(
                f"spec file {path} is not valid {path.suffix[1:].upper()}: {e}"
            ) from None
    elif isinstance(source, str):
        try:
            data = yaml.safe_load(source)
        except yaml.YAMLError as e:
            raise SpecError(f"spec text is not valid YAML/JSON: {e}") from None
    else:
        raise SpecError(
            f"a spec is a dict, a YAML/JSON string or a path to a .yaml/.json file, "
            f"got {type(source).__name__}"
        )
    if not isinstance(data, Mapping):
        raise SpecError(f"a spec is a mapping with an 'adapters' list, got {type(data).__name__}")
    return dict(data)


def _strings(value: Any, key: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise SpecError(f"{where}: {key} must be a string or a list of strings, got {value!r}")


def parse_layers(value: Any, where: str = "spec") -> frozenset[int]:
    """'0-5', '0,2,4', 3 or [0, 1] -> a set of layer indices."""
    if isinstance(value, bool):
        raise SpecError(f"{where}: layers must be like '0-5', '0,2,4', 3 or [0, 1], got {value!r}")
    if isinstance(value, int):
        return frozenset([value])
    if isinstance(value, list | tuple) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return frozenset(value)
    if isinstance(value, str):
        out = set()
        for part in value.replace(" ", "").split(","):
            lo, sep, hi = part.partition("-")
            if not lo.isdigit() or (sep and not hi.isdigit()):
                raise SpecError(
                    f"{where}: layers {value!r} is not a range list; write it like '0-5' or '0,2,4'"
                )
            if sep and int(hi) < int(lo):
                raise SpecError(f"{where}: layers range {part!r} is empty (end before start)")
            out.update(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        return frozenset(out)
    raise SpecError(f"{where}: layers must be like '0-5', '0,2,4', 3 or [0, 1], got {value!r}")


def _build_method(method_cls: type, params: dict, where: str):
    try:
        return method_cls(**params)
    except (ValueError, TypeError) as e:
        raise SpecError(f"{where}: {e}") from None


def load_spec(
    source: Any,
    methods: Mapping[str, type],
    parse_placement: Callable[[Any], Any] | None = None,
) -> AdaptationSpec:
    """Read and validate a spec against the registry `methods` (name -> dataclass).

    `parse_placement` validates and types the placement section (it must return its own output
    unchanged, so that an already loaded spec passes through); without it the section stays
    the mapping as written."""
    if isinstance(source, AdaptationSpec):
        if parse_placement is None or source.placement is None:
            return source
        return dataclasses.replace(source, placement=parse_placement(source.placement))
    data = _read(source)
    for key in data:
        if key not in TOP_KEYS:
            raise SpecError(f"unknown spec key {key!r}{_did_you_mean(key, TOP_KEYS)}")
    raw_rules = data.get("adapters")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise SpecError(
            "the spec needs a non-empty 'adapters' list, e.g. "
            "adapters: [{method: lora, targets: ['*.q_proj'], rank: 8}]"
        )
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise SpecError(f"seed must be an integer, got {seed!r}")
    placement = data.get("placement")
    if placement is not None and not isinstance(placement, Mapping):
        raise SpecError(f"placement must be a mapping, got {placement!r}")
    rules = tuple(
        _parse_rule(i, raw, methods, placement is not None) for i, raw in enumerate(raw_rules)
    )
    section = dict(placement) if placement else None
    if section is not None and parse_placement is not None:
        section = parse_placement(section)
    try:
        quantize = parse_quantize(data.get("quantize"))
    except QuantizeSpecError as e:
        raise SpecError(str(e)) from None
    return AdaptationSpec(rules, section, seed, data, quantize)


def _parse_rule(index: int, raw: Any, methods: Mapping[str, type], placed: bool) -> AdapterRule:
    where = f"adapters[{index}]"
    if not isinstance(raw, Mapping):
        raise SpecError(f"{where} must be a mapping with a 'method', got {raw!r}")
    name = raw.get("method")
    if name is None:
        raise SpecError(f"{where} has no 'method'; known methods: {', '.join(methods)}")
    if name not in methods:
        close = difflib.get_close_matches(str(name), list(methods), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpecError(
            f"{where}: unknown method {name!r}{hint}; known methods: {', '.join(methods)}"
        )
    method_cls = methods[name]
    # spec key -> field (a field may go by another key: metadata "spec_name", see contract.hp)
    field_of = {
        f.metadata.get("spec_name") or f.name: f.name for f in dataclasses.fields(method_cls)
    }
    fields = list(field_of)
    allowed = ("method", *SELECTOR_KEYS, *fields)
    hyper = {}
    for key, value in raw.items():
        if key not in allowed:
            raise SpecError(f"{where} ({name}): unknown key {key!r}{_did_you_mean(key, allowed)}")
        if key in fields:
            hyper[field_of[key]] = value
    where = f"{where} ({name})"
    _build_method(method_cls, hyper, where)
    targets = _strings(raw["targets"], "targets", where) if "targets" in raw else ()
    types = _strings(raw["types"], "types", where) if "types" in raw else ()
    layers = parse_layers(raw["layers"], where) if "layers" in raw else None
    exclude = _strings(raw["exclude"], "exclude", where) if "exclude" in raw else ()
    if not targets and not types and not placed:
        raise SpecError(
            f"{where} selects no modules: give 'targets' (globs over module paths) or 'types' "
            "(module types such as self_attn.q_proj), or add a 'placement' section"
        )
    overrides = []
    raw_overrides = raw.get("overrides", {}) or {}
    if not isinstance(raw_overrides, Mapping):
        raise SpecError(f"{where}: overrides must map a path glob to hyperparameters")
    for pattern, values in raw_overrides.items():
        if not isinstance(values, Mapping):
            raise SpecError(f"{where}: overrides[{pattern!r}] must be a mapping of hyperparameters")
        for key in values:
            if key not in fields:
                raise SpecError(
                    f"{where}: overrides[{pattern!r}] has unknown key {key!r}{_did_you_mean(key, fields)}"
                )
        values = {field_of[k]: v for k, v in values.items()}
        _build_method(method_cls, {**hyper, **values}, f"{where} overrides[{pattern!r}]")
        overrides.append((str(pattern), values))
    return AdapterRule(index, name, hyper, targets, types, layers, exclude, tuple(overrides))


def resolve(
    spec: AdaptationSpec,
    sites: SiteIndex,
    methods: Mapping[str, type],
    candidates: set[str] | None = None,
) -> list[Assignment]:
    """Assign each site to the first rule that selects it; validate the method at the site.

    `candidates` (from a placement) limits the sites that rules without a selector take.
    """
    taken: dict[str, Assignment] = {}
    every = sites.everything()
    for rule in spec.adapters:
        has_selector = bool(rule.targets or rule.types or rule.layers is not None)
        chosen = [
            s
            for s in every
            if (rule.selects(s) if has_selector else s.rows is None and s.experts is None)
            and (candidates is None or s.path in candidates)
            and not any(path_matches(s.path, e) for e in rule.exclude)
        ]
        if not chosen and has_selector:
            raise SpecError(_no_match(rule, sites))
        for site in chosen:
            if site.path in taken:
                continue
            method = _build_method(
                methods[rule.method],
                rule.hyperparams_for(site.path),
                f"adapters[{rule.index}] ({rule.method})",
            )
            reason = method.check(site)
            if reason is not None:
                raise SpecError(f"adapters[{rule.index}] ({rule.method}) at {site.path}: {reason}")
            taken[site.path] = Assignment(site, method, rule.index)
    for a in taken.values():
        if a.site.parent in taken:
            raise SpecError(
                f"{a.site.parent} is adapted whole and its slice {a.site.path} too; adapt "
                "either the module or its slices (exclude one of them from the targets)"
            )
    return [taken[s.path] for s in every if s.path in taken]


def _no_match(rule: AdapterRule, sites: SiteIndex) -> str:
    """The error for a rule that selects nothing: what this model's paths, types and (for a
    slice target) slices look like."""
    if any(SLICE.match(t) for t in rule.targets):
        parts = [
            f"{p.path}{f' ({p.part})' if p.part else ''}" for p in list(sites.parts.values())[:6]
        ]
        found = ", ".join(parts) if parts else "none: no linear output here is sliced"
        return (
            f"{rule.describe()} matches no slice. Slices of packed projections in this model: "
            f"{found}; a slice target is a module path glob then [start:end] over output "
            "features or a slice's name, e.g. '*.qkv_proj[0:64]' or '*.qkv_proj[q]'"
        )
    types = sites.module_types()
    example = next(iter(sites)).path if len(sites) else "(none)"
    return (
        f"{rule.describe()} matches no module. Module types in this model: "
        f"{', '.join(types)} (paths look like {example!r}); targets are globs over "
        "module paths such as '*.q_proj' (or 'all-linear'), types are suffixes such "
        "as 'self_attn.q_proj'"
    )

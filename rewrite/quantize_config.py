"""The spec's `quantize:` section: which base weights are stored quantized, and how.

    quantize: nf4                          # or int8; the defaults below
    quantize:
      kind: nf4                            # nf4 (4-bit NormalFloat, bitsandbytes' format) | int8
      blocksize: 64                        # nf4: values per absmax block
      double_quant: false                  # nf4: store the absmax values in 8 bits too
      compute_dtype: float32               # what the weights dequantize to (the model's dtype)
      targets: adapted                     # adapted (the adapted sites) | all-linear

`peftc.compile(..., quantize=...)` and `from_peft(..., quantize=...)` take the same values.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rewrite.codec import NF4_BLOCKSIZES

KINDS = ("nf4", "int8")
KEYS = ("kind", "blocksize", "double_quant", "compute_dtype", "targets")
TARGETS = ("adapted", "all-linear")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class QuantizeSpecError(ValueError):
    """The quantize section is invalid (rewrite.spec raises it as a SpecError)."""


@dataclass(frozen=True)
class QuantizeConfig:
    kind: str
    blocksize: int = 64
    double_quant: bool = False
    compute_dtype: torch.dtype | None = None  # None: each weight's own dtype
    targets: str = "adapted"


def parse_quantize(value: Any) -> QuantizeConfig | None:
    """A `quantize:` value (a kind name, a mapping, a QuantizeConfig or None) -> QuantizeConfig."""
    if value is None or isinstance(value, QuantizeConfig):
        return value
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, Mapping):
        raise QuantizeSpecError(
            f"quantize must be 'nf4', 'int8' or a mapping like {{kind: nf4, blocksize: 64}}, "
            f"got {value!r}"
        )
    for key in value:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(KEYS)}"
            raise QuantizeSpecError(f"quantize: unknown key {key!r}; {hint}")
    kind = value.get("kind")
    if kind not in KINDS:
        raise QuantizeSpecError(
            f"quantize: unknown kind {kind!r}; use one of {', '.join(KINDS)} "
            "(nf4: 4-bit NormalFloat as bitsandbytes stores it, int8: per-channel absmax)"
        )
    blocksize = value.get("blocksize", 64)
    if kind == "nf4" and blocksize not in NF4_BLOCKSIZES:
        raise QuantizeSpecError(
            f"quantize: nf4 blocksize must be one of {list(NF4_BLOCKSIZES)}, got {blocksize!r}"
        )
    if kind == "int8" and ("blocksize" in value or "double_quant" in value):
        raise QuantizeSpecError(
            "quantize: int8 is per output channel; blocksize and double_quant are nf4 options"
        )
    double_quant = value.get("double_quant", False)
    if not isinstance(double_quant, bool):
        raise QuantizeSpecError(
            f"quantize: double_quant must be true or false, got {double_quant!r}"
        )
    dtype_name = value.get("compute_dtype")
    if dtype_name is not None and dtype_name not in DTYPES:
        raise QuantizeSpecError(
            f"quantize: compute_dtype must be one of {', '.join(DTYPES)}, got {dtype_name!r}"
        )
    targets = value.get("targets", "adapted")
    if targets not in TARGETS:
        raise QuantizeSpecError(
            f"quantize: targets must be 'adapted' (the adapted sites' weights) or 'all-linear' "
            f"(every linear layer but the output head), got {targets!r}"
        )
    dtype = None if dtype_name is None else DTYPES[dtype_name]
    return QuantizeConfig(kind, blocksize, double_quant, dtype, targets)

"""Weight codecs for a quantized frozen base: NF4 (bit-exact with bitsandbytes) and int8.

NF4 (Dettmers et al., "QLoRA", 2023), as bitsandbytes stores it: the weight is flattened and
cut into blocks of `blocksize` values; each block keeps its absmax (fp32) and each value the
index of the nearest of the 16 NF4 levels to value/absmax. Two 4-bit indices share a byte, the
first in the high nibble. Double quantization stores the absmax values themselves in 8 bits:
minus their mean (`offset`), in blocks of 256, each index into bitsandbytes' signed dynamic map
(`code2`) with an fp32 absmax per block (`absmax2`).

int8 is per output channel: codes = round(W * 127 / absmax_row), W ≈ codes * absmax_row / 127,
which is the layout of bitsandbytes' Linear8bitLt (CB, SCB).

`QuantizedWeight` is the stored form; `dequantize` rebuilds the weight with plain torch ops.
This module imports neither bitsandbytes nor anything outside torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# bitsandbytes' NF4 levels (backends/utils.py _NF4_QUANT_TABLE), in index order
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
ABSMAX_BLOCKSIZE = 256  # bitsandbytes' block for the double-quantized absmax


@dataclass
class QuantizedWeight:
    """One stored base weight: its kind, logical shape and dtype, and the tensors that hold it.

    nf4: `codes` (uint8, two indices a byte), `code` (the 16 levels) and either `absmax`
    (fp32 per block) or, double-quantized, `absmax` (uint8), `code2`, `absmax2`, `offset`.
    int8: `codes` (int8, the weight's shape) and `absmax` (fp32 per row)."""

    kind: str  # "nf4" or "int8"
    shape: tuple[int, ...]  # of what the codes hold (the weight's transpose when `transposed`)
    dtype: torch.dtype  # what the weight dequantizes to
    blocksize: int = 0  # nf4 only
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # the codes hold the weight's transpose: a weight stored [in, out] (GPT-2's Conv1D, an
    # addmm site) is quantized as [out, in], the layout bitsandbytes quantizes, so its blocks
    # and scales are bitsandbytes' own
    transposed: bool = False

    @property
    def double_quant(self) -> bool:
        return "absmax2" in self.tensors

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def dynamic_map(
    signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8
) -> torch.Tensor:
    """bitsandbytes' `create_dynamic_map` (the 256-value code of its 8-bit blockwise
    quantization), computed the same way so the double-quantized absmax matches bit for bit."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    gap = 256 - len(data)
    data += [0.0] * gap
    return torch.tensor(sorted(data), dtype=torch.float32)


def check_nf4_shape(shape: tuple[int, ...], blocksize: int, where: str) -> str | None:
    """Why a weight of `shape` cannot be stored as NF4 in blocks of `blocksize` (None: it can)."""
    if blocksize not in NF4_BLOCKSIZES:
        return f"{where}: nf4 blocksize {blocksize} is not one of {list(NF4_BLOCKSIZES)}"
    n = math.prod(shape)
    if n % blocksize:
        return (
            f"{where}: the weight {tuple(shape)} has {n} values, not a multiple of the nf4 "
            f"blocksize {blocksize}; choose a blocksize that divides it (e.g. 32) or exclude "
            "the layer from quantize.targets"
        )
    return None


def quantize_nf4(
    W: torch.Tensor,
    blocksize: int = 64,
    double_quant: bool = False,
    dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """`W` as NF4, as bitsandbytes' quantize_4bit (compress_statistics=double_quant) stores it."""
    why = check_nf4_shape(tuple(W.shape), blocksize, "quantize_nf4")
    if why is not None:
        raise ValueError(why)
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=W.device)
    blocks = W.detach().reshape(-1, blocksize).float()
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)
    tensors = {"codes": (q[::2] << 4) | q[1::2], "code": code}
    if double_quant:
        offset = absmax.mean()
        tensors.update(_quantize_absmax(absmax - offset))
        tensors["offset"] = offset.reshape(())
    else:
        tensors["absmax"] = absmax
    return QuantizedWeight("nf4", tuple(W.shape), dtype or W.dtype, blocksize, tensors)


LUT_STEPS = 65535  # bitsandbytes' CPU 8-bit quantizer: [-1, 1] cut into 65536 table slots


def _quantize_absmax(values: torch.Tensor) -> dict[str, torch.Tensor]:
    """bitsandbytes' CPU quantize_blockwise(values, blocksize=256) with the dynamic map, bit
    for bit (csrc/cpu_ops.cpp quantize_cpu_impl, bitsandbytes 0.50).

    That kernel does not search the map for each value: per block it takes the absmax and
    scales by its reciprocal (value * (1 / absmax), not value / absmax), rounds the result to
    one of 65536 evenly spaced slots, slot = trunc((x + 1) * 0.5 * 65535 + 0.5), and reads a
    table built once per map (build_quantize_lut): slot k holds the number of midpoints
    (code[i] + code[i+1]) / 2 that lie strictly below the slot's own value -1 + 2k / 65535.
    So a value within half a slot (1.5e-5) of a midpoint can get the farther neighbour; the
    nearest-code rule disagrees there (~0.1% of absmax codes). A block whose absmax is 0
    stores code 0. Every step is float32, as in the kernel."""
    code2 = dynamic_map().to(values.device)
    n = values.numel()
    pad = (-n) % ABSMAX_BLOCKSIZE
    padded = torch.nn.functional.pad(values.float(), (0, pad)).reshape(-1, ABSMAX_BLOCKSIZE)
    absmax2 = padded.abs().max(dim=-1)[0]  # zero padding never raises an absolute max
    scaled = (padded * (1.0 / absmax2).view(-1, 1)).clamp(-1.0, 1.0)
    slot = ((scaled + 1.0) * 0.5 * LUT_STEPS + 0.5).to(torch.int64)  # truncation, as the C cast
    k = torch.arange(LUT_STEPS + 1, device=values.device, dtype=torch.float32)
    slot_value = -1.0 + (2.0 * k) / LUT_STEPS
    midpoints = 0.5 * (code2[:-1] + code2[1:])
    table = torch.searchsorted(midpoints, slot_value, side="left")  # midpoints < slot value
    index = torch.where(absmax2.view(-1, 1) == 0, 0, table[slot.clamp(0, LUT_STEPS)])
    index = index.reshape(-1)[:n]
    return {"absmax": index.to(torch.uint8), "code2": code2, "absmax2": absmax2}


def nf4_absmax(tensors: dict[str, torch.Tensor], n_blocks: int) -> torch.Tensor:
    """The fp32 absmax per block (decoded first where it is double-quantized)."""
    absmax = tensors["absmax"]
    if "absmax2" not in tensors:
        return absmax
    values = tensors["code2"][absmax.long()]
    pad = (-n_blocks) % ABSMAX_BLOCKSIZE
    values = torch.nn.functional.pad(values, (0, pad)).reshape(-1, ABSMAX_BLOCKSIZE)
    values = (values * tensors["absmax2"].view(-1, 1)).reshape(-1)[:n_blocks]
    return values + tensors["offset"]


def dequantize_nf4(
    tensors: dict[str, torch.Tensor], shape: tuple[int, ...], blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    """The NF4 weight back in `dtype`: code[index] * absmax of its block, in fp32, cast once."""
    codes = tensors["codes"].reshape(-1, 1)
    # high nibble first; written as one broadcast shift rather than a stack of the two halves,
    # so a compiled graph reads it as a single pointwise kernel with the lookup and scale
    shift = 4 - 4 * torch.arange(2, device=codes.device, dtype=torch.uint8)
    index = ((codes >> shift) & 15).reshape(-1).long()
    n = math.prod(shape)
    values = tensors["code"][index[:n]].reshape(-1, blocksize)
    absmax = nf4_absmax(tensors, values.shape[0])
    return (values * absmax.view(-1, 1)).reshape(shape).to(dtype)


def quantize_int8(W: torch.Tensor, dtype: torch.dtype | None = None) -> QuantizedWeight:
    """`W` [out, in] as int8 per output channel (bitsandbytes' int8_vectorwise_quant layout)."""
    if W.dim() != 2:
        raise ValueError(f"int8 quantizes 2-D weights [out, in], got shape {tuple(W.shape)}")
    w = W.detach().float()
    absmax = w.abs().max(dim=1)[0]
    codes = torch.round(w * (127.0 / absmax.clamp(min=1e-38).view(-1, 1))).clamp(-127, 127)
    tensors = {"codes": codes.to(torch.int8), "absmax": absmax}
    return QuantizedWeight("int8", tuple(W.shape), dtype or W.dtype, 0, tensors)


def dequantize_int8(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """codes * absmax / 127 per row, in fp32, cast once."""
    scale = tensors["absmax"].float() / 127.0
    return (tensors["codes"].float() * scale.view(-1, 1)).to(dtype)


def dequantize(q: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight `q` stores, in `dtype` (default: its own)."""
    if q.kind == "nf4":
        return dequantize_nf4(q.tensors, q.shape, q.blocksize, dtype or q.dtype)
    if q.kind == "int8":
        return dequantize_int8(q.tensors, dtype or q.dtype)
    raise ValueError(f"unknown quantized weight kind {q.kind!r}")

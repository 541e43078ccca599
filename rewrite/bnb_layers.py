"""Read a bitsandbytes model before tracing: its quantized layers become plain `nn.Linear`s
whose weight only holds the shape, and their quantization state goes, unchanged, into
peftc's own records (`QuantizedWeight`).

torch.export cannot trace bitsandbytes' tensor subclasses (Params4bit, Int8Params: "Creating
a new Tensor subclass ... FakeTensor"), and it does not need to: the quantize pass feeds each
site's matmul from the stored codes. Nothing is re-quantized: NF4 codes, absmax (or the
double-quantized absmax with its code, absmax and offset) and int8 CB/SCB are taken as they
are. The layers are recognised by class name and attributes, so this module does not import
bitsandbytes.
"""

from __future__ import annotations

import torch

from rewrite.codec import NF4_CODE, QuantizedWeight

LINEAR_4BIT = ("Linear4bit", "LinearNF4", "LinearFP4", "Params4bit")
LINEAR_8BIT = ("Linear8bitLt",)


class BnbLayerError(ValueError):
    """A bitsandbytes layer peftc cannot read; the message names it and the way out."""


def shape_holder(shape: tuple[int, ...], dtype: torch.dtype) -> torch.nn.Parameter:
    """A frozen parameter of `shape` that stores one value (a stride-0 view): enough for
    torch.export to trace the matmul that reads it, and no memory."""
    return torch.nn.Parameter(torch.zeros((), dtype=dtype).expand(shape), requires_grad=False)


def is_bnb_layer(module: torch.nn.Module) -> bool:
    return type(module).__name__ in LINEAR_4BIT + LINEAR_8BIT


def _read_4bit(path: str, module: torch.nn.Module) -> QuantizedWeight:
    state = getattr(module.weight, "quant_state", None)
    if state is None:
        raise BnbLayerError(
            f"{path}: a Linear4bit without a quant_state (not quantized yet); load the model "
            "with its BitsAndBytesConfig on a device (device_map='cpu') before compiling"
        )
    if state.quant_type != "nf4":
        raise BnbLayerError(
            f"{path}: bitsandbytes quant_type {state.quant_type!r}; peftc reads nf4 "
            "(BitsAndBytesConfig(bnb_4bit_quant_type='nf4'))"
        )
    if not torch.equal(state.code.float().cpu(), torch.tensor(NF4_CODE)):
        raise BnbLayerError(f"{path}: its NF4 code is not bitsandbytes' NF4 table")
    codes = module.weight.data
    if codes.dtype != torch.uint8:
        codes = codes.view(torch.uint8)  # quant_storage other than uint8 holds the same bytes
    tensors = {"codes": codes.reshape(-1), "code": state.code.float()}
    if state.nested:
        tensors.update(
            absmax=state.absmax,
            code2=state.state2.code.float(),
            absmax2=state.state2.absmax.float(),
            offset=torch.as_tensor(state.offset, dtype=torch.float32).reshape(()),
        )
        if state.state2.blocksize != 256:
            raise BnbLayerError(
                f"{path}: double-quantized absmax in blocks of {state.state2.blocksize}; "
                "peftc reads bitsandbytes' 256"
            )
    else:
        tensors["absmax"] = state.absmax.float()
    dtype = getattr(module, "compute_dtype", None) or state.dtype
    return QuantizedWeight("nf4", tuple(state.shape), dtype, int(state.blocksize), tensors)


def _read_8bit(path: str, module: torch.nn.Module) -> QuantizedWeight:
    weight = module.weight
    cb = getattr(weight, "CB", None)
    scb = getattr(weight, "SCB", None)
    if cb is None or scb is None:
        raise BnbLayerError(
            f"{path}: a Linear8bitLt without CB/SCB (not quantized yet, or already merged); "
            "load the model with BitsAndBytesConfig(load_in_8bit=True) and device_map='cpu'"
        )
    # the layer runs in its input's dtype; its original fp weights were float32 here
    return QuantizedWeight("int8", tuple(cb.shape), torch.float32, 0, {"codes": cb, "absmax": scb})


def read_bnb_layers(model: torch.nn.Module) -> dict[str, QuantizedWeight]:
    """Replace every bitsandbytes layer of `model` (in place) by an `nn.Linear` whose weight is
    a shape holder; returns weight name -> its quantization state."""
    found: dict[str, QuantizedWeight] = {}
    for path, module in list(model.named_modules()):
        name = type(module).__name__
        if name in LINEAR_4BIT:
            record = _read_4bit(path, module)
        elif name in LINEAR_8BIT:
            record = _read_8bit(path, module)
        else:
            continue
        out_f, in_f = record.shape
        plain = torch.nn.Linear(in_f, out_f, bias=module.bias is not None, device="meta")
        plain.weight = shape_holder(record.shape, record.dtype)
        if module.bias is not None:
            plain.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, leaf, plain)
        found[f"{path}.weight"] = record
    return found

"""An int8 ONNX export: the merged fp32 export, then onnxruntime's dynamic quantization
(int8 weights, activations quantized per call), with its drift and speed against the fp32 file.

    adapted ──export_merged(fp32)──▶ model.fp32.onnx ──quantize_dynamic(QInt8)──▶ model.onnx

Both files are run by onnxruntime on the same fresh inputs; the report gives the max |int8 -
fp32| per output and the median latency of each. The drift is reported, not asserted: int8
error depends on the model, so the caller decides what is acceptable.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from lowering.onnx import (
    ExportReport,
    export_merged,
    fresh_inputs,
    run_session,
    session,
    verify_shapes,
)
from passes.pipeline import pipeline_of
from rewrite.files import staged


@dataclass
class Int8Report:
    """The int8 file, the fp32 file it was made from, and how they compare."""

    path: str
    fp32: ExportReport
    drift: float  # max |int8 - fp32| over the outputs, both in onnxruntime
    fp32_ms: float  # median latency per call
    int8_ms: float
    bytes_fp32: int
    bytes_int8: int

    def summary(self) -> str:
        return "\n".join(
            [
                self.fp32.summary(),
                f"int8 (onnxruntime dynamic quantization) {self.path}: max |int8 - fp32| "
                f"{self.drift:.2e}; {self.int8_ms:.2f} ms vs fp32 {self.fp32_ms:.2f} ms "
                f"({self.fp32_ms / max(self.int8_ms, 1e-9):.2f}x); "
                f"{self.bytes_int8:,} vs {self.bytes_fp32:,} bytes",
            ]
        )


def _median_ms(sess, feed, repeats: int) -> float:
    run_session(sess, feed)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_session(sess, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def export_int8(
    adapted,
    path: str | os.PathLike,
    opset: int | None = None,
    repeats: int = 20,
    ort_fusions: bool = True,
) -> Int8Report:
    """Export `adapted` merged (fp32, verified) next to `path`, quantize it to int8 weights with
    onnxruntime.quantization.quantize_dynamic, and compare the two files (latency: the median
    of `repeats` calls)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    pipeline = pipeline_of(adapted)
    path = Path(path)
    fp32_path = path.with_suffix(".fp32.onnx")
    fp32 = export_merged(pipeline, fp32_path, dtype="fp32", opset=opset, ort_fusions=ort_fusions)
    with staged(path, make_parents=True) as tmp:
        quantize_dynamic(str(fp32_path), str(tmp), weight_type=QuantType.QInt8)
    dims = pipeline.program(training=False).input_dims
    example = pipeline.example_inputs
    feed = fresh_inputs(example, verify_shapes(example)[:1], dims=dims)[0]
    ref, q = session(fp32_path), session(path)
    drift = max(
        (a.float() - b.float()).abs().max().item()
        for a, b in zip(run_session(q, feed), run_session(ref, feed), strict=True)
    )
    return Int8Report(
        path=str(path),
        fp32=fp32,
        drift=drift,
        fp32_ms=_median_ms(ref, feed, repeats),
        int8_ms=_median_ms(q, feed, repeats),
        bytes_fp32=fp32_path.stat().st_size,
        bytes_int8=path.stat().st_size,
    )

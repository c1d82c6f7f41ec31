"""Weight storage of exported graphs: float32 (as exported) or float16 on disk with float32 arithmetic.

`store_fp16` rewrites a graph so every large float32 tensor (initializer or Constant node) is stored as float16 and
widened back by a `Cast` node at the top of the graph. onnxruntime's constant folding (any optimisation level above "disabled") runs those
casts once when the session is created, so inference runs the same float32 kernels at the same speed as the
float32 graph, from a file half the size. The cost is the rounding of each weight to float16 (11 significant bits,
a relative error below 4.9e-4); `pgesam-train export --check` measures what it does to each graph's outputs.

This is not the fp16 *variant* of `quantize.py`, which computes in float16 (for CUDA).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WEIGHTS = ("fp32", "fp16")
MIN_ELEMENTS = 1024  # smaller tensors (biases, norms, scalars) stay float32: they cost nothing on disk
FP16_MAX = 65504.0


def _fits_fp16(values: np.ndarray) -> bool:
    return bool(np.all(np.abs(values) <= FP16_MAX))


def store_fp16(path: Path, min_elements: int = MIN_ELEMENTS) -> dict:
    """Rewrite the ONNX file at `path` in place with float16 storage -> {"tensors", "bytes_before", "bytes_after"}.

    Both initializers and `Constant` nodes (the exporter writes module buffers, such as fixed DFT bases, as
    Constant nodes) are stored as float16; identical tensors are stored once. Tensors whose values do not fit
    float16 (|x| > 65504) stay float32."""
    path = Path(path)
    before = path.stat().st_size
    model = onnx.load(str(path))
    graph = model.graph
    stored: dict[bytes, str] = {}  # float32 bytes -> name of the float16 initializer that holds them
    halves, casts, kept, converted = [], [], [], 0

    def widen(values: np.ndarray, name: str) -> None:
        key = values.tobytes() + str(values.shape).encode()
        if key not in stored:
            stored[key] = f"{name}__fp16"
            halves.append(numpy_helper.from_array(values.astype(np.float16), name=stored[key]))
        casts.append(helper.make_node("Cast", [stored[key]], [name], to=TensorProto.FLOAT, name=f"{name}__widen"))

    for init in graph.initializer:
        values = numpy_helper.to_array(init) if init.data_type == TensorProto.FLOAT else None
        if values is None or values.size < min_elements or not _fits_fp16(values):
            kept.append(init)
            continue
        widen(values, init.name)
        converted += 1
    nodes = []
    for node in graph.node:
        value = node.attribute[0].t if node.op_type == "Constant" and len(node.attribute) == 1 and \
            node.attribute[0].name == "value" else None
        if value is not None and value.data_type == TensorProto.FLOAT and int(np.prod(value.dims)) >= min_elements:
            values = numpy_helper.to_array(value)
            if _fits_fp16(values):
                widen(values, node.output[0])
                converted += 1
                continue
        nodes.append(node)
    del graph.initializer[:]
    graph.initializer.extend(kept + halves)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.checker.check_model(model)
    tmp = path.with_name(f".{path.name}.fp16")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return {"tensors": converted, "bytes_before": before, "bytes_after": path.stat().st_size}

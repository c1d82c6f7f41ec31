"""Weight storage of exported graphs: float32 (as exported) or float16 on disk with float32 arithmetic.

`store_fp16` rewrites a graph so every large float32 initializer is stored as float16 and widened back by a `Cast`
node at the top of the graph. onnxruntime's constant folding (any optimisation level above "disabled") runs those
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


def store_fp16(path: Path, min_elements: int = MIN_ELEMENTS) -> dict:
    """Rewrite the ONNX file at `path` in place with float16 storage -> {"tensors", "bytes_before", "bytes_after"}.

    Tensors whose values do not fit float16 (|x| > 65504) stay float32."""
    path = Path(path)
    before = path.stat().st_size
    model = onnx.load(str(path))
    graph = model.graph
    kept, casts, converted = [], [], 0
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < min_elements:
            kept.append(init)
            continue
        values = numpy_helper.to_array(init)
        if not np.all(np.abs(values) <= FP16_MAX):
            kept.append(init)
            continue
        stored = f"{init.name}__fp16"
        kept.append(numpy_helper.from_array(values.astype(np.float16), name=stored))
        casts.append(helper.make_node("Cast", [stored], [init.name], to=TensorProto.FLOAT,
                                      name=f"{init.name}__widen"))
        converted += 1
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    tmp = path.with_name(f".{path.name}.fp16")
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return {"tensors": converted, "bytes_before": before, "bytes_after": path.stat().st_size}

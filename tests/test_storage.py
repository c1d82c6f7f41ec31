"""float16 weight storage (export/storage.py): half the file, float32 arithmetic, casts folded by onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from export.storage import store_fp16


def matmul_model(path, weight: np.ndarray, bias: np.ndarray) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", weight.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", weight.shape[1]])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(weight, "w"),
                                                     numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model.metadata_props.add(key="graph", value="test")
    onnx.save(model, str(path))


def run(path, x: np.ndarray, optimized=None) -> np.ndarray:
    opts = ort.SessionOptions()
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_fp16_storage_halves_the_file_and_keeps_the_outputs(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 96)).astype(np.float32)
    b = rng.standard_normal(96).astype(np.float32)  # small: stays float32
    path = tmp_path / "g.onnx"
    matmul_model(path, w, b)
    x = rng.standard_normal((4, 128)).astype(np.float32)
    ref = run(path, x)
    info = store_fp16(path)
    assert info["tensors"] == 1
    assert info["bytes_after"] < 0.6 * info["bytes_before"]
    model = onnx.load(str(path))
    assert {i.name: i.data_type for i in model.graph.initializer} == {"w__fp16": TensorProto.FLOAT16,
                                                                       "b": TensorProto.FLOAT}
    assert {p.key: p.value for p in model.metadata_props} == {"graph": "test"}  # metadata kept
    got = run(path, x, optimized=tmp_path / "opt.onnx")
    expected = x @ w.astype(np.float16).astype(np.float32) + b
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)  # exactly the rounded weights, in float32
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()
    optimized = onnx.load(str(tmp_path / "opt.onnx"))
    assert "Cast" not in {n.op_type for n in optimized.graph.node}  # folded once at session creation


def test_values_beyond_float16_stay_float32(tmp_path):
    w = np.full((64, 64), 1e5, np.float32)
    path = tmp_path / "big.onnx"
    matmul_model(path, w, np.zeros(64, np.float32))
    assert store_fp16(path)["tensors"] == 0
    x = np.ones((1, 64), np.float32)
    np.testing.assert_allclose(run(path, x), x @ w)


def test_constant_nodes_are_stored_once_as_float16(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 64])
    nodes = [helper.make_node("Constant", [], ["c1"], value=numpy_helper.from_array(w)),
             helper.make_node("Constant", [], ["c2"], value=numpy_helper.from_array(w.copy())),  # a duplicate
             helper.make_node("MatMul", ["x", "c1"], ["h"]), helper.make_node("MatMul", ["h", "c2"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "c.onnx"
    onnx.save(model, str(path))
    info = store_fp16(path)
    assert info["tensors"] == 2 and info["bytes_after"] < 0.35 * info["bytes_before"]  # one half-size copy
    stored = onnx.load(str(path))
    assert [i.data_type for i in stored.graph.initializer] == [TensorProto.FLOAT16]
    assert "Constant" not in {n.op_type for n in stored.graph.node}
    v = rng.standard_normal((2, 64)).astype(np.float32)
    w16 = w.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(run(path, v), v @ w16 @ w16, rtol=1e-4, atol=1e-3)

"""Channels-last hints (`compressors._onnx_layout`): no ``Transpose`` left around ONNX Runtime's
NHWC integer sum and pool of a W8A8 CNN graph, the same values."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from compressors import CompressionContext, apply_pipeline, get_compressor, save_packed
from tests.onnx_graphs import optimized_ops

pytestmark = pytest.mark.usefixtures("one_thread")


def _stem_block_pool():
    """A float stem conv (1 -> 8 channels) + ReLU quantized for a QDQ conv and a residual sum
    (the zoo ResNet's first block in small), then the pooled tail into the head's grid."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {
        "stem_w": rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32),
        "stem_b": rng.normal(0, 0.1, 8).astype(np.float32),
        "w": rng.integers(-40, 41, (8, 8, 3, 3)).astype(np.int8),
        "w_scale": np.full(8, 0.01, np.float32),
        "w_zero": np.zeros(8, np.int8),
        "shape": np.array([0, -1], np.int64),
    }
    for name, scale in (("a", 0.02), ("c", 0.03), ("s", 0.05), ("h", 0.01)):
        arrays[f"{name}_scale"] = np.array(scale, np.float32)
        arrays[f"{name}_zero"] = np.array(0, np.uint8)

    def qdq(x, name, out):
        grid = [f"{name}_scale", f"{name}_zero"]
        return [
            helper.make_node("QuantizeLinear", [x, *grid], [f"{name}_q"]),
            helper.make_node("DequantizeLinear", [f"{name}_q", *grid], [out]),
        ]

    nodes = [
        helper.make_node("Conv", ["x", "stem_w", "stem_b"], ["stem"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["stem"], ["relu"]),
        *qdq("relu", "a", "a_dq"),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["w_dq"], axis=0),
        helper.make_node("Conv", ["a_dq", "w_dq"], ["conv"], pads=[1, 1, 1, 1]),
        *qdq("conv", "c", "c_dq"),
        helper.make_node("Add", ["c_dq", "a_dq"], ["sum"]),
        *qdq("sum", "s", "s_dq"),
        helper.make_node("GlobalAveragePool", ["s_dq"], ["mean"]),
        helper.make_node("Reshape", ["mean", "shape"], ["flat"]),
        *qdq("flat", "h", "out"),
    ]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(v, k) for k, v in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_the_hints_leave_no_transpose_and_the_same_values(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from compressors._onnx_layout import nhwc_hints

    proto = _stem_block_pool()
    onnx.save(proto, tmp_path / "plain.onnx")
    assert nhwc_hints(proto) == 2  # (the stem's output, the pool's output)
    onnx.checker.check_model(proto)
    onnx.save(proto, tmp_path / "hinted.onnx")
    plain = optimized_ops(tmp_path / "plain.onnx")
    hinted = optimized_ops(tmp_path / "hinted.onnx")
    for ops in (plain, hinted):  # integer from the stem's QuantizeLinear to the head's grid
        assert ops["QLinearConv"] == ops["QLinearAdd"] == ops["QLinearGlobalAveragePool"] == 1
        assert ops["Add"] == ops["Relu"] == 0 and ops["DequantizeLinear"] == 1  # (the output)
    # without the hints the stem's codes were transposed to NHWC, the sum (and the pool after
    # it) ran NCHW, the conv's output transposed back for it; with them the float stem writes
    # NHWC and everything after it runs NHWC
    assert plain["Transpose"] == 2 and plain["ReorderOutput"] == 1
    assert hinted["Transpose"] == 0 and hinted["ReorderOutput"] == 1
    x = np.random.default_rng(1).uniform(0, 4, (5, 1, 8, 8)).astype(np.float32)
    runs = {}
    for name in ("plain", "hinted"):
        for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
            options = onnxruntime.SessionOptions()
            options.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel, level)
            session = onnxruntime.InferenceSession(str(tmp_path / f"{name}.onnx"), options)
            runs[name, level] = session.run(None, {"x": x})[0]
    # the same graph in any session: equal unoptimised, and equal on the integer kernels
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
        np.testing.assert_array_equal(runs["hinted", level], runs["plain", level])


def _without_relu():
    """`_stem_block_pool` with the stem's conv quantized directly (no activation)."""
    proto = _stem_block_pool()
    relu = next(n for n in proto.graph.node if n.op_type == "Relu")
    proto.graph.node.remove(relu)
    next(n for n in proto.graph.node if n.input[0] == "relu").input[0] = "stem"
    return proto


def test_without_an_activation_the_hint_goes_on_the_codes_for_a_sum_only():
    pytest.importorskip("onnx")
    from compressors._onnx_layout import nhwc_hints

    hinted = _without_relu()
    assert nhwc_hints(hinted) == 2
    # (ONNX Runtime would move the QuantizeLinear before a hint on the float side)
    transposes = [list(n.input) for n in hinted.graph.node if n.op_type == "Transpose"]
    assert ["a_q_nhwc_nchw"] in transposes  # (after the QuantizeLinear: on the codes)
    proto = _without_relu()
    add = next(n for n in proto.graph.node if n.op_type == "Add")
    add.input[1] = "c_dq"  # (no residual reader of the stem's codes: nothing to gain)
    assert nhwc_hints(proto) == 1  # (the pool's alone)
    assert Counter(n.op_type for n in proto.graph.node)["Transpose"] == 1


@pytest.mark.slow  # (an export: ~5 s)
def test_the_zoo_resnets_w8a8_graph_runs_its_sums_channels_last(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from compressors.onnx_export import check_onnx, export_onnx
    from tests.zoo import tasks

    task = tasks.zoo_resnet(seed=0)
    torch.manual_seed(0)
    baseline = task.build_model().eval()
    ctx = CompressionContext(train=task.train, example_inputs=task.example_inputs(8), seed=0)
    model = apply_pipeline([get_compressor("quant")(activations=8)], baseline, ctx).eval()
    save_packed(model, tmp_path / "resnet.sqz")
    shipped = task.build_model()
    export_onnx(tmp_path / "resnet.sqz", shipped, task.example_inputs(8), tmp_path / "resnet.onnx")
    ops = optimized_ops(tmp_path / "resnet.onnx")
    # the float stem (NCHWc) writing NHWC, one QuantizeLinear, then NHWC integer kernels to
    # the head: no Transpose after the stem, around the sums or after the pool
    assert ops["QLinearConv"] == 5 and ops["QLinearAdd"] == 2
    assert ops["QLinearGlobalAveragePool"] == 1 and ops["QGemm"] == 1
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 0
    assert ops["ReorderOutput"] == 1 and ops["Transpose"] == 0
    check = check_onnx(tmp_path / "resnet.onnx", shipped, task.val.x)
    assert check.agree and check.max_rel_diff < 5e-3, check.message

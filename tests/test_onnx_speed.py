"""Export for speed: BatchNorm folded into the Conv / Gemm before it (the model's outputs kept
to 1e-5, the file's codes kept), and ONNX Runtime's basic offline optimisation saved into the
file (recorded, portable, never at the price of the codes).

Needs the ``onnx`` extra (part of ``.[dev]``); skipped without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, numpy_helper  # noqa: E402

from compressors import (  # noqa: E402
    _onnx_optimize,  # noqa: E402
)
from compressors.onnx_export import (  # noqa: E402
    OrtModule,
    check_onnx,
    export_onnx,
    ort_session,
)
from compressors.packing import read_tensors  # noqa: E402
from tests.test_onnx import pack_recipe  # noqa: E402
from tests.zoo import tasks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

#: Outputs of a folded graph against the torch model with its BatchNorm layers.
FOLD_TOLERANCE = 1e-5


def _trained_like(model: nn.Module) -> nn.Module:
    """``model`` with BatchNorm statistics and affine parameters far from the identity (a fresh
    BatchNorm computes ``x / sqrt(1 + eps)``: folding it would prove little)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g) * 0.5 + 1)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def _ops(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


def _integer_elements(path: Path) -> int:
    integer = {TensorProto.INT4, TensorProto.INT8, TensorProto.UINT4, TensorProto.UINT8}
    graph = onnx.load(str(path)).graph
    points = {
        n.input[2] for n in graph.node if n.op_type == "DequantizeLinear" and len(n.input) > 2
    }
    return sum(
        numpy_helper.to_array(i).size
        for i in graph.initializer
        if i.data_type in integer and i.name not in points
    )


def _coded_elements(packed: Path) -> int:
    tensors = {id(t): t for t in read_tensors(packed).values() if t.codes is not None}
    return sum(t.value.numel() for t in tensors.values())


@pytest.mark.parametrize(
    ("family", "recipe"),
    [
        pytest.param(  # per-row scales, scaled
            "resnet",
            [("structured", {"amount": 0.4}), ("quant", {"bits": 4})],
            marks=pytest.mark.slow,
            id="resnet-quant4",
        ),
        pytest.param("mobilenet", [("quant", {"bits": 8})], id="mobilenet-quant8"),  # depthwise
        pytest.param(  # a codebook: a Mul on the weight's constant path
            "resnet", [("cluster", {"bits": 4})], marks=pytest.mark.slow, id="resnet-cluster4"
        ),
    ],
)
def test_batchnorm_is_folded_with_outputs_equal_to_1e_5_and_the_codes_kept(
    family, recipe, tmp_path
):
    task = getattr(tasks, f"zoo_{family}")(seed=0)
    torch.manual_seed(0)
    baseline = _trained_like(task.build_model())
    packed = tmp_path / "m.sqz"
    pack_recipe(baseline, recipe, task, packed)

    shipped = task.build_model()
    folded = export_onnx(packed, shipped, task.example_inputs(8), tmp_path / "folded.onnx")
    assert "BatchNormalization" not in folded.ops
    assert any("BatchNormalization folded" in note for note in folded.notes), folded.notes
    # the mean pool as GlobalAveragePool (ONNX Runtime runs it on NCHWc blocks), not ReduceMean
    assert folded.ops["GlobalAveragePool"] == 1 and "ReduceMean" not in folded.ops, folded.ops
    # the torch model keeps its BatchNorm layers, in eval mode: the graph computes what it does
    assert any(isinstance(m, nn.BatchNorm2d) for m in shipped.modules())
    check = check_onnx(folded.path, shipped, task.val.x, atol=FOLD_TOLERANCE, rtol=0.0)
    assert check.agree, check.message
    # and what the unfolded graph computes
    unfolded = export_onnx(
        packed, task.build_model(), task.example_inputs(8), tmp_path / "bn.onnx", fold_bn=False
    )
    assert unfolded.ops["BatchNormalization"] == folded.ops["Conv"] > 0
    x = task.val.x[:64]
    with torch.no_grad():
        a = OrtModule(ort_session(folded.path))(x)
        b = OrtModule(ort_session(unfolded.path))(x)
    assert torch.allclose(a, b, atol=FOLD_TOLERANCE, rtol=0.0), float((a - b).abs().max())
    # every code of the file is still in the graph, once, as an integer; the file is smaller
    assert _integer_elements(folded.path) == _coded_elements(packed)
    assert folded.size_bytes < unfolded.size_bytes


class _LinearBN(nn.Module):
    """A Linear + BatchNorm1d head, and a BatchNorm that follows no Conv / Gemm."""

    def __init__(self) -> None:
        super().__init__()
        self.norm_in = nn.BatchNorm1d(64)
        self.fc = nn.Linear(64, 32)
        self.bn = nn.BatchNorm1d(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.fc(self.norm_in(x)))))


def test_a_batchnorm_after_a_linear_is_folded_and_one_after_no_layer_kept(tmp_path):
    digits = tasks.zoo_resnet(seed=0)  # its images, flattened: 64 features
    x = digits.val.x.flatten(1)
    torch.manual_seed(0)
    baseline = _trained_like(_LinearBN())
    packed = tmp_path / "m.sqz"
    pack_recipe(baseline, [("quant", {"bits": 8})], None, packed)
    shipped = _LinearBN()
    exported = export_onnx(  # (without ONNX Runtime's pass, which drops unread tensors itself)
        packed, shipped, x[:8], tmp_path / "m.onnx", matmul="dequantize", optimize="none"
    )
    assert exported.ops["BatchNormalization"] == 1  # norm_in: nothing before it to fold into
    assert any("1 BatchNormalization kept" in note for note in exported.notes), exported.notes
    check = check_onnx(exported.path, shipped, x, atol=FOLD_TOLERANCE, rtol=0.0)
    assert check.agree, check.message
    graph = onnx.load(str(exported.path)).graph  # fc's own bias replaced, not left behind
    assert {i.name for i in graph.initializer} <= {v for n in graph.node for v in n.input}
    integer = export_onnx(packed, _LinearBN(), x[:8], tmp_path / "i.onnx", matmul="integer")
    assert integer.ops["BatchNormalization"] == 1 and integer.ops["MatMulInteger"] == 2
    assert check_onnx(integer.path, shipped, x).agree


@pytest.mark.slow
def test_the_basic_offline_optimisation_is_saved_recorded_and_portable(tmp_path):
    task = tasks.zoo_transformer(seed=0)
    torch.manual_seed(0)
    baseline = task.build_model().eval()
    packed = tmp_path / "m.sqz"
    pack_recipe(baseline, [("cluster", {"bits": 4})], task, packed)
    shipped = task.build_model()
    exported = export_onnx(packed, shipped, task.example_inputs(8), tmp_path / "o.onnx")
    proto = onnx.load(str(exported.path))
    props = {p.key: p.value for p in proto.metadata_props}
    assert props[_onnx_optimize.OPTIMIZED_KEY].startswith("basic (onnxruntime ")
    # standard ONNX ops only, and only the opsets the graph uses
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    assert _integer_elements(exported.path) == _coded_elements(packed)  # codebook codes kept
    check = check_onnx(exported.path, shipped, task.val.x)
    assert check.agree, check.message
    plain = export_onnx(
        packed, task.build_model(), task.example_inputs(8), tmp_path / "p.onnx", optimize="none"
    )
    plain_props = {p.key for p in onnx.load(str(plain.path)).metadata_props}
    assert _onnx_optimize.OPTIMIZED_KEY not in plain_props


@pytest.mark.slow
def test_an_optimisation_that_would_store_the_codes_as_floats_is_not_kept(tmp_path, monkeypatch):
    """With ONNX Runtime's constant folding on, a codebook's Gather becomes a float32
    initializer: the file keeps its unoptimized graph, and says so."""
    task = tasks.zoo_resnet(seed=0)
    torch.manual_seed(0)
    packed = tmp_path / "m.sqz"
    pack_recipe(task.build_model().eval(), [("cluster", {"bits": 4})], task, packed)
    monkeypatch.setattr(_onnx_optimize, "DISABLED_OPTIMIZERS", ())
    exported = export_onnx(packed, task.build_model(), task.example_inputs(8), tmp_path / "m.onnx")
    assert any("offline optimisation not kept" in note for note in exported.notes)
    assert _integer_elements(exported.path) == _coded_elements(packed)
    props = {p.key for p in onnx.load(str(exported.path)).metadata_props}
    assert _onnx_optimize.OPTIMIZED_KEY not in props


def test_a_bad_optimize_level_names_the_allowed_ones(tmp_path):
    task = tasks.zoo_resnet(seed=0)
    with pytest.raises(ValueError, match="'optimize'.*'basic', 'none'.*'all'"):
        export_onnx(
            tmp_path / "m.sqz",
            task.build_model(),
            task.example_inputs(8),
            tmp_path / "m.onnx",
            optimize="all",
        )


def test_deployed_graphs_record_their_thread_settings(tmp_path):
    from search.run.deploy import ORT_THREAD_PARAMS, deploy_onnx

    task = tasks.zoo_resnet(seed=0)
    torch.manual_seed(0)
    packed = tmp_path / "m.sqz"
    pack_recipe(_trained_like(task.build_model()), [("quant", {"bits": 8})], task, packed)
    deployed = deploy_onnx(packed, task, tmp_path / "m.onnx", threads=1)
    assert deployed.threads == {
        "ort.intra_op_threads": 1,
        "ort.inter_op_threads": 1,
        "ort.execution_mode": "sequential",
        "ort.optimization": "basic offline, all at load",
    }
    assert set(deployed.threads) == set(ORT_THREAD_PARAMS)
    assert np.isfinite(deployed.metrics["val_acc_onnx"])


def test_only_a_spatial_mean_of_a_4d_tensor_becomes_global_average_pool():
    from onnx import helper

    from compressors._onnx_pool import float_pools

    axes = numpy_helper.from_array(np.array([-1, -2], np.int64), "axes")
    nodes = [
        helper.make_node("Relu", ["image"], ["a"]),  # (4-D: rank known from the input)
        helper.make_node("ReduceMean", ["a", "axes"], ["pooled"], keepdims=1),
        helper.make_node("ReduceMean", ["a", "axes"], ["dropped"], keepdims=0),  # (not kept)
        helper.make_node("ReduceMean", ["tokens", "axes"], ["mean"], keepdims=1),  # (3-D)
    ]
    graph = helper.make_graph(
        nodes,
        "pools",
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, ["b", 3, 5, 5]),
            helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["b", 7, 4]),
        ],
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
            for n in ("pooled", "dropped", "mean")
        ],
        [axes],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    feeds = {
        "image": np.random.default_rng(0).standard_normal((2, 3, 5, 5)).astype(np.float32),
        "tokens": np.random.default_rng(1).standard_normal((2, 7, 4)).astype(np.float32),
    }
    import onnxruntime

    before = onnxruntime.InferenceSession(proto.SerializeToString()).run(None, feeds)
    assert float_pools(proto) == 1
    assert [n.op_type for n in proto.graph.node] == [
        "Relu",
        "GlobalAveragePool",
        "ReduceMean",
        "ReduceMean",
    ]
    after = onnxruntime.InferenceSession(proto.SerializeToString()).run(None, feeds)
    for old, new in zip(before, after, strict=True):
        np.testing.assert_allclose(new, old, rtol=1e-6, atol=1e-7)

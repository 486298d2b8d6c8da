"""Activation quantization (``quant.activations=8``): calibration, quantization-aware fine-tuning,
the packed file's activation grids, and the QDQ graph ONNX Runtime runs on integer kernels."""

from __future__ import annotations

import copy
import functools
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from compressors import (
    CompressionContext,
    PackedFileError,
    UnsupportedModelError,
    apply_pipeline,
    get_compressor,
    load_packed,
    save_packed,
)
from compressors import _act_quant as act
from compressors._container import FORMAT_VERSION, FORMAT_VERSION_ACT
from compressors._opening import opened
from compressors._params import InvalidParameterError
from experiments import Split, Task, evaluate, fit
from experiments.models import ConvNet1d
from tests.onnx_graphs import optimized_graph, optimized_ops
from tests.zoo.tasks import digits_cnn1d

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _cnn_task() -> Task:
    """Digits' 64 pixels as a 1-D signal, MNIST-1D's CNN (three Conv1d and a Linear head)."""
    return digits_cnn1d()


@functools.cache
def _trained() -> nn.Module:
    task = _cnn_task()
    torch.manual_seed(0)
    model = task.build_model()
    fit(model, task.train, epochs=8, batch_size=64, lr=1e-2, seed=0)
    return model.eval()


def _w8a8(calibration: str = "minmax", *, seed: int = 0, epochs: int = 0) -> nn.Module:
    """The trained CNN quantized to W8A8 (fine-tuned ``epochs`` on the grids)."""
    task = _cnn_task()
    torch.manual_seed(seed)
    ctx = CompressionContext(train=task.train, example_inputs=task.example_inputs(8), seed=seed)
    quant = get_compressor("quant")(bits=8, activations=8, calibration=calibration)
    model = apply_pipeline([quant], copy.deepcopy(_trained()), ctx)
    if epochs:
        fit(model, task.train, epochs=epochs, batch_size=64, lr=1e-3, seed=seed)
    return model.eval()


@pytest.mark.parametrize("calibration", act.OBSERVERS)
def test_calibration_is_deterministic_for_a_seed(calibration):
    first, again = act.ranges(_w8a8(calibration)), act.ranges(_w8a8(calibration))
    assert first == again
    assert set(first) == {"features.2", "features.4", "head"}  # (features.0: 1 channel)
    assert all(set(sides) == {"in", "out", "from"} for n, sides in first.items() if n != "head")
    # each input is a ReLU's (the Flatten's) output, quantized there for every reader
    assert [first[n]["from"] for n in first] == ["features.1", "features.3", "features.6"]
    # a conv's output, through a ReLU (and the Flatten), is the next layer's input: one grid
    chain = ["features.2", "features.4", "head"]
    for layer, consumer in zip(chain, chain[1:], strict=False):
        assert first[layer]["out"] == first[consumer]["in"]
        assert first[consumer]["in"][1] == 0  # (after a ReLU: 0 is the grid's first value)
    if calibration != "minmax":  # each observer clips differently from the extremes
        widest = act.ranges(_w8a8("minmax"))
        assert all(first[n]["in"][0] <= widest[n]["in"][0] for n in first)
        assert first != widest


def test_observers_pick_their_ranges():
    values = torch.cat([torch.linspace(-1.0, 1.0, 10001), torch.tensor([40.0])])
    seen = (float(values.min()), float(values.max()))
    minmax, _ = act.grid(values, seen, "minmax")
    percentile, _ = act.grid(values, seen, "percentile")
    mse, _ = act.grid(values, seen, "mse")
    assert minmax == pytest.approx(41.0 / 255, rel=1e-6)
    assert percentile < minmax / 4 and mse < minmax  # the outlier is clipped
    assert act.affine(0.0, 0.0) == (1.0, 0)
    assert act.affine(0.0, 2.55)[1] == 0 and act.affine(-2.55, 0.0)[1] == 255


def test_a_w8a8_model_reloaded_from_its_packed_file_equals_the_in_memory_one(tmp_path):
    model = _w8a8("percentile", epochs=1)  # quantization-aware fine-tuning through the grids
    path = tmp_path / "w8a8.sqz"
    save_packed(model, path, like=_trained())
    shipped = load_packed(path, _cnn_task().build_model())
    assert act.ranges(shipped) == act.ranges(model)
    x = _cnn_task().val.x
    with torch.no_grad():
        assert torch.equal(shipped(x), model(x))
        with act.disabled(shipped):  # the grids change the outputs: they were restored
            assert not torch.equal(shipped(x), model(x))
    assert opened(path, _cnn_task().build_model())[0].meta["v"] == FORMAT_VERSION_ACT
    plain = tmp_path / "w8.sqz"
    save_packed(_trained(), plain)  # files without activation grids keep their format
    assert opened(plain, None)[0].meta["v"] == FORMAT_VERSION


def test_a_forged_activation_grid_is_refused(tmp_path):
    model = _cnn_task().build_model()
    for record in (
        {"nowhere": {"in": [0.1, 0]}},
        {"head": {"in": [-0.1, 0]}},
        {"head": {"in": [0.1, 300]}},
        {"head": {"out": [0.1, 0]}},
        {"head": {"in": ["0.1", 0]}},
        {"head": {"in": [0.1, 0], "from": "nowhere"}},
        {"head": {"in": [0.1, 0], "from": ""}},  # (the model itself: its output)
    ):
        with pytest.raises(PackedFileError, match="activation grid"):
            act.restore("f.sqz", model, record)


@pytest.mark.slow  # (an export: ~7 s)
def test_the_qdq_graph_runs_integer_kernels_and_scores_like_the_torch_model(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from compressors.onnx_export import check_onnx, export_onnx

    task = _cnn_task()
    path = tmp_path / "w8a8.sqz"
    save_packed(_w8a8("mse", epochs=1), path, like=_trained())
    model = task.build_model()
    graph = tmp_path / "w8a8.onnx"
    export_onnx(path, model, task.example_inputs(8), graph)
    ops = optimized_ops(graph, "ORT_ENABLE_EXTENDED")
    # the first conv reads 1 channel: ONNX Runtime's int8 kernels run it slower than its float
    # one, so it stays float (float weights) and the second conv's input grid quantizes it
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 1
    assert ops["QGemm"] + ops["MatMulIntegerToFloat"] == 1 and ops["Gemm"] == 0
    # each conv's output grid is the next layer's input grid: the ReLUs and the QDQ pairs
    # between the layers are fused away, one integer kernel feeds the next
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 0 and ops["Relu"] == 0

    check = check_onnx(graph, model, task.val.x)  # (the integer kernels: exact=True keeps them)
    assert check.agree, check.message
    labels = task.val.y
    onnx_acc = float((check.outputs.argmax(1) == labels).float().mean())
    assert abs(onnx_acc - evaluate(model, task.val)) <= 1.5 / len(labels)  # at most one sample
    assert evaluate(model, task.val) > 0.8


def test_bad_settings_are_refused_before_training():
    quant = get_compressor("quant")
    with pytest.raises(InvalidParameterError, match=r"'quant.activations'.*Got 4 instead"):
        quant(activations=4)
    with pytest.raises(InvalidParameterError, match=r"'quant.calibration'.*'minmax'"):
        quant(activations=8, calibration="entropy")
    with pytest.raises(InvalidParameterError, match="quant.runtime='int8'"):
        quant(activations=8, runtime="int8")

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(4, 8)

    with pytest.raises(UnsupportedModelError, match="'quant.activations'.*LSTM"):
        quant(activations=8).check_model(Recurrent())
    with pytest.raises(UnsupportedModelError, match="at least 4 input channels.*Conv2d"):
        quant(activations=8).check_model(nn.Sequential(nn.Conv2d(1, 8, 3)))  # (an image's)
    assert quant(activations=8).check_model(_cnn_task().build_model())


def test_activation_grids_need_calibration_batches():
    ctx = CompressionContext()
    with pytest.raises(ValueError, match=r"requires \['train'\]"):
        apply_pipeline([get_compressor("quant")(activations=8)], ConvNet1d(64, 10), ctx)
    model = apply_pipeline(
        [get_compressor("quant")(activations=8, mode="ptq")], ConvNet1d(64, 10), ctx
    )
    assert not act.ranges(model)  # ptq calibrates after fine-tuning, at finalize


def test_an_output_read_twice_keeps_its_own_grid():
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Conv1d(4, 4, 3, padding=1)  # (4 channels: int8, `int8_friendly`)
            self.second = nn.Conv1d(4, 4, 3, padding=1)
            self.relu, self.pool = nn.ReLU(), nn.AdaptiveAvgPool1d(1)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            y = self.first(x.view(len(x), 4, 4))
            return self.head(self.pool(self.second(self.relu(y)) + self.pool(y)).flatten(1))

    torch.manual_seed(0)
    split = Split(torch.randn(64, 16), torch.randint(0, 3, (64,)))
    ctx = CompressionContext(train=split, seed=0)
    model = apply_pipeline([get_compressor("quant")(activations=8)], Branch(), ctx)
    grids = act.ranges(model)
    assert grids["first"]["out"] != grids["second"]["in"]  # y is also pooled, unrectified
    assert grids["first"]["out"][1] > 0  # (its grid holds y's negative values)


@pytest.mark.slow  # (an export: ~5 s)
def test_a_batchnorm_after_a_conv_is_folded_into_its_integer_kernel(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from compressors.onnx_export import check_onnx, export_onnx
    from tests.zoo import tasks

    task = tasks.zoo_resnet(seed=0)  # conv + BatchNorm + ReLU, residual blocks, a linear head
    torch.manual_seed(0)
    baseline = task.build_model().eval()
    ctx = CompressionContext(train=task.train, example_inputs=task.example_inputs(8), seed=0)
    model = apply_pipeline([get_compressor("quant")(activations=8)], baseline, ctx).eval()
    grids = act.ranges(model)
    assert grids["block1.body.0"]["after"] == "block1.body.1"  # the grid follows the BatchNorm
    assert "stem.0" not in grids  # (1 input channel: float, `act.int8_friendly`)
    path = tmp_path / "resnet.sqz"
    save_packed(model, path)
    shipped = task.build_model()
    export_onnx(path, shipped, task.example_inputs(8), tmp_path / "resnet.onnx")
    assert act.ranges(shipped) == grids
    ops = optimized_ops(tmp_path / "resnet.onnx", "ORT_ENABLE_EXTENDED")
    # every conv but the 1-channel stem runs as QLinearConv, its BatchNorm folded; the stem
    # runs ORT's float kernel (its BatchNorm folded in) on float weights
    convs = [m for m in shipped.modules() if isinstance(m, nn.Conv2d)]
    assert ops["QLinearConv"] == len(convs) - 1 == 5
    assert ops["FusedConv"] + ops["Conv"] == 1 and ops["BatchNormalization"] == 0
    # the first block's sum: the stem's output quantized for both its readers, the sum on the
    # next convs' grid; the last block's sum on a grid of its own for the pooling
    # (`compressors._onnx_pool`): integer from the stem's QuantizeLinear to the head's output
    assert ops["QLinearAdd"] == 2 and ops["Add"] == 0
    assert ops["QLinearGlobalAveragePool"] == 1 and ops["ReduceMean"] == 0
    assert ops["QGemm"] == 1 and ops["Relu"] == 0
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 0
    check = check_onnx(tmp_path / "resnet.onnx", shipped, task.val.x)
    # (the float stem's rounding, ORT's against torch's, may move a value of the next
    # layer's input across a step of its grid: a few steps' worth at the outputs)
    assert check.agree and check.max_rel_diff < 5e-3, check.message


@pytest.mark.slow  # (an export: ~5 s)
def test_a_mobilenets_pointwise_chain_runs_integer_kernels_into_the_head(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from compressors.onnx_export import check_onnx, export_onnx
    from tests.zoo import tasks

    task = tasks.zoo_mobilenet(seed=0)  # stem, depthwise 16, pointwise 32, depthwise 32, pw 64
    torch.manual_seed(0)
    baseline = task.build_model().eval()
    ctx = CompressionContext(train=task.train, example_inputs=task.example_inputs(8), seed=0)
    model = apply_pipeline([get_compressor("quant")(activations=8)], baseline, ctx).eval()
    # the 1-channel stem and the 16-channel depthwise conv stay float (`act.int8_friendly`)
    assert set(act.ranges(model)) == {"features.6", "features.9", "features.12", "head"}
    path = tmp_path / "mobilenet.sqz"
    save_packed(model, path)
    shipped = task.build_model()
    export_onnx(path, shipped, task.example_inputs(8), tmp_path / "mobilenet.onnx")
    ops = optimized_ops(tmp_path / "mobilenet.onnx", "ORT_ENABLE_EXTENDED")
    assert ops["QLinearConv"] == 3 and ops["FusedConv"] + ops["Conv"] == 2
    # one QuantizeLinear after the float convs, then integer kernels only: the ReLU6s inside
    # the grids, the last one in the last conv's output grid (`compressors._onnx_pool`),
    # pooled as QLinearGlobalAveragePool into the head's QGemm
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 0 and ops["Clip"] == 0
    assert ops["QLinearGlobalAveragePool"] == 1 and ops["ReduceMean"] == 0 and ops["QGemm"] == 1
    check = check_onnx(tmp_path / "mobilenet.onnx", shipped, task.val.x)
    # (the last conv's output rounded on the ReLU6's grid, not on its own, then clipped)
    assert check.agree and check.max_rel_diff < 5e-3, check.message


@pytest.mark.slow  # (a sweep of one trial, exported: ~30 s)
def test_a_w8a8_trial_is_scored_and_timed_on_integer_kernels(tmp_path, cache_dir):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from search import compose_config, run_sweep
    from tests.conftest import structured_quant_overrides

    overrides = structured_quant_overrides(
        tmp_path,
        cache_dir,
        "search.n_trials=1",
        "space.quant.bits=8",
        "space.quant.activations=8",
        "space.quant.calibration=percentile",
        "measure.runtime=onnxruntime",
        fresh_mlflow=True,
    )
    trial = run_sweep(compose_config(overrides)).trials.iloc[0]
    assert trial["state"] == "COMPLETE"
    # the shipped W8A8 model (reloaded from its file) and its integer graph score alike
    assert abs(trial["val_acc_onnx"] - trial["val_acc"]) <= 1.5 / 360
    assert trial["onnx_max_abs_diff"] > 0  # (integer kernels: not the float graph's 1e-6)


def test_convolutions_slow_in_int8_keep_float_activations():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.image = nn.Conv2d(3, 8, 3)  # (3 input channels: slow in ORT's int8 conv)
            self.depthwise = nn.Conv2d(32, 32, 3, groups=32)
            self.narrow = nn.Conv2d(16, 16, 3, groups=16)  # (depthwise, slow in int8 at 16)
            self.grouped = nn.Conv2d(8, 8, 1, groups=4)  # (2 input channels per group)
            self.wide = nn.Conv2d(8, 8, 1)
            self.odd = nn.Conv1d(5, 8, 1)
            self.head = nn.Linear(8, 2)

    found = act.quantizable(Net())
    assert set(found) == {"depthwise", "wide", "odd", "head"}
    assert set(act.quantizable(Net(), every=True)) == set(found) | {"image", "grouped", "narrow"}


def _encoder_w8a8(task: Task) -> nn.Module:
    """The zoo's untrained TransformerEncoder quantized to W8A8 (calibrated, not fine-tuned)."""
    torch.manual_seed(0)
    ctx = CompressionContext(train=task.train, example_inputs=task.example_inputs(8), seed=0)
    quant = get_compressor("quant")(bits=8, activations=8)
    return apply_pipeline([quant], task.build_model().eval(), ctx).eval()


def test_the_encoders_projections_are_quantized_in_inference_too():
    from tests.zoo import tasks

    task = tasks.zoo_transformer(seed=0)
    model = _encoder_w8a8(task)
    layers = [
        f"encoder.layers.{i}.{n}" for i in (0, 1) for n in ("self_attn", "linear1", "linear2")
    ]
    assert set(act.ranges(model)) == {"embed", "head", *layers}  # (not self_attn.out_proj)
    x = task.val.x[:16]
    with torch.no_grad():  # (eval without grad: where torch's encoder takes its fast path)
        before = model(x)
        for name in ("encoder.layers.0.linear2", "encoder.layers.1.self_attn"):
            quant = model.get_submodule(name).act_in
            grid = quant.params
            quant.set(grid[0] * 64, grid[1])  # a coarse grid moves the outputs: it is applied
            assert not torch.allclose(model(x), before, atol=1e-3), name
            quant.set(*grid)
        assert torch.equal(model(x), before)


@pytest.mark.slow  # (an export: ~5 s)
def test_the_encoders_projections_run_integer_kernels_the_rest_float_weights(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from compressors.onnx_export import check_onnx, export_onnx
    from tests.zoo import tasks

    task = tasks.zoo_transformer(seed=0)
    model = _encoder_w8a8(task)
    save_packed(model, tmp_path / "encoder.sqz")
    shipped = task.build_model()
    export_onnx(tmp_path / "encoder.sqz", shipped, task.example_inputs(8), tmp_path / "e.onnx")
    assert act.ranges(shipped) == act.ranges(model)
    optimized = optimized_graph(tmp_path / "e.onnx")
    ops = Counter(n.op_type for n in optimized.node)
    # embed, head, and per encoder layer the packed projection (as the queries', keys' and
    # values' three, `compressors._onnx_attention`), linear1 and linear2 on integer kernels,
    # each reading its weight's int8 codes
    assert ops["MatMulIntegerToFloat"] + ops["QGemm"] + ops["QLinearMatMul"] == 12
    integer = {"MatMulIntegerToFloat", "QGemm", "QLinearMatMul", "MatMulInteger"}
    weights = {i for n in optimized.node if n.op_type in integer for i in n.input}
    for i in (0, 1):
        for layer in ("linear1.weight", "linear2.weight", "self_attn.in_proj_weight"):
            assert any(w.startswith(f"encoder.layers.{i}.{layer}") for w in weights), (
                layer,
                sorted(weights),
            )
    # the attention's out_proj (no grid: torch's functional attention reads it) on a float Gemm
    # with its float weight, not dequantized at every call (MatMulNBits: 2-3x slower here)
    assert ops["Gemm"] == 2
    assert ops["MatMulNBits"] == ops["DequantizeLinear"] == 0
    # the attention on (batch, tokens, width) tensors (`compressors._onnx_attention`): no
    # transposes of the activations, every head's scores in one MatMul per layer (the keys'
    # transpose fused into it), and no SkipLayerNormalization (slower than Add + LayerNorm)
    assert ops["Transpose"] == ops["Split"] == ops["Mul"] == 0
    assert ops["Softmax"] == 2 and ops["FusedMatMul"] == 2
    assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] == 5
    # every projection a QGemm on rows with its bias inside (`compressors._onnx_rows`): the
    # Adds left are the position embedding and the residual sums; linear1's QGemm writes
    # linear2's uint8 codes (its ReLU and QuantizeLinear fused away)
    assert ops["QGemm"] == 12 and ops["MatMulIntegerToFloat"] == 0
    assert ops["Add"] == 5 and ops["Relu"] == 0 and ops["QuantizeLinear"] == 6
    check = check_onnx(tmp_path / "e.onnx", shipped, task.val.x)
    assert check.agree, check.message
    labels = task.val.y
    onnx_acc = float((check.outputs.argmax(1) == labels).float().mean())
    assert abs(onnx_acc - evaluate(shipped, task.val)) <= 1.5 / len(labels)  # one sample at most


@pytest.mark.slow  # (an export: ~5 s)
def test_an_attention_the_rewrite_does_not_know_keeps_its_exported_form(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from compressors._onnx_attention import attention_heads
    from compressors.onnx_export import check_onnx, export_onnx
    from tests.zoo import tasks

    class Masked(nn.Module):  # (a padding mask computed from the input: read by the attention)
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(8, 16)
            layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            padding = x.sum(-1) < -1.0  # (no row of digits: no token is masked)
            hidden = self.encoder(self.embed(x), src_key_padding_mask=padding)
            return self.head(hidden.mean(dim=1))

    task = tasks.zoo_transformer(seed=0)
    torch.manual_seed(0)
    ctx = CompressionContext(train=task.train, example_inputs=task.example_inputs(8), seed=0)
    quant = get_compressor("quant")(bits=8, activations=8)
    model = apply_pipeline([quant], Masked().eval(), ctx).eval()
    assert "encoder.layers.0.self_attn" in act.ranges(model)
    assert attention_heads(model) == {"encoder.layers.0.self_attn": 2}
    save_packed(model, tmp_path / "masked.sqz")
    shipped = Masked()
    export_onnx(tmp_path / "masked.sqz", shipped, task.example_inputs(8), tmp_path / "m.onnx")
    ops = optimized_ops(tmp_path / "m.onnx")
    assert ops["Transpose"] > 0  # (the exported per-head form, the mask in it)
    assert ops["QGemm"] + ops["MatMulIntegerToFloat"] == 5  # (embed, in_proj, FFN, head)
    check = check_onnx(tmp_path / "m.onnx", shipped, task.val.x)
    assert check.agree, check.message


def _pooled_graph(*, residual: bool):
    """A graph of the shape W8A8 exports end with: a dequantized tensor (or the ReLU of the
    sum of two), the spatial mean, a reshape and the head's input grid."""
    from onnx import TensorProto, helper, numpy_helper

    def grid(name, scale, zero):
        return [
            numpy_helper.from_array(np.array(scale, np.float32), f"{name}_scale"),
            numpy_helper.from_array(np.array(zero, np.uint8), f"{name}_zero"),
        ]

    def qdq(x, name):
        names = [f"{name}_scale", f"{name}_zero"]
        return [
            helper.make_node("QuantizeLinear", [x, *names], [f"{name}_q"]),
            helper.make_node("DequantizeLinear", [f"{name}_q", *names], [f"{name}_dq"]),
        ]

    inits = [*grid("a", 0.05, 128), *grid("b", 0.03, 10), *grid("head", 0.02, 0)]
    inits += [
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
        numpy_helper.from_array(np.array([0, -1], np.int64), "shape"),
    ]
    nodes = qdq("a", "a")
    if residual:
        nodes += [*qdq("b", "b"), helper.make_node("Add", ["a_dq", "b_dq"], ["sum"])]
        nodes.append(helper.make_node("Relu", ["sum"], ["pooled_in"]))
    nodes += [
        helper.make_node("ReduceMean", ["pooled_in" if residual else "a_dq", "axes"], ["mean"]),
        helper.make_node("Reshape", ["mean", "shape"], ["flat"]),
        *qdq("flat", "head"),
    ]
    value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4, 3, 3]) for n in "ab"]
    graph = helper.make_graph(
        nodes,
        "pooled",
        value[: 2 if residual else 1],
        [helper.make_tensor_value_info("head_dq", TensorProto.FLOAT, [2, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("residual", [False, True])
def test_a_pooled_tail_runs_integer_kernels_into_the_head(tmp_path, residual):
    onnxruntime = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from compressors._onnx_pool import integer_pools

    proto = _pooled_graph(residual=residual)
    onnx.save(proto, tmp_path / "exported.onnx")
    assert integer_pools(proto) == 1
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["GlobalAveragePool"] == 1 and ops["ReduceMean"] == 0
    # a dequantized input keeps its grid; a ReLU-ed sum gets one from 0 to the sum of the
    # two grids' largest values
    assert ops["QuantizeLinear"] == (4 if residual else 2)
    onnx.save(proto, tmp_path / "pooled.onnx")
    fused = optimized_ops(tmp_path / "pooled.onnx", "ORT_ENABLE_EXTENDED")
    assert fused["QLinearGlobalAveragePool"] == 1 and fused["QLinearAdd"] == int(residual)
    assert fused["Relu"] == fused["Add"] == fused["ReduceMean"] == 0
    rng = np.random.default_rng(0)
    feeds = {n: rng.normal(0, 3, (2, 4, 3, 3)).astype(np.float32) for n in "ab"}
    feeds = {i.name: feeds[i.name] for i in proto.graph.input}
    plain = onnxruntime.SessionOptions()
    plain.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    before, after = (
        onnxruntime.InferenceSession(str(tmp_path / name), plain).run(None, feeds)[0]
        for name in ("exported.onnx", "pooled.onnx")
    )
    # the same values, up to a step of the head's grid (the sum rounded once more: half of
    # one of its steps, (0.05 * 127 + 0.03 * 245) / 255 / 2, averaged, then rounded again)
    assert np.abs(after - before).max() <= (0.02 * 1.001 if residual else 1e-6)


def test_weights_read_by_integer_kernels_take_7_bits_the_float_ones_8():
    from compressors.packing import plain_state

    task = _cnn_task()
    ctx = CompressionContext(train=task.train, example_inputs=task.example_inputs(8), seed=0)
    qmax = {}
    for activations in ("float", 8):
        quant = get_compressor("quant")(bits=8, activations=activations)
        model = apply_pipeline([quant], copy.deepcopy(_trained()), ctx)
        state, grids = plain_state(model)
        qmax[activations] = {name: grids[name].qmax for name in grids}
        codes = (state["features.2.weight"] / grids["features.2.weight"].scale).round()
        assert codes.abs().max() <= qmax[activations]["features.2.weight"]
    assert set(qmax["float"].values()) == {127}
    # the 1-channel first conv runs ORT's float kernel: 8 bits; the integer ones 7 (u8 x s8
    # pairs summed in int16 on x86 without VNNI: 255 * 127 * 2 overflows, 255 * 64 * 2 not)
    assert qmax[8] == {
        "features.0.weight": 127,
        "features.2.weight": 63,
        "features.4.weight": 63,
        "head.weight": 63,
    }


def test_the_integer_graph_computes_what_the_qdq_graph_says_on_any_x86_cpu(tmp_path):
    """Inputs at the top of their grid times weights at the top of theirs: each pair of
    products ONNX Runtime's AVX2 uint8 x int8 kernel adds in int16 overflowed it with 8-bit
    weights (outputs off by a third of their size on an AVX2 CPU); on 7-bit ones the integer
    kernels give the float evaluation of the same QDQ graph."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from compressors.onnx_export import export_onnx

    torch.manual_seed(0)
    x = torch.rand(256, 64)
    split = Split(x, torch.randint(0, 4, (256,)))
    baseline = nn.Sequential(nn.Linear(64, 4))
    with torch.no_grad():
        baseline[0].weight.copy_(1.0 + 0.01 * torch.randn(4, 64))  # all near the grid's top
    ctx = CompressionContext(train=split, example_inputs=x[:8], seed=0)
    model = apply_pipeline([get_compressor("quant")(bits=8, activations=8)], baseline, ctx)
    path = tmp_path / "m.sqz"
    save_packed(model.eval(), path)
    graph = tmp_path / "m.onnx"
    export_onnx(path, nn.Sequential(nn.Linear(64, 4)), x[:8], graph)

    def run(level) -> np.ndarray:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = level
        session = onnxruntime.InferenceSession(str(graph), options)
        return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]

    levels = onnxruntime.GraphOptimizationLevel
    float_qdq, integer = run(levels.ORT_DISABLE_ALL), run(levels.ORT_ENABLE_ALL)
    assert np.abs(integer - float_qdq).max() <= 1e-4 * np.abs(float_qdq).max()
    with torch.no_grad():
        torch_out = model(x).numpy()
    assert np.abs(integer - torch_out).max() <= 1e-3 * np.abs(torch_out).max()

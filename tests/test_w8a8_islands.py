"""W8A8's narrow depthwise convolutions: float after a float layer, integer between integer ones
(`compressors._act_islands`), so that a pruned MobileNet has no float island mid-network."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressors import CompressionContext, apply_pipeline, get_compressor, save_packed
from compressors import _act_quant as act
from compressors._act_islands import integer_layers, narrow_depthwise
from compressors.quant import INTEGER_KERNEL_BITS
from experiments import Split
from tests.onnx_graphs import optimized_ops
from tests.zoo.models import MobileNet

pytestmark = pytest.mark.usefixtures("one_thread")


def _w8a8(model: nn.Module, x: torch.Tensor) -> nn.Module:
    split = Split(x, torch.randint(0, 10, (len(x),)))
    ctx = CompressionContext(train=split, example_inputs=x[:8], seed=0)
    quant = get_compressor("quant")(bits=8, activations=8)
    return apply_pipeline([quant], model.eval(), ctx).eval()


def test_a_narrow_depthwise_conv_between_integer_convs_gets_grids():
    torch.manual_seed(0)
    # stem 1 -> 16 (float: 1 input channel), depthwise 16 (after the float stem: float),
    # pointwise 16 -> 16 (int8), depthwise 16 stride 2 (fed by the int8 pointwise conv: int8),
    # pointwise 16 -> 16 (int8), head
    model = _w8a8(MobileNet(1, 10, widths=(16, 16, 16)), torch.rand(96, 1, 8, 8))
    grids = act.ranges(model)
    assert set(grids) == {"features.6", "features.9", "features.12", "head"}
    assert not act.int8_friendly(model.features[9])  # (alone it would stay float)
    # its input grid is the pointwise conv's output grid (one QLinearConv feeds the next), its
    # output grid the next conv's input grid, after its BatchNorm
    assert grids["features.9"]["in"] == grids["features.6"]["out"]
    assert grids["features.9"]["out"] == grids["features.12"]["in"]
    assert grids["features.9"]["after"] == "features.10"
    # its weights on the integer kernels' grid, as every integer layer's
    weight = model.features[9].parametrizations.weight[0]
    assert weight.qmax == 2 ** (INTEGER_KERNEL_BITS - 1) - 1
    assert model.features[3].parametrizations.weight[0].qmax == 127  # (float: 8 bits)


def test_a_narrow_depthwise_conv_reading_float_stays_float():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # (reads the input)
            self.second = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # (reads `first`: float)
            self.wide = nn.Conv2d(16, 16, 1)
            self.third = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # (reads a function's out)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            y = self.wide(torch.relu(self.second(self.first(x))))
            return self.head(self.third(torch.tanh(y)).mean((2, 3)))

    torch.manual_seed(0)
    x = torch.rand(32, 16, 4, 4)
    model = Net().eval()
    assert all(narrow_depthwise(m) for m in (model.first, model.second, model.third))
    batch = Split(x, torch.zeros(len(x), dtype=torch.long))
    found = integer_layers(model, next(iter(batch.calibration(samples=32, batch_size=32))), _call)
    assert set(found) == {"wide", "head"} == set(act.quantizable(model))


def test_a_chain_of_narrow_depthwise_convs_follows_its_first():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(16, 16, 1),  # (int8)
        nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.Flatten(),
        nn.Linear(16 * 16, 4),
    ).eval()
    x = torch.rand(32, 16, 4, 4)
    batch = next(iter(Split(x, x[:, 0, 0, 0].long()).calibration(samples=32, batch_size=32)))
    assert set(integer_layers(model, batch, _call)) == {"0", "2", "5", "7"}


def _call(model, inputs):
    return model(inputs)


@pytest.mark.slow  # (an export: ~5 s)
def test_a_pruned_mobilenet_runs_integer_kernels_from_its_first_pointwise_conv(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from compressors.onnx_export import check_onnx, export_onnx
    from tests.zoo import tasks

    task = tasks.zoo_mobilenet(seed=0, widths=(16, 16, 16))  # (widths of structured 0.8)
    torch.manual_seed(0)
    ctx = CompressionContext(train=task.train, example_inputs=task.example_inputs(8), seed=0)
    quant = get_compressor("quant")(bits=8, activations=8)
    model = apply_pipeline([quant], task.build_model().eval(), ctx).eval()
    grids = act.ranges(model)
    path = tmp_path / "mobilenet.sqz"
    save_packed(model, path)
    shipped = task.build_model()
    export_onnx(path, shipped, task.example_inputs(8), tmp_path / "mobilenet.onnx")
    assert act.ranges(shipped) == grids  # (the file's grids, the stride-2 depthwise conv's too)
    ops = optimized_ops(tmp_path / "mobilenet.onnx", "ORT_ENABLE_EXTENDED")
    # the float stem and first depthwise conv, one QuantizeLinear, then integer kernels only
    # (before: a DequantizeLinear, Clip, float Conv and a second QuantizeLinear around the
    # stride-2 depthwise conv)
    assert ops["QLinearConv"] == 3 and ops["FusedConv"] + ops["Conv"] == 2
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 0 and ops["Clip"] == 0
    check = check_onnx(tmp_path / "mobilenet.onnx", shipped, task.val.x)
    assert check.agree and check.max_rel_diff < 5e-3, check.message

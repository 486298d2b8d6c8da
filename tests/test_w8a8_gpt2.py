"""GPT-2's layers (Hugging Face's ``Conv1D``: a Linear with its weight stored transposed,
`compressors._targets.is_transposed_linear`) in ONNX: their weights written as the packed
file's codes with a ``DequantizeLinear`` (scales per output column), and with
``quant.activations=8`` on calibrated input grids, run by ONNX Runtime's integer kernels.

A small GPT2LMHeadModel (2 layers, 32 wide, its key/value cache on) scored per position
(`tests.zoo.workloads.wl_tokens`), trained one short epoch."""

from __future__ import annotations

import copy
import functools
import importlib.util
from collections import Counter

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from compressors import (  # noqa: E402
    CompressionContext,
    apply_pipeline,
    finalize_pipeline,
    get_compressor,
    load_packed,
    save_packed,
)
from compressors import _act_quant as act  # noqa: E402
from compressors._targets import is_transposed_linear, targets  # noqa: E402
from experiments import evaluate, fit  # noqa: E402
from tests.onnx_graphs import optimized_graph  # noqa: E402
from tests.zoo.workloads import wl_tokens  # noqa: E402

#: transformers is looked up, not imported, when the module is collected (on every
#: ``pytest -n`` worker): the worker that runs these tests imports it.
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        importlib.util.find_spec("transformers") is None, reason="needs transformers"
    ),
]

#: ONNX's integer tensor types the export writes codes as (INT4, INT8, UINT8).
CODES = {onnx.TensorProto.INT4, onnx.TensorProto.INT8, onnx.TensorProto.UINT8}


@functools.cache
def _trained():
    task = wl_tokens()
    torch.manual_seed(0)
    model = task.build_model()
    fit(model, task.train, epochs=1, batch_size=32, lr=3e-3, seed=0)
    return task, model.eval()


def _conv1d(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    found = {n: m for n, m in model.named_modules() if is_transposed_linear(m)}
    assert len(found) == 8  # (c_attn, attn's c_proj, c_fc, mlp's c_proj per layer)
    return found


def _deploy(tmp_path, **quant):
    from search.run.deploy import deploy_onnx

    task, baseline = _trained()
    compressor = get_compressor("quant")(**quant)
    ctx = CompressionContext(train=task.train, example_inputs=task.example_inputs(4), seed=0)
    model = apply_pipeline([compressor], copy.deepcopy(baseline), ctx)
    model = finalize_pipeline([compressor], model, ctx).eval()
    save_packed(model, tmp_path / "m.sqz", like=baseline)
    deployed = deploy_onnx(tmp_path / "m.sqz", task, tmp_path / "m.onnx", threads=1)
    assert deployed.check.agree, deployed.check.message
    shipped = load_packed(tmp_path / "m.sqz", task.build_model(), int8=False).eval()
    # the task's score in ONNX Runtime is the torch model's
    assert deployed.metrics["val_acc_onnx"] == pytest.approx(evaluate(shipped, task.val))
    return task, model, shipped, deployed


def test_a_transposed_linears_grid_has_a_scale_per_output_column():
    task, baseline = _trained()
    model = copy.deepcopy(baseline)
    ctx = CompressionContext(example_inputs=task.example_inputs(4), seed=0)
    get_compressor("quant")(bits=4).compress(model, ctx)
    found = targets(model)
    layer = model.transformer.h[0].mlp.c_fc  # weight (32 inputs, 128 outputs)
    target = found["transformer.h.0.mlp.c_fc.weight"]
    assert target.channel_axis == 1 and found["transformer.wte.weight"].channel_axis == 0
    grid = layer.parametrizations.weight[0]
    assert tuple(grid.scale.shape) == (1, 128)
    codes = grid.packed(layer.weight)
    assert torch.equal(codes.codes.float() * grid.scale, layer.weight)


@pytest.mark.slow  # (an export: ~10 s)
@pytest.mark.parametrize("bits", [4, 8])
def test_gpt2s_transposed_linears_are_exported_as_their_codes(bits, tmp_path):
    task, model, shipped, deployed = _deploy(tmp_path, bits=bits)
    graph = onnx.load(deployed.path).graph
    inits = {i.name: i for i in graph.initializer}
    readers = {i: n for n in graph.node for i in n.input}
    for name, layer in _conv1d(shipped).items():
        nx, nf = layer.nx, layer.nf
        codes = inits[f"{name}.weight_quantized"]
        assert codes.data_type in CODES and list(codes.dims) == [nx, nf], name
        dq = readers[codes.name]
        assert dq.op_type == "DequantizeLinear"
        axis = {a.name: a.i for a in dq.attribute}.get("axis", 1)
        scale = onnx.numpy_helper.to_array(inits[dq.input[1]])
        assert axis == 1 and scale.shape == (nf,), name  # (per output column)
    assert not _float_weights(graph, _conv1d(shipped))


@pytest.mark.slow  # (a calibration and an export: ~15 s)
def test_gpt2s_transposed_linears_run_integer_kernels_with_activations_8(tmp_path):
    task, model, shipped, deployed = _deploy(tmp_path, bits=8, activations=8, calibration="mse")
    layers = _conv1d(shipped)
    assert set(layers) <= set(act.ranges(shipped)) and act.ranges(shipped) == act.ranges(model)
    optimized = optimized_graph(deployed.path)
    ops = Counter(n.op_type for n in optimized.node)
    # every Conv1D a QGemm (their Gemm on rows) and the tied lm_head MatMulIntegerToFloat;
    # no float Gemm, no weight dequantized at every call
    assert ops["QGemm"] + ops["MatMulIntegerToFloat"] == len(layers) + 1, ops
    assert ops["Gemm"] == 0 and ops["MatMulNBits"] == 0, ops
    integer = {"MatMulIntegerToFloat", "QGemm", "QLinearMatMul", "MatMulInteger"}
    weights = {i for n in optimized.node if n.op_type in integer for i in n.input}
    for name in layers:
        assert any(w.startswith(f"{name}.weight") for w in weights), (name, sorted(weights))
    assert not _float_weights(onnx.load(deployed.path).graph, layers)


def _float_weights(graph, layers: dict[str, torch.nn.Module]) -> list[str]:
    """The float32 initializers of the size of a layer's weight."""
    sizes = {m.nx * m.nf for m in layers.values()}
    floats = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    return [i.name for i in floats if int(np.prod(i.dims)) in sizes]

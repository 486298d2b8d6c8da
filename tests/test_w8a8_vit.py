"""W8A8 graphs of Hugging Face ViT image classifiers (`compressors._onnx_bert`): each layer's
unmasked self-attention as ONNX Runtime's ``QAttention`` without a mask, no float attention
left; outputs and the validation score as the torch model's.

The user's configuration of issue 24 (digits as 1 x 8 x 8 ``pixel_values`` dict batches, patches
of 2 x 2 pixels: 16 patches and the class token, 64 wide, 2 layers of 4 heads), trained one
short epoch, `mse` calibration; and the same with ``qkv_bias=False`` (projections without
biases)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections import Counter
from functools import partial

import pytest
import torch

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from compressors._onnx_bert import bert_attention  # noqa: E402
from experiments import evaluate, fit, predict_outputs  # noqa: E402
from tests.zoo.hf import deploy_w8a8, hf_task, vit  # noqa: E402

#: transformers is looked up, not imported, when the module is collected (on every
#: ``pytest -n`` worker): the worker that runs these tests imports it.
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        importlib.util.find_spec("transformers") is None, reason="needs transformers"
    ),
]

LAYERS = 2


@functools.cache
def _task(qkv_bias: bool = True):
    task = hf_task("vit", samples=256, size=8)
    build = partial(
        vit, size=8, channels=1, hidden=64, heads=4, patch=2, layers=LAYERS, qkv_bias=qkv_bias
    )
    return dataclasses.replace(task, build_model=build)


@functools.cache
def _trained(qkv_bias: bool = True) -> torch.nn.Module:
    task = _task(qkv_bias)
    torch.manual_seed(0)
    model = task.build_model()
    fit(model, task.train, epochs=1, batch_size=32, lr=2e-3, loss_fn=task.loss, seed=0)
    return model.eval()


def _deployed(tmp_path, attention: str = "sdpa", *, qkv_bias: bool = True):
    """The W8A8 model deployed (`tests.zoo.hf.deploy_w8a8`)."""
    return deploy_w8a8(_task(qkv_bias), _trained(qkv_bias), tmp_path, attention)


def test_vit_attention_names_the_projections_and_heads():
    found = bert_attention(_task().build_model())
    assert found == {
        f"vit.layers.{i}.attention": (
            tuple(f"vit.layers.{i}.attention.{p}" for p in ("q_proj", "k_proj", "v_proj")),
            4,
        )
        for i in range(LAYERS)
    }


@pytest.mark.slow  # (trains and exports a ViT: 10-20 s)
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_vit_attention_runs_as_qattention_without_a_mask(tmp_path, qkv_bias):
    task, deployed, shipped, optimized = _deployed(tmp_path, qkv_bias=qkv_bias)
    ops = Counter(n.op_type for n in optimized.node)
    # per layer: q, k, v and the attention in one QAttention reading no mask (ViT's attention
    # has none: transformers' all-true mask is dropped); the output projection and the MLP's
    # two Linears on integer kernels with their biases inside
    assert ops["QAttention"] == LAYERS, dict(ops)
    qattention = [n for n in optimized.node if n.op_type == "QAttention"]
    assert all(len(n.input) >= 8 and not n.input[5] for n in qattention)
    # (without biases, qkv_bias=False: QAttention's bias, which it requires, is zeros)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in optimized.initializer}
    assert all(inits[n.input[2]].shape == (3 * 64,) for n in qattention)
    assert all(inits[n.input[2]].any() == qkv_bias for n in qattention)
    assert ops["MatMulIntegerToFloat"] == 3 * LAYERS, dict(ops)
    # no float attention left: its transposes, products, softmax, NaN guard, mask
    for op in ("Softmax", "Transpose", "FusedMatMul", "MatMul", "IsNaN", "Where", "Slice"):
        # (one Transpose is the patch embedding's: the Conv's channels to the token axis)
        assert ops[op] == (1 if op == "Transpose" else 0), (op, dict(ops))
    # outputs: the torch model's (its fake quantization) within the check's tolerance and to a
    # cosine of 0.995 on every image (as the BERT graph's), and the same validation score
    assert deployed.check.agree, deployed.check.message
    expected = predict_outputs(shipped, task.val)
    cosine = torch.nn.functional.cosine_similarity(deployed.check.outputs, expected)
    assert cosine.min() > 0.995, cosine.min()
    assert deployed.metrics["val_acc_onnx"] == evaluate(shipped, task.val)


@pytest.mark.slow  # (trains and exports a ViT: 10-20 s)
def test_vit_eager_attention_is_rewritten_too(tmp_path):
    task, deployed, shipped, optimized = _deployed(tmp_path, attention="eager")
    ops = Counter(n.op_type for n in optimized.node)
    assert ops["QAttention"] == LAYERS and ops["Softmax"] == 0, dict(ops)
    assert deployed.check.agree, deployed.check.message
    assert deployed.metrics["val_acc_onnx"] == evaluate(shipped, task.val)


def _scores(mask: str | None, *, extra: str | None = None):
    """A region of scores as the exporter writes it (products, scale, the mask's ``Add`` of
    ``Where(condition, 0, -big)``, softmax, NaN guard, product with the values): ``mask`` names
    the condition's form, None for no ``Add``; ``extra``: another term on the scores."""
    import numpy as np
    from onnx import helper, numpy_helper

    from compressors._onnx_graph import graph_index

    constants = {
        "scale": np.array(0.25, np.float32),
        "zero": np.array(0.0, np.float32),
        "big": np.array(-3.4e38, np.float32),
        "shape": np.array([3, 1, 5, 5], np.int64),
        "all_true": np.ones((1, 1, 5, 1), np.bool_),
        "some_false": np.array([[[[True], [False], [True], [True], [True]]]]),
        "bias": np.ones((5, 5), np.float32),
    }
    region = [
        helper.make_node("MatMul", ["q", "k"], ["products"]),
        helper.make_node("Mul", ["products", "scale"], ["scaled"]),
    ]
    outside = []
    scores = "scaled"
    if extra == "bias":
        region.append(helper.make_node("Add", [scores, "bias"], ["biased"]))
        scores = "biased"
    if extra == "filled":  # (masked_fill's form: Where(mask, scores, -big))
        region.append(helper.make_node("Where", ["mask", scores, "big"], ["filled"]))
        scores = "filled"
    if mask is not None:
        condition = "mask" if mask == "input" else "expanded"
        if mask != "input":
            outside.append(helper.make_node("Expand", [mask, "shape"], ["expanded"]))
        outside.append(helper.make_node("Where", [condition, "zero", "big"], ["additive"]))
        region.append(helper.make_node("Add", [scores, "additive"], ["masked"]))
        scores = "masked"
    region += [
        helper.make_node("Softmax", [scores], ["p"], axis=-1),
        helper.make_node("IsNaN", ["p"], ["nan"]),
        helper.make_node("Where", ["nan", "zero", "p"], ["guarded"]),
        helper.make_node("MatMul", ["guarded", "v"], ["out"]),
    ]
    graph = helper.make_graph(
        outside + region,
        "scores",
        [],
        [],
        [numpy_helper.from_array(v, k) for k, v in constants.items()],
    )
    inits, makers, _ = graph_index(graph)
    nodes = [n for n in graph.node if n.output[0] in {o for r in region for o in r.output}]
    made = {o for n in nodes for o in n.output}
    return nodes, made, makers, inits


@pytest.mark.parametrize(
    ("mask", "extra", "expected"),
    [
        (None, None, ""),  # the scaled products straight into the softmax: no mask
        ("all_true", None, ""),  # transformers' all-true mask (ViT): no mask
        ("input", None, "mask"),  # a mask from the inputs (BERT's padding): the layer's own
        ("some_false", None, None),  # a constant mask dropping scores: kept as exported
        (None, "bias", None),  # another term on the scores: kept as exported
        ("all_true", "bias", None),
        (None, "filled", None),  # a mask of another form: kept as exported
    ],
)
def test_the_mask_is_read_from_the_scores_form(mask, extra, expected):
    from compressors._onnx_bert import _mask_condition

    assert _mask_condition(*_scores(mask, extra=extra)) == expected

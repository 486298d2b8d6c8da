"""W8A8 graphs of Hugging Face ViT image classifiers (`compressors._onnx_bert`): each layer's
unmasked self-attention as ONNX Runtime's ``QAttention`` without a mask, no float attention
left; outputs and the validation score as the torch model's.

The user's configuration of issue 24 (digits as 1 x 8 x 8 ``pixel_values`` dict batches, patches
of 2 x 2 pixels: 16 patches and the class token, 64 wide, 2 layers of 4 heads), trained one
short epoch, `mse` calibration."""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections import Counter
from functools import partial

import pytest
import torch

pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from compressors import (  # noqa: E402
    CompressionContext,
    apply_pipeline,
    get_compressor,
    load_packed,
    save_packed,
)
from compressors._onnx_bert import bert_attention  # noqa: E402
from experiments import evaluate, fit, predict_outputs  # noqa: E402
from tests.zoo.hf import hf_task, vit  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 2


@functools.cache
def _task():
    task = hf_task("vit", samples=256, size=8)
    build = partial(vit, size=8, channels=1, hidden=64, heads=4, patch=2, layers=LAYERS)
    return dataclasses.replace(task, build_model=build)


@functools.cache
def _trained() -> torch.nn.Module:
    task = _task()
    torch.manual_seed(0)
    model = task.build_model()
    fit(model, task.train, epochs=1, batch_size=32, lr=2e-3, loss_fn=task.loss, seed=0)
    return model.eval()


def _deployed(tmp_path, attention: str = "sdpa"):
    """The W8A8 model (8-bit weights, `mse` calibration) deployed as `search.run.deploy`
    deploys it; its torch reload; the graph's nodes after ONNX Runtime's optimisation."""
    from search.run.deploy import deploy_onnx

    task = _task()
    if attention != "sdpa":
        build = task.build_model

        def eager():
            model = build()
            model.config._attn_implementation = attention
            return model

        task = dataclasses.replace(task, build_model=eager)
    base = copy.deepcopy(_trained())
    base.config._attn_implementation = attention
    ctx = CompressionContext(train=task.train, example_inputs=task.example_inputs(8), seed=0)
    quant = get_compressor("quant")(bits=8, activations=8, calibration="mse")
    model = apply_pipeline([quant], base, ctx).eval()
    packed = tmp_path / "w8a8.sqz"
    save_packed(model, packed, like=_trained())
    deployed = deploy_onnx(packed, task, tmp_path / "w8a8.onnx", threads=1)
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    onnxruntime.InferenceSession(str(deployed.path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath).graph
    shipped = load_packed(packed, task.build_model(), int8=False).eval()
    return task, deployed, shipped, optimized


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
def test_vit_attention_runs_as_qattention_without_a_mask(tmp_path):
    task, deployed, shipped, optimized = _deployed(tmp_path)
    ops = Counter(n.op_type for n in optimized.node)
    # per layer: q, k, v and the attention in one QAttention reading no mask (ViT's attention
    # has none: transformers' all-true mask is dropped); the output projection and the MLP's
    # two Linears on integer kernels with their biases inside
    assert ops["QAttention"] == LAYERS, dict(ops)
    qattention = [n for n in optimized.node if n.op_type == "QAttention"]
    assert all(len(n.input) >= 8 and not n.input[5] for n in qattention)
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

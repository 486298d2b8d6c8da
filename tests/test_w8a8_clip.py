"""W8A8 graphs of Hugging Face CLIP encoders (`compressors._onnx_bert`): each layer's
self-attention (``CLIPAttention``: ``q_proj``, ``k_proj``, ``v_proj``, ``num_heads`` heads) as
ONNX Runtime's ``QAttention``, no float attention left; outputs and the validation score as the
torch model's.

Random-init encoders 64 wide, 2 layers of 4 heads: the vision tower of
``CLIPForImageClassification`` on 1 x 8 x 8 digits (2 x 2 patches: 17 tokens, no mask), and
``CLIPTextModel`` under a Linear head on its tokens' mean state, on digits' pixels as tokens padded
after 32 to 64 tokens (`tests.zoo.hf.PaddedTokens`): its mask is causal and drops the padding,
one ``(batch, tokens, tokens)`` mask for ``QAttention``. Each trained one short epoch, `mse`
calibration."""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
from collections import Counter

import pytest
import torch
from torch import nn

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
from tests.zoo.hf import ClipText, clip_vision, deploy_w8a8, hf_task, padded  # noqa: E402

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
def _task(tower: str):
    if tower == "vision":
        return dataclasses.replace(hf_task("vit", samples=256, size=8), build_model=clip_vision)
    return padded(dataclasses.replace(hf_task("bert"), build_model=ClipText), samples=256)


@functools.cache
def _trained(tower: str) -> nn.Module:
    task = _task(tower)
    torch.manual_seed(0)
    model = task.build_model()
    fit(model, task.train, epochs=1, batch_size=32, lr=2e-3, loss_fn=task.loss, seed=0)
    return model.eval()


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_clip_attention_names_the_projections_and_heads(tower):
    prefix = "vision_model" if tower == "vision" else "text"
    found = bert_attention(_task(tower).build_model())
    assert found == {
        f"{prefix}.encoder.layers.{i}.self_attn": (
            tuple(
                f"{prefix}.encoder.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")
            ),
            4,
        )
        for i in range(LAYERS)
    }


@pytest.mark.slow  # (trains and exports a CLIP tower: 10-20 s)
@pytest.mark.parametrize("tower", ["vision", "text"])
def test_clip_attention_runs_as_qattention(tower, tmp_path):
    task, deployed, shipped, optimized = deploy_w8a8(_task(tower), _trained(tower), tmp_path)
    ops = Counter(n.op_type for n in optimized.node)
    # per layer: q, k, v and the attention in one QAttention (the text tower's reading its
    # causal padding mask, the vision tower's none); out_proj and the MLP on integer kernels
    assert ops["QAttention"] == LAYERS, dict(ops)
    assert ops["MatMulIntegerToFloat"] == 3 * LAYERS, dict(ops)
    masks = {n.input[5] for n in optimized.node if n.op_type == "QAttention"}
    assert len(masks) == 1 and bool(masks.pop()) == (tower == "text")
    for op in ("Softmax", "FusedMatMul", "MatMul", "IsNaN", "Where"):
        assert ops[op] == 0, (op, dict(ops))
    # outputs: the torch model's within the check's tolerance, to a cosine of 0.995 on every
    # sample, and the same validation score
    assert deployed.check.agree, deployed.check.message
    expected = predict_outputs(shipped, task.val)
    cosine = torch.nn.functional.cosine_similarity(deployed.check.outputs, expected)
    assert cosine.min() > 0.995, cosine.min()
    assert deployed.metrics["val_acc_onnx"] == evaluate(shipped, task.val)


@pytest.mark.slow  # (trains and exports a CLIP tower: 10-20 s)
def test_an_attention_kept_as_exported_exports_with_its_grid_before_its_first_reader(
    tmp_path, monkeypatch
):
    # CLIPAttention defines k_proj before q_proj and calls q_proj first: the q, k, v
    # projections' one input grid, written before k_proj's MatMul, came after q_proj's (an
    # unsorted graph, refused by ONNX's checker) wherever the attention was not rewritten
    from compressors import onnx_export
    from search.run.deploy import deploy_onnx

    monkeypatch.setattr(onnx_export, "bert_attention", lambda model: {})
    task = _task("vision")
    ctx = CompressionContext(train=task.train, example_inputs=task.example_inputs(8), seed=0)
    quant = get_compressor("quant")(bits=8, activations=8, calibration="mse")
    model = apply_pipeline([quant], copy.deepcopy(_trained("vision")), ctx).eval()
    save_packed(model, tmp_path / "w8a8.sqz", like=_trained("vision"))
    deployed = deploy_onnx(tmp_path / "w8a8.sqz", task, tmp_path / "w8a8.onnx", threads=1)
    ops = Counter(n.op_type for n in onnx.load(str(deployed.path)).graph.node)
    assert ops["QAttention"] == 0 and ops["Softmax"] == LAYERS, dict(ops)
    assert deployed.check.agree, deployed.check.message
    shipped = load_packed(tmp_path / "w8a8.sqz", task.build_model(), int8=False).eval()
    assert deployed.metrics["val_acc_onnx"] == evaluate(shipped, task.val)

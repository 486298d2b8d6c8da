"""W8A8 graphs of Hugging Face DistilBERT sequence classifiers (`compressors._onnx_bert`): each
layer's masked self-attention (``q_lin``, ``k_lin``, ``v_lin``, ``n_heads`` heads) as ONNX
Runtime's ``QAttention`` reading the padding mask, no float attention left; outputs and the
validation score as the torch model's.

A small random-init ``DistilBertForSequenceClassification`` (2 layers, 64 wide, 4 heads) on
digits' pixels as tokens padded after 32 to 64 tokens (`tests.zoo.hf.PaddedTokens`: the mask
drops scores), trained 6 short epochs (0.29 of validation accuracy, chance 0.1), `mse`
calibration."""

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
from tests.zoo.hf import deploy_w8a8, distilbert, hf_task, padded  # noqa: E402

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
def _task():
    build = partial(distilbert, hidden=64, heads=4, layers=LAYERS)
    return padded(dataclasses.replace(hf_task("distilbert"), build_model=build), samples=512)


@functools.cache
def _trained() -> torch.nn.Module:
    task = _task()
    torch.manual_seed(0)
    model = task.build_model()
    fit(model, task.train, epochs=6, batch_size=32, lr=1e-3, loss_fn=task.loss, seed=0)
    return model.eval()


def _deployed(tmp_path, attention: str = "sdpa"):
    """The W8A8 model deployed (`tests.zoo.hf.deploy_w8a8`)."""
    return deploy_w8a8(_task(), _trained(), tmp_path, attention)


def test_the_padding_masks_scores():
    task = _task()
    val = task.val.source
    masks = torch.stack([val[i]["attention_mask"] for i in range(len(val))])
    assert masks[:, :32].all() and not masks[:, 32:].all() and masks[:, 32:].any()
    model = _trained()
    with torch.no_grad():  # (the mask changes the torch model's outputs: it drops scores)
        batch = {"input_ids": torch.stack([val[i]["input_ids"] for i in range(8)])}
        unmasked = model(**batch).logits
        batch["attention_mask"] = masks[:8]
        assert not torch.allclose(model(**batch).logits, unmasked, atol=1e-4)


def test_distilbert_attention_names_the_projections_and_heads():
    found = bert_attention(_task().build_model())
    prefix = "distilbert.transformer.layer"
    assert found == {
        f"{prefix}.{i}.attention": (
            tuple(f"{prefix}.{i}.attention.{p}" for p in ("q_lin", "k_lin", "v_lin")),
            4,
        )
        for i in range(LAYERS)
    }


@pytest.mark.slow  # (trains and exports a DistilBERT: 20-40 s)
def test_distilbert_attention_runs_as_qattention_with_the_padding_mask(tmp_path):
    task, deployed, shipped, optimized = _deployed(tmp_path)
    ops = Counter(n.op_type for n in optimized.node)
    # per layer: q, k, v and the masked attention in one QAttention reading the padding mask;
    # the output projection and the feed-forward's two Linears on integer kernels with their
    # biases inside
    assert ops["QAttention"] == LAYERS, dict(ops)
    qattention = [n for n in optimized.node if n.op_type == "QAttention"]
    assert all(len(n.input) >= 8 and n.input[5] for n in qattention)  # (reads the mask)
    assert len({n.input[5] for n in qattention}) == 1  # (one mask for all layers)
    assert ops["MatMulIntegerToFloat"] == 3 * LAYERS, dict(ops)
    # no float attention left: its transposes, products, softmax, NaN guard, mask's Where
    for op in ("Softmax", "Transpose", "FusedMatMul", "MatMul", "IsNaN", "Where", "Reshape"):
        assert ops[op] == 0, (op, dict(ops))
    # outputs: the torch model's (its fake quantization) within the check's tolerance and to a
    # cosine of 0.995 on every sample (as the BERT graph's), and the same validation score,
    # twice chance at least
    assert deployed.check.agree, deployed.check.message
    expected = predict_outputs(shipped, task.val)
    cosine = torch.nn.functional.cosine_similarity(deployed.check.outputs, expected)
    assert cosine.min() > 0.995, cosine.min()
    score = evaluate(shipped, task.val)
    assert deployed.metrics["val_acc_onnx"] == score and score > 0.2, score


@pytest.mark.slow  # (trains and exports a DistilBERT: 20-40 s)
def test_distilbert_eager_attention_is_rewritten_too(tmp_path):
    task, deployed, shipped, optimized = _deployed(tmp_path, attention="eager")
    ops = Counter(n.op_type for n in optimized.node)
    assert ops["QAttention"] == LAYERS and ops["Softmax"] == 0, dict(ops)
    assert deployed.check.agree, deployed.check.message
    assert deployed.metrics["val_acc_onnx"] == evaluate(shipped, task.val)

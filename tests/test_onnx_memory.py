"""ONNX export at scale and at its edges: what the export and its check hold in memory (the peaks,
measured by `bench/scale.py`: a 110 M BERT's 4-bit export and check at 2.0-2.3x its fp32 bytes,
3.1-3.3x before the float initializers the file codes were held out of the graph), the readers
they use, and the arguments and inputs they refuse."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")

from compressors import load_packed  # noqa: E402
from compressors.onnx_export import (  # noqa: E402
    OnnxExportError,  # noqa: E402
    check_onnx,
    export_onnx,
)
from compressors.packing import read_tensors, with_values  # noqa: E402
from tests.test_onnx import _shipped, _task, _WithBessel  # noqa: E402


def test_read_tensors_gives_the_codes_of_every_layout(tmp_path):
    task = _task("mlp")
    packed = tmp_path / "m.sqz"
    _shipped("mlp", [("prune", {"amount": 0.9}), ("cluster", {"bits": 2})], packed)
    tensors = read_tensors(packed)
    assert {tensors[f"net.{i}.weight"].layout for i in (1, 3, 5)} & {"bitmask", "gaps"}
    for i in (1, 3, 5):
        t = tensors[f"net.{i}.weight"]
        assert torch.equal(t.codes.tensors["codebook"][t.codes.codes], t.value)
    _shipped("mlp", [("quant", {"bits": 3})], packed)
    t = read_tensors(packed)["net.3.weight"]
    assert torch.equal(t.codes.codes * t.codes.tensors["scale"], t.value)
    reloaded = load_packed(packed, task.build_model(), int8=False)
    assert torch.equal(reloaded.net[3].weight.detach(), t.value)
    # values a caller already holds (the model the file was loaded into) are taken, not decoded
    fresh = task.build_model()
    records = read_tensors(packed, model=fresh, decode=False)
    assert records["net.3.weight"].value is None
    held = with_values(records, load_packed(packed, fresh, int8=False).state_dict())
    held = held["net.3.weight"]
    assert torch.equal(held.value, t.value)
    reloaded = fresh
    assert held.value.data_ptr() == reloaded.net[3].weight.data_ptr()
    assert torch.equal(held.codes.codes, t.codes.codes) and held.layout == t.layout


def test_check_inputs_are_split_to_at_most_the_check_rows():
    from compressors._onnx_io import input_batches

    batches = [torch.zeros(20, 3), {"a": torch.zeros(5, 2), "b": torch.ones(5)}, "opaque"]
    rows = [
        b if isinstance(b, str) else len(next(iter(b.values())) if isinstance(b, dict) else b)
        for b in input_batches(batches, 8)
    ]
    assert rows == [8, 8, 4, 5, "opaque"]
    assert [len(b) for b in input_batches(torch.zeros(10, 2), 4)] == [4, 4, 2]


def test_a_check_on_outputs_computed_first_is_the_check_on_the_model(tmp_path):
    """`deploy_onnx` computes the torch model's outputs, frees the model, then runs ONNX Runtime:
    the same verdict and figures as the check with the model at hand."""
    from compressors.onnx_export import torch_outputs

    task = _task("mlp")
    packed, out = tmp_path / "m.sqz", tmp_path / "m.onnx"
    _shipped("mlp", [("quant", {"bits": 4})], packed)
    model = task.build_model()
    export_onnx(packed, model, task.example_inputs(8), out)
    x = task.val.x[:50]
    with_model = check_onnx(out, model, x)
    first = check_onnx(out, None, x, expected=torch_outputs(model, x))
    assert with_model.agree and first.agree and first.max_abs_diff == with_model.max_abs_diff
    assert torch.equal(first.outputs, with_model.outputs) and len(first.outputs) == 50
    with pytest.raises(ValueError, match="one of 'shipped_model' and 'expected'"):
        check_onnx(out, model, x, expected=torch_outputs(model, x))
    with pytest.raises(ValueError, match="7 batches of inputs and 1 of expected"):
        check_onnx(out, None, x, expected=torch_outputs(model, x[:8]))


def test_layout_groups_join_roots_that_tensors_share():
    from compressors._onnx_rewrite import _groups

    groups = _groups([frozenset("a"), frozenset("bc"), frozenset("cd"), frozenset("a")])
    assert sorted(map(sorted, groups)) == [["a"], ["b", "c", "d"]]


def test_bad_arguments_name_what_is_allowed(tmp_path):
    with pytest.raises(ValueError, match="'matmul' parameter must be one of 'auto', 'dequant"):
        export_onnx(tmp_path / "m.sqz", nn.Linear(2, 2), torch.zeros(2, 2), "x", matmul="int")
    with pytest.raises(ValueError, match=r"'opset' parameter must be an int >= 13. Got 11"):
        export_onnx(tmp_path / "m.sqz", nn.Linear(2, 2), torch.zeros(2, 2), "x", opset=11)


def test_inputs_that_are_not_tensors_are_refused_naming_them(tmp_path):
    from compressors.onnx_export import check_exportable

    model = _task("mlp").build_model()
    with pytest.raises(OnnxExportError, match="got key 'mask' of type list"):
        check_exportable(model, {"x": torch.rand(4, 64), "mask": [1, 2]})
    with pytest.raises(OnnxExportError, match="got a value of type str"):
        check_exportable(model, "pixels")
    with pytest.raises(OnnxExportError, match=r"layer 'body.2' \(_Bessel\) cannot be exported"):
        check_exportable(_WithBessel(), torch.rand(4, 64))


def test_float_initializers_the_file_codes_are_never_serialized_as_float(tmp_path):
    """The dynamo exporter's float initializers are held out of the graph (sharing the model's
    memory) until the file's codes are known: those it codes come back as graph inputs, then
    as codes; the others as float initializers equal to the model's."""
    from compressors._onnx_graph import coded_roots, restore_held
    from compressors._onnx_io import Call
    from compressors._onnx_torch import export_graph
    from compressors.packing import read_tensors

    task = _task("mlp")
    packed = tmp_path / "m.sqz"
    _shipped("mlp", [("quant", {"bits": 4})], packed)
    model = load_packed(packed, task.build_model(), int8=False)
    held: dict = {}
    proto, used, _ = export_graph(
        model, Call.of(model, task.example_inputs(4)), None, every=False, opset=21,
        exporter="dynamo", notes=[], held=held,
    )  # fmt: skip
    assert used == "dynamo"
    weights = {f"net.{i}.weight" for i in (1, 3, 5)}
    assert weights <= set(held)
    assert not {init.name for init in proto.graph.initializer} & set(held)
    assert held["net.3.weight"].numpy().ctypes.data == model.net[3].weight.data_ptr()
    stored = with_values(read_tensors(packed, model=model, decode=False), model.state_dict())
    roots = coded_roots(proto, stored, [], held)
    assert set(roots) == weights
    biases = set(held) - weights
    restore_held(proto, held, roots)
    assert not held
    assert weights <= {value.name for value in proto.graph.input}
    floats = {init.name: init for init in proto.graph.initializer}
    assert biases and biases <= set(floats)
    from onnx import numpy_helper

    state = model.state_dict()
    for name in biases:
        assert torch.equal(torch.tensor(numpy_helper.to_array(floats[name])), state[name])
    # the whole export: the codes in the file, and ONNX Runtime computing the model's outputs
    out = tmp_path / "m.onnx"
    fresh = task.build_model()
    export_onnx(packed, fresh, task.example_inputs(8), out)
    x = task.example_inputs(32)
    assert check_onnx(out, fresh, x).agree

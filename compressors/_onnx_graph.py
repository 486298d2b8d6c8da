"""Passes over an exported graph before its codes are written: which initializers the packed
file holds as codes, onnxscript's optimizer with those kept out of its reach, which of them run
on MatMulInteger, notes on sparsity, and the exporter's debug records dropped
(see `compressors.onnx_export`); and the look-ups the graph's rewrites share (`graph_index`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from compressors._onnx_torch import quiet
from compressors._targets import targets
from compressors.packing import PackedTensor

if TYPE_CHECKING:
    import onnx

#: Weight tensors with at least this fraction of zeros are named in `OnnxExport.notes`.
SPARSE_NOTE_ZEROS = 0.25


def coded_roots(
    proto: onnx.ModelProto,
    stored: dict[str, PackedTensor],
    notes: list[str],
    held: dict[str, Any] | None = None,
) -> dict[str, PackedTensor]:
    """The graph's initializers that the file holds as codes, by initializer name.

    Initializers are found by name (the unfolded graph keeps state-dict names), else by exact
    value. An initializer that repeats a tensor already found (a tied tensor exported twice)
    becomes an Identity of the first, so the graph stores it once. ``held``: float32
    initializers kept out of the graph (`compressors._onnx_torch.export_graph`), looked at
    after the graph's own; a repeat among them is dropped from it.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    held = {} if held is None else held
    coded = {name: t for name, t in stored.items() if t.codes is not None}
    by_value: dict[tuple, PackedTensor] = {}
    for t in coded.values():
        by_value.setdefault(_fingerprint(t.value.numpy()), t)
    roots: dict[str, PackedTensor] = {}
    first: dict[int, str] = {}
    duplicates: list[tuple[str, str]] = []
    floats = (
        (init.name, lambda init=init: numpy_helper.to_array(init))
        for init in graph.initializer
        if init.data_type == 1  # FLOAT
    )
    for name, array_of in (*floats, *((n, t.numpy) for n, t in held.items())):
        array = array_of()
        tensor = coded.get(name)
        if tensor is None or not np.array_equal(array, tensor.value.numpy()):
            tensor = by_value.get(_fingerprint(array))
            if tensor is None or not np.array_equal(array, tensor.value.numpy()):
                continue
        if id(tensor) in first:
            duplicates.append((name, first[id(tensor)]))
        else:
            first[id(tensor)] = name
            roots[name] = tensor
    for name, original in duplicates:
        _remove_initializer(graph, name)
        held.pop(name, None)
        graph.node.insert(0, helper.make_node("Identity", [original], [name], name=f"{name}_tied"))
    found = {id(t) for t in roots.values()}
    found_values = {_fingerprint(t.value.numpy()) for t in roots.values()}
    missing = sorted(  # (a tensor equal to one found was merged with it by the exporter)
        n
        for n, t in coded.items()
        if id(t) not in found
        and n == _canonical(n, stored)
        and _fingerprint(t.value.numpy()) not in found_values
    )
    if missing:
        notes.append(
            f"stored as float32: {', '.join(missing)} (the exporter folded them into other tensors)"
        )
    return roots


def _canonical(name: str, stored: dict[str, PackedTensor]) -> str:
    """The first key of a (possibly tied) tensor."""
    return next(key for key, t in stored.items() if t is stored[name])


def _fingerprint(array: np.ndarray) -> tuple:
    return array.shape, hash(np.ascontiguousarray(array).tobytes())


def _remove_initializer(graph: onnx.GraphProto, name: str) -> None:
    for i, init in enumerate(graph.initializer):
        if init.name == name:
            del graph.initializer[i]
            return


def restore_held(
    proto: onnx.ModelProto, held: dict[str, Any], roots: dict[str, PackedTensor]
) -> None:
    """Put the held float32 initializers (`coded_roots`'s ``held``) back into the graph: each
    the file holds as codes (in ``roots``) as a graph input of its shape, which
    `optimize_graph` keeps out of its optimizer's reach until `Rewriter` writes its codes; the
    others as initializers, their values copied (each at a time)."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    kept = [value for value in graph.value_info if value.name not in held]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    for name in list(held):
        tensor = held.pop(name)
        if name in roots:
            graph.input.append(helper.make_tensor_value_info(name, 1, list(tensor.shape)))
        else:
            graph.initializer.append(numpy_helper.from_array(tensor.numpy(), name))


def optimize_graph(proto: onnx.ModelProto, roots: dict[str, PackedTensor]) -> onnx.ModelProto:
    """The graph cleaned by onnxscript's optimizer (constants folded, no-ops removed), with the
    coded initializers kept out of its reach as graph inputs, so that their layout ops stay nodes
    (which `Rewriter` applies to the codes). They come back as `Rewriter`'s integer
    initializers; until then the graph reads them undefined."""
    import onnx_ir as ir
    from onnx import helper
    from onnxscript import optimizer

    graph = proto.graph
    for init in list(graph.initializer):
        if init.name in roots:
            shape = list(init.dims)
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, shape))
            graph.initializer.remove(init)
    with quiet():
        model = ir.serde.deserialize_model(proto)
        optimizer.optimize(model)  # (in place)
    _register_constants(model.graph)
    proto = ir.serde.serialize_model(model)
    for value in list(proto.graph.input):
        if value.name in roots:
            proto.graph.input.remove(value)
    return proto


def _register_constants(graph) -> None:
    """Values that nodes read, that no node makes and that are neither inputs nor
    initializers, but hold a constant: initializers. (onnxscript 0.7's optimizer can fold a
    value to a constant and drop its maker without registering it: ONNX's checker then refuses
    the graph, "input '/encoder/Cast_output_0/shape_1' ... is not output of any previous
    nodes", a T5's legacy-exported graph.)"""
    inputs = set(graph.inputs)
    for node in graph:
        for value in node.inputs:
            if (
                value is not None
                and value.producer() is None
                and value not in inputs
                and value.name not in graph.initializers
                and value.const_value is not None
            ):
                graph.register_initializer(value)


def integer_roots(
    matmul: str, roots: dict[str, PackedTensor], stored: dict[str, PackedTensor], int8: list[str]
) -> set[str]:
    """The coded initializers whose MatMul / Gemm readers run on MatMulInteger: all of them
    (``integer``), none (``dequantize``), or those of the layers the file runs on int8 kernels
    (``auto``, given their names ``int8``)."""
    if matmul != "auto":
        return set(roots) if matmul == "integer" else set()
    layers = set(int8)
    return {
        name
        for name, tensor in roots.items()
        if any(key.rpartition(".")[0] in layers for key, t in stored.items() if t is tensor)
    }


def sparsity_notes(model: nn.Module, stored: dict[str, PackedTensor]) -> list[str]:
    """A note on the weight tensors with many zeros (unstructured sparsity), which ONNX stores
    dense."""
    weights = {id(stored[n]): stored[n] for n in targets(model) if n in stored}
    zeros_of = {id(t): t.value.numel() - int(t.value.count_nonzero()) for t in weights.values()}
    sparse = [t for t in weights.values() if zeros_of[id(t)] >= SPARSE_NOTE_ZEROS * t.value.numel()]
    if not sparse:
        return []
    zeros = sum(zeros_of[id(t)] for t in sparse)
    total = sum(t.value.numel() for t in sparse)
    return [
        f"unstructured sparsity stored dense: {zeros / total:.0%} zeros in {len(sparse)} weight "
        f"tensor{'s' if len(sparse) > 1 else ''} (no ONNX op runs a sparse weight faster; the "
        "packed file codes zeros in fewer bits)"
    ]


def strip_debug_info(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debug records (stack traces, module paths): most of a
    small model's file otherwise; the dynamo exporter's record of the torch program it traced
    (the graph's own ``metadata_props``: its signature, 2.9 kB of the zoo ResNet's 10.8 kB
    graph); and the shapes it inferred for intermediate tensors (``value_info``: 0.8-4.5 kB of
    the zoo's 5-40 kB graphs), which ONNX Runtime infers again when it loads the graph."""
    graph = proto.graph
    del graph.value_info[:]
    del graph.metadata_props[:]
    for item in (*graph.node, *graph.value_info, *graph.input, *graph.output, *graph.initializer):
        del item.metadata_props[:]
        item.doc_string = ""


def graph_index(graph: onnx.GraphProto) -> tuple[dict[str, Any], dict[str, Any], dict[str, list]]:
    """``graph``'s initializers by name, the node making each tensor, and the nodes reading
    each tensor (in graph order): the look-ups the graph's rewrites share."""
    inits = {i.name: i for i in graph.initializer}
    makers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return inits, makers, readers


def quantized_linear(
    matmul: Any, makers: dict, readers: dict, inits: dict, *, unbiased: bool = False
) -> dict | None:
    """The nodes of a Linear layer of a QDQ graph around ``matmul`` (`graph_index`'s look-ups),
    or None where it is not one: a ``MatMul`` of an input grid (``QuantizeLinear`` ->
    ``DequantizeLinear``, constant scale and zero point; the grid may have other readers) and
    of a weight's codes (``DequantizeLinear`` of a constant 2-D tensor, constant scales per
    column or per tensor, an explicit zero point), whose output only a bias ``Add`` of a
    constant of one value per column reads. Keys: the nodes (``quantize``, ``dequantize``,
    ``weight``, ``matmul``, ``add``) and the initializers' names (``codes``, ``scale``,
    ``zero``, ``bias``). With ``unbiased``, a ``MatMul`` whose output no such ``Add`` reads
    (a Linear without bias) is one too, its ``add`` and ``bias`` None."""
    if not is_op(matmul, "MatMul"):
        return None
    dequantize, weight = makers.get(matmul.input[0]), makers.get(matmul.input[1])
    if not is_op(dequantize, "DequantizeLinear") or not is_op(weight, "DequantizeLinear"):
        return None
    quantize = makers.get(dequantize.input[0])
    if not is_op(quantize, "QuantizeLinear") or len(quantize.input) < 3:
        return None
    if len(weight.input) < 3 or not all(i in inits for i in [*quantize.input[1:3], *weight.input]):
        return None
    codes, scale = inits[weight.input[0]], inits[weight.input[1]]
    axis = next((a.i for a in weight.attribute if a.name == "axis"), 1)
    if len(codes.dims) != 2 or list(scale.dims) not in ([], [codes.dims[1]]):
        return None
    if scale.dims and axis % 2 != 1:
        return None
    after = readers.get(matmul.output[0], [])
    add = after[0] if len(after) == 1 and after[0].op_type == "Add" else None
    bias = None
    if add is not None:
        bias = add.input[1] if add.input[0] == matmul.output[0] else add.input[0]
        if bias not in inits or list(inits[bias].dims) != [codes.dims[1]]:
            add = bias = None
    if add is None and not unbiased:
        return None
    return {
        "quantize": quantize,
        "dequantize": dequantize,
        "weight": weight,
        "matmul": matmul,
        "add": add,
        "codes": weight.input[0],
        "scale": weight.input[1],
        "zero": weight.input[2],
        "bias": bias,
    }


def is_op(node: Any, op: str) -> bool:
    """Whether ``node`` is a node (not None) of type ``op``."""
    return node is not None and node.op_type == op


def topological(nodes: list, graph: Any) -> list:
    """``nodes`` ordered so that each comes after the makers of its inputs: as they are where
    they already are, else each as early in their order as its inputs allow (the rest keeps its
    order); as they are where some input is made by none of them or they make a cycle."""
    import heapq

    outer = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {""}
    maker = {out: k for k, node in enumerate(nodes) for out in node.output}
    needs = [{maker[i] for i in node.input if i not in outer and i in maker} for node in nodes]
    if any(i not in outer and i not in maker for node in nodes for i in node.input):
        return nodes
    if all(all(m < k for m in needs[k]) for k in range(len(nodes))):
        return nodes
    waiting = [len(n) for n in needs]
    users: dict[int, list[int]] = {}
    for k, made_by in enumerate(needs):
        for m in made_by:
            users.setdefault(m, []).append(k)
    ready = [k for k, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        k = heapq.heappop(ready)
        ordered.append(nodes[k])
        for user in users.get(k, []):
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    return ordered if len(ordered) == len(nodes) else nodes

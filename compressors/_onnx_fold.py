"""BatchNorm folded into the Conv or Gemm before it, in an exported graph whose coded
initializers are not yet written (see `compressors.onnx_export`).

An inference-mode ``BatchNormalization`` computes ``(x - mean) * f + beta`` per channel, with
``f = gamma / sqrt(var + eps)``. When ``x`` is the output of a Conv (or a Gemm with a 2-D output)
that nothing else reads, the layer's weight times ``f`` along its output channels, and its bias
``(bias - mean) * f + beta``, compute the same: the ``BatchNormalization`` node and its four
vectors leave the graph. ``f`` and the new bias are computed in float64 and rounded once.

The weight is one of:

- a float initializer: its values are scaled (onnxscript's optimizer, which runs first, has
  usually folded those already: `compressors._onnx_graph.optimize_graph`);
- a tensor the packed file holds on a per-row (or per-tensor) grid, ``code * scale``: its
  scales are scaled and its codes stay as they are, so the graph still stores the file's codes
  (and ``DequantizeLinear`` still reads them, as ONNX Runtime's QDQ fusions need);
- any other coded tensor (a codebook, a grid whose scales vary along other axes): a ``Mul`` by
  ``f`` on its constant path, which ONNX Runtime computes once when it loads the graph.

A ``BatchNormalization`` after anything else (a Conv whose output other nodes read too, a
weight other nodes share, a MatMul, a ConvTranspose) stays a node; a note counts them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch

from compressors._onnx_graph import graph_index
from compressors.packing import PackedTensor

if TYPE_CHECKING:
    import onnx

#: Ops whose output channels a following BatchNormalization can be folded into.
FOLDABLE = ("Conv", "Gemm")


def fold_batchnorm(proto: onnx.ModelProto, roots: dict[str, PackedTensor], notes: list[str]) -> int:
    """Fold each inference-mode ``BatchNormalization`` of ``proto`` into the Conv or Gemm
    before it, in place; coded weights (``roots``, not initializers yet) get scaled scales or a
    ``Mul``. Returns how many were folded; a note says how many were and were not."""
    from onnx import numpy_helper

    graph = proto.graph
    inits, producer, readers = graph_index(graph)
    outputs = {o.name for o in graph.output}
    names = {v for n in graph.node for v in (*n.input, *n.output)} | set(inits)
    folded, kept, vectors = 0, 0, set()
    for bn in [n for n in graph.node if n.op_type == "BatchNormalization"]:
        layer = producer.get(bn.input[0])
        plan = _plan(bn, layer, inits, roots, readers, outputs)
        if plan is None:
            kept += 1
            continue
        factor, shift = plan
        vectors.update(bn.input[1:5])
        weight = layer.input[1]
        axis = 1 if layer.op_type == "Gemm" and not _attr(layer, "transB", 0) else 0
        if weight in inits:
            array = numpy_helper.to_array(inits[weight]).astype(np.float64)
            scaled = (array * _along(factor, axis, array.ndim)).astype(np.float32)
            inits[weight].CopyFrom(numpy_helper.from_array(scaled, weight))
        elif not _scale_rows(roots, weight, factor):
            layer.input[1] = _unique(f"{weight}_folded", names)
            shape = (-1,) + (1,) * (len(roots[weight].value.shape) - 1)
            f_name = _unique(f"{weight}_bn_factor", names)
            graph.initializer.append(
                numpy_helper.from_array(factor.astype(np.float32).reshape(shape), f_name)
            )
            position = list(graph.node).index(layer)
            graph.node.insert(position, _mul(weight, f_name, layer.input[1]))
        bias = shift
        if len(layer.input) > 2 and layer.input[2]:
            old = numpy_helper.to_array(inits[layer.input[2]]).astype(np.float64)
            bias = old * factor + shift
            vectors.add(layer.input[2])  # (read by this layer alone: replaced below)
        b_name = _unique(f"{bn.output[0]}_bias", names)
        graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32), b_name))
        inputs = list(layer.input[:2]) + [b_name]
        del layer.input[:]
        layer.input.extend(inputs)
        layer.output[0] = bn.output[0]
        graph.node.remove(bn)
        folded += 1
    _drop_unread(graph, vectors)
    if folded:
        notes.append(
            f"{folded} BatchNormalization folded into the Conv / Gemm before it (weights or "
            "their scales multiplied per output channel, a bias added)"
        )
    if kept:
        notes.append(
            f"{kept} BatchNormalization kept as nodes (not after a Conv / Gemm whose output "
            "and weight they alone read)"
        )
    return folded


def _plan(bn, layer, inits, roots, readers, outputs) -> tuple[np.ndarray, np.ndarray] | None:
    """``(factor, shift)`` per channel of a BatchNormalization that can be folded into
    ``layer``, else None."""
    from onnx import numpy_helper

    if layer is None or layer.op_type not in FOLDABLE or len(layer.input) < 2:
        return None
    if _attr(bn, "training_mode", 0) or any(o for o in bn.output[1:]):
        return None
    if len(readers.get(layer.output[0], [])) != 1 or layer.output[0] in outputs:
        return None
    if any(name not in inits for name in bn.input[1:5]):
        return None
    weight = layer.input[1]
    if weight not in inits and weight not in roots:
        return None
    if len(readers.get(weight, [])) != 1:
        return None
    if len(layer.input) > 2 and layer.input[2]:
        bias = layer.input[2]
        if bias not in inits or len(readers.get(bias, [])) != 1:
            return None
    if layer.op_type == "Gemm":
        if _attr(layer, "transA", 0) or _attr(layer, "alpha", 1.0) != 1.0:
            return None
        if _attr(layer, "beta", 1.0) != 1.0:
            return None
        if weight in roots and not _attr(layer, "transB", 0):
            return None  # (a coded weight's rows are its output channels only when transposed)
    gamma, beta, mean, var = (
        numpy_helper.to_array(inits[name]).astype(np.float64) for name in bn.input[1:5]
    )
    channels = _shape(inits, roots, weight)
    out_axis = 1 if layer.op_type == "Gemm" and not _attr(layer, "transB", 0) else 0
    if gamma.ndim != 1 or any(v.shape != gamma.shape for v in (beta, mean, var)):
        return None
    if channels[out_axis] != gamma.shape[0]:
        return None
    factor = gamma / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
    return factor, beta - mean * factor


def _scale_rows(roots: dict[str, PackedTensor], name: str, factor: np.ndarray) -> bool:
    """Multiply the per-row scales of coded tensor ``name`` by ``factor`` (a new
    `PackedTensor` in ``roots``); False where its codes are not on a per-row or per-tensor
    grid."""
    tensor = roots[name]
    codes = tensor.codes
    if codes is None or codes.decode != "scaled":
        return False
    scale = codes.tensors["scale"].to(torch.float64)
    value_shape = tuple(tensor.value.shape)
    rows = value_shape[0]
    ones = (1,) * (len(value_shape) - 1)
    if scale.numel() != 1 and tuple(scale.shape) != (rows, *ones):
        return False  # (scales broadcast from the last axis: only this shape is per row)
    f = torch.from_numpy(factor).reshape(rows, *ones)
    new_scale = (scale.reshape(-1, *ones) * f).to(torch.float32)
    new_codes = dataclasses.replace(codes, tensors={**codes.tensors, "scale": new_scale})
    value = codes.codes.to(torch.float32) * new_scale
    roots[name] = dataclasses.replace(tensor, value=value, codes=new_codes)
    return True


def _shape(inits, roots, name: str) -> tuple[int, ...]:
    if name in inits:
        return tuple(inits[name].dims)
    return tuple(roots[name].value.shape)


def _along(vector: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


def _attr(node, name: str, default):
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _unique(base: str, names: set[str]) -> str:
    name, i = base, 1
    while name in names:
        name, i = f"{base}_{i}", i + 1
    names.add(name)
    return name


def _mul(a: str, b: str, out: str):
    from onnx import helper

    return helper.make_node("Mul", [a, b], [out], name=f"{out}_mul")


def _drop_unread(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove the initializers among ``names`` (folded BatchNormalizations' vectors, the biases
    they replaced) that no node reads any more."""
    read = {name for node in graph.node for name in node.input}
    read |= {o.name for o in graph.output}
    for init in list(graph.initializer):
        if init.name in names and init.name not in read:
            graph.initializer.remove(init)

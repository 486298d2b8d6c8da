"""QDQ graphs of models with quantized activations (``quant.activations=8``): ONNX Runtime's
integer Conv / MatMul / Gemm kernels.

A packed file records a calibrated uint8 grid for the input of each quantized layer and the
output of each convolution (`compressors._act_quant`). The model is exported as a float graph
(its activation quantizers off), its weights become integer codes with ``DequantizeLinear``
(`compressors._onnx_rewrite`), and `ActivationQDQ` then writes the activation grids into the
graph as ONNX Runtime's static quantization does (``quantize_static``, QDQ format):

- a ``QuantizeLinear`` / ``DequantizeLinear`` pair (uint8, per tensor) on the input of each
  Conv, MatMul or Gemm of a quantized layer (the one reading its ``weight``, or a self-attention's
  packed ``in_proj_weight``), and on the output of each Conv;
- the layer's bias as INT32 codes at ``input_scale * weight_scale`` (per output channel) with a
  ``DequantizeLinear``, which ONNX Runtime's fusions require of a Conv or Gemm;
- the weight's codes INT8 (codes of grids of at most 4 bits, which the export stores as INT4,
  are widened: ONNX Runtime's integer kernels read 8-bit weights), with an explicit zero point;
- a BatchNorm that alone reads a quantized conv's output (where the conv's output grid sits,
  `compressors._act_quant`) folded into the conv: its per-channel factor multiplies the
  weight's scales (a negative one negates the channel's codes) and its shift becomes the bias,
  so the file's codes are kept (ONNX Runtime folds BatchNorm only into float convolutions);
- an input grid the torch model puts on a module's output for every reader (``from``) written
  once, after the node making the tensor, every reader reading it dequantized; an ``Add``
  whose output reaches such grids only through a ReLU quantized on their grid: a residual
  block's sum runs as ``QLinearAdd`` (the same codes: a grid starting at 0 clips what the
  ReLU zeroes);
- a Conv, MatMul or Gemm without activation grids (a convolution that
  `compressors._act_quant.int8_friendly` leaves float, the ``out_proj`` of torch's attention,
  which its functional form reads directly) reading its weight's codes through a
  ``DequantizeLinear`` gets the float weight instead: ONNX Runtime's float kernels (NCHWc
  convolutions, MatMul) need it constant.

Two passes then trim the float work around those kernels in transformer-shaped graphs:
`compressors._onnx_attention` (torch's self-attention without transposes or per-head copies)
and `compressors._onnx_rows` (Linear layers on ``(batch, tokens, features)`` as ``Gemm`` on
rows, the bias inside the integer kernel, a feed-forward ReLU between two of them fused away);
`compressors._onnx_bert` runs Hugging Face BERT's attention as ONNX Runtime's ``QAttention``
(its Linear layers as ``MatMulIntegerToFloat`` with their biases, its embedding tables read from
their codes); `compressors._onnx_pool` puts a CNN's mean pool on a grid
(``QLinearGlobalAveragePool`` after the last ``QLinearConv`` or ``QLinearAdd``, into the head's
``QGemm``), and `compressors._onnx_layout` writes channels-last hints so that ONNX Runtime's NHWC
layout leaves no ``Transpose`` after a float stem, around a residual sum or after the pool.

ONNX Runtime (CPU provider, default graph optimisation, QDQ handling on: ``ort_session`` with
``exact=False``, which `compressors.onnx_export.ort_session` picks for such graphs) then runs
``DequantizeLinear -> Conv -> QuantizeLinear`` as ``QLinearConv``, ``DequantizeLinear ->
MatMul`` as ``MatMulIntegerToFloat`` and ``DequantizeLinear -> Gemm`` as ``QGemm``. The values
are those of the torch model's fake quantization up to the bias' rounding (at most half an
accumulator step) and float rounding, on any x86 CPU: without VNNI (AVX2 only) ONNX Runtime's
uint8 x int8 kernels add pairs of products in saturating int16, so the weights these kernels
read are on 7-bit grids (`compressors.quant.INTEGER_KERNEL_BITS`, ``quantize_static``'s
``reduce_range``), which cannot overflow it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from compressors._onnx_graph import topological

#: The weight inputs of the ops a quantized layer exports to.
_OPS = ("Conv", "MatMul", "Gemm")


class ActivationQDQ:
    """Finds the nodes of each quantized layer in the float graph (before its weights are
    rewritten) and writes the activation grids around them afterwards (`insert`)."""

    def __init__(self, proto: Any, grids: Mapping[str, Mapping[str, list]]) -> None:
        self.proto, self.grids = proto, grids
        producers = {out: node for node in proto.graph.node for out in node.output}
        self.sites: dict[str, str] = {}  # layer -> output name of its Conv / MatMul / Gemm
        self.ends: dict[str, str] = {}  # layer -> output name of the BatchNorm after it
        self.weights: set[str] = set()
        for layer in grids:
            weight = f"{layer}.weight" if layer else "weight"  # (an initializer, or a root)
            packed = f"{layer}.in_proj_weight"  # (self-attention's q, k, v projections)
            for node in proto.graph.node:
                if node.op_type not in _OPS or len(node.input) < 2:
                    continue
                source = node.input[1]
                via = producers.get(source)
                if via is not None and via.op_type == "Transpose":
                    source = via.input[0]
                if source in (weight, packed):
                    self.sites[layer] = node.output[0]
                    self.weights.add(source)
        for layer, out in self.sites.items():
            readers = [n for n in proto.graph.node if out in n.input]
            if grids[layer].get("after") and len(readers) == 1:
                if readers[0].op_type == "BatchNormalization" and readers[0].input[0] == out:
                    self.ends[layer] = readers[0].output[0]
        self.missing = sorted(set(grids) - set(self.sites))

    def insert(self) -> None:
        """Write the QDQ pairs, the integer biases and the INT8 weights into the graph."""
        from onnx import TensorProto, helper, numpy_helper

        if not self.sites:
            return
        graph = self.proto.graph
        inits = {i.name: i for i in graph.initializer}
        nodes = list(graph.node)
        producers = {out: node for node in nodes for out in node.output}
        added: list[tuple[Any, list[Any]]] = []  # (node, nodes to put before it)
        after: dict[int, list[Any]] = {}
        pairs: dict[tuple, list[Any]] = {}  # (tensor, grid) -> its QDQ pair, written once
        shared: list[tuple[str, list[Any]]] = []  # (tensor, pair): every reader reads the pair
        for layer, out in self.sites.items():
            node = producers[out]
            grid = self.grids[layer]
            base = _base(layer)
            scale, zero = grid["in"]
            key = (node.input[0], float(scale), int(zero))
            if key in pairs:
                before = []
            else:
                pairs[key] = _qdq(
                    graph, node.input[0], f"{base}_input", scale, zero, helper, numpy_helper
                )
                before = list(pairs[key])
                if "from" in grid:
                    shared.append((node.input[0], pairs[key]))
            node.input[0] = pairs[key][-1].output[0]
            weight_dq = producers.get(node.input[1])
            weight_scale = _weight_scale(graph, weight_dq, inits, numpy_helper, TensorProto)
            norm = producers.get(self.ends.get(layer, ""))
            stale = [*norm.input[1:5], *node.input[2:3]] if norm is not None else []
            if (
                weight_scale is not None
                and norm is not None
                and _fold(node, norm, weight_dq, inits)
            ):
                nodes.remove(norm)
                graph.initializer.append(inits[node.input[2]])
                for name in stale:  # (the BatchNorm counted: shared constants stay)
                    _drop_unread(graph, name, [*nodes, norm])
                producers[node.output[0]] = node
                self.ends.pop(layer)
                weight_scale = numpy_helper.to_array(inits[weight_dq.input[1]]).reshape(-1)
                weight_scale = weight_scale.astype(np.float64)
            if len(node.input) > 2 and node.input[2] in inits and weight_scale is not None:
                bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
                bias_scale = (np.float64(np.float32(scale)) * weight_scale).astype(np.float32)
                bias_scale = np.broadcast_to(bias_scale, bias.shape).copy()
                codes = np.round(bias / bias_scale.astype(np.float64))
                codes = np.clip(codes, -(2**31), 2**31 - 1).astype(np.int32)
                graph.initializer.extend(
                    [
                        numpy_helper.from_array(codes, f"{base}_bias_quantized"),
                        numpy_helper.from_array(bias_scale, f"{base}_bias_scale"),
                    ]
                )
                bias_out = f"{base}_bias_dequantized"
                before.append(
                    helper.make_node(
                        "DequantizeLinear",
                        [f"{base}_bias_quantized", f"{base}_bias_scale"],
                        [bias_out],
                        axis=0,
                    )
                )
                _drop_unread(graph, node.input[2], nodes)
                node.input[2] = bias_out
            added.append((node, before))
            if "out" in grid:  # (after the BatchNorm, where the export kept it unfolded)
                end = producers[self.ends.get(layer, out)]
                scale, zero = grid["out"]
                raw = f"{base}_output_float"
                final = end.output[0]
                end.output[0] = raw
                pair = _qdq(graph, raw, f"{base}_output", scale, zero, helper, numpy_helper)
                pair[-1].output[0] = final
                after.setdefault(id(end), []).extend(pair)
        _float_weights(graph, nodes, {id(n) for n, _ in added}, inits, numpy_helper)
        placed = {id(n): b for n, b in added}
        _share(nodes, shared, placed, after)
        _quantize_sums(nodes, [n for b in placed.values() for n in b], after, inits, helper)
        ordered = []
        for node in nodes:
            ordered += placed.get(id(node), [])
            ordered.append(node)
            ordered += after.get(id(node), [])
        del graph.node[:]
        # (a pair shared by layers goes before the first site's node, not always the first
        # reader in the graph: CLIP defines k_proj before q_proj and calls q_proj first)
        graph.node.extend(topological(ordered, graph))


def _share(nodes: list, shared: list, placed: dict, after: dict) -> None:
    """Move each shared input's QDQ pair to just after the node that makes the tensor, and
    let every other reader of the tensor (a residual addition) read the pair's output: the
    torch model quantizes that module's output for all its readers (`_act_quant`'s ``from``).
    A tensor made by no node of the graph as exported (a graph input, an output grid's
    pair) keeps its pair before the layer."""
    makers = {out: node for node in nodes for out in node.output}
    for tensor, pair in shared:
        maker = makers.get(tensor)
        if maker is None:
            continue
        for before in placed.values():
            if pair[0] in before:
                del before[before.index(pair[0]) : before.index(pair[1]) + 1]
        after.setdefault(id(maker), []).extend(pair)
        for node in nodes:
            node.input[:] = [pair[-1].output[0] if i == tensor else i for i in node.input]


def _quantize_sums(nodes: list, inserted: list, after: dict, inits: dict, helper) -> None:
    """Quantize an ``Add`` whose output reaches quantized inputs only through a ReLU, on their
    grid (the same one for each, holding 0 as its code 0): quantizing before the ReLU gives
    the same codes (the grid clips what the ReLU would zero), and ONNX Runtime then runs the
    addition as ``QLinearAdd`` where its inputs are dequantized too (a residual block's)."""
    from onnx import numpy_helper

    everything = [*nodes, *inserted, *(n for pair in after.values() for n in pair)]
    readers: dict[str, list] = {}
    for node in everything:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for add in [n for n in nodes if n.op_type == "Add"]:
        relu = readers.get(add.output[0], [])
        if len(relu) != 1 or relu[0].op_type != "Relu" or relu[0] not in nodes:
            continue
        quantizers = readers.get(relu[0].output[0], [])
        if not quantizers or any(q.op_type != "QuantizeLinear" for q in quantizers):
            continue
        if any(not all(i in inits for i in q.input[1:3]) or len(q.input) < 3 for q in quantizers):
            continue
        grids = {
            tuple(float(numpy_helper.to_array(inits[i])) for i in q.input[1:3]) for q in quantizers
        }
        if len(grids) != 1 or next(iter(grids))[1] != 0:
            continue
        scale, zero = quantizers[0].input[1:3]
        raw = f"{add.output[0]}_sum"
        final = add.output[0]
        add.output[0] = raw
        after.setdefault(id(add), []).extend(
            [
                helper.make_node("QuantizeLinear", [raw, scale, zero], [f"{final}_quantized"]),
                helper.make_node("DequantizeLinear", [f"{final}_quantized", scale, zero], [final]),
            ]
        )


def _base(layer: str) -> str:
    return (layer or "model").replace(".", "_") + "_act"


def _qdq(graph, tensor: str, base: str, scale: float, zero: int, helper, numpy_helper) -> list:
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(scale, dtype=np.float32), f"{base}_scale"),
            numpy_helper.from_array(np.array(zero, dtype=np.uint8), f"{base}_zero_point"),
        ]
    )
    names = [f"{base}_scale", f"{base}_zero_point"]
    return [
        helper.make_node("QuantizeLinear", [tensor, *names], [f"{base}_quantized"]),
        helper.make_node(
            "DequantizeLinear", [f"{base}_quantized", *names], [f"{base}_dequantized"]
        ),
    ]


def _weight_scale(graph, dq, inits, numpy_helper, tensor_proto) -> np.ndarray | None:
    """The per-output-channel scales of a weight's ``DequantizeLinear`` (its INT4 codes
    widened to INT8 on the way), or None where the weight is not dequantized from codes."""
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in inits:
        return None
    codes = inits.get(dq.input[0])
    if codes is not None and codes.data_type == tensor_proto.INT4:
        widened = numpy_helper.to_array(codes).astype(np.int8)
        codes.CopyFrom(numpy_helper.from_array(widened, codes.name))
    scale = numpy_helper.to_array(inits[dq.input[1]])
    if len(dq.input) < 3 and codes is not None and codes.data_type == tensor_proto.INT8:
        # an explicit INT8 zero point: ONNX Runtime's QGemm fusion asks for one
        zero = numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{dq.input[0]}_zero_point")
        inits[zero.name] = zero
        graph.initializer.append(zero)
        dq.input.append(zero.name)
    return scale.astype(np.float64).reshape(-1)


def _float_weights(graph, nodes: list, sites: set[int], inits: dict, numpy_helper) -> None:
    """Give each Conv, MatMul or Gemm outside ``sites`` (a layer without activation grids: a
    convolution `compressors._act_quant.int8_friendly` leaves float, the ``out_proj`` of torch's
    attention) its weight as a float initializer in place of the ``DequantizeLinear``
    of its codes. With QDQ handling on, ONNX Runtime folds no ``DequantizeLinear``: a Conv
    reading one runs without its NCHWc float kernels (a 1 -> 16 channel 3x3 conv at batch 32:
    37 us against 25 us), and a MatMul becomes ``MatMulNBits``, which ran the zoo
    TransformerEncoder's 32 x 32 .. 64 projections at 34-45 us against float's 12-17 us."""
    producers = {out: node for node in nodes for out in node.output}
    for node in list(nodes):
        if node.op_type not in _OPS or id(node) in sites or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or not all(i in inits for i in dq.input):
            continue
        if sum(dq.output[0] in other.input for other in nodes) != 1:
            continue
        codes, scale, *zero = (numpy_helper.to_array(inits[i]) for i in dq.input)
        if scale.ndim > 1:  # (blocked scales: not what the export writes)
            continue
        codes = codes.astype(np.float64)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % codes.ndim
        shape = [1] * codes.ndim
        shape[axis] = -1
        if scale.ndim:
            scale = scale.reshape(shape)
        if zero:
            codes = codes - (zero[0].reshape(shape) if zero[0].ndim else zero[0])
        weight = numpy_helper.from_array((codes * scale).astype(np.float32), dq.output[0])
        nodes.remove(dq)
        for name in dq.input:
            _drop_unread(graph, name, nodes + [dq])
        inits[weight.name] = weight
        graph.initializer.append(weight)


def _drop_unread(graph, name: str, nodes: list) -> None:
    """Remove initializer ``name`` if no node but the one about to stop reading it reads it."""
    outputs = {o.name for o in graph.output}
    if sum(name in node.input for node in nodes) <= 1 and name not in outputs:
        for i, init in enumerate(graph.initializer):
            if init.name == name:
                del graph.initializer[i]
                return


def _fold(conv, norm, weight_dq, inits) -> bool:
    """Fold the BatchNormalization ``norm`` that reads ``conv``'s output into ``conv``, on its
    integer codes: per output channel ``g = gamma / sqrt(var + eps)`` multiplies the weight's
    scale (``|g|``; a negative ``g`` negates the channel's codes, which are symmetric) and
    ``(bias - mean) * g + beta`` is the new bias. ONNX Runtime folds a BatchNorm only into a
    float Conv, so a QDQ Conv needs it done here. False (nothing changed) where a parameter is
    not a constant or the weight's scales are not per output channel."""
    from onnx import helper, numpy_helper

    params = norm.input[1:5]
    axis = {a.name: helper.get_attribute_value(a) for a in weight_dq.attribute}.get("axis", 1)
    codes, scale = inits.get(weight_dq.input[0]), inits.get(weight_dq.input[1])
    if not all(p in inits for p in params) or codes is None or scale is None:
        return False
    gamma, beta, mean, var = (numpy_helper.to_array(inits[p]).astype(np.float64) for p in params)
    eps = {a.name: helper.get_attribute_value(a) for a in norm.attribute}.get("epsilon", 1e-5)
    g = gamma / np.sqrt(var + eps)
    steps = numpy_helper.to_array(scale).astype(np.float64)
    if steps.shape != g.shape or axis != 0 or not np.all(g != 0):
        return False
    values = numpy_helper.to_array(codes)
    sign = np.where(g < 0, -1, 1).reshape(-1, *([1] * (values.ndim - 1)))
    codes.CopyFrom(numpy_helper.from_array((values * sign).astype(values.dtype), codes.name))
    scale.CopyFrom(numpy_helper.from_array((steps * np.abs(g)).astype(np.float32), scale.name))
    bias = numpy_helper.to_array(inits[conv.input[2]]) if len(conv.input) > 2 else 0.0
    folded = numpy_helper.from_array(
        ((np.asarray(bias, np.float64) - mean) * g + beta).astype(np.float32),
        f"{conv.output[0]}_folded_bias",
    )
    inits[folded.name] = folded
    conv.input.extend([""] * (3 - len(conv.input)))
    conv.input[2] = folded.name
    conv.output[0] = norm.output[0]
    return True

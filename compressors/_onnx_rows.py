"""Linear layers on ``(batch, tokens, features)`` activations in a W8A8 graph as ``Gemm`` on rows.

torch exports a Linear applied to a 3-D tensor as ``MatMul`` and ``Add`` (the bias). With
activation grids ONNX Runtime runs the ``MatMul`` as ``MatMulIntegerToFloat`` and the ``Add``
apart: a float pass over the output, and no integer output (a ``QuantizeLinear`` after the
``Add`` does not fuse). `gemm_rows` writes each such layer as a ``Gemm`` on ``(batch * tokens,
features)`` between two ``Reshape`` nodes, its bias as INT32 codes at ``input_scale *
weight_scale`` (as `compressors._onnx_qdq` writes a Conv's or Gemm's), so that ONNX Runtime
fuses ``QGemm`` with the bias inside; where the next quantized layer reads the output through a
ReLU only (a transformer layer's feed-forward ``linear1 -> ReLU -> linear2``, the second's grid
starting at 0), the reshapes between the two are dropped, ONNX Runtime removes the ReLU before
the ``QuantizeLinear`` and the first ``QGemm`` writes uint8 codes on the second's grid (the
same values: the grid clips what the ReLU zeroes). The reshape back to three axes uses ``-1``
for the batch: ONNX Runtime then keeps a residual ``Add`` and ``LayerNormalization`` apart
(`compressors._onnx_attention` says why).

Only a layer whose input has a fixed number of tokens and features and whose grids are private
to it (one reader of its ``QuantizeLinear`` / ``DequantizeLinear`` pair) is rewritten.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compressors._onnx_graph import graph_index, quantized_linear

#: Ops between two rewritten layers that act on each value alone (the reshapes around them go).
_ELEMENTWISE = ("Relu",)


def gemm_rows(proto: Any) -> int:
    """Rewrite the W8A8 ``MatMul`` + bias ``Add`` layers of ``proto`` on 3-D activations as
    ``Gemm`` on rows (in place); returns how many."""
    from onnx import shape_inference

    graph = proto.graph
    candidates = [n for n in graph.node if n.op_type == "MatMul"]
    if not candidates or not any(_fixed_past_batch(value) for value in graph.input):
        return 0  # (token inputs of any length: no 3-D activation with fixed axes to find)
    shapes = {}
    inferred = shape_inference.infer_shapes(proto, strict_mode=False).graph
    for value in [*inferred.value_info, *inferred.input]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    inits, makers, readers = graph_index(graph)
    unread_biases = set()
    made = []  # (reshape to rows, reshape back): their outputs
    before: dict[int, Any] = {}
    instead: dict[int, list] = {}
    layers = {
        id(m): found for m in candidates if (found := _layer(m, makers, readers, inits, shapes))
    }
    for matmul in candidates:
        found = layers.get(id(matmul))
        if found is None or not all(id(r) in layers for r in readers[matmul.input[0]]):
            continue  # (every reader of the input grid on rows, or none: the q, k, v projections)
        to_rows = before.get(id(found["quantize"]))
        to_rows, nodes = _rewrite(graph, matmul, found, inits, to_rows)
        unread_biases.add(found["bias"])
        before[id(found["quantize"])] = to_rows
        instead[id(matmul)] = nodes
        instead[id(found["add"])] = []
        made.append((to_rows.output[0], nodes[-1].output[0]))
    if not made:
        return 0
    ordered = []
    for node in graph.node:
        ordered += [before[id(node)]] if id(node) in before else []
        ordered += instead.get(id(node), [node])
    del graph.node[:]
    graph.node.extend(ordered)
    read = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name in unread_biases and i.name not in read]:
        graph.initializer.remove(init)
    _join(graph, made)
    return len(made)


def _layer(matmul, makers, readers, inits, shapes) -> dict | None:
    from onnx import numpy_helper

    found = quantized_linear(matmul, makers, readers, inits)
    if found is None or len(readers.get(found["quantize"].output[0], [])) != 1:
        return None  # (a grid shared with other readers keeps its shape)
    shape = shapes.get(matmul.input[0], [])
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        return None
    return {
        **found,
        "scale": numpy_helper.to_array(inits[found["scale"]]),
        "tokens": shape[1],
        "features": shape[2],
        "outputs": int(inits[found["codes"]].dims[1]),
    }


def _rewrite(graph, matmul, found: dict, inits: dict, to_rows: Any = None) -> tuple[Any, list]:
    """The reshape to rows before the layer's ``QuantizeLinear`` and the nodes in place of its
    ``MatMul`` (its ``Add`` goes); the bias' codes added to the graph."""
    from onnx import helper, numpy_helper

    quantize, add = found["quantize"], found["add"]
    base = matmul.output[0]
    input_scale = numpy_helper.to_array(inits[quantize.input[1]]).astype(np.float64)
    bias_scale = (input_scale * found["scale"].astype(np.float64)).astype(np.float32)
    bias_scale = np.broadcast_to(bias_scale, (found["outputs"],)).copy()
    bias = numpy_helper.to_array(inits[found["bias"]]).astype(np.float64)
    codes = np.clip(np.round(bias / bias_scale.astype(np.float64)), -(2**31), 2**31 - 1)
    graph.initializer.extend(
        [
            numpy_helper.from_array(codes.astype(np.int32), f"{base}_bias_quantized"),
            numpy_helper.from_array(bias_scale, f"{base}_bias_scale"),
            numpy_helper.from_array(
                np.array([-1, found["tokens"], found["outputs"]], np.int64), f"{base}_tokens"
            ),
        ]
    )
    if to_rows is None:  # (else made for another reader of the same grid)
        graph.initializer.append(
            numpy_helper.from_array(np.array([-1, found["features"]], np.int64), f"{base}_rows")
        )
        to_rows = helper.make_node(
            "Reshape",
            [quantize.input[0], f"{base}_rows"],
            [f"{base}_input_rows"],
        )
        quantize.input[0] = to_rows.output[0]
    bias_dq = helper.make_node(
        "DequantizeLinear",
        [f"{base}_bias_quantized", f"{base}_bias_scale"],
        [f"{base}_bias"],
        axis=0,
    )
    gemm = helper.make_node(
        "Gemm", [matmul.input[0], matmul.input[1], f"{base}_bias"], [f"{base}_rows_out"]
    )
    back = helper.make_node("Reshape", [gemm.output[0], f"{base}_tokens"], [add.output[0]])
    return to_rows, [bias_dq, gemm, back]


def _join(graph, made: list) -> None:
    """Drop the reshape back to three axes and the next layer's reshape to rows where only
    elementwise ops (`_ELEMENTWISE`) lie between them, each read once."""
    nodes = list(graph.node)
    by_name = {n.output[0]: n for n in nodes}
    backs = {id(by_name[back]): by_name[back] for _, back in made}
    makers = {out: node for node in nodes for out in node.output}
    readers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for rows_name in dict.fromkeys(rows for rows, _ in made):
        to_rows = by_name[rows_name]
        between = []
        source = makers.get(to_rows.input[0])
        while source is not None and source.op_type in _ELEMENTWISE:
            between.append(source)
            source = makers.get(source.input[0])
        if source is None or id(source) not in backs:
            continue
        chain = [source, *reversed(between)]
        if any(len(readers.get(n.output[0], [])) != 1 for n in chain):
            continue
        if between:
            between[-1].input[0] = source.input[0]
            readers_of_rows = readers.get(to_rows.output[0], [])
            for reader in readers_of_rows:
                reader.input[:] = [
                    to_rows.input[0] if i == to_rows.output[0] else i for i in reader.input
                ]
        else:
            for reader in readers.get(to_rows.output[0], []):
                reader.input[:] = [
                    source.input[0] if i == to_rows.output[0] else i for i in reader.input
                ]
        nodes.remove(to_rows)
        nodes.remove(source)
        del backs[id(source)]
    del graph.node[:]
    graph.node.extend(nodes)
    read = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(init)


def _fixed_past_batch(value: Any) -> bool:
    """Whether a graph input's axes past the first (the batch) all have fixed sizes."""
    dims = value.type.tensor_type.shape.dim
    return len(dims) > 1 and all(d.HasField("dim_value") for d in dims[1:])

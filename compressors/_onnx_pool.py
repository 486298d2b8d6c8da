"""The pooled tail of a W8A8 CNN in integer kernels: ``QLinearGlobalAveragePool``.

torch exports ``AdaptiveAvgPool2d(1)`` as a ``ReduceMean`` over the two spatial axes. In a W8A8
graph (`compressors._onnx_qdq`) the pool reads the last block's activation (a ReLU or ReLU6 of
a quantized conv output, or of a residual sum of two) and the head's input grid quantizes its
output; nothing quantizes the pool's input, so ONNX Runtime ran, at batch 32 on the zoo's
ResNet (one thread): ``Transpose`` (NHWC to NCHW), two ``DequantizeLinear``, a float ``Add``, a
``Relu``, the ``ReduceMean`` and a ``QuantizeLinear``, 21 us of float work around 104 us of
integer convolutions (MobileNet: ``Transpose``, ``DequantizeLinear``, ``Clip``, ``ReduceMean``,
``QuantizeLinear``, 20 us).

`integer_pools` writes such a pool as ``GlobalAveragePool`` (the same values) and, unless a
``DequantizeLinear`` makes its input, quantizes its input on a grid of its own that holds every
value the activation can take:

- a ReLU of a residual sum of two dequantized tensors: from 0 to the sum of the two grids'
  largest values (ONNX Runtime then runs the sum as ``QLinearAdd`` with the ReLU fused away);
- a ReLU of one dequantized tensor: that tensor's step from 0 (the same values: exact);
- a ``Clip`` from 0 to ``c`` (ReLU6): its step from 0 where 255 steps stay within ``c`` (exact),
  else ``c / 255`` from 0, so that ONNX Runtime drops the ``Clip`` before the ``QuantizeLinear``.

Where the activation reads a Conv's output grid that nothing else reads (MobileNet's last
pointwise conv, BatchNorm folded, then ReLU6), that grid becomes the new one and the activation
goes: the conv's ``QLinearConv`` writes its output clipped on the pool's grid (one rounding, of
the clipped value, where the torch model rounds on the conv's grid, then clips: the two differ
by half a step of each at most).

ONNX Runtime then fuses ``DequantizeLinear -> GlobalAveragePool -> QuantizeLinear`` into
``QLinearGlobalAveragePool`` (NHWC, after the last ``QLinearConv``) and the head's ``QGemm``
reads its uint8 output. The new grid rounds each value once more (half a step at most; a ReLU
of one tensor not at all), where the torch model pools the float activation: averaged over the
pooled positions before the head's own grid rounds the mean. Only a pool whose output reaches a
``QuantizeLinear`` through reshapes alone, and whose input no other node reads, is rewritten.

`float_pools` writes every other spatial mean pool (any graph's) as a float
``GlobalAveragePool``: ONNX Runtime runs it on its NCHWc convolutions' blocks, where a
``ReduceMean`` waits for the whole activation reordered to NCHW.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compressors._onnx_graph import graph_index

#: Ops between the pool and the head's ``QuantizeLinear`` (shape only).
_RESHAPES = ("Reshape", "Flatten", "Squeeze")


def integer_pools(proto: Any) -> int:
    """Rewrite the spatial mean pools of ``proto`` as described above (in place); returns how
    many."""
    from onnx import helper, numpy_helper, shape_inference

    graph = proto.graph
    means = [n for n in graph.node if n.op_type in ("ReduceMean", "GlobalAveragePool")]
    if not means:
        return 0
    inferred = shape_inference.infer_shapes(proto, strict_mode=False).graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in inferred.value_info}
    inits, makers, readers = graph_index(graph)
    placed: dict[int, list] = {}
    removed: list = []
    direct = 0
    for pool in means:
        tensor = pool.input[0]
        activation = makers.get(tensor)
        if (
            activation is None
            or len(readers.get(tensor, [])) != 1
            or ranks.get(tensor) != 4
            or not _spatial(pool, inits)
            or not _quantized_after(pool, readers)
        ):
            continue
        if _dequantized(activation, inits, numpy_helper) is not None:  # (on a grid already)
            _global(pool)
            direct += 1
            continue
        grid = _grid(activation, makers, readers, inits, numpy_helper)
        if grid is None:
            continue
        base = f"{tensor}_pooled"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(grid, dtype=np.float32), f"{base}_scale"),
                numpy_helper.from_array(np.array(0, dtype=np.uint8), f"{base}_zero_point"),
            ]
        )
        names = [f"{base}_scale", f"{base}_zero_point"]
        pair = _private_pair(activation, makers, readers)
        if pair is not None:  # (the grid of the conv's output: one rounding, the activation in it)
            pair[0].input[1:3] = names
            pair[1].input[1:3] = names
            pool.input[0] = pair[1].output[0]
            removed.append(activation)
        else:
            activation.output[0] = f"{base}_float"
            placed[id(activation)] = [
                helper.make_node(
                    "QuantizeLinear", [f"{base}_float", *names], [f"{base}_quantized"]
                ),
                helper.make_node("DequantizeLinear", [f"{base}_quantized", *names], [tensor]),
            ]
        _global(pool)
    if placed or removed:
        ordered = []
        for node in graph.node:
            if all(node is not gone for gone in removed):
                ordered += [node, *placed.get(id(node), [])]
        del graph.node[:]
        graph.node.extend(ordered)
    return len(placed) + len(removed) + direct


def float_pools(proto: Any) -> int:
    """Write each spatial mean pool of ``proto`` left as ``ReduceMean`` (over the last two axes
    of a 4-D tensor, kept) as ``GlobalAveragePool`` (in place); returns how many.

    The same mean (float sums in another order: within 4e-6 on the zoo's CNNs), which ONNX
    Runtime runs on the NCHWc blocks its float convolutions write, where it reorders the whole
    activation to NCHW for a ``ReduceMean``: the zoo MobileNet's fp32 graph at batch 32 went
    from 76 to 71 us of kernels in ONNX Runtime's profile (``ReduceMean`` 6 us and the reorder
    5 us, against a pool of 4 us and the reorder of the pooled vector 2 us); at 16 channels in
    every layer, 54 to 49 us."""
    graph = proto.graph
    means = [n for n in graph.node if n.op_type == "ReduceMean"]
    if not means:
        return 0
    ranks = _ranks(proto)
    inits = {i.name: i for i in graph.initializer}
    done = 0
    for pool in means:
        if ranks.get(pool.input[0]) == 4 and _spatial(pool, inits):
            _global(pool)
            done += 1
    return done


def _ranks(proto: Any) -> dict[str, int]:
    """The rank of each tensor of ``proto``'s graph that ONNX's shape inference knows, inferred
    on a copy holding the initializers' types and shapes, not their values (a large model's
    weights are not copied)."""
    from onnx import helper, shape_inference

    graph = proto.graph
    declared = [
        helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in graph.initializer
    ]
    bare = helper.make_graph(
        list(graph.node), "ranks", [*graph.input, *declared], list(graph.output)
    )
    copy = helper.make_model(bare, opset_imports=list(proto.opset_import))
    copy.ir_version = proto.ir_version
    copy.functions.extend(proto.functions)
    inferred = shape_inference.infer_shapes(copy, strict_mode=False).graph
    tensors = [*inferred.value_info, *inferred.input]
    return {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in tensors
        if v.type.tensor_type.HasField("shape")
    }


def _global(pool) -> None:
    pool.op_type = "GlobalAveragePool"
    del pool.input[1:]
    del pool.attribute[:]


def _private_pair(activation, makers: dict, readers: dict) -> tuple | None:
    """The ``QuantizeLinear`` / ``DequantizeLinear`` pair on a Conv's output that ``activation``
    alone reads (through the pair alone), else None."""
    dq = makers.get(activation.input[0])
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = makers.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear" or len(readers.get(q.output[0], [])) != 1:
        return None
    conv = makers.get(q.input[0])
    if conv is None or conv.op_type != "Conv" or len(readers.get(conv.output[0], [])) != 1:
        return None
    return q, dq


def _spatial(pool, inits: dict) -> bool:
    """Whether ``pool`` averages the last two axes of a 4-D tensor and keeps them (as
    ``GlobalAveragePool`` does)."""
    from onnx import helper, numpy_helper

    if pool.op_type == "GlobalAveragePool":
        return True
    attrs = {a.name: helper.get_attribute_value(a) for a in pool.attribute}
    if attrs.get("keepdims", 1) != 1:
        return False
    if len(pool.input) > 1 and pool.input[1]:
        if pool.input[1] not in inits:
            return False
        axes = numpy_helper.to_array(inits[pool.input[1]]).tolist()
    else:
        axes = list(attrs.get("axes", []))
    return sorted(a % 4 for a in axes) == [2, 3]


def _quantized_after(pool, readers: dict) -> bool:
    """Whether the pool's output reaches only ``QuantizeLinear`` nodes, through reshapes."""
    tensor, seen = pool.output[0], 0
    while True:
        after = readers.get(tensor, [])
        if len(after) != 1:
            return False
        if after[0].op_type == "QuantizeLinear":
            return True
        if after[0].op_type not in _RESHAPES or seen > 4:
            return False
        tensor, seen = after[0].output[0], seen + 1


def _grid(activation, makers: dict, readers: dict, inits: dict, numpy_helper) -> float | None:
    """The step (from 0) of a uint8 grid holding every value ``activation`` can output, or
    None where it is not a ReLU or a ``Clip`` from 0 of dequantized tensors."""
    if activation.op_type == "Relu":
        top = None
    elif activation.op_type == "Clip" and len(activation.input) == 3:
        low, high = (_constant(name, inits, numpy_helper) for name in activation.input[1:])
        if low != 0 or high is None or high <= 0:
            return None
        top = high
    else:
        return None
    source = makers.get(activation.input[0])
    if source is None or len(readers.get(activation.input[0], [])) != 1:
        return None
    if source.op_type == "DequantizeLinear":
        grid = _dequantized(source, inits, numpy_helper)
        if grid is None:
            return None
        step, _ = grid
        return step if top is None or 255 * step <= top else top / 255
    if source.op_type != "Add":
        return None
    grids = [_dequantized(makers.get(name), inits, numpy_helper) for name in source.input]
    if any(g is None for g in grids):
        return None
    high = sum(step * (255 - zero) for step, zero in grids)
    return (high if top is None else min(high, top)) / 255


def _dequantized(node, inits: dict, numpy_helper) -> tuple[float, int] | None:
    """The (step, zero point) of a per-tensor uint8 ``DequantizeLinear``, else None."""
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
        return None
    step = _constant(node.input[1], inits, numpy_helper)
    zero = inits.get(node.input[2])
    if step is None or zero is None or zero.data_type != 2:  # (2: UINT8)
        return None
    return step, int(_constant(node.input[2], inits, numpy_helper))


def _constant(name: str, inits: dict, numpy_helper) -> float | None:
    """The value of a one-element initializer ``name``, else None."""
    if name not in inits:
        return None
    value = numpy_helper.to_array(inits[name])
    return float(value.reshape(-1)[0]) if value.size == 1 else None

"""Channels-last hints in a W8A8 CNN graph: no ``Transpose`` around ONNX Runtime's integer sums
and pools.

ONNX Runtime's CPU provider (``ORT_ENABLE_ALL``, as `compressors.onnx_export.ort_session` loads
every graph) runs ``QLinearConv``, ``QLinearAdd`` and ``QLinearGlobalAveragePool`` channels-last
(NHWC): its layout transformer puts a ``Transpose`` to NHWC before each such node and one back to
NCHW after it, then cancels the pairs it can push into each other. Two places of the graphs
`compressors._onnx_qdq` writes kept theirs (zoo ResNet at batch 32, one thread):

- a tensor quantized from float NCHW (the output of a float stem conv that
  `compressors._act_quant.int8_friendly` leaves float) that a ``QLinearConv`` and a residual
  ``QLinearAdd`` both read: the transformer ran the first block's sum NCHW, with a ``Transpose``
  of the conv's output before it and of the sum after it (about 6 us);
- a global pool's ``(batch, 1, 1, channels)`` output transposed back to NCHW before the head's
  reshape (3-5 us).

`nhwc_hints` writes the first one's quantized tensor as ``Transpose`` to NHWC, a ``Reshape``
that keeps its shape and a ``Transpose`` back: the same values in any session, and a
``Transpose`` from NHWC on every reader, which the transformer's own NHWC ``Transpose`` of each
integer reader cancels (the ``Reshape`` keeps ONNX Runtime's basic transpose optimizer from
cancelling the pair before the layout is chosen). The sum then runs NHWC; one ``Transpose`` of
uint8 codes stays after the stem's ``QuantizeLinear`` (ONNX Runtime moves a ``QuantizeLinear``
before a ``Transpose``). The pool's output gets a ``Transpose`` to NHWC before its reshape (the
same memory order: its spatial axes are 1), which cancels the transformer's one back.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compressors._onnx_graph import graph_index

#: Ops between a float conv and its ``QuantizeLinear`` (its BatchNorm, which the W8A8 export
#: leaves to ONNX Runtime to fold into a float conv, and elementwise activations).
_ELEMENTWISE = ("BatchNormalization", "Relu", "Clip", "LeakyRelu", "HardSigmoid", "Sigmoid")
#: A ``Reshape`` target keeping a 4-D shape as it is.
_KEEP = "nhwc_hint_keep_shape"


def nhwc_hints(proto: Any) -> int:
    """Write the hints described above into ``proto`` (in place); returns how many."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits, makers, readers = graph_index(graph)
    after: dict[int, list] = {}
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        if not _from_float_conv(q, makers, inits) or not _conv_and_sum(q, readers, inits):
            continue
        codes = q.output[0]
        q.output[0] = f"{codes}_nchw"
        after[id(q)] = [
            helper.make_node("Transpose", [q.output[0]], [f"{codes}_nhwc"], perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", [f"{codes}_nhwc", _KEEP], [f"{codes}_kept"]),
            helper.make_node("Transpose", [f"{codes}_kept"], [codes], perm=[0, 3, 1, 2]),
        ]
    for pool in [n for n in graph.node if n.op_type == "GlobalAveragePool"]:
        source = makers.get(pool.input[0])
        flat = readers.get(pool.output[0], [])
        if source is None or source.op_type != "DequantizeLinear" or len(flat) != 1:
            continue
        if flat[0].op_type not in ("Reshape", "Flatten"):  # (a Squeeze names axes: not these)
            continue
        mean = pool.output[0]
        pool.output[0] = f"{mean}_nchw"
        after[id(pool)] = [
            helper.make_node("Transpose", [pool.output[0]], [mean], perm=[0, 2, 3, 1])
        ]
    if not after:
        return 0
    if any(len(extra) == 3 for extra in after.values()) and _KEEP not in inits:
        graph.initializer.append(numpy_helper.from_array(np.array([0, 0, 0, -1], np.int64), _KEEP))
    ordered = []
    for node in graph.node:
        ordered += [node, *after.get(id(node), [])]
    del graph.node[:]
    graph.node.extend(ordered)
    return len(after)


def _from_float_conv(q, makers: dict, inits: dict) -> bool:
    """Whether ``q`` quantizes the output of a float Conv (through `_ELEMENTWISE` ops):
    a Conv whose input and weight no ``DequantizeLinear`` makes."""
    node = makers.get(q.input[0])
    for _ in range(4):
        if node is None or node.op_type not in _ELEMENTWISE:
            break
        node = makers.get(node.input[0])
    if node is None or node.op_type != "Conv":
        return False
    return not any(
        (maker := makers.get(name)) is not None and maker.op_type == "DequantizeLinear"
        for name in node.input[:2]
    )


def _conv_and_sum(q, readers: dict, inits: dict) -> bool:
    """Whether ``q``'s codes, dequantized, reach a Conv (an integer one: its output quantized)
    and an ``Add`` (a residual sum): the readers ONNX Runtime runs channels-last."""
    ops = set()
    for dq in readers.get(q.output[0], []):
        if dq.op_type != "DequantizeLinear":
            return False
        for reader in readers.get(dq.output[0], []):
            if reader.op_type == "Conv" and any(
                r.op_type == "QuantizeLinear" for r in readers.get(reader.output[0], [])
            ):
                ops.add("Conv")
            elif reader.op_type == "Add":
                ops.add("Add")
    return ops == {"Conv", "Add"}

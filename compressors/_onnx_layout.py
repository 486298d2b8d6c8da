"""Channels-last hints in a W8A8 CNN graph: no ``Transpose`` between a float stem and ONNX
Runtime's NHWC integer kernels, around a residual sum, or after a pool.

ONNX Runtime's CPU provider (``ORT_ENABLE_ALL``, as `compressors.onnx_export.ort_session` loads
every graph) runs ``QLinearConv``, ``QLinearAdd`` and ``QLinearGlobalAveragePool`` channels-last
(NHWC): its layout transformer puts a ``Transpose`` to NHWC before each such node and one back to
NCHW after it, then cancels the pairs it can push into each other. In the graphs
`compressors._onnx_qdq` writes, three kinds stayed (zoo ResNet at batch 32, one thread):

- the codes of a float conv's output (a stem that `compressors._act_quant.int8_friendly` leaves
  float) transposed to NHWC after its ``QuantizeLinear``, behind the float conv's NCHWc
  ``ReorderOutput`` to NCHW;
- where a residual ``QLinearAdd`` reads those codes beside a ``QLinearConv``, the sum run NCHW,
  with a ``Transpose`` of the conv's output before it and of the sum after it (about 6 us);
- a global pool's ``(batch, 1, 1, channels)`` output transposed back to NCHW before the head's
  reshape (3-5 us).

`nhwc_hints` writes the float conv's output (after its BatchNorm, before its activations) as a
``Transpose`` to NHWC and a ``Reshape`` that keeps its shape, and the codes after the
``QuantizeLinear`` as a ``Transpose`` back to NCHW: the same values in any session (the
activations between them are elementwise, the grid per tensor). ONNX Runtime's NCHWc pass then
writes the conv's output NHWC (``ReorderOutput`` with ``channels_last``), and the layout
transformer's ``Transpose`` to NHWC before each integer reader cancels the one back (the
``Reshape`` keeps the basic transpose optimizer from cancelling the pair before the layout is
chosen). Without activations between the conv and its ``QuantizeLinear`` (ONNX Runtime moves a
``QuantizeLinear`` before a ``Transpose`` and a ``Reshape``) the pair goes on the codes instead,
where a residual sum reads them: one ``Transpose`` of uint8 codes stays, the sum runs NHWC. The
pool's output gets a ``Transpose`` to NHWC before its reshape (the same memory order: its
spatial axes are 1), which cancels the transformer's one back. Measured on the zoo ResNet
(AVX2, one thread): 4 ``Transpose`` nodes to none, 1.37-1.40x to 1.43-1.46x fp32's speed at
batch 32; MobileNet 2 to none, the NHWC ``ReorderOutput`` slower than the NCHW one by about the
saved transpose (at par). A session without the NHWC layout pass (``ORT_ENABLE_EXTENDED`` or
lower, another execution provider) runs the hints' ``Transpose`` nodes as written: 3 in the
ResNet's graph and in the MobileNet's (same values).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compressors._onnx_graph import graph_index

#: Elementwise activations between a float conv (its BatchNorm, which the W8A8 export leaves
#: to ONNX Runtime to fold into a float conv) and its ``QuantizeLinear``: any layout.
_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "HardSigmoid", "Sigmoid")
#: A ``Reshape`` target keeping a 4-D shape as it is.
_KEEP = "nhwc_hint_keep_shape"


def nhwc_hints(proto: Any) -> int:
    """Write the hints described above into ``proto`` (in place); returns how many."""
    from onnx import helper, numpy_helper, shape_inference

    graph = proto.graph
    inferred = shape_inference.infer_shapes(proto, strict_mode=False).graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in inferred.value_info}
    ranks.update({v.name: len(v.type.tensor_type.shape.dim) for v in graph.input})
    inits, makers, readers = graph_index(graph)
    after: dict[int, list] = {}
    hints = 0
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:  # (of 4-D tensors)
        chain = _float_conv_chain(q, makers, readers, inits)
        if ranks.get(q.input[0]) != 4 or chain is None:
            continue
        if not _integer_readers(q, readers, chain[0] is not q):
            continue
        codes = q.output[0]
        q.output[0] = f"{codes}_nhwc"
        after[id(q)] = [helper.make_node("Transpose", [q.output[0]], [codes], perm=[0, 3, 1, 2])]
        hints += 1
        made = chain[0]  # (the conv or its BatchNorm; or the QuantizeLinear: on its codes)
        value = made.output[0]
        made.output[0] = f"{value}_nchw"
        after.setdefault(id(made), [])[:0] = [
            helper.make_node("Transpose", [made.output[0]], [f"{value}_nhwc"], perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", [f"{value}_nhwc", _KEEP], [value]),
        ]
    for pool in [n for n in graph.node if n.op_type == "GlobalAveragePool"]:
        source = makers.get(pool.input[0])
        flat = readers.get(pool.output[0], [])
        if source is None or source.op_type != "DequantizeLinear" or len(flat) != 1:
            continue
        if ranks.get(pool.input[0]) != 4:  # (images only: 2-D convolutions)
            continue
        if flat[0].op_type not in ("Reshape", "Flatten"):  # (a Squeeze names axes: not these)
            continue
        mean = pool.output[0]
        pool.output[0] = f"{mean}_nchw"
        after[id(pool)] = [
            helper.make_node("Transpose", [pool.output[0]], [mean], perm=[0, 2, 3, 1])
        ]
        hints += 1
    if not after:
        return 0
    if any(len(extra) > 1 for extra in after.values()) and _KEEP not in inits:
        graph.initializer.append(numpy_helper.from_array(np.array([0, 0, 0, -1], np.int64), _KEEP))
    ordered = []
    for node in graph.node:
        ordered += [node, *after.get(id(node), [])]
    del graph.node[:]
    graph.node.extend(ordered)
    return hints


def _float_conv_chain(q, makers: dict, readers: dict, inits: dict) -> list | None:
    """``[where the NHWC hint goes, activations..., q]`` where ``q`` quantizes the output of a
    float Conv (input and weight made by no ``DequantizeLinear``; BatchNorms after it) through
    `_ACTIVATIONS` that nothing else reads; None where ``q`` quantizes anything else. The hint
    goes after the Conv or its last BatchNorm where ``q`` is per tensor and activations are
    between them (ONNX Runtime moves a ``QuantizeLinear`` before a ``Transpose`` and a
    ``Reshape``, not before an activation), else after ``q`` (on the codes)."""
    chain, node = [q], makers.get(q.input[0])
    while node is not None and node.op_type in _ACTIVATIONS and len(chain) < 6:
        if len(readers.get(node.output[0], [])) != 1:
            return None
        chain.insert(0, node)
        node = makers.get(node.input[0])
    made, conv = node, node
    while conv is not None and conv.op_type == "BatchNormalization":
        conv = makers.get(conv.input[0])
    if made is None or conv is None or conv.op_type != "Conv":
        return None
    if len(readers.get(made.output[0], [])) != 1 or any(
        (maker := makers.get(name)) is not None and maker.op_type == "DequantizeLinear"
        for name in conv.input[:2]
    ):
        return None
    scale = inits.get(q.input[1])
    per_tensor = scale is not None and int(np.prod(scale.dims)) == 1
    return [made, *chain] if len(chain) > 1 and per_tensor else [q]


def _integer_readers(q, readers: dict, single: bool) -> bool:
    """Whether ``q``'s codes, dequantized, reach only Convs whose outputs are quantized (the
    integer convolutions ONNX Runtime runs channels-last) and ``Add`` nodes (residual sums),
    a Conv among them, and an ``Add`` too unless ``single`` (where the hint also takes the
    ``Transpose`` of the codes away: worth it for one integer reader)."""
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
            else:
                return False
    return "Conv" in ops and (single or "Add" in ops)

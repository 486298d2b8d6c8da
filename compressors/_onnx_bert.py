"""Hugging Face BERT-style self-attention (masked, or unmasked as ViT's) and quantized embedding
tables in a W8A8 graph, rewritten for ONNX Runtime's CPU kernels.

A BERT layer's attention (``BertSelfAttention``: ``query``, ``key`` and ``value`` Linear layers
on the one input grid, ``num_attention_heads`` heads) exports, with a padding mask and a dynamic
number of tokens, as three ``MatMul`` + bias ``Add``, a ``Reshape`` and ``Transpose`` per
projection (the key's transposed twice more, with ``Shape`` / ``Slice`` / ``Concat`` to compute
the shapes), the scaled products, the mask's ``Add``, ``Softmax``, an ``IsNaN`` / ``Where``
guard, the product with the values and a ``Transpose`` + ``Reshape`` back: some 30 nodes per
layer, about half of ONNX Runtime's time in all-MiniLM-L6-v2's W8A8 graph at batch 1 went to
such float work beside the integer kernels.

`fuse_bert_attention` replaces that part of each layer, from the projections' input grid to the
tensor the output projection's grid quantizes, by ONNX Runtime's ``QAttention`` (domain
``com.microsoft``, CPU provider): the three projections as one integer GEMM on the file's codes
(``(features, 3 * width)``, per-column scales), their biases, and each head's masked softmax
attention inside one kernel, writing ``(batch, tokens, width)`` as the output projection reads
it. Its mask is the layer's own boolean mask (``Where(mask, 0, -inf)`` before the ``Add``), as
``(batch, tokens, tokens)`` int32, made once for all layers; ONNX Runtime fills masked scores
with -10000 where the exported graph has -inf: the same probabilities (``exp(-10000)`` is 0 in
float32) wherever a row keeps a real token (every row of a sentence with one). DistilBERT's
attention (``q_lin``, ``k_lin``, ``v_lin``, ``n_heads``) exports the same way. An unmasked
attention (ViT's: ``ViTAttention``'s ``q_proj``, ``k_proj``, ``v_proj``; its scores either go
straight into the softmax or get transformers' all-true mask, an ``Expand`` of a constant) gets
``QAttention`` without a mask. Projections without biases (ViT's ``qkv_bias=False``) get
``QAttention``'s bias as zeros. A layer whose graph differs (another mask or any other term on
the scores, a scale other than ``head width ** -0.5``, projections not on one grid) keeps the
exported form.

`gather_codes` makes an embedding table whose codes a ``DequantizeLinear`` (per row) feeds
``Gather`` read its rows from the codes: ``Gather`` of the codes and of the rows' scales, a
``Cast`` and a ``Mul``. With QDQ handling on (as in a W8A8 session) ONNX Runtime keeps the
``DequantizeLinear`` and dequantized all of MiniLM's token and position tables at every call
(some 0.8M values) to read 17 rows of each. The values are the same: ``code * scale``.

Both write ONNX Runtime's contrib op or standard ops only where the graph already runs on its
QDQ fusions (``quant.activations=8``); the file then needs ONNX Runtime (``QAttention``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from compressors._onnx_graph import graph_index, is_op, quantized_linear, topological

#: Ops of the exported attention between the projections' bias ``Add`` and the output grid.
_ATTENTION_OPS = frozenset(
    {
        "Add",
        "Concat",
        "Div",
        "Gather",
        "IsNaN",
        "MatMul",
        "Mul",
        "Reshape",
        "Shape",
        "Slice",
        "Softmax",
        "Squeeze",
        "Transpose",
        "Unsqueeze",
        "Where",
    }
)
#: ONNX Runtime's contrib domain.
MS_DOMAIN = "com.microsoft"
#: `_mask_condition`'s answer for scores without a mask (``QAttention`` gets no mask_index).
UNMASKED = ""


#: Names of a self-attention module's query, key and value Linear children and of its head
#: width: BERT's (``BertSelfAttention``), DistilBERT's (``DistilBertSelfAttention``) and those
#: of transformers' newer attention modules (``ViTAttention``, ``CLIPAttention``,
#: ``SiglipAttention`` and others, whose output projection sits beside them).
_NAMINGS = (
    (("query", "key", "value"), "attention_head_size"),
    (("q_lin", "k_lin", "v_lin"), "attention_head_size"),
    (("q_proj", "k_proj", "v_proj"), "head_dim"),
)
#: Names of a self-attention module's number of heads: BERT's and ViT's, DistilBERT's, CLIP's.
_HEADS = ("num_attention_heads", "n_heads", "num_heads")


def bert_attention(model: nn.Module) -> dict[str, tuple[tuple[str, str, str], int]]:
    """``{attention module: ((query, key, value) layer names, heads)}`` of ``model``'s
    Hugging Face self-attention modules: ``query``, ``key`` and ``value`` (or ``q_lin``,
    ``k_lin``, ``v_lin``, or ``q_proj``, ``k_proj``, ``v_proj``) Linear children of one width,
    ``num_attention_heads`` (or ``n_heads``, ``num_heads``) heads of ``attention_head_size``
    (or ``head_dim``), not causal."""
    found = {}
    for name, module in model.named_modules():
        heads = next((getattr(module, h) for h in _HEADS if hasattr(module, h)), None)
        if not isinstance(heads, int) or getattr(module, "is_causal", False) is True:
            continue
        for children, width in _NAMINGS:
            size = getattr(module, width, None)
            layers = [getattr(module, n, None) for n in children]
            if not isinstance(size, int):
                continue
            if not all(isinstance(layer, nn.Linear) for layer in layers):
                continue
            if any(layer.out_features != heads * size for layer in layers):
                continue
            prefix = f"{name}." if name else ""
            found[name] = (tuple(f"{prefix}{n}" for n in children), heads)
            break
    return found


def fuse_bert_attention(
    proto: Any, sites: Mapping[str, str], attention: Mapping[str, tuple[tuple[str, str, str], int]]
) -> list[str]:
    """Rewrite each attention of ``attention`` (`bert_attention`) whose three projections'
    ``MatMul`` outputs are in ``sites`` (`compressors._onnx_qdq.ActivationQDQ`, after its
    grids are written) as ``QAttention``; returns the attention modules rewritten."""
    done = []
    masks: dict[str, str] = {}
    for name, (layers, heads) in attention.items():
        if not all(layer in sites for layer in layers):
            continue
        if _rewrite(proto, [sites[layer] for layer in layers], heads, name, masks):
            done.append(name)
    if done:
        _drop_unused(proto.graph)
        if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
            from onnx import helper

            proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return done


def _rewrite(proto: Any, outputs: list[str], heads: int, name: str, masks: dict) -> bool:
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits, makers, readers = graph_index(graph)
    projections = [
        _projection(makers.get(out), makers, readers, inits, unbiased=True) for out in outputs
    ]
    if any(p is None for p in projections):
        return False
    grids = {p["quantize"].output[0] for p in projections}
    if len(grids) != 1:
        return False  # (not one input grid)
    quantize = projections[0]["quantize"]
    region = _region([(p["add"] or p["matmul"]).output[0] for p in projections], readers)
    if region is None:
        return False
    nodes, end = region
    inside = {id(n) for n in nodes}
    made = {o for n in nodes for o in n.output}
    if any(n.op_type not in _ATTENTION_OPS for n in nodes):
        return False
    if (
        sum(n.op_type == "Softmax" for n in nodes) != 1
        or sum(n.op_type == "MatMul" for n in nodes) != 2
    ):
        return False
    outside_reads = {i for n in graph.node if id(n) not in inside for i in n.input}
    if (made - {end}) & outside_reads or (made & {o.name for o in graph.output}):
        return False
    condition = _mask_condition(nodes, made, makers, inits)
    if condition is None:
        return False
    width = int(inits[projections[0]["codes"]].dims[1])
    if width % heads or not _scaled_right(nodes, made, inits, width // heads):
        return False
    arrays = [
        [numpy_helper.to_array(inits[i]) for i in (p["codes"], p["scale"], p["zero"])]
        + [np.zeros(width, np.float32) if p["bias"] is None else _array(inits[p["bias"]])]
        for p in projections
    ]  # (a projection without bias, as ViT's with qkv_bias=False: zeros)
    if any(a[0].dtype != np.int8 or a[0].shape[1] != width for a in arrays):
        return False
    base = (name or "model").replace(".", "_") + "_qattention"

    def per_column(values: np.ndarray) -> np.ndarray:
        return np.broadcast_to(values, (width,))

    constants = {
        f"{base}_weight": np.concatenate([a[0] for a in arrays], axis=1),
        f"{base}_weight_scale": np.concatenate([per_column(a[1]) for a in arrays]).astype(
            np.float32
        ),
        f"{base}_weight_zero_point": np.concatenate([per_column(a[2]) for a in arrays]),
        f"{base}_bias": np.concatenate([a[3] for a in arrays]).astype(np.float32),
    }
    for key, value in constants.items():
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), key))
    mask = UNMASKED if condition == UNMASKED else masks.get(condition)
    added = []
    if mask is None:
        mask = f"{base}_mask_index"
        graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), f"{base}_axis"))
        added += [
            helper.make_node("Squeeze", [condition, f"{base}_axis"], [f"{base}_mask_3d"]),
            helper.make_node("Cast", [f"{base}_mask_3d"], [mask], to=6),  # (int32)
        ]
        masks[condition] = mask
    scale, zero = quantize.input[1], quantize.input[2]
    added.append(
        helper.make_node(
            "QAttention",
            [
                quantize.output[0],
                f"{base}_weight",
                f"{base}_bias",
                scale,
                f"{base}_weight_scale",
                mask,
                zero,
                f"{base}_weight_zero_point",
            ],
            [end],
            domain=MS_DOMAIN,
            num_heads=heads,
        )
    )
    gone = inside | {id(p[k]) for p in projections for k in ("weight", "matmul", "add") if p[k]}
    ordered = []
    for node in graph.node:
        if id(node) not in gone:
            ordered.append(node)
        if node is quantize:
            ordered += added
    # (the mask's nodes read the condition: after its maker, which may come after the grid)
    ordered = topological(ordered, graph)
    del graph.node[:]
    graph.node.extend(ordered)
    return True


def _projection(matmul, makers, readers, inits, *, unbiased: bool = False) -> dict | None:
    """The nodes of one projection (`compressors._onnx_graph.quantized_linear`): the input
    grid (which other readers may share: a residual ``Add``), INT8 codes, ``MatMul``, the bias
    ``Add`` (None where ``unbiased`` and the layer has no bias)."""
    if matmul is None:
        return None
    return quantized_linear(matmul, makers, readers, inits, unbiased=unbiased)


def _array(init: Any) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(init)


def _region(starts: list[str], readers: dict) -> tuple[list, str] | None:
    """The nodes reading the projections' outputs, forward up to the ``QuantizeLinear`` of the
    output projection's grid (excluded), and the tensor it quantizes; None where the walk meets
    no such grid or more than one."""
    nodes: dict[int, Any] = {}
    ends = set()
    stack = list(starts)
    seen = set()
    while stack:
        tensor = stack.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        for reader in readers.get(tensor, []):
            if reader.op_type == "QuantizeLinear":
                ends.add(tensor)
                continue
            if id(reader) not in nodes:
                nodes[id(reader)] = reader
                stack.extend(reader.output)
            if len(nodes) > 64:
                return None
    if len(ends) != 1:
        return None
    return list(nodes.values()), next(iter(ends))


def _mask_condition(nodes: list, made: set, makers: dict, inits: dict) -> str | None:
    """The boolean mask the attention's scores get ``-inf`` from: ``Add(scores,
    Where(mask, 0, -big))`` before the ``Softmax``; ``""`` where the scores have no mask (no
    ``Add``, or a mask that keeps every score: an all-true constant, through ``Expand``, as
    transformers builds for ViT); None where the mask is another form."""
    from onnx import numpy_helper

    softmax = next(n for n in nodes if n.op_type == "Softmax")
    add = makers.get(softmax.input[0])
    inside = {id(n) for n in nodes}
    if not _guards_only(nodes, add, makers):
        return None
    if add is not None and add.op_type in ("MatMul", "Mul", "Div") and id(add) in inside:
        return UNMASKED  # (the scaled products straight into the softmax)
    if not is_op(add, "Add") or id(add) not in inside:
        return None
    other = [i for i in add.input if i not in made]
    if len(other) != 1:
        return None
    where = makers.get(other[0])
    if not is_op(where, "Where") or not all(i in inits for i in where.input[1:]):
        return None
    keep, drop = (numpy_helper.to_array(inits[i]) for i in where.input[1:])
    if keep.size != 1 or drop.size != 1 or float(keep) != 0.0 or float(drop) > -1e4:
        return None
    constant = _constant(where.input[0], makers, inits)
    if constant is None:
        return where.input[0]  # (computed from the inputs: the layer's own mask)
    # (a constant mask that drops scores would reach QAttention with no batch axis: not written)
    return UNMASKED if constant.dtype == np.bool_ and bool(constant.all()) else None


def _guards_only(nodes: list, add: Any, makers: dict) -> bool:
    """Whether the region's only ``Add`` is ``add`` (the mask's, before the softmax) and its
    only ``Where`` nodes the exporter's NaN guards (``Where(IsNaN(p), 0, p)``): no other term
    on the scores."""
    for node in nodes:
        if node.op_type == "Add" and node is not add:
            return False
        if node.op_type == "Where":
            guard = makers.get(node.input[0])
            if not is_op(guard, "IsNaN") or guard.input[0] != node.input[2]:
                return False
    return True


def _constant(tensor: str, makers: dict, inits: dict) -> np.ndarray | None:
    """The values of ``tensor`` where it is a constant, maybe through ``Expand`` (which repeats
    values and adds none); None where it is computed from the graph's inputs otherwise."""
    from onnx import numpy_helper

    while tensor not in inits:
        node = makers.get(tensor)
        if not is_op(node, "Expand"):
            return None
        tensor = node.input[0]
    return numpy_helper.to_array(inits[tensor])


def _scaled_right(nodes: list, made: set, inits: dict, size: int) -> bool:
    """Whether the constant factors on the scores' path multiply to ``size ** -0.5`` (the
    scale ``QAttention`` applies)."""
    from onnx import numpy_helper

    factor = 1.0
    for node in nodes:
        if node.op_type not in ("Mul", "Div"):
            continue
        constants = [i for i in node.input if i in inits]
        if len(constants) != 1 or node.input[1] != constants[0] and node.op_type == "Div":
            return False
        value = numpy_helper.to_array(inits[constants[0]])
        if value.size != 1:
            return False
        factor = factor * float(value) if node.op_type == "Mul" else factor / float(value)
    return abs(factor - size**-0.5) <= 1e-5 * size**-0.5


def integer_linears(proto: Any) -> int:
    """Write each ``DequantizeLinear`` (input grid) -> ``MatMul`` (INT8 codes) -> bias ``Add``
    as ONNX Runtime's ``MatMulIntegerToFloat`` with the bias inside (its QDQ fusion makes the
    same kernel without the bias: a float ``Add`` over the output after it); returns how many.
    For graphs already bound to ONNX Runtime's contrib ops (`fuse_bert_attention`)."""
    from onnx import helper

    graph = proto.graph
    inits, makers, readers = graph_index(graph)
    instead: dict[int, list] = {}
    gone: set[int] = set()
    for matmul in [n for n in graph.node if n.op_type == "MatMul"]:
        found = _projection(matmul, makers, readers, inits)
        if found is None:
            continue
        quantize, dequantize = found["quantize"], found["dequantize"]
        node = helper.make_node(
            "MatMulIntegerToFloat",
            [
                quantize.output[0],
                found["codes"],
                dequantize.input[1],
                found["scale"],
                dequantize.input[2],
                found["zero"],
                found["bias"],
            ],
            [found["add"].output[0]],
            domain=MS_DOMAIN,
        )
        instead[id(matmul)] = [node]
        gone.update({id(found["weight"]), id(found["add"])})
    if instead:
        ordered = []
        for node in graph.node:
            if id(node) not in gone:
                ordered += instead.get(id(node), [node])
        del graph.node[:]
        graph.node.extend(ordered)
        _drop_unused(graph)
    return len(instead)


def gather_codes(proto: Any) -> int:
    """Make each ``Gather`` (axis 0) of a per-row dequantized table read the table's codes
    (`module docstring <compressors._onnx_bert>`); returns the tables rewritten."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits, makers, readers = graph_index(graph)
    done = 0
    replaced: dict[int, list] = {}
    gone: set[int] = set()
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        if not all(i in inits for i in dq.input) or len(inits[dq.input[0]].dims) != 2:
            continue
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        rows = inits[dq.input[0]].dims[0]
        if axis != 0 or list(inits[dq.input[1]].dims) != [rows]:
            continue
        gathers = readers.get(dq.output[0], [])
        if not gathers or any(
            g.op_type != "Gather" or g.input[0] != dq.output[0] or _axis(g) != 0 for g in gathers
        ):
            continue
        if dq.output[0] in {o.name for o in graph.output}:
            continue
        base = dq.output[0]
        zero = dq.input[2] if len(dq.input) > 2 and dq.input[2] else None
        scale_rows = f"{base}_scale_rows"
        graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{base}_last"))
        for k, gather in enumerate(gathers):
            tag = f"{base}_rows{k}"
            nodes = [
                helper.make_node(
                    "Gather", [dq.input[0], gather.input[1]], [f"{tag}_codes"], axis=0
                ),
                helper.make_node("Cast", [f"{tag}_codes"], [f"{tag}_values"], to=1),
            ]
            values = f"{tag}_values"
            if zero is not None:
                nodes += [
                    helper.make_node("Gather", [zero, gather.input[1]], [f"{tag}_zero"], axis=0),
                    helper.make_node("Cast", [f"{tag}_zero"], [f"{tag}_zero_f"], to=1),
                    helper.make_node("Unsqueeze", [f"{tag}_zero_f", f"{base}_last"], [f"{tag}_z"]),
                    helper.make_node("Sub", [values, f"{tag}_z"], [f"{tag}_centred"]),
                ]
                values = f"{tag}_centred"
            nodes += [
                helper.make_node(
                    "Gather", [dq.input[1], gather.input[1]], [f"{tag}_{scale_rows}"], axis=0
                ),
                helper.make_node(
                    "Unsqueeze", [f"{tag}_{scale_rows}", f"{base}_last"], [f"{tag}_s"]
                ),
                helper.make_node("Mul", [values, f"{tag}_s"], [gather.output[0]]),
            ]
            replaced[id(gather)] = nodes
        gone.add(id(dq))
        done += 1
    if done:
        ordered = []
        for node in graph.node:
            if id(node) in gone:
                continue
            ordered += replaced.get(id(node), [node])
        del graph.node[:]
        graph.node.extend(ordered)
    return done


def _drop_unused(graph: Any) -> None:
    """Remove the nodes whose outputs nothing reads (the exported mask's, once every layer
    reads its own), then the initializers nothing reads."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(init)


def _axis(node: Any) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)

"""The self-attention of torch's transformer layers in a W8A8 graph, rewritten for ONNX Runtime's
CPU kernels: no transposes or per-head copies of the activations between the projections.

torch exports ``nn.MultiheadAttention`` with ``batch_first=True`` through its functional form:
a transpose to ``(tokens, batch, width)``, the packed q / k / v projection, reshapes, a gather
per projection, transposes to ``(batch, heads, tokens, head width)``, the scaled dot products,
and transposes and reshapes back (some 35 nodes). With small heads most of ONNX Runtime's time
went to those copies: the zoo TransformerEncoder (width 32, 4 heads of 8, 8 tokens) at batch
32, one thread, spent 166 of 745 profiled us in Transpose and 83 in Reshape, where its
projections took 120.

`fuse_attention` replaces that part of the graph, for a layer with a fixed number of tokens
``S`` and ``heads * S`` at most `MAX_COLUMNS`, by the same arithmetic on ``(batch, tokens,
features)`` tensors, each head set apart inside the matrix products rather than by copies:

- the packed projection runs as three on the layer's one input grid (integer kernels, each
  reading its part of the file's codes; no split of their output): the key, the value and
  ``heads`` copies of the query, copy ``n`` with the columns of head ``n`` only (the others'
  weight codes at the zero point: exact zeros), ``(batch, S, heads * width)``;
- the queries, read as ``(batch, S * heads, width)``, times the keys transposed (ONNX Runtime's
  ``FusedMatMul``, the ``1 / sqrt(head width)`` scale inside) give each head's scores, one row
  of ``S`` per token and head: softmax over each row;
- the probabilities times the values give, per token and head, the whole width weighted by
  that head; the output projection reads each token's ``heads * width`` of them through a
  weight holding head ``n``'s rows of the original in block ``n`` (zero elsewhere), which keeps
  each head's own columns.

The query projection, the scores and the output projection cost ``heads`` times the
multiply-adds of the per-head ones (and the graph stores ``heads`` times the query and output
weights: hence the bound), in a few large kernel calls instead of copies: with
`compressors._onnx_rows` the zoo encoder's graph after ONNX Runtime's fusions went from 104
nodes (16 Transpose, 22 Reshape) to 57 (no Transpose or Split, 20 Reshape, which copy
nothing). The output projection
runs as a ``Gemm`` on ``(batch * S, heads * width)`` reshaped back with ``-1``: its batch axis
is then unnamed, so that ONNX Runtime does not fuse the residual ``Add`` and the
``LayerNormalization`` into ``SkipLayerNormalization``, whose CPU kernel (ONNX Runtime 1.32)
ran an Add + LayerNormalization of ``(32, 8, 32)`` in 48 us against 21-24 us unfused.

A layer whose graph differs (a mask read from an input, ``batch_first=False``, a dynamic
number of tokens) keeps the exported form.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

#: Largest ``heads * tokens`` rewritten (the expanded products' extra work grows with it).
MAX_COLUMNS = 256
#: Ops the exported attention between its input and its output projection is made of.
_ATTENTION_OPS = frozenset(
    {
        "Transpose",
        "Reshape",
        "Unsqueeze",
        "Squeeze",
        "Gather",
        "Split",
        "Slice",
        "Shape",
        "Concat",
        "Mul",
        "Div",
        "Sqrt",
        "Cast",
        "Identity",
        "Constant",
        "MatMul",
        "Softmax",
        "Add",
        "Gemm",
        "QuantizeLinear",
        "DequantizeLinear",
    }
)


def attention_heads(model: nn.Module) -> dict[str, int]:
    """The ``self_attn`` layers of ``model``'s torch transformer layers that `fuse_attention`
    may rewrite (packed projections, ``batch_first``), with their number of heads."""
    layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    return {
        f"{name}.self_attn" if name else "self_attn": module.self_attn.num_heads
        for name, module in model.named_modules()
        if isinstance(module, layers)
        and isinstance(module.self_attn, nn.MultiheadAttention)
        and module.self_attn._qkv_same_embed_dim
        and module.self_attn.batch_first
    }


def fuse_attention(proto: Any, sites: Mapping[str, str], heads: Mapping[str, int]) -> list[str]:
    """Rewrite the attention of each layer of ``heads`` whose packed projection's output is
    ``sites[layer]`` (`compressors._onnx_qdq.ActivationQDQ`: after its grids are written);
    returns the layers rewritten."""
    from onnx import shape_inference

    todo = [layer for layer in heads if layer in sites]
    if not todo:
        return []
    shapes = _shapes(shape_inference.infer_shapes(proto, strict_mode=False).graph)
    done = []
    for layer in todo:
        found = _region(proto.graph, sites[layer])
        if found is None:
            continue
        tokens = shapes.get(found["input"], [None, None])[1:2]
        if not tokens or not isinstance(tokens[0], int):
            continue
        if _rewrite(proto.graph, found, layer, tokens=tokens[0], heads=heads[layer]):
            done.append(layer)
    return done


def _shapes(graph: Any) -> dict[str, list]:
    found = {}
    for value in [*graph.value_info, *graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        found[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return found


def _region(graph: Any, site: str) -> dict[str, Any] | None:
    """The exported attention around the packed projection making ``site``: its input (before
    the transpose to tokens first), the nodes up to the transpose back, which the residual
    ``Add`` reads beside the input, and the kept nodes; None where the graph differs."""
    nodes = list(graph.node)
    makers = {out: node for node in nodes for out in node.output}
    inits = {i.name for i in graph.initializer}
    matmul = makers.get(site)
    if matmul is None or matmul.op_type != "MatMul":
        return None
    chain = [matmul]
    for op in ("DequantizeLinear", "QuantizeLinear", "Transpose"):
        node = makers.get(chain[-1].input[0])
        if node is None or node.op_type != op:
            return None
        chain.append(node)
    _, dequantize, quantize, transpose = chain
    if _attr(transpose, "perm") != [1, 0, 2]:
        return None
    start = transpose.input[0]
    for add in (n for n in nodes if n.op_type == "Add" and start in n.input):
        other = add.input[1] if add.input[0] == start else add.input[0]
        inside = _slice(other, start, makers, inits)
        if inside is None or id(matmul) not in inside or id(transpose) not in inside:
            continue
        region = [n for n in nodes if id(n) in inside]
        if any(n.op_type not in _ATTENTION_OPS for n in region):
            return None
        if sum(n.op_type == "Softmax" for n in region) != 1:
            return None
        outputs = {o for n in region for o in n.output}
        outside = [n for n in nodes if id(n) not in inside]
        if any(i in outputs and i != other for n in outside for i in n.input):
            return None  # (a tensor of the attention read elsewhere)
        if {o.name for o in graph.output} & (outputs - {other}):
            return None
        return {
            "input": start,
            "output": other,
            "region": region,
            "matmul": matmul,
            "dequantize": dequantize,
            "quantize": quantize,
            "weight": makers.get(matmul.input[1]),
        }
    return None


def _slice(tensor: str, start: str, makers: dict, inits: set) -> set[int] | None:
    """The nodes ``tensor`` is computed by from ``start`` and constants (None where it reads
    another tensor of the graph: a mask, a graph input)."""
    inside: set[int] = set()
    stack = [tensor]
    while stack:
        name = stack.pop()
        if name in (start, "") or name in inits:
            continue
        node = makers.get(name)
        if node is None:
            return None
        if id(node) not in inside:
            inside.add(id(node))
            stack.extend(node.input)
    return inside


def _rewrite(graph: Any, found: dict, layer: str, *, tokens: int, heads: int) -> bool:
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    region = found["region"]
    projection = [n for n in region if n.op_type == "Gemm" and n.input[1] in inits]
    if len(projection) != 1:
        return False
    out_proj = projection[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in out_proj.attribute}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return False
    width = int(inits[out_proj.input[1]].dims[0])
    if width % heads or heads * tokens > MAX_COLUMNS or len(inits[out_proj.input[1]].dims) != 2:
        return False
    matmul, weight = found["matmul"], found["weight"]
    if not _is_codes(weight, inits, 3 * width):
        return False
    readers = [n for n in graph.node if matmul.output[0] in n.input]
    bias = readers[0] if len(readers) == 1 and readers[0].op_type == "Add" else None
    bias_name = next((i for i in bias.input if i in inits), None) if bias else None
    if bias is None or bias_name is None or list(inits[bias_name].dims) != [3 * width]:
        return False
    base = layer.replace(".", "_") + "_attention"
    size = width // heads
    # (heads * width) query columns: head n's block holds the query's columns of head n, the
    # rest are zero (the weight's zero point: codes exact, ``x @ W`` computes nothing new)
    own = (np.arange(heads)[:, None] == (np.arange(width) // size)[None, :]).reshape(-1)
    columns = np.concatenate([np.tile(np.arange(width), heads), np.arange(width, 3 * width)])
    kept_column = np.concatenate([own, np.ones(2 * width, bool)])
    codes, scale, *zero = (numpy_helper.to_array(inits[i]) for i in weight.input)
    zero = zero[0] if zero else np.zeros((), codes.dtype)
    zeros = np.broadcast_to(zero, (3 * width,))[columns]
    expanded = np.where(kept_column[None, :], codes[:, columns], zeros[None, :]).astype(codes.dtype)
    values = numpy_helper.to_array(inits[bias_name])[columns] * kept_column
    # the output projection reads head n's block of each token's row: the rows of its weight
    # for head n's columns, zero elsewhere
    out_weight = numpy_helper.to_array(inits[out_proj.input[1]])
    out_weight = out_weight.T if attrs.get("transB", 0) else out_weight
    # (written as Tile and Mul of the weight: ONNX Runtime folds them when it loads the graph,
    # and the file stores the weight once)
    scales = np.broadcast_to(scale, (3 * width,))[columns] if scale.ndim else scale
    zeros = zeros if zero.ndim else zero
    constants = {
        f"{base}_out_proj": np.ascontiguousarray(out_weight, dtype=np.float32),
        f"{base}_out_repeats": np.array([heads, 1], np.int64),
        f"{base}_out_mask": own[:, None].astype(np.float32),
        f"{base}_queries_shape": np.array([0, tokens * heads, width], np.int64),
        f"{base}_rows_shape": np.array([-1, heads * width], np.int64),
        f"{base}_tokens_shape": np.array([-1, tokens, out_weight.shape[1]], np.int64),
        f"{base}_scale_scores": np.array(size**-0.5, np.float32),
    }
    axis = {a.name: helper.get_attribute_value(a) for a in weight.attribute}.get("axis", 1)
    projections = []  # (the queries, the keys, the values: three MatMuls on one input grid)
    bounds = (0, heads * width, (heads + 1) * width, (heads + 2) * width)
    for part, lo, hi in zip("qkv", bounds, bounds[1:], strict=False):
        codes_name = f"{weight.input[0]}_{part}"  # (named after the file's codes)
        constants[codes_name] = expanded[:, lo:hi]
        constants[f"{codes_name}_scale"] = scales[lo:hi] if scales.ndim else scales
        constants[f"{codes_name}_zero_point"] = zeros[lo:hi] if zeros.ndim else zeros
        constants[f"{base}_{part}_bias"] = values[lo:hi].astype(np.float32)
        projections += [
            helper.make_node(
                "DequantizeLinear",
                [codes_name, f"{codes_name}_scale", f"{codes_name}_zero_point"],
                [f"{codes_name}_dequantized"],
                axis=axis,
            ),
            helper.make_node(
                "MatMul",
                [matmul.input[0], f"{codes_name}_dequantized"],
                [f"{base}_{part}_product"],
            ),
            helper.make_node(
                "Add",
                [f"{base}_{part}_product", f"{base}_{part}_bias"],
                [f"{base}_{part}"],
            ),
        ]
    for key, value in constants.items():
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), key))

    def name(tensor: str) -> str:
        return f"{base}_{tensor}"

    def node(op: str, inputs: list, output: str, **attributes) -> Any:
        return helper.make_node(op, inputs, [output], **attributes)

    found["quantize"].input[0] = found["input"]
    kept = [found["quantize"], found["dequantize"]]
    out_bias = out_proj.input[2:3]
    added = [
        *projections,
        node("Reshape", [name("q"), name("queries_shape")], name("queries")),
        node("Transpose", [name("k")], name("k_t"), perm=[0, 2, 1]),
        node("MatMul", [name("queries"), name("k_t")], name("products")),
        node("Mul", [name("products"), name("scale_scores")], name("scores")),
        node("Softmax", [name("scores")], name("probs"), axis=-1),
        node("MatMul", [name("probs"), name("v")], name("heads")),
        node("Reshape", [name("heads"), name("rows_shape")], name("rows_in")),
        node("Tile", [name("out_proj"), name("out_repeats")], name("out_tiled")),
        node("Mul", [name("out_tiled"), name("out_mask")], name("out_weight")),
        node("Gemm", [name("rows_in"), name("out_weight"), *out_bias], name("rows_out")),
        node("Reshape", [name("rows_out"), name("tokens_shape")], found["output"]),
    ]
    keep = {id(n) for n in kept}
    gone = {id(n) for n in region} - keep
    ordered = []
    for n in graph.node:
        if id(n) not in gone:
            ordered.append(n)
        if n is found["dequantize"]:
            ordered += added
    del graph.node[:]
    graph.node.extend(ordered)
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    unread = [i for i in graph.initializer if i.name not in read]
    for init in unread:
        graph.initializer.remove(init)
    return True


def _is_codes(weight: Any, inits: dict, columns: int) -> bool:
    """Whether ``weight`` dequantizes 2-D constant codes of ``columns`` columns, its scale (and
    zero point) per tensor or per column (``axis=1``)."""
    if weight is None or weight.op_type != "DequantizeLinear":
        return False
    if not all(i in inits for i in weight.input) or len(inits[weight.input[0]].dims) != 2:
        return False
    if inits[weight.input[0]].dims[1] != columns:
        return False
    axis = _attr(weight, "axis")
    per_column = [list(inits[i].dims) for i in weight.input[1:]]
    return all(d == [] for d in per_column) or (
        axis in (1, -1, None) and all(d == [columns] for d in per_column)
    )


def _attr(node: Any, key: str) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == key:
            return helper.get_attribute_value(attribute)
    return None

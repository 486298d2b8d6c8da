"""The rewrite of an exported graph's coded initializers into their integer codes: layout ops
folded into the codes, then each coded tensor written as an integer initializer with the nodes
that dequantize it or the integer MatMuls that read it (see `compressors.onnx_export`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from compressors._onnx_io import OnnxExportError
from compressors.packing import PackedTensor

if TYPE_CHECKING:
    import onnx

#: The zero point of UINT8 codes that MatMulInteger reads: the file's INT8 codes + 128.
_ZERO_POINT = 128

#: The widest INT8 codes that a uint8 x int8 product never saturates on: see `_u8s8_exact`.
_U8S8_EXACT = (-64, 63)

#: Ops that only move a weight's elements, applied to codes and scales alike.
_LAYOUT_OPS = frozenset(
    {
        "Identity",
        "Transpose",
        "Reshape",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Slice",
        "Concat",
        "Split",
    }
)


@dataclass
class _Coded:
    """A tensor of the graph that is stored codes moved around by layout ops.

    Attributes:
        codes: Integer codes, the tensor's shape.
        scale: Each element's scale (``scaled``), the tensor's shape; None for a codebook.
        codebook: The values codes index (``codebook``); None for a grid.
        root: The initializer it comes from (the first, for a concatenation).
        roots: Every initializer it comes from.
        offset: A root's first element's position among all stored codes.
        moved_ids: How to compute each element's position among all stored codes, once layout
            ops moved them (None for a root, whose are ``offset`` onwards). Made on demand
            (`ids`), one group of tensors at a time: held for every weight at once, they took
            11x a BERT-base's fp32 bytes.
        id_type: The integer type of positions (int32 where every position fits).
    """

    codes: np.ndarray
    scale: np.ndarray | None
    codebook: np.ndarray | None
    root: str
    roots: frozenset[str]
    offset: int = 0
    moved_ids: Callable[[], np.ndarray] | None = None
    id_type: type = np.int64

    @property
    def ids(self) -> np.ndarray:
        """Each element's position among all stored codes (to find elements stored twice)."""
        if self.moved_ids is not None:
            return self.moved_ids()
        end = self.offset + self.codes.size
        return np.arange(self.offset, end, dtype=self.id_type).reshape(self.codes.shape)


class Rewriter:
    """Replaces the coded initializers of a graph by their codes (see `compressors.onnx_export`).

    ``run`` folds layout ops on coded tensors into the codes (where the result still has a
    per-axis or blocked scale and no stored element would be stored twice), then writes each
    coded tensor that other ops read as an integer initializer with its dequantizing nodes.
    """

    def __init__(
        self,
        proto: onnx.ModelProto,
        roots: dict[str, PackedTensor],
        *,
        opset: int,
        integer: set[str],
    ) -> None:
        self.proto, self.graph = proto, proto.graph
        self.roots, self.opset, self.integer = roots, opset, integer
        self.names = {v for n in self.graph.node for v in (*n.input, *n.output)}
        self.names |= {i.name for i in self.graph.initializer}
        self.forms: dict[int, tuple] = {}
        self.zero_point: str | None = None
        total = sum(t.value.numel() for t in roots.values())
        self.id_type = np.int32 if total < np.iinfo(np.int32).max else np.int64

    def _form(self, c: _Coded) -> tuple[str, int, np.ndarray, int]:
        """`_scale_form` of a coded grid tensor that is written (computed once)."""
        if id(c) not in self.forms:
            self.forms[id(c)] = (c, _scale_form(c.scale, self.opset))
        return self.forms[id(c)][1]

    def run(self) -> None:
        if not self.roots:
            return
        unfolded: set[str] = set()
        while True:
            coded, folded = self._fold(unfolded)
            twice = self._stored_twice(coded, folded) - unfolded
            if not twice:
                break
            unfolded |= twice
        self._materialize(coded, folded)

    # folding

    def _constants(self) -> dict[str, np.ndarray]:
        """The constant operands of layout ops (shapes, axes, starts), by name: only those (a
        copy of every initializer would be the model's bytes again)."""
        from onnx import numpy_helper

        operands = {
            name
            for node in self.graph.node
            if node.op_type in _LAYOUT_OPS
            for name in node.input[1 if node.op_type != "Concat" else len(node.input) :]
        }
        values = {
            i.name: numpy_helper.to_array(i) for i in self.graph.initializer if i.name in operands
        }
        for node in self.graph.node:
            if node.op_type == "Constant" and node.attribute[0].name == "value":
                if node.output[0] in operands:
                    values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        return values

    def _fold(self, unfolded: set[str]) -> tuple[dict[str, _Coded], set[int]]:
        """The coded tensors (roots and layout-op outputs) and the indices of folded nodes."""
        from onnx.reference import ReferenceEvaluator

        coded = {name: self._root(name, offset) for offset, name in _offsets(self.roots)}
        constants = self._constants()
        folded: set[int] = set()
        for index, node in enumerate(self.graph.node):
            if node.op_type not in _LAYOUT_OPS:
                continue
            data = list(node.input) if node.op_type == "Concat" else list(node.input[:1])
            sources = [coded.get(name) for name in data]
            if not any(sources) or any(s is not None and s.roots & unfolded for s in sources):
                continue
            if not all(s is not None for s in sources) or not all(
                name in constants or name == "" for name in node.input[len(data) :]
            ):
                continue
            if len({s.codebook is None for s in sources}) > 1 or any(
                s.codebook is not None and not np.array_equal(s.codebook, sources[0].codebook)
                for s in sources
            ):
                continue
            evaluator = ReferenceEvaluator(node, opsets={"": self.opset})
            rest = {name: constants[name] for name in node.input[len(data) :] if name}

            def run(field: str, sources=sources, data=data, rest=rest, evaluator=evaluator):
                feeds = {name: getattr(s, field) for name, s in zip(data, sources, strict=True)}
                return evaluator.run(None, {**feeds, **rest})

            outputs = zip(
                run("codes"),
                run("scale") if sources[0].scale is not None else [None] * len(node.output),
                [partial(_output, run, "ids", k) for k in range(len(node.output))],
                strict=True,
            )
            roots = frozenset().union(*(s.roots for s in sources))
            results = {
                name: _Coded(codes, scale, sources[0].codebook, sources[0].root, roots, 0, ids)
                for name, (codes, scale, ids) in zip(node.output, outputs, strict=True)
            }
            if all(r.scale is None or _scale_form(r.scale, self.opset) for r in results.values()):
                coded.update(results)
                folded.add(index)
        return coded, folded

    def _root(self, name: str, offset: int) -> _Coded:
        codes = self.roots[name].codes
        table = codes.tensors["codebook" if codes.decode == "codebook" else "scale"].numpy()
        values = codes.codes.numpy()
        if codes.decode == "codebook":  # only the values used (a cluster's 0 may be unused)
            used, index = np.unique(values, return_inverse=True)
            book = table[used].astype(np.float32)
            index = index.reshape(values.shape)
            return _Coded(index, None, book, name, frozenset({name}), offset, None, self.id_type)
        scale = np.broadcast_to(table.astype(np.float32), values.shape)  # a view: no copy
        return _Coded(values, scale, None, name, frozenset({name}), offset, None, self.id_type)

    def _needed(self, coded: dict[str, _Coded], folded: set[int]) -> dict[str, _Coded]:
        """Coded tensors read by ops that stay (or that are graph outputs)."""
        read = {
            name for i, node in enumerate(self.graph.node) if i not in folded for name in node.input
        }
        read |= {o.name for o in self.graph.output}
        return {name: c for name, c in coded.items() if name in read}

    def _stored_twice(self, coded: dict[str, _Coded], folded: set[int]) -> set[str]:
        """Roots some of whose elements would be stored in two initializers (a tied table read
        as is by a Gather and transposed by a MatMul, say). Checked one group of roots at a
        time (those that moved tensors join), so that positions are held for one group only."""
        needed = list(self._needed(coded, folded).values())
        groups = _groups([c.roots for c in needed if c.moved_ids is not None])
        offsets = {name: offset for offset, name in _offsets(self.roots)}
        twice: set[str] = set()
        for group in groups:
            members = [c for c in needed if c.roots & group]
            if len(group) == 1 and len(members) == 1:  # one tensor from one root: any repeat?
                (root,) = group
                ids = members[0].ids.ravel() - offsets[root]
                seen = np.zeros(self.roots[root].value.numel(), dtype=bool)
                seen[ids] = True
                if int(seen.sum()) < ids.size:
                    twice.add(root)
                continue
            names = sorted(group, key=offsets.__getitem__)
            starts = np.array([offsets[n] for n in names])
            values, counts = np.unique(
                np.concatenate([c.ids.ravel() for c in members]), return_counts=True
            )
            repeated = values[counts > 1]
            owners = np.unique(np.searchsorted(starts, repeated, side="right") - 1)
            twice |= {names[i] for i in owners}
        return twice

    # writing

    def _materialize(self, coded: dict[str, _Coded], folded: set[int]) -> None:
        """Write each coded tensor that a kept op reads: one integer initializer, and the
        nodes that dequantize it (or the integer MatMuls that read it)."""
        from onnx import TensorProto

        needed = self._needed(coded, folded)
        kept = [node for i, node in enumerate(self.graph.node) if i not in folded]
        outputs = {o.name for o in self.graph.output}
        head: list[Any] = []
        quantized_inputs: dict[str, tuple[str, str, str]] = {}
        for name, c in needed.items():
            readers = [node for node in kept if name in node.input]
            integer = []
            if c.root in self.integer and c.scale is not None:
                integer = [node for node in readers if self._integer_matmul(node, name, c)]
            rest = len(integer) < len(readers) or name in outputs
            base = c.root if name == c.root else f"{c.root}.{name}"
            if not integer:
                head += self._dequantize(name, c, base)
                continue
            layouts = {_transposed(node) for node in integer}
            stored = False if rest or len(layouts) > 1 else layouts.pop()
            codes = np.ascontiguousarray(c.codes.T if stored else c.codes)
            if _u8s8_exact(codes):
                codes_name, zero_name = self._add(codes, f"{base}_quantized", TensorProto.INT8), ""
            else:  # the same values as UINT8 + 128, zero point 128: uint8 x uint8 (see _u8s8_exact)
                shifted = codes.astype(np.int16) + _ZERO_POINT
                codes_name = self._add(shifted, f"{base}_quantized", TensorProto.UINT8)
                zero_name = self._zero_point()
            weights = {stored: codes_name}
            for layout in {_transposed(node) for node in integer} - {stored}:
                weights[layout] = self._unique(f"{base}_quantized_t")
                head.append(_node("Transpose", [codes_name], [weights[layout]], perm=[1, 0]))
            _, _, scale, _ = self._form(c)
            scale_name = self._add(scale.astype(np.float32), f"{base}_scale")
            for node in integer:
                self._integer_matmul_nodes(
                    node, weights[_transposed(node)], zero_name, scale_name, kept, quantized_inputs
                )
            if rest:  # DequantizeLinear's zero point takes its scale's shape
                if zero_name and scale.ndim:
                    zeros = np.full(scale.shape, _ZERO_POINT, np.uint8)
                    zero_name = self._add(zeros, f"{base}_zero_points")
                head.append(self._dequantize_node(name, c, codes_name, scale_name, zero_name))
        del self.graph.node[:]
        self.graph.node.extend(head + kept)

    def _zero_point(self) -> str:
        """The scalar UINT8 zero point (128) of UINT8 codes, one initializer for all."""
        if self.zero_point is None:
            self.zero_point = self._add(np.array(_ZERO_POINT, np.uint8), "uint8_zero_point")
        return self.zero_point

    def _unique(self, name: str) -> str:
        candidate, k = name, 1
        while candidate in self.names:
            candidate, k = f"{name}_{k}", k + 1
        self.names.add(candidate)
        return candidate

    def _add(self, array: np.ndarray, name: str, dtype: int | None = None) -> str:
        """A new initializer (of ONNX type ``dtype``, else ``array``'s); returns its name."""
        name = self._unique(name)
        self.graph.initializer.append(_typed(array, name, dtype))
        return name

    def _dequantize(self, name: str, c: _Coded, base: str) -> list[Any]:
        """An integer initializer and the nodes that compute ``name`` from it."""
        from onnx import TensorProto

        if c.codebook is not None:
            size = len(c.codebook)
            if size <= 16 and self.opset >= 21:
                dtype = TensorProto.UINT4
            else:
                dtype = TensorProto.UINT8 if size <= 256 else TensorProto.UINT16
            index = self._add(c.codes, f"{base}_indices", dtype)
            book = self._add(c.codebook.astype(np.float32), f"{base}_codebook")
            wide = self._unique(f"{base}_indices_int64")
            return [
                _node("Cast", [index], [wide], to=TensorProto.INT64),
                _node("Gather", [book, wide], [name], axis=0),
            ]
        codes = self._add(c.codes, f"{base}_quantized", self._int_type(c.codes))
        _, _, scale, _ = self._form(c)
        scale_name = self._add(scale.astype(np.float32), f"{base}_scale")
        return [self._dequantize_node(name, c, codes, scale_name)]

    def _dequantize_node(
        self, name: str, c: _Coded, codes: str, scale: str, zero: str | None = None
    ) -> Any:
        kind, axis, _, block = self._form(c)
        attrs = {"axis": axis} if kind in ("axis", "block") else {}
        if kind == "block":
            attrs["block_size"] = block
        inputs = [codes, scale] + ([zero] if zero else [])
        return _node("DequantizeLinear", inputs, [name], **attrs)

    def _int_type(self, codes: np.ndarray) -> int:
        """The smallest signed ONNX integer type that holds ``codes`` at this opset."""
        from onnx import TensorProto

        lo, hi = (int(codes.min()), int(codes.max())) if codes.size else (0, 0)
        if -8 <= lo and hi <= 7 and self.opset >= 21:
            return TensorProto.INT4
        if -128 <= lo and hi <= 127:
            return TensorProto.INT8
        if self.opset >= 21:
            return TensorProto.INT16
        raise OnnxExportError(
            f"codes in [{lo}, {hi}] need INT16, which DequantizeLinear reads from opset 21 on; "
            f"got opset {self.opset}"
        )

    def _integer_matmul(self, node: Any, name: str, c: _Coded) -> bool:
        """Whether ``node`` is a MatMul / Gemm reading ``name`` as its [K, N] or [N, K] weight,
        whose INT8 codes and per-output-channel (or per-tensor) scales MatMulInteger can run."""
        from onnx import TensorProto

        if c.codes.ndim != 2 or len(node.input) < 2 or node.input[1] != name:
            return False
        if node.input[0] == name or self._int_type(c.codes) != TensorProto.INT8:
            return False
        attrs = _attributes(node)
        if node.op_type == "MatMul":
            out_axis = 1
        elif node.op_type == "Gemm":
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
                return False
            if attrs.get("beta", 1.0) != 1.0:
                return False
            out_axis = 0 if attrs.get("transB", 0) else 1
        else:
            return False
        kind, axis, _, _ = self._form(c)
        return kind == "tensor" or (kind == "axis" and axis == out_axis)

    def _integer_matmul_nodes(
        self,
        node: Any,
        weight: str,
        zero: str,
        scale: str,
        kept: list[Any],
        quantized_inputs: dict[str, tuple[str, str, str]],
    ) -> None:
        """Replace ``node`` in ``kept`` by DynamicQuantizeLinear (one per activation) +
        MatMulInteger (on ``weight``: INT8, or UINT8 with zero point ``zero``) + Cast + Mul
        (+ Add for a Gemm's bias), as quantize_dynamic writes it."""
        from onnx import TensorProto

        out, source = node.output[0], node.input[0]
        if source not in quantized_inputs:  # quantized once, right where it is computed
            quantized_inputs[source] = tuple(
                self._unique(f"{source}_{suffix}") for suffix in ("quantized", "scale", "zero")
            )
            producer = next((i for i, n in enumerate(kept) if source in n.output), -1)
            quantize = _node("DynamicQuantizeLinear", [source], list(quantized_inputs[source]))
            kept.insert(producer + 1, quantize)
        q, s, z = quantized_inputs[source]
        new = []
        product, floats, scales = (
            self._unique(f"{out}_{suffix}") for suffix in ("int32", "float", "scales")
        )
        new += [
            _node("MatMulInteger", [q, weight, z] + ([zero] if zero else []), [product]),
            _node("Cast", [product], [floats], to=TensorProto.FLOAT),
            _node("Mul", [s, scale], [scales]),
        ]
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            unbiased = self._unique(f"{out}_unbiased")
            new += [
                _node("Mul", [floats, scales], [unbiased]),
                _node("Add", [unbiased, node.input[2]], [out]),
            ]
        else:
            new.append(_node("Mul", [floats, scales], [out]))
        index = kept.index(node)
        kept[index : index + 1] = new


def _u8s8_exact(codes: np.ndarray) -> bool:
    """Whether ONNX Runtime multiplies uint8 activations by these INT8 codes exactly on every
    CPU. Its uint8 x int8 kernel on x86 CPUs without VNNI (AVX2, AVX-512F) adds pairs of products
    in saturating int16 (``vpmaddubsw``): 2 * 255 * 128 overflows, 2 * 255 * 64 does not (the 7-bit
    weights of quantize_dynamic's ``reduce_range``). Wider codes are stored as UINT8 + 128 with
    zero point 128 instead, the same values, which ORT's uint8 x uint8 kernel multiplies exactly
    (and 10-20% slower on AVX2)."""
    lo, hi = _U8S8_EXACT
    return not codes.size or (lo <= int(codes.min()) and int(codes.max()) <= hi)


def _node(op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> Any:
    from onnx import helper

    return helper.make_node(op, inputs, outputs, **attrs)


def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _transposed(node: Any) -> bool:
    """Whether a MatMul / Gemm reads its weight as [N, K] (a Gemm with transB)."""
    return node.op_type == "Gemm" and bool(_attributes(node).get("transB", 0))


def _output(run: Callable[[str], list[np.ndarray]], field: str, k: int) -> np.ndarray:
    """The ``k``-th output of a layout op run on its sources' ``field``."""
    return run(field)[k]


def _groups(sets: list[frozenset[str]]) -> list[set[str]]:
    """The connected groups of names that ``sets`` join (each set joins its names)."""
    groups: list[set[str]] = []
    for names in sets:
        joined = [g for g in groups if g & names]
        merged = set(names).union(*joined)
        groups = [g for g in groups if not g & names] + [merged]
    return groups


def _offsets(roots: dict[str, PackedTensor]) -> Iterator[tuple[int, str]]:
    offset = 0
    for name, tensor in roots.items():
        yield offset, name
        offset += tensor.value.numel()


def _scale_form(scale: np.ndarray, opset: int) -> tuple[str, int, np.ndarray, int] | None:
    """How ``DequantizeLinear`` expresses per-element scales: ``("tensor", 0, scalar, 0)``,
    ``("axis", axis, vector, 0)``, ``("block", axis, scales, block_size)`` (opset >= 21:
    scales constant along ``axis``), or None."""
    if scale.size == 0 or np.all(scale == scale.flat[0]):
        return "tensor", 0, np.asarray(scale.flat[0] if scale.size else 1.0, np.float32), 0
    varying = [a for a in range(scale.ndim) if not np.all(scale == np.take(scale, [0], axis=a))]
    if len(varying) == 1:
        (axis,) = varying
        index = tuple(slice(None) if d == axis else 0 for d in range(scale.ndim))
        return "axis", axis, scale[index], 0
    constant = [a for a in range(scale.ndim) if a not in varying and scale.shape[a] > 1]
    if opset >= 21 and constant:
        axis = max(constant, key=lambda a: scale.shape[a])
        return "block", axis, np.take(scale, [0], axis=axis), scale.shape[axis]
    return None


def _typed(array: np.ndarray, name: str, dtype: int | None) -> onnx.TensorProto:
    """``array`` as an initializer of ONNX type ``dtype`` (4-bit types packed two a byte), or
    of its own type."""
    import ml_dtypes
    from onnx import TensorProto, numpy_helper

    if dtype is None:
        return numpy_helper.from_array(np.require(array, requirements="C"), name)
    numpy_type = {
        TensorProto.INT4: ml_dtypes.int4,
        TensorProto.UINT4: ml_dtypes.uint4,
        TensorProto.INT8: np.int8,
        TensorProto.UINT8: np.uint8,
        TensorProto.INT16: np.int16,
        TensorProto.UINT16: np.uint16,
    }[dtype]
    return numpy_helper.from_array(np.require(array, requirements="C").astype(numpy_type), name)

"""ONNX export of a packed model, checked in ONNX Runtime: the compressed model as a standard graph.

`export_onnx` turns a packed ``.sqz`` file (`compressors.packing`) into an ONNX graph that stores
what the file stores: integer codes where the file keeps a tensor on a grid or a codebook, float32
elsewhere. The file is loaded into a float model (``load_packed(..., int8=False)``: torch.ao's int8
modules have no ONNX form) and exported by ``torch.onnx`` (the dynamo exporter first, which handles
attention; the legacy TorchScript exporter where it fails; the batch axis dynamic, and the sequence
axis of token inputs) without folding constants, so that every parameter is still an initializer
under its state-dict name (the dynamo exporter's float32 initializers are held out of the graph,
sharing the model's memory, until those the file holds as codes are known: only the others are ever
serialized as float32; a 110 M BERT's 4-bit export and check peaked at 3.1-3.3x its fp32 bytes
before, 2.0-2.3x after). onnxscript's optimizer then cleans the graph, with those parameters out of
its reach, and each initializer the file holds as codes is replaced by its codes. The graph takes
the model's inputs as the model is called (one tensor, positional tensors or keyword tensors, each
a named input) and computes its scored output, or every output (`compressors._onnx_io`);
`check_onnx` and `OrtModule` take the same call forms.
What each compressor becomes:

- ``structured``: smaller layers, hence smaller initializers and activations; no other op.
- ``lowrank``: two MatMul / Gemm (or Conv) nodes where the layer had one.
- ``quant`` and ``allocate`` (per-row grids, ``value = code * scale``): an INT4 initializer
  (codes in -8..7, i.e. grids of at most 4 bits; opset >= 21) or INT8 (5..8 bits) and a
  ``DequantizeLinear`` with the float32 per-row scales (``axis``), which gives exactly the file's
  values. A MatMul / Gemm whose weight has INT8 codes can run on integer kernels instead
  (``matmul``: by default for the layers the file runs on int8 kernels, ``quant.runtime=int8``),
  as ``onnxruntime.quantization.quantize_dynamic`` writes it: ``DynamicQuantizeLinear`` on the
  activations, ``MatMulInteger`` on the file's codes (never re-quantized: for grids under 8 bits
  that would change the values), ``Cast`` and a ``Mul`` by the scales, which ORT fuses into its
  ``DynamicQuantizeMatMul`` kernel. Activations are then quantized to uint8 per batch, so the
  outputs are close to, not equal to, the float model's (as with torch's int8 modules). Codes
  outside -64..63 (8-bit grids) are stored + 128 as UINT8 with zero point 128, the same values:
  ORT's uint8 x int8 kernel on x86 CPUs without VNNI (AVX2, AVX-512F) sums pairs of products in
  saturating int16 (``vpmaddubsw``), which moved the 8-bit digits MLP's outputs by 15% of the
  largest on AVX2; its uint8 x uint8 kernel is exact everywhere (slower there: see below).
  Codes in -64..63 never saturate and stay INT8. Embedding tables are quantized the same way:
  ``DequantizeLinear``, then ``Gather``.
- ``cluster`` (codebooks, ``value = codebook[code]``): UINT4 (at most 16 values used, opset >= 21)
  or UINT8 indices, ``Cast`` to int64 and ``Gather`` from the float32 codebook. The file holds
  indices; ORT computes the lookup once when it loads the graph and runs float kernels.
- ``prune``, ``sparse``, ``gradual`` (unstructured sparsity): dense tensors, zeros included (as
  integer codes where the tensor is also quantized): no standard ONNX op runs a sparse weight
  faster (ORT densifies sparse initializers). `OnnxExport.notes` says how many zeros are stored.
- ``kd`` changes no structure.

Weights reach their ops through layout ops (the Transpose before a MatMul, an LSTM's or GRU's
gate reordering by Slice, Concat and Unsqueeze): those are applied to the codes and their scales
together, so the integer initializer is the tensor the op reads (a bidirectional GRU's two
directions, concatenated, get blocked scales: ``block_size``, opset >= 21). A tensor several
modules share (a tied embedding and output layer) stays one initializer; where one of its readers
needs it transposed, the Transpose stays a node.

ONNX Runtime and ``DequantizeLinear``: by default ORT keeps ``DequantizeLinear`` nodes for its
QDQ fusions and dequantizes at every run; the CPU provider of ORT 1.32 also fuses a per-channel
``DequantizeLinear`` + ``MatMul`` into ``MatMulNBits``, which at ORT's default accuracy level (4)
quantizes activations to int8, so outputs move by ~1e-2 relative (never this file's Gemms:
`compressors._onnx_nbits` writes the MatMul form it fuses). `ort_session` with
``exact=True`` (the default) turns QDQ handling off (``session.disable_quant_qdq``): ORT
dequantizes each weight once when it loads the graph and runs float kernels, with the float
model's outputs and speed (its memory then holds float weights; the file does not). On the
digits MLP (64-300-100-10, 8-bit, one thread of this project's 2-core CPU), ORT ran the
dequantized graph in 14 us at batch 1 and 340 us at batch 256, as the fp32 graph (10-15 us,
345 us; ORT's default session, dequantizing at every run: 29 us, 365 us), and the MatMulInteger
form in 12-16 us and 160 us: integer kernels pay off for large batches at the price of exact
outputs, so the default ``matmul`` follows the recipe's ``quant.runtime``. On an AVX2 EPYC
without VNNI (2 loaded cores), its UINT8 codes ran in 30-34 us and 430-515 us, the INT8 codes
with saturated sums 29-33 us and 430-495 us (side by side, one process).

Export for speed: each inference-mode BatchNorm after a Conv or Gemm is folded into it
(`compressors._onnx_fold`: a coded weight keeps its codes, its per-row scales scaled; a codebook
gets a ``Mul`` on its constant path), so the graph has no ``BatchNormalization`` node where the
torch model has BatchNorm layers after its convolutions, and computes their outputs to 1e-5.
ONNX Runtime's offline optimisation at its *basic* level is then saved into the file
(`compressors._onnx_optimize`: standard ONNX ops only, for any ONNX Runtime build and CPU; the
higher levels write contrib ops or a CPU's own layout, and are left to the session that loads
the file), without constant folding, which would store codes as float32. The file is then
checked as before. With BatchNorm statistics far from the identity, the zoo's ResNet at 4 bits
(its ``.sqz`` 12.8 kB) exported to 23.2 kB before and 14.6 kB after (29 -> 23 nodes; BatchNorms
folded and the exporter's records dropped, `compressors._onnx_graph.strip_debug_info`), its
MobileNet from 14.0 to 6.5 kB (``.sqz`` 5.3 kB). ONNX Runtime's default session here
(``exact=True``) folds the same BatchNorms when it loads the graph: latency did not move
(0.98-1.05x at batch 1 and 32); a session keeping the ``DequantizeLinear`` nodes
(``exact=False``) ran 1.08-1.13x faster at batch 1 and 1.00-1.09x at batch 32 (4 and 8 bits,
both models, one thread, old and new graphs timed in alternating rounds on a loaded machine).
The basic offline level changed no node of the zoo's eight graphs (onnxscript's optimizer had
done what it does): it saves ONNX Runtime that work at load, and the file records it
(``squeeze.ort_optimization``). The torch model keeps its BatchNorm layers: the packed file is
loaded into the task's own architecture, and a folded weight is no longer on its grid's float16
scales.

What cannot be exported: a model calling an op that neither exporter converts (e.g.
``torch.special.i0``, ``torch.linalg.eigvalsh``, ``torch.histc``: no ONNX op) raises
`OnnxExportError` naming the smallest layer that fails on its own and the op; a forward that
branches on tensor values is refused by the dynamo exporter, and the legacy one records the branch
taken on the example, which `check_onnx` catches on other inputs. torch.ao's int8 modules are
never exported (the float reload is, with the same weights). A coded tensor that an exporter
merged into another tensor stays float32 (a note names it).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compressors._act_quant import disabled, ranges
from compressors._onnx_attention import attention_heads, fuse_attention
from compressors._onnx_bert import (
    bert_attention,
    fuse_bert_attention,
    gather_codes,
    integer_linears,
)
from compressors._onnx_fold import fold_batchnorm
from compressors._onnx_graph import (
    SPARSE_NOTE_ZEROS,
    coded_roots,
    integer_roots,
    optimize_graph,
    restore_held,
    sparsity_notes,
    strip_debug_info,
)
from compressors._onnx_io import (
    OUTPUT_CHOICES,
    Call,
    OnnxExportError,
    OrtModule,
    OutputSelector,
    call_model,
    cannot_run,
    input_batches,
    scored_output,
    write_metadata,
)
from compressors._onnx_layout import nhwc_hints
from compressors._onnx_optimize import OPTIMIZE_LEVELS, save_optimized
from compressors._onnx_pool import float_pools, integer_pools
from compressors._onnx_qdq import ActivationQDQ
from compressors._onnx_rewrite import Rewriter
from compressors._onnx_rows import gemm_rows
from compressors._onnx_session import (
    release_freed_memory,
    require_ort,
    session_options,
    session_settings,
    unrunnable,
)
from compressors._onnx_torch import export_graph, require_onnx
from compressors.packing import int8_layers, load_packed, read_tensors, with_values

if TYPE_CHECKING:
    import onnxruntime

__all__ = [
    "DEFAULT_OPSET",
    "EXACT_TOLERANCE",
    "EXPORTERS",
    "MATMUL_FORMS",
    "OPTIMIZE_LEVELS",
    "QUANTIZED_TOLERANCE",
    "SPARSE_NOTE_ZEROS",
    "OnnxCheck",
    "OnnxExport",
    "OnnxExportError",
    "check_exportable",
    "check_onnx",
    "export_onnx",
    "OrtModule",
    "ort_session",
    "release_freed_memory",
    "session_settings",
]

#: Opset of exported graphs: 21 is the first with INT4 / UINT4 tensors and blocked scales.
DEFAULT_OPSET = 21
#: Oldest opset accepted: per-axis scales of ``DequantizeLinear`` came with 13.
MIN_OPSET = 13
#: ``exporter`` choices: ``auto`` tries dynamo, then legacy.
EXPORTERS = ("auto", "dynamo", "legacy")
#: ``matmul`` choices: how MatMul / Gemm weights with INT8 codes run (see the module docstring).
MATMUL_FORMS = ("auto", "dequantize", "integer")
#: ``(atol, rtol)`` of `check_onnx` for graphs that compute in float: float rounding only.
EXACT_TOLERANCE = (1e-4, 1e-4)
#: `check_onnx`'s ``atol`` for graphs whose kernels quantize activations to 8 bits (the
#: ``integer`` MatMul form, or ``exact=False``), as a fraction of the largest |expected output|:
#: loose enough for a 6-layer transformer's accumulated rounding (12%), tight enough for a
#: misplaced weight (errors of the order of the outputs).
QUANTIZED_TOLERANCE = 0.25

#: Rows per run of `check_onnx` (each given batch is split to at most this many): the torch
#: model's and ONNX Runtime's activations at once stay small beside the weights (BERT-base on
#: 64 validation rows of 128 tokens: the check's peak went from 3.05x to 2.2x the fp32 bytes).
CHECK_ROWS = 8

#: Ops of graphs whose outputs depend on activations quantized on the fly.
_QUANTIZING_OPS = frozenset(
    {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "QuantizeLinear"}
)


@dataclass(frozen=True)
class OnnxExport:
    """An exported graph.

    Attributes:
        path: Where the ``.onnx`` file is.
        size_bytes: Its size on disk.
        ops: How many nodes of each op type the graph has.
        exporter: ``dynamo`` or ``legacy``: which torch.onnx exporter made the graph.
        notes: What the graph stores differently from the packed file, and why (sparsity stored
            dense, tensors left float, axes the exporter fixed).
        inputs: The graph's input names, in the model's call order (``input`` for a model
            called on one tensor; ``forward``'s parameter names for positional inputs; the
            keys of keyword inputs).
        outputs: The graph's output names (``output``: the scored output; with
            ``outputs="all"``, every tensor the model returns, named by its keys or positions).
        scored: Which output is the scored one.
        optimization: ONNX Runtime's offline optimisation saved in the file: ``basic`` or
            ``none`` (not asked for, or not kept: a note says why).
    """

    path: Path
    size_bytes: int
    ops: Counter
    exporter: str
    notes: list[str] = field(default_factory=list)
    inputs: tuple[str, ...] = ("input",)
    outputs: tuple[str, ...] = ("output",)
    scored: str = "output"
    optimization: str = "none"


@dataclass(frozen=True)
class OnnxCheck:
    """ONNX Runtime's outputs against the torch model's.

    Attributes:
        agree: Whether every output is within ``atol + rtol * |expected|``.
        max_abs_diff: Largest absolute difference.
        max_rel_diff: Largest absolute difference over the largest |expected output|.
        atol: The absolute tolerance used.
        rtol: The relative tolerance used.
        batches: ONNX Runtime's outputs (float32, on the CPU), batch by batch (their shapes
            may differ past the batch axis: a collate that pads each batch to its longest
            sequence).
        message: What was compared, and where it differs most when it does not agree.
    """

    agree: bool
    max_abs_diff: float
    max_rel_diff: float
    atol: float
    rtol: float
    batches: list[torch.Tensor]
    message: str

    @property
    def outputs(self) -> torch.Tensor:
        """ONNX Runtime's outputs of every batch, concatenated (batches of one shape)."""
        return torch.cat(self.batches)


def export_onnx(
    packed_path: str | Path,
    model: nn.Module,
    example_inputs: Any,
    out_path: str | Path,
    *,
    output: OutputSelector | None = None,
    outputs: str = "scored",
    opset: int = DEFAULT_OPSET,
    matmul: str = "auto",
    exporter: str = "auto",
    fold_bn: bool = True,
    optimize: str = "basic",
    more_inputs: Iterable[Any] = (),
) -> OnnxExport:
    """Export the model a packed file holds as an ONNX graph storing the file's integer codes.

    Args:
        packed_path: The ``.sqz`` file (`compressors.save_packed`).
        model: A freshly built model of the task (uncompressed shapes): the file is loaded into it
            in place, as float layers, so that afterwards it is the model the graph computes (what
            `check_onnx` compares with).
        example_inputs: A real input batch, as the model is called on it: one tensor
            (``model(x)``), a tuple of tensors (``model(*inputs)``) or a dict of tensors
            (``model(**inputs)``). Each becomes a named graph input (`OnnxExport.inputs`) whose
            batch axis, and the sequence axis of integer (token) inputs, are dynamic.
        out_path: Where to write the ``.onnx`` file.
        output: ``output(model_outputs) -> tensor``: the scored output among what the model
            returns (as ``Data.forward`` selects it); None: the tensor itself, ``.logits`` of a
            ``ModelOutput`` or dict, or the first element of a tuple.
        outputs: ``scored``: the graph computes the scored output only (named ``output``);
            ``all``: every tensor the model returns, named by its keys or positions, the scored
            one among them (`OnnxExport.scored`; one more output, ``output``, where the
            selector computes it from them).
        opset: ONNX opset, at least 13; INT4 / UINT4 codes need 21 (below, INT8 / UINT8).
        matmul: How a MatMul / Gemm whose weight has INT8 codes runs: ``dequantize`` (on the
            dequantized weight: float kernels in ORT, the float model's outputs), ``integer``
            (``MatMulInteger`` on the codes, activations quantized on the fly: faster for large
            batches, outputs close to the float model's), or ``auto``: ``integer`` for the layers
            the packed file runs on int8 kernels (``quant.runtime=int8``), ``dequantize``
            elsewhere. Codes of at most 4 bits stay INT4 with ``DequantizeLinear`` (half the
            bytes; MatMulInteger reads 8-bit integers only).
        exporter: ``auto`` (dynamo, then legacy where it fails), ``dynamo`` or ``legacy``.
        fold_bn: Fold each inference-mode BatchNorm into the Conv or Gemm before it
            (`compressors._onnx_fold`: a coded weight keeps its codes, its per-row scales
            scaled); ``model`` itself keeps its BatchNorm layers.
        optimize: ONNX Runtime's offline graph optimisation saved into the file: ``basic``
            (standard ONNX ops only, for any ONNX Runtime build and CPU:
            `compressors._onnx_optimize`) or ``none``.
        more_inputs: Other batches' inputs, of the same call form: any axis at which they
            have other sizes than ``example_inputs`` (float features and boolean masks padded
            per batch to their longest sequence) is dynamic in the graph too.

    Raises:
        OnnxExportError: If neither exporter converts the model (naming the layer and op), or
            its inputs are not tensors in one of the three forms, or its scored output is not a
            tensor.
    """
    onnx = require_onnx()
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"The 'opset' parameter must be an int >= {MIN_OPSET}. Got {opset!r}.")
    if matmul not in MATMUL_FORMS:
        raise ValueError(
            f"The 'matmul' parameter must be one of {', '.join(map(repr, MATMUL_FORMS))}. "
            f"Got {matmul!r} instead."
        )
    if exporter not in EXPORTERS:
        raise ValueError(
            f"The 'exporter' parameter must be one of {', '.join(map(repr, EXPORTERS))}. "
            f"Got {exporter!r} instead."
        )
    if optimize not in OPTIMIZE_LEVELS:
        raise ValueError(
            f"The 'optimize' parameter must be one of {', '.join(map(repr, OPTIMIZE_LEVELS))}. "
            f"Got {optimize!r} instead."
        )
    if outputs not in OUTPUT_CHOICES:
        raise ValueError(
            f"The 'outputs' parameter must be one of {', '.join(map(repr, OUTPUT_CHOICES))}. "
            f"Got {outputs!r} instead."
        )
    call = Call.of(model, example_inputs).varying_in(more_inputs)  # refused before any read
    # (bounded by the model's own shapes; the values are the loaded model's, not decoded twice)
    stored = read_tensors(packed_path, model=model, decode=False)
    model = load_packed(packed_path, model, int8=False)
    stored = with_values(stored, model.state_dict())
    notes: list[str] = []
    held: dict[str, Any] = {}  # (float initializers out of the graph until the codes are known)
    with disabled(model):  # (activation grids: written as QDQ pairs below, `_onnx_qdq`)
        proto, used, graph_outputs = export_graph(
            model,
            call,
            output,
            every=outputs == "all",
            opset=opset,
            exporter=exporter,
            notes=notes,
            held=held,
        )
    roots = coded_roots(proto, stored, notes, held)
    restore_held(proto, held, roots)  # (coded ones never serialized as float32)
    proto = optimize_graph(proto, roots)
    qdq = ActivationQDQ(proto, ranges(model))
    integer = integer_roots(matmul, roots, stored, int8_layers(packed_path)) - qdq.weights
    if fold_bn and not qdq.sites:  # (after integer_roots, which knows the file's tensors by
        fold_batchnorm(proto, roots, notes)  # identity; a W8A8 graph folds its own: `_onnx_qdq`)
    Rewriter(proto, roots, opset=opset, integer=integer).run()
    qdq.insert()
    if qdq.sites:  # (W8A8: ONNX Runtime's integer kernels with fewer float ops around them)
        fuse_attention(proto, qdq.sites, attention_heads(model))
        if fuse_bert_attention(proto, qdq.sites, bert_attention(model)):
            integer_linears(proto)  # (the graph runs ONNX Runtime's contrib ops already)
        gather_codes(proto)
        gemm_rows(proto)
        integer_pools(proto)
        nhwc_hints(proto)
    float_pools(proto)  # (those integer_pools left: GlobalAveragePool, on NCHWc blocks)
    if qdq.missing:
        raise OnnxExportError(
            f"the activation grids of layers {qdq.missing} found no Conv, MatMul or Gemm node "
            "reading their weight in the exported graph"
        )
    notes += sparsity_notes(model, stored)
    del stored, roots  # (the graph holds what it needs of them)
    strip_debug_info(proto)
    write_metadata(proto, call, graph_outputs)
    out_path = Path(out_path)
    onnx.save_model(proto, out_path)
    del proto  # (ONNX Runtime's optimisation reads the file)
    try:  # checked from the file: checking the proto would serialize a second copy of it
        onnx.checker.check_model(str(out_path))
        note = save_optimized(out_path, optimize)
        if optimize != "none":
            onnx.checker.check_model(str(out_path))
    except Exception:
        out_path.unlink(missing_ok=True)
        raise
    notes += [note] if note else []
    graph = onnx.load(str(out_path), load_external_data=False).graph
    ops = Counter(node.op_type for node in graph.node)
    inputs = tuple(value.name for value in graph.input)
    return OnnxExport(
        out_path,
        out_path.stat().st_size,
        ops,
        used,
        notes,
        inputs,
        graph_outputs.names,
        graph_outputs.scored,
        "none" if note else optimize,
    )


def check_exportable(
    model: nn.Module,
    example_inputs: Any,
    *,
    output: OutputSelector | None = None,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    more_inputs: Iterable[Any] = (),
) -> str:
    """Export ``model`` (float, as it is) to a graph in memory, to know before any training
    whether it can be: returns the exporter that converts it (``more_inputs``: as
    `export_onnx`'s; ONNX Runtime then runs the graph on each of them).

    Raises:
        OnnxExportError: As `export_onnx` would: an op no exporter converts (naming the layer),
            inputs that are not tensors in one of the three forms, a scored output that is not
            a tensor; or a graph ONNX Runtime cannot run on ``more_inputs``.
    """
    require_onnx()
    more = list(more_inputs)
    call = Call.of(model, example_inputs).varying_in(more)
    notes: list[str] = []
    proto, used, outputs = export_graph(
        model, call, output, every=False, opset=opset, exporter=exporter, notes=notes
    )
    if more:  # the graph runs the data's other shapes (a legacy export may have fixed them)
        write_metadata(proto, call, outputs)
        why = unrunnable(proto, [example_inputs, *more], notes)
        if why is not None:
            raise OnnxExportError(why)
    return used


def torch_outputs(
    model: nn.Module,
    inputs: Any,
    *,
    output: OutputSelector | None = None,
    batch_size: int = CHECK_ROWS,
) -> list[torch.Tensor]:
    """``model``'s scored output (float32, on the CPU) on each batch of ``inputs``, split as
    `check_onnx` splits them: its ``expected``, computed before the graph's session exists so
    that the model can be freed first (the model and ONNX Runtime's float weights are then never
    in memory together)."""
    model.eval()
    with torch.no_grad():
        return [
            scored_output(call_model(model, batch), output).detach().float().cpu()
            for batch in input_batches(inputs, batch_size)
        ]


def check_onnx(
    onnx_path: str | Path,
    shipped_model: nn.Module | None,
    inputs: Any,
    *,
    output: OutputSelector | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    exact: bool = True,
    batch_size: int = CHECK_ROWS,
    expected: list[torch.Tensor] | None = None,
) -> OnnxCheck:
    """Run the graph in ONNX Runtime (CPU) on ``inputs`` and compare its scored output with
    ``shipped_model``'s, batch by batch.

    Args:
        onnx_path: The ``.onnx`` file.
        shipped_model: The float model the graph was exported from (the ``model`` given to
            `export_onnx`, or ``load_packed(path, fresh, int8=False)``).
        inputs: Input samples: the model's inputs for many samples (one tensor, a tuple or a
            dict of tensors), run in batches of ``batch_size``; or an iterable of batches (a list
            or a generator), each the model's inputs in one of these forms (a task's validation
            data read batch by batch, say). Both are called as the model is (`OrtModule` takes
            the same forms).
        output: The scored output's selector given to `export_onnx` (None: its default).
        atol: Absolute tolerance. Default: `EXACT_TOLERANCE` (1e-4) for graphs computing in
            float (dequantized weights: float rounding only); `QUANTIZED_TOLERANCE` (25%) of the
            largest |expected output| for graphs that quantize activations on the fly
            (``MatMulInteger``, or ORT's own fusions with ``exact=False``), where the error grows
            with depth: 0.7% on the digits MLP, 12% on all-MiniLM-L6-v2 with every Linear on
            MatMulInteger (torch's own int8 modules on the same file: 20%).
        rtol: Relative tolerance. Default: 1e-4 for float graphs, 0 for quantized ones.
        exact: Passed to `ort_session`.
        batch_size: Samples per run (the most: batches ``inputs`` yields are split too).
        expected: The torch model's outputs on ``inputs`` (`torch_outputs`), instead of
            ``shipped_model`` (then None).

    Raises:
        ValueError: If ``inputs`` holds no sample, or neither or both of ``shipped_model`` and
            ``expected`` are given.
    """
    if (shipped_model is None) == (expected is None):
        raise ValueError("check_onnx needs one of 'shipped_model' and 'expected'")
    quantizing = not exact or bool(_QUANTIZING_OPS & set(_ops(onnx_path)))  # (before the session)
    module = OrtModule(ort_session(onnx_path, exact=exact))
    got: list[torch.Tensor] = []
    wanted: list[torch.Tensor] = []
    with torch.no_grad():
        for batch in input_batches(inputs, batch_size):
            if shipped_model is not None:  # (one batch of each at a time)
                wanted += torch_outputs(shipped_model, batch, output=output, batch_size=batch_size)
            try:
                got.append(call_model(module, batch).float())
            except Exception as err:  # ONNX Runtime's own (InvalidArgument, Fail): a wrong graph
                if not type(err).__module__.startswith("onnxruntime"):
                    raise
                return OnnxCheck(
                    False, math.inf, math.inf, *EXACT_TOLERANCE, got, cannot_run(batch, err)
                )
    expected = wanted if expected is None else expected
    if not expected:
        raise ValueError("check_onnx got no input samples")
    if len(got) != len(expected):
        raise ValueError(
            f"check_onnx got {len(got)} batches of inputs and {len(expected)} of expected outputs"
        )
    scale = max(float(e.abs().max()) if e.numel() else 0.0 for e in expected)
    if atol is None:
        atol = QUANTIZED_TOLERANCE * scale if quantizing else EXACT_TOLERANCE[0]
    if rtol is None:
        rtol = 0.0 if quantizing else EXACT_TOLERANCE[1]
    kind = "activations quantized" if quantizing else "float kernels"
    for g, e in zip(got, expected, strict=True):
        if g.shape != e.shape:
            return OnnxCheck(
                False,
                float("inf"),
                float("inf"),
                atol,
                rtol,
                got,
                f"ONNX Runtime's outputs have shape {tuple(g.shape)}; the torch model's "
                f"{tuple(e.shape)}",
            )
    # Batch by batch: a batch's positions may differ from the next one's (padding per batch).
    diffs = [(g - e).abs() for g, e in zip(got, expected, strict=True)]
    excesses = [d - (atol + rtol * e.abs()) for d, e in zip(diffs, expected, strict=True)]
    max_abs = max((float(d.max()) for d in diffs if d.numel()), default=0.0)
    max_rel = max_abs / scale if scale > 0 else max_abs
    agree = all(bool((x <= 0).all()) for x in excesses)
    samples = sum(len(e) for e in expected)
    message = (
        f"{samples} samples ({kind}): max |difference| {max_abs:.3g} "
        f"({max_rel:.3g} of the largest |output|), tolerance {atol:.3g} + {rtol:.3g} * |expected|"
    )
    if not agree:
        at = max((k for k, x in enumerate(excesses) if x.numel()), key=lambda k: excesses[k].max())
        worst = int(excesses[at].flatten().argmax())
        sample = sum(len(e) for e in expected[:at]) + worst // max(1, expected[at][0].numel())
        got_value = float(got[at].flatten()[worst])
        expected_value = float(expected[at].flatten()[worst])
        message = (
            f"ONNX Runtime's outputs differ from the torch model's: {message}; worst at sample "
            f"{sample}: {got_value:.6g} instead of {expected_value:.6g}"
        )
    return OnnxCheck(agree, max_abs, max_rel, atol, rtol, got, message)


def ort_session(
    onnx_path: str | Path, *, threads: int = 1, exact: bool = True
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session: ``threads`` intra-op threads, one inter-op thread,
    sequential execution, every graph optimization on.

    Args:
        onnx_path: The ``.onnx`` file.
        threads: Intra-op threads (as ``threads`` of a sweep fixes torch's).
        exact: Dequantize integer weights once when the graph is loaded and run float kernels
            (``session.disable_quant_qdq``); False keeps ORT's defaults, which fuse
            ``DequantizeLinear`` + ``MatMul`` into kernels that quantize activations to int8.
            A graph with activation grids (``QuantizeLinear`` nodes: ``quant.activations=8``,
            `compressors._onnx_qdq`) always keeps them, so that it runs integer kernels.
    """
    options = session_options(threads)
    if exact and "QuantizeLinear" not in _ops(onnx_path):  # (activation grids: integer kernels)
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return require_ort().InferenceSession(
        str(onnx_path), options, providers=["CPUExecutionProvider"]
    )


def _ops(onnx_path: str | Path) -> list[str]:
    onnx = require_onnx()
    return [node.op_type for node in onnx.load(str(onnx_path), load_external_data=False).graph.node]

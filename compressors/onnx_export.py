"""ONNX export of a packed model, checked in ONNX Runtime: the compressed model as a standard graph.

`export_onnx` turns a packed ``.sqz`` file (`compressors.packing`) into an ONNX graph that stores
what the file stores: integer codes where the file keeps a tensor on a grid or a codebook,
float32 elsewhere. The file is loaded into a float model (``load_packed(..., int8=False)``:
torch.ao's int8 modules have no ONNX form) and exported by ``torch.onnx`` (the dynamo exporter
first, which handles attention; the legacy TorchScript exporter where it fails; the batch axis
dynamic, and the sequence axis of token inputs) without folding constants, so that every
parameter is still an initializer under its state-dict name. onnxscript's optimizer then cleans
the graph, with those parameters out of its reach, and each initializer the file holds as codes
is replaced by its codes. The graph takes the model's inputs as the model is called (one tensor,
positional tensors or keyword tensors, each a named input) and computes its scored output, or
every output (`compressors._onnx_io`); `check_onnx` and `OrtModule` take the same call forms.
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
  outputs are close to, not equal to, the float model's (as with torch's int8 modules). Embedding
  tables are quantized the same way: ``DequantizeLinear``, then ``Gather``.
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
quantizes activations to int8, so outputs move by ~1e-2 relative. `ort_session` with
``exact=True`` (the default) turns QDQ handling off (``session.disable_quant_qdq``): ORT
dequantizes each weight once when it loads the graph and runs float kernels, with the float
model's outputs and speed (its memory then holds float weights; the file does not). On the
digits MLP (64-300-100-10, 8-bit, one thread of this project's 2-core CPU), ORT ran the
dequantized graph in 14 us at batch 1 and 340 us at batch 256, as the fp32 graph (10-15 us,
345 us; ORT's default session, dequantizing at every run: 29 us, 365 us), and the MatMulInteger
form in 12-16 us and 160 us: integer kernels pay off for large batches at the price of exact
outputs, so the default ``matmul`` follows the recipe's ``quant.runtime``.

What cannot be exported: a model calling an op that neither exporter converts (e.g.
``torch.special.i0``, ``torch.linalg.eigvalsh``, ``torch.histc``: no ONNX op) raises
`OnnxExportError` naming the smallest layer that fails on its own and the op; a forward that
branches on tensor values is refused by the dynamo exporter, and the legacy one records the branch
taken on the example, which `check_onnx` catches on other inputs. torch.ao's int8 modules are
never exported (the float reload is, with the same weights). A coded tensor that an exporter
merged into another tensor stays float32 (a note names it).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from compressors._onnx_io import (
    OUTPUT_CHOICES,
    Call,
    OnnxExportError,
    OrtModule,
    Outputs,
    OutputSelector,
    call_model,
    fixed_axes,
    input_batches,
    name_axes,
    plan_outputs,
    scored_output,
    write_metadata,
)
from compressors._quiet import native_stdout_silenced
from compressors._targets import targets
from compressors.packing import PackedTensor, int8_layers, load_packed, read_tensors

if TYPE_CHECKING:
    import onnx
    import onnxruntime

__all__ = [
    "DEFAULT_OPSET",
    "EXACT_TOLERANCE",
    "EXPORTERS",
    "MATMUL_FORMS",
    "QUANTIZED_TOLERANCE",
    "OnnxCheck",
    "OnnxExport",
    "OnnxExportError",
    "check_exportable",
    "check_onnx",
    "export_onnx",
    "OrtModule",
    "ort_session",
]

logger = logging.getLogger(__name__)

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
#: Weight tensors with at least this fraction of zeros are named in `OnnxExport.notes`.
SPARSE_NOTE_ZEROS = 0.25
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
#: Ops of graphs whose outputs depend on activations quantized on the fly.
_QUANTIZING_OPS = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"})
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


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
    """

    path: Path
    size_bytes: int
    ops: Counter
    exporter: str
    notes: list[str] = field(default_factory=list)
    inputs: tuple[str, ...] = ("input",)
    outputs: tuple[str, ...] = ("output",)
    scored: str = "output"


@dataclass(frozen=True)
class OnnxCheck:
    """ONNX Runtime's outputs against the torch model's.

    Attributes:
        agree: Whether every output is within ``atol + rtol * |expected|``.
        max_abs_diff: Largest absolute difference.
        max_rel_diff: Largest absolute difference over the largest |expected output|.
        atol: The absolute tolerance used.
        rtol: The relative tolerance used.
        outputs: ONNX Runtime's outputs (float32, on the CPU).
        message: What was compared, and where it differs most when it does not agree.
    """

    agree: bool
    max_abs_diff: float
    max_rel_diff: float
    atol: float
    rtol: float
    outputs: torch.Tensor
    message: str


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

    Raises:
        OnnxExportError: If neither exporter converts the model (naming the layer and op), or
            its inputs are not tensors in one of the three forms, or its scored output is not a
            tensor.
    """
    onnx = _require_onnx()
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
    if outputs not in OUTPUT_CHOICES:
        raise ValueError(
            f"The 'outputs' parameter must be one of {', '.join(map(repr, OUTPUT_CHOICES))}. "
            f"Got {outputs!r} instead."
        )
    call = Call.of(model, example_inputs)  # refused before anything is read
    stored = read_tensors(packed_path)
    model = load_packed(packed_path, model, int8=False)
    notes: list[str] = []
    proto, used, graph_outputs = _export(
        model, call, output, every=outputs == "all", opset=opset, exporter=exporter, notes=notes
    )
    roots = _coded_roots(proto, stored, notes)
    proto = _optimize(proto, roots)
    integer = _integer_roots(matmul, roots, stored, int8_layers(packed_path))
    _Rewriter(proto, roots, opset=opset, integer=integer).run()
    notes += _sparsity_notes(model, stored)
    del stored, roots  # (the graph holds what it needs of them)
    _strip_debug_info(proto)
    write_metadata(proto, call, graph_outputs)
    out_path = Path(out_path)
    onnx.save_model(proto, out_path)
    try:  # checked from the file: checking the proto would serialize a second copy of it
        onnx.checker.check_model(str(out_path))
    except Exception:
        out_path.unlink(missing_ok=True)
        raise
    ops = Counter(node.op_type for node in proto.graph.node)
    inputs = tuple(value.name for value in proto.graph.input)
    return OnnxExport(
        out_path,
        out_path.stat().st_size,
        ops,
        used,
        notes,
        inputs,
        graph_outputs.names,
        graph_outputs.scored,
    )


def check_exportable(
    model: nn.Module,
    example_inputs: Any,
    *,
    output: OutputSelector | None = None,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
) -> str:
    """Export ``model`` (float, as it is) to a graph in memory, to know before any training
    whether it can be: returns the exporter that converts it.

    Raises:
        OnnxExportError: As `export_onnx` would: an op no exporter converts (naming the layer),
            inputs that are not tensors in one of the three forms, a scored output that is not
            a tensor.
    """
    _require_onnx()
    call = Call.of(model, example_inputs)
    _, used, _ = _export(model, call, output, every=False, opset=opset, exporter=exporter, notes=[])
    return used


def check_onnx(
    onnx_path: str | Path,
    shipped_model: nn.Module,
    inputs: Any,
    *,
    output: OutputSelector | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    exact: bool = True,
    batch_size: int = 256,
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
        batch_size: Samples per run, where ``inputs`` is not already batched.

    Raises:
        ValueError: If ``inputs`` holds no sample.
    """
    module = OrtModule(ort_session(onnx_path, exact=exact))
    got, expected = [], []
    shipped_model.eval()
    with torch.no_grad():
        for batch in input_batches(inputs, batch_size):
            want = scored_output(call_model(shipped_model, batch), output)
            expected.append(want.detach().float().cpu())
            got.append(call_model(module, batch).float())
    if not expected:
        raise ValueError("check_onnx got no input samples")
    quantizing = not exact or bool(_QUANTIZING_OPS & set(_ops(onnx_path)))
    scale = max(float(e.abs().max()) if e.numel() else 0.0 for e in expected)
    if atol is None:
        atol = QUANTIZED_TOLERANCE * scale if quantizing else EXACT_TOLERANCE[0]
    if rtol is None:
        rtol = 0.0 if quantizing else EXACT_TOLERANCE[1]
    kind = "activations quantized on the fly" if quantizing else "float kernels"
    for g, e in zip(got, expected, strict=True):
        if g.shape != e.shape:
            return OnnxCheck(
                False,
                float("inf"),
                float("inf"),
                atol,
                rtol,
                g,
                f"ONNX Runtime's outputs have shape {tuple(g.shape)}; the torch model's "
                f"{tuple(e.shape)}",
            )
    expected_t, got_t = torch.cat(expected), torch.cat(got)
    diff = (got_t - expected_t).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    excess = diff - (atol + rtol * expected_t.abs())
    agree = bool((excess <= 0).all())
    message = (
        f"{len(expected_t)} samples ({kind}): max |difference| {max_abs:.3g} "
        f"({max_rel:.3g} of the largest |output|), tolerance {atol:.3g} + {rtol:.3g} * |expected|"
    )
    if not agree:
        worst = int(excess.flatten().argmax())
        sample = worst // max(1, expected_t[0].numel())
        got_value, expected_value = (
            float(got_t.flatten()[worst]),
            float(expected_t.flatten()[worst]),
        )
        message = (
            f"ONNX Runtime's outputs differ from the torch model's: {message}; worst at sample "
            f"{sample}: {got_value:.6g} instead of {expected_value:.6g}"
        )
    return OnnxCheck(agree, max_abs, max_rel, atol, rtol, got_t, message)


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
    """
    ort = _require_ort()
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"The 'threads' parameter must be an int >= 1. Got {threads!r} instead.")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if exact:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


# --- export ---------------------------------------------------------------------------------


def _export(
    model: nn.Module,
    call: Call,
    output: OutputSelector | None,
    *,
    every: bool,
    opset: int,
    exporter: str,
    notes: list[str],
) -> tuple[onnx.ModelProto, str, Outputs]:
    """The unfolded graph of ``model`` called as ``call``, the exporter that made it and the
    graph's outputs."""
    call = call.at_least_two()
    module, outputs = plan_outputs(model, call, output, every=every)
    errors: dict[str, BaseException] = {}
    for name in ("dynamo", "legacy") if exporter == "auto" else (exporter,):
        try:
            with _quiet(native=name == "legacy"):
                proto = _EXPORTERS[name](module, call, outputs, opset)
        except Exception as err:  # torch.onnx raises many kinds; each is reported below
            errors[name] = err
            logger.debug("the %s exporter failed", name, exc_info=err)
            continue
        if errors:
            notes.append(
                f"exported by the legacy exporter: the dynamo exporter failed: "
                f"{_reason(errors['dynamo'])}"
            )
        name_axes(proto, call)
        notes += fixed_axes(proto, call)
        return proto, name, outputs
    raise _refusal(model, call, opset, errors) from None


def _dynamo(module: nn.Module, call: Call, outputs: Outputs, opset: int) -> onnx.ModelProto:
    axes = tuple({axis: torch.export.Dim.AUTO for axis in a} for a in call.axes())
    program = torch.onnx.export(
        module,
        call.tensors,
        dynamo=True,
        optimize=False,
        opset_version=opset,
        input_names=list(call.names),
        output_names=list(outputs.names),
        dynamic_shapes=(axes,),  # the module's one parameter, *tensors
        verbose=False,
    )
    return program.model_proto


def _legacy(module: nn.Module, call: Call, outputs: Outputs, opset: int) -> onnx.ModelProto:
    onnx = _require_onnx()
    buffer = io.BytesIO()
    axes = dict(zip(call.names, call.axes(), strict=True))
    axes.update({n: {0: "batch"} for n, b in zip(outputs.names, outputs.batched, strict=True) if b})
    torch.onnx.export(
        module,
        call.tensors,
        buffer,
        dynamo=False,
        do_constant_folding=False,
        opset_version=opset,
        input_names=list(call.names),
        output_names=list(outputs.names),
        dynamic_axes=axes,
        verbose=False,
    )
    return onnx.load_from_string(buffer.getvalue())


_EXPORTERS = {"dynamo": _dynamo, "legacy": _legacy}


@contextlib.contextmanager
def _quiet(*, native: bool = False) -> Iterator[None]:
    """Silence the exporters' progress lines, warnings and log records, and with ``native``
    what torch's C++ code prints (the legacy exporter prints its whole graph when it fails)."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            native_stdout_silenced() if native else contextlib.nullcontext(),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _reason(err: BaseException) -> str:
    """The innermost cause of an exporter's error, on one line."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = _ANSI.sub("", str(err)).strip()
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = line or type(err).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _refusal(
    model: nn.Module, call: Call, opset: int, errors: dict[str, BaseException]
) -> OnnxExportError:
    """The error for a model no exporter converts: the smallest layer that cannot be exported
    on its own (all of whose sublayers can), and each exporter's reason."""
    reasons = "; ".join(f"{name} exporter: {_reason(err)}" for name, err in errors.items())
    culprit = _culprit(model, call, opset)
    where = (
        f"layer {culprit[0]!r} ({culprit[1]}) cannot be exported: {culprit[2]}"
        if culprit
        else f"the op that fails is called by {type(model).__name__}.forward itself (each of its "
        "layers exports on its own)"
    )
    return OnnxExportError(
        f"{type(model).__name__} cannot be exported to ONNX (opset {opset}): {where}. ({reasons})"
    )


def _culprit(model: nn.Module, call: Call, opset: int) -> tuple[str, str, str] | None:
    """``(name, type, reason)`` of the first layer (in call order) that the legacy exporter
    cannot export on its own while it can export each of its sublayers."""
    calls: dict[str, tuple] = {}
    names = {module: name for name, module in model.named_modules()}

    def record(module: nn.Module, args: tuple) -> None:
        name = names.get(module)
        if name and name not in calls and all(isinstance(a, torch.Tensor) for a in args):
            calls[name] = tuple(a.detach() for a in args)

    handles = [m.register_forward_pre_hook(record) for m in names if m is not model]
    try:
        with torch.no_grad(), _quiet():
            call_model(model, call.arguments(call.tensors))
    except Exception:  # the model itself fails: nothing to attribute
        return None
    finally:
        for handle in handles:
            handle.remove()
    failing: dict[str, str] = {}
    for name, args in calls.items():
        module = model.get_submodule(name)
        try:
            with _quiet(native=True):
                torch.onnx.export(
                    module, args, io.BytesIO(), dynamo=False, opset_version=opset, verbose=False
                )
        except Exception as err:  # noqa: BLE001 - any failure marks the layer
            failing[name] = _reason(err)
    for name, reason in failing.items():
        if not any(other.startswith(f"{name}.") for other in failing):
            return name, type(model.get_submodule(name)).__name__, reason
    return None


# --- the coded tensors ----------------------------------------------------------------------


def _coded_roots(
    proto: onnx.ModelProto, stored: dict[str, PackedTensor], notes: list[str]
) -> dict[str, PackedTensor]:
    """The graph's initializers that the file holds as codes, by initializer name.

    Initializers are found by name (the unfolded graph keeps state-dict names), else by exact
    value. An initializer that repeats a tensor already found (a tied tensor exported twice)
    becomes an Identity of the first, so the graph stores it once.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    coded = {name: t for name, t in stored.items() if t.codes is not None}
    by_value: dict[tuple, PackedTensor] = {}
    for t in coded.values():
        by_value.setdefault(_fingerprint(t.value.numpy()), t)
    roots: dict[str, PackedTensor] = {}
    first: dict[int, str] = {}
    duplicates: list[tuple[str, str]] = []
    for init in graph.initializer:
        if init.data_type != 1:  # FLOAT
            continue
        array = numpy_helper.to_array(init)
        tensor = coded.get(init.name)
        if tensor is None or not np.array_equal(array, tensor.value.numpy()):
            tensor = by_value.get(_fingerprint(array))
            if tensor is None or not np.array_equal(array, tensor.value.numpy()):
                continue
        if id(tensor) in first:
            duplicates.append((init.name, first[id(tensor)]))
        else:
            first[id(tensor)] = init.name
            roots[init.name] = tensor
    for name, original in duplicates:
        _remove_initializer(graph, name)
        graph.node.insert(0, helper.make_node("Identity", [original], [name], name=f"{name}_tied"))
    found = {id(t) for t in roots.values()}
    found_values = {_fingerprint(t.value.numpy()) for t in roots.values()}
    missing = sorted(  # (a tensor equal to one found was merged with it by the exporter)
        n
        for n, t in coded.items()
        if id(t) not in found
        and n == _canonical(n, stored)
        and _fingerprint(t.value.numpy()) not in found_values
    )
    if missing:
        notes.append(
            f"stored as float32: {', '.join(missing)} (the exporter folded them into other tensors)"
        )
    return roots


def _canonical(name: str, stored: dict[str, PackedTensor]) -> str:
    """The first key of a (possibly tied) tensor."""
    return next(key for key, t in stored.items() if t is stored[name])


def _fingerprint(array: np.ndarray) -> tuple:
    return array.shape, hash(np.ascontiguousarray(array).tobytes())


def _remove_initializer(graph: onnx.GraphProto, name: str) -> None:
    for i, init in enumerate(graph.initializer):
        if init.name == name:
            del graph.initializer[i]
            return


def _optimize(proto: onnx.ModelProto, roots: dict[str, PackedTensor]) -> onnx.ModelProto:
    """The graph cleaned by onnxscript's optimizer (constants folded, no-ops removed), with the
    coded initializers kept out of its reach as graph inputs, so that their layout ops stay nodes
    (which `_Rewriter` applies to the codes). They come back as `_Rewriter`'s integer
    initializers; until then the graph reads them undefined."""
    from onnx import helper
    from onnxscript import optimizer

    graph = proto.graph
    for init in list(graph.initializer):
        if init.name in roots:
            shape = list(init.dims)
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, shape))
            graph.initializer.remove(init)
    with _quiet():
        proto = optimizer.optimize(proto)
    for value in list(proto.graph.input):
        if value.name in roots:
            proto.graph.input.remove(value)
    return proto


def _integer_roots(
    matmul: str, roots: dict[str, PackedTensor], stored: dict[str, PackedTensor], int8: list[str]
) -> set[str]:
    """The coded initializers whose MatMul / Gemm readers run on MatMulInteger: all of them
    (``integer``), none (``dequantize``), or those of the layers the file runs on int8 kernels
    (``auto``, given their names ``int8``)."""
    if matmul != "auto":
        return set(roots) if matmul == "integer" else set()
    layers = set(int8)
    return {
        name
        for name, tensor in roots.items()
        if any(key.rpartition(".")[0] in layers for key, t in stored.items() if t is tensor)
    }


def _sparsity_notes(model: nn.Module, stored: dict[str, PackedTensor]) -> list[str]:
    """A note on the weight tensors with many zeros (unstructured sparsity), which ONNX stores
    dense."""
    weights = {id(stored[n]): stored[n] for n in targets(model) if n in stored}
    sparse = [
        t for t in weights.values() if float((t.value == 0).float().mean()) >= SPARSE_NOTE_ZEROS
    ]
    if not sparse:
        return []
    zeros = sum(int((t.value == 0).sum()) for t in sparse)
    total = sum(t.value.numel() for t in sparse)
    return [
        f"unstructured sparsity stored dense: {zeros / total:.0%} zeros in {len(sparse)} weight "
        f"tensor{'s' if len(sparse) > 1 else ''} (no ONNX op runs a sparse weight faster; the "
        "packed file codes zeros in fewer bits)"
    ]


def _strip_debug_info(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debug records (stack traces, module paths): most of a
    small model's file otherwise."""
    graph = proto.graph
    for item in (*graph.node, *graph.value_info, *graph.input, *graph.output, *graph.initializer):
        del item.metadata_props[:]
        item.doc_string = ""


def _ops(onnx_path: str | Path) -> list[str]:
    onnx = _require_onnx()
    return [node.op_type for node in onnx.load(str(onnx_path), load_external_data=False).graph.node]


# --- the rewrite ------------------------------------------------------------------------------


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
        moved_ids: Each element's position among all stored codes, once layout ops moved them
            (a root's are ``offset`` onwards, made on demand: see `ids`).
    """

    codes: np.ndarray
    scale: np.ndarray | None
    codebook: np.ndarray | None
    root: str
    roots: frozenset[str]
    offset: int = 0
    moved_ids: np.ndarray | None = None

    @property
    def ids(self) -> np.ndarray:
        """Each element's position among all stored codes (to find elements stored twice)."""
        if self.moved_ids is not None:
            return self.moved_ids
        return np.arange(self.offset, self.offset + self.codes.size).reshape(self.codes.shape)


class _Rewriter:
    """Replaces the coded initializers of a graph by their codes (see the module docstring).

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
        from onnx import numpy_helper

        values = {i.name: numpy_helper.to_array(i) for i in self.graph.initializer}
        for node in self.graph.node:
            if node.op_type == "Constant" and node.attribute[0].name == "value":
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
                run("ids"),
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
            return _Coded(index.reshape(values.shape), None, book, name, frozenset({name}), offset)
        scale = np.broadcast_to(table.astype(np.float32), values.shape)  # a view: no copy
        return _Coded(values, scale, None, name, frozenset({name}), offset)

    def _needed(self, coded: dict[str, _Coded], folded: set[int]) -> dict[str, _Coded]:
        """Coded tensors read by ops that stay (or that are graph outputs)."""
        read = {
            name for i, node in enumerate(self.graph.node) if i not in folded for name in node.input
        }
        read |= {o.name for o in self.graph.output}
        return {name: c for name, c in coded.items() if name in read}

    def _stored_twice(self, coded: dict[str, _Coded], folded: set[int]) -> set[str]:
        """Roots some of whose elements would be stored in two initializers (a tied table read
        as is by a Gather and transposed by a MatMul, say)."""
        needed = list(self._needed(coded, folded).values())
        moved = [c.ids.ravel() for c in needed if c.moved_ids is not None]
        if not moved:
            return set()
        names = list(self.roots)
        starts = np.array([offset for offset, _ in _offsets(self.roots)])

        def owners(ids: np.ndarray) -> set[str]:
            return {names[i] for i in np.unique(np.searchsorted(starts, ids, side="right") - 1)}

        touched = owners(np.concatenate(moved))
        direct = [c.ids.ravel() for c in needed if c.moved_ids is None and c.root in touched]
        values, counts = np.unique(np.concatenate(moved + direct), return_counts=True)
        return owners(values[counts > 1])

    # writing

    def _materialize(self, coded: dict[str, _Coded], folded: set[int]) -> None:
        """Write each coded tensor that a kept op reads: one integer initializer, and the
        nodes that dequantize it (or the integer MatMuls that read it)."""
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
            codes_name = self._add(codes, f"{base}_quantized", self._int_type(c.codes))
            weights = {stored: codes_name}
            for layout in {_transposed(node) for node in integer} - {stored}:
                weights[layout] = self._unique(f"{base}_quantized_t")
                head.append(_node("Transpose", [codes_name], [weights[layout]], perm=[1, 0]))
            _, _, scale, _ = self._form(c)
            scale_name = self._add(scale.astype(np.float32), f"{base}_scale")
            for node in integer:
                self._integer_matmul_nodes(
                    node, weights[_transposed(node)], scale_name, kept, quantized_inputs
                )
            if rest:
                head.append(self._dequantize_node(name, c, codes_name, scale_name))
        del self.graph.node[:]
        self.graph.node.extend(head + kept)

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

    def _dequantize_node(self, name: str, c: _Coded, codes: str, scale: str) -> Any:
        kind, axis, _, block = self._form(c)
        attrs = {"axis": axis} if kind in ("axis", "block") else {}
        if kind == "block":
            attrs["block_size"] = block
        return _node("DequantizeLinear", [codes, scale], [name], **attrs)

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
        scale: str,
        kept: list[Any],
        quantized_inputs: dict[str, tuple[str, str, str]],
    ) -> None:
        """Replace ``node`` in ``kept`` by DynamicQuantizeLinear (one per activation) +
        MatMulInteger + Cast + Mul (+ Add for a Gemm's bias), as quantize_dynamic writes it."""
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
            _node("MatMulInteger", [q, weight, z], [product]),
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


def _node(op: str, inputs: list[str], outputs: list[str], **attrs: Any) -> Any:
    from onnx import helper

    return helper.make_node(op, inputs, outputs, **attrs)


def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _transposed(node: Any) -> bool:
    """Whether a MatMul / Gemm reads its weight as [N, K] (a Gemm with transB)."""
    return node.op_type == "Gemm" and bool(_attributes(node).get("transB", 0))


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
        return numpy_helper.from_array(np.ascontiguousarray(array), name)
    numpy_type = {
        TensorProto.INT4: ml_dtypes.int4,
        TensorProto.UINT4: ml_dtypes.uint4,
        TensorProto.INT8: np.int8,
        TensorProto.UINT8: np.uint8,
        TensorProto.INT16: np.int16,
        TensorProto.UINT16: np.uint16,
    }[dtype]
    return numpy_helper.from_array(np.ascontiguousarray(array).astype(numpy_type), name)


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError(
            "ONNX export needs the 'onnx' extra: pip install -e \".[onnx]\" (installs onnx, "
            "onnxruntime and onnxscript)."
        ) from None
    return onnx


def _require_ort():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(
            "ONNX Runtime checks need the 'onnx' extra: pip install -e \".[onnx]\" (installs "
            "onnx, onnxruntime and onnxscript)."
        ) from None
    return onnxruntime

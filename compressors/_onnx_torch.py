"""A model's graph out of ``torch.onnx``: the dynamo exporter, else the legacy one, quietly;
where neither converts the model, an `OnnxExportError` naming the smallest layer that fails and
why (see `compressors.onnx_export`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compressors._onnx_io import (
    Call,
    OnnxExportError,
    Outputs,
    OutputSelector,
    call_model,
    fixed_axes,
    name_axes,
    plan_outputs,
)
from compressors._quiet import native_stdout_silenced

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: ONNX's data type of float32 tensors.
FLOAT = 1


def export_graph(
    model: nn.Module,
    call: Call,
    output: OutputSelector | None,
    *,
    every: bool,
    opset: int,
    exporter: str,
    notes: list[str],
    held: dict[str, Any] | None = None,
) -> tuple[onnx.ModelProto, str, Outputs]:
    """The unfolded graph of ``model`` called as ``call``, the exporter that made it and the
    graph's outputs.

    With ``held`` (a dict), the dynamo exporter's float32 initializers are not serialized into
    the graph but put there, by name (tensors with ``numpy()``, sharing the model's memory): the
    graph reads them undefined until `compressors._onnx_graph.restore_held` puts back those
    the packed file does not replace by codes (a 110 M BERT's 4-bit export held 1x the fp32
    bytes less). The legacy exporter's graph holds every initializer."""
    call = call.at_least_two()
    module, outputs = plan_outputs(model, call, output, every=every)
    errors: dict[str, BaseException] = {}
    for name in ("dynamo", "legacy") if exporter == "auto" else (exporter,):
        try:
            with quiet(native=name == "legacy"):
                proto = _EXPORTERS[name](module, call, outputs, opset, held)
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


def _dynamo(
    module: nn.Module, call: Call, outputs: Outputs, opset: int, held: dict[str, Any] | None
) -> onnx.ModelProto:
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
    if held is not None:
        inputs = {value.name for value in program.model.graph.inputs}
        for value in program.model.graph.initializers.values():
            tensor = value.const_value
            if tensor is not None and int(tensor.dtype) == FLOAT and value.name not in inputs:
                held[value.name] = tensor
                value.const_value = None  # (serialized without its data)
    return program.model_proto


def _legacy(
    module: nn.Module, call: Call, outputs: Outputs, opset: int, _held: dict[str, Any] | None
) -> onnx.ModelProto:
    onnx = require_onnx()
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
def quiet(*, native: bool = False) -> Iterator[None]:
    """Silence the exporters' progress lines, warnings and log records, and with ``native``
    what torch's C++ code prints (the legacy exporter prints its whole graph when it fails)."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnx_ir")
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
        with torch.no_grad(), quiet():
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
            with quiet(native=True):
                torch.onnx.export(
                    module, args, io.BytesIO(), dynamo=False, opset_version=opset, verbose=False
                )
        except Exception as err:  # noqa: BLE001 - any failure marks the layer
            failing[name] = _reason(err)
    for name, reason in failing.items():
        if not any(other.startswith(f"{name}.") for other in failing):
            return name, type(model.get_submodule(name)).__name__, reason
    return None


def require_onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError(
            "ONNX export needs the 'onnx' extra: pip install -e \".[onnx]\" (installs onnx, "
            "onnxruntime and onnxscript)."
        ) from None
    return onnx

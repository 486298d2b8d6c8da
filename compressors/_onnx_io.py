"""The inputs and outputs of an exported graph: how the model is called, which output is scored.

A model is called on one tensor (``model(x)``), on positional tensors (``model(left, right)``,
given as a tuple) or on keyword tensors (``model(input_ids=..., attention_mask=...)``, given as a
dict). The graph has one input per tensor, named by the dict's keys, by ``forward``'s parameter
names (``input_<i>`` where it has none), or ``input`` for a lone tensor; the first axis of each
is dynamic (``batch``), and the second of integer inputs of two or more axes (token ids, masks:
``sequence``), and any axis that other batches of the same call have at other sizes (float
features padded per batch to their longest sequence, a boolean mask: `Call.varying_in`).

A model may return a tensor, a tuple, a dict or a ``ModelOutput``. The graph computes the scored
output (``output``: what ``Data.forward`` selects; by default the tensor, ``.logits``, or the
first element), or, with ``outputs="all"``, every tensor the model returns, named by where it is
(``logits``, ``output_0``, ``hidden.1``), the scored one among them. The graph records the call's
input names and its scored output's name in its metadata (`INPUTS_KEY`, `SCORED_KEY`), so that
`compressors.onnx_export.OrtModule` takes the same call forms as the model and returns the
scored output.

Nothing here imports the project's ``experiments``: what the task knows (which output is
scored) comes in as a callable.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    import onnx
    import onnxruntime

#: Metadata key of a graph: its model's input names in call order (JSON list).
INPUTS_KEY = "squeeze.inputs"
#: Metadata key of a graph: the name of its scored output.
SCORED_KEY = "squeeze.scored_output"
#: ``outputs`` choices of `compressors.onnx_export.export_onnx`.
OUTPUT_CHOICES = ("scored", "all")
#: Names of a graph's dynamic axes.
BATCH, SEQUENCE = "batch", "sequence"

#: ``output(model_outputs) -> tensor``: the scored output, as ``Data.forward`` selects it.
OutputSelector = Callable[[Any], torch.Tensor]


class OnnxExportError(ValueError):
    """The model cannot be exported to ONNX (the message names the layer and op where known)."""


@dataclass(frozen=True)
class Call:
    """How a model is called on an example batch.

    Attributes:
        kind: ``tensor`` (``model(x)``), ``positional`` (``model(*inputs)``) or ``keyword``
            (``model(**inputs)``).
        names: The graph's input names, in call order.
        tensors: The example tensors, in the same order.
        varying: For each tensor, the axes past the batch's that other batches have at other
            sizes (`varying_in`): dynamic too. Empty: none known.
    """

    kind: str
    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]
    varying: tuple[frozenset[int], ...] = ()

    @classmethod
    def of(cls, model: nn.Module, inputs: Any) -> Call:
        """The call of ``model`` on ``inputs`` (a tensor, a tuple or list of tensors, or a dict
        of tensors).

        Raises:
            OnnxExportError: If ``inputs`` is anything else (a nested structure, a value that is
                not a tensor), naming what is not a tensor.
        """
        if isinstance(inputs, torch.Tensor):
            return cls("tensor", ("input",), (inputs,))
        if isinstance(inputs, Mapping):
            items = list(inputs.items())
            kind = "keyword"
        elif isinstance(inputs, tuple | list):
            items = list(zip(_positional_names(model, len(inputs)), inputs, strict=True))
            kind = "positional"
        else:
            raise OnnxExportError(_form_error(f"a value of type {type(inputs).__name__}"))
        if not items:
            raise OnnxExportError(_form_error(f"an empty {type(inputs).__name__}"))
        for name, value in items:
            if not isinstance(name, str):
                raise OnnxExportError(_form_error(f"a dict key {name!r} that is not a string"))
            if not isinstance(value, torch.Tensor):
                where = f"key {name!r}" if kind == "keyword" else f"argument {name!r}"
                raise OnnxExportError(_form_error(f"{where} of type {type(value).__name__}"))
        return cls(kind, tuple(n for n, _ in items), tuple(v for _, v in items))

    def arguments(self, tensors: Iterable[torch.Tensor]) -> Any:
        """The model's inputs with ``tensors`` in place of the example's (same order)."""
        tensors = tuple(tensors)
        if self.kind == "tensor":
            return tensors[0]
        if self.kind == "keyword":
            return dict(zip(self.names, tensors, strict=True))
        return tensors

    def axes(self) -> list[dict[int, str]]:
        """The dynamic axes of each input: the batch axis, the sequence axis of integer
        inputs of two or more axes (token ids, attention masks), and the `varying` ones (axis 1:
        ``sequence``, axis k past it: ``axis<k>``)."""
        every = []
        for i, tensor in enumerate(self.tensors):
            axes = dynamic_axes(tensor)
            for axis in sorted(self.varying[i] if i < len(self.varying) else ()):
                axes.setdefault(axis, SEQUENCE if axis == 1 else f"axis{axis}")
            every.append(axes)
        return every

    def varying_in(self, others: Iterable[Any]) -> Call:
        """This call, with the axes (past the batch's) at which the inputs of ``others``
        (other batches of the same call form: a data split's, padded per batch) have other
        sizes than the example's marked dynamic. Inputs of another form are skipped."""
        varying = [set(v) for v in self.varying] or [set() for _ in self.tensors]
        for inputs in others:
            tensors = _same_form(self, inputs)
            for i, (mine, theirs) in enumerate(zip(self.tensors, tensors or (), strict=False)):
                if mine.dim() == theirs.dim():
                    varying[i] |= {
                        axis
                        for axis in range(1, mine.dim())
                        if mine.shape[axis] != theirs.shape[axis]
                    }
        return dataclasses.replace(self, varying=tuple(frozenset(v) for v in varying))

    def at_least_two(self) -> Call:
        """The call with at least 2 samples (and 2 tokens) in every input: exporters fix axes
        of size 1."""
        tensors = tuple(
            _at_least_two(t, i < len(self.varying) and 1 in self.varying[i])
            for i, t in enumerate(self.tensors)
        )
        return dataclasses.replace(self, tensors=tensors)


def _same_form(call: Call, inputs: Any) -> tuple[torch.Tensor, ...] | None:
    """``inputs``' tensors in ``call``'s order, or None where they are of another form."""
    if call.kind == "tensor":
        return (inputs,) if isinstance(inputs, torch.Tensor) else None
    if call.kind == "keyword":
        if not isinstance(inputs, Mapping) or set(inputs) != set(call.names):
            return None
        values = tuple(inputs[name] for name in call.names)
    else:
        if not isinstance(inputs, tuple | list) or len(inputs) != len(call.tensors):
            return None
        values = tuple(inputs)
    return values if all(isinstance(v, torch.Tensor) for v in values) else None


def dynamic_axes(tensor: torch.Tensor) -> dict[int, str]:
    """``{0: "batch"}``, and ``1: "sequence"`` for an integer tensor of two or more axes."""
    axes = {0: BATCH} if tensor.dim() >= 1 else {}
    if _is_integer(tensor) and tensor.dim() >= 2:
        axes[1] = SEQUENCE
    return axes


def _is_integer(tensor: torch.Tensor) -> bool:
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def _at_least_two(tensor: torch.Tensor, varying: bool = False) -> torch.Tensor:
    if tensor.dim() >= 1 and tensor.shape[0] < 2:
        tensor = torch.cat([tensor] * 2)
    if (varying or _is_integer(tensor)) and tensor.dim() >= 2 and tensor.shape[1] < 2:
        tensor = torch.cat([tensor] * 2, dim=1)
    return tensor


def _positional_names(model: nn.Module, count: int) -> list[str]:
    """``forward``'s names for ``count`` positional arguments (``input_<i>`` past them)."""
    names: list[str] = []
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        parameters = []
    for p in parameters:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        names.append(p.name)
    names = names[:count] + [f"input_{i}" for i in range(len(names), count)]
    return [n if names.count(n) == 1 else f"input_{i}" for i, n in enumerate(names)]


def _form_error(what: str) -> str:
    return (
        "ONNX export takes the model's inputs as one tensor, a tuple of tensors (positional "
        f"arguments) or a dict of tensors (keyword arguments); got {what}"
    )


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple or list, else
    ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def scored_output(outputs: Any, output: OutputSelector | None = None) -> torch.Tensor:
    """The scored output among a model's ``outputs``: ``output(outputs)``, or by default the
    tensor itself, its ``logits`` (a ``ModelOutput`` or dict), the first element of a tuple or
    list, or a dict's first tensor.

    Raises:
        OnnxExportError: If what is selected is not a tensor.
    """
    if output is not None:
        chosen = output(outputs)
    elif isinstance(outputs, torch.Tensor):
        chosen = outputs
    elif isinstance(getattr(outputs, "logits", None), torch.Tensor):
        chosen = outputs.logits
    elif isinstance(outputs, Mapping):
        chosen = outputs.get("logits")
        if not isinstance(chosen, torch.Tensor):
            chosen = next((v for v in outputs.values() if isinstance(v, torch.Tensor)), outputs)
    elif isinstance(outputs, tuple | list) and outputs:
        chosen = outputs[0]
    else:
        chosen = outputs
    if not isinstance(chosen, torch.Tensor):
        raise OnnxExportError(
            f"the scored output of the model is a {type(chosen).__name__}, not a tensor (the "
            f"model returns a {type(outputs).__name__}); pass an 'output' selector"
        )
    return chosen


def tensor_leaves(outputs: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor in ``outputs`` (a tensor, tuple, list, dict or ``ModelOutput``) with its
    name: the keys and positions that lead to it (``logits``, ``output_1``, ``hidden.0``);
    anything else (None, numbers) is left out."""
    if isinstance(outputs, torch.Tensor):
        return [(prefix or "output", outputs)]
    if isinstance(outputs, Mapping):
        items = [(str(k), v) for k, v in outputs.items()]
    elif isinstance(outputs, tuple | list):
        items = [(str(i) if prefix else f"output_{i}", v) for i, v in enumerate(outputs)]
    else:
        return []
    leaves = []
    for key, value in items:
        leaves += tensor_leaves(value, f"{prefix}.{key}" if prefix else key)
    return leaves


class Scored(nn.Module):
    """``model`` called on the graph's inputs (flat, in call order), returning what the graph
    computes: its scored output, or every tensor it returns (``outputs="all"``).

    It holds the model's own parameters, buffers and layers under their own names (the same
    dicts, not a ``model.`` submodule), so that the exported initializers keep the state-dict
    names the packed file uses.
    """

    def __init__(
        self,
        model: nn.Module,
        call: Call,
        output: OutputSelector | None,
        *,
        every: bool = False,
        extra: bool = False,
    ) -> None:
        super().__init__()
        for attr in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            object.__setattr__(self, attr, getattr(model, attr))
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_call", call)
        object.__setattr__(self, "_output", output)
        object.__setattr__(self, "_every", every)
        object.__setattr__(self, "_extra", extra)
        self.training = model.training

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs = call_model(self._model, self._call.arguments(tensors))
        if not self._every:
            return scored_output(outputs, self._output)
        leaves = tuple(t for _, t in tensor_leaves(outputs))
        if self._extra:  # computed by the selector from the outputs: one more output
            return (*leaves, scored_output(outputs, self._output))
        return leaves


@dataclass(frozen=True)
class Outputs:
    """The graph's outputs: their names and which one is scored."""

    names: tuple[str, ...]
    scored: str
    batched: tuple[bool, ...]


def plan_outputs(
    model: nn.Module, call: Call, output: OutputSelector | None, *, every: bool
) -> tuple[Scored, Outputs]:
    """The module to export and its outputs, from one eager pass on the example.

    Raises:
        OnnxExportError: If the scored output is not a tensor, or (``every``) the model returns
            no tensor.
    """
    with torch.no_grad():
        outputs = call_model(model, call.arguments(call.tensors))
    chosen = scored_output(outputs, output)
    rows = call.tensors[0].shape[0] if call.tensors[0].dim() else -1
    if not every:
        module = Scored(model, call, output)
        return module, Outputs(("output",), "output", (_batched(chosen, rows),))
    leaves = tensor_leaves(outputs)
    index = next((i for i, (_, t) in enumerate(leaves) if t is chosen), None)
    names = [name for name, _ in leaves]
    tensors = [t for _, t in leaves]
    extra = index is None
    if extra:
        names.append("scored" if "output" in names else "output")
        tensors.append(chosen)
        index = len(names) - 1
    module = Scored(model, call, output, every=True, extra=extra)
    batched = tuple(_batched(t, rows) for t in tensors)
    return module, Outputs(tuple(names), names[index], batched)


def _batched(tensor: torch.Tensor, rows: int) -> bool:
    return tensor.dim() >= 1 and tensor.shape[0] == rows


def name_axes(proto: onnx.ModelProto, call: Call) -> None:
    """Rename the symbolic dimensions the exporter gave the inputs' dynamic axes (``s39``) to
    ``batch`` and ``sequence``, wherever they occur in the graph's inputs, outputs and value
    infos."""
    graph = proto.graph
    renames: dict[str, str] = {}
    by_name = {value.name: value for value in graph.input}
    for name, axes in zip(call.names, call.axes(), strict=True):
        value = by_name.get(name)
        if value is None:
            continue
        dims = value.type.tensor_type.shape.dim
        for axis, label in axes.items():
            if axis < len(dims) and dims[axis].dim_param:
                renames.setdefault(dims[axis].dim_param, label)
    if not renames:
        return
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]


def fixed_axes(proto: onnx.ModelProto, call: Call) -> list[str]:
    """Notes on the dynamic axes the exporter fixed to the example's size."""
    by_name = {value.name: value for value in proto.graph.input}
    notes = []
    for name, axes in zip(call.names, call.axes(), strict=True):
        if name not in by_name:
            notes.append(f"input {name!r} is not in the graph (the model does not use it)")
            continue
        dims = by_name[name].type.tensor_type.shape.dim
        notes += [
            f"the {label} axis of input {name!r} is fixed to {dims[axis].dim_value} (the "
            "exporter specialised it)"
            for axis, label in axes.items()
            if axis < len(dims) and not dims[axis].dim_param
        ]
    return notes


def write_metadata(proto: onnx.ModelProto, call: Call, outputs: Outputs) -> None:
    """Record the call's input names and the scored output's name in the graph."""
    from onnx import helper

    del proto.metadata_props[:]
    helper.set_model_props(
        proto, {INPUTS_KEY: json.dumps(list(call.names)), SCORED_KEY: outputs.scored}
    )


def read_metadata(
    metadata: Mapping[str, str], graph_inputs: list[str], graph_outputs: list[str]
) -> tuple[list[str], str]:
    """The call's input names and the scored output's name of a graph (its first output, and
    its inputs in order, for a graph that does not record them)."""
    names = json.loads(metadata[INPUTS_KEY]) if INPUTS_KEY in metadata else list(graph_inputs)
    scored = metadata.get(SCORED_KEY, graph_outputs[0])
    return names, scored if scored in graph_outputs else graph_outputs[0]


def ort_feeds(
    names: list[str], graph_inputs: list[str], args: tuple, kwargs: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """ONNX Runtime's feed for a call with positional ``args`` and keyword ``kwargs``: each
    value goes to the input of its name (positional ones in call order, ``names``); inputs the
    exporter dropped (unused by the model) are left out.

    Raises:
        TypeError: If an argument is not a tensor, is given twice or is unknown, or an input of
            the graph has no value.
    """
    if len(args) > len(names):
        raise TypeError(
            f"the graph takes {len(names)} inputs ({', '.join(names)}); got {len(args)}"
        )
    values = dict(zip(names, args, strict=False))
    for key, value in kwargs.items():
        if key in values:
            raise TypeError(f"input {key!r} given twice")
        if key not in names:
            raise TypeError(f"the graph has no input {key!r} (its inputs: {', '.join(names)})")
        values[key] = value
    missing = [name for name in graph_inputs if name not in values]
    if missing:
        raise TypeError(f"no value for the graph's input(s) {', '.join(missing)}")
    feed = {}
    for name in graph_inputs:
        value = values[name]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"input {name!r} must be a tensor; got {type(value).__name__}")
        feed[name] = np.ascontiguousarray(value.detach().cpu().numpy())
    return feed


def input_batches(inputs: Any, batch_size: int) -> Iterator[Any]:
    """Batches of the model's inputs: slices of at most ``batch_size`` rows of one tensor, of a
    tuple or of a dict of tensors, or of each batch any other iterable (a list, a generator)
    yields (so that a check's activations stay those of ``batch_size`` rows). Tensors whose
    first axes differ (an ``nn.EmbeddingBag``'s flat ids beside its per-sample offsets) are not
    rows of one batch: they stay whole."""
    if isinstance(inputs, Mapping | tuple) and not _splittable(inputs):
        _rows(inputs)  # (refuses what is no batch of tensors)
        yield inputs
        return
    if isinstance(inputs, torch.Tensor | Mapping | tuple):
        rows = len(inputs) if isinstance(inputs, torch.Tensor) else _rows(inputs)
        for start in range(0, rows, batch_size):
            yield _slice(inputs, start, start + batch_size)
        return
    for batch in inputs:
        if _splittable(batch):
            yield from input_batches(batch, batch_size)
        else:
            yield batch


def _splittable(inputs: Any) -> bool:
    """Whether ``inputs`` is one tensor, a tuple or a dict of tensors with a batch axis."""
    if isinstance(inputs, torch.Tensor):
        return inputs.dim() > 0
    if not isinstance(inputs, Mapping | tuple):
        return False
    values = list(inputs.values()) if isinstance(inputs, Mapping) else list(inputs)
    return (
        bool(values)
        and all(isinstance(v, torch.Tensor) and v.dim() > 0 for v in values)
        and len({v.shape[0] for v in values}) == 1
    )


def _rows(inputs: Mapping | tuple) -> int:
    values = list(inputs.values()) if isinstance(inputs, Mapping) else list(inputs)
    if not values or not isinstance(values[0], torch.Tensor) or values[0].dim() == 0:
        raise TypeError(_form_error(f"a {type(inputs).__name__} without a batch of tensors"))
    return int(values[0].shape[0])


def _slice(inputs: Any, start: int, stop: int) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs[start:stop]
    if isinstance(inputs, Mapping):
        return {k: _slice(v, start, stop) for k, v in inputs.items()}
    return tuple(_slice(v, start, stop) for v in inputs)


class OrtModule(nn.Module):
    """An ONNX Runtime session as a torch module, called as the exported model is: ``module(x)``,
    ``module(left, right)`` or ``module(input_ids=..., attention_mask=...)``; it runs the graph
    (on the CPU) and returns its scored output as a tensor, so the project's evaluation and
    latency code (`experiments.evaluate`, `experiments.metrics.latency_ms`) runs on the deployed
    graph.

    Attributes:
        session: The ONNX Runtime session.
        input_names: The model's inputs in call order (positional arguments are matched to
            them), as the graph records them (its own inputs for a graph made elsewhere).
        scored: The name of the output returned (recorded by `export_onnx`; else the first).
    """

    def __init__(self, session: onnxruntime.InferenceSession) -> None:
        super().__init__()
        self.session = session
        self._graph_inputs = [i.name for i in session.get_inputs()]
        metadata = session.get_modelmeta().custom_metadata_map
        self.input_names, self.scored = read_metadata(
            metadata, self._graph_inputs, [o.name for o in session.get_outputs()]
        )

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        feed = ort_feeds(self.input_names, self._graph_inputs, args, kwargs)
        return torch.from_numpy(self.session.run([self.scored], feed)[0])


def cannot_run(batch: Any, err: Exception) -> str:
    """Why ONNX Runtime could not run a batch: its shapes and ONNX Runtime's message."""
    tensors = batch.items() if isinstance(batch, dict) else enumerate(_as_tuple(batch))
    shapes = ", ".join(f"{k}: {list(t.shape)}" for k, t in tensors if hasattr(t, "shape"))
    said = " ".join(str(err).split())
    return f"ONNX Runtime cannot run the graph on a batch ({shapes}): {said[:600]}"


def _as_tuple(batch: Any) -> tuple:
    return tuple(batch) if isinstance(batch, tuple | list) else (batch,)

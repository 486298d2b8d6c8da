"""How a task's data reaches its model: splits as torch datasets or loaders, batches of any
structure, the model's call and the output that is scored.

A split is one of (`as_data` accepts each):

- a `Split`: inputs and targets held in memory as two tensors (the simplest case; batches are
  slices, and it is the only kind whose order is fixed, so the teacher's outputs on it can be
  cached);
- a map-style or iterable `torch.utils.data.Dataset`, or anything indexable with a length (a
  Hugging Face ``datasets.Dataset``), batched by a `torch.utils.data.DataLoader` with the task's
  ``collate_fn``;
- a `torch.utils.data.DataLoader` of the user's, iterated as it is (its own batch size,
  sampler, workers and collate);
- a factory ``loader(batch_size=..., shuffle=..., seed=...) -> iterable of batches`` (or of no
  arguments, a LightningDataModule's ``train_dataloader``: its loader iterated as it is), as a
  Lightning ``DataModule``'s ``train_dataloader`` would be wrapped.

A batch may be a tensor, a tuple or list, or a mapping (a dict, a Hugging Face
``BatchEncoding``). The task says how a batch becomes the model's call and its targets, and
which of the model's outputs is scored (`Adapters`); the defaults read ``(inputs..., target)``
tuples and dicts with a ``labels`` key, and score a tensor, the first element of a tuple, or the
``logits`` of a ``ModelOutput`` / dict.
"""

from __future__ import annotations

import inspect
import itertools
import random
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from experiments._layout import CLASS_LAST, class_last
from experiments._objectives import IGNORE_INDEX, ScoreFn, accuracy

#: Keys of a dict batch that hold the targets (the first present is used) and are left out of
#: the model's call.
TARGET_KEYS = ("labels", "label", "targets", "target", "y")


class WorkloadError(ValueError):
    """A task's data, model call or outputs cannot be used (raised before any training)."""


@dataclass(frozen=True)
class Split(Dataset):
    """Inputs and targets of one split held in memory, and how a model's outputs are scored.

    Attributes:
        x: Inputs, one row per sample (what the model is called on).
        y: Targets: integer labels, values, or reference embeddings.
        score: ``score(outputs, y) -> float``, higher is better: top-1 accuracy by default, mean
            cosine similarity for embedding targets. Reported as ``val_acc`` / ``test_acc``.
    """

    x: torch.Tensor
    y: torch.Tensor
    score: ScoreFn = accuracy

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    # A Split given to a compressor as its context's training data (tests do) is read the way
    # the task reads it (`Data.calibration`, `Data.forward`).
    def calibration(self, *, samples: int, batch_size: int, device: Any = None) -> list[Calib]:
        return as_data(self).calibration(samples=samples, batch_size=batch_size, device=device)

    def forward(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        return as_data(self).forward(model, inputs)


#: ``loader(batch_size=..., shuffle=..., seed=...) -> iterable of batches``.
LoaderFactory = Callable[..., Iterable[Any]]


class Calib(NamedTuple):
    """One batch of calibration data: the model's inputs, the targets and the number of rows."""

    inputs: Any
    targets: Any
    rows: int


class Batch(NamedTuple):
    """One batch as the loops use it.

    Attributes:
        inputs: What the model is called on (a tensor, a tuple of positional arguments, or a
            dict of keyword arguments).
        targets: What the loss and the score compare the outputs with (None if the batch has
            none).
        rows: Number of samples.
        index: Row numbers in the split (in-memory splits only: a cached teacher's outputs are
            looked up by them), else None.
        raw: The batch as the data source gave it.
    """

    inputs: Any
    targets: Any
    rows: int
    index: torch.Tensor | None
    raw: Any


@dataclass(frozen=True)
class Adapters:
    """How a batch becomes the model's call and its targets, and which output is scored.

    Attributes:
        inputs: ``inputs(batch) -> tensor | tuple | dict``; None: `default_inputs`.
        targets: ``targets(batch) -> targets``; None: `default_targets`.
        output: Which of the model's outputs is scored and trained on: None (a tensor, the
            first element of a tuple or list, ``.logits`` of a ``ModelOutput`` or dict), a key
            or attribute name, a position, or a function ``output(model_outputs) -> tensor``.
        collate_fn: Collates a dataset's samples into a batch (the DataLoader's default if None).
        class_axis: The class axis of a classifier's scored output as the model returns it
            (-1: last; 1: torch's dense classifiers, ``(batch, classes, height, width)``);
            `Data.forward` gives it class-last (`experiments._layout`).
    """

    inputs: Callable[[Any], Any] | None = None
    targets: Callable[[Any], Any] | None = None
    output: str | int | Callable[[Any], torch.Tensor] | None = None
    collate_fn: Callable[[list[Any]], Any] | None = None
    class_axis: int = CLASS_LAST


def default_inputs(batch: Any) -> Any:
    """The model's inputs in a batch: a mapping without its target key (``labels``, ...), all
    but the last element of a tuple (one element alone, several as positional arguments), or the
    batch itself."""
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in TARGET_KEYS}
    if isinstance(batch, tuple | list):
        if len(batch) == 1:
            return batch[0]
        rest = batch[:-1]
        return rest[0] if len(rest) == 1 else tuple(rest)
    return batch


def default_targets(batch: Any) -> Any:
    """The targets in a batch: a mapping's ``labels`` (or ``label``, ``targets``, ``target``,
    ``y``), a tuple's last element, or None."""
    if isinstance(batch, Mapping):
        return next((batch[k] for k in TARGET_KEYS if k in batch), None)
    if isinstance(batch, tuple | list) and len(batch) >= 2:
        return batch[-1]
    return None


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple or list, else
    ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def select_output(outputs: Any, output: str | int | Callable[[Any], Any] | None = None) -> Any:
    """The scored output among a model's outputs (see `Adapters.output`)."""
    if callable(output):
        return output(outputs)
    if output is None:
        if isinstance(outputs, torch.Tensor):
            return outputs
        logits = getattr(outputs, "logits", None)
        if isinstance(logits, torch.Tensor):
            return logits
        if isinstance(outputs, Mapping):
            if isinstance(outputs.get("logits"), torch.Tensor):
                return outputs["logits"]
            return next((v for v in outputs.values() if isinstance(v, torch.Tensor)), outputs)
        if isinstance(outputs, tuple | list) and outputs:
            return outputs[0]
        return outputs
    if isinstance(output, int):
        return outputs[output]
    if isinstance(outputs, Mapping) and output in outputs:
        return outputs[output]
    return getattr(outputs, output)


def to_device(value: Any, device: Any) -> Any:
    """``value`` with every tensor in it moved to ``device`` (None: left where it is); mappings
    (a ``BatchEncoding``) become plain dicts."""
    if isinstance(value, torch.Tensor):
        return value if device is None else value.to(device)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    return value


def take_rows(value: Any, index: torch.Tensor) -> Any:
    """The rows ``index`` of every tensor with a batch axis in ``value``."""
    if isinstance(value, torch.Tensor):
        return value[index] if value.dim() else value
    if isinstance(value, Mapping):
        return {k: take_rows(v, index) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(take_rows(v, index) for v in value)
    return value


def count_rows(value: Any) -> int:
    """The batch size of ``value``: the length of the first tensor with a batch axis in it."""
    for leaf in leaves(value):
        if isinstance(leaf, torch.Tensor) and leaf.dim():
            return int(leaf.shape[0])
        if isinstance(leaf, Sequence) and not isinstance(leaf, str):
            return len(leaf)
    raise WorkloadError(f"cannot tell the batch size of a batch of type {describe(value)}")


def batch_rows(inputs: Any, targets: Any) -> int:
    """The samples in a batch: its targets' count where it has targets (one per sample, or a
    list of one item per sample as a detector's), else its inputs' batch axis. A graph
    network's inputs are its nodes and edges, a DLRM's its flat ids beside per-sample offsets:
    their first axes do not count samples."""
    if isinstance(targets, list) and per_sample(targets):
        return len(targets)
    if targets is not None:
        try:
            return count_rows(targets)
        except WorkloadError:
            pass
    return count_rows(inputs)


def rows_of_one_axis(inputs: Any, rows: int) -> bool:
    """Whether every tensor in ``inputs`` has ``rows`` rows, so that rows can be taken from
    them (`take_rows`); a graph batch's nodes and edges cannot: it is kept whole."""
    return all(
        leaf.shape[0] == rows
        for leaf in leaves(inputs)
        if isinstance(leaf, torch.Tensor) and leaf.dim()
    )


def cat_rows(values: Sequence[Any]) -> Any:
    """Values of the same structure concatenated along their batch axes; lists of one item per
    sample (`per_sample`: a detector's targets, one dict of boxes and labels per image, as
    torchvision's and DETR's collate functions leave them) joined into one list."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return join_rows(values)
    if isinstance(first, Mapping):
        return {k: cat_rows([v[k] for v in values]) for k in first}
    if isinstance(first, list) and any(per_sample(v) for v in values):
        return [item for v in values for item in v]
    if isinstance(first, tuple | list):
        return type(first)(cat_rows([v[i] for v in values]) for i in range(len(first)))
    return first


def join_rows(tensors: Sequence[torch.Tensor], pad: float = IGNORE_INDEX) -> torch.Tensor:
    """Batches' tensors concatenated along their batch axis; where their other axes differ
    (a collate that pads each batch to its own longest sequence), each is padded at the end of
    those axes with ``pad`` first: `IGNORE_INDEX` (-100), as Hugging Face's ``Trainer`` pads
    predictions and labels across batches, so the padded positions' targets are ignored by the
    default loss, accuracy and agreement."""
    tensors = list(tensors)
    shapes = {tuple(t.shape[1:]) for t in tensors}
    if len(shapes) == 1:
        return torch.cat(tensors)
    if len({len(shape) for shape in shapes}) > 1:
        raise ValueError(
            f"batches of different ranks cannot be joined: {sorted(shapes)} after the batch axis"
        )
    widest = [max(sizes) for sizes in zip(*shapes, strict=True)]
    joined = tensors[0].new_full((sum(len(t) for t in tensors), *widest), pad)
    row = 0
    for t in tensors:
        joined[(slice(row, row + len(t)), *(slice(0, n) for n in t.shape[1:]))] = t
        row += len(t)
    return joined


def per_sample(value: list) -> bool:
    """Whether a batch's list holds one item per sample (dicts, or tensors whose first axes
    differ: a detector's targets) rather than one batched field per position (tensors of the
    batch's rows each, as torch's default collate makes of tuples)."""
    if any(isinstance(item, Mapping) for item in value):
        return True
    rows = {
        item.shape[0] if isinstance(item, torch.Tensor) and item.dim() else None for item in value
    }
    return len(rows) > 1


def describe(value: Any, *, depth: int = 0) -> str:
    """A short description of a batch's structure: ``dict(input_ids: int64[8, 32], ...)``."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    if depth > 2:
        return type(value).__name__
    if isinstance(value, Mapping):
        parts = [f"{k}: {describe(v, depth=depth + 1)}" for k, v in list(value.items())[:SHOWN]]
        return f"{type(value).__name__}({_shown(parts, len(value))})"
    if isinstance(value, tuple | list):
        parts = [describe(v, depth=depth + 1) for v in value[:SHOWN]]
        return f"{type(value).__name__}({_shown(parts, len(value))})"
    return type(value).__name__


SHOWN = 8  # entries of a dict, tuple or list `describe` spells out


def _shown(parts: list[str], total: int) -> str:
    """The parts joined, saying how many entries were left out."""
    more = total - len(parts)
    return ", ".join(parts + ([f"... {more} more"] if more else []))


def leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, Mapping):
        for v in value.values():
            yield from leaves(v)
    elif isinstance(value, tuple | list) and any(
        isinstance(v, torch.Tensor | Mapping | tuple | list) for v in value
    ):
        for v in value:
            yield from leaves(v)
    else:
        yield value


@dataclass(frozen=True)
class Data:
    """One split of a task as every loop reads it: batches in the model's terms and a metric.

    Built by `as_data` from a `Split`, a dataset, a DataLoader or a loader factory.

    Attributes:
        source: What the task gave.
        adapters: How batches become calls and targets, and which output is scored.
        score: The split's metric: ``score(outputs, targets) -> float`` on the whole split's
            outputs, or a ``torchmetrics.Metric`` updated batch by batch.
        eval_batch_size: Batch size of the evaluation passes over it.
    """

    source: Any
    adapters: Adapters = field(default_factory=Adapters)
    score: Any = accuracy
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        for generator in _loader_generators(self.source):  # (where a new process starts)
            _FIRST_STATES.setdefault(generator, generator.get_state())

    # --- what the split is ----------------------------------------------------------------
    @property
    def in_memory(self) -> Split | None:
        """The `Split` behind this data, if it is held in memory."""
        return self.source if isinstance(self.source, Split) else None

    @property
    def own_loader(self) -> str | None:
        """What reads this data as it is, whatever batch size squeeze asks for (a user's
        ``DataLoader``, ``DataLoader(batch_size=32)``; a factory of no arguments), or None."""
        source = self.source
        if isinstance(source, DataLoader):
            return f"a DataLoader (batch_size={source.batch_size})"
        if callable(source) and not isinstance(source, Dataset) and _takes_no_arguments(source):
            return f"a loader of no arguments ({getattr(source, '__name__', 'factory')})"
        return None

    @property
    def deterministic(self) -> bool:
        """Whether a pass over the data in order gives the same batches every time (only an
        in-memory split is known to: a dataset may augment at random)."""
        return self.in_memory is not None

    @property
    def x(self) -> torch.Tensor:
        """The inputs of an in-memory split."""
        return self._memory("x").x

    @property
    def y(self) -> torch.Tensor:
        """The targets of an in-memory split."""
        return self._memory("y").y

    def _memory(self, what: str) -> Split:
        split = self.in_memory
        if split is None:
            raise WorkloadError(
                f"this needs the split's {what!r} held in memory (a Split), but the task's data is "
                f"{type(self.source).__name__}: it is read batch by batch"
            )
        return split

    def sized(self) -> bool:
        """Whether the number of samples is known without a pass over the data."""
        if isinstance(self.source, Split):
            return True
        if isinstance(self.source, DataLoader):
            return not isinstance(self.source.dataset, IterableDataset) and _has_len(
                self.source.dataset
            )
        return not isinstance(self.source, IterableDataset) and _has_len(self.source)

    def __len__(self) -> int:
        if isinstance(self.source, DataLoader):
            return len(self.source.dataset)
        if self.sized():
            return len(self.source)
        raise WorkloadError(
            f"the number of samples of a {type(self.source).__name__} is not known without "
            "reading it (an iterable dataset or a loader factory)"
        )

    # --- reading it -------------------------------------------------------------------------
    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        generator: torch.Generator | None = None,
        device: Any = None,
        limit: int | None = None,
    ) -> Iterator[Batch]:
        """The split's batches.

        Args:
            batch_size: Samples per batch (a user's DataLoader keeps its own).
            shuffle: Whether to visit the samples in a seeded random order (a map-style dataset
                or an in-memory split; an iterable dataset is read in its own order).
            seed: Seeds the order (when no ``generator`` is given).
            generator: Draws the order (one generator over several epochs gives each epoch
                its own order).
            device: Move inputs and targets there.
            limit: Stop after this many samples (the last batch is cut to it).
        """
        seen = 0
        if limit is not None:  # (a source that reads batches of a size reads no more)
            batch_size = max(1, min(batch_size, limit))
        if shuffle and generator is None:
            generator = torch.Generator().manual_seed(seed)
        for raw, index in self._raw_batches(
            batch_size, shuffle=shuffle, seed=seed, generator=generator
        ):
            if limit is not None and seen >= limit:
                return
            inputs = (self.adapters.inputs or default_inputs)(raw)
            targets = (self.adapters.targets or default_targets)(raw)
            rows = batch_rows(inputs, targets)
            if limit is not None and seen + rows > limit and rows_of_one_axis(inputs, rows):
                keep = torch.arange(limit - seen)
                inputs, targets = take_rows(inputs, keep), take_rows(targets, keep)
                index = None if index is None else index[keep]
                rows = limit - seen
            seen += rows
            yield Batch(to_device(inputs, device), to_device(targets, device), rows, index, raw)

    def _raw_batches(
        self, batch_size: int, *, shuffle: bool, seed: int, generator: torch.Generator | None
    ) -> Iterator[tuple[Any, torch.Tensor | None]]:
        source = self.source
        if isinstance(source, Split):
            n = len(source)
            order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
            for start in range(0, n, batch_size):
                index = order[start : start + batch_size]
                if shuffle:
                    yield (source.x[index], source.y[index]), index
                else:  # a view, as the loops always read it
                    stop = start + batch_size
                    yield (source.x[start:stop], source.y[start:stop]), index
            return
        if isinstance(source, DataLoader):
            yield from ((raw, None) for raw in source)
            return
        if isinstance(source, Dataset) or _map_style(source):
            iterable = isinstance(source, IterableDataset)
            loader = DataLoader(
                source,
                batch_size=batch_size,
                shuffle=shuffle and not iterable,
                generator=generator if shuffle and not iterable else None,
                collate_fn=self.adapters.collate_fn,
            )
            yield from ((raw, None) for raw in loader)
            return
        if callable(source):
            if _takes_no_arguments(source):  # a LightningDataModule's train_dataloader
                loader = source()
            else:
                loader = source(batch_size=batch_size, shuffle=shuffle, seed=seed)
            yield from ((raw, None) for raw in loader)
            return
        raise WorkloadError(
            f"a split must be a Split, a torch Dataset, a DataLoader or a loader factory; got "
            f"{type(source).__name__}"
        )

    def forward(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """The scored output of ``model`` called on ``inputs`` (moved to the model's device),
        a classifier's class axis last."""
        outputs = call_model(model, to_device(inputs, model_device(model)))
        return class_last(select_output(outputs, self.adapters.output), self.adapters.class_axis)

    def calibration(self, *, samples: int, batch_size: int, device: Any = None) -> list[Calib]:
        """The first ``samples`` samples in the split's own order (no shuffling), as batches of
        at most ``batch_size``: what data-aware compressors measure gradients and losses on.

        The same samples every time, drawn alike: a random sampler's order and an
        augmentation's draws (in this process or in a DataLoader's workers, started anew) come
        from generators seeded with `CALIBRATION_SEED`, and the caller's generators are left as
        they were (a table cached by the weights it was measured on holds for every trial).
        """
        generators = _loader_generators(self.source)
        states = [generator.get_state() for generator in generators]
        with drawn_alike(CALIBRATION_SEED):
            self.rewind()
            batches = [
                Calib(b.inputs, b.targets, b.rows)
                for b in self.batches(batch_size, device=device, limit=samples)
            ]
            self._stop_workers()  # (a later pass seeds its workers from the caller's draws)
        for generator, state in zip(generators, states, strict=True):
            generator.set_state(state)  # (and its loader's own draws go on as they were)
        return batches

    def rewind(self) -> None:
        """Let the next pass read as a new process's first pass would: a DataLoader's own
        generators (``DataLoader(generator=...)``, its sampler's) back at their state when the
        task was built, and the worker processes it keeps from pass to pass
        (``persistent_workers=True``) stopped, so that its next pass starts new ones seeded
        from torch's generator as it is then. Both carry their draws (a shuffled order, an
        augmentation's noise) from one trial to the next: a trial would read other batches
        than its rerun (`squeeze run`) does."""
        self._stop_workers()
        for generator in _loader_generators(self.source):
            generator.set_state(_FIRST_STATES[generator])

    def _stop_workers(self) -> None:
        loader = self.source
        iterator = getattr(loader, "_iterator", None) if isinstance(loader, DataLoader) else None
        if iterator is not None:  # (torch's DataLoader keeps no other handle on its workers)
            iterator._shutdown_workers()
            loader._iterator = None

    def first_inputs(self, rows: int) -> Any:
        """The model's inputs for ``rows`` samples from the start of the split (`first_batch`)."""
        return self.first_batch(rows)[0]

    def first_batch(self, rows: int) -> tuple[Any, int]:
        """``(inputs, samples)``: the model's inputs for ``rows`` samples from the start of the
        split, real ones repeated when the split has fewer (a batch for FLOP counts, latency
        and tracing), and the samples they hold: ``rows``, unless the batch's inputs are no
        rows of one axis (a graph batch's nodes and edges: `rows_of_one_axis`), which are
        neither cut nor repeated: the first batch as read, its own samples."""
        batch = next(iter(self.batches(rows, limit=rows)), None)
        if batch is None:
            raise WorkloadError(f"the split has no samples ({describe(self.source)})")
        if batch.rows == rows or not rows_of_one_axis(batch.inputs, batch.rows):
            return batch.inputs, batch.rows
        return take_rows(batch.inputs, torch.arange(rows) % batch.rows), rows


#: Each DataLoader generator's state when squeeze first saw it (the task's build): where a new
#: process's first pass starts (`Data.rewind`).
_FIRST_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _loader_generators(source: Any) -> list[torch.Generator]:
    """The generators a DataLoader draws its order with: its own and its samplers'."""
    if not isinstance(source, DataLoader):
        return []
    found: list[torch.Generator] = []
    batch_sampler = getattr(source, "batch_sampler", None)
    for owner in (source, source.sampler, getattr(batch_sampler, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


#: Seeds the draws of the data's calibration samples (`Data.calibration`).
CALIBRATION_SEED = 0


@contextmanager
def drawn_alike(seed: int) -> Iterator[None]:
    """Inside: torch's (CPU), numpy's global and Python's `random` generators seeded with
    ``seed``; after: each as it was before."""
    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])


def _takes_no_arguments(factory: Any) -> bool:
    """Whether ``factory`` is called with no arguments (a LightningDataModule's bound
    ``train_dataloader``: its DataLoader is then iterated as it is, its own batch size and
    shuffling), rather than as ``factory(batch_size=..., shuffle=..., seed=...)``."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return not any(
        p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        or (p.default is p.empty and p.kind != p.VAR_KEYWORD)
        or p.name in ("batch_size", "shuffle", "seed")
        for p in parameters
    )


def as_data(
    source: Any,
    adapters: Adapters | None = None,
    score: Any = None,
    eval_batch_size: int | None = None,
) -> Data:
    """``source`` as `Data` (unchanged if it already is, unless something else is given)."""
    if isinstance(source, Data):
        if adapters is None and score is None and eval_batch_size is None:
            return source
        return Data(
            source.source,
            adapters or source.adapters,
            source.score if score is None else score,
            eval_batch_size or source.eval_batch_size,
        )
    if score is None:
        score = source.score if isinstance(source, Split) else accuracy
    return Data(source, adapters or Adapters(), score, eval_batch_size or 1024)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any)."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _map_style(source: Any) -> bool:
    """Whether ``source`` reads as a map-style dataset without subclassing torch's (a Hugging
    Face ``datasets.Dataset``): indexable, with a length, and no tensor or loader itself."""
    return (
        hasattr(source, "__getitem__")
        and _has_len(source)
        and not isinstance(source, torch.Tensor | Mapping | str)
    )


def _has_len(source: Any) -> bool:
    try:
        len(source)
    except TypeError:
        return False
    return True

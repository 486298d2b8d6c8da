"""``squeeze explain``: what compression changed in one model — where its bytes went, which of its
predictions flipped, and whether it still looks at the same evidence as the baseline.

Three questions, three parts, each a plain function usable on its own:

- **Where the bytes went** (`byte_breakdown`): the packed file (`compressors.packing`) taken apart
  byte by byte. The accounting is made on the file's payload as an SQZ2-style safetensors layout
  (`compressors.packing.read_payload` builds it for SQZ3 files too), where it is exact: each tensor
  costs its arrays' data (values, codes, masks, gaps, scales, codebook), their entries in the
  safetensors JSON header, and its layout record in the model record. What is left of the payload
  (the length prefix, JSON framing and padding, the format version, replaced modules, int8 layers,
  ties and changed attributes) is the *model record* line; the *codecs and framing* line is the
  file's size minus that payload and the header (negative when the codecs — zstd'd byte planes in
  SQZ3, LZMA in SQZ2 — shrank the arrays more than the file's framing adds); the *file header* line
  is the format's header bytes. The lines sum to the file's size exactly. Compressible tensors
  (`compressors.targets`) get a row each, with their shape before and after, what structured pruning
  kept, sparsity, bit width or codebook size and runtime (float or int8); the other tensors (biases,
  norms, buffers) are grouped by the module that owns them.
- **Which predictions flipped** (`agreement_report`): on validation and test, the share of inputs
  whose top-1 class is the baseline's (for an embedding task: whose nearest neighbour among the
  split is the baseline's, `experiments.neighbour_agreement`), the flip matrix (baseline class ->
  compressed class; its row sums are the baseline's class counts) and every flipped input.
- **The same evidence?** (`attribution_fidelity`): input attributions of the baseline and of the
  compressed model on a fixed, seeded validation sample, by Captum's Integrated Gradients from an
  all-zero input, for the class the baseline predicts (an embedding model: for the dot product of
  its embedding with the baseline's); for token inputs, Layer Integrated Gradients over the
  token embeddings, summed per token, from all-zero token ids. Features equal to that reference
  get no attribution from any model (IG's completeness) and are left out of the Spearman rank
  correlation, which ties would otherwise inflate; the mean correlation is reported per class.
  Int8 layers (``torch.ao``) have no gradients, so the compressed model is attributed on its float
  reload (``load_packed(..., int8=False)``: the same weights).

`explain_model` answers all three for one packed file; `explain_trial` for a study's trial (or
its baseline), writing CSV files and figures and logging them to the trial's MLflow run; the
report (`search.results.report`) and ``squeeze run`` (`search.results.reuse`) use them too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from torch import nn  # noqa: E402

from compressors import load_packed, targets  # noqa: E402
from compressors.packing import (  # noqa: E402
    HEADER_BYTES,
    PackedFileError,
    int8_layers,
    read_payload,
    read_tensors,
)
from experiments import (  # noqa: E402
    DECISIONS,
    Baseline,
    Split,
    Task,
    predict_outputs,
    prediction_agreement,
)
from experiments._training import outputs_and_targets  # noqa: E402
from search._errors import ConfigError  # noqa: E402
from search.run.logs import Stages, Ticker  # noqa: E402

logger = logging.getLogger(__name__)

#: Validation samples attributed by default; token inputs (attributed through their embeddings,
#: a forward and backward pass per sample per step) take `TOKEN_SAMPLES`.
SAMPLES = 64
TOKEN_SAMPLES = 16
#: Integrated Gradients' steps along the path from the all-zero reference to the input.
STEPS = 32
#: Flipped and kept examples the attribution figure shows (each at most).
SHOWN = 3
#: The three lines that complete the per-tensor rows to the file's size.
RECORD, CONTAINER, FILE_HEADER = "model record", "codecs and framing", "file header"
#: Names of a target's dimensions, by kind (after these, a conv's kernel).
_DIMS = {
    "linear": ("out", "in"),
    "conv": ("out", "in/groups"),
    "attention": ("3×embed", "embed"),
    "recurrent": ("gates×hidden", "in"),
    "embedding": ("rows", "dim"),
}
#: Module attributes that count channels or heads, shown when compression changed them.
_COUNTS = ("num_heads", "num_attention_heads", "hidden_size", "groups")
_BATCH = 256  # inputs per forward pass inside Integrated Gradients


# ----------------------------------------------------------------------- where the bytes went


@dataclass(frozen=True)
class Breakdown:
    """A packed file's bytes, tensor by tensor (see the module's docstring for the accounting).

    Attributes:
        path: The packed file.
        rows: One row per compressible tensor (``tensor`` its name), then one per module's other
            tensors (``tensor`` the module and their names): ``kind``, ``shape_before``,
            ``shape_after``, ``kept``, ``sparsity``, ``stored`` (bit width, codebook, float
            width), ``layout``, ``runtime``, ``params``, ``stored_tensors`` (the names the
            file stores them under, space-separated), and the bytes of the uncompressed
            payload: ``data_bytes`` (arrays), ``index_bytes`` (their safetensors header entries),
            ``record_bytes`` (layout records) and ``bytes`` (their sum).
        record_bytes: The rest of the payload (length prefix, JSON framing, padding, the model
            record: format version, replaced modules, int8 layers, ties, changed attributes).
        container_bytes: LZMA's stream minus the payload (negative: LZMA shrank it; 0: raw).
        header_bytes: Magic, codec and CRC-32 (`compressors.packing.HEADER_BYTES`).
        file_bytes: The file's size: ``rows.bytes.sum() + record_bytes + container_bytes +
            header_bytes``, exactly.
    """

    path: Path
    rows: pd.DataFrame
    record_bytes: int
    container_bytes: int
    header_bytes: int
    file_bytes: int

    @property
    def payload_bytes(self) -> int:
        """Bytes of the uncompressed safetensors payload."""
        return int(self.rows.bytes.sum()) + self.record_bytes

    def lines(self) -> pd.DataFrame:
        """``rows`` then the model record, LZMA container and file header lines (``bytes`` sums
        to the file's size), each with its ``share`` of the file."""
        extra = pd.DataFrame(
            [
                {"tensor": RECORD, "kind": "framing", "bytes": self.record_bytes},
                {"tensor": CONTAINER, "kind": "lzma", "bytes": self.container_bytes},
                {"tensor": FILE_HEADER, "kind": "header", "bytes": self.header_bytes},
            ]
        )
        lines = pd.concat([self.rows, extra], ignore_index=True)
        counts = ["params", "data_bytes", "index_bytes", "record_bytes", "bytes"]
        lines[counts] = lines[counts].astype("Int64")  # (empty on the last three lines)
        lines["share"] = lines.bytes.astype(float) / self.file_bytes
        return lines


def byte_breakdown(path: str | Path, model: nn.Module) -> Breakdown:
    """Take a packed file apart byte by byte (see the module's docstring).

    Args:
        path: A packed model file (`compressors.save_packed`).
        model: A freshly built model of the file's uncompressed architecture (the task's
            ``build_model()``): what shapes were before and which tensors are compressible.

    Raises:
        compressors.PackedFileError: If the file is not a packed model, or its header is not
            laid out as squeeze writes it (the accounting would not be exact).
    """
    path = Path(path)
    file_bytes = path.stat().st_size
    payload, compressed = read_payload(path)
    stored = read_tensors(path)
    header, meta = _parse_header(path, payload)
    data_bytes, index_bytes, record_bytes = _tensor_bytes(path, header, meta)
    accounted = sum(data_bytes.values()) + sum(index_bytes.values()) + sum(record_bytes.values())
    data_section = len(payload) - 8 - int.from_bytes(payload[:8], "little")
    if (
        sum(data_bytes.values()) != data_section
        or not compressed
        and len(payload) != (file_bytes - HEADER_BYTES)
    ):
        raise PackedFileError(
            f"{path}: its arrays ({sum(data_bytes.values()):,} bytes) do not fill its data "
            f"section ({data_section:,} bytes); the file is not laid out as squeeze writes it."
        )
    rows = _rows(model, meta, stored, data_bytes, index_bytes, record_bytes, int8_layers(path))
    return Breakdown(
        path=path,
        rows=rows,
        record_bytes=len(payload) - accounted,  # length prefix, framing, padding, model record
        container_bytes=file_bytes - HEADER_BYTES - len(payload),  # 0 for a raw payload
        header_bytes=HEADER_BYTES,
        file_bytes=file_bytes,
    )


def _parse_header(path: Path, payload: bytes) -> tuple[dict, dict]:
    """``(safetensors header, squeeze model record)``, checked to be laid out as squeeze writes
    them (compact JSON, padded with spaces), so that each part's bytes can be counted exactly."""
    raw = payload[8 : 8 + int.from_bytes(payload[:8], "little")]
    text = raw.rstrip(b" ")
    header = json.loads(text)
    meta_text = header["__metadata__"]["squeeze"]
    meta = json.loads(meta_text)
    if _compact(header).encode() != text or _compact(meta, ascii=True) != meta_text:
        raise PackedFileError(
            f"{path}: its header is not laid out as this squeeze writes it, so its bytes cannot "
            "be accounted tensor by tensor. Rewrite it with this version (rerun the trial)."
        )
    return header, meta


def _compact(value, *, ascii: bool = False) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=ascii)


def _tensor_bytes(
    path: Path, header: dict, meta: dict
) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Per stored tensor: bytes of its arrays' data, of their header entries (each with the
    comma before it), and of its layout record inside the escaped model record (with the comma
    before it, the first record having none)."""
    names = list(meta["t"])
    data = dict.fromkeys(names, 0)
    index = dict.fromkeys(names, 0)
    for position, (key, entry) in enumerate(header.items()):
        if key == "__metadata__":
            continue
        owner = key if key in data else key.rpartition(":")[0]
        if owner not in data:
            raise PackedFileError(f"{path}: array {key!r} belongs to no tensor of the file")
        start, end = entry["data_offsets"]
        data[owner] += end - start
        index[owner] += len(_compact({key: entry})[1:-1].encode()) + (1 if position else 0)
    record = {
        name: _escaped(_compact({name: spec}, ascii=True)[1:-1]) + (1 if i else 0)
        for i, (name, spec) in enumerate(meta["t"].items())
    }
    return data, index, record


def _escaped(text: str) -> int:
    """Bytes of ``text`` inside a JSON string (the model record is a string of the header)."""
    return len(json.dumps(text, ensure_ascii=False).encode()) - 2


def _rows(
    model: nn.Module,
    meta: dict,
    stored: Mapping,
    data: Mapping[str, int],
    index: Mapping[str, int],
    record: Mapping[str, int],
    int8: Sequence[str],
) -> pd.DataFrame:
    """The breakdown's rows: tensors grouped (see `_group`), in the file's order."""
    found = targets(model)
    by_module = {t.module_name: t for t in found.values()}
    sites = {f"{s.module_name}.{s.attr}".lstrip("."): t for t in found.values() for s in t.sites}
    before = model.state_dict()
    tied = {}
    for alias, canonical in meta.get("tied", {}).items():
        tied.setdefault(canonical, []).append(alias)
    groups: dict[str, list[str]] = {}
    for name in meta["t"]:
        groups.setdefault(_group(name, sites, by_module, meta["modules"]), []).append(name)
    rows = []
    for label, names in groups.items():
        target = found.get(label)
        row = {
            "tensor": label,
            **_shapes(label, names, target, before, meta, stored, model),
            "sparsity": _sparsity([stored[n].value for n in names]),
            "stored": ", ".join(dict.fromkeys(_stored(meta["t"][n], stored[n]) for n in names)),
            "layout": ", ".join(dict.fromkeys(meta["t"][n]["enc"] for n in names)),
            "runtime": "int8" if _module_of(label, target) in int8 else "float",
            "params": sum(stored[n].value.numel() for n in names),
            "stored_tensors": " ".join(names),
            "data_bytes": sum(data[n] for n in names),
            "index_bytes": sum(index[n] for n in names),
            "record_bytes": sum(record[n] for n in names),
        }
        aliases = [a for n in names for a in tied.get(n, [])]
        if aliases:
            row["kind"] += f", tied: {', '.join(aliases)}"
        row["bytes"] = row["data_bytes"] + row["index_bytes"] + row["record_bytes"]
        rows.append(row)
    return pd.DataFrame(rows)


def _group(name: str, sites: Mapping, by_module: Mapping, replaced: Mapping) -> str:
    """The row a stored tensor belongs to: its compressible tensor's name (the tensors of a
    module that replaced a layer, a low-rank pair say, count as that layer's weight; its bias
    stays with the layer's other tensors), else ``"<module> (<attributes>)"``, filled in later."""
    if name in sites:
        return sites[name].name
    for module in replaced:
        if name.startswith(f"{module}.") and module in by_module and not name.endswith(".bias"):
            return by_module[module].name
        if name.startswith(f"{module}."):
            return f"{module} (other)"
    module = name.rpartition(".")[0]
    return f"{module or '(model)'} (other)"


def _module_of(label: str, target) -> str:
    return target.module_name if target is not None else label.removesuffix(" (other)")


def _shapes(label, names, target, before, meta, stored, model) -> dict:
    """``kind``, ``shape_before``, ``shape_after`` and ``kept`` of one row."""
    after = [tuple(stored[n].value.shape) for n in names]
    if target is None:  # a module's other tensors
        module = label.removesuffix(" (other)")
        prefix = f"{module}." if module != "(model)" else ""
        attrs = [n.rpartition(".")[2] for n in names]
        old = [before[f"{prefix}{a}"] for a in attrs if f"{prefix}{a}" in before]
        kind = _module_type(model, module)
        shown = (
            ", ".join(attrs) if len(attrs) <= 3 else f"{', '.join(attrs[:2])}, +{len(attrs) - 2}"
        )
        return {
            "tensor": f"{module} ({shown})" if prefix else f"{shown} (top level)",
            "kind": kind,
            "shape_before": _shape_list([tuple(v.shape) for v in old]),
            "shape_after": _shape_list(after),
            "kept": "",
        }
    original = tuple(before[target.name].shape)
    kept = []
    replaced = meta["modules"].get(target.module_name)
    if replaced is not None:
        kept += [f"{k} {v}" for k, v in replaced.items() if k != "type"]
    elif after[0] != original:
        dims = _DIMS[target.kind] + ("kernel",) * max(0, len(original) - 2)
        kept += [
            f"{dims[i]} {a}/{b}"
            for i, (a, b) in enumerate(zip(after[0], original, strict=False))
            if a != b
        ]
    kept += _changed_counts(target.module_name, meta.get("attrs", {}), model)
    kind = target.kind if replaced is None else f"{target.kind}, {replaced['type']}"
    return {
        "kind": kind,
        "shape_before": _shape(original),
        "shape_after": _shape_list(after),
        "kept": ", ".join(dict.fromkeys(kept)),
    }


def _changed_counts(module: str, attrs: Mapping, model: nn.Module) -> list[str]:
    """``"num_heads 2/4"`` for counts of the module or its parent that compression changed."""
    out = []
    for name in (module, module.rpartition(".")[0]):
        for attr, value in attrs.get(name, {}).items():
            if attr in _COUNTS:
                original = getattr(model.get_submodule(name), attr, None)
                out.append(f"{attr} {value}/{original}")
    return out


def _module_type(model: nn.Module, module: str) -> str:
    try:
        return type(model.get_submodule("" if module == "(model)" else module)).__name__
    except AttributeError:
        return "module"


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape)) if shape else "scalar"


def _shape_list(shapes: Sequence[tuple[int, ...]]) -> str:
    if len(shapes) > 2:
        return f"{len(shapes)} tensors, {sum(math.prod(s) for s in shapes):,} values"
    return " + ".join(_shape(s) for s in shapes)


def _sparsity(values: Sequence[torch.Tensor]) -> float:
    total = sum(v.numel() for v in values)
    zeros = sum(int((v == 0).sum()) for v in values if v.is_floating_point())
    return zeros / total if total else 0.0


def _stored(spec: dict, record) -> str:
    """How the file stores one tensor's values: ``15-level grid (4-bit)``, ``codebook of 16
    (4-bit)``, ``fp16``; for codes, how their stream is stored when it is not plain bits."""
    if record.codes is not None:
        if record.codes.decode == "codebook":
            size = len(record.codes.tensors["codebook"])
            what = f"codebook of {size} ({_bits(size)}-bit)"
        else:
            levels = int(torch.unique(record.codes.codes).numel())
            what = f"{levels}-level grid ({_bits(levels)}-bit)"
        if spec["enc"] == "ans":
            return f"{what}, entropy-coded"
        if spec["enc"] in ("bitmask", "gaps"):
            return f"{what}, nonzeros in {spec['bits']} bit{'s' if spec['bits'] > 1 else ''}"
        return what
    if spec["enc"] == "raw":
        return spec["dtype"]
    return "fp16" if _is_half(record.value) else "fp32"


def _bits(levels: int) -> int:
    return max(1, math.ceil(math.log2(levels))) if levels > 1 else 1


def _is_half(value: torch.Tensor) -> bool:
    return torch.equal(value.to(torch.float16).to(torch.float32), value.to(torch.float32))


# ------------------------------------------------------------------- which predictions flipped


@dataclass(frozen=True)
class Agreement:
    """How often a compressed model decides as the baseline did on one split.

    Attributes:
        split: ``val`` or ``test``.
        kind: ``top-1 class``, or ``nearest neighbour`` for an embedding task.
        agreement: The share of the split's inputs decided alike (1.0: none flipped).
        samples: Inputs in the split.
        flips: Counts of (baseline class -> compressed class), rows the baseline's classes: its
            diagonal is what was kept, its row sums are the baseline's class counts. None for
            an embedding task (no classes).
        flipped: One row per flipped input: ``index`` in the split, ``label`` (true class),
            ``baseline`` and ``compressed`` (their classes, or nearest neighbours' indices) and
            ``baseline_conf`` / ``compressed_conf`` (softmax probability of their own class, or
            cosine similarity to their neighbour).
    """

    split: str
    kind: str
    agreement: float
    samples: int
    flips: pd.DataFrame | None
    flipped: pd.DataFrame


def agreement_report(
    reference_outputs: torch.Tensor,
    outputs: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    split_name: str,
    kind: str = "logits",
    num_classes: int | None = None,
) -> Agreement:
    """Agreement of ``outputs`` with ``reference_outputs`` (the baseline's) on ``split``.

    Args:
        reference_outputs: The baseline's outputs on the split.
        outputs: The compressed model's outputs on the split.
        targets: The split's targets (class labels are listed for flipped inputs).
        split_name: ``val`` or ``test``, for the tables.
        kind: What the models output (``logits`` or ``embeddings``).
        num_classes: Classes of a classifier (default: its outputs' width).
    """
    score = prediction_agreement(outputs, reference_outputs, kind=kind)
    if kind == "embeddings":
        return _neighbour_agreement(reference_outputs, outputs, split_name, score)
    base_prob, prob = reference_outputs.softmax(1), outputs.softmax(1)
    base, comp = base_prob.argmax(1), prob.argmax(1)
    classes = num_classes or outputs.shape[1]
    counts = torch.zeros(classes, classes, dtype=torch.long)
    counts.index_put_((base, comp), torch.ones_like(base), accumulate=True)
    flips = pd.DataFrame(counts.numpy(), index=range(classes), columns=range(classes))
    flips.index.name, flips.columns.name = "baseline class", "compressed class"
    where = torch.nonzero(base != comp).flatten()
    labels = (
        targets[where]
        if isinstance(targets, torch.Tensor)
        and targets.dim() == 1
        and not targets.is_floating_point()
        else None
    )
    flipped = pd.DataFrame(
        {
            "index": where.numpy(),
            "label": labels.numpy() if labels is not None else np.full(len(where), -1),
            "baseline": base[where].numpy(),
            "compressed": comp[where].numpy(),
            "baseline_conf": base_prob[where, base[where]].numpy(),
            "compressed_conf": prob[where, comp[where]].numpy(),
        }
    )
    return Agreement(split_name, "top-1 class", score, len(base), flips, flipped)


def _neighbour_agreement(reference, outputs, split_name: str, score: float) -> Agreement:
    def nearest(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unit = torch.nn.functional.normalize(embeddings, dim=-1)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(-torch.inf)
        return similarity.max(dim=1)

    (base_sim, base), (comp_sim, comp) = nearest(reference), nearest(outputs)
    where = torch.nonzero(base != comp).flatten()
    flipped = pd.DataFrame(
        {
            "index": where.numpy(),
            "label": np.full(len(where), -1),
            "baseline": base[where].numpy(),
            "compressed": comp[where].numpy(),
            "baseline_conf": base_sim[where].numpy(),
            "compressed_conf": comp_sim[where].numpy(),
        }
    )
    return Agreement(split_name, "nearest neighbour", score, len(base), None, flipped)


# ----------------------------------------------------------------------------- the same evidence?


@dataclass(frozen=True)
class Attributions:
    """Attributions of the baseline and of the compressed model on the same inputs.

    Attributes:
        indices: The validation rows attributed.
        inputs: Those inputs.
        reference: The baseline's attributions, per input feature (per token for token inputs).
        model: The compressed model's, the same shape.
        mask: The features that can carry attribution (those differing from the all-zero
            reference of Integrated Gradients).
        baseline_pred: The baseline's decision on each input (a class; -1 for embeddings).
        model_pred: The compressed model's.
        flipped: Whether each input's decision flipped (for embeddings: as the caller says).
    """

    indices: np.ndarray
    inputs: torch.Tensor
    reference: torch.Tensor
    model: torch.Tensor
    mask: torch.Tensor
    baseline_pred: np.ndarray
    model_pred: np.ndarray
    flipped: np.ndarray

    def spearman(self) -> np.ndarray:
        """Each input's Spearman rank correlation between the two attributions, over the
        features that can carry attribution (NaN where fewer than 2 or one side is constant)."""
        from scipy.stats import spearmanr

        out = np.full(len(self.indices), np.nan)
        for i in range(len(self.indices)):
            keep = self.mask[i].flatten()
            a = self.reference[i].flatten()[keep].numpy()
            b = self.model[i].flatten()[keep].numpy()
            if len(a) >= 2 and np.ptp(a) > 0 and np.ptp(b) > 0:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out[i] = spearmanr(a, b).statistic
        return out


@dataclass(frozen=True)
class Fidelity:
    """Whether the compressed model uses the same evidence as the baseline.

    Attributes:
        method: How attributions were computed (for the tables).
        attributions: Both models' attributions on the seeded validation sample.
        rho: Each sample's Spearman correlation (`Attributions.spearman`).
        groups: Each sample's class (its true label), or ``"all"`` for an embedding task.
        per_class: ``samples`` and ``mean_spearman`` per class, then ``all``.
        mean: Mean Spearman correlation over the sample (NaN entries left out).
        notes: What the reader should know (int8 layers attributed on the float reload, a
            small sample for token inputs).
    """

    method: str
    attributions: Attributions
    rho: np.ndarray
    groups: np.ndarray
    per_class: pd.DataFrame
    mean: float
    notes: tuple[str, ...] = ()


def attribution_fidelity(
    reference: nn.Module,
    model: nn.Module,
    split: Split,
    *,
    outputs: str = "logits",
    samples: int | None = None,
    seed: int = 0,
    steps: int = STEPS,
) -> Fidelity:
    """Mean Spearman rank correlation, per class, of the baseline's and the compressed model's
    input attributions on a seeded sample of ``split`` (see the module's docstring).

    Args:
        reference: The baseline (float, differentiable).
        model: The compressed model, float (an int8 model's float reload: same weights).
        split: The validation split.
        outputs: What the models output (``logits`` or ``embeddings``).
        samples: How many inputs (default `SAMPLES`, `TOKEN_SAMPLES` for token inputs).
        seed: Seeds the sample.
        steps: Integrated Gradients' steps.
    """
    tokens = not split.x.is_floating_point()
    count = samples if samples is not None else TOKEN_SAMPLES if tokens else SAMPLES
    if count < 1 or steps < 1:
        raise ValueError(
            f"'samples' and 'steps' must be positive ints. Got samples={samples!r}, "
            f"steps={steps!r} instead."
        )
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(len(split), size=min(count, len(split)), replace=False))
    attributions = attribute(reference, model, split.x, indices, outputs=outputs, steps=steps)
    rho = attributions.spearman()
    if outputs == "logits" and split.y.dim() == 1 and not split.y.is_floating_point():
        groups = split.y[torch.from_numpy(indices)].numpy().astype(object)
    else:
        groups = np.full(len(indices), "all", dtype=object)
    frame = pd.DataFrame({"class": groups, "rho": rho})
    per_class = frame.groupby("class", sort=True).rho.agg(samples="size", mean_spearman="mean")
    per_class.loc["all"] = [len(rho), float(np.nanmean(rho)) if np.isfinite(rho).any() else np.nan]
    what = (
        f"LayerIntegratedGradients over the token embeddings ({_embedding_name(reference, split)}),"
        " summed per token"
        if tokens
        else "IntegratedGradients per input feature"
    )
    target = (
        "the dot product with the baseline's embedding"
        if outputs == "embeddings"
        else "the baseline's class"
    )
    method = (
        f"{what}, {steps} steps from an all-zero reference, for {target}; {len(indices)} "
        f"validation samples (seed {seed})"
    )
    notes: tuple[str, ...] = ()
    if tokens and samples is None:
        notes += (
            f"token inputs: {len(indices)} samples (each costs {steps} forward and backward "
            "passes through the embeddings on the CPU); more with --samples",
        )
    undefined = int(np.isnan(rho).sum())
    if undefined:
        notes += (
            f"{undefined} of {len(rho)} samples have no rank correlation (one model's "
            "attributions are constant there, e.g. a collapsed model) and are left out of the "
            "means",
        )
    return Fidelity(
        method,
        attributions,
        rho,
        groups,
        per_class,
        float(per_class.loc["all", "mean_spearman"]),
        notes,
    )


def attribute(
    reference: nn.Module,
    model: nn.Module,
    x: torch.Tensor,
    indices: np.ndarray,
    *,
    outputs: str = "logits",
    steps: int = STEPS,
    flipped: np.ndarray | None = None,
) -> Attributions:
    """Both models' attributions on ``x[indices]`` for the baseline's decision (its class; for
    embeddings, the dot product with its embedding), from an all-zero reference input.
    ``flipped`` marks the inputs whose decision flipped (default: the classes differ)."""
    inputs = x[torch.from_numpy(np.asarray(indices, dtype=np.int64))]
    base_out = predict_outputs(reference, inputs)
    model_out = predict_outputs(model, inputs)
    if outputs == "embeddings":
        target, anchor = None, base_out
        preds = np.full(len(inputs), -1), np.full(len(inputs), -1)
    else:
        target, anchor = base_out.argmax(1), None
        preds = base_out.argmax(1).numpy(), model_out.argmax(1).numpy()
    return Attributions(
        indices=np.asarray(indices),
        inputs=inputs,
        reference=_attribute(reference, inputs, target, anchor, steps),
        model=_attribute(model, inputs, target, anchor, steps),
        mask=inputs != 0,
        baseline_pred=preds[0],
        model_pred=preds[1],
        flipped=np.asarray(preds[0] != preds[1] if flipped is None else flipped, dtype=bool),
    )


def _attribute(model, inputs, target, anchor, steps: int) -> torch.Tensor:
    """Integrated Gradients of one model (Layer IG over the token embeddings for token ids)."""
    from captum.attr import IntegratedGradients, LayerIntegratedGradients

    model = model.eval()

    def forward(x: torch.Tensor, anchor: torch.Tensor | None = None) -> torch.Tensor:
        out = model(x)
        return out if anchor is None else (out * anchor).sum(-1)

    extra = (anchor,) if anchor is not None else None
    kwargs = {
        "baselines": torch.zeros_like(inputs),
        "target": target,
        "additional_forward_args": extra,
        "n_steps": steps,
        "internal_batch_size": _BATCH,
    }
    with torch.enable_grad():
        if inputs.is_floating_point():
            attr = IntegratedGradients(forward).attribute(inputs, **kwargs)
        else:
            layer = _input_embedding(model, inputs)
            attr = LayerIntegratedGradients(forward, layer).attribute(inputs, **kwargs).sum(-1)
    return attr.detach()


def _input_embedding(model: nn.Module, inputs: torch.Tensor) -> nn.Embedding:
    """The ``nn.Embedding`` that reads the model's token ids (found by one forward pass)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    seen: list[nn.Module] = []

    def hook(module, args):
        if args and torch.is_tensor(args[0]) and args[0].shape == inputs[:1].shape:
            if torch.equal(args[0], inputs[:1]):
                seen.append(module)

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            model(inputs[:1])
    finally:
        for handle in handles:
            handle.remove()
    if seen:
        return seen[0]
    if layers:
        return layers[0]
    raise ValueError(
        "The model takes integer inputs but has no nn.Embedding to attribute them through: "
        "attributions of token inputs need the embedding layer that reads them."
    )


def _embedding_name(model: nn.Module, split: Split) -> str:
    layer = _input_embedding(model, split.x[:1])
    return next(name for name, m in model.named_modules() if m is layer)


# ----------------------------------------------------------------------------- one model, one trial


@dataclass(frozen=True)
class Explanation:
    """What compression changed in one packed model (`explain_model`).

    Attributes:
        name: ``trial <N>`` or ``baseline``.
        breakdown: Its file's bytes (`byte_breakdown`).
        baseline_breakdown: The baseline's file's bytes, beside it.
        agreement: ``{"val": Agreement, "test": Agreement}``.
        fidelity: Attribution fidelity on validation (None when not asked for).
        shown: Attributions of a few flipped and a few kept validation inputs, for the figure.
        int8_layers: Layers the file runs on int8 kernels.
        notes: What the reader should know.
        files: The files `write_explanation` wrote (set by `explain_trial`).
        run_id: The MLflow run they were logged to (set by `explain_trial`).
    """

    name: str
    breakdown: Breakdown
    baseline_breakdown: Breakdown
    agreement: dict[str, Agreement]
    fidelity: Fidelity | None
    shown: Attributions | None
    int8_layers: list[str]
    notes: tuple[str, ...] = ()
    files: list[Path] = field(default_factory=list)
    run_id: str | None = None


def explain_model(
    path: str | Path,
    task: Task,
    baseline: Baseline,
    *,
    name: str = "model",
    attributions: bool = True,
    samples: int | None = None,
    seed: int = 0,
    steps: int = STEPS,
) -> Explanation:
    """Explain one packed model against the task's baseline: bytes, agreement, attributions.

    Agreement is measured on the model as shipped (int8 layers where the file has them);
    attributions on its float reload (the same weights: int8 kernels have no gradients).

    Args:
        path: The model's packed file.
        task: Its task (splits, model builder).
        baseline: The task's cached baseline (its packed file is written if absent).
        name: What to call the model in tables (``trial 7``).
        attributions: Compute attribution fidelity (the slow part; off: bytes and agreement).
        samples: Validation samples attributed (default `SAMPLES`, `TOKEN_SAMPLES` for tokens).
        seed: Seeds that sample.
        steps: Integrated Gradients' steps.
    """
    from search.run.workload import baseline_file_size

    step = Ticker(logger, f"explain {name}:")  # a long explanation shows its phases
    steps = 4 if attributions and _attributable(task) else 2
    baseline_file_size(baseline)  # writes <baseline.folder>/model.sqz if absent
    path = Path(path)
    fresh = task.build_model()  # (only read: the architecture before compression)
    breakdown = byte_breakdown(path, fresh)
    base_breakdown = byte_breakdown(baseline.folder / "model.sqz", fresh)
    shipped = load_packed(path, task.build_model())
    step(1, steps, "bytes per tensor group")
    notes: list[str] = []
    agreement = {}
    if task.outputs in DECISIONS:
        for split_name, split in (("val", task.val), ("test", task.test)):
            outputs, targets = outputs_and_targets(shipped, split)
            agreement[split_name] = agreement_report(
                predict_outputs(baseline.model, split),
                outputs,
                targets,
                split_name=split_name,
                kind=task.outputs,
                num_classes=task.num_classes if task.outputs == "logits" else None,
            )
    else:
        notes.append(
            f"a model that outputs {task.outputs} makes no decisions to agree on: agreement and "
            "flipped inputs are left out"
        )
    step(2, steps, "agreement")
    int8 = int8_layers(path)
    fidelity = shown = None
    if attributions and not _attributable(task):
        notes.append(
            "attributions need a classifier or encoder whose validation data is held in memory "
            "as one input tensor (a Split); left out for this task"
        )
        attributions = False
    if attributions:
        float_model = load_packed(path, task.build_model(), int8=False) if int8 else shipped
        if int8:
            notes.append(
                f"attributions of the compressed model are computed on its float reload "
                f"(the same weights): its int8 layers ({', '.join(int8)}) have no gradients"
            )
        fidelity = attribution_fidelity(
            baseline.model,
            float_model,
            task.val,
            outputs=task.outputs,
            samples=samples,
            seed=seed,
            steps=steps,
        )
        notes += fidelity.notes
        step(3, steps, "attribution fidelity")
        indices = _shown(agreement["val"], fidelity)
        shown = attribute(
            baseline.model,
            float_model,
            task.val.x,
            indices,
            outputs=task.outputs,
            steps=steps,
            flipped=np.isin(indices, agreement["val"].flipped["index"].to_numpy()),
        )
        step(4, steps, "attributions shown")
    return Explanation(
        name, breakdown, base_breakdown, agreement, fidelity, shown, int8, tuple(notes)
    )


def _attributable(task: Task) -> bool:
    """Whether Integrated Gradients can attribute the task's models (one input tensor, held in
    memory, and decisions to explain)."""
    return (
        task.outputs in DECISIONS
        and task.val.in_memory is not None
        and isinstance(task.example_inputs(1), torch.Tensor)
    )


def _shown(agreement: Agreement, fidelity: Fidelity) -> np.ndarray:
    """Up to `SHOWN` flipped validation inputs and `SHOWN` kept ones of the attributed sample."""
    flipped = agreement.flipped["index"].to_numpy()[:SHOWN]
    sample = fidelity.attributions.indices
    kept = [i for i in sample if i not in set(agreement.flipped["index"])][:SHOWN]
    return np.asarray([*flipped, *kept], dtype=np.int64)


def explain_trial(
    cfg: DictConfig,
    study_name: str,
    trial: int | str,
    *,
    attributions: bool = True,
    samples: int | None = None,
    seed: int = 0,
    log: bool = True,
) -> Explanation:
    """Explain trial ``trial`` of ``study_name`` (or ``"baseline"``): write its files to
    ``<output_dir>/<study>/explain/<trial-NNNN|baseline>/`` and, with ``log``, log them to the
    trial's MLflow run under ``explain/`` (the baseline's: the study's parent run, under
    ``explain/baseline/``).

    Raises:
        ConfigError: If the study has no such complete trial (the message lists those it has).
    """
    from mlflow.tracking import MlflowClient

    from search.results.reuse import load_study, study_config
    from search.run.pareto import trial_packed_file
    from search.run.workload import load_workload

    study = load_study(cfg, study_name)
    number = _trial_number(study, trial)
    study_cfg = study_config(cfg, study)
    here = {"cache_dir": cfg.cache_dir, "device": cfg.device}
    workload = load_workload(OmegaConf.merge(study_cfg, here), progress=Stages(logger, "explain:"))
    client = MlflowClient(tracking_uri=str(cfg.tracking.uri))
    name = "baseline" if number is None else f"trial {number}"
    folder = Path(cfg.output_dir) / study_name / "explain"
    folder /= "baseline" if number is None else f"trial-{number:04d}"
    with tempfile.TemporaryDirectory() as tmp:
        if number is None:
            path = workload.baseline.folder / "model.sqz"  # written by explain_model if absent
            run_id = study.user_attrs.get("mlflow_parent_run_id")
            artifact_dir = "explain/baseline"
        else:
            run_id = study.trials[number].user_attrs.get("mlflow_run_id")
            path = trial_packed_file(
                Path(study_cfg.output_dir), study_name, number, run_id, client, Path(tmp)
            )
            artifact_dir = "explain"
        explanation = explain_model(
            path,
            workload.task,
            workload.baseline,
            name=name,
            attributions=attributions,
            samples=samples,
            seed=seed,
        )
    files = write_explanation(explanation, folder)
    if log and run_id is not None:
        for file in files:
            client.log_artifact(run_id, str(file), artifact_dir)
    return dataclasses.replace(explanation, files=files, run_id=run_id if log else None)


def _trial_number(study, trial: int | str) -> int | None:
    """The complete trial ``trial`` names (None for ``baseline``), or a `ConfigError`."""
    complete = [
        t.number for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE
    ]
    listed = ", ".join(map(str, complete)) or "none"
    if str(trial) == "baseline":
        return None
    try:
        number = int(trial)
    except ValueError:
        raise ConfigError(
            f"--trial {trial!r}: expected a trial number or 'baseline'. Complete trials of study "
            f"{study.study_name!r}: {listed}."
        ) from None
    if number not in complete:
        raise ConfigError(
            f"Study {study.study_name!r} has no complete trial {number}: --trial takes a complete "
            f"trial's number or 'baseline'. Complete trials: {listed}."
        )
    return number


# ----------------------------------------------------------------------------- files and figures


def explain_front(
    study,
    task: Task,
    baseline: Baseline,
    client,
    *,
    output_dir: Path,
    front_ids: Sequence[int],
    folder: Path,
) -> tuple[list[Path], str]:
    """The report's part (`search.results.report`): every front point explained against the
    baseline. Writes into ``folder`` ``bytes_per_layer.csv`` / ``.png`` / ``.html`` (the
    baseline and each point), ``agreement.csv``, ``flipped.csv``, ``attribution_fidelity.csv``
    and ``attributions_trial_<N>.png``; writes each point's own files to
    ``<output_dir>/<study>/explain/trial-NNNN/`` and logs them to its MLflow run under
    ``explain/``. Returns the report folder's new files and the page's HTML section."""
    from search.run.pareto import trial_packed_file

    if not front_ids:
        return [], "<p class='note'><b>what compression changed</b>: left out, no front.</p>"
    explained: dict[int, Explanation] = {}
    points = Ticker(logger, "report: explaining point")
    for k, number in enumerate(front_ids, 1):
        run_id = study.trials[number].user_attrs.get("mlflow_run_id")
        with tempfile.TemporaryDirectory() as tmp:
            path = trial_packed_file(
                output_dir, study.study_name, number, run_id, client, Path(tmp)
            )
            explanation = explain_model(path, task, baseline, name=f"trial {number}")
        own = output_dir / study.study_name / "explain" / f"trial-{number:04d}"
        for file in write_explanation(explanation, own):
            if run_id is not None:
                client.log_artifact(run_id, str(file), "explain")
        explained[number] = explanation
        points(k, len(front_ids))
    first = next(iter(explained.values()))
    models = {"baseline": first.baseline_breakdown}
    models.update({e.name: e.breakdown for e in explained.values()})
    files = [_csv(bytes_table(models), folder / "bytes_per_layer.csv", index=False)]
    files.append(_png(bytes_figure(models), folder / "bytes_per_layer.png"))
    plotly_figure = bytes_plotly(models)
    plotly_figure.write_html(folder / "bytes_per_layer.html", include_plotlyjs="directory")
    files.append(folder / "bytes_per_layer.html")
    agreement = pd.concat([agreement_table(e) for e in explained.values()], ignore_index=True)
    files.append(_csv(agreement, folder / "agreement.csv", index=False))
    flips = [
        a.flipped.assign(model=e.name, split=a.split)
        for e in explained.values()
        for a in e.agreement.values()
    ]
    # (a regression makes no decisions: no agreement, nothing flipped)
    flipped = pd.concat(flips, ignore_index=True) if flips else pd.DataFrame()
    files.append(_csv(flipped, folder / "flipped.csv", index=False))
    per_model = [
        e.fidelity.per_class.assign(model=e.name, method=e.fidelity.method).reset_index()
        for e in explained.values()
        if e.fidelity is not None
    ]
    fidelity = (
        pd.concat(per_model, ignore_index=True)
        if per_model
        else pd.DataFrame(columns=["class", "samples", "mean_spearman", "model", "method"])
    )
    files.append(_csv(fidelity, folder / "attribution_fidelity.csv", index=False))
    images = []
    for number, explanation in explained.items():
        if explanation.shown is not None and len(explanation.shown.indices):
            figure = attribution_figure(explanation.shown, title=explanation.name)
            files.append(_png(figure, folder / f"attributions_trial_{number}.png"))
            images.append(files[-1].name)
    return files, _section(plotly_figure, agreement, fidelity, explained, images)


def _section(plotly_figure, agreement, fidelity, explained, images) -> str:
    """report.html's part: the bytes figure, agreement and fidelity tables, attribution images."""
    import html

    div = plotly_figure.to_html(full_html=False, include_plotlyjs=False)
    pivot = fidelity.pivot_table(index="model", columns="class", values="mean_spearman")
    notes = sorted({n for e in explained.values() for n in e.notes})
    method = fidelity.method.iloc[0] if len(fidelity) else ""
    return (
        "<h2>What compression changed</h2>"
        "<h3>bytes per layer</h3><p>Each bar: what each tensor costs in the packed file's "
        "uncompressed payload; the model record and file header on top; LZMA's saving below "
        "zero; a black tick at the file's size (the sum). Per-tensor rows: "
        "<a href='bytes_per_layer.csv'>bytes_per_layer.csv</a> · "
        "<a href='bytes_per_layer.png'>bytes_per_layer.png</a> · "
        f"<a href='bytes_per_layer.html'>bytes_per_layer.html</a></p>{div}"
        "<h3>agreement with the baseline</h3><p>The share of inputs decided as the baseline "
        "decided (top-1 class; nearest neighbour for embeddings); every flipped input in "
        "<a href='flipped.csv'>flipped.csv</a>.</p>"
        + agreement.to_html(index=False, float_format=lambda v: f"{v:.4f}")
        + "<h3>attribution fidelity</h3><p>Mean Spearman rank correlation of the baseline's and "
        f"each model's input attributions, per class ({html.escape(method)}).</p>"
        + pivot.to_html(float_format=lambda v: f"{v:.3f}")
        + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)
        + "".join(f"<p><img src='{name}' style='max-width:100%'></p>" for name in images)
    )


def write_explanation(explanation: Explanation, folder: str | Path) -> list[Path]:
    """Write an explanation's tables (CSV) and figures (PNG) into ``folder``; return the paths.

    ``bytes_per_layer.csv`` (the model's lines, then the baseline's; each model's ``bytes`` sum
    to its file's size) and ``bytes_per_layer.png``, ``agreement.csv``, ``flips_<split>.csv``,
    ``flipped.csv``, and with attributions ``attribution_fidelity.csv`` and ``attributions.png``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    models = {explanation.name: explanation.breakdown}
    if explanation.name != "baseline":
        models = {"baseline": explanation.baseline_breakdown, **models}
    files.append(_csv(bytes_table(models), folder / "bytes_per_layer.csv", index=False))
    files.append(_png(bytes_figure(models), folder / "bytes_per_layer.png"))
    files.append(_csv(agreement_table(explanation), folder / "agreement.csv", index=False))
    for split_name, agreement in explanation.agreement.items():
        if agreement.flips is not None:
            files.append(_csv(agreement.flips, folder / f"flips_{split_name}.csv"))
    if explanation.agreement:
        flipped = pd.concat(
            [a.flipped.assign(split=s) for s, a in explanation.agreement.items()],
            ignore_index=True,
        )
        files.append(_csv(flipped, folder / "flipped.csv", index=False))
    if explanation.fidelity is not None:
        table = explanation.fidelity.per_class.assign(method=explanation.fidelity.method)
        files.append(_csv(table, folder / "attribution_fidelity.csv"))
    if explanation.shown is not None and len(explanation.shown.indices):
        figure = attribution_figure(explanation.shown, title=explanation.name)
        files.append(_png(figure, folder / "attributions.png"))
    return files


def _csv(frame: pd.DataFrame, path: Path, **kwargs) -> Path:
    frame.to_csv(path, **kwargs)
    return path


def _png(figure: plt.Figure, path: Path) -> Path:
    figure.savefig(path)
    plt.close(figure)
    return path


def bytes_table(models: Mapping[str, Breakdown]) -> pd.DataFrame:
    """Every model's breakdown lines (`Breakdown.lines`), one after the other, with a ``model``
    column; each model's ``bytes`` sum to its file's size."""
    frame = pd.concat(
        [b.lines().assign(model=name) for name, b in models.items()], ignore_index=True
    )
    return frame.reindex(columns=["model", *_LINE_COLUMNS])


#: Columns of `bytes_table` after ``model``.
_LINE_COLUMNS = [
    "tensor",
    "kind",
    "shape_before",
    "shape_after",
    "kept",
    "sparsity",
    "stored",
    "layout",
    "runtime",
    "params",
    "stored_tensors",
    "data_bytes",
    "index_bytes",
    "record_bytes",
    "bytes",
    "share",
]


def agreement_table(explanation: Explanation) -> pd.DataFrame:
    """One row per split: what agreement measures, the share kept, flipped inputs, inputs."""
    return pd.DataFrame(
        [
            {
                "model": explanation.name,
                "split": a.split,
                "kind": a.kind,
                "agreement": a.agreement,
                "flipped": len(a.flipped),
                "samples": a.samples,
            }
            for a in explanation.agreement.values()
        ]
    )


#: Segments a bytes-per-layer bar shows on their own; smaller ones are pooled.
_SEGMENTS = 12


def _segments(models: Mapping[str, Breakdown]) -> tuple[list[str], pd.DataFrame]:
    """``(labels, bytes)``: a frame of bytes per segment (rows) and model (columns); the
    largest `_SEGMENTS` tensors each, the others pooled, then the model record and file header
    (the LZMA container is apart: it is negative when LZMA shrank the payload)."""
    table = pd.DataFrame(
        {name: b.rows.set_index("tensor").bytes for name, b in models.items()}
    ).fillna(0)
    order = table.max(axis=1).sort_values(ascending=False).index
    top, rest = list(order[:_SEGMENTS]), list(order[_SEGMENTS:])
    segments = table.loc[[t for t in table.index if t in top]]
    if rest:
        segments.loc[f"{len(rest)} other rows"] = table.loc[rest].sum()
    segments.loc[f"{RECORD} + {FILE_HEADER}"] = [
        b.record_bytes + b.header_bytes for b in models.values()
    ]
    return list(segments.index), segments


def bytes_figure(models: Mapping[str, Breakdown]) -> plt.Figure:
    """Bytes per layer as stacked bars, one bar per model (the baseline first): each segment a
    tensor's bytes in the uncompressed payload; LZMA's saving hangs below zero, and a black
    tick marks each file's size (what the segments and the saving add up to)."""
    labels, segments = _segments(models)
    names = list(models)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(names) + 3.5), 4.8), dpi=110)
    colors = plt.get_cmap("tab20").colors
    bottom = np.zeros(len(names))
    for i, label in enumerate(labels):
        values = segments.loc[label].to_numpy(dtype=float) / 1000
        ax.bar(names, values, bottom=bottom, color=colors[i % len(colors)], label=label, width=0.6)
        bottom += values
    lzma_kb = np.array([b.container_bytes for b in models.values()], dtype=float) / 1000
    ax.bar(
        names,
        lzma_kb,
        color="0.85",
        hatch="//",
        edgecolor="0.5",
        width=0.6,
        label=f"{CONTAINER} (saving, below 0)",
    )
    sizes = np.array([b.file_bytes for b in models.values()], dtype=float) / 1000
    for x, size in enumerate(sizes):
        ax.plot(
            [x - 0.38, x + 0.38], [size, size], c="k", lw=2, label="file size" if not x else None
        )
        ax.annotate(
            f"{size:,.1f} KB",
            (x, size),
            textcoords="offset points",
            xytext=(0, 4),
            ha="center",
            fontsize=8,
        )
    ax.axhline(0, color="k", lw=0.6)
    ax.set_ylabel("bytes in the packed file (KB; payload before LZMA)")
    ax.set_title("Where the bytes went, per layer")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def bytes_plotly(models: Mapping[str, Breakdown]):
    """`bytes_figure` as an interactive plotly figure (relative bars: the saving below 0)."""
    import plotly.graph_objects as go

    labels, segments = _segments(models)
    names = list(models)
    fig = go.Figure()
    for label in labels:
        fig.add_bar(x=names, y=segments.loc[label].to_numpy() / 1000, name=label)
    fig.add_bar(
        x=names,
        y=[b.container_bytes / 1000 for b in models.values()],
        name=f"{CONTAINER} (saving)",
        marker_pattern_shape="/",
    )
    fig.add_scatter(
        x=names,
        y=[b.file_bytes / 1000 for b in models.values()],
        mode="markers",
        marker={"symbol": "line-ew-open", "size": 30, "color": "black"},
        name="file size",
    )
    fig.update_layout(
        barmode="relative",
        title="Where the bytes went, per layer",
        xaxis_title="model",
        yaxis_title="bytes in the packed file (KB; payload before LZMA)",
    )
    return fig


def attribution_figure(shown: Attributions, *, title: str) -> plt.Figure:
    """Per example (a row): the input, the baseline's attributions and the compressed model's,
    flipped examples first; red: evidence for the baseline's decision, blue: against."""
    rows = len(shown.indices)
    rho = shown.spearman()
    fig, axes = plt.subplots(rows, 3, figsize=(8.4, 2.0 * rows + 0.6), dpi=100, squeeze=False)
    for i in range(rows):
        status = "flipped" if shown.flipped[i] else "kept"
        if shown.baseline_pred[i] >= 0:
            status += f": {shown.baseline_pred[i]} -> {shown.model_pred[i]}"
        a, b = shown.reference[i], shown.model[i]
        panels = (
            (shown.inputs[i], f"input #{shown.indices[i]} ({status})", False),
            (a, "baseline attribution", True),
            (b, f"{title} attribution (Spearman ρ {rho[i]:.2f})", True),
        )
        for ax, (values, label, signed) in zip(axes[i], panels, strict=True):
            _panel(ax, values, signed=signed, tokens=not shown.inputs.is_floating_point())
            ax.set_title(label, fontsize=8)
    fig.suptitle(
        f"Attributions, baseline vs {title} (flipped examples first)\nred: for the baseline's "
        "decision, blue: against; each panel on its own scale",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def _panel(ax, values: torch.Tensor, *, signed: bool, tokens: bool) -> None:
    """One input or attribution: an image for 2-D and square 1-D data, else bars."""
    values = values.detach().float()
    if values.dim() == 3:  # channels first: summed over channels
        values = values.sum(0)
    side = math.isqrt(values.numel()) if values.dim() == 1 else 0
    if values.dim() == 1 and side * side == values.numel() and side >= 4 and not tokens:
        values = values.view(side, side)
    ax.tick_params(labelsize=6)
    if values.dim() == 2:
        limit = float(values.abs().max()) or 1.0
        cmap, low = ("RdBu_r", -limit) if signed else ("gray_r", None)
        ax.imshow(values.numpy(), cmap=cmap, vmin=low, vmax=limit if signed else None)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    colors = ["tab:red" if v >= 0 else "tab:blue" for v in values] if signed else "0.4"
    ax.bar(range(values.numel()), values.numpy(), color=colors, width=0.9)
    ax.set_xlabel("token position" if tokens else "input feature", fontsize=6)


# ----------------------------------------------------------------------------- the terminal


def console_tables(explanation: Explanation, *, flipped_rows: int = 10) -> list:
    """What ``squeeze explain`` prints: rich tables of bytes, agreement, flips, attributions."""
    from rich.table import Table

    out: list = []
    breakdown, base = explanation.breakdown, explanation.baseline_breakdown
    ratio = base.file_bytes / breakdown.file_bytes
    table = Table(
        title=f"{explanation.name}: {breakdown.path.name}, {breakdown.file_bytes:,} bytes "
        f"({ratio:.1f}x smaller than the baseline's {base.file_bytes:,})",
        caption="bytes: what each tensor costs in the uncompressed payload (its arrays, their "
        "safetensors entries and its layout record); the last three lines complete the sum to "
        "the file's size exactly. kept: sizes after/before structured pruning.",
        caption_justify="left",
    )
    for column in ("tensor", "kind", "shape", "kept", "sparsity", "stored", "layout", "runtime"):
        table.add_column(column, overflow="fold")
    table.add_column("bytes", justify="right", no_wrap=True)
    table.add_column("share", justify="right", no_wrap=True)
    for row in breakdown.rows.itertuples():
        shape = (
            row.shape_before
            if row.shape_before == row.shape_after
            else f"{row.shape_before} → {row.shape_after}"
        )
        table.add_row(
            row.tensor,
            row.kind,
            shape,
            row.kept,
            f"{row.sparsity:.1%}",
            row.stored,
            row.layout,
            row.runtime,
            f"{row.bytes:,}",
            f"{row.bytes / breakdown.file_bytes:.1%}",
        )
    payload = breakdown.payload_bytes
    extra = (
        (RECORD, "length prefix, JSON framing, padding; modules, ties", breakdown.record_bytes),
        (
            CONTAINER,
            f"payload {payload:,} B → LZMA {payload + breakdown.container_bytes:,} B"
            if breakdown.container_bytes
            else "payload stored raw (LZMA would not shrink it)",
            breakdown.container_bytes,
        ),
        (FILE_HEADER, "magic, codec, CRC-32", breakdown.header_bytes),
    )
    for label, what, value in extra:
        share = f"{value / breakdown.file_bytes:.1%}"
        table.add_row(label, "", "", "", "", what, "", "", f"{value:,}", share, style="dim")
    total = f"{breakdown.file_bytes:,}"
    table.add_row("total = file size", *[""] * 7, total, "100.0%", style="bold")
    out.append(table)

    summary = Table(title="Agreement with the baseline", caption_justify="left")
    for column in ("split", "decided alike", "agreement", "flipped", "inputs"):
        summary.add_column(column, justify="left" if column == "decided alike" else "right")
    for a in explanation.agreement.values():
        summary.add_row(a.split, a.kind, f"{a.agreement:.4f}", str(len(a.flipped)), str(a.samples))
    out.append(summary)
    for a in explanation.agreement.values():
        if a.flips is not None and len(a.flipped):
            out.append(_flips_table(a))
        if len(a.flipped):
            out.append(_flipped_table(a, flipped_rows))
    if explanation.fidelity is not None:
        fidelity = explanation.fidelity
        table = Table(title="Attribution fidelity")
        table.add_column("class", justify="right")
        table.add_column("samples", justify="right")
        table.add_column("mean Spearman ρ", justify="right")
        for label, row in fidelity.per_class.iterrows():
            table.add_row(
                str(label),
                str(int(row.samples)),
                f"{row.mean_spearman:.3f}",
                style="bold" if label == "all" else None,
            )
        out.append(table)
        out.append(
            "attribution fidelity: the mean Spearman rank correlation of the baseline's and the "
            f"compressed model's input attributions (1: the same evidence, ranked alike); "
            f"{fidelity.method}"
        )
    out += [f"note: {note}" for note in explanation.notes]
    return out


def _flips_table(a: Agreement):
    from rich.table import Table

    classes = [c for c in a.flips.index if a.flips.loc[c].sum() or a.flips[c].sum()]
    table = Table(
        title=f"Flips on {a.split}: rows the baseline's class, columns the compressed model's "
        "(off the diagonal: flipped; row sums: the baseline's class counts)",
        caption_justify="left",
    )
    table.add_column("baseline \\ compressed", justify="right")
    for c in classes:
        table.add_column(str(c), justify="right")
    for r in classes:
        cells = [
            (f"[bold red]{v}[/]" if v and r != c else str(v) if v else "·")
            for c, v in ((c, int(a.flips.loc[r, c])) for c in classes)
        ]
        table.add_row(str(r), *cells)
    return table


def _flipped_table(a: Agreement, rows: int):
    from rich.table import Table

    more = len(a.flipped) - rows
    neighbours = a.kind == "nearest neighbour"
    table = Table(
        title=f"Flipped on {a.split}"
        + (f" (first {rows}; all {len(a.flipped)} in flipped.csv)" if more > 0 else ""),
        caption="conf: cosine similarity to the nearest neighbour"
        if neighbours
        else "conf: softmax probability of the model's own class",
        caption_justify="left",
    )
    head = (
        ("index", "baseline's neighbour", "compressed's neighbour")
        if neighbours
        else ("index", "label", "baseline (conf)", "compressed (conf)")
    )
    for column in head:
        table.add_column(column, justify="right")
    for row in a.flipped.head(rows).itertuples():
        base = f"{row.baseline} ({row.baseline_conf:.2f})"
        comp = f"{row.compressed} ({row.compressed_conf:.2f})"
        cells = (
            (str(row.index), base, comp)
            if neighbours
            else (str(row.index), str(row.label), base, comp)
        )
        table.add_row(*cells)
    return table

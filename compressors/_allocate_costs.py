"""What each of `allocate`'s settings costs a tensor, by arithmetic: the packed file's bytes and
the weights' distortion, for every setting in one pass over the tensor.

The packed file (`compressors.packing`) stores a tensor in the smallest of a few layouts, each of
a size that follows from counts: float32 (or float16) values, dense or at the nonzero positions
with a bitmask (one bit per position) or gaps (a byte per gap, one more per 255 skipped); grid
codes bit-packed in ``ceil(log2(alphabet))`` bits each, with float16 per-row scales; or the codes
entropy-coded (rANS under the tensor's own code frequencies). Every size but the last is a sum
of counts (the number of nonzero values, of codes of each value, of gap bytes) plus the
safetensors entries and the JSON record, all computed here without writing any array: the result
equals `compressors.packing.tensor_bytes` (the tests check it). The entropy-coded size is the
one the coder returns for tensors of up to `EXACT_ANS` values (the encoder itself, a few
nanoseconds per code), and above that the cross-entropy of the codes under the stored
frequencies, which was within a few bytes of the coder's in the tests (the allocator aims
`compressors.allocate.SLACK` under its target, and ``finalize`` checks the real file).

The counts come from each sparsity's mask (`compressors.prune.smallest_mask`'s; on sampled rows,
the whole tensor's threshold) and, per bit width, the grid `compressors.quant.make_grid` makes
of the pruned tensor: the same values `compressors.allocate.apply_settings` gives the model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

import constriction
import numpy as np
import torch
from torch import nn

from compressors.packing import _trim
from compressors.prune import smallest_mask
from compressors.quant import make_grid

#: Tensors of at most this many values get the entropy coder's exact size; larger ones its
#: estimate (the codes' cross-entropy under the stored frequencies, in 32-bit words).
EXACT_ANS = 1 << 16
#: Tensors of more than this many values (with enough rows) are costed on every k-th row, k the
#: smallest step that leaves at most this many values: counts, distortions and Fisher sums are
#: scaled up by k (rows are independent on a per-row grid; the pruning threshold is the whole
#: tensor's). The grid search over clipping ratios (`make_grid`) is most of a table's time.
SAMPLED_ABOVE = 1 << 20
#: `variants` of a tensor of at least this many values gives the memory it freed back to the
#: system after each setting (glibc's arenas keep it otherwise); smaller ones are not worth a
#: trim's time (bert-10M's 256 x 1024 weights: 4% of its table).
TRIM_ABOVE = 1 << 20
#: safetensors orders a file's entries by dtype (this rank, highest first), then by name.
_DTYPE_RANK = {"U8": 0, "F16": 1, "I32": 2, "F32": 3}
_NAME = "t"  # the name `compressors.packing.tensor_bytes` encodes a tensor under


@dataclass(frozen=True)
class Setting:
    """One candidate of a tensor: a sparsity, and a bit width (None: float32 values)."""

    sparsity: float
    bits: int | None

    def __str__(self) -> str:
        return f"{self.sparsity:g}/{'fp32' if self.bits is None else f'{self.bits}b'}"


@dataclass(frozen=True)
class Costs:
    """A tensor's row of each table: one entry per setting.

    Attributes:
        bytes: What the packed file's payload spends on the tensor (`tensor_bytes`).
        distortion: ``sum (w - v)^2`` between the weights and their value at the setting.
        fisher: ``1/2 sum F (w - v)^2`` under a Fisher diagonal ``F`` (None without one).
    """

    bytes: np.ndarray
    distortion: np.ndarray
    fisher: np.ndarray | None


def oriented(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """``weight`` with its output channels (a grid's scales, ``axis``: a `Target`'s
    `channel_axis`) first: a view, transposed for a Linear stored transposed (GPT-2's
    ``Conv1D``), so that `costs` sizes and samples it per output channel as the grid
    `apply_settings` registers does."""
    return weight if axis == 0 else weight.transpose(0, axis)


def variants(
    weight: torch.Tensor, settings: list[Setting], *, axis: int = 0
) -> Iterator[tuple[torch.Tensor, nn.Module | None]]:
    """``(value, grid)`` of ``weight`` at each setting, in order: its ``sparsity`` smallest
    magnitudes zeroed, then on the grid of ``bits`` with one scale per index of ``axis`` (what
    `apply_settings` makes of it before fine-tuning; no grid for float32). Each sparsity's
    mask is `smallest_mask`'s (the one `apply_settings` registers: a count of the magnitudes,
    no sort; a stable argsort of them was a quarter of a 10 M MLP's table and its int64 indices
    twice the tensor's bytes), and one pruned tensor is held at a time (settings of one
    sparsity in a row reuse it)."""
    w = weight.detach()
    trim = _trim if w.numel() >= TRIM_ABOVE else lambda: None
    current, masked = None, None
    for setting in settings:
        if setting.sparsity != current:
            masked = None
            trim()
            keep = smallest_mask(w.abs(), setting.sparsity)
            trim()  # (its magnitudes and counting passes' temporaries: 3x the tensor, held)
            current, masked = setting.sparsity, w * keep
            del keep
        value, grid = masked, None
        if setting.bits is not None:
            grid = make_grid(masked, setting.bits, axis=axis)
            value = grid.codes(masked).mul_(grid.scale)  # (in place: no third tensor)
        yield value, grid
        del value, grid
        trim()  # (the freed values leave glibc's arenas: held, a 10 M MLP's peak was 4.4x)


def costs(
    weight: torch.Tensor, settings: list[Setting], *, fisher: torch.Tensor | None = None
) -> Costs:
    """Every setting's bytes and distortion for ``weight`` (and Fisher estimate, given
    ``fisher``, a tensor of ``weight``'s shape, or of its `sampled_rows` only, where it has
    some): one pass, one setting's values at a time. Grids have one scale per row: pass a
    tensor whose output channels are not its first axis `oriented`."""
    w = weight.detach()
    rows = sampled_rows(w)
    if rows is not None:
        return _sampled_costs(w, settings, fisher=fisher, rows=rows)
    out_bytes, distortion, estimate = [], [], []
    for value, grid in variants(w, settings):
        out_bytes.append(value_bytes(value, grid))
        diff = (w - value).float()
        distortion.append(float((diff * diff).sum()))
        if fisher is not None:
            estimate.append(0.5 * float((fisher * diff * diff).sum()))
        del diff
    return Costs(
        np.array(out_bytes, dtype=np.int64),
        np.array(distortion),
        None if fisher is None else np.array(estimate),
    )


def sampled_rows(weight: torch.Tensor) -> torch.Tensor | None:
    """The rows `costs` measures ``weight`` on: every k-th (see `SAMPLED_ABOVE`), or None where
    it measures the whole tensor."""
    step = math.ceil(weight.numel() / SAMPLED_ABOVE)
    if step > 1 and weight.dim() >= 2 and weight.shape[0] >= 4 * step:
        return torch.arange(0, weight.shape[0], step, device=weight.device)
    return None


def _sampled_costs(
    w: torch.Tensor, settings: list[Setting], *, fisher: torch.Tensor | None, rows: torch.Tensor
) -> Costs:
    """`costs` estimated on the ``rows`` of ``w`` (`sampled_rows`); ``fisher``: of ``w``'s
    shape, or of those rows only."""
    factor = w.shape[0] / len(rows)
    sample = w[rows]
    part = None if fisher is None else fisher[rows] if len(fisher) == len(w) else fisher
    thresholds = _thresholds(w, {s.sparsity for s in settings})
    out_bytes, distortion, estimate = [], [], []
    current, masked = None, None
    for setting in settings:
        if setting.sparsity != current:
            threshold = thresholds[setting.sparsity]
            current, masked = setting.sparsity, sample * (sample.abs() > threshold)
        value, grid = masked, None
        if setting.bits is not None:
            grid = make_grid(masked, setting.bits)
            value = grid.codes(masked) * grid.scale
        out_bytes.append(value_bytes(value, grid, shape=list(w.shape), factor=factor))
        diff = (sample - value).float()
        distortion.append(factor * float((diff * diff).sum()))
        if part is not None:
            estimate.append(0.5 * factor * float((part * diff * diff).sum()))
    return Costs(
        np.array(out_bytes, dtype=np.int64),
        np.array(distortion),
        None if fisher is None else np.array(estimate),
    )


def _thresholds(w: torch.Tensor, sparsities: set[float]) -> dict[float, float]:
    """The pruning threshold of ``w`` at each sparsity: the ``k``-th smallest magnitude, ``k``
    the sparsity's share of the values (-1 where ``k`` is 0). All from one copy of the
    magnitudes, partitioned in place (`torch.kthvalue` would hold three more: a copy of the
    values and their int64 indices, per sparsity)."""
    ks = {s: round(s * w.numel()) for s in sparsities}
    wanted = sorted({k - 1 for k in ks.values() if k > 0})
    if not wanted:
        return {s: -1.0 for s in sparsities}
    magnitudes = w.detach().abs().flatten().cpu().numpy()
    magnitudes.partition(wanted)
    out = {s: float(magnitudes[k - 1]) if k > 0 else -1.0 for s, k in ks.items()}
    del magnitudes
    return out


def value_bytes(
    value: torch.Tensor,
    grid: nn.Module | None = None,
    *,
    shape: list[int] | None = None,
    factor: float = 1.0,
) -> int:
    """`compressors.packing.tensor_bytes` of ``value`` (on ``grid``, if given): the file's own
    encoder (its byte planes are compressed where that pays, which no count predicts); or, given
    ``shape``, of a tensor of that shape whose rows ``value`` samples, one in ``factor`` (the
    sample's bytes scaled up: an estimate)."""
    from compressors.packing import tensor_bytes

    if shape is None:
        return tensor_bytes(value.detach(), grid)
    if factor != 1.0:
        return round(tensor_bytes(value.detach(), grid) * factor)
    flat = value.detach().flatten()
    full = list(value.shape) if shape is None else shape
    spec: dict = {"shape": full, "dtype": str(value.dtype).removeprefix("torch.")}
    if grid is None:
        return _float_bytes(flat.to(torch.float32), spec, factor)
    packed = grid.packed(value.detach())
    entries = []
    for key, tensor in packed.tensors.items():
        tensor = tensor.detach().to(torch.float32)
        half = torch.equal(tensor.to(torch.float16).to(torch.float32), tensor)
        stored = list(tensor.shape)
        if shape is not None and stored and stored[0] == value.shape[0]:
            stored[0] = shape[0]  # one scale per row
        entries.append((f"{_NAME}:{key}", "F16" if half else "F32", stored))
    spec["decode"] = packed.decode
    return _codes_bytes(packed.codes.flatten().to(torch.int64), spec, entries, factor)


def _float_bytes(flat: torch.Tensor, spec: dict, factor: float = 1.0) -> int:
    nonzero = flat != 0
    n = math.prod(spec["shape"])
    nnz = round(int(nonzero.sum()) * factor)
    gaps = round(_gap_bytes(nonzero, flat.numel()) * factor)
    half = torch.equal(flat.to(torch.float16).to(torch.float32), flat)
    bits = 16 if half else 32
    sizes = {"dense": bits * n, "bitmask": n + bits * nnz, "gaps": 8 * gaps + bits * nnz}
    spec["enc"] = min(sizes, key=sizes.get)
    entries = _positions(spec["enc"], n, gaps)
    kept = n if spec["enc"] == "dense" else nnz
    entries.append((f"{_NAME}:values", "F16" if half else "F32", [kept]))
    return _safetensors_bytes(entries) + _record_bytes(spec)


class _Stream:
    """What `compressors.packing._Symbols` makes of codes, from their value counts."""

    def __init__(self, counts: np.ndarray, offset: int) -> None:
        present = np.flatnonzero(counts)
        if len(present) == 0:  # no codes: an alphabet of one symbol, 0
            present, offset = np.zeros(1, dtype=np.int64), 0
        self.count = int(counts.sum())
        self.size = len(present)
        self.bits = _bits_for(self.size)
        lo, hi = int(present[0]) - offset, int(present[-1]) - offset
        if hi - lo + 1 <= 2**self.bits:
            self.spec: dict = {"range": [lo, hi]}
            self.size = hi - lo + 1
            self.counts = counts[present[0] : present[-1] + 1] if self.count else np.zeros(1)
        else:
            self.spec = {"alphabet": (present - offset).tolist()}
            self.counts = counts[present]


def _codes_bytes(codes: torch.Tensor, spec: dict, entries: list, factor: float = 1.0) -> int:
    n = math.prod(spec["shape"])
    lo = int(codes.min()) if codes.numel() else 0
    counts = torch.bincount(codes - lo).cpu().numpy() if codes.numel() else np.zeros(1)
    if factor != 1.0:
        counts = np.round(counts * factor)
    nonzero = codes != 0
    nnz = round(int(nonzero.sum()) * factor)
    gaps = round(_gap_bytes(nonzero, codes.numel()) * factor)
    sparse_counts = counts.copy()
    if 0 <= -lo < len(sparse_counts):
        sparse_counts[-lo] = 0
    dense, sparse = _Stream(counts, -lo), _Stream(sparse_counts, -lo)
    sizes = {
        "dense": dense.bits * n,
        "bitmask": n + sparse.bits * nnz,
        "gaps": 8 * gaps + sparse.bits * nnz,
    }
    ans = None
    if dense.size > 1:
        ans = _ans_bytes(codes, dense, lo)
        sizes["ans"] = 8 * ans + 8 * dense.size
    spec["enc"] = min(sizes, key=sizes.get)
    entries = entries + _positions(spec["enc"], n, gaps)
    stream = dense if spec["enc"] in ("dense", "ans") else sparse
    spec.update(stream.spec, count=stream.count)
    if spec["enc"] == "ans":
        entries.append((f"{_NAME}:ans", "I32", [ans // 4]))
        entries.append((f"{_NAME}:freqs", "U8", [stream.size]))
    else:
        entries.append((f"{_NAME}:codes", "U8", [math.ceil(stream.count * stream.bits / 8)]))
        spec["bits"] = stream.bits
    return _safetensors_bytes(entries) + _record_bytes(spec)


def _ans_bytes(codes: torch.Tensor, stream: _Stream, lo: int) -> int:
    """Bytes of the entropy-coded stream: the coder's for small tensors, its estimate above
    `EXACT_ANS` values."""
    counts = stream.counts.astype(np.float64)
    freqs = np.where(counts > 0, np.maximum(1, np.round(255 * counts / counts.max())), 0)
    if codes.numel() <= EXACT_ANS and stream.count == codes.numel():
        first = int(stream.spec["range"][0]) if "range" in stream.spec else None
        if first is not None:
            index = (codes - first).cpu().numpy().astype(np.int32)
        else:
            alphabet = torch.tensor(stream.spec["alphabet"], device=codes.device)
            index = torch.searchsorted(alphabet, codes).cpu().numpy().astype(np.int32)
        coder = constriction.stream.stack.AnsCoder()
        weights = freqs.astype(np.uint8).astype(np.float64)  # as the file's coder models them
        model = constriction.stream.model.Categorical(weights / weights.sum(), perfect=False)
        coder.encode_reverse(index, model)
        return int(coder.get_compressed().nbytes)
    p = freqs / freqs.sum()
    present = counts > 0
    bits = float(-(counts[present] * np.log2(p[present])).sum())
    return 4 * (math.ceil(bits / 32) + 1)


def _gap_bytes(nonzero: torch.Tensor, n: int) -> int:
    """Length of `compressors.packing._encode_gaps` of the nonzero positions; where that is
    at least ``n / 8`` (every gap takes a byte), the bitmask is as small (a tie goes to it), so
    a lower bound (the count of nonzero positions) decides the layout as well."""
    nnz = int(nonzero.sum())
    if 8 * nnz >= n:
        return nnz
    positions = torch.nonzero(nonzero).flatten()
    if len(positions) == 0:
        return 0
    gaps = torch.diff(positions, prepend=positions.new_full((1,), -1)) - 1
    return int((gaps // 255).sum()) + len(positions)


def _positions(enc: str, n: int, gaps: int) -> list:
    if enc == "bitmask":
        return [(f"{_NAME}:mask", "U8", [math.ceil(n / 8)])]
    if enc == "gaps":
        return [(f"{_NAME}:gaps", "U8", [gaps])]
    return []


_ITEM = {"U8": 1, "F16": 2, "I32": 4, "F32": 4}


def _safetensors_bytes(entries: list[tuple[str, str, list[int]]]) -> int:
    """Bytes `safetensors.torch.save` writes for entries ``(name, dtype, shape)``, less its
    8-byte length prefix: the JSON header (padded to 8 bytes) and the data."""
    entries = sorted(entries, key=lambda e: (-_DTYPE_RANK[e[1]], e[0]))
    header, offset = {}, 0
    for name, dtype, shape in entries:
        size = _ITEM[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    length = len(json.dumps(header, separators=(",", ":")))
    return length + (8 - length % 8) % 8 + offset


def _record_bytes(spec: dict) -> int:
    return len(json.dumps(spec, separators=(",", ":")))


def _bits_for(symbols: int) -> int:
    return max(1, math.ceil(math.log2(symbols))) if symbols > 1 else 1

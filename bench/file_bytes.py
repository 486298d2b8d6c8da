"""Where a packed file's bytes go, as stored: what a target ratio leaves for the weights.

The stored bytes of an SQZ5 (SQZ4, SQZ3) file, as `squeeze explain` reads them from its
index (`search.results.explain.stored_arrays`), regrouped: the framing (magic and trailer), the
index (zstd'd JSON: names, shapes, layouts, array sizes), the tensors that are not weights
(biases, norms: any tensor of fewer than 2 dimensions), the weights' tables (codebooks,
per-channel scales, rANS frequency tables) and the weights' payload (codes, rANS streams, masks,
gaps, float values). Per file it prints those bytes, the payload's bits per weight of the
baseline (every position of the uncompressed weights, so that structured pruning counts as
saving), and the bits per weight a target ratio (``--ratio``, against ``--baseline``'s size)
would leave the payload beside the same overhead.

    python bench/file_bytes.py --baseline CACHE/mnist1d_cnn-*/model.sqz TRIALS/trial-0024.sqz
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from search.results.explain import FRAMING, INDEX, stored_arrays

#: Arrays of a weight that are its tables rather than one entry per (kept) weight.
TABLES = frozenset({"codebook", "scale", "freqs"})


def file_bytes(path: str | Path) -> dict[str, int]:
    """The stored bytes of an SQZ5, SQZ4 or SQZ3 file by part (they sum to ``file``), and
    ``weights``: the positions of its weight tensors (their shapes in the file).

    Raises:
        ValueError: If the file is an SQZ2 file (one LZMA-compressed payload) or not a packed
            file.
    """
    stored = stored_arrays(Path(path))
    out = {"other": 0, "tables": 0, "payload": 0, "weights": 0}
    for name, arrays in stored.arrays.items():
        shape = stored.meta["t"][name]["shape"]
        weight = len(shape) >= 2
        out["weights"] += math.prod(shape) if weight else 0
        for array in arrays:
            part = "other" if not weight else "tables" if array.suffix in TABLES else "payload"
            out[part] += array.bytes
    lines = {line.label: line.bytes for line in stored.extra}
    out["framing"], out["index"] = lines[FRAMING], lines[INDEX]
    out["file"] = stored.file_bytes
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--baseline", type=Path, required=True, help="the baseline's fp32 file")
    parser.add_argument("--ratio", type=float, default=10.0, help="the target ratio")
    args = parser.parse_args()
    base = file_bytes(args.baseline)
    target = base["file"] / args.ratio
    print(
        f"baseline {args.baseline.name}: {base['file']:,} B, {base['weights']:,} weights; "
        f"{args.ratio:g}x is {target:,.0f} B ({8 * target / base['weights']:.2f} bits per weight "
        "for the whole file)"
    )
    for path in args.files:
        b = file_bytes(path)
        overhead = b["file"] - b["payload"]
        print(
            f"{path.name}: {b['file']:,} B ({base['file'] / b['file']:.2f}x) = payload "
            f"{b['payload']:,} ({8 * b['payload'] / base['weights']:.2f} bits per weight) + "
            f"tables {b['tables']:,} + other tensors {b['other']:,} + index {b['index']:,} + "
            f"framing {b['framing']}; overhead {overhead:,} B ({overhead / b['file']:.1%}); "
            f"{args.ratio:g}x leaves the payload "
            f"{max(0.0, 8 * (target - overhead) / base['weights']):.2f} bits per weight"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a packed file's bytes go, as stored: what a target ratio leaves for the weights.

`squeeze explain` accounts a file on its uncompressed (safetensors-style) payload; this reads what
an SQZ5 (or SQZ4) file stores, from its index: the framing (magic and trailer), the index (zstd'd
JSON: names, shapes, layouts, array sizes), the tensors that are not weights (biases, norms: any
tensor of fewer than 2 dimensions), the weights' tables (codebooks, per-channel scales, rANS
frequency tables) and the weights' payload (codes, rANS streams, masks, gaps, float values). Per
file it prints those bytes, the payload's bits per weight of the baseline (every position of the
uncompressed weights, so that structured pruning counts as saving), and the bits per weight a
target ratio (``--ratio``, against ``--baseline``'s size) would leave the payload beside the same
overhead.

    python bench/file_bytes.py --baseline CACHE/mnist1d_cnn-*/model.sqz TRIALS/trial-0024.sqz
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from compressors._container import FRAMING_BYTES, MAGIC, MAGIC_SQZ4, open_packed

#: Arrays of a weight that are its tables rather than one entry per (kept) weight.
TABLES = frozenset({"codebook", "scale", "freqs"})


def file_bytes(path: str | Path) -> dict[str, int]:
    """The stored bytes of an SQZ5 or SQZ4 file by part (they sum to ``file``), and
    ``weights``: the positions of its weight tensors (their shapes in the file).

    Raises:
        ValueError: If the file is of an older format (SQZ3 and SQZ2 are laid out otherwise).
    """
    path = Path(path)
    data = path.read_bytes()
    if data[:4] not in (MAGIC, MAGIC_SQZ4):
        raise ValueError(f"{path}: not an SQZ5 or SQZ4 file (magic {data[:4]!r})")
    meta = open_packed(path, data).meta
    out = {"other": 0, "tables": 0, "payload": 0, "weights": 0}
    for spec in meta["t"].values():
        weight = len(spec["shape"]) >= 2
        out["weights"] += math.prod(spec["shape"]) if weight else 0
        for suffix, _dtype, _shape, _codec, sizes in spec["a"]:
            part = "other" if not weight else "tables" if suffix in TABLES else "payload"
            out[part] += sum(sizes)
    out["framing"] = FRAMING_BYTES
    out["index"] = len(data) - FRAMING_BYTES - out["other"] - out["tables"] - out["payload"]
    out["file"] = len(data)
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

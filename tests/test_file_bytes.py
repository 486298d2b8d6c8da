"""`bench/file_bytes.py`: a packed file's stored bytes split into framing, index, other tensors,
the weights' tables and their payload."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from compressors import CompressionContext, apply_pipeline, get_compressor, save_packed

_PATH = Path(__file__).resolve().parents[1] / "bench" / "file_bytes.py"
_SPEC = importlib.util.spec_from_file_location("file_bytes", _PATH)
fb = sys.modules.setdefault("file_bytes", importlib.util.module_from_spec(_SPEC))
_SPEC.loader.exec_module(fb)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def test_the_parts_sum_to_the_file_and_codebooks_are_tables_not_payload(tmp_path):
    base = _model()
    clustered = apply_pipeline(
        [get_compressor("cluster")(bits=4)], copy.deepcopy(base), CompressionContext(seed=0)
    )
    size = save_packed(clustered, tmp_path / "c.sqz", like=base)
    parts = fb.file_bytes(tmp_path / "c.sqz")
    assert parts["file"] == size
    assert sum(parts[k] for k in ("framing", "index", "other", "tables", "payload")) == size
    assert parts["weights"] == 32 * 64 + 64 * 10
    assert parts["other"] == 2 * (64 + 10)  # the biases, as float16 (cluster's default)
    assert parts["tables"] >= 2 * 16 * 2  # two codebooks of 16 values, at least float16
    assert parts["payload"] <= -(-parts["weights"] * 4 // 8)  # 4-bit codes at most
    assert parts["index"] > 0

    save_packed(base, tmp_path / "b.sqz")
    dense = fb.file_bytes(tmp_path / "b.sqz")
    assert dense["tables"] == 0
    assert 0 < dense["other"] <= 4 * (64 + 10)  # float32 biases (their exponents zstd'd)
    assert dense["payload"] > 3 * parts["payload"]


def test_an_sqz3_file_is_split_too():
    path = Path(__file__).parent / "data" / "sqz3_v4_small.sqz"
    parts = fb.file_bytes(path)
    assert parts["file"] == path.stat().st_size
    assert (
        sum(parts[k] for k in ("framing", "index", "other", "tables", "payload")) == parts["file"]
    )
    assert parts["framing"] == 4 + 12  # magic, index length and CRC-32
    assert parts["weights"] == 64 * 200 + 200 * 100 + 100 * 10


def test_an_older_format_is_refused(tmp_path):
    (tmp_path / "old.sqz").write_bytes(b"SQZ2" + bytes(32))
    with pytest.raises(ValueError, match="is an SQZ2 file"):
        fb.file_bytes(tmp_path / "old.sqz")

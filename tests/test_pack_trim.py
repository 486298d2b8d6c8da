"""Packing gives freed memory back to the system once the tensors encoded since the last time
held `IN_FLIGHT` values (`compressors.packing._Trimmer`), not after every tensor."""

from __future__ import annotations

import torch
from torch import nn

from compressors import packing


def test_memory_is_given_back_once_per_in_flight_values(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(packing, "_trim", lambda: calls.append(1))
    monkeypatch.setattr(packing, "IN_FLIGHT", 1000)
    trimmer = packing._Trimmer()
    for values in (400, 400, 100):
        trimmer(values)
    assert calls == []  # (900 values so far)
    trimmer(100)
    assert len(calls) == 1
    trimmer(999)
    assert len(calls) == 1
    trimmer(5000)
    assert len(calls) == 2
    calls.clear()
    model = nn.Sequential(*[nn.Linear(20, 20) for _ in range(10)])  # 10 x 420 values
    for workers in (1, 2):
        monkeypatch.setattr(packing, "WORKERS", workers)
        calls.clear()
        packing.save_packed(model, tmp_path / "m.sqz")
        assert len(calls) == 3  # (20 tensors of 400 and 20 values: every 1,240 values)
    assert torch.equal(
        packing.load_packed(
            tmp_path / "m.sqz", nn.Sequential(*[nn.Linear(20, 20) for _ in range(10)])
        )[0].weight,
        model[0].weight,
    )

"""`allocate` alone at one rung of `bench._scale_phases`'s ladder: its first (measured) table
and solve as a multiple of one training step of the same model (wall and CPU time), its peak RSS
over the model's bytes, the cached second call, and a digest of the chosen allocation (two
versions that agree choose the same settings):

    python bench/scale_allocate.py bert 30M
    nice -n 5 python bench/scale_allocate.py bert 110M          # minutes
    PYTHONPATH=/path/to/other/squeeze python bench/scale_allocate.py bert 30M   # before a change

(`bench/scale.py` times every phase of a trial, allocate among them; this runs allocate only.)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import tempfile
import time
from pathlib import Path

import torch

from bench._scale_phases import KINDS, RUNGS, PeakRss, _step_seconds, make_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("rung", choices=list(RUNGS))
    args = parser.parse_args()

    from compressors import get_compressor
    from experiments._baseline import Baseline
    from search.run.trial import compression_context

    task, batch = make_task(args.kind, args.rung)
    torch.manual_seed(0)
    base = task.build_model().eval()
    model_bytes = sum(t.numel() * t.element_size() for t in base.state_dict().values())
    step_wall, step_cpu = _step_seconds(copy.deepcopy(base), task, batch)
    folder = Path(tempfile.mkdtemp(prefix="squeeze-allocate-"))
    ctx = compression_context(task, Baseline(base, None, {}, "bench", folder, False), seed=0)
    allocator, model = get_compressor("allocate")(), copy.deepcopy(base)
    with PeakRss() as peak:
        t0, c0 = time.perf_counter(), time.process_time()
        allocator.compress(model, ctx)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    del model
    t0 = time.perf_counter()
    get_compressor("allocate")().compress(copy.deepcopy(base), ctx)
    cached = time.perf_counter() - t0
    chosen = json.dumps({k: str(v) for k, v in allocator.allocation.items()}, sort_keys=True)
    row = {
        "case": f"{args.kind}-{args.rung}",
        "params": sum(p.numel() for p in base.parameters()),
        "step_s": round(step_wall, 3),
        "allocate_s": round(wall, 1),
        "steps": round(wall / step_wall, 1),
        "cpu_steps": round(cpu / step_cpu, 1),
        "mem": round(peak.over / model_bytes, 2),
        "cached_steps": round(cached / step_wall, 1),
        "allocation": hashlib.sha256(chosen.encode()).hexdigest()[:12],
    }
    print(json.dumps(row))
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()


if __name__ == "__main__":
    main()

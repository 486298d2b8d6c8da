"""How small and how fast a short squeeze sweep makes the pretrained all-MiniLM-L6-v2 on this CPU.

One run of ``squeeze sweep experiment=minilm`` (the ``minilm`` task and space, 1 torch thread),
then:

1. the **sweep's wall time** and the **peak resident memory** of this process (``ru_maxrss``:
   the baseline, every trial, the front's test evaluation; the MLflow writer is a separate
   process);
2. the **best size ratio** (the baseline's packed fp32 file over the trial's packed file) among
   trials whose validation mean cosine to the original embeddings is >= ``--min-cosine``, with
   its test cosine and retrieval agreement;
3. the **CPU latency speed-up** of that point at batch 1 and batch 32, timed against the baseline
   side by side (alternating rounds, median of medians), and the fastest trial at batch 32 that
   also keeps the cosine.

    python bench/minilm.py [--trials 12] [--min-cosine 0.97]
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import recipe_text, shipped_baseline, side_by_side  # noqa: E402

from compressors import load_packed  # noqa: E402
from experiments import scores  # noqa: E402
from search import compose_config, run_sweep  # noqa: E402
from search.run.trial import trial_file  # noqa: E402

#: Fewer, shorter timing rounds than the small tasks': a MiniLM forward takes milliseconds.
TIMING = {"rounds": 5, "repeats": 10}

BATCHES = (1, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=12, help="trials in the sweep")
    parser.add_argument("--min-cosine", type=float, default=0.97, help="validation mean cosine")
    parser.add_argument("--cache-dir", default=".squeeze/cache", help="baseline cache")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        _bench(Path(tmp), args)


def _bench(workdir: Path, args: argparse.Namespace) -> None:
    cfg = compose_config(
        [
            "experiment=minilm",
            f"search.n_trials={args.trials}",
            f"search.storage={workdir}/optuna.journal",
            f"tracking.uri=sqlite:///{workdir}/mlflow.db",
            f"output_dir={workdir}/trials",
            f"cache_dir={args.cache_dir}",
        ]
    )
    start = time.perf_counter()
    result = run_sweep(cfg)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    counts = result.trials.state.value_counts().to_dict()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); sweep of "
        f"{len(result.trials)} trials ({counts.get('COMPLETE', 0)} complete): {seconds:.0f} s "
        f"({seconds / 60:.1f} min); peak RSS of this process {peak / 2**30:.2f} GiB"
    )
    base = result.baseline
    print(
        f"baseline: {base['size_bytes'] / 1e6:.2f} MB packed fp32, cosine {base['val_acc']:.4f}, "
        f"{base['flops'] / 1e6:.0f} MFLOPs/sentence"
    )

    task, base_model = shipped_baseline(cfg, workdir)
    trials = result.trials[result.trials.state == "COMPLETE"]
    good = trials[trials.val_acc >= args.min_cosine]
    if good.empty:
        print(f"no trial reached validation cosine {args.min_cosine}")
        return

    best = good.loc[good.compression_ratio.idxmax()]
    model = _load(cfg, task, best)
    test = scores(model, task.test, task.extra_scores)
    print(
        f"best ratio at val cosine >= {args.min_cosine}: {best.compression_ratio:.2f}x "
        f"({best.size_bytes / 1e6:.2f} MB; val cosine {best.val_acc:.4f}, retrieval "
        f"{best.val_retrieval:.3f}; test cosine {test['acc']:.4f}, retrieval "
        f"{test['retrieval']:.3f}) trial {best.trial}: {recipe_text(best)}"
    )
    for batch in BATCHES:
        speedup, base_ms, ms = side_by_side(base_model, model, task.example_inputs(batch), **TIMING)
        print(
            f"  latency b{batch}: {ms:.2f} ms vs baseline {base_ms:.2f} ms = {speedup:.2f}x "
            "(side by side)"
        )

    fastest = good.nsmallest(3, "latency_ms_b32")
    timed = []
    for _, row in fastest.iterrows():
        speedup, base_ms, ms = side_by_side(
            base_model, _load(cfg, task, row), task.example_inputs(32), **TIMING
        )
        timed.append((speedup, base_ms, ms, row))
    speedup, base_ms, ms, row = max(timed, key=lambda t: t[0])
    print(
        f"fastest at val cosine >= {args.min_cosine}, batch 32: {speedup:.2f}x ({ms:.2f} ms vs "
        f"{base_ms:.2f} ms; {row.compression_ratio:.2f}x smaller, val cosine {row.val_acc:.4f}) "
        f"trial {row.trial}: {recipe_text(row)}"
    )


def _load(cfg, task, row) -> torch.nn.Module:
    path = trial_file(Path(cfg.output_dir), str(cfg.search.study_name), int(row.trial))
    return load_packed(path, task.build_model())


if __name__ == "__main__":
    main()

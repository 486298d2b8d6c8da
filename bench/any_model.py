"""Every compressor on every model family of the zoo (tests/zoo/): the family x compressor matrix.

For each family (a task of ``tests/zoo_conf/task/``, its baseline trained and cached as a sweep
would) and each registered compressor, one fixed recipe runs through the trial's own code path
(`search.run.trial.compress_recipe`: compress, fine-tune, finalize), then the packed file is written
and reloaded. Printed per cell: the size ratio against the baseline's packed file, the change of
the validation score in points (negative: a loss), whether the reloaded model's outputs equal
the compressed model's (max abs diff <= 1e-5), and the fraction of the parameters the
compressor acts on; a compressor that cannot act on a family prints its refusal. Usage::

    python bench/any_model.py [--epochs 5] [--families resnet,lstm] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import optuna  # noqa: E402
import torch  # noqa: E402

from bench._common import quiet  # noqa: E402
from compressors import available, coverage, load_packed, save_packed  # noqa: E402
from experiments import evaluate  # noqa: E402
from search import ConfigError, compose_config  # noqa: E402
from search.run.trial import compress_recipe  # noqa: E402
from search.run.workload import load_workload  # noqa: E402

FAMILIES = ("resnet", "mobilenet", "transformer", "lstm", "gru", "tied", "minilm")
#: One fixed recipe per compressor (the default space's other entries stay unused).
SETTINGS = {
    "sparse": ["space.sparse.strength=1e-5", "space.sparse.epochs=2"],
    "structured": ["space.structured.amount=0.4"],
    "lowrank": ["space.lowrank.keep=0.4", "space.lowrank.rank_by=ratio"],
    "prune": ["space.prune.amount=0.7", "space.prune.scope=global"],
    "gradual": ["space.gradual.amount=0.7"],
    "quant": ["space.quant.bits=4"],
    "kd": ["space.kd.temperature=4.0", "space.kd.alpha=0.5"],
}


def cell(family: str, name: str, *, epochs: int, out: Path) -> dict:
    overrides = [
        f"task=zoo_{family}",
        f"space.pipeline=[{name}]",
        f"space.finetune.epochs={epochs}",
        "space.finetune.lr=1e-3",
        f"cache_dir={out / 'cache'}",
        *SETTINGS.get(name, []),
    ]
    cfg = compose_config(overrides, config_dirs=[str(ROOT / "tests" / "zoo_conf")])
    workload = load_workload(cfg, connect=False)
    plan, task, baseline = workload.plan, workload.task, workload.baseline
    try:
        plan.space.check_model(
            task.build_model(), task=task.name, example_inputs=task.example_inputs()
        )
    except ConfigError as err:
        return {"refused": str(err).split(": it ")[0]}
    recipe = plan.space.sample(optuna.trial.FixedTrial({}))
    model, _ = compress_recipe(
        recipe, plan.space, task, baseline, seed=cfg.seed, device=workload.device
    )
    base_size = save_packed(baseline.model, out / "base.sqz")
    size = save_packed(model, out / "model.sqz", like=baseline.model)
    shipped = load_packed(out / "model.sqz", task.build_model())
    x = task.val.x[:64]
    with torch.no_grad():
        diff = (shipped(x) - model.eval()(x)).abs().max().item()
    return {
        "ratio": base_size / size,
        "drop": 100 * (baseline.metrics["val_acc"] - evaluate(shipped, task.val)),
        "exact": diff <= 1e-5,
        "coverage": coverage(plan.space.build(recipe), baseline.model, task.example_inputs()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs per cell")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--out", type=Path, default=ROOT / ".squeeze" / "bench-any-model")
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    names = available()
    print(f"| family | {' | '.join(names)} |")
    print("| --- |" + " --- |" * len(names))
    for family in args.families.split(","):
        start, cells = time.perf_counter(), []
        for name in names:
            result = cell(family, name, epochs=args.epochs, out=args.out)
            if "refused" in result:
                cells.append("refused")
            else:
                exact = "exact" if result["exact"] else "NOT exact"
                cells.append(
                    f"{result['ratio']:.2f}x, Δval {-result['drop']:+.1f} pt, {exact}, "
                    f"cov {100 * result['coverage']:.0f}%"
                )
        seconds = time.perf_counter() - start
        print(f"| {family} ({seconds:.0f} s) | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()

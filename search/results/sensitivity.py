"""``squeeze sensitivity``: how much each layer of the baseline tolerates alone.

Every prunable layer of the trained baseline is pruned alone (magnitude, no fine-tuning) at
several amounts, and quantized alone at several bit-widths; the validation score is measured
each time. The result is a table, a plot of the score against amount / bits per layer, and a
suggested space (``conf/space/<task>_sensitivity.yaml``): one pruning range per layer, up to the
largest amount that layer tolerated within ``tolerance``, and a bit-width range starting at the
fewest bits every layer tolerated. Layers that tolerate more get searched over more. A drop
and the tolerance are in the unit of the task's score (`search.config.score`): points of a
higher-is-better score, percent of the baseline's value of a lower-is-better one (MSE).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

from compressors._targets import is_transposed_linear, weight_layers  # noqa: E402
from compressors.prune import Mask, smallest_mask  # noqa: E402
from compressors.quant import make_grid  # noqa: E402
from experiments import evaluate  # noqa: E402
from search.config.compose import COMPRESSORS_NODE, task_option, writable_config_dir  # noqa: E402
from search.config.score import Score  # noqa: E402
from search.run.workload import load_workload  # noqa: E402

AMOUNTS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
BITS = (2, 3, 4, 6, 8)


@dataclass(frozen=True)
class Sensitivity:
    """The measured table (``val_drop``: how much worse than the baseline, in ``score``'s unit),
    the plot and the suggested space."""

    table: pd.DataFrame
    plot: Path
    space: Path
    score: Score


def run_sensitivity(
    cfg: DictConfig,
    *,
    amounts: tuple[float, ...] = AMOUNTS,
    bits: tuple[int, ...] = BITS,
    tolerance: float = 1.0,
    conf_dir: Path | None = None,
    config_dirs: Sequence[str | Path] = (),
) -> Sensitivity:
    """Measure each layer's sensitivity for the task of ``cfg``; write plot and space (into
    ``<conf_dir>/space/``; by default ``./conf`` of the current directory). ``config_dirs``:
    the command's ``--config-dir`` folders (the space's header names the task's yaml)."""
    conf_dir = conf_dir if conf_dir is not None else writable_config_dir()
    workload = load_workload(cfg)
    task, baseline = workload.task, workload.baseline
    score = Score(higher_is_better=bool(task.higher_is_better))
    # One copy of the baseline, on the configured device: each layer is masked or snapped onto a
    # grid there, evaluated, and given its own weight back.
    model = copy.deepcopy(baseline.model).to(workload.device or "cpu")
    reference = evaluate(model, task.val)
    rows = []
    for layer_name, layer in weight_layers(model).items():
        for amount in amounts:
            keep = smallest_mask(layer.weight.detach().abs(), amount)
            value = _evaluate_with(model, layer, Mask(keep), task.val)
            rows.append(_row(layer_name, "prune", amount, value, score.drop(value, reference)))
        for b in bits:
            axis = 1 if is_transposed_linear(layer) else 0  # (as `quant` makes its grid)
            grid = make_grid(layer.weight, b, axis=axis)
            value = _evaluate_with(model, layer, grid, task.val)
            rows.append(_row(layer_name, "quant", b, value, score.drop(value, reference)))
    table = pd.DataFrame(rows)

    folder = Path(cfg.output_dir) / f"sensitivity-{task.name}"
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "sensitivity.csv", index=False)
    plot = folder / "sensitivity.png"
    _plot(table, reference, task.name, plot, score)
    option = task_option(cfg.task, config_dirs)
    space = _write_space(table, task.name, option, tolerance, amounts, bits, conf_dir, score)
    return Sensitivity(table, plot, space, score)


def _evaluate_with(model: nn.Module, layer: nn.Module, change: nn.Module, split) -> float:
    """The score of ``model`` with ``change`` (a parametrization) on ``layer``'s weight, which
    then gets its own weight back."""
    parametrize.register_parametrization(layer, "weight", change)
    try:
        return evaluate(model, split)
    finally:
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)


def _row(layer: str, method: str, setting: float, value: float, drop: float) -> dict:
    return {
        "layer": layer,
        "method": method,
        "setting": setting,
        "val_acc": value,
        "val_drop": drop,
    }


def _plot(table: pd.DataFrame, reference: float, task: str, path: Path, score: Score) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for ax, method, label in zip(
        axes, ("prune", "quant"), ("fraction pruned", "bits"), strict=True
    ):
        for layer, part in table[table.method == method].groupby("layer", sort=False):
            ax.plot(part.setting, part.val_acc, "o-", ms=3, label=layer)
        ax.axhline(reference, color="0.5", ls="--", lw=1, label="baseline")
        ax.set_xlabel(label)
        ax.set_ylabel(f"validation score ({score.better})")
        ax.set_title(f"{task}: each layer {'pruned' if method == 'prune' else 'quantized'} alone")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _write_space(
    table, task, option, tolerance, amounts, bits, conf_dir: Path, score: Score
) -> Path:
    ok = table[table.val_drop <= tolerance]
    prune = ok[ok.method == "prune"].groupby("layer", sort=False).setting.max()
    per_layer = {}
    for layer in table.layer.unique():
        tolerated = float(prune.get(layer, 0.0))
        upper = min(0.99, max(tolerated + 0.1, amounts[0]))
        per_layer[layer] = f"interval(0.0, {upper:.2f})"
    tolerated_bits = ok[ok.method == "quant"].groupby("layer").setting.min()
    fewest = int(tolerated_bits.max()) if len(tolerated_bits) == table.layer.nunique() else 8
    low = max(2, min(fewest, max(bits)) - 1)
    space = {
        "defaults": [COMPRESSORS_NODE, "_self_"],
        "name": f"{task}_sensitivity",
        "pipeline": ["prune", "quant", "kd"],
        "prune": {"amount": per_layer},
        "quant": {"bits": f"int(interval({low}, 8))"},
        "kd": {"temperature": "interval(1.0, 8.0)", "alpha": "interval(0.0, 1.0)"},
        "finetune": {"epochs": 15, "batch_size": 64, "lr": "tag(log, interval(3e-4, 1e-2))"},
    }
    path = conf_dir / "space" / f"{task}_sensitivity.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Written by `squeeze sensitivity task={option}`: each layer's pruning range reaches "
        f"0.1 past the\n# largest amount it tolerated alone {score.within(tolerance)} (no "
        "fine-tuning);\n# bits start one below the fewest that every layer "
        f"tolerated. Use it: squeeze sweep task={option} space={task}_sensitivity\n"
    )
    path.write_text(header + OmegaConf.to_yaml(OmegaConf.create(space)))
    return path

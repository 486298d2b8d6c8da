"""Analysis of a task's data and of a classifier's predictions, beyond top-1 accuracy.

- `classification_report`: top-1 and top-5 accuracy, per-class accuracy (recall), the confusion
  matrix, macro F1 and macro recall (scikit-learn's definitions);
- `class_balance`: samples per class in each split, and the imbalance (largest over smallest);
- `dataset_summary` and `model_summary`: what ``squeeze inspect`` prints.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import confusion_matrix, f1_score, recall_score
from torch import nn

from experiments._data import Data, cat_rows, describe
from experiments._objectives import IGNORE_INDEX, positions
from experiments._task import Task
from experiments._training import output_batches
from experiments.metrics import flops_per_sample, weight_tensors

#: Classes up to which a report holds the whole confusion matrix (and a column of accuracy per
#: class); above (a language model's vocabulary: 50,257 classes make a 2.5-billion-cell matrix),
#: its `MOST_CONFUSED` most frequent confusions.
WHOLE_CLASSES = 100
MOST_CONFUSED = 100


def classification_report(model: nn.Module, split: Any, num_classes: int) -> dict:
    """Metrics of ``model`` on ``split``, from one pass over it batch by batch (a batch's logits
    are dropped once read: a language model's whole split would take positions x vocabulary
    floats).

    Returns:
        ``top1``, ``top5`` (top-min(5, classes)), ``macro_f1``, ``macro_recall`` (floats, over
        the classes labelled or predicted), ``per_class_acc`` (list, one per class: the fraction
        of that class predicted right; NaN where none is labelled) and ``confusion``: up to
        `WHOLE_CLASSES` classes the whole matrix (list of rows: true class, columns: predicted
        class), above them the `MOST_CONFUSED` most frequent confusions, ``{"true": class,
        "predicted": class, "count": n}`` from the most frequent down.
    """
    k = min(5, num_classes - 1)
    labels, predicted, top_k = [], [], 0
    for outputs, targets in output_batches(model, split):
        logits, truth = positions(outputs, targets)  # one row per position
        kept = truth != IGNORE_INDEX
        logits, truth = logits[kept], truth[kept]
        labels.append(truth)
        predicted.append(logits.argmax(dim=1))
        top_k += int((logits.topk(k, dim=1).indices == truth[:, None]).any(dim=1).sum())
    labels, predicted = torch.cat(labels).numpy(), torch.cat(predicted).numpy()
    support = np.bincount(labels, minlength=num_classes)
    right = np.bincount(labels[predicted == labels], minlength=num_classes)
    per_class = np.divide(right, support, out=np.full(num_classes, np.nan), where=support > 0)
    # scikit-learn's default labels (those labelled or predicted); a class predicted but never
    # labelled has recall 0 rather than a warning
    macro = {"labels": np.union1d(labels, predicted), "average": "macro", "zero_division": 0}
    return {
        "top1": float((predicted == labels).mean()),
        f"top{k}": top_k / len(labels),
        "macro_f1": float(f1_score(labels, predicted, **macro)),
        "macro_recall": float(recall_score(labels, predicted, **macro)),
        "per_class_acc": per_class.tolist(),
        "confusion": _confusion(labels, predicted, num_classes),
    }


def _confusion(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> list:
    if num_classes <= WHOLE_CLASSES:
        return confusion_matrix(labels, predicted, labels=np.arange(num_classes)).tolist()
    return [
        {"true": true, "predicted": other, "count": count}
        for true, other, count in frequent_pairs(labels, predicted, num_classes)
    ]


def frequent_pairs(
    first: np.ndarray, second: np.ndarray, num_classes: int, limit: int = MOST_CONFUSED
) -> list[tuple[int, int, int]]:
    """The ``limit`` most frequent pairs ``(first[i], second[i])`` of classes that differ, with
    their counts, from the most frequent down (ties: the lower pair first), counted without a
    ``num_classes`` x ``num_classes`` matrix (a language model's 50,257 classes would need
    2.5 billion cells)."""
    first, second = np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64)
    differ = first != second
    pairs, counts = np.unique(first[differ] * num_classes + second[differ], return_counts=True)
    top = np.argsort(-counts, kind="stable")[:limit]
    return [
        (int(pairs[i] // num_classes), int(pairs[i] % num_classes), int(counts[i])) for i in top
    ]


def class_balance(task: Task) -> pd.DataFrame:
    """Samples per class (rows) in each split (columns), with each split's imbalance ratio; of
    a multi-label task (``outputs="multilabel"``), the samples with each label (its target
    ``> 0.5``)."""
    splits = (("train", task.train), ("val", task.val), ("test", task.test))
    if task.outputs == "multilabel":
        counts = {name: _label_counts(split, task.num_classes) for name, split in splits}
    else:
        counts = {
            name: np.bincount(_class_labels(split).numpy(), minlength=task.num_classes)
            for name, split in splits
        }
    frame = pd.DataFrame(counts)
    frame.index.name = "label" if task.outputs == "multilabel" else "class"
    ratios = {name: c.max() / max(c.min(), 1) for name, c in counts.items()}
    frame.loc["imbalance (max/min)"] = pd.Series(ratios)
    return frame


def _label_counts(split: Data, labels: int) -> np.ndarray:
    """Samples of a multi-label split with each label (target ``> 0.5``)."""
    targets = _labels(split).reshape(-1, labels)
    return (targets > 0.5).sum(dim=0).numpy()


def _class_labels(split: Data) -> torch.Tensor:
    """The class labels of a whole split, one per position for per-position targets, without
    the ignored ones (`IGNORE_INDEX`)."""
    labels = _labels(split).reshape(-1)
    return labels[labels != IGNORE_INDEX]


def _labels(split: Data) -> torch.Tensor:
    """The targets of a whole split (read batch by batch where it is not held in memory)."""
    if split.in_memory is not None:
        return split.y
    return cat_rows([b.targets for b in split.batches(1024)])


def dataset_summary(task: Task) -> pd.DataFrame:
    """Per split: samples, classes present, input shape, feature mean and standard deviation
    (for data read batch by batch: its samples, where known, and its first batch's structure)."""
    rows = []
    for name, split in (("train", task.train), ("val", task.val), ("test", task.test)):
        if split.in_memory is None:
            first = next(iter(split.batches(2)))
            rows.append(
                {
                    "split": name,
                    "samples": len(split) if split.sized() else "unknown",
                    "batch": describe(first.raw),
                }
            )
            continue
        x = split.x.float()
        rows.append(
            {
                "split": name,
                "samples": len(split),
                "classes": int(torch.unique(split.y).numel()),
                "input shape": tuple(x.shape[1:]),
                "feature mean": float(x.mean()),
                "feature std": float(x.std()),
            }
        )
    return pd.DataFrame(rows).set_index("split")


def model_summary(model: nn.Module, example: Any, samples: int = 1) -> pd.DataFrame:
    """One row per leaf module (with parameters or not), and a total: parameters, bytes, and
    FLOPs of one sample in a column of its own, on the total's row only (a tensor shared by
    several modules, such as a tied embedding, counts once in the total). ``example``: inputs
    holding ``samples`` samples (a task's `example_batch`)."""
    rows = []
    for name, module in model.named_modules():
        if any(True for _ in module.children()):
            continue
        tensors = weight_tensors(module)
        rows.append(
            {
                "layer": name,
                "type": type(module).__name__,
                "parameters": sum(t.numel() for t in tensors),
                "bytes": sum(t.numel() * t.element_size() for t in tensors),
            }
        )
    frame = pd.DataFrame(rows).assign(**{"FLOPs/sample": ""})
    unique = {id(t): t for t in weight_tensors(model)}.values()  # a tied tensor counts once
    total = {
        "layer": "total",
        "type": "",
        "parameters": sum(t.numel() for t in unique),
        "bytes": sum(t.numel() * t.element_size() for t in unique),
        "FLOPs/sample": str(round(flops_per_sample(model, example, samples))),
    }
    return pd.concat([frame, pd.DataFrame([total])], ignore_index=True)

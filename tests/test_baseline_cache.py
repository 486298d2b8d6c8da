"""The baseline cache keeps models with tied parameters (an embedding shared with the output
layer) and never leaves a temporary folder behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from sklearn.datasets import load_digits
from torch import nn

from experiments import load_or_train_baseline, predict_outputs
from experiments._task import Split, Task, TrainConfig

CONTEXT, TOKENS, WIDTH = 8, 17, 16  # digits pixels are intensities 0..16


class NextPixel(nn.Module):
    """Predicts a digit's next pixel intensity from the previous ``CONTEXT`` ones; the output
    layer's weight is the embedding's (tied, as in language models)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(TOKENS, WIDTH)
        self.mix = nn.Linear(CONTEXT * WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, TOKENS)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(x).flatten(1))))


class HalvesNextPixel(NextPixel):
    """Embedding and output weight are the two halves of one tensor (views, not tied):
    safetensors' ``save_model`` refuses this, ``save_file`` of each view does not."""

    def __init__(self) -> None:
        super().__init__()
        rows = torch.randn(2 * TOKENS, WIDTH) * 0.1
        self.emb.weight = nn.Parameter(rows[:TOKENS])
        self.head.weight = nn.Parameter(rows[TOKENS:])


class ShiftedNextPixel(NextPixel):
    """The output layer's weight is the embedding's shifted by one row: two different tensors
    that overlap in memory, which safetensors refuses to save."""

    def __init__(self) -> None:
        super().__init__()
        rows = torch.randn(TOKENS + 1, WIDTH) * 0.1
        self.emb.weight = nn.Parameter(rows[:TOKENS])
        self.head.weight = nn.Parameter(rows[1:])


def _next_pixel_task(build_model=NextPixel, *, images: int = 240) -> Task:
    """Windows of ``CONTEXT`` pixels of real digits images and the pixel after each window."""
    pixels = load_digits().data[:images].astype(np.int64)  # (images, 64), values 0..16
    x = np.stack([pixels[:, i - CONTEXT : i] for i in range(CONTEXT, 64)], axis=1)
    y = pixels[:, CONTEXT:]
    order = np.random.default_rng(0).permutation(images)  # split by image, not by window
    parts = np.split(order, [images * 6 // 10, images * 8 // 10])

    def split(idx: np.ndarray) -> Split:
        return Split(
            torch.as_tensor(x[idx].reshape(-1, CONTEXT)), torch.as_tensor(y[idx].reshape(-1))
        )

    return Task(
        name="digits_next_pixel",
        train=split(parts[0]),
        val=split(parts[1]),
        test=split(parts[2]),
        num_classes=TOKENS,
        build_model=build_model,
        train_config=TrainConfig(epochs=2, batch_size=256, lr=1e-2),
    )


def _leftovers(cache_dir) -> list[str]:
    return [p.name for p in cache_dir.iterdir() if ".tmp-" in p.name]


def test_a_tied_baseline_is_cached_and_loads_tied(tmp_path):
    task = _next_pixel_task()
    config = {"name": task.name, "epochs": 2}
    first = load_or_train_baseline(task, config=config, cache_dir=tmp_path, seed=0)
    assert not first.from_cache
    assert first.model.emb.weight is first.model.head.weight
    assert first.metrics["val_acc"] > 0.3  # well above chance (1/17): it learned something
    assert _leftovers(tmp_path) == []
    with safe_open(first.folder / "model.safetensors", "pt") as f:  # the tied weight once
        assert "emb.weight" in f.keys() and "head.weight" not in f.keys()

    again = load_or_train_baseline(task, config=config, cache_dir=tmp_path, seed=0)
    assert again.from_cache and again.key == first.key
    assert again.model.emb.weight is again.model.head.weight
    assert torch.equal(again.model.emb.weight, first.model.emb.weight)
    assert torch.equal(predict_outputs(again.model, task.train.x), again.teacher_outputs)
    with torch.no_grad():  # still one parameter: changing the embedding changes the output layer
        again.model.emb.weight[0, 0] += 1.0
    assert torch.equal(again.model.head.weight, again.model.emb.weight)
    assert _leftovers(tmp_path) == []


def test_parameters_that_are_views_of_one_tensor_are_cached(tmp_path):
    task = _next_pixel_task(HalvesNextPixel, images=60)
    first = load_or_train_baseline(task, config={"name": "halves"}, cache_dir=tmp_path, seed=0)
    again = load_or_train_baseline(task, config={"name": "halves"}, cache_dir=tmp_path, seed=0)
    assert again.from_cache and torch.equal(again.model.head.weight, first.model.head.weight)
    assert not torch.equal(again.model.head.weight, again.model.emb.weight)
    assert _leftovers(tmp_path) == []


def test_a_failed_save_leaves_no_temporary_folder(tmp_path):
    task = _next_pixel_task(ShiftedNextPixel, images=60)
    with pytest.raises(RuntimeError, match="share memory"):
        load_or_train_baseline(task, config={"name": "shifted"}, cache_dir=tmp_path, seed=0)
    assert list(tmp_path.iterdir()) == []  # neither a cache folder nor a .tmp-<pid> one


def test_teacher_outputs_too_large_to_cache_are_left_to_distillation_per_batch(
    tmp_path, monkeypatch
):
    """Outputs over `TEACHER_CACHE_BYTES` (a language model's per-token logits) are neither
    cached nor held: no file, None, and distillation runs the baseline on each batch."""
    from compressors import CompressionContext, get_compressor
    from experiments import _baseline as baseline_module
    from experiments import fit

    task = _next_pixel_task()
    per_sample = TOKENS * 4  # bytes of one sample's logits
    monkeypatch.setattr(baseline_module, "TEACHER_CACHE_BYTES", per_sample * len(task.train) - 1)
    config = {"name": task.name, "epochs": 1}
    baseline = load_or_train_baseline(task, config=config, cache_dir=tmp_path, seed=0)
    assert baseline.teacher_outputs is None
    assert not (baseline.folder / "teacher_outputs.safetensors").exists()
    again = load_or_train_baseline(task, config=config, cache_dir=tmp_path, seed=0)
    assert again.from_cache and again.teacher_outputs is None

    kd = get_compressor("kd")(alpha=1.0)
    student = _next_pixel_task().build_model()
    ctx = CompressionContext(teacher=baseline.model, example_inputs=task.train.x[:4])
    seen = []
    hook = baseline.model.register_forward_hook(lambda *args: seen.append(1))
    fit(
        student,
        task.train,
        epochs=1,
        batch_size=256,
        loss_fn=kd.finetune_loss(ctx),
        lr=1e-3,
        teacher=baseline.model,
    )
    hook.remove()
    assert len(seen) == -(-len(task.train) // 256)  # the teacher ran on every batch

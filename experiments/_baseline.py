"""The trained (or pretrained), uncompressed baseline and its teacher outputs, cached on disk per
task config."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from experiments._checkpoint import checkpoint_digest, load_checkpoint
from experiments._task import Task
from experiments._training import evaluate, fit, seed_everything

logger = logging.getLogger(__name__)

#: Bump when training code changes in a way that invalidates cached baselines, or the layout of
#: the cached files changes. ``model.safetensors`` holds the model's state, each tied tensor (an
#: embedding that is also the output layer's weight) once, under its first name; its metadata
#: maps the other names to it (the task's builder ties them again).
CACHE_VERSION = 1
_TIED = "squeeze.tied"  # metadata key of model.safetensors: {left-out name: name it is tied to}
#: The SHA-256 of each cached weights file, written beside them and checked on every load.
CHECKSUMS = "checksums.json"
_WEIGHTS = ("model.safetensors", "teacher_outputs.safetensors", "teacher_logits.safetensors")
#: The most bytes of teacher outputs cached (on disk and in each trial's memory); larger ones,
#: say a language model's (samples, tokens, vocabulary) logits, are not cached.
TEACHER_CACHE_BYTES = 1 << 30


class BaselineCacheError(RuntimeError):
    """A cached baseline cannot be used as it is (a changed byte, a cut file, bad JSON): the
    message names the folder to delete, after which the baseline is trained again.

    A damaged cache is refused rather than rebuilt on the spot: the trials of a study already
    run were measured against it, other workers may be reading it, and a disk that changed a
    byte deserves a person's look; deleting one folder is all it takes to go on."""


@dataclass(frozen=True)
class Baseline:
    """A trained baseline.

    Attributes:
        model: The trained, uncompressed model (treat as read-only; trials copy it).
        teacher_outputs: Its outputs on the training split (logits, or embeddings for an
            embedding task), cached for distillation where the training data is held in memory
            (its batches are the same every time) and they take at most `TEACHER_CACHE_BYTES`;
            None where it is read batch by batch (a dataset may augment at random) or they
            would take more (a language model's per-token logits): the teacher then runs on
            each batch.
        metrics: ``val_acc``, ``test_acc``, ``params`` and ``train_seconds``.
        key: Hash of the task config the baseline was trained for.
        folder: The cache folder holding it (other derived files may be kept there too).
        from_cache: Whether it was loaded rather than trained now.
    """

    model: nn.Module
    teacher_outputs: torch.Tensor | None
    metrics: dict[str, float]
    key: str
    folder: Path
    from_cache: bool


@dataclass(frozen=True)
class FreshModel:
    """A task's model as built right after ``torch.manual_seed(seed)``, with torch's CPU random
    state right after building it: `load_or_train_baseline` trains it exactly as it trains a
    model it builds itself, so a sweep that built one to check its workload does not build
    another (`build_fresh`).

    Attributes:
        model: The untrained model (checks may have run it, without changing its state).
        seed: The seed it was built with.
        rng_state: ``torch.get_rng_state()`` right after it was built.
    """

    model: nn.Module
    seed: int
    rng_state: torch.Tensor


def build_fresh(task: Task, seed: int) -> FreshModel:
    """``task``'s model built right after ``torch.manual_seed(seed)`` (`FreshModel`)."""
    torch.manual_seed(seed)
    model = task.build_model()
    return FreshModel(model, seed, torch.get_rng_state())


def config_key(config: Mapping[str, Any]) -> str:
    """Stable hash of a task config (plain, JSON-serialisable values)."""
    payload = json.dumps({"config": config, "version": CACHE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_or_train_baseline(
    task: Task,
    *,
    config: Mapping[str, Any],
    cache_dir: str | os.PathLike,
    seed: int,
    device: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    checkpoint: str | os.PathLike | None = None,
    fresh: FreshModel | None = None,
) -> Baseline:
    """Load the baseline trained for ``config`` and ``seed``, training and caching it if absent;
    or, given a pretrained ``checkpoint`` (or the task's own), load, evaluate and cache it
    without training.

    Args:
        task: The built task.
        config: The task's config; any change to it trains a new baseline.
        cache_dir: Root folder of the cache.
        seed: Seed of the initialisation and of the mini-batch order.
        device: Where to train it if absent (``cuda``); the returned model is on the CPU.
        progress: Called as ``progress(stage, done, total)`` while a baseline is made:
            ``("baseline epochs", k, epochs)`` after each training epoch, then
            ``("teacher outputs", k, batches)`` after each batch of the teacher's outputs.
        checkpoint: A safetensors file, a ``weights_only`` state dict or a Hugging Face model
            folder (`experiments._checkpoint`); its weights' hash is part of the cache key.
        fresh: The task's model built with ``seed`` already (`build_fresh`): trained (or given
            the cached weights) instead of building another. It becomes the baseline's model
            where the baseline is cached; a trained one is reloaded from the cache, so that a
            sweep behaves the same whether it trained its baseline or reused it.
    """
    if fresh is not None and fresh.seed != seed:
        fresh = None  # built for another seed: its weights are not this baseline's start
    checkpoint = checkpoint if checkpoint is not None else task.checkpoint
    described = {"task": dict(config), "seed": seed}
    if checkpoint is not None:
        described["checkpoint"] = checkpoint_digest(checkpoint)
    key = config_key(described)
    folder = Path(cache_dir) / f"{task.name}-{key}"
    if (folder / "metrics.json").exists():
        logger.info(
            "reusing cached baseline %s", folder, extra={"once": True}
        )  # (each worker says it too)
        return _load(task, folder, key, from_cache=True, model=fresh and fresh.model)

    start = time.perf_counter()
    seed_everything(seed)  # (torch's CUDA generators, numpy's and Python's `random` too)
    task.rewind()  # (a DataLoader's own generators and kept workers: as in a rerun)
    if fresh is None:
        model = task.build_model()
    else:  # as if built here: the random stream continues from where building left it
        model = fresh.model
        torch.set_rng_state(fresh.rng_state)
    cfg = task.train_config
    if checkpoint is not None:
        logger.info(
            "baseline of %s: the pretrained checkpoint %s, evaluated, not trained",
            task.name,
            checkpoint,
        )
        load_checkpoint(model, checkpoint)
    else:
        logger.info("training baseline for %s (seed %d)", task.name, seed)
    fit(
        model,
        task.train,
        epochs=0 if checkpoint is not None else cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        loss_fn=task.loss,
        seed=seed,
        **task.training(),
        after_epoch=(
            None
            if progress is None
            else lambda stats: progress("baseline epochs", stats.epoch + 1, cfg.epochs)
        ),
        device=device,
    )
    teacher = _teacher_outputs(model, task, progress) if task.train.deterministic else None
    metrics = {
        "val_acc": evaluate(model, task.val),
        "test_acc": evaluate(model, task.test),
        "params": float(sum(p.numel() for p in model.parameters())),
        "train_seconds": time.perf_counter() - start,
    }
    _write_atomically(folder, model, teacher, metrics, config)
    # Return what the cache holds, not the trained object (which still carries the optimizer's
    # last gradients): a sweep behaves the same whether it trained its baseline or reused it.
    return _load(task, folder, key, from_cache=False)


@torch.no_grad()
def _teacher_outputs(
    model: nn.Module,
    task: Task,
    progress: Callable[[str, int, int], None] | None,
    *,
    batch_size: int = 1024,
) -> torch.Tensor | None:
    """The model's outputs on the (in-memory) training split, batch by batch, reporting
    progress; None (not cached) where they would take more than `TEACHER_CACHE_BYTES`,
    predicted from the first batch."""
    model.eval()
    total = -(-len(task.train) // batch_size)
    outputs = []
    for k, batch in enumerate(task.train.batches(batch_size), 1):
        out = task.train.forward(model, batch.inputs).cpu()
        if k == 1:
            size = out.element_size() * out.numel() // max(len(out), 1) * len(task.train)
            if size > TEACHER_CACHE_BYTES:
                logger.info(
                    "teacher outputs not cached: %s per sample, %.1f GB for the training split "
                    "(more than %.1f GB); distillation runs the baseline on each batch",
                    tuple(out.shape[1:]),
                    size / 1e9,
                    TEACHER_CACHE_BYTES / 1e9,
                )
                return None
        outputs.append(out)
        if progress is not None:
            progress("teacher outputs", k, total)
    return torch.cat(outputs)


def _load(
    task: Task, folder: Path, key: str, *, from_cache: bool, model: nn.Module | None = None
) -> Baseline:
    """The cached baseline in ``folder``, its files checked against their checksums first.

    Raises:
        BaselineCacheError: If a file is damaged or missing, naming the folder to delete.
    """
    model = task.build_model() if model is None else model
    try:
        _verify(folder)
        return _load_checked(task, folder, key, from_cache=from_cache, model=model)
    except BaselineCacheError:
        raise
    except Exception as err:  # noqa: BLE001 (safetensors, json and torch each raise their own)
        raise _damaged(folder, f"{type(err).__name__}: {err}") from None


def _damaged(folder: Path, what: str) -> BaselineCacheError:
    return BaselineCacheError(
        f"The cached baseline {folder} is damaged ({what}). Delete the folder to train the "
        f"baseline again: rm -r '{folder}'"
    )


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_checksums(folder: Path) -> None:
    sums = {name: _digest(folder / name) for name in _WEIGHTS if (folder / name).exists()}
    tmp = folder / f"{CHECKSUMS}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(sums, indent=2))
    tmp.replace(folder / CHECKSUMS)


def _verify(folder: Path) -> None:
    """Check the weights files against ``checksums.json``; a cache written before checksums
    were kept gets its checksums now (they guard it from here on)."""
    path = folder / CHECKSUMS
    if not path.exists():
        logger.info("recording the checksums of the cached baseline %s", folder)
        _write_checksums(folder)
        return
    try:
        sums = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise _damaged(folder, f"{CHECKSUMS} is unreadable: {err}") from None
    if not isinstance(sums, dict) or "model.safetensors" not in sums:
        raise _damaged(folder, f"{CHECKSUMS} lists no model.safetensors")
    for name, expected in sums.items():
        if name not in _WEIGHTS:
            raise _damaged(folder, f"{CHECKSUMS} lists an unknown file {name!r}")
        if not (folder / name).exists():
            raise _damaged(folder, f"{name} is missing")
        if _digest(folder / name) != expected:
            raise _damaged(folder, f"{name} does not match its SHA-256 in {CHECKSUMS}")


def _load_checked(
    task: Task, folder: Path, key: str, *, from_cache: bool, model: nn.Module
) -> Baseline:
    _load_state(model, folder / "model.safetensors")
    model.eval()
    teacher_file = folder / "teacher_outputs.safetensors"
    if not teacher_file.exists():  # cached before the file was renamed
        teacher_file = folder / "teacher_logits.safetensors"
    teacher = load_file(teacher_file)["train"] if teacher_file.exists() else None
    metrics = json.loads((folder / "metrics.json").read_text())
    if not isinstance(metrics, dict) or not all(
        isinstance(v, int | float) for v in metrics.values()
    ):
        raise _damaged(folder, "metrics.json does not hold numbers by name")
    return Baseline(model, teacher, metrics, key, folder, from_cache=from_cache)


def _write_atomically(
    folder: Path,
    model: nn.Module,
    teacher: torch.Tensor | None,
    metrics: dict[str, float],
    config: Mapping[str, Any],
) -> None:
    """Write the cache folder under a temporary name, then rename it into place; the temporary
    folder is removed whatever happens (an error, or another worker renaming first)."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        _write_files(tmp, model, teacher, metrics, config)
        try:
            tmp.rename(folder)
        except OSError:  # another worker cached the same baseline first; theirs is as good
            if not (folder / "metrics.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_files(
    tmp: Path,
    model: nn.Module,
    teacher: torch.Tensor | None,
    metrics: dict[str, float],
    config: Mapping[str, Any],
) -> None:
    _save_state(model, tmp / "model.safetensors")
    if teacher is not None:
        save_file({"train": teacher.contiguous()}, tmp / "teacher_outputs.safetensors")
    _write_checksums(tmp)
    (tmp / "config.json").write_text(json.dumps(dict(config), indent=2, default=str))
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))


def _save_state(model: nn.Module, path: Path) -> None:
    """Save ``model``'s state with safetensors, each tied tensor once (safetensors refuses
    tensors that share memory); the metadata maps each left-out name to the name it is tied to.
    """
    state = model.state_dict()
    first: dict[tuple[Any, ...], str] = {}
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    for name, tensor in state.items():
        where = (tensor.device, tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.stride())
        if tensor.numel() and where in first:
            tied[name] = first[where]
        else:
            first.setdefault(where, name)
            tensors[name] = tensor.contiguous()
    save_file(tensors, path, metadata={_TIED: json.dumps(tied)} if tied else None)


def _load_state(model: nn.Module, path: Path) -> None:
    """Load a state `_save_state` wrote into ``model``, whose own builder tied what was tied.

    Raises:
        RuntimeError: If names are missing or unexpected, or ``model`` does not tie a name
            the file left out to the name it was tied to.
    """
    with safe_open(path, "pt") as f:
        tied = json.loads((f.metadata() or {}).get(_TIED, "{}"))
    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    state = model.state_dict()
    untied = [
        name
        for name in missing
        if name not in tied or state[name].data_ptr() != state[tied[name]].data_ptr()
    ]
    if untied or unexpected:
        raise RuntimeError(
            f"The cached baseline {path} does not fit the task's model: missing {untied}, "
            f"unexpected {unexpected}. Delete the folder to train the baseline again."
        )

"""Workloads as users bring them: torch datasets and loaders with augmentation, iterable data,
dict batches into a transformers model returning a ModelOutput, a language model deciding per
token, two inputs, regression; metrics
accumulated over batches; the teacher on the very batch trained on; bad workloads refused."""

from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compressors import (
    CompressionContext,
    apply_pipeline,
    finalize_pipeline,
    get_compressor,
    load_packed,
    save_packed,
)
from experiments import (
    LOSSES,
    PositionsMismatch,
    Task,
    TrainConfig,
    WorkloadError,
    accuracy,
    as_data,
    ce_loss,
    check_workload,
    evaluate,
    fit,
    predict_outputs,
    scores,
)
from search.cli import main
from tests.conftest import sweep_overrides
from tests.zoo import workloads

pytestmark = pytest.mark.usefixtures("one_thread")

ZOO_CONF = Path(__file__).parent / "zoo_conf"
#: Workloads whose `allocate` cell is slow (its sensitivity table on a transformers model,
#: or per pixel).
SLOW_ALLOCATE = ("wl_dict_bert", "wl_tokens", "wl_segmentation")
#: Workloads whose two-trial sweep runs in the slow lane only (their contract's unit tests
#: run in the fast one).
SLOW_SWEEP = ("wl_segmentation",)
#: Baseline epochs of each workload's two-trial sweep (3 where not listed).
SWEEP_EPOCHS = {"wl_regression": 10, "wl_dict_bert": 6, "wl_tokens": 6}
#: Every compressor, with settings that act on small models.
METHODS = {
    "structured": {"amount": 0.3},
    "prune": {"amount": 0.5},
    "gradual": {"amount": 0.5},
    "sparse": {"strength": 1e-4, "epochs": 1},
    "quant": {"bits": 4},
    "cluster": {"bits": 3},
    "lowrank": {"keep": 0.5},
    "allocate": {"ratio": 4.0},
    "kd": {},
}
WORKLOADS = [
    "wl_loader",
    "wl_iterable",
    "wl_two_inputs",
    "wl_dict_bert",
    "wl_tokens",
    "wl_regression",
    "wl_multilabel",
    "wl_segmentation",
]


def _task(name: str, **kwargs) -> Task:
    return getattr(workloads, name)(train={"epochs": 2, **kwargs})


@pytest.fixture(scope="module")
def trained():
    """Each workload's model, briefly trained (the contract, not the accuracy, is tested)."""
    made = {}

    def get(name: str):
        if name not in made:
            task = _task(name)
            torch.manual_seed(0)
            model = task.build_model()
            cfg = task.train_config
            fit(
                model, task.train, epochs=2, batch_size=cfg.batch_size, lr=cfg.lr, loss_fn=task.loss
            )
            made[name] = task, model
        return made[name]

    return get


@pytest.mark.parametrize(
    ("method", "name"),  # (allocate on the transformers models, a minute or two: the full run's)
    [
        pytest.param(
            m,
            n,
            marks=[pytest.mark.slow] if m == "allocate" and n in SLOW_ALLOCATE else [],
        )
        for m in sorted(METHODS)
        for n in WORKLOADS
    ],
)
def test_every_compressor_on_every_workload(name, method, trained, tmp_path):
    """Each compressor compresses, fine-tunes (through the task's batches, with the teacher on
    the same batch), packs and reloads with the same outputs and score, on each workload."""
    task, baseline = trained(name)
    params = METHODS[method]
    compressor = get_compressor(method)(**params)
    example = task.example_inputs(4)
    compressor.check_model(baseline, example)
    ctx = CompressionContext(
        train=task.train,
        teacher=baseline,
        example_inputs=example,
        seed=0,
        loss=task.loss,
        losses=LOSSES,
        outputs=task.outputs,
        fit=functools.partial(fit, train=task.train, seed=0),
        cache_dir=tmp_path,
    )
    model = apply_pipeline([compressor], copy.deepcopy(baseline), ctx)
    cfg = task.train_config
    fit(
        model,
        task.train,
        epochs=1,
        batch_size=cfg.batch_size,
        lr=1e-4,
        loss_fn=compressor.finetune_loss(ctx) or task.loss,
        teacher=baseline,
        before_epoch=lambda epoch, epochs: compressor.on_epoch(model, epoch, epochs),
    )
    model = finalize_pipeline([compressor], model, ctx).eval()
    save_packed(model, tmp_path / "m.sqz", like=baseline)
    reloaded = load_packed(tmp_path / "m.sqz", task.build_model())
    expected, got = predict_outputs(model, task.val), predict_outputs(reloaded, task.val)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5
    assert evaluate(reloaded, task.val) == pytest.approx(evaluate(model, task.val), abs=1e-6)


def test_a_torchmetrics_macro_f1_equals_sklearns_on_the_whole_split(trained):
    from torchmetrics.classification import MulticlassF1Score

    task, model = trained("wl_loader")
    metric = MulticlassF1Score(num_classes=10, average="macro")
    logits = predict_outputs(model, task.val)
    labels = torch.cat([b.targets for b in task.val.batches(64)])
    expected = f1_score(labels.numpy(), logits.argmax(1).numpy(), average="macro")
    data = as_data(task.val, score=metric)
    for batch_size in (7, 64, 1000):  # accumulated, not a mean of per-batch scores
        assert evaluate(model, data, batch_size=batch_size) == pytest.approx(expected, abs=1e-6)
    # a plain function gets the whole split too: the same value at any batch size
    f1 = lambda out, y: f1_score(y.numpy(), out.argmax(1).numpy(), average="macro")  # noqa: E731
    plain = as_data(task.val, score=f1)
    assert evaluate(model, plain, batch_size=7) == pytest.approx(expected, abs=1e-9)
    per_batch = np.mean(
        [f1(predict_outputs(model, b.inputs), b.targets) for b in task.val.batches(7)]
    )
    assert per_batch != pytest.approx(expected, abs=1e-3)  # what squeeze must not report


def test_a_task_takes_the_direction_of_its_torchmetrics_metric():
    from torchmetrics.regression import MeanSquaredError

    base = workloads.wl_regression()
    task = dataclasses.replace(base, metric=MeanSquaredError(), higher_is_better=None)
    assert task.higher_is_better is False
    assert base.higher_is_better is True  # R² by default


def test_distillation_under_augmentation_sees_the_teachers_outputs_on_the_same_batch():
    """The teacher runs on the very (randomly augmented) batch the student trains on."""
    task = workloads.wl_loader()
    assert task.train.deterministic is False  # nothing can be cached for it
    teacher = nn.Sequential(nn.Identity())
    teacher.register_buffer("anchor", torch.zeros(1))  # a device to run on
    student = nn.Linear(64, 64)
    seen = []

    def loss(out, _labels, soft):
        seen.append(soft)
        return out.sum() * 0.0

    student.weight.data.copy_(torch.eye(64))
    student.bias.data.zero_()
    fit(student, task.train, epochs=2, batch_size=32, lr=0.0, loss_fn=loss, teacher=teacher)
    assert len(seen) == 2 * -(-1077 // 32)  # every batch of two epochs of 1,077 images
    # the identity student and teacher see the same augmented pixels: the same outputs
    student_outputs = []
    fit(
        student,
        task.train,
        epochs=1,
        batch_size=32,
        lr=0.0,
        loss_fn=lambda out, _y, soft: (student_outputs.append((out.detach(), soft)), out.sum() * 0)[
            1
        ],
        teacher=teacher,
    )
    assert all(torch.equal(out, soft) for out, soft in student_outputs)
    # and the batches are augmented: two epochs' first batches differ
    assert not torch.equal(seen[0], seen[len(seen) // 2])


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_SWEEP else []) for n in WORKLOADS],
)
def test_a_two_trial_sweep_runs_on_each_workload(name, tmp_path, cache_dir):
    overrides = sweep_overrides(tmp_path, cache_dir, "search.n_trials=2", space=None)
    code = main(
        [
            "sweep",
            "--quiet",
            "--config-dir",
            str(ZOO_CONF),
            f"task={name}",
            f"task.train.epochs={SWEEP_EPOCHS.get(name, 3)}",
            *overrides,
        ]
    )
    assert code == 0
    study = optuna.load_study(
        study_name=name,
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(f"{tmp_path}/optuna.journal")
        ),
    )
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    metrics = trials[0].user_attrs["metrics"]
    assert metrics["size_bytes"] > 0 and np.isfinite(metrics["val_acc"])
    if name == "wl_regression":
        assert "val_agreement" not in metrics  # a regression has no decisions to agree on
    else:
        assert 0.0 <= metrics["val_agreement"] <= 1.0


# ----------------------------------------------------------------------------- refusals


def _tiny(**kwargs) -> Task:
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    data = TensorDataset(x, y)
    defaults = dict(
        name="tiny",
        train=data,
        val=data,
        test=data,
        num_classes=3,
        build_model=lambda: nn.Linear(6, 3),
        train_config=TrainConfig(epochs=1),
    )
    return Task(**{**defaults, **kwargs})


class TwoArgs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 3)

    def forward(self, x, mask):
        return self.a(x) * mask


class Words(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 3)

    def forward(self, x):
        return {"note": "no tensor here"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"build_model": TwoArgs},
            r"the model cannot take a batch: model\(inputs\) with inputs "
            r"float32\[4, 6\].*missing 1 required positional argument",
        ),
        ({"build_model": Words}, r"output dict\(note: str\) has no float tensor to score"),
        (
            {"build_model": lambda: nn.Linear(6, 12)},
            r"outputs float32\[4, 12\] but the task has num_classes=3",
        ),
        ({"targets": lambda batch: None}, r"has no targets"),
        ({"loss": lambda out, y, t: out.sum() + y}, r"the loss <lambda> failed"),
    ],
)
def test_a_workload_that_cannot_work_is_refused_naming_what_was_tried(kwargs, message):
    task = _tiny(**kwargs)
    with pytest.raises(WorkloadError, match=message):
        check_workload(task, task.build_model())


def test_a_metric_with_no_direction_is_refused():
    with pytest.raises(WorkloadError, match="has no direction: set Task.higher_is_better"):
        _tiny(metric=lambda out, y: 0.5)
    assert _tiny(metric=lambda out, y: 0.5, higher_is_better=True).higher_is_better


def test_bad_workloads_exit_2_before_any_training(tmp_path, cache_dir, capsys, monkeypatch):
    user = tmp_path / "user"
    (user / "conf" / "task").mkdir(parents=True)
    (user / "bad_task.py").write_text(
        "import torch\nfrom torch import nn\nfrom torch.utils.data import TensorDataset\n"
        "from experiments import Task, TrainConfig\n"
        "def bad(*, name='bad', seed=0, wide=12, metric=False):\n"
        "    data = TensorDataset(torch.randn(40, 6), torch.randint(0, 3, (40,)))\n"
        "    extra = {'metric': (lambda o, y: 0.0)} if metric else {}\n"
        "    return Task(name=name, train=data, val=data, test=data, num_classes=3,\n"
        "                build_model=lambda: nn.Linear(6, wide),\n"
        "                train_config=TrainConfig(epochs=1), **extra)\n"
    )
    (user / "conf" / "task" / "bad.yaml").write_text(
        "_target_: bad_task.bad\nname: bad\nwide: 12\nmetric: false\n"
    )
    monkeypatch.syspath_prepend(str(user))
    for extra, message in (
        ([], "outputs float32[4, 12] but the task has num_classes=3"),
        (["task.wide=3", "task.metric=true"], "has no direction"),
    ):
        overrides = sweep_overrides(tmp_path, cache_dir, "search.n_trials=1", *extra)
        assert (
            main(["sweep", "--quiet", "--config-dir", str(user / "conf"), "task=bad", *overrides])
            == 2
        )
        assert message in capsys.readouterr().err
        assert not (tmp_path / "optuna.journal").exists()  # nothing created
        assert not any(Path(cache_dir).glob("bad-*"))  # no baseline trained


def test_k_fold_needs_data_held_in_memory(tmp_path, cache_dir, capsys):
    overrides = sweep_overrides(tmp_path, cache_dir, "search.n_trials=1", "search.cv_folds=3")
    code = main(["sweep", "--quiet", "--config-dir", str(ZOO_CONF), "task=wl_iterable", *overrides])
    assert code == 2
    assert "search.cv_folds needs task 'wl_iterable'" in capsys.readouterr().err


def test_scores_of_an_in_memory_split_are_unchanged(digits_task, digits_baseline):
    """The in-memory Split goes through the same path and gives what it gave before."""
    x, y = digits_task.val.x, digits_task.val.y
    with torch.no_grad():
        expected = (digits_baseline.model(x).argmax(1) == y).float().mean().item()
    assert evaluate(digits_baseline.model, digits_task.val) == expected
    assert scores(digits_baseline.model, digits_task.val)["acc"] == expected
    loader = DataLoader(TensorDataset(x, y), batch_size=50)
    assert evaluate(digits_baseline.model, loader) == pytest.approx(expected)


def test_a_users_training_step_runs_and_the_compressors_hooks_still_apply(trained):
    """The user's step (gradient clipping, AdamW) trains with squeeze's loss: a pruned
    weight stays zero (its mask), and a distillation recipe's loss is what the step gets."""
    task, baseline = trained("wl_loader")
    calls = []

    def step(model, batch, loss, optimizer):
        value = loss()
        optimizer.zero_grad()
        value.backward()
        calls.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5))
        optimizer.step()
        return value

    user = dataclasses.replace(task, train_step=step, optimizer=torch.optim.AdamW)
    prune, kd = get_compressor("prune")(amount=0.6), get_compressor("kd")(alpha=1.0)
    ctx = CompressionContext(train=user.train, teacher=baseline, loss=user.loss, seed=0)
    model = apply_pipeline([prune, kd], copy.deepcopy(baseline), ctx)
    zero = model.body[0].weight.detach() == 0
    seen = []

    def recorded(out, targets, soft):
        seen.append(soft is not None)
        return kd.finetune_loss(ctx)(out, targets, soft)

    fit(
        model,
        user.train,
        epochs=1,
        batch_size=64,
        lr=1e-2,
        loss_fn=recorded,
        teacher=baseline,
        **user.training(),
    )
    assert len(calls) == len(seen) > 0 and all(seen)  # every batch: the teacher's outputs
    assert bool((model.body[0].weight.detach()[zero] == 0).all())  # the mask held
    assert not torch.equal(model.head.weight, baseline.head.weight)  # and it trained


def test_a_hugging_face_dataset_is_read_as_a_map_style_dataset():
    from datasets import Dataset as HFDataset

    rows = {"x": torch.randn(30, 4).tolist(), "label": [i % 3 for i in range(30)]}
    data = HFDataset.from_dict(rows).with_format("torch")
    task = _tiny(
        train=data,
        val=data,
        test=data,
        inputs=lambda batch: batch["x"],
        build_model=lambda: nn.Linear(4, 3),
    )
    check_workload(task, task.build_model())
    assert len(task.train) == 30 and task.example_inputs(5).shape == (5, 4)
    batches = list(task.val.batches(8))
    assert [b.rows for b in batches] == [8, 8, 8, 6]
    assert torch.equal(torch.cat([b.targets for b in batches]), torch.tensor(rows["label"]))


# ----------------------------------------------------------------------------- per position


def test_per_position_logits_are_scored_per_position_leaving_out_ignored_labels():
    """(batch, tokens, classes) logits: the default loss, accuracy, agreement and distillation
    loss equal the (batch * tokens, classes) ones, labels -100 left out of loss and accuracy."""
    from compressors._base import cross_entropy
    from compressors.kd import kl_loss
    from experiments import accuracy, ce_loss, prediction_agreement

    torch.manual_seed(0)
    logits, other = torch.randn(4, 5, 7), torch.randn(4, 5, 7)
    labels = torch.randint(0, 7, (4, 5))
    labels[:, -1] = -100
    kept = labels.reshape(-1) != -100
    rows, flat = logits.reshape(-1, 7)[kept], labels.reshape(-1)[kept]
    expected = torch.nn.functional.cross_entropy(rows, flat)
    assert ce_loss(logits, labels, None) == pytest.approx(expected.item(), rel=1e-6)
    assert cross_entropy(logits, labels, None) == pytest.approx(expected.item(), rel=1e-6)
    assert accuracy(logits, labels) == pytest.approx((rows.argmax(1) == flat).float().mean())
    right = torch.where(labels == -100, labels, logits.argmax(-1))  # ignored ones wrong
    assert accuracy(logits, right) == 1.0 and accuracy(other, right) < 1.0
    same = (logits.argmax(-1) == other.argmax(-1)).float().mean().item()
    assert prediction_agreement(other, logits) == pytest.approx(same)
    assert prediction_agreement(logits, logits) == 1.0
    two_d = kl_loss(other.reshape(-1, 7), logits.reshape(-1, 7), temperature=2.0)
    assert kl_loss(other, logits, temperature=2.0) == pytest.approx(two_d.item(), rel=1e-6)


def test_per_position_logits_need_the_class_axis_last_or_class_axis():
    """(batch, classes, tokens) logits are refused, naming Task(class_axis=1); with it they
    are accepted, as (batch, tokens, classes) are without it."""
    task = workloads.wl_tokens()

    class ClassesFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = task.build_model()

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids).logits.transpose(1, 2)

    with pytest.raises(WorkloadError, match=r"classes on axis 1.*Say Task\(class_axis=1\)"):
        check_workload(task, ClassesFirst())
    check_workload(task, task.build_model())  # (batch, tokens, 24): accepted
    check_workload(dataclasses.replace(task, class_axis=1), ClassesFirst())
    wrong = workloads.wl_tokens()
    object.__setattr__(wrong, "num_classes", 23)
    with pytest.raises(WorkloadError, match=r"\(batch, \.\.\., 23\) with a decision per position"):
        check_workload(wrong, task.build_model())


def test_a_segmentation_models_loss_and_metric_get_its_own_layout(trained):
    """With class_axis=1, squeeze reads (batch, classes, H, W) logits class-last (accuracy and
    agreement per pixel, -100 left out) while the user's loss and torchmetrics' mean IoU get
    them as the model returns them: the score equals torchmetrics on the raw outputs."""
    from torchmetrics.classification import MulticlassJaccardIndex

    task, model = trained("wl_segmentation")
    model.eval()
    x, y = task.val.source.images, task.val.source.masks
    with torch.no_grad():
        raw = model(x)
    assert raw.shape == (len(y), 3, 8, 8)
    direct = MulticlassJaccardIndex(num_classes=3, ignore_index=-100)(raw, y).item()
    assert evaluate(model, task.val) == pytest.approx(direct, abs=1e-6)
    got = predict_outputs(model, task.val)
    assert got.shape == (len(y), 8, 8, 3) and torch.equal(got, raw.movedim(1, -1))
    kept = y != -100
    pixel_acc = (raw.argmax(1)[kept] == y[kept]).float().mean().item()
    assert accuracy(got, y) == pytest.approx(pixel_acc, abs=1e-6)
    loss = task.loss(got, y, None)  # the user's pixel_ce asserts axis 1 holds the classes
    assert loss.item() == pytest.approx(
        nn.functional.cross_entropy(raw, y, ignore_index=-100).item(), rel=1e-5
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_axis": 0}, r"'class_axis' parameter .* must be -1 .* or an int >= 1.*Got 0"),
        ({"class_axis": -2}, r"'class_axis' parameter .*Got -2"),
        ({"class_axis": True}, r"'class_axis' parameter .*Got True"),
        ({"class_axis": "1"}, r"'class_axis' parameter .*Got '1'"),
        ({"class_axis": 1, "outputs": "values"}, r"only outputs='logits' have a class axis"),
    ],
)
def test_a_bad_class_axis_is_refused_naming_it(kwargs, message):
    with pytest.raises(WorkloadError, match=message):
        dataclasses.replace(workloads.wl_segmentation(), **kwargs)


def test_a_segmentation_models_onnx_graph_keeps_its_layout_and_score(trained, tmp_path):
    """The exported graph returns (batch, classes, H, W) as the model does, and its validation
    score (read class-last, as in the sweep) equals the torch model's."""
    import onnxruntime as ort

    from search.run.deploy import deploy_onnx

    task, model = trained("wl_segmentation")
    save_packed(model.eval(), tmp_path / "m.sqz", like=model)
    deployed = deploy_onnx(tmp_path / "m.sqz", task, tmp_path / "m.onnx", threads=1)
    assert deployed.metrics["val_acc_onnx"] == pytest.approx(evaluate(model, task.val), abs=1e-4)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = task.val.source.images[:5].numpy()
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    assert out.shape == (5, 3, 8, 8)


def test_structured_pruning_traces_a_language_model_with_its_cache_on():
    """GPT-2 as users configure it (cache on: a DynamicCache in its output) loses whole heads
    and units; its cache is not an output whose channels must stay whole."""
    task = workloads.wl_tokens()
    torch.manual_seed(0)
    model = task.build_model().eval()
    assert model.config.use_cache
    example = task.example_inputs(4)
    pruned = get_compressor("structured")(amount=0.5).compress(
        copy.deepcopy(model), CompressionContext(example_inputs=example)
    )
    attention = pruned.transformer.h[0].attn
    assert attention.num_heads < model.transformer.h[0].attn.num_heads
    assert pruned.transformer.h[0].mlp.c_fc.weight.shape[1] < 4 * 32
    assert pruned(**example).logits.shape == model(**example).logits.shape


def test_reports_of_per_position_logits_count_positions_not_samples(trained):
    """The report's classification metrics and class balance of a language model: one row per
    labelled position (labels -100 left out); its top-1 equals the task's accuracy."""
    from experiments.analysis import class_balance, classification_report
    from search.results.explain._agreement import agreement_report

    task, model = trained("wl_tokens")
    report = classification_report(model, task.val, task.num_classes)
    assert report["top1"] == pytest.approx(evaluate(model, task.val), abs=1e-6)
    positions = len(task.val) * (workloads.Counting.LENGTH - 1)
    assert sum(map(sum, report["confusion"])) == positions
    assert class_balance(task)["val"].iloc[: task.num_classes].sum() == positions
    outputs = predict_outputs(model, task.val)
    agreement = agreement_report(outputs, outputs.flip(0), None, split_name="val")
    assert agreement.flips.to_numpy().sum() == outputs.shape[0] * outputs.shape[1]


def test_agreement_is_counted_from_decisions_batch_by_batch(trained):
    """The baseline's validation decisions (not its logits) are what trials agree with: the
    streamed count over batches equals `prediction_agreement` on the whole split's logits at
    its labelled positions."""
    from experiments import DecisionAgreement, agreement_reference, prediction_agreement

    task, model = trained("wl_tokens")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.add_(0.02 * torch.randn_like(other.lm_head.weight))
    reference = agreement_reference(model, task.val, "logits")
    assert reference.dtype == torch.int32
    labelled = len(task.val) * (workloads.Counting.LENGTH - 1)  # the last position's is -100
    assert reference.shape == (labelled,)
    metric = DecisionAgreement(reference)
    streamed = scores(other, task.val, {"agreement": metric}, batch_size=7)
    labelled_only = slice(None), slice(0, -1)  # each sequence's last label is -100: left out
    whole = prediction_agreement(
        predict_outputs(other, task.val)[labelled_only],
        predict_outputs(model, task.val)[labelled_only],
    )
    assert streamed["agreement"] == pytest.approx(whole) and 0.0 < whole < 1.0
    assert streamed["acc"] == pytest.approx(evaluate(other, task.val))
    assert metric.total == 0  # the metric passed in is not updated: a fresh copy is


class _Shortened(torch.utils.data.Dataset):
    """`workloads.Counting`'s sequences cut to 4-11 tokens, a length per sample."""

    def __init__(self, base) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item, n = self.base[i], 4 + i % 8
        return {"input_ids": item["input_ids"][:n], "labels": item["labels"][:n]}


def _pad_each_batch(items: list[dict]) -> dict:
    """Pads a batch to its own longest sequence (as `DataCollatorWithPadding` does)."""
    n = max(len(item["input_ids"]) for item in items)
    ids = torch.zeros(len(items), n, dtype=torch.long)
    labels = torch.full((len(items), n), -100)
    for k, item in enumerate(items):
        ids[k, : len(item["input_ids"])] = item["input_ids"]
        labels[k, : len(item["labels"])] = item["labels"]
    return {"input_ids": ids, "labels": labels}


def test_batches_padded_each_to_its_own_length_are_scored_and_compared(trained):
    """A language model's batches padded each to its own longest sequence (found as a user:
    the sweep stopped after the baseline, "Sizes of tensors must match"): the split's outputs
    are joined padded with -100 (as Hugging Face's Trainer joins them), accuracy counts the
    labelled positions, and agreement is counted at the labelled positions whatever the
    batching of the reference and of the compared model."""
    from experiments import DecisionAgreement, agreement_reference
    from experiments._training import outputs_and_targets

    task, model = trained("wl_tokens")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.add_(0.05 * torch.randn_like(other.lm_head.weight))
    data = _Shortened(workloads.Counting(120, seed=1))

    def loader(batch_size: int) -> DataLoader:
        return DataLoader(data, batch_size=batch_size, collate_fn=_pad_each_batch)

    same = right = labelled = 0  # one sample at a time: no padding
    with torch.no_grad():
        for item in map(data.__getitem__, range(len(data))):
            keep = item["labels"] != -100
            mine = model(input_ids=item["input_ids"][None]).logits[0].argmax(-1)[keep]
            theirs = other(input_ids=item["input_ids"][None]).logits[0].argmax(-1)[keep]
            same += int((mine == theirs).sum())
            right += int((mine == item["labels"][keep]).sum())
            labelled += int(keep.sum())
    assert 0 < same < labelled
    assert evaluate(model, loader(16)) == pytest.approx(right / labelled)
    outputs, targets = outputs_and_targets(model, loader(16))
    assert outputs.shape == (len(data), workloads.Counting.LENGTH - 1, task.num_classes)
    assert int((targets != -100).sum()) == labelled and targets[1, 5:].eq(-100).all()
    reference = agreement_reference(model, loader(16), "logits")
    assert reference.shape == (labelled,)
    streamed = scores(other, loader(7), {"agreement": DecisionAgreement(reference)})
    assert streamed["agreement"] == pytest.approx(same / labelled)


def test_inspect_counts_a_language_models_labels_per_position(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code = main(["inspect", "--config-dir", str(ZOO_CONF), "task=wl_tokens"])
    out = capsys.readouterr().out
    assert code == 0
    assert "labels per class (one per sample, or per labelled position):" in out
    assert "transformer.h.0.attn.c_attn.weight" in out  # its tensors and what acts on them


# ----------------------------------------------------------------------------- multi-label


def test_a_multilabel_classifier_is_scored_and_compared_per_label():
    from experiments import DecisionAgreement, bce_loss, label_accuracy, prediction_agreement

    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 4.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    assert label_accuracy(logits, targets) == pytest.approx(5 / 6)
    expected = nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert bce_loss(logits, targets, None).item() == pytest.approx(expected.item())
    # The compressed model turns one label of six off: agreement 5/6, where top-1 (argmax)
    # would call both rows decided alike.
    other = logits.clone()
    other[1, 2] = -0.5
    assert prediction_agreement(other, logits, kind="multilabel") == pytest.approx(5 / 6)
    assert prediction_agreement(other, logits, kind="logits") == 1.0
    streamed = DecisionAgreement(logits, "multilabel")
    streamed.update(other[:1])
    streamed.update(other[1:])
    assert streamed.compute() == pytest.approx(5 / 6)


def test_the_check_of_a_metric_on_a_few_samples_does_not_pass_on_its_warnings():
    """Found as a user: torchmetrics' BinaryAUROC warned "No negative samples in targets" on
    the check's few samples, before any training (a warning about the split it is not)."""
    import warnings

    from torchmetrics.classification import BinaryAUROC

    x = torch.randn(40, 6)
    positives = torch.ones(40, 1)
    task = _tiny(
        train=TensorDataset(x, positives),
        val=TensorDataset(x, positives),
        test=TensorDataset(x, positives),
        num_classes=1,
        outputs="multilabel",
        build_model=lambda: nn.Linear(6, 1),
        metric=BinaryAUROC(),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_workload(task, nn.Linear(6, 1))
    assert [str(w.message) for w in caught] == []
    with pytest.warns(UserWarning, match="No negative samples"):  # (the metric does warn)
        metric = BinaryAUROC()
        metric.update(torch.randn(8, 1), positives[:8])
        metric.compute()


def test_float64_inputs_of_a_float32_model_are_refused_saying_how_to_convert_them():
    """Found as a user: numpy/pandas rows (float64) got only "Say how a batch becomes the
    model's call with Task(inputs=...)", which is not what is wrong."""
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    data = TensorDataset(x, y)
    with pytest.raises(WorkloadError, match=r"inputs are float64.*weights float32.*astype"):
        check_workload(_tiny(train=data, val=data, test=data), nn.Linear(6, 3))
    with pytest.raises(WorkloadError, match=r"Task\(inputs=\.\.\.\)"):  # other failures: as before
        check_workload(_tiny(), nn.Linear(5, 3))


def test_multi_hot_targets_under_logits_are_refused_naming_outputs_multilabel():
    x = torch.randn(40, 6)
    hot = (torch.rand(40, 3) > 0.5).float()
    hot[0] = torch.tensor([1.0, 1.0, 0.0])  # several labels of one sample
    with pytest.raises(WorkloadError, match=r"multi-hot.*Task\(outputs='multilabel'\)"):
        check_workload(_tiny(train=TensorDataset(x, hot)), nn.Linear(6, 3))
    # One-hot float targets (soft labels' hard case) are one class per sample: accepted.
    one_hot = nn.functional.one_hot(torch.randint(0, 3, (40,)), 3).float()
    data = TensorDataset(x, one_hot)
    top1 = lambda out, y: (out.argmax(1) == y.argmax(1)).float().mean().item()  # noqa: E731
    check_workload(
        _tiny(train=data, val=data, test=data, metric=top1, higher_is_better=True),
        nn.Linear(6, 3),
    )
    # The same multi-hot data as a multi-label task works; targets of another shape do not.
    data = TensorDataset(x, hot)
    check_workload(_tiny(train=data, val=data, test=data, outputs="multilabel"), nn.Linear(6, 3))
    flat = TensorDataset(x, torch.randint(0, 3, (40,)))
    with pytest.raises(WorkloadError, match="one 0 / 1 per label"):
        check_workload(_tiny(train=flat, outputs="multilabel"), nn.Linear(6, 3))


def test_distillation_of_a_multilabel_classifier_matches_each_labels_probability():
    from compressors.kd import Distillation, bce_soft_loss

    ctx = CompressionContext(loss=_tiny(outputs="multilabel").loss, outputs="multilabel")
    loss = Distillation(alpha=1.0, temperature=1.0).finetune_loss(ctx)
    teacher = torch.tensor([[3.0, -2.0]])
    student = torch.zeros(1, 2)
    value = loss(student, torch.tensor([[1.0, 0.0]]), teacher)
    expected = nn.functional.binary_cross_entropy_with_logits(student, torch.sigmoid(teacher))
    assert value.item() == pytest.approx(expected.item())
    assert bce_soft_loss(teacher, teacher, temperature=2.0) < bce_soft_loss(
        student, teacher, temperature=2.0
    )
    with pytest.raises(ValueError, match="loss"):  # softmax KL is not a multi-label loss
        Distillation(loss="kl").finetune_loss(ctx)


def test_explain_lists_a_multilabel_classifiers_flipped_decisions_per_label():
    from search.results.explain._agreement import agreement_report

    base = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 4.0, 1.0]])
    comp = base.clone()
    comp[1, 2] = -0.5
    report = agreement_report(base, comp, None, split_name="val", kind="multilabel")
    assert report.kind == "yes/no per label" and report.samples == 6 and report.flips is None
    assert report.agreement == pytest.approx(5 / 6)
    row = report.flipped.iloc[0]
    assert (row["index"], row["label"], row["baseline"], row["compressed"]) == (1, 2, 1, 0)
    assert row["baseline_conf"] == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())
    assert row["compressed_conf"] == pytest.approx(1 - torch.sigmoid(torch.tensor(-0.5)).item())


def test_inspect_counts_the_samples_with_each_label_of_a_multilabel_task(
    capsys, monkeypatch, tmp_path
):
    from experiments.analysis import class_balance
    from tests.zoo.workloads import TAGS

    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "--config-dir", str(ZOO_CONF), "task=wl_multilabel"]) == 0
    out = capsys.readouterr().out
    assert "task wl_multilabel: 4 labels" in out and "samples with each label:" in out
    task = _task("wl_multilabel")
    balance = class_balance(task)
    digits = task.val.source.y  # (the Tagged dataset's digits)
    expected = [sum(bool(tag(int(d))) for d in digits) for tag in TAGS]
    assert balance["val"].iloc[: len(TAGS)].tolist() == expected


class _QuarterLogits(nn.Module):
    """A segmentation model whose logits come out at half its masks' height and width (as a
    SegFormer's at a quarter of its input's)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return nn.functional.avg_pool2d(self.model(x), 2)


def _upsampled(logits, targets):
    size = targets.shape[-2:]
    return nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _upsampled_ce(outputs, targets, teacher):
    return nn.functional.cross_entropy(_upsampled(outputs, targets), targets, ignore_index=-100)


def _upsampled_iou():
    from torchmetrics.classification import MulticlassJaccardIndex

    class UpsampledIoU(MulticlassJaccardIndex):
        def update(self, preds, target):
            super().update(_upsampled(preds, target), target)

    return UpsampledIoU(num_classes=3, ignore_index=-100)


def test_logits_at_other_positions_than_the_labels_are_never_paired_with_them(trained):
    """A model deciding at 4x4 positions against 8x8 masks: the user's loss pairs them; squeeze
    never pairs a decision with the label of another position (no per-class report, no label
    in the flipped list), says why and what to do, and its own default loss is refused before
    training with the same words."""
    from experiments.analysis import classification_report
    from search.results.explain._agreement import agreement_report
    from search.results.report import _metrics_or_scores

    task, model = trained("wl_segmentation")
    quarter = _QuarterLogits(model).eval()
    task = dataclasses.replace(task, loss=_upsampled_ce, metric=_upsampled_iou())
    with pytest.raises(PositionsMismatch, match=r"decide at 16 positions a sample \(4x4\)"):
        classification_report(quarter, task.val, task.num_classes)
    metrics, confusion, by_class, why = _metrics_or_scores({"baseline": quarter}, task)
    assert confusion is None and by_class is None
    assert "Task(output=...)" in why and "label 64" in why
    assert metrics.loc[("baseline", "val"), "UpsampledIoU"] == pytest.approx(
        evaluate(quarter, task.val)
    )
    outputs = predict_outputs(quarter, task.val)
    assert outputs.shape == (len(task.val), 4, 4, 3)
    other = outputs + 0.5 * torch.randn_like(outputs)
    agreement = agreement_report(outputs, other, task.val.source.masks, split_name="val")
    assert len(agreement.flipped) > 0 and (agreement.flipped.label == -1).all()
    paired = agreement_report(  # at the labels' own positions a flip lists its true label
        outputs, other, task.val.source.masks[:, ::2, ::2].contiguous(), split_name="val"
    )
    assert (paired.flipped.label >= -100).all() and (paired.flipped.label != -1).any()
    check_workload(task, _QuarterLogits(workloads.TinySegNet()))  # the user's loss pairs them
    default = dataclasses.replace(task, loss=ce_loss)
    with pytest.raises(WorkloadError, match=r"ce_loss failed.*cannot be paired with its label"):
        check_workload(default, _QuarterLogits(workloads.TinySegNet()))


def test_a_batch_description_says_how_many_entries_it_left_out():
    """A DLRM's batch has seven inputs: the description must not end as if the sixth were the
    last (the seventh, the third table's offsets, was hidden before)."""
    from experiments import describe

    batch = {f"in{i}": torch.zeros(2, 3, dtype=torch.int64) for i in range(11)}
    text = describe(batch)
    assert text.startswith("dict(in0: int64[2, 3], ")
    assert "in7: int64[2, 3], ... 3 more)" in text
    assert "in8" not in text
    assert describe((torch.zeros(1),) * 3) == "tuple(float32[1], float32[1], float32[1])"
    assert describe(list(range(9))).endswith("int, ... 1 more)")

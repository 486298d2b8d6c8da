"""Every registered compressor on every model family users bring (the zoo in tests/zoo/):
compress -> fine-tune a little -> finalize -> pack -> reload gives the same outputs, a smaller
file wherever the compressor claims the family's tensors, and a reloaded model whose printed
architecture tells the truth; a compressor that cannot act on a family is refused up front."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import optuna
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from compressors import (
    CompressionContext,
    UnsupportedModelError,
    apply_pipeline,
    available,
    finalize_pipeline,
    get_compressor,
    load_packed,
    parameter_count,
    save_packed,
    targets,
)
from experiments import LOSSES, Split, fit, load_or_train_baseline, predict_outputs
from search.cli import main
from tests.conftest import sweep_overrides
from tests.zoo import tasks

FAMILIES = ["resnet", "mobilenet", "transformer", "lstm", "gru", "tied", "minilm"]
#: Settings that make each method do real work in one short test (others: their defaults).
SETTINGS = {
    "prune": {"amount": 0.6},
    "gradual": {"amount": 0.6},
    "quant": {"bits": 4},
    "structured": {"amount": 0.4},
    "lowrank": {"keep": 0.3},
    "sparse": {"epochs": 1},
    "allocate": {"ratio": 2.0},  # (the zoo's models are small: norms and header weigh)
}
#: Training samples each cell fine-tunes on (enough to run every hook).
SAMPLES = 128


def _family_params():
    return [pytest.param(f, marks=pytest.mark.slow) if f == "minilm" else f for f in FAMILIES]


ZOO_CONF = Path(__file__).resolve().parent / "zoo_conf"


def _task_kwargs(family: str) -> dict:
    """The keyword arguments ``squeeze sweep --config-dir tests/zoo_conf task=zoo_<family>``
    builds the task with (so the sweeps below reuse the baselines cached here)."""
    kwargs = OmegaConf.to_container(OmegaConf.load(ZOO_CONF / "task" / f"zoo_{family}.yaml"))
    kwargs.pop("_target_")
    return {**kwargs, "seed": 0}


@functools.cache
def _task(family: str):
    torch.manual_seed(0)
    return getattr(tasks, f"zoo_{family}")(**_task_kwargs(family))


_SIZES: dict[str, int] = {}


def _packed_size(family: str, baseline: nn.Module, path: Path) -> int:
    """Bytes of the family's baseline packed file (written once per session)."""
    if family not in _SIZES:
        _SIZES[family] = save_packed(baseline, path)
    return _SIZES[family]


@pytest.fixture
def trained(cache_dir):
    """The family's task and its trained baseline (cached for the session)."""

    def get(family: str):
        task = _task(family)
        baseline = load_or_train_baseline(
            task, config=_task_kwargs(family), cache_dir=cache_dir, seed=0
        )
        return task, baseline.model

    return get


pytestmark = pytest.mark.usefixtures("one_thread")


def _consistent(model: nn.Module) -> list[str]:
    """Modules whose attributes (what ``print(model)`` shows) disagree with their tensors."""
    wrong = []
    for name, m in model.named_modules():
        if "parametrizations" in name.split("."):
            continue
        checks = []
        if type(m) is nn.Linear or isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear):
            checks.append(tuple(m.weight.shape) == (m.out_features, m.in_features))
        elif isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            checks.append(m.weight.shape[0] == m.out_channels)
            checks.append(m.weight.shape[1] * m.groups == m.in_channels)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            checks.append(m.running_mean.numel() == m.num_features)
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            checks.append(tuple(m.weight.shape) == tuple(m.normalized_shape))
        elif isinstance(m, nn.MultiheadAttention):
            checks.append(m.embed_dim == m.num_heads * m.head_dim)
            if m.in_proj_weight is not None:
                checks.append(tuple(m.in_proj_weight.shape) == (3 * m.embed_dim, m.embed_dim))
        elif isinstance(m, nn.RNNBase):
            gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
            checks.append(m.weight_hh_l0.shape == (gates * m.hidden_size, m.hidden_size))
            checks.append(m.weight_ih_l0.shape[1] == m.input_size)
        elif isinstance(m, nn.Embedding):
            checks.append(tuple(m.weight.shape) == (m.num_embeddings, m.embedding_dim))
        if not all(checks):
            wrong.append(f"{name}: {m}")
    return wrong


#: allocate's cells in the full run only (its table costs 10-35 s a family on a busy machine; the
#: lane allocates on the gru and tied families, and on the hf_zoo's convolutions)
SLOW_CELLS = {(f, "allocate") for f in ("resnet", "mobilenet", "transformer", "lstm")}


@pytest.mark.parametrize(
    ("family", "name"),
    [
        pytest.param(
            f, n, marks=[pytest.mark.slow] if f == "minilm" or (f, n) in SLOW_CELLS else []
        )
        for f in FAMILIES
        for n in available()
    ],
)
def test_every_compressor_on_every_family(family, name, trained, tmp_path):
    task, baseline = trained(family)
    compressor = get_compressor(name)(**SETTINGS.get(name, {}))
    example = task.example_inputs()
    if compressor.shrinks and not compressor.claims(baseline, example):
        with pytest.raises(UnsupportedModelError, match=f"Compressor '{name}' cannot act on"):
            compressor.check_model(baseline, example)
        return
    claimed = compressor.check_model(baseline, example)

    train = Split(task.train.x[:SAMPLES], task.train.y[:SAMPLES], task.train.score)
    teacher = predict_outputs(baseline, train.x)
    ctx = CompressionContext(
        train=train,
        teacher_outputs=teacher,
        teacher=baseline,
        example_inputs=task.example_inputs(),
        seed=0,
        loss=task.loss,
        losses=LOSSES,
        outputs=task.outputs,
        fit=functools.partial(fit, train=train, seed=0),
    )
    model = apply_pipeline([compressor], copy.deepcopy(baseline), ctx)
    fit(
        model,
        train,
        epochs=1,
        batch_size=64,
        lr=1e-4,
        loss_fn=compressor.finetune_loss(ctx) or task.loss,
        teacher_outputs=teacher,
        before_epoch=lambda e, n: compressor.on_epoch(model, e, n),
    )
    model = finalize_pipeline([compressor], model, ctx).eval()

    base_size = _packed_size(family, baseline, tmp_path / "base.sqz")
    size = save_packed(model, tmp_path / "model.sqz", like=baseline)
    reloaded = load_packed(tmp_path / "model.sqz", task.build_model())
    x = task.val.x[:32]
    with torch.no_grad():
        expected, got = model(x), reloaded(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5
    assert _consistent(reloaded) == []
    reloaded.train()
    task.loss(reloaded(x), task.val.y[:32], None).backward()  # the reloaded model trains too
    if compressor.shrinks:
        assert claimed, "a compressor that shrinks models claims the tensors it acts on"
        assert base_size / size > 1.05, f"{name} on {family}: {base_size} -> {size} bytes"


@pytest.mark.parametrize("family", _family_params())
def test_int8_runtime_runs_where_torch_has_kernels_and_the_parent_allows(family, trained, tmp_path):
    task, baseline = trained(family)
    quant = get_compressor("quant")(bits=8, runtime="int8")
    ctx = CompressionContext(example_inputs=task.example_inputs(), seed=0)
    model = apply_pipeline([quant], copy.deepcopy(baseline), ctx).eval()
    save_packed(model, tmp_path / "m.sqz", like=baseline)
    reloaded = load_packed(tmp_path / "m.sqz", task.build_model())
    expected = {t.module_name for t in targets(baseline).values() if t.int8}
    int8 = {n for n, m in reloaded.named_modules() if "quantized.dynamic" in type(m).__module__}
    assert expected <= int8 and expected, f"no int8 layer in {family}"
    x = task.val.x[:32]
    with torch.no_grad():
        out, ref = reloaded(x), model(x)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("family", _family_params())
def test_a_pruned_then_quantized_model_reloads_with_its_real_architecture(
    family, trained, tmp_path
):
    """Shapes change (structured), then parametrizations wrap the modules (quant): the packed
    file must still restore the changed attributes of the parametrized modules."""
    task, baseline = trained(family)
    ctx = CompressionContext(train=task.train, example_inputs=task.example_inputs(), seed=0)
    pipeline = [get_compressor("structured")(amount=0.4), get_compressor("quant")(bits=4)]
    model = finalize_pipeline(pipeline, apply_pipeline(pipeline, copy.deepcopy(baseline), ctx), ctx)
    save_packed(model.eval(), tmp_path / "m.sqz", like=baseline)
    reloaded = load_packed(tmp_path / "m.sqz", task.build_model())
    assert _consistent(reloaded) == []
    x = task.val.x[:32]
    with torch.no_grad():
        assert (reloaded(x) - model(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", _family_params())
def test_quantization_reaches_every_weight_tensor_of_a_family(family):
    baseline = _task(family).build_model()
    quant = get_compressor("quant")()
    claimed = sum(targets(baseline)[n].numel() for n in quant.claims(baseline))
    assert claimed / parameter_count(baseline) > 0.9


@pytest.mark.parametrize(
    "family",
    # The fast lane sweeps zoo_minilm (the smaller form of test_minilm's sweep of all of MiniLM)
    # and zoo_lstm below; the other families' sweeps run in the full run.
    [f if f == "minilm" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES],
)
def test_a_two_trial_sweep_with_the_default_space_through_config_dir(
    family, tmp_path, cache_dir, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # What is asserted is what each trial compressed, not its accuracy or speed: one fine-tuning
    # epoch, latency at batch 32 at most (as task minilm measures it).
    overrides = sweep_overrides(
        tmp_path,
        cache_dir,
        "search.n_trials=2",
        "space.finetune.epochs=1",
        "measure.latency_batch_sizes=[1,32]",
    )
    task = f"task=zoo_{family}"
    code = main(["sweep", "--quiet", "--config-dir", str(ZOO_CONF), task, *overrides])
    assert code == 0
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(f"{tmp_path}/optuna.journal")
    )
    trials = optuna.load_study(study_name=f"zoo_{family}", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2, [
        t.user_attrs.get("fail_reason") for t in trials
    ]
    for trial in trials:
        metrics = trial.user_attrs["metrics"]
        assert metrics["compressed_fraction"] > 0.5
        assert metrics["compression_ratio"] > 1.05


def test_a_compressor_that_can_act_on_nothing_is_refused_before_any_training(
    tmp_path, cache_dir, capsys
):
    overrides = sweep_overrides(tmp_path, cache_dir / "refused", "space.pipeline=[lowrank,quant]")
    code = main(["sweep", "--config-dir", str(ZOO_CONF), "task=zoo_lstm", *overrides])
    assert code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Compressor 'lowrank' cannot act on any tensor of this model" in err
    assert "rnn.weight_ih_l0 (recurrent)" in err and "Remove 'lowrank' from space.pipeline" in err
    assert not (cache_dir / "refused").exists()  # no baseline was trained


def test_a_pipeline_reaching_under_half_of_the_parameters_is_warned_about_and_logged(
    tmp_path, cache_dir, caplog
):
    overrides = sweep_overrides(
        tmp_path,
        cache_dir,
        "search.n_trials=1",
        "space.pipeline=[prune]",
        "space.prune.amount={head: 0.5}",
        "space.finetune.epochs=1",
    )
    assert main(["sweep", "--config-dir", str(ZOO_CONF), "task=zoo_lstm", *overrides]) == 0
    logged = " ".join(caplog.text.split())
    assert "pipeline prune compresses only 2% of the parameters of task zoo_lstm" in logged
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(f"{tmp_path}/optuna.journal")
    )
    (trial,) = optuna.load_study(study_name="zoo_lstm", storage=storage).get_trials()
    fraction = trial.user_attrs["metrics"]["compressed_fraction"]
    assert fraction == pytest.approx(480 / 30442)  # head.weight, 48 x 10, of 30,442 parameters

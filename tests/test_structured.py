"""Structured pruning really removes channels (heads, hidden units) of every model family users
bring, keeps every module's attributes true to its tensors, refuses clearly what it cannot prune;
importance criteria are interchangeable plug-ins."""

from __future__ import annotations

import copy

import optuna
import pytest
import torch
from torch import nn

from compressors import (
    CompressionContext,
    UnsupportedModelError,
    get_compressor,
    load_packed,
    save_packed,
    targets,
)
from compressors._structured_pruners import AttentionHeadPruner
from compressors.importance import weight_scores
from compressors.packing import plain_state
from experiments import Split, evaluate, fit
from experiments.metrics import count_flops
from experiments.models import ConvNet1d
from search import ConfigError, SearchSpace, compose_config
from tests.structured_families import (  # noqa: F401
    FAMILIES,
    Recurrent,
    SeparateAttention,
    TimmAttention,
    ViT,
    _family,
    _inconsistent,
    _prune,
    _size,
    _tokens,
)


def _ctx(task, seed=0):
    return CompressionContext(train=task.train, example_inputs=task.example_inputs(), seed=seed)


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor", "random"])
def test_structured_pruning_shrinks_the_mlp_and_its_flops(digits_task, digits_baseline, importance):
    model = copy.deepcopy(digits_baseline.model)
    pruned = get_compressor("structured")(amount=0.5, importance=importance).compress(
        model, _ctx(digits_task)
    )
    shapes = [tuple(p.shape) for p in pruned.parameters()]
    assert shapes == [(150, 64), (150,), (50, 150), (50,), (10, 50), (10,)]
    x = digits_task.example_inputs()
    assert count_flops(pruned, x) < 0.4 * count_flops(digits_baseline.model, x)
    assert pruned(digits_task.val.x).shape == (360, 10)


def test_structured_pruning_shrinks_a_cnn_and_the_file_reloads(tmp_path):
    torch.manual_seed(0)
    model, x = ConvNet1d(40, 10), torch.randn(8, 40)
    pruned = get_compressor("structured")(amount=0.6).compress(
        copy.deepcopy(model), CompressionContext(example_inputs=x[:1])
    )
    assert [p.shape[0] for p in pruned.features.parameters() if p.dim() == 3] == [10, 10, 10]
    assert pruned.head.weight.shape == (10, 50)  # flattened features follow the channels
    size = save_packed(pruned, tmp_path / "small.sqz")
    assert size < 0.5 * save_packed(model, tmp_path / "full.sqz")
    assert torch.equal(load_packed(tmp_path / "small.sqz", ConvNet1d(40, 10))(x), pruned(x))


def test_structured_then_quantized_model_fine_tunes_and_round_trips(
    tmp_path, digits_task, digits_baseline
):
    model = copy.deepcopy(digits_baseline.model)
    model = get_compressor("structured")(amount=0.5).compress(model, _ctx(digits_task))
    model = get_compressor("quant")(bits=4).compress(model, _ctx(digits_task))
    fit(model, digits_task.train, epochs=3, batch_size=64, lr=1e-3)
    assert evaluate(model, digits_task.val) > 0.9
    save_packed(model, tmp_path / "m.sqz")
    reloaded = load_packed(tmp_path / "m.sqz", digits_task.build_model())
    assert torch.equal(reloaded(digits_task.val.x), model(digits_task.val.x))


def test_taylor_importance_differs_from_magnitude_on_dead_inputs(digits_task, digits_baseline):
    """Pixels that are 0 in every image give their weights zero gradient: Taylor scores them 0
    whatever their size, magnitude does not."""
    model = copy.deepcopy(digits_baseline.model)
    layers = {"net.1": targets(model)["net.1.weight"]}
    dead = (digits_task.train.x[:512] == 0).all(dim=0)
    assert dead.sum() >= 3
    magnitude = weight_scores("l1", layers, model, _ctx(digits_task))["net.1"]
    taylor = weight_scores("taylor", layers, model, _ctx(digits_task))["net.1"]
    assert torch.all(taylor[:, dead] == 0)
    assert torch.all(magnitude[:, dead] > 0)
    assert all(p.grad is None for p in model.parameters())  # gradients are cleaned up
    pruned = {}
    for criterion in ("l1", "taylor"):
        m = get_compressor("prune")(amount=0.2, scope="layer", importance=criterion).compress(
            copy.deepcopy(digits_baseline.model), _ctx(digits_task)
        )
        pruned[criterion] = plain_state(m)[0]["net.1.weight"] == 0
    assert torch.all(pruned["taylor"][:, dead])
    assert not torch.equal(pruned["taylor"], pruned["l1"])


def test_random_importance_is_a_seeded_control(digits_task, digits_baseline):
    def mask(seed):
        m = get_compressor("prune")(amount=0.5, importance="random").compress(
            copy.deepcopy(digits_baseline.model), _ctx(digits_task, seed)
        )
        return plain_state(m)[0]["net.3.weight"] == 0

    assert torch.equal(mask(1), mask(1))
    assert not torch.equal(mask(1), mask(2))


def test_shape_changing_methods_must_come_first():
    cfg = compose_config(["space.pipeline=[prune,structured]"])
    with pytest.raises(
        ConfigError, match="applies 'structured' after 'prune'.*changes layer shapes"
    ):
        SearchSpace.from_config(cfg.space)
    cfg = compose_config(["space.pipeline=[structured,quant,kd]"])
    recipe = SearchSpace.from_config(cfg.space).sample(optuna.create_study().ask())
    assert recipe.pipeline == ("structured", "quant", "kd")


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_shrinks_runs_trains_and_reloads(family, scope, tmp_path):
    """Smaller, attributes true to tensors, runs in eval without gradients (the fast path of
    ``nn.TransformerEncoderLayer``) as with them, reloads from its packed file to the same
    outputs and architecture, and trains."""
    model, x = _family(family)
    pruned = _prune(model, x, amount=0.5, scope=scope)
    assert _size(pruned) < 0.7 * _size(model)
    assert _inconsistent(pruned) == []
    pruned.eval()
    with torch.no_grad():
        fast = pruned(x)
    slow = pruned(x)  # with gradients: torch's attention takes its plain path
    assert fast.shape == model(x).shape
    assert torch.allclose(fast, slow, atol=1e-5)

    save_packed(pruned, tmp_path / "m.sqz", like=_family(family, seed=1)[0])
    reloaded = load_packed(tmp_path / "m.sqz", _family(family, seed=1)[0])
    assert str(reloaded) == str(pruned)
    with torch.no_grad():
        assert (reloaded(x) - fast).abs().max() <= 1e-5

    pruned.train()
    pruned(x).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in pruned.parameters())


def test_depthwise_convs_keep_their_groups_and_batch_norms_follow_their_convs():
    model, x = _family("mobilenet")
    pruned = _prune(model, x, amount=0.5)
    convs = [m for m in pruned.features if isinstance(m, nn.Conv2d)]
    norms = [m for m in pruned.features if isinstance(m, nn.BatchNorm2d)]
    depthwise = [c for c in convs if c.groups > 1]
    assert len(depthwise) == 2
    assert all(c.groups == c.in_channels == c.out_channels for c in depthwise)
    assert [c.out_channels for c in convs] == [n.num_features for n in norms] == [8, 8, 16, 16, 16]
    assert pruned.head.in_features == 16 and pruned.head.out_features == 10


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_round_to_keeps_a_multiple_of_its_units_and_the_most_important_of_them(scope):
    model, x = _family("mobilenet")
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 32]
    plain = _prune(copy.deepcopy(model), x, amount=0.6, scope=scope)
    rounded = _prune(copy.deepcopy(model), x, amount=0.6, scope=scope, round_to=8)
    kept = [c.out_channels for c in rounded.features if isinstance(c, nn.Conv2d)]
    assert all(n % 8 == 0 for n in kept), kept
    fewer = [c.out_channels for c in plain.features if isinstance(c, nn.Conv2d)]
    assert all(a >= b for a, b in zip(kept, fewer, strict=True)) and kept != fewer
    first = next(i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d))
    assert set(_kept_rows(model.features, plain.features, str(first))) <= set(
        _kept_rows(model.features, rounded.features, str(first))
    )
    assert rounded(x).shape == model(x).shape
    whole = _prune(copy.deepcopy(model), x, amount=0.5, round_to=16)
    assert [c.out_channels for c in whole.features if isinstance(c, nn.Conv2d)] == [16] * 5


def test_round_to_is_a_positive_int():
    with pytest.raises(ValueError, match="structured.round_to"):
        get_compressor("structured")(round_to=0)


def _kept_rows(before: nn.Module, after: nn.Module, name: str) -> list[int]:
    """Which output channels of layer ``name`` of ``before`` survive in ``after`` (matched by
    their weight rows)."""
    rows = {r.numpy().tobytes(): i for i, r in enumerate(getattr(before, name).weight.detach())}
    return [rows[r.numpy().tobytes()] for r in getattr(after, name).weight.detach()]


def _kept_channels(before: nn.Linear, after: nn.Linear) -> list[int]:
    """Which output channels of ``before`` survive in ``after`` (matched by their biases)."""
    return [int((before.bias == b).nonzero()) for b in after.bias.detach()]


def test_torch_attention_loses_whole_heads_and_the_residual_stream_follows():
    model, x = _family("transformer")
    pruned = _prune(model, x, amount=0.5)
    kept = _kept_channels(model.embed, pruned.embed)  # the residual stream's channels
    assert len(kept) == 16 == 8 * len({c // 8 for c in kept})  # whole blocks of head_dim (8)
    for before, after in zip(model.encoder.layers, pruned.encoder.layers, strict=True):
        attention = after.self_attn
        assert (attention.num_heads, attention.head_dim, attention.embed_dim) == (2, 8, 16)
        assert attention.kdim == attention.vdim == 16
        rows = [block * 32 + c for block in range(3) for c in kept]
        assert torch.equal(attention.in_proj_weight, before.self_attn.in_proj_weight[rows][:, kept])
        assert after.norm1.normalized_shape == after.norm2.normalized_shape == (16,)
        assert after.linear1.in_features == after.linear2.out_features == 16
        assert after.linear1.out_features == 32  # feed-forward neurons go like any channels
    assert pruned.head.in_features == 16

    most = _prune(model, x, amount=0.95)
    assert {layer.self_attn.num_heads for layer in most.encoder.layers} == {1}  # never all


def test_attention_head_pruner_removes_exactly_the_heads_it_is_given():
    """With head 1 fed zeros and its output projection zeroed, the attention without head 1
    computes what the full one computed, on the other channels."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, batch_first=True, add_bias_kv=True).eval()
    with torch.no_grad():
        attention.out_proj.weight[:, 4:8] = 0
    x = torch.randn(2, 5, 16)
    x[..., 4:8] = 0
    keep = [i for i in range(16) if not 4 <= i < 8]
    expected = attention(x, x, x, need_weights=False)[0][..., keep]
    AttentionHeadPruner().prune_out_channels(attention, list(range(4, 8)))
    assert (attention.num_heads, attention.head_dim, attention.embed_dim) == (3, 4, 12)
    assert attention.bias_k.shape == (1, 1, 12)
    got = attention(x[..., keep], x[..., keep], x[..., keep], need_weights=False)[0]
    assert torch.allclose(got, expected, atol=1e-6)
    with pytest.raises(ValueError, match="not whole heads"):
        AttentionHeadPruner().prune_out_channels(attention, [0, 1])


@pytest.mark.parametrize(
    "cell, layers, bidirectional, state",
    [
        (nn.LSTM, 2, True, True),
        (nn.LSTM, 1, False, False),
        (nn.GRU, 2, True, False),
        (nn.GRU, 1, True, True),
        (nn.RNN, 2, True, True),
    ],
    ids=["lstm-2-bi-state", "lstm-1", "gru-2-bi", "gru-1-bi-state", "rnn-2-bi-state"],
)
def test_recurrent_layers_lose_exactly_their_dead_hidden_units(cell, layers, bidirectional, state):
    """Hidden units whose every weight is zero carry nothing: removing them (the least important
    units) leaves the function unchanged, whichever output the head reads."""
    torch.manual_seed(0)
    model = Recurrent(cell, 8, hidden=8, layers=layers, bidirectional=bidirectional, state=state)
    rnn, dead = model.rnn, [1, 6]
    gates = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[cell]
    rows = [g * 8 + u for g in range(gates) for u in dead]
    columns = [d * 8 + u for d in range(model.directions) for u in dead]
    with torch.no_grad():
        for name, param in rnn.named_parameters():
            param[rows] = 0
            if name.startswith("weight_hh"):
                param[:, dead] = 0
            elif name.startswith("weight_ih") and not name.startswith("weight_ih_l0"):
                param[:, columns] = 0
        model.head.weight[:, columns] = 0
    x = torch.randn(4, 6, 8)
    pruned = _prune(model, x, amount=0.25)  # 2 of 8 units
    assert pruned.rnn.hidden_size == 6 and pruned.rnn.input_size == 8
    assert pruned.head.in_features == 6 * model.directions
    assert _inconsistent(pruned) == []
    with torch.no_grad():
        assert torch.allclose(pruned(x), model(x), atol=1e-6)


def test_a_tied_embedding_keeps_its_tie_and_its_vocabulary():
    model, x = _family("tied-transformer")
    pruned = _prune(model, x, amount=0.5)
    assert pruned.head.weight is pruned.emb.weight  # one tensor, pruned once
    assert (pruned.emb.num_embeddings, pruned.head.out_features) == (17, 17)
    assert pruned.emb.embedding_dim == pruned.head.in_features == 16
    kept = [int((model.emb.weight[0] == v).nonzero()) for v in pruned.emb.weight[0].detach()]
    assert torch.equal(pruned.emb.weight, model.emb.weight[:, kept])
    assert pruned.block.self_attn.num_heads == 2
    assert len(plain_state(pruned)[0]) == len(plain_state(model)[0])

    model, x = _family("tied-gru")
    pruned = _prune(model, x, amount=0.5)
    assert pruned.head.weight is pruned.emb.weight
    assert pruned.emb.embedding_dim == pruned.rnn.input_size == pruned.rnn.hidden_size == 12
    assert (pruned.emb.num_embeddings, pruned.head.out_features) == (17, 17)


class TiedWithSideOutput(nn.Module):
    """An embedding tied to the output layer whose width also reaches the model's output."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(17, 32)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)
        self.head = nn.Linear(32, 17, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        e = self.emb(tokens)
        return self.head(self.fc2(torch.relu(self.fc1(e)))), e.mean(1)


def test_a_tie_that_cannot_shrink_alike_stays_whole_and_says_why():
    model, x = TiedWithSideOutput(), _tokens()
    report = get_compressor("structured").explain(model, x)
    assert report.kept["emb (Embedding)"] == "its channels reach the model's output"
    assert report.kept["fc2 (Linear)"].startswith(
        "it shares a tied weight with emb (Embedding), which stays whole"
    )
    assert list(report.prunable) == ["fc1 (Linear)"]
    pruned = _prune(model, x, amount=0.5)
    assert pruned.head.weight is pruned.emb.weight and pruned.emb.weight.shape == (17, 32)
    assert pruned.fc1.out_features == pruned.fc2.in_features == 32


class HeadsOfLinears(nn.Module):
    """Attention written with plain Linears (as Hugging Face's BERT), naming its projections
    and heads with ``attention_heads()``."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(16, 16) for _ in range(3))
        self.num_attention_heads, self.attention_head_size, self.all_head_size = 4, 4, 16
        self.out = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (
            p(x).view(b, t, -1, 4).transpose(1, 2) for p in (self.query, self.key, self.value)
        )
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.head(self.out(a.transpose(1, 2).reshape(b, t, -1)).mean(1))

    def attention_heads(self):
        return {p: p.out_features // 4 for p in (self.query, self.key, self.value)}


def test_attention_of_plain_linears_loses_whole_heads_and_its_counts_follow():
    torch.manual_seed(0)
    model, x = HeadsOfLinears(), torch.randn(2, 5, 16)
    pruned = _prune(model, x, amount=0.5)
    assert pruned.query.out_features == pruned.value.out_features == pruned.out.in_features == 8
    assert (pruned.num_attention_heads, pruned.all_head_size) == (2, 8)
    assert set(pruned.attention_heads().values()) == {2}
    kept = _kept_channels(model.query, pruned.query)
    assert len({c // 4 for c in kept}) == 2  # two whole heads


def _projections(attention: nn.Module) -> list[tuple[nn.Linear, int]]:
    """Query / key / value projections of a ViT attention and the blocks of heads each holds."""
    if isinstance(attention, TimmAttention):
        return [(attention.qkv, 3)]
    return [(attention.q, 1), (attention.k, 1), (attention.v, 1)]


@pytest.mark.parametrize("attention", [TimmAttention, SeparateAttention], ids=["fused", "q-k-v"])
def test_attention_with_a_num_heads_attribute_loses_whole_heads_and_its_count_follows(attention):
    """The same whole heads go from the query, key and value projections (in every block of a
    fused ``qkv``) and from the output projection's inputs; ``num_heads`` follows, the head
    size and the residual width stay, and the attention computes what the full one computes
    without those heads."""
    model, x = ViT(attention), torch.randn(2, 3, 16, 16)
    pruned = _prune(model, x, amount=0.5)
    assert pruned.patch.out_channels == pruned.head.in_features == 32  # the residual stream
    for before, after in zip(model.blocks, pruned.blocks, strict=True):
        assert after["attn"].num_heads == 2 and after["attn"].proj.in_features == 16
        assert after["norm1"].normalized_shape == after["norm2"].normalized_shape == (32,)
        assert after["fc1"].out_features == after["fc2"].in_features == 32  # MLP neurons go too
        heads = []
        for (full, blocks), (cut, _) in zip(
            _projections(before["attn"]), _projections(after["attn"]), strict=True
        ):
            assert cut.out_features == blocks * 16 and cut.in_features == 32
            kept = _kept_channels(full, cut)
            these = sorted({c % 32 // 8 for c in kept})
            whole = [b * 32 + h * 8 + j for b in range(blocks) for h in these for j in range(8)]
            assert sorted(kept) == whole  # whole heads, in each of q, k and v
            heads.append(these)
        assert all(h == heads[0] for h in heads)  # the same two heads in q, k and v
        gone = [c for h in range(4) if h not in heads[0] for c in range(8 * h, 8 * h + 8)]
        reference = copy.deepcopy(before["attn"])
        with torch.no_grad():
            reference.proj.weight[:, gone] = 0  # the full attention without those heads
            tokens = torch.randn(2, 17, 32)
            assert torch.allclose(after["attn"](tokens), reference(tokens), atol=1e-5)
    if attention is TimmAttention:
        assert {b["attn"].head_dim for b in pruned.blocks} == {8}
    assert _inconsistent(pruned) == []


def test_attention_that_reads_its_width_from_its_input_keeps_its_heads_and_says_so(caplog):
    """timm's classic ``reshape(B, N, C)`` (``C`` the input width, which stays) fits no fewer
    heads: its heads all stay, with a log line, and the MLPs are pruned."""
    model = ViT(lambda dim: TimmAttention(dim, width_from_input=True))
    x = torch.randn(2, 3, 16, 16)
    with caplog.at_level("INFO", logger="compressors.structured"):
        pruned = _prune(model, x, amount=0.5)
    assert "keeping the heads of blocks.0.attn, blocks.1.attn whole" in caplog.text
    assert "attention 'blocks.0.attn' keeps its heads: its forward does not run" in caplog.text
    for block in pruned.blocks:
        assert (block["attn"].num_heads, block["attn"].qkv.out_features) == (4, 96)
        assert block["fc1"].out_features == 32
    assert pruned(x).shape == (2, 10)


def test_a_broadcast_single_channel_keeps_its_channel_and_the_wider_group_shrinks():
    """An attention-pooling score (one channel, broadcast over the GRU's features) and a
    one-channel spatial gate are not coupled to the channels they weigh."""
    model, x = _family("attention-pooling-gru")
    assert get_compressor("structured").explain(model, x).kept["score (Linear)"] == (
        "it has a single channel"
    )
    pruned = _prune(model, x, amount=0.5)
    assert pruned.score.out_features == 1 and pruned.score.weight.shape == (1, 12)
    assert pruned.gru.hidden_size == 6 and pruned.conv.out_channels == 8
    assert pruned(x).shape == (8, 5)

    model, x = _family("gated-cnn")
    pruned = _prune(model, x, amount=0.5)
    assert pruned.spatial.out_channels == 1 and pruned.spatial.weight.shape == (1, 8, 1, 1)
    assert pruned.conv1.out_channels == pruned.excite.out_features == pruned.squeeze.in_features
    assert pruned.conv1.out_channels == 8 and pruned.squeeze.out_features == 2
    assert pruned(x).shape == (8, 10) and _inconsistent(pruned) == []


def _bert(seed: int = 0):
    """``BertForSequenceClassification`` at bert-base width (768, 12 heads of 64), one layer,
    a small vocabulary and feed-forward; and a dict batch with padding."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=50,
        hidden_size=768,
        num_hidden_layers=1,
        num_attention_heads=12,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).eval()
    batch = {"input_ids": torch.randint(0, 50, (2, 16)), "attention_mask": torch.ones(2, 16).long()}
    batch["attention_mask"][1, 10:] = 0
    return model, batch


def test_a_hugging_face_bert_classifier_loses_heads_and_ffn_neurons_and_reloads(tmp_path):
    model, batch = _bert()
    pruned = _prune(model, batch, amount=0.5)
    layer = pruned.bert.encoder.layer[0]
    attention = layer.attention.self
    assert (attention.num_attention_heads, attention.attention_head_size) == (6, 64)
    assert attention.all_head_size == 384
    assert attention.query.weight.shape == attention.value.weight.shape == (384, 768)
    assert layer.attention.output.dense.weight.shape == (768, 384)
    assert layer.intermediate.dense.out_features == layer.output.dense.in_features == 32
    assert pruned.bert.embeddings.word_embeddings.embedding_dim == 768  # hidden_size stays
    assert layer.output.LayerNorm.normalized_shape == (768,)
    full = model.bert.encoder.layer[0].attention.self
    heads = [{c // 64 for c in _kept_rows(full, attention, p)} for p in ("query", "key", "value")]
    assert len(heads[0]) == 6 and heads[0] == heads[1] == heads[2]  # whole heads, the same
    with torch.no_grad():
        logits = pruned(**batch).logits
    assert logits.shape == model(**batch).logits.shape == (2, 3)
    assert _size(pruned) < _size(model) and _inconsistent(pruned) == []

    save_packed(pruned, tmp_path / "bert.sqz", like=_bert(seed=1)[0])
    reloaded = load_packed(tmp_path / "bert.sqz", _bert(seed=1)[0])
    assert reloaded.bert.encoder.layer[0].attention.self.num_attention_heads == 6
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, logits)


def test_other_criteria_rank_heads_and_hidden_units_too():
    for family in ("transformer", "gru-2layer-bi"):
        model, x = _family(family)
        y = torch.randint(0, model.head.out_features, (len(x),))
        ctx = CompressionContext(train=Split(x, y), example_inputs=x, seed=0)
        for criterion in ("taylor", "random", "l2"):
            pruned = get_compressor("structured")(amount=0.5, importance=criterion).compress(
                model, ctx
            )
            assert _size(pruned) < 0.7 * _size(model) and _inconsistent(pruned) == []
            assert all(p.grad is None for p in pruned.parameters())


class MatrixParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.w = nn.Parameter(torch.randn(16, 5))

    def forward(self, x):
        return torch.relu(self.fc(x)) @ self.w


class Projected(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 16, batch_first=True, proj_size=4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize(
    "model, x, message",
    [
        (
            Projected(),
            torch.randn(2, 5, 8),
            "Compressor 'structured' cannot prune this model consistently:\n- 'rnn' (LSTM) has "
            "proj_size=4: LSTM projections are not supported",
        ),
        (
            nn.MultiheadAttention(16, 2, kdim=8, vdim=8),
            (torch.randn(3, 2, 16), torch.randn(3, 2, 8), torch.randn(3, 2, 8)),
            "- '<model>' (MultiheadAttention) has kdim=8, vdim=8 unlike embed_dim=16: only the "
            "packed query/key/value projection is supported",
        ),
        (
            MatrixParameter(),
            torch.randn(2, 8),
            "- '<model>' (MatrixParameter) uses its parameter 'w' (16, 5) as a weight matrix "
            "(Mm), which torch-pruning would cut as if it were an element-wise tensor",
        ),
        (
            nn.Sequential(nn.Linear(8, 3)),
            torch.randn(2, 8),
            "Compressor 'structured' cannot act on any tensor of this model (Sequential): every "
            "group of coupled channels stays whole.\n- 0 (Linear): its channels reach the "
            "model's output\nRemove 'structured' from space.pipeline.",
        ),
        (
            nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3)),
            torch.randn(2, 5),
            "Compressor 'structured' cannot trace '<model>' (Sequential) on its example inputs: "
            "RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x5 and 8x4)",
        ),
    ],
    ids=["lstm-projection", "attention-kdim", "matrix-parameter", "output-only", "untraceable"],
)
def test_what_cannot_be_pruned_is_refused_naming_the_module_and_why(model, x, message):
    before = copy.deepcopy(model.state_dict())
    compressor = get_compressor("structured")(amount=0.5)
    with pytest.raises(UnsupportedModelError) as refused:
        compressor.check_model(model, x)
    assert message in str(refused.value)
    with pytest.raises(UnsupportedModelError) as refused:
        compressor.compress(model, CompressionContext(example_inputs=x))
    assert message in str(refused.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_checking_and_compressing_leave_the_given_model_as_it_was():
    model, x = _family("transformer")
    model.train()
    model.encoder.layers[1].eval()  # a mix of modes is restored module by module
    before = copy.deepcopy(model)
    compressor = get_compressor("structured")(amount=0.5)
    claimed = compressor.check_model(model, x)
    assert "encoder.layers.0.self_attn.in_proj_weight" in claimed and "head.weight" in claimed
    pruned = compressor.compress(model, CompressionContext(example_inputs=x))
    assert str(model) == str(before)
    params = zip(model.parameters(), before.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in params)
    for m, b, p in zip(model.modules(), before.modules(), pruned.modules(), strict=True):
        assert m.training == b.training == p.training

"""Each compressor does what it promises on a real trained model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import get_class
from omegaconf import OmegaConf

from compressors import (
    CompressionContext,
    InvalidParameterError,
    apply_pipeline,
    available,
    get_compressor,
)
from compressors._targets import weight_layers
from compressors.kd import distillation_loss
from compressors.packing import plain_state
from experiments import fit
from search.config.compose import CONF_DIR


def _apply(model, *steps):
    model = copy.deepcopy(model)
    for name, params in steps:
        model = get_compressor(name)(**params).compress(model, CompressionContext())
    return model


def _weights(model):
    state, _ = plain_state(model)
    return {name: state[f"{name}.weight"] for name in weight_layers(model)}


def test_registry_lists_every_method_and_each_has_its_yaml():
    yamls = sorted(p.stem for p in (CONF_DIR / "compressor").glob("*.yaml"))
    assert available() == yamls  # one module and one yaml per method, nothing listed by hand
    assert {"kd", "prune", "quant", "structured"} <= set(yamls)
    for name in yamls:
        target = OmegaConf.load(CONF_DIR / "compressor" / f"{name}.yaml")._target_
        assert get_class(target) is get_compressor(name)
    with pytest.raises(KeyError, match="Unknown compressor 'prun'. Available: .*gradual, kd, low"):
        get_compressor("prun")


@pytest.mark.parametrize("amount", [0.0, 0.3, 0.9, 0.99])
def test_global_pruning_zeroes_exactly_the_requested_fraction(digits_baseline, amount):
    model = _apply(digits_baseline.model, ("prune", {"amount": amount, "scope": "global"}))
    weights = _weights(model)
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == round(amount * total)


def test_global_pruning_removes_the_smallest_weights(digits_baseline):
    model = _apply(digits_baseline.model, ("prune", {"amount": 0.5}))
    original = _weights(digits_baseline.model)
    pruned = _weights(model)
    kept = torch.cat([original[n][pruned[n] != 0].abs() for n in pruned])
    dropped = torch.cat([original[n][pruned[n] == 0].abs() for n in pruned])
    assert dropped.max() <= kept.min()


def test_the_k_smallest_are_dropped_ties_in_order_as_a_stable_sort_drops_them():
    """`smallest_mask` finds the k-th smallest score instead of sorting (no int64 indices): the
    same mask as a stable argsort, on scores with many ties, with none and with a NaN."""
    from compressors.prune import smallest_mask, smallest_masks

    def by_sort(scores, amount):
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep[torch.argsort(scores, stable=True)[: round(amount * scores.numel())]] = False
        return keep

    g = torch.Generator().manual_seed(0)
    cases = [torch.randint(0, 4, (97,), generator=g).float(), torch.randn(97, generator=g)]
    cases.append(torch.tensor([1.0, float("nan"), 0.0, 2.0, 0.0]))
    for scores in cases:
        for amount in (0.0, 0.1, 0.5, 0.77, 0.99):
            assert torch.equal(smallest_mask(scores, amount), by_sort(scores, amount))
    parts = [cases[0][:40].view(8, 5), cases[0][40:][None]]  # global: one rank
    for amount in (0.3, 0.6):
        got = torch.cat([m.flatten() for m in smallest_masks(parts, amount)])
        assert torch.equal(got, by_sort(cases[0], amount))


def test_the_kth_smallest_score_is_found_by_counting_in_chunks(monkeypatch):
    """`kth_smallest` (a radix select on the floats' keys, read a chunk at a time) gives the
    sorted scores' k-th value: negative scores, signed zeros, infinities, ties and half
    precision included; None for what it does not handle (float64, NaN)."""
    from compressors import prune

    monkeypatch.setattr(prune, "_SELECT_CHUNK", 7)  # (chunks within and across the parts)
    g = torch.Generator().manual_seed(0)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-42, -1e-42, -2.5])
    cases = [
        torch.cat([torch.randn(90, generator=g), specials]),
        torch.randint(-3, 4, (97,), generator=g).float(),
        torch.randn(97, generator=g).half(),
        torch.randn(97, generator=g).abs().bfloat16(),
    ]
    for scores in cases:
        ordered = scores.float().sort().values
        parts = [scores[:40].view(8, 5), scores[40:]]
        for k in (1, 2, 13, 50, 96, 97):
            value, below = prune.kth_smallest(parts, k)
            assert value == float(ordered[k - 1])
            assert below == int((scores.float() < value).sum())
    assert prune.kth_smallest([torch.randn(5, dtype=torch.float64)], 2) is None
    assert prune.kth_smallest([torch.tensor([1.0, float("nan")])], 1) is None


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_l1_pruning_scores_the_weights_a_chunk_at_a_time_with_the_same_masks(monkeypatch, scope):
    """``prune`` with ``importance=l1`` ranks ``|w|`` as a key of each chunk (no copy of every
    weight's magnitude): the masks of the materialized scores (`weight_scores`), ties, signs,
    half precision and chunks across tensors included."""
    from compressors import prune
    from compressors._targets import targets
    from compressors.importance import weight_scores

    monkeypatch.setattr(prune, "_SELECT_CHUNK", 7)
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(9, 8), torch.nn.Linear(8, 5))
    with torch.no_grad():
        model[0].weight.copy_(torch.randint(-3, 4, (8, 9), generator=g).float())  # many ties
        model[1].weight.copy_(torch.randn(5, 8, generator=g).half().float())
    found = targets(model)
    for amount in (0.2, 0.5, 0.9):
        expected = prune.keep_masks(
            weight_scores("l1", found, model, CompressionContext()), amount, scope
        )
        pruned = prune.UnstructuredPruning(amount=amount, scope=scope).compress(
            copy.deepcopy(model), CompressionContext()
        )
        for name, keep in expected.items():
            layer = dict(pruned.named_modules())[name.removesuffix(".weight")]
            assert torch.equal(layer.weight != 0, keep & (found[name].weight != 0)), name
            assert torch.equal(layer.parametrizations.weight[0].mask, keep), name


def test_layer_pruning_zeroes_the_fraction_in_every_layer(digits_baseline):
    model = _apply(digits_baseline.model, ("prune", {"amount": 0.75, "scope": "layer"}))
    for w in _weights(model).values():
        assert int((w == 0).sum()) == round(0.75 * w.numel())


def test_per_layer_amounts(digits_baseline):
    amounts = {"net.1": 0.9, "net.3": 0.5}
    model = _apply(digits_baseline.model, ("prune", {"amount": amounts}))
    weights = _weights(model)
    assert int((weights["net.1"] == 0).sum()) == round(0.9 * weights["net.1"].numel())
    assert int((weights["net.3"] == 0).sum()) == round(0.5 * weights["net.3"].numel())
    assert int((weights["net.5"] == 0).sum()) == 0
    with pytest.raises(InvalidParameterError, match="unknown layers"):
        _apply(digits_baseline.model, ("prune", {"amount": {"fc9": 0.5}}))


def test_pruned_weights_stay_zero_after_fine_tuning(digits_task, digits_baseline):
    model = _apply(digits_baseline.model, ("prune", {"amount": 0.8}))
    before = {n: w == 0 for n, w in _weights(model).items()}
    fit(model, digits_task.train, epochs=3, batch_size=64, lr=1e-2)
    after = _weights(model)
    for name, zero in before.items():
        assert torch.all(after[name][zero] == 0)
        assert int((after[name] == 0).sum()) >= int(zero.sum())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantized_layers_have_at_most_2_to_the_k_values_per_channel(
    digits_task, digits_baseline, bits
):
    model = _apply(digits_baseline.model, ("quant", {"bits": bits}))
    for stage in ("after quantization", "after fine-tuning"):
        for name, w in _weights(model).items():
            distinct = max(len(torch.unique(row)) for row in w)
            assert distinct <= 2**bits, f"{name} {stage}: {distinct} values"
        fit(model, digits_task.train, epochs=2, batch_size=64, lr=1e-2)


def test_quantized_weights_are_integer_multiples_of_their_channel_scale(digits_baseline):
    model = _apply(digits_baseline.model, ("prune", {"amount": 0.5}), ("quant", {"bits": 4}))
    state, grids = plain_state(model)
    for key, grid in grids.items():
        codes = state[key] / grid.scale
        assert torch.equal(codes, torch.round(codes))
        assert codes.abs().max() <= 7


def test_fine_tuning_moves_quantized_weights_along_the_grid(digits_task, digits_baseline):
    model = _apply(digits_baseline.model, ("quant", {"bits": 4}))
    before = _weights(model)
    fit(model, digits_task.train, epochs=2, batch_size=64, lr=1e-2)
    after = _weights(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_pipeline_checks_what_each_compressor_requires(digits_baseline):
    kd = get_compressor("kd")()
    with pytest.raises(ValueError, match=r"compressor 'kd' requires \['teacher'\]"):
        apply_pipeline([kd], digits_baseline.model, CompressionContext())
    ctx = CompressionContext(teacher=digits_baseline.model)
    assert apply_pipeline([kd], digits_baseline.model, ctx) is digits_baseline.model


def test_distillation_with_alpha_zero_equals_cross_entropy():
    torch.manual_seed(0)
    student, teacher = torch.randn(16, 10), torch.randn(16, 10)
    labels = torch.randint(0, 10, (16,))
    loss = distillation_loss(student, labels, teacher, temperature=4.0, alpha=0.0)
    assert torch.allclose(loss, F.cross_entropy(student, labels))


def test_distillation_soft_term_is_t_squared_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(16, 10), torch.randn(16, 10)
    labels = torch.randint(0, 10, (16,))
    t = 3.0
    kl = F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean")
    loss = distillation_loss(student, labels, teacher, temperature=t, alpha=1.0)
    assert torch.allclose(loss, t * t * kl, atol=1e-6)
    assert distillation_loss(teacher, labels, teacher, temperature=t, alpha=1.0).abs() < 1e-6


def test_distillation_leaves_out_the_positions_a_collate_padded():
    """A language model's (or a per-token regression's) padded positions, labelled -100: the
    teacher's outputs there are no knowledge; the soft loss is the one of the labelled
    positions alone, whatever the student says at the padding."""
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, 3:] = labels[1, 4:] = -100
    kept = labels != -100
    t = 2.0
    expected = distillation_loss(
        student[kept], labels[kept], teacher[kept], temperature=t, alpha=1.0
    )
    noisy = student.clone()
    noisy[~kept] = 100.0 * torch.randn(int((~kept).sum()), 7)  # (anything at the padding)
    loss = distillation_loss(noisy, labels, teacher, temperature=t, alpha=1.0)
    assert torch.allclose(loss, expected, atol=1e-6)
    values, targets = torch.randn(3, 4), torch.randn(3, 4)  # a per-token regression's
    targets[2, 2:] = -100.0
    taught = values + 1.0
    values[targets == -100] = 50.0  # (the student's values at the padding: anything)

    def mse(out, ref, _teacher):  # (the task's mse, as kd gets it)
        return F.mse_loss(out, ref)

    soft = distillation_loss(values, targets, taught, temperature=1.0, alpha=1.0, loss=mse)
    assert torch.allclose(soft, torch.tensor(1.0))


def test_distillation_fine_tuning_pulls_the_student_to_the_teacher(digits_task, digits_baseline):
    kd = get_compressor("kd")(temperature=2.0, alpha=1.0)
    model = _apply(digits_baseline.model, ("prune", {"amount": 0.9}))
    teacher = digits_baseline.teacher_outputs

    def gap(m):
        return F.mse_loss(m(digits_task.train.x), teacher).item()

    before = gap(model)
    fit(
        model,
        digits_task.train,
        epochs=3,
        batch_size=64,
        lr=3e-3,
        loss_fn=kd.finetune_loss(CompressionContext()),
        teacher_outputs=teacher,
    )
    assert gap(model) < before


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("prune", {"amount": 1.5}, r"'prune.amount' .* must be a float in \[0.0, 1.0\).*Got 1.5"),
        ("prune", {"scope": "all"}, r"'prune.scope' .* must be one of 'global', 'layer'"),
        ("quant", {"bits": 0}, r"'quant.bits' .* must be an int in \[1, 8\] or 'ternary'\. Got 0"),
        ("quant", {"bits": 33}, r"Got 33 instead"),
        ("kd", {"temperature": 0.0}, r"'kd.temperature' .* must be a float in \(0.0, inf\)"),
        ("kd", {"alpha": 1.5}, r"'kd.alpha' .* \[0.0, 1.0\]"),
        ("quant", {"bitz": 4}, r"Unknown parameter 'quant.bitz' .* Allowed: activations, bias"),
    ],
)
def test_bad_parameters_are_rejected_when_built(name, params, message):
    with pytest.raises(InvalidParameterError, match=message):
        get_compressor(name)(**params)


def test_cosine_schedule_lets_weights_settle_at_the_end(digits_task, digits_baseline):
    last_step = {}
    for schedule in ("constant", "cosine"):
        model = copy.deepcopy(digits_baseline.model)
        snapshots = []
        fit(
            model,
            digits_task.train,
            epochs=4,
            batch_size=64,
            lr=3e-3,
            schedule=schedule,
            after_epoch=lambda _s, m=model, out=snapshots: out.append(
                m.net[1].weight.detach().clone()
            ),
        )
        last_step[schedule] = (snapshots[-1] - snapshots[-2]).abs().mean().item()
    assert last_step["cosine"] < 0.5 * last_step["constant"]


def test_fit_on_an_explicit_device_returns_the_model_on_the_cpu(digits_task, digits_baseline):
    """The device path (``device=cuda`` on a GPU machine) on the one device this CI has: the same
    result as training in place, and the model comes back on the CPU."""
    from experiments._training import model_device

    a, b = copy.deepcopy(digits_baseline.model), copy.deepcopy(digits_baseline.model)
    fit(a, digits_task.train, epochs=1, batch_size=64, lr=1e-3, seed=3)
    fit(b, digits_task.train, epochs=1, batch_size=64, lr=1e-3, seed=3, device="cpu")
    assert model_device(b).type == "cpu"
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_a_mask_without_a_gradient_gives_torch_wheres_bits(dtype):
    """`prune.Mask` with no gradient to pass multiplies the weight's bits by the mask (4.7
    times as fast as `torch.where`): the same bits, +0.0 where pruned (a -0.0 or NaN weight
    included), and a scalar mask broadcast; with a gradient, `torch.where`'s path."""
    from compressors.prune import Mask

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(7, 9, generator=g).to(dtype)
    weight[0, :3] = torch.tensor([-0.0, float("nan"), float("-inf")], dtype=dtype)
    keep = torch.rand(7, 9, generator=g) > 0.5
    keep[0, :2] = False
    for mask in (keep, torch.tensor(True), torch.tensor(False)):
        expected = torch.where(mask, weight, 0.0)
        with torch.no_grad():
            got = Mask(mask)(torch.nn.Parameter(weight.t().t()))
        assert got.dtype == dtype and torch.equal(
            got.view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8)
        )
        trained = weight.clone().requires_grad_(True)
        Mask(mask)(trained).sum().backward()
        assert torch.equal(trained.grad, torch.broadcast_to(mask, weight.shape).to(dtype))


class _FrozenBackbone(torch.nn.Module):
    """Transfer learning as users write it: a pretrained backbone frozen, a head trained."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU()
        )
        self.backbone.requires_grad_(False)
        self.head = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.backbone(x))


@pytest.mark.parametrize(
    "name, params",
    [
        ("structured", {"amount": 0.5}),
        ("lowrank", {"keep": 0.5}),
        ("quant", {"bits": 4}),
        ("prune", {"amount": 0.5}),
        ("cluster", {"bits": 3}),
    ],
)
def test_what_the_user_froze_stays_frozen_through_compression_and_fine_tuning(name, params):
    """Found as a user: torch-pruning's pruned copies (and a low-rank layer's new factors)
    required gradients, so fine-tuning trained the backbone the user had frozen (the sweep's
    points scored 5 points above the baseline)."""
    from experiments import Split

    torch.manual_seed(0)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    model = apply_pipeline(
        [get_compressor(name)(**params)],
        _FrozenBackbone(),
        CompressionContext(example_inputs=x[:8]),
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, Split(x, y), epochs=2, batch_size=16, lr=1e-2)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("head.") for k in moved), sorted(moved)
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_a_sweep_says_which_parameters_the_user_froze(caplog):
    from search.run.study import _say_what_is_frozen

    with caplog.at_level("INFO", logger="search.run.study"):
        _say_what_is_frozen(_FrozenBackbone())
    (record,) = [r for r in caplog.records if "frozen" in r.getMessage()]
    assert record.getMessage().startswith(
        "4 of the model's 6 parameter tensors are frozen (requires_grad=False: backbone.0.weight, "
        "backbone.0.bias, backbone.2.weight, ...)"
    )
    caplog.clear()
    with caplog.at_level("INFO", logger="search.run.study"):
        _say_what_is_frozen(torch.nn.Linear(2, 2))
    assert caplog.records == []

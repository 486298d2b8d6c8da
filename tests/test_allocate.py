"""Budget-driven allocation: the knapsack is exact, the shipped file fits the target, the table
is measured once per baseline."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from compressors import (
    CompressionContext,
    InvalidParameterError,
    UnsupportedModelError,
    get_compressor,
    targets,
)
from compressors import allocate as alloc
from compressors.packing import load_packed, save_packed, tensor_bytes
from experiments import Split, evaluate, fit
from search.run.trial import compression_context
from search.run.workload import baseline_file_size


def _brute_force(costs, values, budget):
    best = None
    for choice in itertools.product(*(range(costs.shape[1]) for _ in range(costs.shape[0]))):
        cost = sum(costs[r, c] for r, c in enumerate(choice))
        value = sum(values[r, c] for r, c in enumerate(choice))
        if cost <= budget and (best is None or value < best[0]):
            best = (value, list(choice))
    return best


def test_the_knapsack_picks_the_known_optimum_and_is_deterministic():
    costs = np.array([[10, 6, 3], [8, 5, 2], [12, 7, 4], [9, 4, 1]])
    values = np.array([[0.0, 0.2, 1.5], [0.0, 0.1, 0.9], [0.0, 0.5, 0.6], [0.0, 0.05, 2.0]])
    for budget in (39, 25, 20, 14, 10):
        value, expected = _brute_force(costs, values, budget)
        choice = alloc.solve(costs, values, budget)
        assert sum(values[r, c] for r, c in enumerate(choice)) == pytest.approx(value)
        assert sum(costs[r, c] for r, c in enumerate(choice)) <= budget
        assert choice == alloc.solve(costs, values, budget)  # deterministic
    assert alloc.solve(costs, values, 39) == [0, 0, 0, 0]  # everything fits: nothing is lost
    rng = np.random.default_rng(0)
    for _ in range(20):  # random tables: the solver's optimum is the brute force's
        costs, values = rng.integers(1, 30, (4, 4)), rng.random((4, 4))
        budget = int(costs.min(axis=1).sum() + rng.integers(0, 40))
        choice = alloc.solve(costs, values, budget)
        assert sum(values[r, c] for r, c in enumerate(choice)) == pytest.approx(
            _brute_force(costs, values, budget)[0]
        )
    with pytest.raises(UnsupportedModelError, match="even the smallest setting"):
        alloc.solve(costs, values, int(costs.min(axis=1).sum()) - 1)


def test_candidate_bytes_are_the_bytes_the_file_spends(digits_baseline):
    weight = digits_baseline.model.net[1].weight.detach()
    settings = [alloc.Setting(0.0, None), alloc.Setting(0.5, 4), alloc.Setting(0.9, 2)]
    sizes = alloc.candidate_bytes(weight, settings)
    assert sizes[0] > sizes[1] > sizes[2]
    assert sizes[0] == tensor_bytes(weight)
    assert 3 * weight.numel() < sizes[0] < 4 * weight.numel()  # float32, dense (zstd'd exponents)


@pytest.mark.parametrize("ratio", [pytest.param(8.0, marks=pytest.mark.slow), 25.0])
def test_the_shipped_file_fits_the_target_after_fine_tuning(
    digits_task, digits_baseline, tmp_path, ratio
):
    ctx = compression_context(digits_task, digits_baseline, seed=0)
    allocator = get_compressor("allocate")(ratio=ratio)
    model = allocator.compress(copy.deepcopy(digits_baseline.model), ctx)
    assert set(allocator.allocation) == {"net.1.weight", "net.3.weight", "net.5.weight"}
    fit(model, digits_task.train, epochs=2, batch_size=64, lr=1e-3, seed=0)
    model = allocator.finalize(model, ctx)
    size = save_packed(model, tmp_path / "m.sqz", like=digits_baseline.model)
    target = baseline_file_size(digits_baseline) / ratio
    assert size <= target
    assert size > 0.7 * target  # the budget is used, not wasted
    shipped = load_packed(tmp_path / "m.sqz", digits_task.build_model())
    with torch.no_grad():
        assert torch.equal(shipped(digits_task.val.x), model(digits_task.val.x))
    assert evaluate(shipped, digits_task.val) > 0.85


def test_the_table_is_measured_once_per_baseline_and_both_methods_agree_on_zero(
    digits_task, digits_baseline, tmp_path
):
    ctx = compression_context(digits_task, digits_baseline, seed=0)
    ctx = type(ctx)(**{**ctx.__dict__, "cache_dir": tmp_path})
    tables = {}
    for method in ("fisher", "loss"):
        allocator = get_compressor("allocate")(ratio=10.0, sensitivity=method)
        allocator.compress(copy.deepcopy(digits_baseline.model), ctx)
        settings = allocator.settings()
        tables[method] = allocator.table(digits_baseline.model, ctx)
        sensitivity = tables[method]["sensitivity"]
        assert sensitivity.shape == (3, len(settings))
        assert np.allclose(sensitivity[:, 0], 0.0)  # dense float32: nothing changes
        harsh = settings.index(alloc.Setting(0.95, 2))
        assert (sensitivity[:, harsh] > sensitivity[:, 0]).all()
    assert len(list(tmp_path.glob("allocate-*.npz"))) == 2
    np.testing.assert_array_equal(tables["fisher"]["bytes"], tables["loss"]["bytes"])


def test_bad_parameters_and_budgets_are_refused(digits_task, digits_baseline):
    with pytest.raises(InvalidParameterError, match=r"'allocate.ratio' .* a float in \(1.0, inf\)"):
        get_compressor("allocate")(ratio=0.5)
    with pytest.raises(InvalidParameterError, match="'allocate.min_bits' .* not be above"):
        get_compressor("allocate")(min_bits=6, max_bits=4)
    with pytest.raises(InvalidParameterError, match="'allocate.sensitivity'"):
        get_compressor("allocate")(sensitivity="hessian")


def test_a_target_out_of_reach_ships_the_smallest_allocation_with_a_warning(
    digits_task, digits_baseline, tmp_path, caplog
):
    ctx = compression_context(digits_task, digits_baseline, seed=0)
    sizes = {}
    for ratio in (200.0, 5000.0):
        allocator = get_compressor("allocate")(ratio=ratio)
        with caplog.at_level("WARNING", logger="compressors.allocate"):
            model = allocator.compress(copy.deepcopy(digits_baseline.model), ctx)
        assert "cannot fit" in caplog.text and "is used instead" in caplog.text
        caplog.clear()
        model = allocator.finalize(model, ctx)
        sizes[ratio] = save_packed(model, tmp_path / f"{ratio}.sqz", like=digits_baseline.model)
        # every tensor at the most sparsity and fewest bits allowed
        assert set(allocator.allocation.values()) == {alloc.Setting(0.95, 2)}
    assert sizes[200.0] == sizes[5000.0] < baseline_file_size(digits_baseline) / 40


def test_a_detached_copy_can_be_changed_without_breaking_the_original(digits_task, digits_baseline):
    from compressors import detached_copy

    ctx = compression_context(digits_task, digits_baseline, seed=0)
    model = get_compressor("prune")(amount=0.5).compress(copy.deepcopy(digits_baseline.model), ctx)
    expected = model(digits_task.val.x)
    clone = detached_copy(model)
    get_compressor("quant")(bits=4, mode="ptq").finalize(clone, ctx)  # parametrizes the biases
    assert not torch.equal(clone(digits_task.val.x), expected)
    assert torch.equal(model(digits_task.val.x), expected)
    assert set(model.state_dict()) == set(copy.deepcopy(model).state_dict())


def test_fisher_is_refused_where_the_loss_is_flat(digits_task, digits_baseline):
    """A model whose targets are its own outputs (as minilm's embeddings are) sits at the loss's
    minimum: its gradients, hence Fisher sensitivities, are zero and would make every setting
    look free."""
    ctx = compression_context(digits_task, digits_baseline, seed=0)
    model = copy.deepcopy(digits_baseline.model).eval()
    with torch.no_grad():
        own = model(digits_task.train.x)
    ctx = type(ctx)(
        **{
            **ctx.__dict__,
            "train": Split(digits_task.train.x, own),
            "loss": lambda out, targets, _teacher: torch.nn.functional.mse_loss(out, targets),
        }
    )
    allocator = get_compressor("allocate")(ratio=8.0, sensitivity="fisher")
    with pytest.raises(
        UnsupportedModelError, match="loss is flat .* use allocate.sensitivity=loss"
    ):
        allocator.compress(model, ctx)


class _WideNorms(nn.Module):
    """A small conv net whose batch norms are most of its file: their statistics start at
    constants (which LZMA packs to nothing) and become incompressible as it trains."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 256, 1), nn.BatchNorm2d(256)
        self.c2, self.b2 = nn.Conv2d(256, 256, 1, groups=256), nn.BatchNorm2d(256)
        self.head = nn.Linear(256, 4)

    def forward(self, x):
        x = torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
        return self.head(x.mean((2, 3)))


def test_a_target_out_of_reach_ships_even_when_fine_tuning_grows_what_it_does_not_compress(
    tmp_path, caplog
):
    torch.manual_seed(0)
    train = Split(torch.randn(128, 1, 4, 4), torch.randint(0, 4, (128,)))
    ctx = CompressionContext(train=train, example_inputs=train.x[:4], seed=0)
    allocator = get_compressor("allocate")(ratio=1000.0)
    with caplog.at_level("WARNING", logger="compressors.allocate"):
        model = allocator.compress(_WideNorms(), ctx)
    assert "is used instead" in caplog.text
    before = alloc._packed_size(model)
    fit(model, train, epochs=1, batch_size=32, lr=1e-2, seed=0)
    assert alloc._packed_size(model) > 1.5 * before  # the norms' statistics no longer pack
    shipped = allocator.finalize(model, ctx)  # the smallest allocation, as it said
    assert all(s.sparsity == 0.95 for s in allocator.allocation.values())
    for name, target in targets(shipped).items():
        zeros = int((target.weight == 0).sum())
        assert zeros == round(0.95 * target.numel()), name  # not pruned further
    assert save_packed(shipped, tmp_path / "m.sqz") == alloc._packed_size(model)


def test_an_allocation_predicted_at_chance_is_warned_about(digits_task, digits_baseline, caplog):
    ctx = compression_context(digits_task, digits_baseline, seed=0)
    base, chance = alloc.reference_losses(digits_baseline.model, ctx)
    assert chance == pytest.approx(math.log(10), rel=1e-5) and base < 0.5 * chance
    for ratio, warned in ((8.0, False), (5000.0, True)):
        allocator = get_compressor("allocate")(ratio=ratio)
        caplog.clear()
        with caplog.at_level("WARNING", logger="compressors.allocate"):
            allocator.compress(copy.deepcopy(digits_baseline.model), ctx)
        assert ("at or above the loss of uniform predictions" in caplog.text) is warned, ratio
        assert (allocator.predicted_loss >= chance) is warned


def test_the_tables_bytes_are_the_encoders_bytes():
    """Each setting's bytes are `tensor_bytes` of the values the file would store at it (the
    SQZ3 encoder, whose compressed byte planes no count predicts)."""
    from compressors import _allocate_costs as costs

    torch.manual_seed(0)
    settings = get_compressor("allocate")(min_bits=1).settings()
    half = torch.randn(40, 30).to(torch.float16).to(torch.float32)  # stored in 2 bytes
    sparse = torch.randn(50, 20) * (torch.rand(50, 20) > 0.97)  # mostly zeros: gaps
    for weight in (torch.randn(300, 64) * 0.05, torch.randn(16, 8, 3, 3), half, sparse):
        expected = [tensor_bytes(v, g) for v, g in costs.variants(weight, settings)]
        assert alloc.candidate_bytes(weight, settings) == expected


def _counting(model):
    rows = []
    model.register_forward_hook(lambda _m, inputs, _out: rows.append(inputs[0].shape[0]))
    return rows


@pytest.mark.parametrize(  # (the lane: interpolated; loss and fisher in the full run)
    "method",
    [
        pytest.param("loss", marks=pytest.mark.slow),
        "interpolated",
        pytest.param("fisher", marks=pytest.mark.slow),
    ],
)
def test_the_table_measures_at_most_the_configured_samples(
    digits_task, digits_baseline, method, caplog
):
    from compressors import _allocate_sensitivity as sens

    ctx = compression_context(digits_task, digits_baseline, seed=0)
    model = copy.deepcopy(digits_baseline.model)
    rows = _counting(model)
    allocator = get_compressor("allocate")(sensitivity=method, samples=96)
    with caplog.at_level("DEBUG", logger="compressors._allocate_sensitivity"):
        table = allocator.table(model, ctx)
    settings = len(allocator.settings())
    assert max(rows) <= (64 if method == "fisher" else 96)
    passes = {"loss": 1 + 3 * settings, "interpolated": 1 + 3 * sens.ANCHORS, "fisher": 1}[method]
    assert sum(rows) == 96 * passes  # every pass reads the 96 samples, no more
    assert f"{len(rows)} forwards (" in caplog.text and "sensitivity table" in caplog.text
    assert table["sensitivity"].shape == (3, settings)
    assert np.allclose(table["sensitivity"][:, 0], 0.0)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # as they were


def test_auto_measures_small_models_and_estimates_large_ones(digits_baseline):
    from compressors import _allocate_sensitivity as sens

    assert sens.plan(digits_baseline.model, 3, 56, method="auto", samples=1024).method == "loss"
    large = nn.Linear(3000, 3000)  # 9 M parameters
    assert sens.plan(large, 1, 56, method="auto", samples=1024).method == "interpolated"
    picked = sens.plan(large, 40, 56, method="auto", samples=1024)
    assert picked.method == "fisher" and picked.batch_size == sens.FISHER_BATCH_LARGE


def test_auto_costs_a_convolution_by_its_multiply_adds_not_its_weights(
    digits_task, digits_baseline
):
    """A segmentation network's few weights act at every pixel: costed by its parameters, the
    measured table (1 + 3 x 56 passes over 1,024 samples) would look cheap; by the multiply-adds
    torch counts, it is not. An MLP's multiply-adds are its weights: digits keeps the table."""
    from compressors import CompressionContext
    from compressors import _allocate_sensitivity as sens
    from tests.zoo.workloads import TinySegNet, wl_segmentation

    mlp = digits_baseline.model
    mlp_ctx = compression_context(digits_task, digits_baseline, seed=0)
    macs = sens.macs_per_sample(mlp, mlp_ctx)
    assert macs == pytest.approx(sum(p.numel() for p in mlp.parameters()), rel=0.02)
    assert sens.plan(mlp, 3, 56, method="auto", samples=1024, macs=macs).method == "loss"

    task = wl_segmentation()
    torch.manual_seed(0)
    net = TinySegNet()
    ctx = CompressionContext(train=task.train, example_inputs=task.example_inputs(4), seed=0)
    params = sum(p.numel() for p in net.parameters())
    macs = sens.macs_per_sample(net, ctx)
    assert macs > 50 * params  # 3x3 convolutions at each of 64 pixels
    assert net.training  # as it was
    assert sens.plan(net, 3, 56, method="auto", samples=1024).method == "loss"  # by weights
    picked = sens.plan(net, 3, 56, method="auto", samples=1024, macs=macs)
    assert picked.method == "interpolated"


def test_the_table_is_reused_by_trials_with_the_same_structured_shapes(
    digits_task, digits_baseline, tmp_path, caplog
):
    ctx = compression_context(digits_task, digits_baseline, seed=0)
    ctx = type(ctx)(**{**ctx.__dict__, "cache_dir": tmp_path})
    logs = []
    shapes = []
    for amount in (0.5, 0.4995, 0.3):  # the first two remove the same channels
        pruned = get_compressor("structured")(amount=amount).compress(
            copy.deepcopy(digits_baseline.model), ctx
        )
        shapes.append([tuple(p.shape) for p in pruned.parameters()])
        caplog.clear()
        with caplog.at_level("DEBUG", logger="compressors"):
            get_compressor("allocate")(ratio=6.0, samples=128).compress(pruned, ctx)
        logs.append(caplog.text)
    assert shapes[0] == shapes[1] != shapes[2]
    assert "forwards" in logs[0] and "cached" not in logs[0]
    assert "cached" in logs[1] and "forwards" not in logs[1]  # a hit: nothing measured
    assert "forwards" in logs[2]  # other shapes, other weights: measured
    assert len(list(tmp_path.glob("allocate-*.npz"))) == 2


@pytest.mark.slow  # two sweeps' worth of tables (a minute)
def test_the_estimated_tables_allocate_within_the_target_near_the_measured_one(
    digits_task, digits_baseline, tmp_path
):
    ctx = compression_context(digits_task, digits_baseline, seed=0)
    target = baseline_file_size(digits_baseline) / 12.0
    accuracy = {}
    for name in ("loss", "interpolated", "fisher"):
        allocator = get_compressor("allocate")(ratio=12.0, sensitivity=name)
        model = allocator.compress(copy.deepcopy(digits_baseline.model), ctx)
        fit(model, digits_task.train, epochs=2, batch_size=64, lr=1e-3, seed=0)
        model = allocator.finalize(model, ctx)
        assert save_packed(model, tmp_path / f"{name}.sqz", like=digits_baseline.model) <= target
        accuracy[name] = evaluate(model, digits_task.val)
    assert accuracy["interpolated"] >= accuracy["loss"] - 0.05, accuracy
    assert accuracy["fisher"] >= accuracy["loss"] - 0.05, accuracy


def test_large_tensors_are_costed_on_sampled_rows_within_a_percent():
    from compressors import _allocate_costs as costs

    torch.manual_seed(0)
    weight = torch.randn(2100, 512) * 0.02  # over SAMPLED_ABOVE: every other row
    assert weight.numel() > costs.SAMPLED_ABOVE
    some = [alloc.Setting(0.0, None), alloc.Setting(0.5, 4), alloc.Setting(0.9, 2)]
    got = alloc.candidate_bytes(weight, some)
    for (value, grid), size in zip(costs.variants(weight, some), got, strict=True):
        assert size == pytest.approx(tensor_bytes(value, grid), rel=0.01)


def test_the_fisher_table_of_sampled_rows_is_the_whole_diagonals():
    """The Fisher diagonal kept only on the rows a large tensor is costed on (and thresholds
    partitioned in numpy rather than ``kthvalue``) gives the table the whole diagonal gives."""
    from compressors import _allocate_costs as costs
    from compressors import _allocate_sensitivity as sens

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 2100), nn.ReLU(), nn.Linear(2100, 4)).eval()
    assert model[0].weight.numel() > costs.SAMPLED_ABOVE
    ctx = CompressionContext(train=Split(torch.randn(48, 512), torch.randint(0, 4, (48,))))
    found = targets(model)
    settings = get_compressor("allocate")(min_bits=2, max_bits=4).settings()
    how = sens.Plan("fisher", 48, 16)
    rows = [costs.sampled_rows(t.weight) for t in found.values()]
    assert rows[0] is not None and rows[1] is None
    whole, ref_whole = sens.fisher_diagonal(model, found, ctx, how, sens.Counter())
    kept, ref_kept = sens.fisher_diagonal(model, found, ctx, how, sens.Counter(), rows)
    assert ref_whole == ref_kept and kept[0].shape == (len(rows[0]), 512)
    assert torch.equal(kept[0], whole[0][rows[0]]) and torch.equal(kept[1], whole[1])
    for t, f_whole, f_kept in zip(found.values(), whole, kept, strict=True):
        a, b = (
            costs.costs(t.weight, settings, fisher=f_whole),
            costs.costs(t.weight, settings, fisher=f_kept),
        )
        np.testing.assert_array_equal(a.fisher, b.fisher)
        np.testing.assert_array_equal(a.bytes, b.bytes)
    magnitudes = model[0].weight.detach().abs().flatten()
    for sparsity, threshold in costs._thresholds(model[0].weight, set(alloc.SPARSITIES)).items():
        k = round(sparsity * magnitudes.numel())
        assert threshold == (float(torch.kthvalue(magnitudes, k).values) if k else -1.0)


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class _Encoder(nn.Module):
    """Token embeddings, a list of residual blocks, a classifier of the mean token."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.layers = nn.ModuleList(_Residual(16) for _ in range(3))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(1))


def test_the_fisher_pass_recomputes_each_block_and_keeps_the_squared_batch_gradients():
    """Activation checkpointing of the blocks (their activations computed again in the backward
    pass rather than kept) leaves the estimator as it was: the sum over mini-batches of the
    rows times each squared mini-batch gradient, to the bit."""
    from compressors import _allocate_sensitivity as sens

    torch.manual_seed(0)
    model = _Encoder().eval()
    ctx = CompressionContext(train=Split(torch.randint(0, 50, (40, 6)), torch.randint(0, 4, (40,))))
    found = targets(model)
    how = sens.Plan("fisher", 40, 8)
    assert sens.blocks(model) == list(model.layers)
    calls = []
    hook = model.layers[1].up.register_forward_hook(lambda *_: calls.append(1))
    got, _ = sens.fisher_diagonal(model, found, ctx, how, sens.Counter())
    hook.remove()
    batches = ctx.train.calibration(samples=40, batch_size=8)
    assert len(calls) == 2 * len(batches)  # each batch: the forward, and again in the backward
    expected = [torch.zeros_like(t.latent) for t in found.values()]
    for b in batches:
        model.zero_grad()
        ctx.loss(ctx.train.forward(model, b.inputs), b.targets, None).backward()
        for f, t in zip(expected, found.values(), strict=True):
            f.addcmul_(t.latent.grad, t.latent.grad, value=float(b.rows))
    model.zero_grad()
    for f_got, f_expected in zip(got, expected, strict=True):
        assert torch.equal(f_got, f_expected)
    assert all(vars(m).get("forward") is None for m in model.modules())  # unpatched after


def test_the_blocks_recomputed_are_the_innermost_composite_children_of_lists():
    from compressors import _allocate_sensitivity as sens

    inner = nn.Sequential(_Residual(8), _Residual(8))
    assert sens.blocks(nn.Sequential(inner, nn.Linear(8, 2))) == list(inner)
    assert sens.blocks(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))) == []


class _Augmented(torch.utils.data.Dataset):
    """A dataset that augments at random (from torch's global generator), as users' do."""

    def __init__(self) -> None:
        self.x, self.y = torch.randn(64, 8), torch.randint(0, 4, (64,))

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int):
        return self.x[i] + 0.01 * torch.randn(8), self.y[i]


def test_measuring_a_table_or_reading_it_from_the_cache_leaves_torch_random_state_alike(tmp_path):
    from experiments import as_data

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    data = as_data(_Augmented())
    ctx = CompressionContext(train=data, example_inputs=torch.randn(4, 8), cache_dir=tmp_path)
    allocator = get_compressor("allocate")(ratio=4.0, sensitivity="loss", samples=32)
    draws = []
    for _ in range(2):  # measured (and cached), then read from the cache
        torch.manual_seed(1)
        allocator.table(model, ctx)
        draws.append(torch.rand(4))
    assert len(list(tmp_path.glob("allocate-*.npz"))) == 1
    assert torch.equal(draws[0], draws[1])  # fine-tuning then draws alike: `run` reproduces


def test_a_transposed_linears_table_costs_the_grid_per_output_column_it_gets():
    """GPT-2's ``Conv1D`` (weight ``(inputs, outputs)``) is quantized with a scale per output
    column; the table's bytes of each tensor at its chosen setting are the encoder's bytes of
    the values and grid `allocate` registers, so the knapsack solves on the file's bytes."""
    pytest.importorskip("transformers")
    from tests.zoo.workloads import wl_tokens

    task = wl_tokens()
    torch.manual_seed(0)
    model = task.build_model().eval()
    ctx = CompressionContext(train=task.train, example_inputs=task.example_inputs(4), seed=0)
    allocate = get_compressor("allocate")(ratio=5.0, samples=64, max_sparsity=0.0)
    table = allocate.table(model, ctx)
    allocate.compress(model, ctx)
    settings = allocate.settings()
    checked = 0
    for row, (name, target) in enumerate(targets(model).items()):
        setting = allocate.allocation[name]
        grids = getattr(target.module, "parametrizations", {})
        if setting.bits is None or target.channel_axis != 1:
            continue
        grid = next(g for g in grids[target.attr] if hasattr(g, "scale"))
        assert tuple(grid.scale.shape) == (1, target.weight.shape[1])
        size = table["bytes"][row, settings.index(setting)]
        assert size == tensor_bytes(target.weight.detach(), grid), name
        checked += 1
    assert checked >= 4


def _zero_share(target) -> float:
    return float((target.weight == 0).sum()) / target.numel()


def test_pruning_past_the_budget_after_fine_tuning_keeps_each_grid_and_max_sparsity(
    digits_task, digits_baseline, tmp_path, caplog
):
    """Fine-tuning can grow a file past allocate's budget: `finalize` prunes more, with the
    mask before each tensor's grid (the grid still codes what stays; a mask after it left
    values stored as float16, which grew the file, and the next step zeroed a whole tensor),
    never past ``max_sparsity``, saying what it pruned."""
    ctx = compression_context(digits_task, digits_baseline, seed=0)
    model = copy.deepcopy(digits_baseline.model)
    found = targets(model)
    alloc.apply_settings(model, found, {name: alloc.Setting(0.0, 4) for name in found})
    allocator = get_compressor("allocate")(ratio=8.0)
    before = alloc._packed_size(model)
    allocator._target_bytes = int(0.8 * before)  # as if fine-tuning had grown it by a quarter
    with caplog.at_level("INFO", logger="compressors.allocate"):
        shipped = allocator.finalize(model, ctx)
    assert alloc._packed_size(shipped) <= allocator._target_bytes
    assert "more of net.3.weight's weights pruned" in caplog.text  # the largest
    for name, target in targets(shipped).items():
        chain = target.parametrizations()
        assert type(chain[-1]).__name__ == "FakeQuant", name  # the grid codes the file
        assert all(type(p).__name__ != "Mask" for p in chain[1:]), name  # masks come first
        assert _zero_share(target) <= 0.95 + 1 / target.numel(), name
    size = save_packed(shipped, tmp_path / "m.sqz", like=digits_baseline.model)
    reloaded = load_packed(tmp_path / "m.sqz", digits_task.build_model())
    with torch.no_grad():
        assert torch.equal(reloaded(digits_task.val.x), shipped(digits_task.val.x))
    assert size <= allocator._target_bytes

    # a budget out of reach: every tensor pruned to max_sparsity, not past it, then a warning
    model = copy.deepcopy(digits_baseline.model)
    found = targets(model)
    alloc.apply_settings(model, found, {name: alloc.Setting(0.3, 4) for name in found})
    allocator = get_compressor("allocate")(ratio=8.0, max_sparsity=0.9)
    allocator._target_bytes = 10
    caplog.clear()
    with caplog.at_level("INFO", logger="compressors.allocate"):
        shipped = allocator.finalize(model, ctx)
    assert "could not fit the packed file" in caplog.text
    shares = [_zero_share(t) for t in targets(shipped).values()]
    assert max(shares) <= 0.9 + 1e-3 and min(shares) >= 0.9 - 1e-3


def test_fisher_sensitivity_runs_on_a_decoder_whose_cache_is_on():
    """Found as a user (a T5 from its config, teacher-forced): the Fisher pass recomputes each
    block in the backward pass, and a decoder block filling its key/value cache found it
    filled the second time: torch's checkpoint refused ("A different number of tensors was
    saved"). The caches are off during the pass, and on again after it."""
    pytest.importorskip("transformers")
    from torch.utils.data import TensorDataset
    from transformers import T5Config, T5ForConditionalGeneration

    from experiments import Task, TrainConfig

    config = T5Config(
        vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    ids = torch.randint(2, 32, (64, 6), generator=torch.Generator().manual_seed(0))
    data = TensorDataset(ids, ids.flip(1))
    task = Task(
        name="t5",
        train=data,
        val=data,
        test=data,
        num_classes=32,
        build_model=lambda: T5ForConditionalGeneration(config),
        train_config=TrainConfig(epochs=1),
        inputs=lambda b: {"input_ids": b[0], "labels": b[1]},  # (teacher forcing)
        targets=lambda b: b[1],
    )
    torch.manual_seed(0)
    model = task.build_model().eval()
    assert model.config.use_cache and model.decoder.config.use_cache
    ctx = CompressionContext(train=task.train, example_inputs=task.example_inputs(4), seed=0)
    allocate = get_compressor("allocate")(ratio=5.0, samples=64, sensitivity="fisher")
    allocate.compress(model, ctx)
    assert allocate.allocation
    assert model.config.use_cache and model.decoder.config.use_cache


def test_reference_losses_take_batches_padded_each_to_its_own_length():
    """Batches of a language model padded each to its longest sequence give logits of other
    lengths: the reference losses were computed after joining them (a raw "Sizes of tensors
    must match" before the table)."""
    from collections import namedtuple

    from compressors._allocate_sensitivity import reference_from
    from experiments import ce_loss, mse_loss

    Batch = namedtuple("Batch", "targets rows")
    torch.manual_seed(0)
    outputs = [torch.randn(4, 5, 7), torch.randn(3, 9, 7)]
    batches = [Batch(torch.randint(0, 7, (4, 5)), 4), Batch(torch.randint(0, 7, (3, 9)), 3)]
    base, chance = reference_from(outputs, batches, CompressionContext(loss=ce_loss))
    expected = (
        4 * ce_loss(outputs[0], batches[0].targets, None)
        + 3 * ce_loss(outputs[1], batches[1].targets, None)
    ) / 7
    assert base == pytest.approx(float(expected)) and chance == pytest.approx(np.log(7))
    values = [torch.randn(4, 5), torch.randn(3, 9)]
    targets = [Batch(torch.randn(4, 5), 4), Batch(torch.randn(3, 9), 3)]
    ctx = CompressionContext(loss=mse_loss, outputs="values")
    base, chance = reference_from(values, targets, ctx)
    assert chance > 0 and base > 0

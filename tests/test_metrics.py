"""Measurements of the shapes users bring: recurrent layers, attention, tied and packed weights."""

from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.flop_counter import FlopCounterMode

from experiments.metrics import (
    _EXTRA_FLOPS,
    batch_latencies,
    count_flops,
    interleaved_latency_ms,
    latency_ms,
    nonzero_params,
    peak_memory_at,
    peak_memory_bytes,
    recurrent_flops,
    timed_rows,
    weight_tensors,
)
from tests.zoo.models import RecurrentClassifier, TiedNextToken, TransformerClassifier

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def _torch_count(model: nn.Module, x: torch.Tensor) -> int:
    """What torch's own counter (with squeeze's extra op formulas) counts, in the mode the model
    is in, nothing switched off."""
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops()


def _int8(model: nn.Module, dtype: torch.dtype = torch.qint8) -> nn.Module:
    kinds = {nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        return torch.ao.quantization.quantize_dynamic(model, kinds, dtype=dtype)


def _gates(layer: nn.Module) -> int:
    return {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[type(layer)]


def _rnn_formula(layer: nn.RNNBase, samples: int, steps: int) -> int:
    """2 FLOPs per weight element per sample per step, every layer and direction."""
    gates, hidden, dirs = _gates(layer), layer.hidden_size, 1 + layer.bidirectional
    out = layer.proj_size or hidden
    weights = 0
    for k in range(layer.num_layers):
        features = layer.input_size if k == 0 else dirs * out
        weights += dirs * (
            gates * hidden * (features + out) + (out * hidden if layer.proj_size else 0)
        )
    return 2 * samples * steps * weights


class _Last(nn.Module):
    """A recurrent layer whose outputs (a tuple) are reduced to one tensor."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        out = self.layer(x)
        return out[0] if isinstance(out, tuple) else out


RNNS = {
    "lstm_2_layers": lambda: nn.LSTM(8, 48, 2, batch_first=True),
    "lstm_bidirectional_projected": lambda: nn.LSTM(8, 16, 2, bidirectional=True, proj_size=6),
    "gru_bidirectional": lambda: nn.GRU(8, 32, batch_first=True, bidirectional=True),
    "rnn": lambda: nn.RNN(8, 12, 3),
}


@pytest.mark.parametrize("kind", sorted(RNNS))
def test_recurrent_flops_match_the_formula(kind):
    layer = RNNS[kind]()
    batch, steps = 3, 7
    x = torch.randn(batch, steps, 8) if layer.batch_first else torch.randn(steps, batch, 8)
    expected = _rnn_formula(layer, batch, steps)
    assert expected > 0
    assert count_flops(_Last(layer), x) == expected
    assert count_flops(_Last(layer), x[:, :1] if layer.batch_first else x[:1]) == expected // steps
    assert not layer._forward_hooks and not layer._forward_pre_hooks  # the hooks are gone


def test_lstm_is_invisible_to_torchs_counter_and_counted_here():
    model = RecurrentClassifier(8, 10, cell="lstm", hidden=48, num_layers=2).eval()
    x = torch.randn(1, 8, 8)
    head = 2 * 48 * 10
    assert _torch_count(model, x) == head  # torch's counter: the fused LSTM kernel is 0
    assert count_flops(model, x) == _rnn_formula(model.rnn, 1, 8) + head == 467_904


def test_the_formula_is_what_torch_counts_for_a_gru_that_runs_as_matrix_products():
    model = RecurrentClassifier(8, 10, cell="gru", hidden=32, num_layers=1, bidirectional=True)
    x = torch.randn(2, 8, 8)
    assert count_flops(model, x) == _torch_count(model.eval(), x) == 2 * 124_160


def test_packed_sequences_count_their_real_steps():
    layer = nn.LSTM(8, 16, batch_first=True)
    lengths = torch.tensor([5, 3, 1])
    packed = pack_padded_sequence(torch.randn(3, 5, 8), lengths, batch_first=True)
    weights = 4 * 16 * (8 + 16)
    assert recurrent_flops(layer, packed) == 2 * int(lengths.sum()) * weights


@pytest.mark.parametrize("cell", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
def test_cells_count_one_step_per_sample(cell):
    layer = cell(8, 16)
    gates = {nn.LSTMCell: 4, nn.GRUCell: 3, nn.RNNCell: 1}[cell]
    expected = 2 * 5 * gates * 16 * (8 + 16)
    assert count_flops(_Last(layer), torch.randn(5, 8)) == expected
    assert count_flops(_Last(_int8(layer)), torch.randn(5, 8)) == expected


@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16])
def test_dynamic_quantized_recurrent_layers_count_like_float_ones(dtype):
    model = RecurrentClassifier(8, 10, cell="lstm", hidden=48, num_layers=2).eval()
    shipped = _int8(model, dtype)
    assert type(shipped.rnn).__module__.startswith("torch.ao.nn.quantized.dynamic")
    x = torch.randn(4, 8, 8)
    assert count_flops(shipped, x) == count_flops(model, x)

    tensors = weight_tensors(shipped)
    assert sum(t.numel() for t in tensors) == sum(p.numel() for p in model.parameters())
    assert nonzero_params(shipped) > 0.95 * nonzero_params(model)
    weights = sum(w.numel() for layer in model.rnn.all_weights for w in layer if w.dim() == 2)
    biases = sum(w.numel() for layer in model.rnn.all_weights for w in layer if w.dim() == 1)
    size = 1 if dtype == torch.qint8 else 2
    assert peak_memory_bytes(shipped, x) >= size * weights + 4 * biases
    assert peak_memory_bytes(shipped, x) < peak_memory_bytes(model, x)


def test_dynamic_quantized_cells_hold_their_weights_once():
    layer = nn.GRUCell(8, 16)
    shipped = _int8(_Last(layer))
    tensors = weight_tensors(shipped)
    assert sum(t.numel() for t in tensors) == sum(p.numel() for p in layer.parameters())
    assert sum(t.is_quantized for t in tensors) == 2


def _transformer_formula(d_model: int, *, tokens=8, features=8, ff=64, layers=2, classes=10):
    per_layer = 2 * tokens * (4 * d_model**2 + 2 * d_model * ff)  # q, k, v, out; the FFN
    per_layer += 2 * 2 * tokens * tokens * d_model  # scores and their weighted sum, all heads
    return 2 * tokens * features * d_model + layers * per_layer + 2 * d_model * classes


@pytest.mark.parametrize("d_model", [16, 32, 64])
def test_transformer_encoder_flops_are_the_same_on_the_eval_fast_path_and_train_path(d_model):
    model = TransformerClassifier(8, 8, 10, d_model=d_model, nhead=4, dim_feedforward=64)
    x = torch.randn(2, 8, 8)
    expected = 2 * _transformer_formula(d_model)
    assert _torch_count(model.eval(), x) == 2 * (2 * 8 * 8 * d_model + 2 * d_model * 10)  # blind
    assert _torch_count(model.train(), x) == expected  # dropout: attention as bmm
    assert count_flops(model, x) == expected  # eval: the fast path switched off
    assert torch.backends.mha.get_fastpath_enabled()


def test_multihead_attention_counts_the_same_with_and_without_weights():
    class Attend(nn.Module):
        def __init__(self, need_weights: bool) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.need_weights = need_weights

        def forward(self, x):
            return self.attn(x, x, x, need_weights=self.need_weights)[0]

    x = torch.randn(3, 5, 32)
    expected = 3 * (2 * 5 * 4 * 32 * 32 + 2 * 2 * 5 * 5 * 32)
    assert count_flops(Attend(need_weights=False), x) == expected  # eval fast path, or sdpa
    assert count_flops(Attend(need_weights=True), x) == expected  # bmm and softmax


def test_count_flops_restores_the_attention_fast_path_setting():
    model = TransformerClassifier(8, 8, 10)
    x = torch.randn(1, 8, 8)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        assert count_flops(model, x) == _transformer_formula(32)
        assert not torch.backends.mha.get_fastpath_enabled()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert count_flops(model, x) == _transformer_formula(32)
    assert torch.backends.mha.get_fastpath_enabled()


def test_tied_weights_count_once():
    model = TiedNextToken(17, dim=24).eval()
    assert model.head.weight is model.emb.weight
    params = sum(p.numel() for p in model.parameters())  # torch lists a tied weight once
    assert sum(t.numel() for t in weight_tensors(model)) == params
    assert nonzero_params(model) == params
    untied = copy.deepcopy(model)
    untied.head.weight = nn.Parameter(untied.emb.weight.detach().clone())
    assert nonzero_params(untied) == params + 17 * 24
    tokens = torch.randint(0, 17, (1, 8))
    assert peak_memory_bytes(untied, tokens) - peak_memory_bytes(model, tokens) == 4 * 17 * 24


def test_linear_conv_and_int8_linear_counts_are_unchanged():
    mlp = nn.Sequential(nn.Linear(64, 30), nn.ReLU(), nn.Linear(30, 10))
    x = torch.randn(2, 64)
    assert count_flops(mlp, x) == 2 * 2 * (64 * 30 + 30 * 10) == _torch_count(mlp, x)
    shipped = _int8(mlp)
    assert isinstance(shipped[0], Int8Linear)
    assert count_flops(shipped, x) == count_flops(mlp, x)
    assert sum(t.numel() for t in weight_tensors(shipped)) == sum(
        p.numel() for p in mlp.parameters()
    )
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, groups=4))
    image = torch.randn(1, 1, 8, 8)
    assert count_flops(conv, image) == 2 * 64 * (4 * 9 + 4 * 9) == _torch_count(conv, image)


class _FakeClock:
    """A clock that moves ``step`` seconds each time it is read (no real time is measured)."""

    def __init__(self, step: float) -> None:
        self.now, self.step, self.reads = 0.0, step, 0

    def __call__(self) -> float:
        self.now += self.step
        self.reads += 1
        return self.now


class _Counting(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


@pytest.mark.parametrize(
    ("budget_s", "repeats", "timed"),
    [
        (None, 7, 7),  # no budget: exactly `repeats`
        (1.5, 30, 3),  # a budget spent after 2 forwards: 3 at least
        (1e9, 30, 30),  # a budget never spent: `repeats` at most
        (10.0, 30, 10),  # each forward takes 1 s on the fake clock: 10 fit in 10 s
        (1.5, 2, 2),  # fewer than 3 only where `repeats` is
        (0.5, 30, 0),  # one forward takes the whole budget: the warm-up pass is the measurement
    ],
)
def test_latency_stops_when_its_budget_is_spent_within_3_and_repeats(budget_s, repeats, timed):
    model = _Counting()
    ms = latency_ms(
        model, torch.zeros(1), repeats=repeats, warmup=1, budget_s=budget_s, clock=_FakeClock(1.0)
    )
    assert model.calls - 1 == timed  # (one warm-up pass)
    assert ms == 1000.0  # every forward took one tick of the fake clock


def test_warm_up_stops_after_its_share_of_the_budget():
    model = _Counting()
    latency_ms(model, torch.zeros(1), repeats=3, warmup=100, budget_s=4.0, clock=_FakeClock(1.0))
    assert 3 < model.calls < 100  # 1 s of the 4 s budget's quarter, then 3 timed


def test_interleaved_latency_splits_its_budget_over_rounds_and_models(caplog):
    model, reference = _Counting(), _Counting()
    with caplog.at_level("INFO", logger="experiments.metrics"):
        ms, reference_ms = interleaved_latency_ms(
            model,
            reference,
            torch.zeros(1),
            rounds=2,
            repeats=50,
            budget_s=40.0,
            clock=_FakeClock(1.0),
        )
    assert "one forward of each" not in caplog.text
    # 10 s per round and model: 10 timed forwards each (+ 2 warm-up passes at most)
    assert 2 * 10 <= model.calls <= 2 * 12 and 2 * 10 <= reference.calls <= 2 * 12
    assert ms == reference_ms == 1000.0


def test_interleaved_latency_of_forwards_longer_than_the_budget_takes_one_round(caplog):
    """One forward of each, and the log says that such a ratio is noise on a busy machine."""
    model, reference = _Counting(), _Counting()
    with caplog.at_level("INFO", logger="experiments.metrics"):
        ms, reference_ms = interleaved_latency_ms(
            model,
            reference,
            torch.zeros(1),
            rounds=5,
            repeats=30,
            budget_s=1.0,
            clock=_FakeClock(1.0),
        )
    assert model.calls == reference.calls == 1  # (40 forwards before: 5 rounds of 1 + 3 each)
    assert "a speed-up from one forward of each model" in caplog.text
    assert "measure.latency_budget_s" in caplog.text
    assert ms == reference_ms == 1000.0


def _per_row_timer(ms_per_row: float, seen: list[int], reference: float | None = None):
    """A stand-in for `latency_ms`: ``ms_per_row`` for each row of its inputs (no time
    measured), the rows it was given kept in ``seen``."""

    def time_ms(inputs):
        seen.append(len(inputs))
        ms = ms_per_row * len(inputs)
        return ms, None if reference is None else reference * ms

    return time_ms


@pytest.mark.parametrize(
    ("budget_s", "models", "rows"),
    [
        (None, 1, [1, 8, 256]),  # no budget: every batch as it is
        (1e6, 1, [1, 8, 256]),  # forwards that fit the budget: as they are
        (2.0, 1, [1, 6, 6]),  # 0.1 s a row: 6 rows fit 2 s / 3 forwards; never fewer than before
        (2.0, 2, [1, 3, 3]),  # two models in turns share it: 3 rows
        (0.06, 1, [1, 1, 1]),  # not even one row fits: the rows timed before
    ],
)
def test_a_batch_too_slow_for_the_budget_is_timed_on_fewer_rows_and_scaled(budget_s, models, rows):
    seen: list[int] = []
    timer = _per_row_timer(100.0, seen, reference=1.0)
    latencies = batch_latencies(
        timer, lambda n: (torch.zeros(n), n), (256, 1, 8), budget_s=budget_s, models=models
    )
    assert seen == rows  # (from the smallest batch up; 256 rows never built where they don't fit)
    assert list(latencies) == [1, 8, 256]
    for batch, latency in latencies.items():
        assert latency.rows == rows[[1, 8, 256].index(batch)]
        assert latency.ms == pytest.approx(100.0 * batch)  # scaled to the batch
        assert latency.reference_ms == pytest.approx(100.0 * batch)


def test_a_forwards_fixed_cost_does_not_leave_a_batch_timed_on_a_few_rows():
    """Batch 1 at 50 ms (49 of them fixed) predicts 50 ms a row, 13 rows of 256 for a 2 s budget
    (a third of it a forward); timed there (62 ms), 139 rows; timed there (188 ms), all 256."""
    seen: list[int] = []

    def time_ms(inputs):
        seen.append(len(inputs))
        return 49.0 + 1.0 * len(inputs), None

    latencies = batch_latencies(time_ms, lambda n: (torch.zeros(n), n), (1, 256), budget_s=2.0)
    assert seen == [1, 13, 139, 256]
    assert latencies[256].rows == 256 and latencies[256].ms == pytest.approx(305.0)
    # (a cost per row that does not fall: timed once, on the rows predicted first)
    seen.clear()
    batch_latencies(
        _per_row_timer(100.0, seen), lambda n: (torch.zeros(n), n), (1, 256), budget_s=2.0
    )
    assert seen == [1, 6]


def test_timed_rows_predicts_from_the_batch_timed_before():
    assert timed_rows(256, 1, 100.0, budget_s=2.0) == 6
    assert timed_rows(256, 32, 3200.0, budget_s=2.0) == 32  # (never fewer than the probe's)
    assert timed_rows(256, 1, 0.01, budget_s=2.0) == 256
    assert timed_rows(4, 8, 1e6, budget_s=2.0) == 4  # (smaller than the probe: as it is)
    assert timed_rows(256, 1, 1e6, budget_s=None) == 256


def test_measure_records_the_rows_a_scaled_latency_was_timed_on(digits_task, digits_baseline):
    from search.run.measure import measure

    model = copy.deepcopy(digits_baseline.model)
    rows = digits_task.train_config.batch_size  # (64: the forward the budget was timed on)
    tiny = measure(model, digits_task, (1, 256), 3, latency_budget_s=1e-9)
    assert tiny["latency_rows_b256"] == rows  # (no rows fit a nanosecond: never fewer than it)
    assert tiny["latency_ms_b256"] > 0 and "latency_rows" not in tiny
    whole = measure(model, digits_task, (1, 256), 3, latency_budget_s=None)
    assert "latency_rows_b256" not in whole and whole["latency_ms_b256"] > 0
    paired = measure(model, digits_task, (1, 256), 3, latency_budget_s=1e-9, reference=model)
    assert paired["latency_rows_b256"] == rows and paired["speedup_b256"] > 0


def test_the_latency_budget_is_a_few_forwards_at_the_training_batch(digits_task, digits_baseline):
    from search.run.measure import LATENCY_BUDGET_FORWARDS, MIN_LATENCY_BUDGET_S, latency_budget

    model = copy.deepcopy(digits_baseline.model)
    seen = []

    class Counting(nn.Module):  # (the rows each forward gets)
        def forward(self, x):
            seen.append(len(x))
            return model(x)

    def budget(forward_s, ceiling, reference=None):
        ticks = iter(float(i) * forward_s for i in range(10))
        return latency_budget(
            Counting(), reference, digits_task, ceiling, clock=lambda: next(ticks)
        )

    slow = 0.4 / LATENCY_BUDGET_FORWARDS  # (forwards of a large model: 0.4 s of budget)
    rows = digits_task.train_config.batch_size
    seconds, probe = budget(slow, 2.0)
    assert seconds == pytest.approx(0.4) and probe == (rows, pytest.approx(1000.0 * slow))
    assert seen == [rows]  # (one forward, at the training batch)
    assert budget(100.0, 2.0)[0] == 2.0  # (measure.latency_budget_s caps it)
    assert budget(1e-6, 2.0)[0] == MIN_LATENCY_BUDGET_S  # (a small model keeps a floor)
    assert budget(1e-6, 0.01)[0] == 0.01
    assert budget(slow, None) == (None, None)
    assert budget(slow, 2.0, reference=Counting())[0] == pytest.approx(0.4)  # (the slower one)


def test_a_larger_probe_predicts_the_rows_of_a_large_batch():
    """Batch 1 at 50 ms (49 of them fixed) would predict 13 rows of 256 for a 2 s budget; a
    forward of 64 rows timed before (113 ms) predicts 377 rows a row: all 256, timed once."""
    seen: list[int] = []

    def time_ms(inputs):
        seen.append(len(inputs))
        return 49.0 + 1.0 * len(inputs), None

    latencies = batch_latencies(
        time_ms, lambda n: (torch.zeros(n), n), (1, 256), budget_s=2.0, probe=(64, 113.0)
    )
    assert seen == [1, 256] and latencies[256].rows == 256
    seen.clear()  # (a probe smaller than the batch timed before it: that batch predicts)
    batch_latencies(time_ms, lambda n: (torch.zeros(n), n), (8, 256), budget_s=2.0, probe=(2, 1.0))
    assert seen == [8, 93, 256]


def test_peak_memory_at_a_large_batch_is_extrapolated_from_two_small_ones():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32), torch.nn.Linear(32, 5)
    )
    asked = []

    def inputs_of(rows: int) -> tuple[torch.Tensor, int]:
        asked.append(rows)
        return torch.randn(rows, 20), rows

    assert peak_memory_at(model, inputs_of, 200) == peak_memory_bytes(model, torch.randn(200, 20))
    assert asked == [2, 4]  # never built at 200 rows
    asked.clear()
    assert peak_memory_at(model, inputs_of, 3) == peak_memory_bytes(model, torch.randn(3, 20))
    assert asked == [3]  # small batches are measured as they are


def test_a_latency_on_one_thread_leaves_out_the_time_a_forward_waits(digits_task, digits_baseline):
    """On one thread a trial's latencies are the thread's CPU time: time a forward spends not
    running (a sleep here; a wait for a core on a busy machine) is not its cost."""
    from search.run.measure import latency_clock, measure

    class Waits(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x):
            time.sleep(0.02)
            return self.model(x)

    model = Waits(copy.deepcopy(digits_baseline.model))
    assert torch.get_num_threads() == 1 and latency_clock() is time.thread_time
    metrics = measure(model, digits_task, (1,), 3, latency_budget_s=0.5, reference=model)
    assert metrics["latency_ms"] < 20.0  # (in wall time, at least the sleep's 20 ms)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # (several threads: their CPU times would add up; wall time)
        assert latency_clock() is time.perf_counter
    finally:
        torch.set_num_threads(threads)

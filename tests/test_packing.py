"""The packed file: exact round trips, real bytes that shrink with sparsity and bits, no pickle."""

from __future__ import annotations

import copy
import hashlib
import json
import lzma
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from torch import nn

from compressors import (
    CompressionContext,
    PackedFileError,
    get_compressor,
    load_packed,
    packing,
    read_packed,
    save_packed,
)
from compressors._codecs import decode_gaps, encode_gaps
from compressors.packing import FRAMING_BYTES, packed_size, plain_state, read_tensors
from experiments import evaluate, fit
from experiments.models import ConvNet1d


def _index(path: Path) -> dict:
    """The index of an SQZ5 file (its trailer: the index's length, then the checksum)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[-16:-8])
    return json.loads(zstandard.ZstdDecompressor().decompress(data[-16 - length : -16]))


def _compressed(model, amount=None, bits=None, scope="global"):
    model = copy.deepcopy(model)
    if amount is not None:
        model = get_compressor("prune")(amount=amount, scope=scope).compress(
            model, CompressionContext()
        )
    if bits is not None:
        model = get_compressor("quant")(bits=bits).compress(model, CompressionContext())
    return model


@pytest.mark.parametrize(
    ("amount", "bits"), [(None, None), (0.5, None), (None, 4), (0.9, 3), (0.99, 2), (0.3, 8)]
)
def test_round_trip_is_exact(tmp_path, digits_task, digits_baseline, amount, bits):
    model = _compressed(digits_baseline.model, amount, bits)
    fit(model, digits_task.train, epochs=1, batch_size=64, lr=1e-3)
    path = tmp_path / "m.sqz"
    size = save_packed(model, path)
    assert size == path.stat().st_size
    expected, _ = plain_state(model)
    loaded = read_packed(path)
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    reloaded = load_packed(path, digits_task.build_model())
    assert evaluate(reloaded, digits_task.val) == evaluate(model, digits_task.val)
    assert torch.equal(reloaded(digits_task.val.x), model(digits_task.val.x))


def test_size_falls_as_sparsity_grows(tmp_path, digits_baseline):
    sizes = [
        save_packed(_compressed(digits_baseline.model, amount), tmp_path / f"{amount}.sqz")
        for amount in (0.0, 0.5, 0.8, 0.95, 0.99)
    ]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)


def test_size_falls_as_bits_fall(tmp_path, digits_baseline):
    sizes = [
        save_packed(_compressed(digits_baseline.model, bits=b), tmp_path / f"{b}.sqz")
        for b in (8, 6, 4, 3, 2)
    ]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    params = sum(p.numel() for p in digits_baseline.model.parameters())
    assert 4 * params / sizes[0] > 3.5  # 8-bit codes instead of 32-bit floats
    assert save_packed(digits_baseline.model, tmp_path / "fp32.sqz") > 3 * sizes[0]


def test_size_is_close_to_the_information_it_holds(tmp_path, digits_baseline):
    """2-bit codes of 5% of the weights plus positions and scales: well under 1/20 of fp32."""
    fp32 = save_packed(digits_baseline.model, tmp_path / "fp32.sqz")
    small = save_packed(_compressed(digits_baseline.model, 0.95, 2), tmp_path / "small.sqz")
    params = sum(p.numel() for p in digits_baseline.model.parameters())
    assert fp32 <= 4 * params + 1024
    assert fp32 / small > 20


def test_peaked_codes_are_entropy_coded_near_their_entropy(tmp_path, digits_baseline):
    """4-bit codes of a trained layer cluster around 0: rANS stores them in fewer than 4 bits."""
    model = _compressed(digits_baseline.model, bits=4)
    path = tmp_path / "m.sqz"
    save_packed(model, path)
    layout = _index(path)["t"]
    assert layout["net.1.weight"]["enc"] == "ans"
    state, grids = plain_state(model)
    codes = torch.round(state["net.1.weight"] / grids["net.1.weight"].scale).flatten()
    _, counts = torch.unique(codes, return_counts=True)
    p = counts / counts.sum()
    entropy_bytes = float(-(p * p.log2()).sum()) * codes.numel() / 8
    (stored,) = [sum(a[4]) for a in layout["net.1.weight"]["a"] if a[0] == "ans"]
    assert entropy_bytes <= stored < 1.02 * entropy_bytes + 16
    assert stored < codes.numel() * 4 / 8
    assert torch.equal(read_packed(path)["net.1.weight"], state["net.1.weight"])


def test_a_constant_quantized_tensor_round_trips(tmp_path, digits_task):
    model = digits_task.build_model()
    with torch.no_grad():
        model.net[5].weight.fill_(0.25)
    model = _compressed(model, bits=3)
    save_packed(model, tmp_path / "c.sqz")
    state, _ = plain_state(model)
    assert torch.equal(read_packed(tmp_path / "c.sqz")["net.5.weight"], state["net.5.weight"])


def test_conv_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _compressed(ConvNet1d(40, 10), amount=0.7, bits=5)
    path = tmp_path / "conv.sqz"
    save_packed(model, path)
    reloaded = load_packed(path, ConvNet1d(40, 10))
    x = torch.randn(8, 40)
    assert torch.equal(reloaded(x), model(x))


def test_smaller_tensors_replace_the_fresh_models(tmp_path, digits_task):
    torch.manual_seed(0)
    model = digits_task.build_model()
    model.net[1].weight = torch.nn.Parameter(model.net[1].weight[:150].clone())
    model.net[1].bias = torch.nn.Parameter(model.net[1].bias[:150].clone())
    model.net[3].weight = torch.nn.Parameter(model.net[3].weight[:, :150].clone())
    save_packed(model, tmp_path / "small.sqz")
    reloaded = load_packed(tmp_path / "small.sqz", digits_task.build_model())
    assert reloaded.net[1].weight.shape == (150, 64)
    assert torch.equal(reloaded(digits_task.val.x), model(digits_task.val.x))


@pytest.mark.parametrize("gaps", [[0], [0, 1, 2], [300], [5, 254, 255, 256, 1000, 0]])
def test_gap_encoding_round_trip(gaps):
    positions = np.cumsum(np.array(gaps) + 1) - 1
    assert np.array_equal(decode_gaps(encode_gaps(positions)), positions)


def test_loading_rejects_foreign_files_without_unpickling(tmp_path, digits_task):
    pickle_file = tmp_path / "model.pt"
    torch.save(digits_task.build_model(), pickle_file)
    with pytest.raises(PackedFileError, match="not a squeeze packed model"):
        read_packed(pickle_file)
    fake = tmp_path / "fake.sqz"
    fake.write_bytes(b"SQZ1\x01" + lzma.compress(b"\x00" * 16))
    with pytest.raises(PackedFileError, match="written by another version of squeeze"):
        read_packed(fake)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_truncated_or_corrupted_file_is_refused_by_its_checksum(tmp_path, digits_task, damage):
    path = tmp_path / "m.sqz"
    save_packed(digits_task.build_model(), path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(PackedFileError, match=f"{path} is truncated or corrupted"):
        load_packed(path, digits_task.build_model())


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(17, 8)
        self.mix = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 17, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.relu(self.mix(self.emb(x).mean(1))))


def test_tied_weights_are_compressed_once_stored_once_and_tied_again(tmp_path):
    torch.manual_seed(0)
    model, x = _Tied(), torch.randint(0, 17, (4, 6))
    get_compressor("quant")(bits=4).compress(model, CompressionContext())
    assert model.emb.parametrizations.weight.original is model.head.parametrizations.weight.original
    save_packed(model, tmp_path / "m.sqz")
    assert set(read_packed(tmp_path / "m.sqz")) == set(_Tied().state_dict())
    reloaded = load_packed(tmp_path / "m.sqz", _Tied())
    assert reloaded.head.weight is reloaded.emb.weight
    assert torch.equal(reloaded(x), model(x))
    plain = _Tied()
    untied = torch.nn.Linear(8, 17, bias=False)
    untied.weight = torch.nn.Parameter(plain.emb.weight.detach().clone())
    plain.head = untied  # the same values, stored twice
    assert save_packed(plain, tmp_path / "twice.sqz") > save_packed(_Tied(), tmp_path / "once.sqz")


def test_loading_into_another_architecture_names_the_mismatch(tmp_path, digits_task):
    save_packed(digits_task.build_model(), tmp_path / "m.sqz")
    with pytest.raises(PackedFileError, match="does not fit the model"):
        load_packed(tmp_path / "m.sqz", ConvNet1d(40, 10))


def test_biases_on_float16_values_are_stored_in_two_bytes(tmp_path, digits_task, digits_baseline):
    sizes = {}
    for bias in ("fp32", "fp16"):
        model = get_compressor("quant")(bits=4, bias=bias).compress(
            copy.deepcopy(digits_baseline.model), CompressionContext()
        )
        fit(model, digits_task.train, epochs=1, batch_size=64, lr=1e-3)
        state, _ = plain_state(model)
        half = torch.equal(state["net.1.bias"].half().float(), state["net.1.bias"])
        assert half == (bias == "fp16")
        sizes[bias] = save_packed(model, tmp_path / f"{bias}.sqz")
        assert torch.equal(read_packed(tmp_path / f"{bias}.sqz")["net.1.bias"], state["net.1.bias"])
    biases = sum(p.numel() for n, p in digits_baseline.model.named_parameters() if "bias" in n)
    assert sizes["fp32"] - sizes["fp16"] >= biases  # about 2 bytes saved per bias


# ------------------------------------------------------------------ format SQZ3 and SQZ2 files

DATA = Path(__file__).parent / "data"


def _fixture_model() -> nn.Module:
    """The architecture of ``tests/data/sqz2_small.sqz``, written by the SQZ2 packer (commit
    6ca984f) with layer 0 on a 4-bit grid, layer 3 90% pruned on a 3-bit grid, layer 5 60%
    pruned, layer 7 clustered (2 bits), layer 9 99% pruned, a float16 bias and batch-norm
    statistics: dense, bitmask, gaps, ans, codebook and raw records. ``sqz2_small.json`` holds
    the SHA-256 of each tensor's values and the outputs for a seeded input, as the SQZ2
    reader read them."""
    return nn.Sequential(
        nn.Linear(16, 48),
        nn.BatchNorm1d(48),
        nn.ReLU(),
        nn.Linear(48, 64),
        nn.ReLU(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 24),
        nn.ReLU(),
        nn.Linear(24, 120),
    )


def _sha(tensor: torch.Tensor) -> str:
    """SHA-256 of the values (-0.0 counted as 0.0: a pruned negative weight is stored as 0)."""
    tensor = tensor.detach().contiguous()
    if tensor.is_floating_point():
        tensor = tensor + 0.0
    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()


def test_an_sqz2_file_still_loads_exactly():
    path = DATA / "sqz2_small.sqz"
    assert path.read_bytes()[:4] == b"SQZ2"
    expected = json.loads((DATA / "sqz2_small.json").read_text())
    outputs = expected.pop("__outputs__")
    state = read_packed(path)
    assert {k: [list(v.shape), str(v.dtype)[6:], _sha(v)] for k, v in state.items()} == expected
    layouts = {t.layout for t in read_tensors(path).values()}
    assert layouts == {"dense", "bitmask", "gaps", "ans", "raw"}
    model = load_packed(path, _fixture_model())
    assert_fixture_loaded(model, expected, outputs, features=16)


def assert_fixture_loaded(model: nn.Module, expected: dict, outputs: list, *, features: int):
    """``model``, loaded from a fixture file, holds the values the fixture's JSON lists and
    computes the outputs it lists on its seeded input."""
    assert {k: _sha(v) for k, v in model.state_dict().items()} == {
        k: v[2] for k, v in expected.items()
    }
    x = torch.randn(5, features, generator=torch.Generator().manual_seed(1))
    shape, _, values = outputs  # (values, not a hash: float sums round by the CPU's instructions)
    with torch.no_grad():
        y = model(x)
    assert list(y.shape) == shape
    torch.testing.assert_close(y.flatten(), torch.tensor(values), rtol=1e-5, atol=1e-6)


def test_an_sqz2_file_rewritten_as_sqz5_keeps_its_values(tmp_path):
    model = load_packed(DATA / "sqz2_small.sqz", _fixture_model())  # (plain float weights now)
    save_packed(model, tmp_path / "m.sqz")
    assert (tmp_path / "m.sqz").read_bytes()[:4] == b"SQZ5"
    old, new = read_packed(DATA / "sqz2_small.sqz"), read_packed(tmp_path / "m.sqz")
    assert old.keys() == new.keys()
    for key, value in old.items():
        assert torch.equal(new[key], value), key


@pytest.mark.parametrize(("amount", "bits"), [(None, None), (0.7, None), (None, 4), (0.9, 3)])
def test_a_file_packed_twice_is_byte_identical_whatever_the_threads(
    tmp_path, monkeypatch, digits_baseline, amount, bits
):
    model = _compressed(digits_baseline.model, amount, bits)
    files = []
    for workers in (4, 1, 4):
        monkeypatch.setattr(packing, "WORKERS", workers)
        files.append(tmp_path / f"{len(files)}.sqz")
        save_packed(model, files[-1])
    data = [f.read_bytes() for f in files]
    assert data[0][:4] == b"SQZ5" and data[0] == data[1] == data[2]


@pytest.mark.parametrize(("amount", "bits"), [(None, None), (0.5, None), (None, 4), (0.95, 2)])
def test_the_size_estimate_is_the_files_size(tmp_path, digits_baseline, amount, bits):
    model = _compressed(digits_baseline.model, amount, bits)
    estimate = packed_size(model)  # writes nothing
    assert estimate == save_packed(model, tmp_path / "m.sqz")
    # and the file is its tensors' stored arrays, the (compressed) index and the framing
    data = (tmp_path / "m.sqz").read_bytes()
    (index_bytes,) = struct.unpack("<Q", data[-16:-8])
    index = _index(tmp_path / "m.sqz")
    arrays = {n: sum(sum(a[4]) for a in spec["a"]) for n, spec in index["t"].items()}
    assert estimate == sum(arrays.values()) + index_bytes + FRAMING_BYTES
    state, grids = plain_state(model)
    for name, spec in index["t"].items():
        record = len(json.dumps(spec, separators=(",", ":")))
        assert packing.tensor_bytes(state[name], grids.get(name)) == arrays[name] + record


def test_float_weights_store_their_exponent_bytes_compressed(tmp_path, digits_baseline):
    """A float32 weight's exponent bytes take fewer than 8 bits; its mantissa bytes are noise
    (stored as they are, each element's three together: codec ``top``)."""
    path = tmp_path / "m.sqz"
    save_packed(digits_baseline.model, path)
    (values,) = [a for a in _index(path)["t"]["net.1.weight"]["a"] if a[0] == "values"]
    _, dtype, shape, codec, sizes = values
    n = int(np.prod(shape))
    assert (dtype, codec, sizes[0]) == ("<f4", "top", 3 * n)
    assert sizes[1] < 0.6 * n and sum(sizes) < 0.92 * 4 * n


def test_a_large_sparse_quantized_tensor_round_trips(tmp_path):
    """Past the chunk sizes of bit packing and of the float16 check."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1500, 1400))
    model = _compressed(model, 0.6, 5)
    save_packed(model, tmp_path / "m.sqz")
    state, _ = plain_state(model)
    assert torch.equal(read_packed(tmp_path / "m.sqz")["0.weight"], state["0.weight"])
    assert packed_size(model) == (tmp_path / "m.sqz").stat().st_size


@pytest.mark.parametrize("where", ["magic", "array", "index", "trailer", "cut"])
def test_damage_anywhere_in_an_sqz4_file_is_refused(tmp_path, digits_task, where):
    path = tmp_path / "m.sqz"
    save_packed(_compressed(digits_task.build_model(), 0.5, 4), path)
    data = bytearray(path.read_bytes())
    index_start = len(data) - 16 - struct.unpack("<Q", data[-16:-8])[0]
    if where == "cut":
        data = data[: index_start + 5]
    else:
        at = {"magic": 3, "array": 100, "index": index_start + 3, "trailer": len(data) - 2}[where]
        data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(PackedFileError, match="truncated or corrupted|another version|not a"):
        read_packed(path)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
@pytest.mark.parametrize("fixture", ["sqz2_small.sqz", "sqz3_v4_small.sqz"])
def test_a_damaged_file_of_an_older_format_is_refused(tmp_path, damage, fixture):
    data = bytearray((DATA / fixture).read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x40
    path = tmp_path / "old.sqz"
    path.write_bytes(bytes(data))
    with pytest.raises(PackedFileError, match="truncated or corrupted"):
        read_packed(path)  # (the checksum refuses it before any model is needed)


# ------------------------------------------------------------------ codes at scale


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_byte_aligned_bit_packing_is_the_generic_bit_stream(bits):
    """The fast packing of widths that fill bytes (and of the others, eight values to a 64-bit
    word) writes the stream the bit-by-bit packer writes (so files of either read alike), and
    both unpack to the codes; also across the packer's chunks."""
    from compressors import _codecs

    rng = np.random.default_rng(bits)
    for n in (0, 1, 7, 8, 9, 1001, (1 << 20) + 3):
        values = rng.integers(0, 2**bits, n).astype(np.uint8)
        bitwise = np.packbits(
            ((values[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(-1),
            bitorder="little",
        )
        packed = _codecs.pack_bits(values, bits)
        assert packed.tobytes() == bitwise.tobytes(), (bits, n)
        assert np.array_equal(_codecs.unpack_bits(packed, bits, n), values)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, "ternary"])
def test_a_large_quantized_model_packs_identically_and_reloads_exactly(tmp_path, bits):
    """Past `ANS_ALWAYS` values a tensor's codes are entropy-coded only where that pays; the
    file is the same twice and reloads to the same values; its size is the estimate."""
    from compressors import _codecs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.Embedding(500, 200))
    assert model[0].weight.numel() > _codecs.ANS_ALWAYS
    model = get_compressor("quant")(bits=bits).compress(model, CompressionContext())
    first, second = tmp_path / "a.sqz", tmp_path / "b.sqz"
    size = save_packed(model, first)
    save_packed(model, second)
    assert first.read_bytes() == second.read_bytes()
    assert packed_size(model) == size
    state, _ = plain_state(model)
    fresh = nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.Embedding(500, 200))
    loaded = load_packed(first, fresh)
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key
        assert torch.equal(read_packed(first)[key], value), key
    codes = read_tensors(first)["0.weight"].codes
    assert torch.equal(codes.codes * codes.tensors["scale"], state["0.weight"])


def test_a_code_index_beyond_its_alphabet_is_refused(tmp_path):
    """A record whose packed codes name a code its alphabet lacks (the checksum recomputed, as a
    foreign writer would) is refused rather than read as another value."""
    from compressors import _codecs

    spec = {"shape": [4], "enc": "dense", "decode": "scaled", "range": [-1, 1], "count": 4}
    spec["bits"] = 2
    arrays = {
        "codes": torch.from_numpy(_codecs.pack_bits(np.array([0, 1, 2, 3], np.uint8), 2)),
        "scale": torch.ones(1),
    }
    with pytest.raises(_codecs.CodecError, match="beyond its alphabet"):
        _codecs.decode(spec, arrays)
    arrays["codes"] = torch.from_numpy(_codecs.pack_bits(np.array([0, 1, 2, 2], np.uint8), 2))
    assert _codecs.decode(spec, arrays).tolist() == [-1.0, 0.0, 1.0, 1.0]


_PEAK_SCRIPT = r"""
import os, sys, threading, torch
from torch import nn
from compressors import CompressionContext, get_compressor, load_packed, save_packed

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

torch.manual_seed(0)
build = lambda: nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(6)])
model = build()
model_bytes = sum(p.numel() * 4 for p in model.parameters())
model = get_compressor(sys.argv[1])(**eval(sys.argv[2])).compress(model, CompressionContext())
fresh = build()
peaks = []
for step in ("pack", "load"):
    start = peak = rss()
    done = threading.Event()
    def watch():
        global peak
        while not done.wait(0.001):
            peak = max(peak, rss())
    thread = threading.Thread(target=watch)
    thread.start()
    if step == "pack":
        save_packed(model, sys.argv[3])
    else:
        load_packed(sys.argv[3], fresh)
    done.set()
    thread.join()
    peaks.append((max(peak, rss()) - start) / model_bytes)
print(*peaks)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("name", "params"), [("quant", {"bits": 4}), ("prune", {"amount": 0.5})])
def test_packing_and_loading_hold_at_most_twice_the_models_bytes(tmp_path, name, params):
    """Resident memory over its level before the call, sampled every millisecond in a child
    process, packing and loading a 6 M-parameter model (no timings)."""
    import subprocess
    import sys

    script = tmp_path / "peak.py"
    script.write_text(_PEAK_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), name, repr(params), str(tmp_path / "m.sqz")],
        capture_output=True,
        text=True,
        check=True,
    )
    pack, load = (float(v) for v in done.stdout.split())
    assert pack <= 2.0 and load <= 2.0, (pack, load)

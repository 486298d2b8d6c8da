"""Reloading a packed file straight into the model: byte planes decoded into the tensor's own
storage (`compressors._planes.restore_into`, `Packed.decode_into`), the file's XXH3-64 checked
(an SQZ3 file's CRC-32 in parts, `compressors._container.crc32`), and tensors decoded by several
threads. No timings: the values, the bytes and the refusals."""

from __future__ import annotations

import json
import os
import threading
import zlib
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
import zstandard
from torch import nn

from compressors import _container, _planes, _threads, packing
from compressors._codecs import CodecError, store
from compressors._opening import opened
from compressors.packing import load_packed, read_packed, save_packed
from tests.test_packing import _sha, assert_fixture_loaded

DATA = Path(__file__).parent / "data"


def _stored_bytes(array: np.ndarray) -> tuple[str, list[int], bytes]:
    codec, sizes, chunks = store(array)
    return codec, sizes, b"".join(bytes(memoryview(c)) for c in chunks)


@pytest.mark.parametrize("count", [0, 1, 1000, (1 << 18) + 3, 700_001])
@pytest.mark.parametrize("dtype", ["<f4", "<f2", "<i8", "<u8", "|u1"])
def test_restore_into_writes_the_array_store_stored(count, dtype):
    rng = np.random.default_rng(count)
    if dtype in ("<f4", "<f2"):  # weights: compressible exponent planes, noisy mantissas
        array = (rng.standard_normal(count) * 0.02).astype(dtype)
    elif dtype == "<u8":  # (only the top byte compressible: codec top, 7 bytes an element)
        array = rng.integers(0, 1 << 56, count, dtype=np.uint64).astype(dtype)
    else:
        array = rng.integers(0, 7, count).astype(dtype)
    codec, sizes, data = _stored_bytes(array)
    out = np.full(array.nbytes, 0xAB, dtype=np.uint8)
    _planes.restore_into(out, array.dtype, count, codec, sizes, memoryview(data))
    assert np.array_equal(out.view(array.dtype), array)
    assert np.array_equal(_planes.restore(array.dtype, count, codec, sizes, data), array)


def test_a_float_weight_is_stored_with_a_compressed_plane_and_decoded_block_by_block():
    array = (np.random.default_rng(0).standard_normal(600_000) * 0.02).astype("<f4")
    codec, sizes, data = _stored_bytes(array)
    assert codec == "top" and sizes[1] < len(array)  # (the exponent plane, compressed)
    assert len(array) * 4 > 2 * _planes._INTERLEAVE_BYTES  # (several blocks)
    out = np.empty(array.nbytes, dtype=np.uint8)
    _planes.restore_into(out, array.dtype, len(array), codec, sizes, memoryview(data))
    assert np.array_equal(out.view("<f4"), array)


def test_a_byte_plane_holding_fewer_or_more_bytes_than_its_array_is_refused():
    plane = bytes(range(256)) * 16  # 4096 bytes
    short = zstandard.ZstdCompressor(write_content_size=False).compress(plane[:4000])
    sizes = [len(short), 4096]
    with pytest.raises(CodecError, match="holds 4000 bytes, not 4096"):
        _planes.restore(np.dtype("<i2"), 4096, "planes", sizes, short + plane)
    long = zstandard.ZstdCompressor(write_content_size=False).compress(plane + b"x")
    sizes = [len(long), 4096]
    with pytest.raises(CodecError, match="does not decompress to 4096 bytes"):
        _planes.restore(np.dtype("<i2"), 4096, "planes", sizes, long + plane)


def test_codec_top_is_each_elements_low_bytes_then_its_top_plane():
    array = (np.random.default_rng(1).standard_normal(300_000) * 0.02).astype("<f4")
    codec, sizes, data = _stored_bytes(array)
    elements = array.view(np.uint8).reshape(-1, 4)
    assert codec == "top" and sizes[0] == 3 * len(array)
    assert data[: sizes[0]] == elements[:, :3].tobytes()
    top = zstandard.ZstdDecompressor().decompress(data[sizes[0] :])
    assert top == elements[:, 3].tobytes()


def test_codec_top_refuses_sizes_and_planes_that_do_not_fit():
    array = np.arange(4096, dtype="<i2")  # (top bytes 0 to 15)
    low, top = array.view(np.uint8)[0::2].tobytes(), array.view(np.uint8)[1::2].tobytes()
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(top)
    assert np.array_equal(
        _planes.restore(np.dtype("<i2"), 4096, "top", [4096, len(frame)], low + frame), array
    )
    for sizes, data in [
        ([4095, len(frame)], low[:-1] + frame),
        ([4096, 0], low),
        ([4096, len(frame)], low + frame + b"x"),
    ]:
        with pytest.raises(CodecError, match="do not fit|is stored in"):
            _planes.restore(np.dtype("<i2"), 4096, "top", sizes, data)
    with pytest.raises(CodecError, match="do not fit"):
        _planes.restore(np.dtype("|u1"), 4096, "top", [0, len(frame)], frame)
    short = zstandard.ZstdCompressor(write_content_size=False).compress(top[:4000])
    with pytest.raises(CodecError, match="holds 4000 bytes, not 4096"):
        _planes.restore(np.dtype("<i2"), 4096, "top", [4096, len(short)], low + short)
    long = zstandard.ZstdCompressor(write_content_size=False).compress(top + b"x")
    with pytest.raises(CodecError, match="does not decompress to 4096 bytes"):
        _planes.restore(np.dtype("<i2"), 4096, "top", [4096, len(long)], low + long)


@pytest.mark.parametrize("size", [0, 5, 1 << 22, (3 << 22) + 11])
def test_the_crc_in_parts_is_zlibs(monkeypatch, size):
    data = os.urandom(size)
    for workers in (1, 2, 3):
        monkeypatch.setattr(_container, "CRC_WORKERS", workers)
        assert _container.crc32(data) == zlib.crc32(data)
    for cut in (0, 1, size // 3, size):
        a, b = data[:cut], data[cut:]
        combined = _container.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b))
        assert combined == zlib.crc32(data)


def test_the_trailer_holds_the_xxh3_of_the_bytes_before_it(tmp_path):
    path = tmp_path / "m.sqz"
    save_packed(_model(), path)
    data = path.read_bytes()
    index_len, stated = packing.TRAILER.unpack(data[-packing.TRAILER.size :])
    assert data[:4] == b"SQZ5" and stated == xxhash.xxh3_64_intdigest(data[:-16])
    index = data[-16 - index_len : -16]
    assert json.loads(zstandard.ZstdDecompressor().decompress(index))["v"] == 4
    # the previous containers (SQZ4: no codec top; SQZ3: CRC-32 in a 12-byte trailer) still open
    for old, magic in (("sqz4_v4_small.sqz", b"SQZ4"), ("sqz3_v4_small.sqz", b"SQZ3")):
        assert (DATA / old).read_bytes()[:4] == magic
        assert opened(DATA / old, None)[0].meta["v"] == 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 600), nn.BatchNorm1d(600), nn.Linear(600, 10))
    model[1].num_batches_tracked += 3  # (an integer tensor, stored raw)
    with torch.no_grad():
        model[2].bias.copy_(torch.tensor([0.5, 1.0, -2.0] + [0.25] * 7))  # (float16 holds these)
    return model


def test_dense_tensors_are_decoded_straight_into_the_models_own(tmp_path):
    model = _model()
    path = tmp_path / "m.sqz"
    save_packed(model, path)
    fresh = nn.Sequential(nn.Linear(300, 600), nn.BatchNorm1d(600), nn.Linear(600, 10))
    packed, _ = opened(path, fresh)
    state = fresh.state_dict()
    direct = {name: packed.decode_into(name, state[name]) for name in packed.meta["t"]}
    # float32 weights and the integer count go straight in; the float16-stored bias does not
    assert direct["0.weight"] and direct["1.num_batches_tracked"]
    assert not direct["2.bias"]
    expected = read_packed(path)
    for name, wrote in direct.items():
        if wrote:
            assert torch.equal(state[name], expected[name]), name


def test_a_tensor_of_another_shape_dtype_or_layout_is_not_written_in_place(tmp_path):
    model = _model()
    with torch.no_grad():
        model[0].weight[:, ::2] = 0  # (half zeros: a sparse layout)
    path = tmp_path / "m.sqz"
    save_packed(model, path)
    packed, _ = opened(path, _model())
    assert packed.meta["t"]["0.weight"]["enc"] != "dense"
    target = torch.zeros(600, 300, dtype=torch.float64)
    assert not packed.fits("0.weight", torch.zeros(600, 300))  # (its bytes are not the tensor's)
    assert not packed.decode_into("0.weight", target)
    assert not packed.decode_into("0.weight", torch.zeros(300, 600).t())  # (not contiguous)
    assert not packed.decode_into("1.weight", torch.zeros(600, dtype=torch.float64))
    assert not packed.decode_into("1.weight", torch.zeros(1200)[::2])  # (not contiguous)
    assert not packed.decode_into("1.weight", torch.zeros(300))
    assert torch.count_nonzero(target) == 0
    # a sparse layout is written into a float32 tensor of its shape a block at a time
    target = torch.full((600, 300), 7.0)
    assert packed.decode_into("0.weight", target)
    assert torch.equal(target, model[0].weight.detach())


@pytest.mark.parametrize("workers", [1, 3])
def test_a_reloaded_model_equals_the_packed_one_whatever_the_threads(
    tmp_path, monkeypatch, workers
):
    model = _model().eval()
    with torch.no_grad():
        model[2].weight[:, ::3] = 0
    path = tmp_path / "m.sqz"
    save_packed(model, path)
    monkeypatch.setattr(packing, "WORKERS", workers)
    fresh = nn.Sequential(nn.Linear(300, 600), nn.BatchNorm1d(600), nn.Linear(600, 10))
    load_packed(path, fresh)
    for (name, value), (_, loaded) in zip(
        model.state_dict().items(), fresh.state_dict().items(), strict=True
    ):
        assert torch.equal(loaded, value), name


def test_tensors_decoded_in_place_are_queued_at_once_and_new_values_bounded(tmp_path, monkeypatch):
    model = _model().eval()
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(model[1], name).uniform_(0.5, 1.5)  # (dense float32: decoded in place)
        model[2].weight[:, ::3] = 0  # (sparse: in place by blocks; the float16 bias: new values)
    path = tmp_path / "m.sqz"
    save_packed(model, path)
    submitted: list[str] = []

    shared = _threads.pool(2)

    class Recording:
        def submit(self, fn, name):
            submitted.append(name)
            return shared.submit(fn, name)

    monkeypatch.setattr(_threads, "pool", lambda workers: Recording())
    monkeypatch.setattr(packing, "WORKERS", 2)
    monkeypatch.setattr(packing, "IN_FLIGHT", 1)  # (one tensor of new values at a time)
    fresh = nn.Sequential(nn.Linear(300, 600), nn.BatchNorm1d(600), nn.Linear(600, 10))
    packed, _ = opened(path, fresh)
    owners = {name: packing._owner(fresh, name) for name in packed.meta["t"]}
    in_place = [packed.fits(name, getattr(*owners[name])) for name in owners]
    assert in_place == [True] * 7 + [False, False]
    decoded = packing._decoded(packed, owners)
    first, value = next(decoded)
    # every tensor decoded in place and the sparse weight were queued before the first result
    # was taken (two threads, not two tensors, at a time); the float16 bias waits for the
    # weight's arrays (its mask and nonzero values, less than the weight) to be let go
    assert first == "0.weight" and value is None
    assert submitted == list(owners)[:-1]
    weight = packed.meta["t"]["2.weight"]
    assert 0 < packed.held("2.weight", fresh[2].weight) < fresh[2].weight.numel()
    assert weight["enc"] == "bitmask" and packed.held("2.bias", fresh[2].bias) == 10
    rest = dict(decoded)
    assert submitted == list(owners) and rest["2.weight"] is None  # (decoded in place)
    assert torch.equal(fresh[2].weight, model[2].weight.detach())
    assert torch.equal(rest["2.bias"], model[2].bias.detach())


def test_a_corrupted_array_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "m.sqz"
    save_packed(_model(), path)
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    fresh = nn.Sequential(nn.Linear(300, 600), nn.BatchNorm1d(600), nn.Linear(600, 10))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(packing.PackedFileError, match="checksum"):
        load_packed(path, fresh)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())


def _sqz3_fixture_model() -> nn.Module:
    """The architecture of ``tests/data/sqz3_v4_small.sqz``, written by the SQZ3 packer of
    format version 4 before tensors were decoded in place (commit e1d2a27): dense float32 weights
    with a compressed exponent plane, float16 records, a bitmask layer, an empty gaps record and
    a raw integer. ``sqz3_v4_small.json`` holds the SHA-256 of each tensor's values and the
    outputs for a seeded input, as that version's reader read them."""
    return nn.Sequential(
        nn.Linear(64, 200),
        nn.BatchNorm1d(200),
        nn.ReLU(),
        nn.Linear(200, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


@pytest.mark.parametrize("workers", [1, 4])
@pytest.mark.parametrize("fixture", ["sqz3_v4_small.sqz", "sqz4_v4_small.sqz"])
def test_a_file_of_a_previous_format_loads_exactly_in_place(monkeypatch, workers, fixture):
    """``sqz4_v4_small.sqz``: the SQZ3 fixture loaded and written again by the SQZ4 packer
    (commit d43cd08), its float weights as four byte planes: the same values and outputs."""
    path = DATA / fixture
    expected = json.loads((DATA / "sqz3_v4_small.json").read_text())
    outputs = expected.pop("__outputs__")
    monkeypatch.setattr(packing, "WORKERS", workers)
    monkeypatch.setattr(packing, "THREADED_FROM", 0)  # (a small model: threads all the same)
    model = _sqz3_fixture_model()
    packed, _ = opened(path, model)
    assert packed.decode_into("0.weight", torch.empty(200, 64))  # (the in-place path)
    model = load_packed(path, model)
    assert {k: _sha(v) for k, v in read_packed(path).items()} == {
        k: v[2] for k, v in expected.items()
    }
    assert_fixture_loaded(model, expected, outputs, features=64)


@pytest.mark.parametrize("overlapping", [True, False])
@pytest.mark.parametrize("dtype", ["<f4", "<f2", "<u8"])
def test_the_low_bytes_are_the_same_whichever_way_they_are_copied(monkeypatch, overlapping, dtype):
    """Codec ``top``'s low bytes, by overlapping writes of whole elements where numpy writes
    them in order (as it does here) or by a copy of items: each element's low bytes."""
    assert _planes._OVERLAPPING
    monkeypatch.setattr(_planes, "_OVERLAPPING", overlapping)
    k = np.dtype(dtype).itemsize
    for count in (1, 70_001):
        raw = np.random.default_rng(count).integers(0, 256, count * k, dtype=np.uint8)
        low = _planes._low_bytes(raw, k)
        assert low.tobytes() == raw.reshape(count, k)[:, :-1].tobytes()


def test_the_threads_are_started_once_and_no_job_outlives_its_call():
    """One pool of threads for the process (None in its own threads, which work alone); a
    loop over queued jobs that stops leaves none running: those not started are cancelled,
    the others waited for."""
    shared = _threads.pool(2)
    assert _threads.pool(2) is shared
    assert shared.submit(_threads.pool, 2).result() is None
    release, ran = threading.Event(), []
    started = threading.Barrier(3)  # (a, b and this test: both threads busy before it goes on)

    def blocked(name: str) -> None:
        started.wait(60)
        release.wait(60)
        ran.append(name)

    pending = deque((name, shared.submit(blocked, name)) for name in "ab")
    pending.append(("c", shared.submit(ran.append, "c")))  # (both threads busy: not started)
    started.wait(60)

    def release_once_c_is_cancelled() -> None:  # (a and b end only after settling cancels c)
        while not pending[2][1].cancelled():
            threading.Event().wait(0.01)
        release.set()

    threading.Thread(target=release_once_c_is_cancelled, daemon=True).start()
    with pytest.raises(ValueError, match="stopped"), _threads.settling(pending):
        raise ValueError("stopped")
    assert sorted(ran) == ["a", "b"] and pending[2][1].cancelled()

"""Packed files are safe to open from anyone: crafted files (their checksums recomputed, so that
only the checks of what they say stop them) are refused with `PackedFileError`, within a small
memory bound, and never set anything but layer widths on the model."""

from __future__ import annotations

import copy
import json
import lzma
import os
import struct
import subprocess
import sys
import zlib
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
    read_packed,
    save_packed,
)
from compressors._codecs import CodecError, restore
from compressors._container import MAGIC_SQZ3, MAGIC_SQZ4, TRAILER_SQZ3, checksum
from compressors.lowrank import LowRank
from compressors.packing import TRAILER
from experiments import BaselineCacheError, load_or_train_baseline
from tests.test_packing import _fixture_model as fixture_model  # the SQZ2 fixture's model

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
#: Bytes a crafted file may make its loader allocate beyond what loading a sound one takes.
MEMORY_BOUND = 100 << 20
#: What a bomb decompresses to (enough to be seen above the bound).
BOMB = 1 << 29


# ------------------------------------------------------------------------------ crafting


def sqz3_parts(data: bytes) -> tuple[bytes, dict]:
    """``(arrays section with the magic, index)`` of an SQZ4 file (the layout SQZ3 began)."""
    index_len, _ = TRAILER.unpack(data[-TRAILER.size :])
    start = len(data) - TRAILER.size - index_len
    index = zstandard.ZstdDecompressor().decompress(data[start : -TRAILER.size])
    return data[:start], json.loads(index)


def sqz3_file(arrays: bytes, index: dict | bytes) -> bytes:
    """An SQZ4 file of these parts, its checksum recomputed (an SQZ3 one where ``arrays``
    begin with that magic)."""
    if isinstance(index, dict):
        index = json.dumps(index, separators=(",", ":")).encode()
        index = zstandard.ZstdCompressor(level=19).compress(index)
    if arrays[:4] == MAGIC_SQZ3:
        return arrays + index + TRAILER_SQZ3.pack(len(index), zlib.crc32(arrays + index))
    return arrays + index + TRAILER.pack(len(index), checksum(arrays + index))


def sqz2_parts(data: bytes) -> tuple[dict, dict, bytes]:
    """``(safetensors header, squeeze record, tensor bytes)`` of an SQZ2 file."""
    payload = lzma.decompress(data[9:]) if data[4] == 1 else data[9:]
    (n,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8 : 8 + n])
    return header, json.loads(header["__metadata__"]["squeeze"]), payload[8 + n :]


def sqz2_payload(header: dict, meta: dict, body: bytes) -> bytes:
    header = {**header, "__metadata__": {"squeeze": json.dumps(meta)}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def sqz2_file(body: bytes, *, compressed: bool) -> bytes:
    """An SQZ2 file holding ``body`` (its payload, or an LZMA stream of it), checksummed."""
    return b"SQZ2" + bytes([int(compressed)]) + struct.pack("<I", zlib.crc32(body)) + body


def zstd_bomb(size: int, *, state_size: bool = True) -> bytes:
    """A zstd frame of ``size`` zero bytes (a few KB per 100 MB)."""
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=state_size)
    stream = compressor.compressobj(size=size if state_size else -1)
    chunk = bytes(1 << 20)
    return b"".join(stream.compress(chunk) for _ in range(size >> 20)) + stream.flush()


def edit_record(index: dict, name: str, **fields) -> dict:
    index = copy.deepcopy(index)
    index["t"][name].update(fields)
    return index


def craft(folder: Path) -> dict[str, Path]:
    """The sound files (``sound``: SQZ3 with codes; ``lowrank``; ``sqz2``) and the crafted ones,
    by name."""
    torch.manual_seed(0)
    model = load_packed(DATA / "sqz2_small.sqz", fixture_model())
    coded = get_compressor("quant")(bits=3).compress(copy.deepcopy(model), CompressionContext())
    files = {"sound": folder / "sound.sqz", "lowrank": folder / "lowrank.sqz"}
    save_packed(coded, files["sound"])
    paired = copy.deepcopy(model)
    paired[9] = LowRank.like(paired[9], {"rank": 4})
    save_packed(paired, files["lowrank"])
    arrays, index = sqz3_parts(files["sound"].read_bytes())
    assert {index["t"][k]["enc"] for k in ("3.weight", "5.weight", "9.weight")} == {
        "ans",
        "bitmask",
        "gaps",
    }
    plain_arrays, plain = sqz3_parts(files["lowrank"].read_bytes())  # (float records)
    assert plain["t"]["5.weight"]["enc"] == "bitmask" and plain["t"]["1.bias"]["enc"] == "gaps"
    crafted = {
        # a sparse record of a larger shape: the loader zero-fills the shape first
        "bitmask_shape": sqz3_file(plain_arrays, edit_record(plain, "5.weight", shape=[1 << 28])),
        "gaps_shape": sqz3_file(plain_arrays, edit_record(plain, "1.bias", shape=[1 << 28])),
        # sparse codes of a larger shape (per-row scales still broadcast over it)
        "codes_shape": sqz3_file(arrays, edit_record(index, "5.weight", shape=[32, 1 << 23])),
        "codes_count": sqz3_file(arrays, edit_record(index, "5.weight", count=1 << 28)),
        # an entropy-coded record saying it holds 2**26 codes
        "ans_count": sqz3_file(
            arrays, edit_record(index, "3.weight", shape=[1 << 26], count=1 << 26)
        ),
        # an index that decompresses to half a GiB (JSON, then blanks)
        "index_bomb": sqz3_file(arrays, zstd_bomb_index(index)),
        # a byte plane whose zstd frame states half a GiB
        "plane_bomb": plane_bomb(arrays, copy.deepcopy(index)),
        "top_bomb": plane_bomb(arrays, copy.deepcopy(index), "top"),
    }
    arrays, index = sqz3_parts(files["lowrank"].read_bytes())
    index["modules"]["9"]["rank"] = 1 << 22  # 24 x 4M and 4M x 120 floats
    crafted["lowrank_rank"] = sqz3_file(arrays, index)
    # SQZ2: an LZMA stream of the sound payload, then streams of zeros (lzma.decompress joins
    # them); an LZMA stream holding more than the model's bytes; a record of a larger shape
    old = (DATA / "sqz2_small.sqz").read_bytes()
    header, meta, body = sqz2_parts(old)
    payload = sqz2_payload(header, meta, body)
    zeros = lzma.compress(bytes(1 << 24), preset=0)
    crafted["sqz2_lzma_streams"] = sqz2_file(
        lzma.compress(payload) + zeros * (BOMB >> 24), compressed=True
    )
    crafted["sqz2_lzma_bomb"] = sqz2_file(
        lzma.compress(payload + bytes(1 << 25), preset=0), compressed=True
    )
    meta["t"]["5.weight"]["shape"] = [1 << 28]
    crafted["sqz2_bitmask_shape"] = sqz2_file(sqz2_payload(header, meta, body), compressed=False)
    files["sqz2"] = DATA / "sqz2_small.sqz"
    for name, data in crafted.items():
        files[name] = folder / f"{name}.sqz"
        files[name].write_bytes(data)
    return files


def zstd_bomb_index(index: dict) -> bytes:
    text = json.dumps(index, separators=(",", ":")).encode()
    compressor = zstandard.ZstdCompressor(level=1)
    stream = compressor.compressobj(size=len(text) + BOMB)
    chunk = b" " * (1 << 20)
    head = stream.compress(text)
    return head + b"".join(stream.compress(chunk) for _ in range(BOMB >> 20)) + stream.flush()


def plane_bomb(arrays: bytes, index: dict, codec: str = "planes") -> bytes:
    """The sound file with tensor ``0.bias``'s values stored as byte planes, the first a frame of
    `BOMB` zeros (the others as they were); or, ``codec="top"``, as each element's low bytes then
    a top plane that is that frame."""
    offset = 4
    for name, spec in index["t"].items():
        for entry in spec["a"]:
            if name == "0.bias" and entry[0] == "values":
                _, dtype, shape, codec, sizes = entry
                assert codec == "raw" and sizes[0] > 0
                k = np.dtype(dtype).itemsize
                raw = arrays[offset : offset + sizes[0]]
                planes = [raw[j::k] for j in range(k)]
                planes[0] = zstd_bomb(BOMB)
                if codec == "top":
                    low = b"".join(raw[i : i + k - 1] for i in range(0, len(raw), k))
                    planes = [low, planes[0]]
                entry[3:] = [codec, [len(p) for p in planes]]
                return sqz3_file(
                    arrays[:offset] + b"".join(planes) + arrays[offset + sizes[0] :], index
                )
            offset += sum(entry[4])
    raise AssertionError("no values of 0.bias")


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> dict[str, Path]:
    return craft(tmp_path_factory.mktemp("crafted"))


CRAFTED = [
    "bitmask_shape",
    "gaps_shape",
    "codes_shape",
    "ans_count",
    "codes_count",
    "index_bomb",
    "plane_bomb",
    "top_bomb",
    "lowrank_rank",
    "sqz2_lzma_streams",
    "sqz2_lzma_bomb",
    "sqz2_bitmask_shape",
]


# ------------------------------------------------------------------------------ tests


def test_the_sound_files_load(crafted):
    for name in ("sound", "lowrank", "sqz2"):
        load_packed(crafted[name], fixture_model())


@pytest.mark.parametrize("name", CRAFTED)
def test_a_crafted_file_is_refused(crafted, name):
    with pytest.raises(PackedFileError, match=str(crafted[name].name)):
        load_packed(crafted[name], fixture_model())


@pytest.mark.parametrize(
    "name", ["bitmask_shape", "index_bomb", "plane_bomb", "top_bomb", "sqz2_lzma_streams"]
)
def test_a_crafted_file_read_without_its_model_is_refused(crafted, name):
    with pytest.raises(PackedFileError, match=str(crafted[name].name)):
        read_packed(crafted[name])


_CHILD = """
import json, resource, sys
from compressors import PackedFileError, load_packed
from tests.test_packsafe import fixture_model
peaks = {}
for path in sys.argv[1:]:
    try:
        load_packed(path, fixture_model())
        outcome = "loaded"
    except PackedFileError:
        outcome = "refused"
    except BaseException as err:  # (reported, not raised: the figures are what is measured)
        outcome = type(err).__name__
    peaks[path] = [outcome, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]
print(json.dumps(peaks))
"""


def peak_rss(paths: list[Path]) -> dict[str, tuple[str, int]]:
    """Load each file in turn in one child process: ``{path: (outcome, peak RSS after it)}``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *map(str, paths)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=ROOT,
    )
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
def test_crafted_files_are_refused_within_a_small_memory_bound(crafted):
    """The child loads the sound files first (its peak then is the baseline), then each crafted
    file: the peak (which never falls) may grow by `MEMORY_BOUND` at most over them all."""
    paths = [crafted[n] for n in ("sound", "lowrank", "sqz2", *CRAFTED)]
    peaks = peak_rss(paths)
    baseline = peaks[str(crafted["sqz2"])][1]
    grown = {Path(p).stem: (o, (rss - baseline) >> 20) for p, (o, rss) in peaks.items()}
    assert [o for o, _ in list(peaks.values())[:3]] == ["loaded"] * 3
    assert all(o == "refused" for n, (o, _) in grown.items() if n in CRAFTED), grown
    assert max(rss for _, rss in peaks.values()) - baseline < MEMORY_BOUND, grown


# ------------------------------------------------------------------------------ attributes


@pytest.mark.parametrize(
    ("module", "attr", "value", "why"),
    [
        ("0", "forward", "x", "only the architecture attributes"),
        ("0", "__class__", "Linear", "only the architecture attributes"),
        ("0", "__dict__", {}, "only the architecture attributes"),
        ("0", "training", False, "only the architecture attributes"),
        ("0", "in_features", "16", "of its type"),
        ("0", "in_features", True, "of its type"),
        ("0", "in_features", 1.5, "of its type"),
        ("0", "in_features", -3, "of its type"),
        ("0", "groups", 2, "only the architecture attributes"),  # (a Linear has none)
        ("1", "normalized_shape", [3], "only the architecture attributes"),
        ("9.nope", "in_features", 3, "which the model has not"),
    ],
)
def test_an_attribute_record_sets_only_architecture_attributes(
    crafted, tmp_path, module, attr, value, why
):
    arrays, index = sqz3_parts(crafted["sound"].read_bytes())
    index["attrs"] = {module: {attr: value}}
    path = tmp_path / "attrs.sqz"
    path.write_bytes(sqz3_file(arrays, index))
    model = fixture_model()
    forward = model[0].forward
    with pytest.raises(PackedFileError, match=why):
        load_packed(path, model)
    assert model[0].forward == forward and type(model[0]) is nn.Linear


def test_an_architecture_attribute_of_its_type_is_restored(crafted, tmp_path):
    arrays, index = sqz3_parts(crafted["sound"].read_bytes())
    index["attrs"] = {"0": {"out_features": 48}, "1": {"num_features": 48}}
    path = tmp_path / "attrs.sqz"
    path.write_bytes(sqz3_file(arrays, index))
    model = load_packed(path, fixture_model())
    assert model[0].out_features == 48 and type(model[0].out_features) is int


def test_the_writer_records_only_what_the_reader_restores(caplog):
    model, like = fixture_model(), fixture_model()
    model[0].out_features = 47
    model[0].note = "changed"  # (not an architecture attribute: said, not recorded)
    from compressors.packing import _changed_attributes

    assert _changed_attributes(model, like) == {"0": {"out_features": 47}}
    assert "Linear.note" in caplog.text


# ------------------------------------------------------------------------------ other fields


@pytest.mark.parametrize(
    "edit",
    [
        lambda i: i.update(v=None),
        lambda i: i.update(t=[]),
        lambda i: i.update(int8=[{"a": 1}]),
        lambda i: i.update(int8=["1"]),  # a BatchNorm has no int8 kernel
        lambda i: i.update(int8=["nope"]),
        lambda i: i.update(tied={"0.bias": "nope"}),
        lambda i: i.update(modules={"0": {"type": "Module"}}),
        lambda i: i.update(modules={"2": {"type": "LowRank", "rank": 1}}),  # a ReLU
        lambda i: i.update(modules={"0": {"type": "LowRank", "rank": "4"}}),
        lambda i: i["t"]["0.bias"].update(shape=[-48]),
        lambda i: i["t"]["0.bias"].update(shape=[1] * 9),
        lambda i: i["t"]["0.bias"].update(enc="zip"),
        lambda i: i["t"]["0.bias"].update(shape=[24]),  # smaller than what it holds
        lambda i: i["t"]["3.weight"].update(alphabet=list(range(10**5))),
        lambda i: i["t"]["3.weight"]["a"][0].__setitem__(1, "|O"),
        lambda i: i["t"]["3.weight"]["a"][0].__setitem__(2, [10**15]),
        lambda i: i["t"]["3.weight"]["a"][0].__setitem__(3, "pickle"),
        lambda i: i["t"]["3.weight"].update(a=[["x"]]),
        lambda i: i.update(act={"0": {"in": [0.1, 0]}}),  # activation grids in format 4
        lambda i: i.update(v=5, act=[["0"]]),
        lambda i: i.update(v=5, act={"2": {"in": [0.1, 0]}}),  # a ReLU has no input grid
        lambda i: i.update(v=5, act={"0": {"in": [float("nan"), 0]}}),
        lambda i: i.update(v=5, act={"0": {"in": [0.1, 0], "out": [0.1, 0], "after": "2"}}),
        lambda i: i.update(v=6),
    ],
)
def test_a_record_with_fields_of_the_wrong_kind_is_refused(crafted, tmp_path, edit):
    arrays, index = sqz3_parts(crafted["sound"].read_bytes())
    edit(index)
    path = tmp_path / "edited.sqz"
    path.write_bytes(sqz3_file(arrays, index))
    with pytest.raises(PackedFileError, match="edited.sqz"):
        load_packed(path, fixture_model())


def test_codec_top_is_refused_in_an_sqz4_file_and_where_its_sizes_do_not_fit(tmp_path):
    torch.manual_seed(0)
    layer = nn.Linear(300, 600)
    save_packed(layer, tmp_path / "m.sqz")
    arrays, index = sqz3_parts((tmp_path / "m.sqz").read_bytes())
    entry = index["t"]["weight"]["a"][0]
    assert entry[3:] == ["top", [3 * 180_000, entry[4][1]]]
    path = tmp_path / "edited.sqz"
    path.write_bytes(sqz3_file(MAGIC_SQZ4 + arrays[4:], index))  # (SQZ4 readers know no top)
    with pytest.raises(PackedFileError, match="codec 'top'; known: raw, planes$"):
        load_packed(path, nn.Linear(300, 600))
    for sizes in ([3 * 180_000 - 1, entry[4][1] + 1], [4 * 180_000, 0]):
        entry[4] = sizes
        path.write_bytes(sqz3_file(arrays, index))
        with pytest.raises(PackedFileError, match=r"low bytes and top plane .* do not fit"):
            load_packed(path, nn.Linear(300, 600))


def test_a_byte_plane_stating_more_bytes_than_its_array_holds_is_refused_unread():
    frame = zstandard.ZstdCompressor().compress(bytes(1000))
    with pytest.raises(CodecError, match="states 1000 bytes, not 48"):
        restore(np.dtype("<f4"), 48, "planes", [len(frame), 48, 48, 48], frame + bytes(144))
    unstated = zstd_bomb(1 << 20, state_size=False)
    sizes = [len(unstated), 4096, 4096, 4096]
    with pytest.raises(CodecError, match="does not decompress"):
        restore(np.dtype("<f4"), 4096, "planes", sizes, unstated + bytes(3 * 4096))


def test_a_missing_file_is_a_packed_file_error(tmp_path):
    with pytest.raises(PackedFileError, match="cannot be read"):
        load_packed(tmp_path / "none.sqz", fixture_model())


# ------------------------------------------------------------------------------ baseline cache


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A small task and its baseline, cached (``(task, config, cache dir, folder)``)."""
    from tests.test_baseline_cache import _next_pixel_task

    task = _next_pixel_task(images=60)
    cache = tmp_path_factory.mktemp("cache")
    config = {"name": task.name}
    first = load_or_train_baseline(task, config=config, cache_dir=cache, seed=0)
    assert json.loads((first.folder / "checksums.json").read_text()).keys() == {
        "model.safetensors",
        "teacher_outputs.safetensors",
    }
    return task, config, cache, first.folder


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: _flip(f / "model.safetensors", -3),  # a weight's last byte
        lambda f: _flip(f / "teacher_outputs.safetensors", -3),
        lambda f: (f / "model.safetensors").write_bytes(
            (f / "model.safetensors").read_bytes()[:99]
        ),
        lambda f: (f / "model.safetensors").unlink(),
        lambda f: (f / "metrics.json").write_text("{"),
        lambda f: (f / "metrics.json").write_text('{"val_acc": "high"}'),
        lambda f: (f / "checksums.json").write_text("[1, "),
    ],
)
def test_a_damaged_baseline_cache_names_the_folder_to_delete(cached, damage):
    task, config, cache, folder = cached
    saved = {p.name: p.read_bytes() for p in folder.iterdir()}
    try:
        damage(folder)
        with pytest.raises(BaselineCacheError, match=f"Delete the folder.*rm -r '{folder}'"):
            load_or_train_baseline(task, config=config, cache_dir=cache, seed=0)
    finally:
        for name, data in saved.items():
            (folder / name).write_bytes(data)
    assert load_or_train_baseline(task, config=config, cache_dir=cache, seed=0).from_cache


def test_a_cache_written_before_checksums_gets_them_and_is_then_guarded(cached):
    task, config, cache, folder = cached
    sums = (folder / "checksums.json").read_bytes()
    try:
        (folder / "checksums.json").unlink()
        assert load_or_train_baseline(task, config=config, cache_dir=cache, seed=0).from_cache
        assert (folder / "checksums.json").read_bytes() == sums
    finally:
        (folder / "checksums.json").write_bytes(sums)

"""Opening a packed file into a model, safely: the modules that replace layers (`Replacement`),
the bounds a file's records must keep (the model's own shapes, with its replacements; the bytes
the model's tensors may take), and the only module attributes a file may restore
(`ARCHITECTURE_ATTRS`). Nothing a file says is allocated, built or set before it is checked
against the model it is loaded into (see `compressors.packing` for the formats)."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from compressors._container import (
    MAX_INDEX_BYTES,
    MAX_UNBOUNDED_BYTES,
    Packed,
    PackedFileError,
    open_packed,
)
from compressors._structured_heads import HEAD_COUNTS, HEAD_SIZES, HEAD_WIDTHS


class Replacement(nn.Module):
    """A module that replaces a layer of the original architecture (e.g. a low-rank pair).

    Subclasses registered with `register_replacement` are recorded in the packed file by
    `spec`, and `like` rebuilds an empty one from the original layer when the file is loaded.
    """

    def spec(self) -> dict:
        """JSON-able arguments that, with the original layer, fix this module's structure."""
        raise NotImplementedError

    @classmethod
    def like(cls, original: nn.Module, spec: dict) -> nn.Module:
        """An (untrained) module of the structure ``spec`` describes, replacing ``original``."""
        raise NotImplementedError


_REPLACEMENTS: dict[str, type[Replacement]] = {}


def register_replacement(cls: type[Replacement]) -> type[Replacement]:
    """Class decorator: let packed files record and rebuild modules of ``cls``."""
    _REPLACEMENTS[cls.__name__] = cls
    return cls


#: Module attributes a packed file may restore: those compression changes (layer widths, head
#: counts and widths), each only on a module that has it, as an int or a tuple of ints as it is.
ARCHITECTURE_ATTRS = frozenset(
    {
        "in_features",
        "out_features",
        "in_channels",
        "out_channels",
        "groups",
        "num_features",
        "num_channels",
        "num_groups",
        "num_parameters",
        "normalized_shape",
        "num_embeddings",
        "embedding_dim",
        "input_size",
        "hidden_size",
        "proj_size",
        "embed_dim",
        "kdim",
        "vdim",
        "nx",
        "nf",
        "intermediate_size",
        "num_key_value_heads",
        *HEAD_COUNTS,
        *HEAD_SIZES,
        *HEAD_WIDTHS,
    }
)
#: Largest value an integer attribute may be restored to.
_MAX_ATTR = 2**31 - 1


def limits(model: nn.Module | None) -> tuple[int, int]:
    """``(payload bytes, index bytes)`` a file made from ``model`` may decompress to at most:
    32 bytes per value (float32 arrays, positions and codes take at most 10; a low-rank pair's
    two factors at most twice the layer's values) and 8 KB of record per tensor."""
    if model is None:
        return MAX_UNBOUNDED_BYTES, MAX_INDEX_BYTES
    state = model.state_dict()
    values = sum(t.numel() for t in state.values())
    return 32 * values + 4096 * len(state) + (1 << 20), 8192 * len(state) + (1 << 20)


def opened(
    path: str | os.PathLike, model: nn.Module | None, data: bytes | None = None
) -> tuple[Packed, dict[str, nn.Module]]:
    """``(packed file, rebuilt replacement modules by name)``, every record bounded by the
    shapes of ``model`` (a fresh model of the file's architecture; not changed) with the
    replacements the file records, before any array is decoded."""
    max_bytes, max_index = limits(model)
    packed = open_packed(path, data, max_bytes=max_bytes, max_index=max_index)
    if model is None:
        packed.bound(None)
        return packed, {}
    replaced = _replacements(path, packed.meta["modules"], model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, module in replaced.items():
        shapes = {k: v for k, v in shapes.items() if not k.startswith(f"{name}.")}
        shapes.update({f"{name}.{k}": tuple(v.shape) for k, v in module.state_dict().items()})
    meta = packed.meta
    tied = meta.get("tied", {})
    stored = set(meta["t"]) | set(tied)
    if stored != set(shapes):
        missing, extra = sorted(set(shapes) - stored), sorted(stored - set(shapes))
        raise PackedFileError(
            f"{path} does not fit the model: missing {missing}, unexpected {extra}"
        )
    if any(canonical not in meta["t"] or canonical in tied for canonical in tied.values()):
        raise PackedFileError(f"{path} ties a tensor to one it does not store: {tied}")
    packed.bound(shapes)
    return packed, replaced


def _replacements(path, records: dict, model: nn.Module) -> dict[str, nn.Module]:
    """The modules a file's records say replace layers of ``model``, rebuilt from them (their
    sizes bounded by the layers': `Replacement.like` checks its record)."""
    replaced = {}
    for name, spec in records.items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        cls = _REPLACEMENTS.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise PackedFileError(
                f"{path} replaces module {name!r} by one of unknown type {kind!r}; known: "
                f"{sorted(_REPLACEMENTS)}"
            )
        original = module_named(path, model, name, what="replaces")
        if not name or any(name.startswith(f"{other}.") for other in records if other != name):
            raise PackedFileError(f"{path} replaces {name!r} inside another replaced module")
        try:
            replaced[name] = cls.like(original, {k: v for k, v in spec.items() if k != "type"})
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as err:
            raise PackedFileError(f"{path}: module {name!r} cannot be rebuilt: {err}") from None
    return replaced


def module_named(path, model: nn.Module, name: str, *, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise PackedFileError(f"{path} {what} module {name!r}, which the model has not") from None


def restore_attributes(path, model: nn.Module, attrs: dict) -> None:
    """Set the module attributes a file records as changed by compression: only those of
    `ARCHITECTURE_ATTRS` a module has, each to a value of the type it has (an int in
    0..2**31-1, or a tuple of as many such ints)."""
    for name, values in attrs.items():
        module = module_named(path, model, name, what="sets attributes of")
        if not isinstance(values, dict):
            raise PackedFileError(f"{path}: the attributes of module {name!r} are not an object")
        for attr, value in values.items():
            current = vars(module).get(attr)
            if attr not in ARCHITECTURE_ATTRS or current is None:
                raise PackedFileError(
                    f"{path} sets attribute {attr!r} of module {name!r}: a packed file may set "
                    "only the architecture attributes a module has: "
                    f"{', '.join(sorted(ARCHITECTURE_ATTRS))}"
                )
            restored = typed_like(current, value)
            if restored is None:
                raise PackedFileError(
                    f"{path} sets attribute {attr!r} of module {name!r} to {value!r}; it is "
                    f"{current!r}, and may become only a value of its type (integers in "
                    f"0..{_MAX_ATTR})"
                )
            setattr(module, attr, restored)


def typed_like(current: Any, value: Any) -> int | tuple[int, ...] | None:
    """``value`` as the type of ``current`` (an int, or a tuple of ints of its length), or None
    where it is not one."""

    def whole(v: Any) -> bool:
        return type(v) is int and 0 <= v <= _MAX_ATTR

    if type(current) is int:
        return value if whole(value) else None
    if type(current) is tuple and all(type(c) is int for c in current):
        if isinstance(value, list) and len(value) == len(current) and all(map(whole, value)):
            return tuple(value)
    return None

"""A model as a packed file sees it: its plain state (parametrizations evaluated, each tensor
with the parametrization giving its codes) and what the file records of its structure besides
(tensors tied across modules, layers that run on int8 kernels, module attributes compression
changed); see `compressors.packing`."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from compressors._opening import ARCHITECTURE_ATTRS, Replacement, typed_like
from compressors._targets import foreign_parametrization, targets

logger = logging.getLogger(__name__)

_PARAMETRIZED = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.original$")


def plain_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, nn.Module]]:
    """The model's state with parametrizations evaluated, and the parametrization that gives
    the codes (`Codes`) of each tensor kept on a discrete set of values.

    The model is left untouched (removing parametrizations from a deep copy would also strip them
    from the original, which shares the copy's parametrized class).

    Returns:
        ``(state, grids)``: ``state`` has the keys of the uncompressed model's ``state_dict``;
        ``grids`` maps the keys of such tensors to the parametrization with ``packed``.
    """
    sources = _sources(model)
    with torch.no_grad():
        state = {name: value() for name, (value, _, _) in sources.items()}
    return state, {name: grid for name, (_, grid, _) in sources.items() if grid is not None}


_Source = tuple[Callable[[], torch.Tensor], "nn.Module | None", int]


def _sources(model: nn.Module) -> dict[str, _Source]:
    """``{key: (value, grid, numel)}`` in state order: a function computing the tensor's plain
    value (its parametrizations evaluated; called when the tensor is written, so that the whole
    evaluated state is never held at once), its parametrization with ``packed`` (or None), and
    its number of values."""
    sources: dict[str, _Source] = {}
    foreign = _Foreign(model)
    for key, value in model.state_dict().items():
        if foreign(key):  # the model's own parametrization: what it keeps, as it is
            sources[key] = (partial(_plain, value), None, value.numel())
            continue
        match = _PARAMETRIZED.match(key)
        if match is None:
            if ".parametrizations." not in f".{key}":
                sources[key] = (partial(_plain, value), None, value.numel())
            continue
        module_name, tensor_name = match.group(1) or "", match.group(2)
        module = model.get_submodule(module_name)
        full = f"{module_name}.{tensor_name}".lstrip(".")
        grid = None
        for p in module.parametrizations[tensor_name]:
            if callable(getattr(p, "packed", None)):
                grid = p
        sources[full] = (partial(_evaluated, module, tensor_name), grid, value.numel())
    return sources


_IN_PARAMETRIZATION = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.")


def _foreign(model: nn.Module, key: str) -> bool:
    """Whether state ``key`` belongs to a parametrization of the model's own (torch's
    ``weight_norm``: ``...parametrizations.weight.original0`` and ``original1``;
    `compressors._targets.foreign_parametrization`), whose originals and buffers the file
    stores as they are, for the same parametrization of a freshly built model to read."""
    return _Foreign(model)(key)


class _Foreign:
    """`_foreign` of many keys of one model: each parametrized tensor's answer found once
    (a module looked up by its path, and its parametrizations' classes, for each of a BERT's
    few hundred state keys, in two walks of the state, was a twentieth of packing it)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.known = model, {}

    def __call__(self, key: str) -> bool:
        match = _IN_PARAMETRIZATION.match(key)
        if match is None:
            return False
        where = (match.group(1) or "", match.group(2))
        if where not in self.known:
            module = self.model.get_submodule(where[0])
            self.known[where] = foreign_parametrization(module, where[1]) is not None
        return self.known[where]


def _coded_sources(model: nn.Module) -> dict[str, Callable[[], Any]]:
    """``{key: value}`` for the tensors whose last parametrization gives their codes from its
    input (``packed_from``, `compressors.quant.FakeQuant`): a function giving the tensor's
    `Codes` without evaluating its float value (the parametrizations before the last one
    evaluated), or its value where ``packed_from`` declines (None). A packed file takes these
    in place of `_sources`' values."""
    coded: dict[str, Callable[[], Any]] = {}
    for module_name, module in model.named_modules():
        for tensor_name, chain in getattr(module, "parametrizations", {}).items():
            last = chain[-1] if len(chain) else None
            if callable(getattr(last, "packed_from", None)) and getattr(chain, "is_tensor", False):
                full = f"{module_name}.{tensor_name}".lstrip(".")
                coded[full] = partial(_coded, module, tensor_name)
    return coded


def _coded(module: nn.Module, name: str) -> Any:
    chain = module.parametrizations[name]
    with torch.no_grad():
        value = chain.original
        for parametrization in list(chain)[:-1]:
            value = parametrization(value)
        codes = chain[-1].packed_from(value)
    return codes if codes is not None else _evaluated(module, name)


def _plain(value: torch.Tensor) -> torch.Tensor:
    return value.detach().contiguous()


def _evaluated(module: nn.Module, name: str) -> torch.Tensor:
    with torch.no_grad():
        return getattr(module, name).detach().contiguous()


def _tied_keys(model: nn.Module) -> dict[str, str]:
    """``{key: first key}`` for state keys whose tensor is the one of an earlier key."""
    first: dict[tuple, str] = {}
    tied = {}
    for key, value in _state_identities(model):
        if value in first:
            tied[key] = first[value]
        else:
            first[value] = key
    return tied


def _state_identities(model: nn.Module):
    """``(key, identity)`` of each entry of the plain state: the same identity for tensors
    shared by several modules (the original under a parametrization, else the storage)."""
    foreign = _Foreign(model)
    for key, value in model.state_dict(keep_vars=True).items():
        match = None if foreign(key) else _PARAMETRIZED.match(key)
        if match is not None:
            full = f"{match.group(1) or ''}.{match.group(2)}".lstrip(".")
            yield full, ("p", id(value))
        elif ".parametrizations." not in f".{key}" or foreign(key):
            storage = value.untyped_storage().data_ptr() if value.numel() else id(value)
            yield key, ("s", storage, value.storage_offset(), tuple(value.shape), value.stride())


def _int8_layers(model: nn.Module, grids: dict[str, nn.Module]) -> list[str]:
    """Layers all of whose weights are on grids that asked for int8 kernels."""
    layers: dict[str, list[bool]] = {}
    for target in targets(model).values():
        grid = grids.get(target.name)
        layers.setdefault(target.module_name, []).append(
            grid is not None and getattr(grid, "runtime", "float") == "int8"
        )
    return sorted(name for name, flags in layers.items() if all(flags))


#: Attribute values recorded when they differ from the uncompressed model's.
_PLAIN = (int, float, bool, str, type(None))


def _changed_attributes(model: nn.Module, like: nn.Module) -> dict[str, dict[str, Any]]:
    """Public attributes of plain value (numbers, strings, tuples of them) of each module that
    differ from the same module of ``like``."""
    reference = dict(like.named_modules())
    changed: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        other = reference.get(name)
        if other is None or isinstance(module, Replacement):
            continue
        if type_before_parametrizations(module) is not type_before_parametrizations(other):
            continue
        for attr, value in vars(module).items():
            if attr.startswith("_") or attr == "training" or not _is_plain(value):
                continue
            before = getattr(other, attr, None)
            if before == value:
                continue
            if attr not in ARCHITECTURE_ATTRS or typed_like(before, _listed(value)) is None:
                _warn_unrecorded(type(module).__name__, attr, before, value)
                continue
            changed.setdefault(name, {})[attr] = _listed(value)
    return changed


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


_WARNED: set[tuple[str, str]] = set()


def _warn_unrecorded(kind: str, attr: str, before: Any, value: Any) -> None:
    """Say (once per attribute of a module type) that a changed attribute is not recorded: a
    packed file restores only `ARCHITECTURE_ATTRS`, as integers or tuples of them."""
    if (kind, attr) not in _WARNED:
        _WARNED.add((kind, attr))
        logger.warning(
            "packed file: %s.%s changed from %r to %r and is not recorded (a packed file "
            "restores only layer widths and head counts, as integers)",
            kind,
            attr,
            before,
            value,
        )


def _is_plain(value: Any) -> bool:
    if isinstance(value, tuple | list):
        return all(isinstance(v, _PLAIN) for v in value)
    return isinstance(value, _PLAIN)

"""Compression methods behind one protocol, their registry, and the packed model file.

The first use of any name below imports every public module of this package, which registers
their methods. To add a method, write one module here with a `Compressor` subclass and add
``conf/compressor/<name>.yaml``; nothing else changes.

The names are loaded lazily (PEP 562): importing a torch-free part such as
``compressors._params`` (the parameter constraints the config schema shares) does not import
torch, so a bad config value is reported at once.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Each public name and the module that defines it.
_API = {
    "CompressionContext": "_base",
    "Compressor": "_base",
    "UnsupportedModelError": "_base",
    "apply_pipeline": "_base",
    "available": "_base",
    "coverage": "_base",
    "detached_copy": "_base",
    "finalize_pipeline": "_base",
    "get_compressor": "_base",
    "Integer": "_params",
    "InvalidParameterError": "_params",
    "Options": "_params",
    "Real": "_params",
    "check_param": "_params",
    "KINDS": "_targets",
    "Target": "_targets",
    "parameter_count": "_targets",
    "targets": "_targets",
    "PackedFileError": "packing",
    "load_packed": "packing",
    "read_packed": "packing",
    "save_packed": "packing",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module(f"{__name__}._base").load_methods()
    value = getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})

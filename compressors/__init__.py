"""Compression methods behind one protocol, their registry, and the packed model file.

Importing this package imports every public module in it, which registers their methods. To add
a method, write one module here with a `Compressor` subclass and add
``conf/compressor/<name>.yaml``; nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil

from compressors._base import (
    CompressionContext,
    Compressor,
    UnsupportedModelError,
    apply_pipeline,
    available,
    coverage,
    finalize_pipeline,
    get_compressor,
)
from compressors._params import Integer, InvalidParameterError, Options, Real, check_param
from compressors._targets import KINDS, Target, parameter_count, targets
from compressors.packing import PackedFileError, load_packed, read_packed, save_packed

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "KINDS",
    "CompressionContext",
    "Compressor",
    "Integer",
    "InvalidParameterError",
    "Options",
    "PackedFileError",
    "Real",
    "UnsupportedModelError",
    "apply_pipeline",
    "available",
    "coverage",
    "finalize_pipeline",
    "check_param",
    "get_compressor",
    "load_packed",
    "read_packed",
    "parameter_count",
    "save_packed",
    "Target",
    "targets",
]

"""Compression methods behind one protocol, their registry, and the packed model file.

Importing this package registers every method module listed below. To add a method, write one
module with a `Compressor` subclass, import it here, and add ``conf/compressor/<name>.yaml``.
"""

from __future__ import annotations

from compressors import kd, prune, quant, structured  # noqa: F401  (registers the methods)
from compressors._base import (
    CompressionContext,
    Compressor,
    apply_pipeline,
    available,
    get_compressor,
)
from compressors._params import Integer, InvalidParameterError, Options, Real, check_param
from compressors.packing import PackedFileError, load_packed, read_packed, save_packed

__all__ = [
    "CompressionContext",
    "Compressor",
    "Integer",
    "InvalidParameterError",
    "Options",
    "PackedFileError",
    "Real",
    "apply_pipeline",
    "available",
    "check_param",
    "get_compressor",
    "load_packed",
    "read_packed",
    "save_packed",
]

"""``round_to: auto``: the channel block of the CPU that times a latency sweep, fixed in its config.

Structured pruning keeps each group's channels in multiples of ``round_to`` (`compressors.
structured`). CPU kernels run channels in blocks: ONNX Runtime's NCHWc convolutions (and oneDNN's
blocked layouts, which torch's convolutions use) in blocks of 8 floats with AVX2 and 16 with
AVX-512, and other widths run no faster than the next multiple of the block, or slower (on a Zen 1
AVX2 EPYC the bench's ResNet ran 2.18x at batch 32 at ``round_to`` 8, 1.22-1.25x at 16 and less at
1: README, Benchmarks). So ``auto`` (conf/compressor/structured.yaml's value) is:

- the block of this machine's CPU (`cpu_block`) when the sweep's objectives or constraints include
  a latency or a speed-up (``latency_ms``, ``latency_ms_bB``, ``speedup``, ``speedup_bB``): that is
  the CPU that times every trial;
- 1 otherwise: a size-only sweep prunes exactly as before.

`resolve_auto` writes the chosen int into the composed config before the space is parsed, so the
study's ``config.yaml``, its fingerprint, every trial's logged ``structured.round_to`` and
`squeeze export`'s experiment hold the number, not ``auto``: `squeeze run` reproduces the trial
on any machine. A study continued on a machine whose block differs is refused by its fingerprint
(its space changed); ``space.structured.round_to=<the study's value>`` continues it there.
An explicit value (``space.structured.round_to=1``, ``choice(8, 16)``) is kept as given.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, open_dict

logger = logging.getLogger(__name__)

#: The value of a ``round_to`` that `resolve_auto` chooses.
AUTO = "auto"
#: The parameters ``auto`` may stand for, by name (any compressor of the space declaring one).
AUTO_PARAMS = ("round_to",)
#: Metrics (and their ``_bB`` forms) that make a sweep a latency sweep.
SPEED_METRICS = ("latency_ms", "speedup")


@dataclass(frozen=True)
class Block:
    """What ``auto`` became, and why (logged at the sweep's start)."""

    value: int
    reason: str


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: ``/proc/cpuinfo``'s where it exists, else torch's dispatch
    capability (``AVX512`` stands for ``avx512f``, ``AVX2`` for ``avx2`` and ``fma``)."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.partition(":")[2].split())
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return {
        "AVX512": frozenset({"avx512f", "avx2", "fma"}),
        "AVX2": frozenset({"avx2", "fma"}),
    }.get(capability, frozenset())


def cpu_block(flags: Iterable[str] | None = None) -> Block:
    """The channel block of the CPU's float kernels: 16 with AVX-512 (``avx512f``), 8 with AVX2
    and FMA, else 1 (no blocked layout to fill)."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    if "avx512f" in flags:
        return Block(16, "AVX-512: kernels run channels in blocks of 16")
    if {"avx2", "fma"} <= flags:
        return Block(8, "AVX2: kernels run channels in blocks of 8")
    return Block(1, "no AVX2: no channel block")


def speed_metrics(cfg: DictConfig) -> list[str]:
    """The objectives and set constraints of ``cfg`` that are a latency or a speed-up."""
    search = cfg.search
    constraints = search.get("constraints") or {}
    named = [*search.objectives, *(k for k, v in constraints.items() if v is not None)]
    return [n for n in named if n in SPEED_METRICS or n.startswith(("latency_ms_b", "speedup_b"))]


def auto_block(cfg: DictConfig, flags: Iterable[str] | None = None) -> Block:
    """What ``auto`` is for the sweep ``cfg``: the CPU's block for a latency sweep, else 1."""
    speed = speed_metrics(cfg)
    if not speed:
        return Block(1, "no latency or speed-up among the objectives and constraints")
    block = cpu_block(flags)
    runtime = "ONNX Runtime" if cfg.measure.get("runtime") == "onnxruntime" else "torch"
    return Block(block.value, f"{', '.join(speed)} timed in {runtime} on this CPU; {block.reason}")


def resolve_auto(cfg: DictConfig, flags: Iterable[str] | None = None) -> DictConfig:
    """``cfg`` (a copy, when anything changes) with each ``auto`` of the space's `AUTO_PARAMS`
    replaced by `auto_block`'s value, logged once with its reason."""
    space = cfg.get("space")
    if not isinstance(space, Mapping):
        return cfg
    autos = [
        (comp, key)
        for comp, entry in space.items()
        if isinstance(entry, Mapping)
        for key in AUTO_PARAMS
        if entry.get(key) == AUTO
    ]
    if not autos:
        return cfg
    block = auto_block(cfg, flags)
    resolved = copy.deepcopy(cfg)  # (the caller's config stays as composed)
    with open_dict(resolved):
        for comp, key in autos:
            resolved.space[comp][key] = block.value
    names = ", ".join(f"{comp}.{key}" for comp, key in autos)
    log = logger.info if block.value != 1 else logger.debug  # (size-only sweeps: as before)
    log("%s: auto -> %d (%s)", names, block.value, block.reason, extra={"once": True})
    return resolved

"""Where training runs: ``device`` (``cpu``, ``cuda`` or ``auto``) resolved, and the GPUs seen."""

from __future__ import annotations

from omegaconf import DictConfig


def resolve_device(device: str) -> str:
    """``cpu`` or ``cuda``: ``auto`` is ``cuda`` when torch sees a GPU."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def training_device(cfg: DictConfig) -> str | None:
    """``cuda`` when ``cfg.device`` resolves to it (a worker sees only the GPU it is pinned to),
    else None: train on the CPU."""
    return "cuda" if resolve_device(str(cfg.device)) == "cuda" else None


def gpu_count() -> int:
    """GPUs torch sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0

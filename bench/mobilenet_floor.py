"""How fast can the zoo MobileNet get in ONNX Runtime: its prefixes and narrow widths, timed
side by side with the baseline's fp32 graph at batch 1 and 32 (issue 24's 2x at batch 32).

Every graph is the product's export (`compressors.onnx_export.export_onnx` of a packed file,
BatchNorm folded) of an untrained model of the zoo's MobileNet (`tests.zoo.models.MobileNet`:
timing does not depend on the weights): the baseline's widths 16/32/64, narrower widths (what
structured pruning can leave), a W8A8 graph at 16/16/16 (calibrated on digits, not fine-tuned),
and prefixes of the 16/16/16 model cut after its stem, its first depthwise and its first
pointwise convolution (each + ReLU6, then global average pooling): a prefix's speed-up bounds
that of every model that keeps those layers at those widths. Each graph is timed against the
baseline's in alternating rounds (`bench._common.side_by_side`: thread CPU time, median of the
rounds' medians) with ``ort_session``'s settings (one thread, every optimisation).

    python bench/mobilenet_floor.py [--rounds 15] [--repeats 100]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(1, str(ROOT))  # (the zoo: tests.zoo)
from _common import quiet  # noqa: E402

from compressors import CompressionContext, apply_pipeline, get_compressor, save_packed  # noqa: E402
from compressors.onnx_export import OrtModule, export_onnx, ort_session  # noqa: E402
from experiments.metrics import interleaved_latency_ms  # noqa: E402
from search.run.measure import latency_clock  # noqa: E402
from tests.zoo import tasks  # noqa: E402
from tests.zoo.models import MobileNet  # noqa: E402

#: Widths timed whole (the baseline's first).
WIDTHS = (
    (16, 32, 64),
    (16, 16, 16),
    (16, 16, 32),
    (16, 8, 16),
    (16, 16, 8),
    (8, 16, 16),
    (8, 8, 8),
)
#: Prefixes of the 16/16/16 model: (label, modules of ``features`` kept).
PREFIXES = (("stem", 3), ("stem + depthwise", 6), ("stem + depthwise + pointwise", 9))


class Prefix(nn.Module):
    """The first ``keep`` modules of a MobileNet's ``features``, then global average pooling."""

    def __init__(self, keep: int) -> None:
        super().__init__()
        self.features = MobileNet(1, 10, widths=(16, 16, 16)).features[:keep]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean((2, 3))


def _graph(build, folder: Path, name: str, example: torch.Tensor) -> Path:
    """The fp32 graph of ``build()`` (untrained, seed 0), exported from its packed file."""
    torch.manual_seed(0)
    save_packed(build().eval(), folder / f"{name}.sqz")
    export_onnx(folder / f"{name}.sqz", build(), example, folder / f"{name}.onnx")
    return folder / f"{name}.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(1)
    task = tasks.zoo_mobilenet(seed=0)
    example = task.example_inputs(8)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        graphs = {}
        for widths in WIDTHS:
            graphs["/".join(map(str, widths))] = _graph(
                lambda w=widths: MobileNet(1, 10, widths=w),
                folder,
                "-".join(map(str, widths)),
                example,
            )
        torch.manual_seed(0)
        narrow = MobileNet(1, 10, widths=(16, 16, 16)).eval()
        ctx = CompressionContext(train=task.train, example_inputs=example, seed=0)
        quant = get_compressor("quant")(bits=8, activations=8, calibration="mse")
        w8a8 = apply_pipeline([quant], copy.deepcopy(narrow), ctx).eval()
        save_packed(w8a8, folder / "w8a8.sqz", like=narrow)
        export_onnx(
            folder / "w8a8.sqz",
            MobileNet(1, 10, widths=(16, 16, 16)),
            example,
            folder / "w8a8.onnx",
        )
        graphs["16/16/16 W8A8"] = folder / "w8a8.onnx"
        for label, keep in PREFIXES:
            graphs[f"prefix: {label}"] = _graph(
                lambda k=keep: Prefix(k), folder, f"prefix{keep}", example
            )
        modules = {k: OrtModule(ort_session(p, threads=1)) for k, p in graphs.items()}
        base = modules["16/32/64"]
        print(f"load (1, 5, 15 min): {os.getloadavg()}; CPU: {_cpu()}")
        print(f"{'graph':36} {'b1 us':>7} {'b1 x':>6} {'b32 us':>7} {'b32 x':>6} {'ONNX B':>7}")
        for label, module in modules.items():
            cells = []
            for batch in (1, 32):
                x = task.val.x[:batch]
                ms, base_ms = interleaved_latency_ms(
                    module, base, x, rounds=args.rounds, repeats=args.repeats, clock=latency_clock()
                )
                cells.append(f"{ms * 1e3:7.1f} {base_ms / ms:5.2f}x")
            print(f"{label:36} {' '.join(cells)} {graphs[label].stat().st_size:7,}", flush=True)


def _cpu() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return f"{name} ({', '.join(f for f in ('avx2', 'avx512f', 'avx512_vnni') if f in flags)})"


if __name__ == "__main__":
    main()
